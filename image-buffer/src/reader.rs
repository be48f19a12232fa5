//! The reader side: attaches to a live segment read-only and validates every read with the slot's
//! seqlock. A reader never creates, truncates, writes, locks for longer than a probe, or unlinks.

use std::fmt;
use std::fs::{File, TryLockError};
use std::io;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::slice;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bytemuck::Pod;
use memmap2::{MmapOptions, MmapRaw};

use crate::layout::{Header, Layout, SlotState, HEADER_STRUCT_BYTES, SEQ_BYTES};
use crate::{
    segment_path, validated_path, RingError, HEADER_BYTES, LAYOUT_VERSION, MAGIC, MAX_IMAGE_ID,
};

const ATTACH_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Expectations a reader checks against the header. `None` = accept what is there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expect {
    pub n_slots: Option<u64>,
    pub slot_bytes: Option<u64>,
}

/// Why a read did not return a trustworthy image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The slot holds no committed image (empty, or being written and never committed before).
    #[error("image not present: its slot holds no committed image")]
    NotPresent,
    /// The slot holds (or is being written with) another image: the requested one was
    /// overwritten (found > requested) or not yet written (found < requested).
    #[error("image not available: its slot holds image {found_image_id} (overwritten or not yet written)")]
    Overwritten { found_image_id: u64 },
    /// The image changed while it was being read (rewritten under the same id, or emptied by an
    /// abandoned write): do not trust what was read.
    #[error("image changed while it was being read (torn); what was read must not be trusted")]
    Torn,
    /// The id is larger than MAX_IMAGE_ID.
    #[error("image id is larger than MAX_IMAGE_ID ({MAX_IMAGE_ID})")]
    InvalidImageId,
}

/// A reader: attaches read-only, never truncates or unlinks. Several threads may share one.
pub struct RingReader<M: Pod> {
    name: String,
    path: PathBuf,
    layout: Layout,
    /// Raw rather than `Mmap`: the bytes change under us, so no long-lived `&[u8]` may cover them.
    map: MmapRaw,
    /// (device, inode) of the segment this reader mapped, to notice a new owner's segment.
    identity: (u64, u64),
    _meta: PhantomData<fn() -> M>,
}

