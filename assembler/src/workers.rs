//! The assembler's worker threads: the per-module work of an image (reading each module's frame
//! from its FrameBuffer, placement or conversion, zero-filling a missing module) and the block
//! digests of its end-to-end checksum, spread over `assembler_threads` persistent threads.
//!
//! Set-up (once): module `m` belongs to worker `m % n`; the image slot's bytes each worker may
//! write are its modules' rows ([`ModulePixels::module_byte_ranges`]), checked disjoint by
//! [`RegionPlan`]; the image blocks `[w * b / n, (w + 1) * b / n)` are worker `w`'s to hash.
//!
//! Per image, driven by the synchroniser's thread ([`Workers::assemble`]), in two steps:
//! 1. `begin` the slot; every worker takes its [`image_buffer::RegionWriter`] and writes its
//!    modules straight into the slot (no extra copy), then drops it.
//! 2. Every worker hashes its blocks through a shared [`image_buffer::SlotView`]; the
//!    synchroniser combines the digests in block order, then builds the metadata from all modules
//!    (in module order, exactly as one thread does) and commits.
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
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std_daq_common::checksum::{block_count, block_digest, BLOCK_BYTES};
use std_daq_common::{ImageMetadata, ModuleFrame};

/// An image whose last worker finished its modules more than this after the first one counts
/// as a worker stall.
pub const WORKER_STALL: Duration = Duration::from_millis(1);
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Place,
    Hash,
}

