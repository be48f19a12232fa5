//! The assembler's worker threads: the per-module work of an image (reading each module's frame
//! from its FrameBuffer, placement or conversion, zero-filling a missing module) and the block
//! digests of its end-to-end checksum, spread over `assembler_threads` persistent threads.
//!
//! Set-up (once): module `m` belongs to worker `m % n`; the image slot's bytes each worker may
//! write are its modules' rows ([`ModulePixels::module_byte_ranges`]), checked disjoint by
//! [`RegionPlan`]; the image blocks `[w * b / n, (w + 1) * b / n)` are worker `w`'s to hash.
//!
//! Per image, driven by the synchroniser's thread ([`Workers::assemble`]): it `begin`s the slot
//! and sends every worker its job; each worker takes its [`image_buffer::RegionWriter`], writes
//! its modules straight into the slot (no extra copy) and drops it; the workers meet at a
//! barrier (then no writer is live), and each hashes its blocks through a shared
//! [`image_buffer::SlotView`] and answers. The synchroniser, woken once per image, combines the
//! digests in block order, builds the metadata from all modules (in module order, exactly as one
//! thread does) and commits.
//!
//! Messages are one [`Job`] per worker that travels to the worker and back (bounded channels of
//! one): its buffers are allocated at set-up and reused, so nothing is allocated per image. The
//! calibration travels with the job (`Arc`) and the worker drops it before it answers, so between
//! images the synchroniser holds the only reference and the hot swap takes it in place.
//!
//! A worker that falls behind its peers is measured and flagged ([`WorkerStats`]), never waited
//! out with a wrong pixel: the image is committed only when every worker has answered.
//!
//! Never: write outside a worker's regions (the region writer refuses), let a worker touch an
//! image after it answered, or allocate or log per image.

use crate::pixels::{ModulePixels, Scratch};
use image_buffer::{RegionError, RegionPlan, RegionRing, RingReader};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std_daq_common::checksum::{block_count, block_digest, BLOCK_BYTES};
use std_daq_common::{ImageMetadata, ModuleFrame};

/// An image whose last worker finished its modules more than this after the first one counts
/// as a worker stall.
pub const WORKER_STALL: Duration = Duration::from_millis(1);
/// How long a worker that reached the barrier first polls for its peers before it sleeps: the
/// straggle between workers is typically 100-500 us, and waking a sleeping thread costs tens of
/// microseconds (more in a VM); the worker has nothing else to do meanwhile.
const BARRIER_SPIN: Duration = Duration::from_micros(500);
/// A worker that has not answered after this is taken as lost (a bug: the service stops).
const WORKER_WATCHDOG: Duration = Duration::from_secs(10);

/// How the worker threads kept up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStats {
    /// Time the synchroniser waited for the workers (all steps of all images), in µs.
    pub wait_us: u64,
    /// Of that, time the slowest worker of each step was busy (the rest is hand-over: waking
    /// the workers and the synchroniser), in µs.
    pub busy_us: u64,
    /// Time between the first and the last worker finishing their modules, in µs.
    pub straggle_us: u64,
    /// Images whose last worker finished its modules more than [`WORKER_STALL`] after the first.
    pub stalls: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start assembler worker thread {worker}: {source}")]
    Spawn {
        worker: usize,
        source: std::io::Error,
    },
    #[error("the module regions of the image cannot be split over workers: {0}")]
    Plan(#[from] image_buffer::PlanError),
    #[error("assembler worker {worker} panicked on image {image_id} (a bug)")]
    Panicked { worker: usize, image_id: u64 },
    #[error("assembler worker {worker} stopped answering (image {image_id})")]
    Lost { worker: usize, image_id: u64 },
    #[error("assembler worker {worker}, image {image_id}: {source}")]
    Region {
        worker: usize,
        image_id: u64,
        source: RegionError,
    },
}

/// What became of one module of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Placed,
    /// No frame of this module arrived: zero-filled.
    Absent,
    /// Its FrameBuffer slot was overwritten before it was read: zero-filled.
    Overwritten,
}

#[derive(Debug)]
struct ModuleTask {
    m: usize,
    /// The module's FrameBuffer when its frame arrived (`None`: absent).
    ring: Option<Arc<RingReader<ModuleFrame>>>,
    outcome: Outcome,
}

/// One worker's part of one image; travels to the worker and back.
#[derive(Debug)]
struct Job {
    image_id: u64,
    pixels: Option<Arc<ModulePixels>>,
    modules: Vec<ModuleTask>,
    /// Whether to hash, the image bytes to hash (its `data_bytes`) and this worker's blocks.
    hash: bool,
    data_bytes: usize,
    blocks: Range<usize>,
    digests: Vec<u64>,
    started: Instant,
    /// Its modules written (before the barrier), hashing started (after it), all done.
    placed: Instant,
    resumed: Instant,
    finished: Instant,
    error: Option<RegionError>,
    panicked: bool,
}