impl<M: Pod> RingReader<M> {
    /// Attaches to segment `name`, checking its header against `M` and `expect`, and that it has
    /// a live owner.
    pub fn attach(name: &str, expect: Expect) -> Result<Self, RingError> {
        const {
            assert!(
                align_of::<M>() <= SEQ_BYTES as usize,
                "meta records need align <= 8"
            )
        };
        let path = validated_path(name)?;
        let io_error = |source| RingError::Io {
            path: path.clone(),
            source,
        };
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(RingError::Missing { path })
            }
            Err(err) => return Err(io_error(err)),
        };
        let file_meta = file.metadata().map_err(io_error)?;
        let identity = (file_meta.dev(), file_meta.ino());
        let file_bytes = file_meta.len();
        if file_bytes < HEADER_BYTES {
            return Err(RingError::Truncated { path, file_bytes });
        }
        let header = read_header(&file).map_err(io_error)?;
        let layout = validated_layout(&path, &header, size_of::<M>() as u64, expect, file_bytes)?;
        ensure_live_owner(&file, &path, header.owner_pid)?;

        let map = MmapOptions::new()
            .populate()
            .map_raw_read_only(&file)
            .map_err(io_error)?;
        if map.len() as u64 != layout.total_bytes {
            // Resized between the checks above and mmap: someone is breaking the protocol.
            return Err(RingError::HeaderMismatch {
                path,
                field: "file size",
                expected: layout.total_bytes,
                found: map.len() as u64,
            });
        }
        Ok(RingReader {
            name: name.to_owned(),
            path,
            layout,
            map,
            identity,
            _meta: PhantomData,
        })
    }

    /// True when the segment this reader mapped is no longer the one at its name: its owner
    /// restarted (a new segment was renamed into place) or went away (the name was unlinked).
    /// One `stat`; call it now and then (e.g. once a second), not per image.
    pub fn is_replaced(&self) -> bool {
        match std::fs::metadata(&self.path) {
            Ok(m) => (m.dev(), m.ino()) != self.identity,
            Err(_) => true,
        }
    }

    /// For services: waits until the segment's owner has created it, however long that takes,
    /// logging every `log_every` what it waits for (`owner`, e.g. "the receiver of module 0"),
    /// and gives up only when `cancel()` returns true or the segment can never fit.
    pub fn attach_for_service(
        name: &str,
        expect: Expect,
        owner: &str,
        log_every: Duration,
        cancel: impl Fn() -> bool,
    ) -> Result<Self, RingError> {
        loop {
            match Self::attach_wait(name, expect, log_every, &cancel) {
                Err(RingError::Timeout { last, .. }) => {
                    tracing::info!(buffer = name, "waiting for {owner} ({last})");
                }
                other => return other,
            }
        }
    }

    /// Polls every 10 ms until the segment exists and is valid, `timeout` passes
    /// ([`RingError::Timeout`] with the last reason) or `cancel()` returns true.
    pub fn attach_wait(
        name: &str,
        expect: Expect,
        timeout: Duration,
        cancel: impl Fn() -> bool,
    ) -> Result<Self, RingError> {
        let start = Instant::now();
        loop {
            if cancel() {
                return Err(RingError::Cancelled {
                    path: segment_path(name),
                });
            }
            let last = match Self::attach(name, expect) {
                Ok(reader) => return Ok(reader),
                Err(err @ RingError::InvalidName { .. }) => return Err(err),
                // Anything else may be fixed by the owner (re)creating the segment.
                Err(err) => err,
            };
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(RingError::Timeout {
                    path: segment_path(name),
                    waited,
                    last: Box::new(last),
                });
            }
            thread::sleep(ATTACH_POLL_INTERVAL.min(timeout - waited));
        }
    }

    /// Runs `f` on the slot's meta and data if the slot holds committed `image_id`, then re-checks
    /// the sequence: returns Ok(f's result) only if the slot still held that same committed image
    /// after `f` returned, i.e. what f read (or wrote out elsewhere) was intact.
    ///
    /// The writer may be overwriting the bytes while `f` runs: `f` must not panic or misbehave on
    /// inconsistent data, and whatever it computed is only trustworthy if this returns Ok.
    pub fn read<R>(&self, image_id: u64, f: impl FnOnce(&M, &[u8]) -> R) -> Result<R, ReadError> {
        let len = self.layout.slot_len();
        self.read_validated(image_id, |meta, data| {
            // SAFETY: [data, data + len) is the slot's data inside the mapping, which outlives this
            // call, and the slice cannot escape `f` (R cannot borrow it). The owner may change the
            // bytes meanwhile (from another mapping); that is what the seqlock re-check is for.
            let data = unsafe { slice::from_raw_parts(data, len) };
            f(&meta, data)
        })
    }

    /// Copies meta and the first `data_out.len()` data bytes out, validated as in [`Self::read`].
    ///
    /// # Panics
    /// If `data_out` is longer than `slot_bytes`.
    pub fn copy_out(&self, image_id: u64, data_out: &mut [u8]) -> Result<M, ReadError> {
        assert!(
            data_out.len() <= self.layout.slot_len(),
            "copy_out: buffer of {} bytes is longer than the {}-byte slots of {}",
            data_out.len(),
            self.layout.slot_bytes,
            self.path.display()
        );
        self.read_validated(image_id, |meta, data| {
            // SAFETY: the source lies inside the slot (len <= slot_bytes, asserted above) in the
            // mapping; the destination is a separate exclusive buffer. A raw copy forms no
            // reference to the shared bytes, which may be changing.
            unsafe { ptr::copy_nonoverlapping(data, data_out.as_mut_ptr(), data_out.len()) };
            meta
        })
    }

    /// Ok(()) if the slot holds committed `image_id` right now.
    pub fn check(&self, image_id: u64) -> Result<(), ReadError> {
        let slot = self.slot_of(image_id)?;
        expect_committed(self.load_seq(slot), image_id)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn n_slots(&self) -> u64 {
        self.layout.n_slots
    }

    pub fn slot_bytes(&self) -> u64 {
        self.layout.slot_bytes
    }

    /// The seqlock read: `f` gets a copy of the meta and a pointer to the slot's data.
    fn read_validated<R>(
        &self,
        image_id: u64,
        f: impl FnOnce(M, *const u8) -> R,
    ) -> Result<R, ReadError> {
        let slot = self.slot_of(image_id)?;
        let before = self.load_seq(slot);
        // Pairs with commit's Release store (A): the committed image's bytes are visible.
        fence(Ordering::Acquire);
        expect_committed(before, image_id)?;

        let base = self.map.as_ptr();
        // SAFETY: meta_bytes == size_of::<M>() bytes at meta_offset lie inside the mapping and are
        // 8-byte aligned, align_of::<M>() <= 8 (asserted in attach); M is Pod, so even torn bytes
        // are a valid M. Volatile: the bytes may be changing under us.
        let meta = unsafe {
            base.add(self.layout.meta_offset(slot))
                .cast::<M>()
                .read_volatile()
        };
        let result = f(meta, base.wrapping_add(self.layout.data_offset(slot)));

        // Pairs with begin_write's Release fence (B): if f saw a later write, `after` shows it.
        fence(Ordering::Acquire);
        let after = self.load_seq(slot);
        if after == before {
            Ok(result)
        } else {
            Err(changed_error(after, image_id))
        }
    }

    fn slot_of(&self, image_id: u64) -> Result<u64, ReadError> {
        if image_id > MAX_IMAGE_ID {
            return Err(ReadError::InvalidImageId);
        }
        Ok(self.layout.slot_of(image_id))
    }

    /// Relaxed (+ the callers' fences): std guarantees only Relaxed loads on read-only memory.
    fn load_seq(&self, slot: u64) -> u64 {
        // SAFETY: slot < n_slots, so the word lies inside the mapping (checked against the file
        // size), 8-byte aligned on a page-aligned mapping, which lives as long as `self`. We only
        // load from it, Relaxed, which std supports on read-only memory for 64-bit atomics on
        // 64-bit targets; the owner only ever accesses the word atomically.
        let seq = unsafe {
            &*self
                .map
                .as_ptr()
                .add(self.layout.seq_offset(slot))
                .cast::<AtomicU64>()
        };
        seq.load(Ordering::Relaxed)
    }
}