/// One worker's part of one step; travels to the worker and back.
#[derive(Debug)]
struct Job {
    image_id: u64,
    step: Step,
    pixels: Option<Arc<ModulePixels>>,
    modules: Vec<ModuleTask>,
    /// Image bytes to hash (the image's `data_bytes`) and this worker's blocks of them.
    data_bytes: usize,
    blocks: Range<usize>,
    digests: Vec<u64>,
    started: Instant,
    finished: Instant,
    error: Option<RegionError>,
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
        // Checked before the owner is handed over: a refused plan leaves the ring untouched.
        let plan = RegionPlan::new(slot_bytes, per_writer)?;
        let ring = image_ring.into_regions(plan)?;
        let image_bytes = pixels.geometry.image_bytes().min(slot_bytes);
        let n_blocks = block_count(image_bytes);
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
            let job = Job {
                image_id: 0,
                step: Step::Place,
                pixels: None,
                modules,
                data_bytes: 0,
                blocks: blocks.clone(),
                digests: Vec::with_capacity(blocks.len()),
                started: Instant::now(),
                finished: Instant::now(),
                error: None,
            };
            let ring = ring.clone();
            let scratch = pixels.scratch();
            let thread = std::thread::Builder::new()
                .name(format!("asm-worker-{w}"))
                .spawn(move || work(w, ring, scratch, jobs_rx, done_tx))
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
            stats: WorkerStats::default(),
        })
    }

    pub fn n_workers(&self) -> usize {
        self.links.len()
    }

    pub fn ring(&self) -> &RegionRing<ImageMetadata> {
        &self.ring
    }

    /// Step 1 for image `image_id` (frames: which modules arrived): begins the slot and has
    /// every module placed; returns each module's outcome, in module order. On an error the
    /// image is abandoned.
    pub fn place(
        &mut self,
        image_id: u64,
        frames: &[Option<ModuleFrame>],
        module_rings: &[Arc<RingReader<ModuleFrame>>],
        pixels: &Arc<ModulePixels>,
    ) -> Result<&[Outcome], WorkerError> {
        self.ring
            .begin(image_id)
            .map_err(|source| WorkerError::Region {
                worker: 0,
                image_id,
                source,
            })?;
        let started = Instant::now();
        let result = self.run_step(image_id, started, |job| {
            job.step = Step::Place;
            job.pixels = Some(Arc::clone(pixels));
            for task in &mut job.modules {
                let arrived = frames.get(task.m).is_some_and(Option::is_some);
                task.ring = arrived
                    .then(|| module_rings.get(task.m).map(Arc::clone))
                    .flatten();
            }
        });
        let (first, last) = match result {
            Ok(span) => span,
            Err(e) => {
                self.ring.abandon();
                return Err(e);
            }
        };
        let straggle = last.saturating_duration_since(first);
        self.stats.straggle_us += duration_us(straggle);
        if straggle > WORKER_STALL {
            self.stats.stalls += 1;
        }
        for link in &self.links {
            for task in link.job.iter().flat_map(|job| &job.modules) {
                if let Some(o) = self.outcomes.get_mut(task.m) {
                    *o = task.outcome;
                }
            }
        }
        Ok(&self.outcomes[..self.n_modules])
    }

    /// Step 2: the checksum of the image's first `data_bytes` bytes, from the workers' block
    /// digests.
    pub fn checksum(&mut self, image_id: u64, data_bytes: usize) -> Result<u64, WorkerError> {
        let data_bytes = data_bytes.min(self.ring.slot_bytes() as usize);
        let n_blocks = block_count(data_bytes);
        let started = Instant::now();
        let result = self.run_step(image_id, started, |job| {
            job.step = Step::Hash;
            job.data_bytes = data_bytes;
        });
        if let Err(e) = result {
            self.ring.abandon();
            return Err(e);
        }
        for link in &self.links {
            if let Some(job) = &link.job {
                if let Some(out) = self.digests.get_mut(job.blocks.start..job.blocks.end) {
                    out[..job.digests.len()].copy_from_slice(&job.digests);
                }
            }
        }
        let n = n_blocks.min(self.digests.len());
        Ok(std_daq_common::checksum::combine(&self.digests[..n]))
    }

    /// Sends every worker its job (`fill` sets it up) and waits for all of them; returns when
    /// the first and the last finished.
    fn run_step(
        &mut self,
        image_id: u64,
        started: Instant,
        mut fill: impl FnMut(&mut Job),
    ) -> Result<(Instant, Instant), WorkerError> {
        let mut sent = 0;
        let mut failure = None;
        for (w, link) in self.links.iter_mut().enumerate() {
            let Some(mut job) = link.job.take() else {
                failure.get_or_insert(WorkerError::Lost {
                    worker: w,
                    image_id,
                });
                break;
            };
            job.image_id = image_id;
            job.error = None;
            fill(&mut job);
            if link.jobs.send(job).is_err() {
                failure.get_or_insert(WorkerError::Lost {
                    worker: w,
                    image_id,
                });
                break;
            }
            sent += 1;
        }
        // Every job sent is waited for, even after a failure: no worker may still be writing.
        let (mut first, mut last) = (None::<Instant>, None::<Instant>);
        let mut busy = Duration::ZERO;
        for (w, link) in self.links.iter_mut().enumerate().take(sent) {
            match link.done.recv_timeout(WORKER_WATCHDOG) {
                Ok(mut job) => {
                    first = Some(first.map_or(job.finished, |f| f.min(job.finished)));
                    last = Some(last.map_or(job.finished, |l| l.max(job.finished)));
                    busy = busy.max(job.finished.saturating_duration_since(job.started));
                    if let Some(source) = job.error.take() {
                        failure.get_or_insert(WorkerError::Region {
                            worker: w,
                            image_id,
                            source,
                        });
                    }
                    link.job = Some(job);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    failure.get_or_insert(WorkerError::Lost {
                        worker: w,
                        image_id,
                    });
                }
            }
        }
        self.stats.wait_us += duration_us(started.elapsed());
        self.stats.busy_us += duration_us(busy);
        match (failure, first, last) {
            (Some(e), _, _) => Err(e),
            (None, Some(first), Some(last)) => Ok((first, last)),
            _ => Err(WorkerError::Lost {
                worker: 0,
                image_id,
            }),
        }
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
            if let Some(thread) = thread {
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

/// Worker `w`'s loop: one job at a time until the synchroniser closes the channel.
fn work(
    w: usize,
    ring: RegionRing<ImageMetadata>,
    mut scratch: Scratch,
    jobs: Receiver<Job>,
    done: SyncSender<Job>,
) {
    while let Ok(mut job) = jobs.recv() {
        job.started = Instant::now();
        match job.step {
            Step::Place => place(w, &ring, &mut scratch, &mut job),
            Step::Hash => hash(&ring, &mut job),
        }
        job.finished = Instant::now();
        if done.send(job).is_err() {
            break;
        }
    }
}

fn place(w: usize, ring: &RegionRing<ImageMetadata>, scratch: &mut Scratch, job: &mut Job) {
    // Dropped before answering: between images the synchroniser holds the only reference.
    let Some(pixels) = job.pixels.take() else {
        job.error = Some(RegionError::NoImage);
        return;
    };
    let mut writer = match ring.writer(w) {
        Ok(writer) => writer,
        Err(e) => {
            job.error = Some(e);
            return;
        }
    };
    let image_id = job.image_id;
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

fn hash(ring: &RegionRing<ImageMetadata>, job: &mut Job) {
    job.digests.clear();
    let view = match ring.view() {
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