#[derive(Debug)]
struct Link {
    jobs: SyncSender<Job>,
    done: Receiver<Job>,
    /// The job while it is at the synchroniser.
    job: Option<Job>,
    thread: Option<JoinHandle<()>>,
}

/// The worker threads and the image ring they write; see the module docs.
#[derive(Debug)]
pub struct Workers {
    ring: RegionRing<ImageMetadata>,
    links: Vec<Link>,
    n_modules: usize,
    /// Every block digest of an image, in block order.
    digests: Vec<u64>,
    outcomes: Vec<Outcome>,
    /// A worker stopped answering: its peers may be stuck at the barrier, so nobody is joined.
    lost: bool,
    pub stats: WorkerStats,
}

impl Workers {
    /// Splits the image slot over `n` workers (at least 2, at most the module count) and
    /// starts them.
    pub fn start(
        n: usize,
        pixels: &ModulePixels,
        n_modules: usize,
        image_ring: image_buffer::RingOwner<ImageMetadata>,
    ) -> Result<Self, WorkerError> {
        let n = n.clamp(1, n_modules.max(1));
        let slot_bytes = image_ring.slot_bytes() as usize;
        let per_writer: Vec<Vec<Range<usize>>> = (0..n)
            .map(|w| {
                (w..n_modules)
                    .step_by(n)
                    .flat_map(|m| pixels.module_byte_ranges(m))
                    .collect()
            })
            .collect();
        // Checked before the owner is converted (config validation keeps modules apart, so a
        // refused plan is a bug in the geometry).
        let plan = RegionPlan::new(slot_bytes, per_writer)?;
        let ring = image_ring.into_regions(plan)?;
        let image_bytes = pixels.geometry.image_bytes().min(slot_bytes);
        let n_blocks = block_count(image_bytes);
        let barrier = Arc::new(SpinBarrier::new(n));
        let mut links = Vec::with_capacity(n);
        for w in 0..n {
            let (jobs, jobs_rx) = sync_channel::<Job>(1);
            let (done_tx, done) = sync_channel::<Job>(1);
            let modules = (w..n_modules)
                .step_by(n)
                .map(|m| ModuleTask {
                    m,
                    ring: None,
                    outcome: Outcome::Absent,
                })
                .collect();
            let blocks = block_share(n_blocks, n, w);
            let now = Instant::now();
            let job = Job {
                image_id: 0,
                pixels: None,
                modules,
                hash: false,
                data_bytes: 0,
                blocks: blocks.clone(),
                digests: Vec::with_capacity(blocks.len()),
                started: now,
                placed: now,
                resumed: now,
                finished: now,
                error: None,
                panicked: false,
            };
            let worker = Worker {
                w,
                ring: ring.clone(),
                scratch: pixels.scratch(),
                barrier: Arc::clone(&barrier),
            };
            let thread = std::thread::Builder::new()
                .name(format!("asm-worker-{w}"))
                .spawn(move || worker.run(jobs_rx, done_tx))
                .map_err(|source| WorkerError::Spawn { worker: w, source })?;
            links.push(Link {
                jobs,
                done,
                job: Some(job),
                thread: Some(thread),
            });
        }
        Ok(Workers {
            ring,
            links,
            n_modules,
            digests: vec![0; n_blocks],
            outcomes: vec![Outcome::Absent; n_modules],
            lost: false,
            stats: WorkerStats::default(),
        })
    }

    pub fn n_workers(&self) -> usize {
        self.links.len()
    }

    pub fn ring(&self) -> &RegionRing<ImageMetadata> {
        &self.ring
    }

