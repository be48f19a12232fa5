//! The owner side: creates a segment, writes its slots and removes it again. At most one live
//! [`RingOwner`] exists per segment name (enforced with an exclusive `flock`), and it never
//! removes or modifies a segment it did not create.

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::slice;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use bytemuck::Pod;
use memmap2::MmapRaw;

use crate::layout::{committed_seq, writing_seq, Layout, PAGE_BYTES, SEQ_BYTES};
use crate::reader::recorded_owner_pid;
use crate::{validated_path, RingError, MAX_IMAGE_ID, SHM_DIR};

/// A reader's liveness probe holds a shared lock for an instant; retry before reporting InUse.
const LOCK_ATTEMPTS: u32 = 5;
const LOCK_RETRY_INTERVAL: Duration = Duration::from_millis(10);

/// The single owner and writer of a segment: creates, sizes, pre-faults, and unlinks it on drop.
pub struct RingOwner<M: Pod> {
    name: String,
    path: PathBuf,
    layout: Layout,
    map: MmapRaw,
    /// Open for our whole life: it holds the exclusive flock that marks the segment as live.
    _locked_file: File,
    /// (dev, ino) of our file, so that drop never unlinks a successor's segment.
    identity: (u64, u64),
    _meta: PhantomData<fn() -> M>,
}

impl<M: Pod> RingOwner<M> {
    /// Creates segment `name` with `n_slots` slots of `slot_bytes` data plus one `M` each.
    /// Replaces a stale segment of that name; fails with [`RingError::InUse`] if it has a live owner.
    pub fn create(name: &str, n_slots: u64, slot_bytes: u64) -> Result<Self, RingError> {
        const {
            assert!(
                align_of::<M>() <= SEQ_BYTES as usize,
                "meta records need align <= 8"
            )
        };
        let path = validated_path(name)?;
        let meta_bytes = size_of::<M>() as u64;
        let layout = Layout::compute(n_slots, slot_bytes, meta_bytes).ok_or_else(|| {
            RingError::InvalidGeometry {
                path: path.clone(),
                n_slots,
                slot_bytes,
                meta_bytes,
            }
        })?;
        ensure_no_live_owner(&path)?;

        let temp = temp_path(name);
        let built = build_segment(&temp, &layout).and_then(|built| {
            // Atomically publishes the finished segment, replacing a stale one if present.
            fs::rename(&temp, &path).map_err(|source| RingError::Io {
                path: path.clone(),
                source,
            })?;
            Ok(built)
        });
        let (locked_file, map, identity) = built.inspect_err(|_| {
            let _ = fs::remove_file(&temp);
        })?;
        tracing::debug!(path = %path.display(), ?layout, "created shared-memory segment");
        Ok(RingOwner {
            name: name.to_owned(),
            path,
            layout,
            map,
            _locked_file: locked_file,
            identity,
            _meta: PhantomData,
        })
    }

    /// Starts writing `image_id` into slot `image_id % n_slots`; readers of that slot get
    /// `NotPresent`/`Overwritten` from now until [`SlotWriter::commit`].
    pub fn begin_write(&mut self, image_id: u64) -> Result<SlotWriter<'_, M>, RingError> {
        if image_id > MAX_IMAGE_ID {
            return Err(RingError::ImageIdTooLarge {
                path: self.path.clone(),
                image_id,
            });
        }
        let slot = self.layout.slot_of(image_id);
        self.seq(slot)
            .store(writing_seq(image_id), Ordering::Relaxed);
        // (B): the "writing" mark becomes visible before any data or meta store below.
        fence(Ordering::Release);
        Ok(SlotWriter {
            owner: self,
            slot,
            image_id,
            committed: false,
        })
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

    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Start of the mapping (for [`crate::SharedRing`], which upholds the same exclusivity rules).
    pub(crate) fn map_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Slot `slot`'s meta record (8-byte aligned, `size_of::<M>()` bytes inside the mapping).
    pub(crate) fn meta_ptr(&self, slot: u64) -> *mut M {
        // SAFETY: meta_offset(slot) for slot < n_slots lies inside the mapping (Layout::compute).
        unsafe {
            self.map
                .as_mut_ptr()
                .add(self.layout.meta_offset(slot))
                .cast::<M>()
        }
    }

    pub(crate) fn seq(&self, slot: u64) -> &AtomicU64 {
        let offset = self.layout.seq_offset(slot);
        // SAFETY: slot < n_slots, so the word is inside the mapping; it is 8-byte aligned
        // (Layout::seq_offset on a page-aligned mapping); the mapping is writable and lives as long
        // as `self`; every process only ever accesses this word atomically.
        unsafe { &*self.map.as_mut_ptr().add(offset).cast::<AtomicU64>() }
    }
}

impl<M: Pod> Drop for RingOwner<M> {
    fn drop(&mut self) {
        let path = self.path.display();
        match fs::symlink_metadata(&self.path) {
            Ok(found) if (found.dev(), found.ino()) == self.identity => {
                if let Err(err) = fs::remove_file(&self.path) {
                    tracing::warn!(%path, %err, "cannot remove shared-memory segment");
                }
            }
            Ok(_) => tracing::warn!(%path, "segment was replaced by another; leaving it in place"),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(%path, "segment was already removed by someone else")
            }
            Err(err) => tracing::warn!(%path, %err, "cannot inspect shared-memory segment"),
        }
    }
}

impl<M: Pod> fmt::Debug for RingOwner<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingOwner")
            .field("path", &self.path)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// Writing one slot. The slot is marked "being written" from begin_write until commit; dropping
/// the writer without commit leaves the slot empty (readers get `NotPresent`).
pub struct SlotWriter<'a, M: Pod> {
    owner: &'a mut RingOwner<M>,
    slot: u64,
    image_id: u64,
    committed: bool,
}