impl<M: Pod> fmt::Debug for RingReader<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingReader")
            .field("path", &self.path)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

fn expect_committed(seq: u64, image_id: u64) -> Result<(), ReadError> {
    match SlotState::decode(seq) {
        SlotState::Committed(found) if found == image_id => Ok(()),
        SlotState::Empty => Err(ReadError::NotPresent),
        SlotState::Writing(found) if found == image_id => Err(ReadError::NotPresent),
        SlotState::Writing(found) | SlotState::Committed(found) => Err(ReadError::Overwritten {
            found_image_id: found,
        }),
    }
}

/// The slot changed during a read: another id means we were lapped; the same id (rewritten) or
/// an emptied slot (abandoned write) means the bytes we saw are torn.
fn changed_error(seq_after: u64, image_id: u64) -> ReadError {
    match SlotState::decode(seq_after).image_id() {
        Some(found) if found != image_id => ReadError::Overwritten {
            found_image_id: found,
        },
        _ => ReadError::Torn,
    }
}

fn read_header(file: &File) -> io::Result<Header> {
    let mut bytes = [0u8; HEADER_STRUCT_BYTES];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytemuck::pod_read_unaligned(&bytes))
}

/// The pid a segment's header names as its owner, if the file looks like a segment at all.
pub(crate) fn recorded_owner_pid(file: &File) -> Option<u32> {
    read_header(file)
        .ok()
        .filter(|header| header.magic == MAGIC)
        .map(|header| header.owner_pid)
}

/// Checks the header against what this build and the caller expect; returns the layout it implies.
fn validated_layout(
    path: &Path,
    header: &Header,
    meta_bytes: u64,
    expect: Expect,
    file_bytes: u64,
) -> Result<Layout, RingError> {
    if header.magic != MAGIC {
        return Err(RingError::BadMagic {
            path: path.to_owned(),
            found: header.magic,
        });
    }
    let check = |field, expected: u64, found: u64| {
        if expected == found {
            Ok(())
        } else {
            Err(RingError::HeaderMismatch {
                path: path.to_owned(),
                field,
                expected,
                found,
            })
        }
    };
    check(
        "layout_version",
        LAYOUT_VERSION.into(),
        header.layout_version.into(),
    )?;
    check("meta_bytes", meta_bytes, header.meta_bytes)?;
    if let Some(n_slots) = expect.n_slots {
        check("n_slots", n_slots, header.n_slots)?;
    }
    if let Some(slot_bytes) = expect.slot_bytes {
        check("slot_bytes", slot_bytes, header.slot_bytes)?;
    }
    let layout = Layout::compute(header.n_slots, header.slot_bytes, header.meta_bytes).ok_or(
        RingError::InvalidGeometry {
            path: path.to_owned(),
            n_slots: header.n_slots,
            slot_bytes: header.slot_bytes,
            meta_bytes: header.meta_bytes,
        },
    )?;
    let computed = layout.header(header.owner_pid);
    for (field, expected, found) in [
        (
            "header_bytes",
            computed.header_bytes.into(),
            header.header_bytes.into(),
        ),
        (
            "control_offset",
            computed.control_offset,
            header.control_offset,
        ),
        (
            "control_stride",
            computed.control_stride,
            header.control_stride,
        ),
        ("data_offset", computed.data_offset, header.data_offset),
        ("data_stride", computed.data_stride, header.data_stride),
        ("file size", layout.total_bytes, file_bytes),
    ] {
        check(field, expected, found)?;
    }
    Ok(layout)
}

/// The owner holds an exclusive flock for its whole life; if we can take a shared one, it is gone.
fn ensure_live_owner(file: &File, path: &Path, owner_pid: u32) -> Result<(), RingError> {
    match file.try_lock_shared() {
        Err(TryLockError::WouldBlock) => Ok(()),
        Ok(()) => Err(RingError::Stale {
            path: path.to_owned(),
            pid: Some(owner_pid),
        }),
        Err(TryLockError::Error(source)) => Err(RingError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}