    /// Image `image_id` (`frames`: which modules arrived): begins the slot, has every module
    /// placed and, with `hash_bytes`, the checksum of its first `hash_bytes` bytes computed;
    /// returns each module's outcome (in module order) and the checksum. The slot is then ready
    /// for [`Self::commit`]; on an error the image is abandoned.
    pub fn assemble(
        &mut self,
        image_id: u64,
        frames: &[Option<ModuleFrame>],
        module_rings: &[Arc<RingReader<ModuleFrame>>],
        pixels: &Arc<ModulePixels>,
        hash_bytes: Option<usize>,
    ) -> Result<(&[Outcome], Option<u64>), WorkerError> {
        if self.lost {
            return Err(WorkerError::Lost {
                worker: 0,
                image_id,
            });
        }
        self.ring
            .begin(image_id)
            .map_err(|source| WorkerError::Region {
                worker: 0,
                image_id,
                source,
            })?;
        let data_bytes = hash_bytes.unwrap_or(0).min(self.ring.slot_bytes() as usize);
        if let Err(e) = self.run(
            image_id,
            frames,
            module_rings,
            pixels,
            hash_bytes.is_some(),
            data_bytes,
        ) {
            self.ring.abandon();
            return Err(e);
        }
        for link in &self.links {
            for task in link.job.iter().flat_map(|job| &job.modules) {
                if let Some(o) = self.outcomes.get_mut(task.m) {
                    *o = task.outcome;
                }
            }
        }
        let checksum = hash_bytes.map(|_| {
            for job in self.links.iter().filter_map(|link| link.job.as_ref()) {
                if let Some(out) = self.digests.get_mut(job.blocks.start..job.blocks.end) {
                    out[..job.digests.len()].copy_from_slice(&job.digests);
                }
            }
            let n = block_count(data_bytes).min(self.digests.len());
            std_daq_common::checksum::combine(&self.digests[..n])
        });
        Ok((&self.outcomes[..self.n_modules], checksum))
    }

