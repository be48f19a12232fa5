//! # image-buffer: the shared-memory ring every std-daq stage uses
//!
//! Every per-module FrameBuffer and the ImageBuffer is one *segment*: a file in `/dev/shm` with
//! `n_slots` fixed-size slots. Image `id` lives in slot `id % n_slots`, so newer images overwrite
//! older ones. Exactly one process, the [`RingOwner`], creates, writes and finally unlinks a
//! segment; any number of [`RingReader`]s (in any process) map it read-only and validate every read
//! with a per-slot seqlock.
//!
//! A receiver that writes one image from several threads turns its owner into a [`SharedRing`]:
//! threads claim disjoint byte ranges of a slot and one thread commits (module `shared`).
//! The assembler's worker threads write one image together, each in its own fixed regions (sets of
//! row segments checked disjoint once, at set-up): a [`RegionRing`] (module `regions`).
//!
//! ## What this crate must never do
//! - Let a reader create, truncate, write or unlink a segment.
//! - Let an owner unlink a segment it did not create (e.g. its successor's).
//! - Show anyone a half-initialised segment: it is built under a temporary name, then renamed.
//! - Report a torn or overwritten image as good, or panic on a malformed segment.
//! - Block: the writer never waits for readers and readers never wait for the writer.
//!
//! ## Segment layout (little-endian, offsets in bytes)
//! ```text
//!  offset                                                             notes
//!  0              +--------------------------------------------+
//!                 | Header (#[repr(C)], Pod, 128 bytes)         |
//!                 |   0 magic u64 = "STDDAQRB"                  |
//!                 |   8 layout_version u32  12 header_bytes u32 |   header_bytes = 4096
//!                 |  16 n_slots u64         24 slot_bytes u64   |
//!                 |  32 meta_bytes u64                          |   = size_of::<M>()
//!                 |  40 control_offset u64  48 control_stride   |   4096; (8 + meta_bytes) -> x64
//!                 |  56 data_offset u64     64 data_stride u64  |   both rounded up to 4096
//!                 |  72 owner_pid u32       76..128 reserved    |
//!                 | zeros up to 4096                            |
//!  control_offset +--------------------------------------------+
//!                 | [seq: AtomicU64][meta: M][pad]   slot 0     |   one entry per control_stride,
//!                 | [seq: AtomicU64][meta: M][pad]   slot 1     |   meta 8-byte aligned
//!                 | ...                          slot n_slots-1 |
//!  data_offset    +--------------------------------------------+
//!                 | data: slot_bytes, zero pad   slot 0         |   one slot per data_stride,
//!                 | data: slot_bytes, zero pad   slot 1         |   page aligned
//!                 | ...                          slot n_slots-1 |
//!  file size      +--------------------------------------------+   data_offset + n_slots * data_stride
//! ```
//!
//! ## Per-slot seqlock
//! ```text
//!  seq == 0                    empty
//!  seq == (id + 1) << 1        committed(id): meta and data hold image `id`
//!  seq == (id + 1) << 1 | 1    writing(id): being (over)written with image `id`
//!
//!  writer (begin_write .. commit)           reader (read / copy_out)
//!  ------------------------------           ---------------------------------------------------
//!  seq.store(writing(id), Relaxed)          s1 = seq.load(Relaxed)
//!  fence(Release) ............ (B)          fence(Acquire)  pairs with (A): s1 == committed(id)
//!    the mark is visible before                             => that image's bytes are visible
//!    any data or meta store                 s1 != committed(id) -> NotPresent | Overwritten
//!  store meta and data                      f(&meta, data)  bytes may change under f
//!  seq.store(committed(id), Release) (A)    fence(Acquire)  pairs with (B): if f saw any byte of
//!                                                           a later write, s2 shows its mark
//!  dropped without commit:                  s2 = seq.load(Relaxed)
//!  seq.store(0, Release)                    s2 == s1 -> Ok(f's result)
//!                                           s2 holds another id -> Overwritten { found_image_id }
//!                                           s2 holds id again, or 0 -> Torn
//! ```
//! So being lapped mid-read is reported as `Overwritten`, like being lapped before the read; `Torn`
//! means the same id was rewritten or abandoned meanwhile. An id rewritten *and committed again*
//! during a read is indistinguishable from no change: writers must give an id one content.
//!
//! Readers load `seq` with `Relaxed` plus an `Acquire` fence rather than an `Acquire` load because
//! their mapping is read-only, and std only guarantees `Relaxed` atomic loads on read-only memory.
//! Both sides hold the mapping as raw pointers (`MmapRaw`), never as a long-lived slice: the bytes
//! change under the reader, and `f`'s `&[u8]` is only trustworthy if `read` returns `Ok`.
//!
//! ## Lifecycle
//! [`RingOwner::create`] builds `/dev/shm/.<name>.<pid>.<n>.tmp`: reserves its memory, pre-faults
//! every page, writes the header last, takes an exclusive `flock` and renames it to `/dev/shm/<name>`.
//! An existing segment whose lock is held is [`RingError::InUse`]; an unlocked one is stale (its owner
//! crashed) and is replaced. Readers treat an unlocked segment as [`RingError::Stale`]. The owner's
//! `Drop` unlinks the path only if it still names the owner's own inode.

#![cfg_attr(test, allow(clippy::unwrap_used))]

#[cfg(not(all(unix, target_has_atomic = "64", target_pointer_width = "64")))]
compile_error!("image-buffer needs a 64-bit unix target with 64-bit atomics");