impl<M: Pod> SlotWriter<'_, M> {
    pub fn image_id(&self) -> u64 {
        self.image_id
    }

    /// The slot's data, exactly `slot_bytes` long. It still holds the previous image's bytes.
    pub fn data_mut(&mut self) -> &mut [u8] {
        let offset = self.owner.layout.data_offset(self.slot);
        let len = self.owner.layout.slot_len();
        // SAFETY: [offset, offset + len) is inside the writable mapping, which outlives this borrow.
        // We hold `&mut RingOwner`, so no other reference into the mapping exists in this process;
        // other mappings only read it under the seqlock, which is marked "writing" right now.
        unsafe { slice::from_raw_parts_mut(self.owner.map.as_mut_ptr().add(offset), len) }
    }

    /// The slot's meta record. It still holds the previous image's value.
    pub fn meta_mut(&mut self) -> &mut M {
        let offset = self.owner.layout.meta_offset(self.slot);
        // SAFETY: size_of::<M>() == meta_bytes bytes at `offset` lie inside the mapping, 8-byte
        // aligned, and align_of::<M>() <= 8 (asserted in create); M is Pod, so any bytes are a
        // valid M. Exclusive for the same reason as in data_mut.
        unsafe { &mut *self.owner.map.as_mut_ptr().add(offset).cast::<M>() }
    }

    /// Publishes meta and data as `image_id`.
    pub fn commit(mut self) {
        // (A): every data and meta store above is visible before the committed mark.
        self.owner
            .seq(self.slot)
            .store(committed_seq(self.image_id), Ordering::Release);
        self.committed = true;
    }
}

impl<M: Pod> Drop for SlotWriter<'_, M> {
    fn drop(&mut self) {
        if !self.committed {
            // Half-written is never valid: empty the slot instead.
            self.owner.seq(self.slot).store(0, Ordering::Release);
        }
    }
}

impl<M: Pod> fmt::Debug for SlotWriter<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotWriter")
            .field("path", &self.owner.path)
            .field("slot", &self.slot)
            .field("image_id", &self.image_id)
            .finish_non_exhaustive()
    }
}

/// Ok if nothing is at `path` or only a stale segment (no flock held) that the rename will replace.
fn ensure_no_live_owner(path: &Path) -> Result<(), RingError> {
    let io_error = |source| RingError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io_error(err)),
    };
    let pid = recorded_owner_pid(&file);
    let mut attempts_left = LOCK_ATTEMPTS;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) if attempts_left > 1 => {
                attempts_left -= 1;
                thread::sleep(LOCK_RETRY_INTERVAL);
            }
            Err(TryLockError::WouldBlock) => {
                return Err(RingError::InUse {
                    path: path.to_owned(),
                    pid,
                })
            }
            Err(TryLockError::Error(err)) => return Err(io_error(err)),
        }
    }
    tracing::warn!(
        path = %path.display(),
        last_owner_pid = ?pid,
        "replacing stale shared-memory segment left by a crashed run"
    );
    Ok(())
}

/// `/dev/shm/.<name>.<pid>.<n>.tmp`: hidden, and unique per process and call.
fn temp_path(name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Path::new(SHM_DIR).join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Builds a complete, locked segment at `temp`: (file holding the lock, mapping, (dev, ino)).
fn build_segment(temp: &Path, layout: &Layout) -> Result<(File, MmapRaw, (u64, u64)), RingError> {
    let io_error = |source| RingError::Io {
        path: temp.to_owned(),
        source,
    };
    let file = create_new_file(temp).map_err(io_error)?;
    reserve(&file, layout.total_bytes).map_err(io_error)?;
    let map = MmapRaw::map_raw(&file).map_err(io_error)?;
    prefault(&map);

    let header = layout.header(std::process::id());
    let header = bytemuck::bytes_of(&header);
    // SAFETY: the header (128 bytes) fits in the mapping (>= 4096 bytes); the mapping is writable
    // and not yet visible to anyone else; `header` is a separate local buffer.
    unsafe {
        map.as_mut_ptr()
            .copy_from_nonoverlapping(header.as_ptr(), header.len())
    };

    file.try_lock().map_err(|err| match err {
        TryLockError::Error(err) => io_error(err),
        TryLockError::WouldBlock => io_error(io::ErrorKind::WouldBlock.into()),
    })?;
    let metadata = file.metadata().map_err(io_error)?;
    Ok((file, map, (metadata.dev(), metadata.ino())))
}

fn create_new_file(path: &Path) -> io::Result<File> {
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
    };
    match open() {
        // Left by a crashed process that had our pid (e.g. pid 1 in a container).
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(path)?;
            open()
        }
        result => result,
    }
}

/// Allocates the memory now, so a full /dev/shm fails here with ENOSPC instead of a SIGBUS later.
fn reserve(file: &File, len: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a plain syscall on a file descriptor that `file` keeps open; no pointers involved.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        errno => {
            let err = io::Error::from_raw_os_error(errno);
            Err(io::Error::new(
                err.kind(),
                format!("cannot reserve {len} bytes: {err}"),
            ))
        }
    }
}

/// Touches every page once: first touch of fresh memory is slow and must not hit the hot path.
fn prefault(map: &MmapRaw) {
    let base = map.as_mut_ptr();
    for offset in (0..map.len()).step_by(PAGE_BYTES as usize) {
        // SAFETY: offset < len, inside the writable mapping nobody else can see yet; the page is
        // still all zeros, so writing a zero changes nothing. Volatile so it is not optimised away.
        unsafe { base.add(offset).write_volatile(0) };
    }
}