    /// Sends every worker its job and waits for all of them.
    fn run(
        &mut self,
        image_id: u64,
        frames: &[Option<ModuleFrame>],
        module_rings: &[Arc<RingReader<ModuleFrame>>],
        pixels: &Arc<ModulePixels>,
        hash: bool,
        data_bytes: usize,
    ) -> Result<(), WorkerError> {
        let started = Instant::now();
        for (w, link) in self.links.iter_mut().enumerate() {
            let lost = WorkerError::Lost {
                worker: w,
                image_id,
            };
            let Some(mut job) = link.job.take() else {
                self.lost = true;
                return Err(lost);
            };
            job.image_id = image_id;
            job.error = None;
            job.pixels = Some(Arc::clone(pixels));
            job.hash = hash;
            job.data_bytes = data_bytes;
            for task in &mut job.modules {
                let arrived = frames.get(task.m).is_some_and(Option::is_some);
                task.ring = arrived
                    .then(|| module_rings.get(task.m).map(Arc::clone))
                    .flatten();
            }
            if link.jobs.send(job).is_err() {
                // The workers sent a job wait at the barrier for this one forever.
                self.lost = true;
                return Err(lost);
            }
        }
        let mut failure = None;
        let (mut first, mut last) = (None::<Instant>, None::<Instant>);
        let (mut place_busy, mut hash_busy) = (Duration::ZERO, Duration::ZERO);
        for (w, link) in self.links.iter_mut().enumerate() {
            match link.done.recv_timeout(WORKER_WATCHDOG) {
                Ok(mut job) => {
                    first = Some(first.map_or(job.placed, |f| f.min(job.placed)));
                    last = Some(last.map_or(job.placed, |l| l.max(job.placed)));
                    place_busy = place_busy.max(job.placed.saturating_duration_since(job.started));
                    hash_busy = hash_busy.max(job.finished.saturating_duration_since(job.resumed));
                    if job.panicked {
                        failure.get_or_insert(WorkerError::Panicked {
                            worker: w,
                            image_id,
                        });
                    } else if let Some(source) = job.error.take() {
                        failure.get_or_insert(WorkerError::Region {
                            worker: w,
                            image_id,
                            source,
                        });
                    }
                    link.job = Some(job);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    self.lost = true;
                    failure.get_or_insert(WorkerError::Lost {
                        worker: w,
                        image_id,
                    });
                }
            }
        }
        self.stats.wait_us += duration_us(started.elapsed());
        self.stats.busy_us += duration_us(place_busy + hash_busy);
        if let (Some(first), Some(last)) = (first, last) {
            let straggle = last.saturating_duration_since(first);
            self.stats.straggle_us += duration_us(straggle);
            if straggle > WORKER_STALL {
                self.stats.stalls += 1;
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Publishes the image in progress with `meta`.
    pub fn commit(&self, meta: ImageMetadata) -> Result<(), WorkerError> {
        self.ring
            .commit(meta)
            .map(|_| ())
            .map_err(|source| WorkerError::Region {
                worker: 0,
                image_id: meta.image_id,
                source,
            })
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for link in std::mem::take(&mut self.links) {
            let Link { jobs, thread, .. } = link;
            // A closed channel ends the worker's loop.
            drop(jobs);
            if let (Some(thread), false) = (thread, self.lost) {
                let _ = thread.join();
            }
        }
    }
}

/// Worker `w`'s blocks of an image of `n_blocks` blocks split over `n` workers.
fn block_share(n_blocks: usize, n: usize, w: usize) -> Range<usize> {
    n_blocks * w / n..n_blocks * (w + 1) / n
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A reusable barrier for `n` threads: the last to arrive releases the others, who poll for up
/// to [`BARRIER_SPIN`] before they sleep. Only a rendezvous: what the image's bytes may be used
/// for is checked by the region ring, not implied by this.
#[derive(Debug)]
struct SpinBarrier {
    n: usize,
    /// (threads arrived in this round, round number).
    state: Mutex<(usize, u64)>,
    released: Condvar,
    /// The round number, for polling without the lock.
    round: AtomicU64,
}

impl SpinBarrier {
    fn new(n: usize) -> Self {
        SpinBarrier {
            n,
            state: Mutex::new((0, 0)),
            released: Condvar::new(),
            round: AtomicU64::new(0),
        }
    }

    fn wait(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let round = state.1;
        state.0 += 1;
        if state.0 >= self.n {
            *state = (0, round + 1);
            self.round.store(round + 1, Ordering::Release);
            self.released.notify_all();
            return;
        }
        drop(state);
        let spin_until = Instant::now() + BARRIER_SPIN;
        while Instant::now() < spin_until {
            if self.round.load(Ordering::Acquire) != round {
                return;
            }
            std::hint::spin_loop();
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while state.1 == round {
            state = self
                .released
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// One worker thread's own state.
struct Worker {
    w: usize,
    ring: RegionRing<ImageMetadata>,
    scratch: Scratch,
    /// All workers meet here between writing their modules and hashing.
    barrier: Arc<SpinBarrier>,
}

impl Worker {
    /// One job at a time until the synchroniser closes the channel.
    fn run(mut self, jobs: Receiver<Job>, done: SyncSender<Job>) {
        while let Ok(mut job) = jobs.recv() {
            job.started = Instant::now();
            job.panicked = false;
            // A panic here is a bug; caught so that this worker still reaches the barrier (its
            // peers wait there) and the synchroniser hears of it.
            job.panicked |= catch_unwind(AssertUnwindSafe(|| self.place(&mut job))).is_err();
            // Dropped before answering: between images the synchroniser holds the only one.
            job.pixels = None;
            job.placed = Instant::now();
            // Every worker reaches the barrier once per job, also after an error: after it no
            // RegionWriter of this image is live, so the slot may be read.
            self.barrier.wait();
            job.resumed = Instant::now();
            job.digests.clear();
            if job.hash && job.error.is_none() && !job.panicked {
                job.panicked |= catch_unwind(AssertUnwindSafe(|| self.hash(&mut job))).is_err();
            }
            job.finished = Instant::now();
            if done.send(job).is_err() {
                break;
            }
        }
    }

    fn place(&mut self, job: &mut Job) {
        let Some(pixels) = job.pixels.as_ref() else {
            job.error = Some(RegionError::NoImage);
            return;
        };
        let mut writer = match self.ring.writer(self.w) {
            Ok(writer) => writer,
            Err(e) => {
                job.error = Some(e);
                return;
            }
        };
        let image_id = job.image_id;
        let scratch = &mut self.scratch;
        for task in &mut job.modules {
            task.outcome = match task.ring.take() {
                None => Outcome::Absent,
                // The slot's own metadata says which packets the bytes hold.
                Some(frames) => match frames.read(image_id, |slot_frame, src| {
                    pixels.write_into(scratch, task.m, slot_frame, src, &mut writer)
                }) {
                    Ok(()) => Outcome::Placed,
                    Err(_) => Outcome::Overwritten,
                },
            };
            if task.outcome != Outcome::Placed {
                pixels.zero(task.m, &mut writer);
            }
        }
    }

    fn hash(&self, job: &mut Job) {
        let view = match self.ring.view() {
            Ok(view) => view,
            Err(e) => {
                job.error = Some(e);
                return;
            }
        };
        let data = view.data();
        let data = &data[..job.data_bytes.min(data.len())];
        let blocks = data
            .chunks(BLOCK_BYTES)
            .skip(job.blocks.start)
            .take(job.blocks.len());
        job.digests.extend(blocks.map(block_digest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_shares_cover_every_block_once_in_order() {
        for n_blocks in [0, 1, 3, 16, 17] {
            for n in 1..=5 {
                let shares: Vec<Range<usize>> =
                    (0..n).map(|w| block_share(n_blocks, n, w)).collect();
                assert_eq!(shares[0].start, 0);
                assert_eq!(shares[n - 1].end, n_blocks);
                assert!(shares.windows(2).all(|p| p[0].end == p[1].start));
            }
        }
    }
}