mod layout;
mod owner;
mod reader;
mod regions;
mod shared;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use owner::{RingOwner, SlotWriter};
pub use reader::{Expect, ReadError, RingReader};
pub use regions::{
    OutsideRegion, PlanError, RangeView, RegionError, RegionPlan, RegionRing, RegionWriter,
    SlotView, MAX_REGION_WRITERS,
};
pub use shared::{ClaimError, PartWriter, SharedRing};

/// First 8 bytes of every segment.
pub const MAGIC: u64 = u64::from_le_bytes(*b"STDDAQRB");
/// Bumped whenever the segment layout or the seqlock protocol changes.
pub const LAYOUT_VERSION: u32 = 1;
/// Image ids must be at most this (the seqlock encodes `(id + 1) << 1`).
pub const MAX_IMAGE_ID: u64 = (1 << 62) - 1;
/// Bytes reserved for the header at the start of every segment.
pub const HEADER_BYTES: u64 = 4096;

const SHM_DIR: &str = "/dev/shm";
/// Keeps `.<name>.<pid>.<n>.tmp` below the usual 255-byte file name limit.
const MAX_NAME_BYTES: usize = 200;

/// The file behind segment `name`: `/dev/shm/<name>`.
pub fn segment_path(name: &str) -> PathBuf {
    Path::new(SHM_DIR).join(name)
}

/// Why a segment could not be created or attached. Every message names the segment's path.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("shared-memory segment {path}: invalid segment name: {reason}")]
    InvalidName { path: PathBuf, reason: &'static str },

    #[error(
        "shared-memory segment {path}: invalid geometry n_slots={n_slots}, slot_bytes={slot_bytes}, \
         meta_bytes={meta_bytes} (slots and sizes must be non-zero and the total must fit in memory)"
    )]
    InvalidGeometry {
        path: PathBuf,
        n_slots: u64,
        slot_bytes: u64,
        meta_bytes: u64,
    },

    #[error("shared-memory segment {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("shared-memory segment {path} does not exist (is its owner running?)")]
    Missing { path: PathBuf },

    #[error(
        "shared-memory segment {path} is truncated: file size {file_bytes} bytes is smaller than \
         the {HEADER_BYTES}-byte header"
    )]
    Truncated { path: PathBuf, file_bytes: u64 },

    #[error(
        "shared-memory segment {path}: magic: expected {MAGIC:#018x} (\"STDDAQRB\"), found \
         {found:#018x}; not a std-daq ring"
    )]
    BadMagic { path: PathBuf, found: u64 },

    #[error("shared-memory segment {path}: {field}: expected {expected}, found {found}")]
    HeaderMismatch {
        path: PathBuf,
        field: &'static str,
        expected: u64,
        found: u64,
    },

    #[error("shared-memory segment {path} is in use by its live owner ({})", pid_text(.pid))]
    InUse { path: PathBuf, pid: Option<u32> },

    #[error(
        "shared-memory segment {path} has no live owner (last owner {}): left over from a crashed \
         run; its next owner replaces it",
        pid_text(.pid)
    )]
    Stale { path: PathBuf, pid: Option<u32> },

    #[error(
        "shared-memory segment {path}: image id {image_id} exceeds MAX_IMAGE_ID ({MAX_IMAGE_ID})"
    )]
    ImageIdTooLarge { path: PathBuf, image_id: u64 },

    #[error("timed out after {waited:?} waiting for shared-memory segment {path}: {last}")]
    Timeout {
        path: PathBuf,
        waited: Duration,
        last: Box<RingError>,
    },

    #[error("cancelled while waiting for shared-memory segment {path}")]
    Cancelled { path: PathBuf },
}

fn pid_text(pid: &Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "unknown pid".to_owned(),
    }
}

/// Checks `name` and returns its path: a single, visible, printable-ASCII file name.
fn validated_path(name: &str) -> Result<PathBuf, RingError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_BYTES {
        Some("it is longer than 200 bytes")
    } else if name.contains('/') {
        Some("it contains '/'")
    } else if name.starts_with('.') {
        Some("it starts with '.'")
    } else if !name.bytes().all(|b| b.is_ascii_graphic()) {
        Some("it contains characters other than printable ASCII (no spaces)")
    } else {
        None
    };
    let path = segment_path(name);
    match reason {
        Some(reason) => Err(RingError::InvalidName { path, reason }),
        None => Ok(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert_eq!(
            validated_path("std-daq.det.module-0").unwrap(),
            Path::new("/dev/shm/std-daq.det.module-0")
        );
        for bad in [
            "",
            "a/b",
            ".hidden",
            "sp ace",
            "tab\t",
            "é",
            &"x".repeat(201),
        ] {
            let err = validated_path(bad).unwrap_err();
            assert!(matches!(err, RingError::InvalidName { .. }), "{bad:?}");
            assert!(err.to_string().contains("/dev/shm/"), "{err}");
        }
    }

    #[test]
    fn error_messages_name_path_and_values() {
        let err = RingError::HeaderMismatch {
            path: segment_path("x"),
            field: "n_slots",
            expected: 4,
            found: 8,
        };
        assert_eq!(
            err.to_string(),
            "shared-memory segment /dev/shm/x: n_slots: expected 4, found 8"
        );
        let err = RingError::InUse {
            path: segment_path("x"),
            pid: Some(42),
        };
        assert_eq!(
            err.to_string(),
            "shared-memory segment /dev/shm/x is in use by its live owner (pid 42)"
        );
    }
}
