//! The assembler's worker threads: the work of an image (reading every module's frame from its
//! FrameBuffer, placement or conversion, zero-filling a missing module) and the block digests of
//! its end-to-end checksum, spread over `assembler_threads` persistent threads.
//!
//! Set-up (once, [`Share`]): the image's rows are cut into `n` bands of about equal height, one
//! per worker, at row boundaries that split no gap row from the double pixel its value comes
//! from ([`ModulePixels::rows_coupled`]); worker `w` may write exactly the slot bytes of its band
//! (one range, checked disjoint by [`RegionPlan`]) and converts, in its band, the rows of every
//! module. Each band is walked in runs of [`RUN_ROWS`] image rows; after a run the worker hashes
//! the checksum blocks that run completed, while its bytes are still in the core's cache. The few
//! blocks that straddle two bands are hashed by the synchroniser, after the workers answered.
//!
//! Per image, driven by the synchroniser's thread ([`Workers::assemble`]): it `begin`s the slot
//! and sends every worker its job; each worker takes its [`image_buffer::RegionWriter`], writes
//! its band straight into the slot (no extra copy), hashes its blocks, drops the writer and
//! answers; nobody waits for a peer. The synchroniser, woken once per image, hashes the
//! straddling blocks through a [`image_buffer::SlotView`], combines the digests in block order,
//! builds the metadata from all modules (in module order, exactly as one thread does) and commits.
//!
//! A module whose FrameBuffer slot was overwritten while a worker read its part is zero-filled
//! whole, as with one thread: a second, rare round has every worker zero that module's rows in
//! its band and hash its blocks again (no frame is read in it, so it cannot fail the same way).
//!
//! Messages are one [`Job`] per worker that travels to the worker and back (bounded channels of
//! one): its buffers are allocated at set-up and reused, so nothing is allocated per image. The
//! calibration travels with the job (`Arc`) and the worker drops it before it answers, so between
//! images the synchroniser holds the only reference and the hot swap takes it in place.
//!
//! A worker that falls behind its peers is measured and flagged ([`WorkerStats`]), never waited
//! out with a wrong pixel: the image is committed only when every worker has answered.
//!
//! Never: write outside a worker's band (the region writer refuses), let a worker touch an image
//! after it answered, or allocate or log per image.

use crate::pixels::{ModulePixels, Scratch};
use image_buffer::{RegionError, RegionPlan, RegionRing, RingReader};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std_daq_common::checksum::{block_count, block_digest, BLOCK_BYTES};
use std_daq_common::{ImageMetadata, ModuleFrame};

/// An image whose last worker finished more than this after the first one counts as a worker
/// stall.
pub const WORKER_STALL: Duration = Duration::from_millis(1);
/// Image rows a worker converts before it hashes the blocks they completed: 32 rows of a
/// 2-module-wide float32 image are 258 KiB, about one checksum block, so the rows it hashes
/// are still in the core's own cache.
pub const RUN_ROWS: usize = 32;
/// A worker that has not answered after this is taken as lost (a bug: the service stops).
const WORKER_WATCHDOG: Duration = Duration::from_secs(10);

/// How the worker threads kept up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStats {
    /// Time the synchroniser waited for the workers (all rounds of all images), in µs.
    pub wait_us: u64,
    /// Of that, time the slowest worker of each round was busy (the rest is hand-over: waking
    /// the workers and the synchroniser), in µs.
    pub busy_us: u64,
    /// Time between the first and the last worker finishing, in µs.
    pub straggle_us: u64,
    /// Images whose last worker finished more than [`WORKER_STALL`] after the first.
    pub stalls: u64,
    /// Images with a module overwritten while it was read, zero-filled in a second round.
    pub refills: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start assembler worker thread {worker}: {source}")]
    Spawn {
        worker: usize,
        source: std::io::Error,
    },
    #[error("the image cannot be split over workers: {0}")]
    Plan(#[from] image_buffer::PlanError),
    #[error("the image cannot be split over workers: rows of module {module} in image rows {rows:?} are not contiguous (a geometry bug)")]
    Band { module: usize, rows: Range<usize> },
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

/// One run of a worker's band: image rows converted together, then the blocks they completed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    /// (module, its rows in these image rows), in module order; modules outside them omitted.
    parts: Vec<(usize, Range<usize>)>,
    /// The checksum blocks that end in this run and lie wholly in the band.
    blocks: Range<usize>,
}

/// One worker's band of the image, fixed at set-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// Its image rows.
    pub rows: Range<usize>,
    /// The slot bytes it writes: exactly those rows.
    pub bytes: Range<usize>,
    /// The checksum blocks it hashes (wholly inside `bytes`).
    pub blocks: Range<usize>,
    runs: Vec<Run>,
}

/// Cuts the image of `pixels` into `n` bands (see the module docs); returns them and the blocks
/// of an image of `image_bytes` bytes that no band holds wholly (hashed by the synchroniser).
pub fn split_image(
    pixels: &ModulePixels,
    n_modules: usize,
    n: usize,
    image_bytes: usize,
) -> Result<(Vec<Share>, Vec<usize>), WorkerError> {
    let g = &pixels.geometry;
    let height = g.image_height;
    let row_bytes = g.image_width * g.bytes_per_pixel;
    // at[m][i]: the row of module m in image row i.
    let at: Vec<Vec<Option<usize>>> = (0..n_modules)
        .map(|m| {
            let mut rows = vec![None; height];
            for r in 0..pixels.rows(m) {
                if let Some(slot) = rows.get_mut(pixels.image_row(m, r)) {
                    *slot = Some(r);
                }
            }
            rows
        })
        .collect();
    // A cut between image rows i - 1 and i.
    let may_cut = |i: usize| {
        i == 0
            || i >= height
            || at.iter().all(|rows| match (rows[i - 1], rows[i]) {
                (Some(a), Some(b)) if a.abs_diff(b) == 1 => !pixels.rows_coupled(a.max(b)),
                _ => true,
            })
    };
    let nearest_cut = |target: usize, floor: usize| {
        (0..=height)
            .flat_map(|d| [target.saturating_add(d), target.saturating_sub(d)])
            .find(|&i| i >= floor && i <= height && may_cut(i))
            .unwrap_or(height)
    };
    let mut cuts = vec![0];
    for w in 1..n {
        let floor = cuts[w - 1];
        cuts.push(nearest_cut(height * w / n, floor));
    }
    cuts.push(height);
    let n_blocks = block_count(image_bytes);
    let block_end = |k: usize| ((k + 1) * BLOCK_BYTES).min(image_bytes);
    let mut shares = Vec::with_capacity(n);
    let mut hashed = vec![false; n_blocks];
    for band in cuts.windows(2) {
        let (top, bottom) = (band[0], band[1]);
        let bytes = (top * row_bytes).min(image_bytes)..(bottom * row_bytes).min(image_bytes);
        let first_block = bytes.start.div_ceil(BLOCK_BYTES);
        let mut next_block = first_block;
        let mut runs = Vec::new();
        let mut start = top;
        while start < bottom {
            let mut end = (start + RUN_ROWS).min(bottom);
            while end < bottom && !may_cut(end) {
                end += 1;
            }
            let mut parts = Vec::new();
            for (m, rows) in at.iter().enumerate() {
                let mine: Vec<usize> = rows[start..end].iter().flatten().copied().collect();
                let (Some(lo), Some(hi)) = (mine.iter().min(), mine.iter().max()) else {
                    continue;
                };
                let range = *lo..*hi + 1;
                if range.len() != mine.len() {
                    return Err(WorkerError::Band {
                        module: m,
                        rows: start..end,
                    });
                }
                parts.push((m, range));
            }
            let first = next_block;
            let done = (end * row_bytes).min(bytes.end);
            while next_block < n_blocks && block_end(next_block) <= done {
                hashed[next_block] = true;
                next_block += 1;
            }
            runs.push(Run {
                parts,
                blocks: first..next_block,
            });
            start = end;
        }
        shares.push(Share {
            rows: top..bottom,
            bytes,
            blocks: first_block..next_block.max(first_block),
            runs,
        });
    }
    let straddling = (0..n_blocks).filter(|&k| !hashed[k]).collect();
    Ok((shares, straddling))
}

/// What one image is made of, for [`Workers::assemble`].
#[derive(Debug, Clone, Copy)]
pub struct ImageInput<'a> {
    pub image_id: u64,
    /// Which modules' frames arrived (module order).
    pub frames: &'a [Option<ModuleFrame>],
    pub module_rings: &'a [Arc<RingReader<ModuleFrame>>],
    pub pixels: &'a Arc<ModulePixels>,
    /// Compute the end-to-end checksum.
    pub checksum: bool,
}

#[derive(Debug)]
struct ModuleTask {
    /// The module's FrameBuffer when its frame arrived (`None`: absent).
    ring: Option<Arc<RingReader<ModuleFrame>>>,
    /// Its rows in this worker's band: placed, or zero-filled (absent, overwritten).
    outcome: Outcome,
    /// Zero-fill it whatever arrived (the refill round of an overwritten module).
    zero: bool,
}

/// One worker's part of one image; travels to the worker and back.
#[derive(Debug)]
struct Job {
    image_id: u64,
    pixels: Option<Arc<ModulePixels>>,
    /// Every module of the image, by module index.
    modules: Vec<ModuleTask>,
    /// A refill round: only zero the modules marked `zero`, read no frame.
    refill: bool,
    hash: bool,
    /// The digests of the band's blocks, in block order.
    digests: Vec<u64>,
    started: Instant,
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
    blocks: Range<usize>,
    thread: Option<JoinHandle<()>>,
}

/// The worker threads and the image ring they write; see the module docs.
#[derive(Debug)]
pub struct Workers {
    ring: RegionRing<ImageMetadata>,
    links: Vec<Link>,
    n_modules: usize,
    image_bytes: usize,
    /// Blocks no band holds wholly, hashed here.
    straddling: Vec<usize>,
    /// Every block digest of an image, in block order.
    digests: Vec<u64>,
    outcomes: Vec<Outcome>,
    /// A worker stopped answering: nobody is joined.
    lost: bool,
    pub stats: WorkerStats,
}

impl Workers {
    /// Splits the image over `n` workers (at least 1, at most one per image row and
    /// [`image_buffer::MAX_REGION_WRITERS`]) and starts them.
    pub fn start(
        n: usize,
        pixels: &ModulePixels,
        n_modules: usize,
        image_ring: image_buffer::RingOwner<ImageMetadata>,
    ) -> Result<Self, WorkerError> {
        let n = n
            .min(image_buffer::MAX_REGION_WRITERS)
            .min(pixels.geometry.image_height)
            .max(1);
        let slot_bytes = image_ring.slot_bytes() as usize;
        let image_bytes = pixels.geometry.image_bytes().min(slot_bytes);
        let (shares, straddling) = split_image(pixels, n_modules, n, image_bytes)?;
        // Checked before the owner is converted (the bands are disjoint by construction, so a
        // refused plan is a bug in the split).
        let plan = RegionPlan::new(
            slot_bytes,
            shares.iter().map(|s| vec![s.bytes.clone()]).collect(),
        )?;
        let ring = image_ring.into_regions(plan)?;
        let mut links = Vec::with_capacity(n);
        for (w, share) in shares.into_iter().enumerate() {
            let (jobs, jobs_rx) = sync_channel::<Job>(1);
            let (done_tx, done) = sync_channel::<Job>(1);
            let now = Instant::now();
            let job = Job {
                image_id: 0,
                pixels: None,
                modules: (0..n_modules)
                    .map(|_| ModuleTask {
                        ring: None,
                        outcome: Outcome::Absent,
                        zero: false,
                    })
                    .collect(),
                refill: false,
                hash: false,
                digests: Vec::with_capacity(share.blocks.len()),
                started: now,
                finished: now,
                error: None,
                panicked: false,
            };
            let blocks = share.blocks.clone();
            let worker = Worker {
                w,
                ring: ring.clone(),
                scratch: pixels.scratch(),
                share,
                image_bytes,
            };
            let thread = std::thread::Builder::new()
                .name(format!("asm-worker-{w}"))
                .spawn(move || worker.run(jobs_rx, done_tx))
                .map_err(|source| WorkerError::Spawn { worker: w, source })?;
            links.push(Link {
                jobs,
                done,
                job: Some(job),
                blocks,
                thread: Some(thread),
            });
        }
        Ok(Workers {
            ring,
            links,
            n_modules,
            image_bytes,
            straddling,
            digests: vec![0; block_count(image_bytes)],
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

    /// The bytes of an image (what the checksum covers).
    pub fn image_bytes(&self) -> usize {
        self.image_bytes
    }

    /// Image `input.image_id`: begins the slot, has every module placed and, with
    /// `input.checksum`, the checksum of its [`Self::image_bytes`] computed; returns each
    /// module's outcome (in module order) and the checksum. The slot is then ready for
    /// [`Self::commit`]; on an error the image is abandoned.
    pub fn assemble(
        &mut self,
        input: &ImageInput<'_>,
    ) -> Result<(&[Outcome], Option<u64>), WorkerError> {
        let image_id = input.image_id;
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
        match self.assemble_begun(input) {
            Ok(checksum) => Ok((&self.outcomes[..self.n_modules], checksum)),
            Err(e) => {
                self.ring.abandon();
                Err(e)
            }
        }
    }

    fn assemble_begun(&mut self, input: &ImageInput<'_>) -> Result<Option<u64>, WorkerError> {
        let ImageInput {
            image_id,
            frames,
            module_rings,
            pixels,
            checksum,
        } = *input;
        for (m, outcome) in self.outcomes.iter_mut().enumerate() {
            *outcome = if frames.get(m).is_some_and(Option::is_some) {
                Outcome::Placed
            } else {
                Outcome::Absent
            };
        }
        self.round(image_id, Some(module_rings), pixels, checksum)?;
        let mut overwritten = false;
        for link in &self.links {
            for (task, outcome) in link
                .job
                .iter()
                .flat_map(|job| &job.modules)
                .zip(&mut self.outcomes)
            {
                if task.outcome == Outcome::Overwritten {
                    *outcome = Outcome::Overwritten;
                    overwritten = true;
                }
            }
        }
        if overwritten {
            // Other bands may hold that module's pixels: zero them too, as one thread does.
            self.stats.refills += 1;
            self.round(image_id, None, pixels, checksum)?;
        }
        if !checksum {
            return Ok(None);
        }
        for link in &self.links {
            if let (Some(job), Some(out)) = (&link.job, self.digests.get_mut(link.blocks.clone())) {
                let n = job.digests.len().min(out.len());
                out[..n].copy_from_slice(&job.digests[..n]);
            }
        }
        if !self.straddling.is_empty() {
            let view = self.ring.view().map_err(|source| WorkerError::Region {
                worker: 0,
                image_id,
                source,
            })?;
            let data = view.data();
            for &k in &self.straddling {
                let block = k * BLOCK_BYTES..((k + 1) * BLOCK_BYTES).min(self.image_bytes);
                if let (Some(bytes), Some(out)) = (data.get(block), self.digests.get_mut(k)) {
                    *out = block_digest(bytes);
                }
            }
        }
        Ok(Some(std_daq_common::checksum::combine(&self.digests)))
    }

    /// Sends every worker its job and waits for all of them. `read`: the FrameBuffers to convert
    /// from (the first round); `None`: the refill round, zeroing the overwritten modules.
    fn round(
        &mut self,
        image_id: u64,
        read: Option<&[Arc<RingReader<ModuleFrame>>]>,
        pixels: &Arc<ModulePixels>,
        hash: bool,
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
            job.hash = hash;
            job.refill = read.is_none();
            job.pixels = Some(Arc::clone(pixels));
            match read {
                Some(module_rings) => {
                    for ((m, task), outcome) in
                        job.modules.iter_mut().enumerate().zip(&self.outcomes)
                    {
                        task.zero = false;
                        task.outcome = *outcome;
                        task.ring = (*outcome == Outcome::Placed)
                            .then(|| module_rings.get(m).map(Arc::clone))
                            .flatten();
                    }
                }
                None => {
                    for (task, outcome) in job.modules.iter_mut().zip(&self.outcomes) {
                        task.zero = *outcome == Outcome::Overwritten;
                    }
                }
            }
            if link.jobs.send(job).is_err() {
                self.lost = true;
                return Err(lost);
            }
        }
        let mut failure = None;
        let (mut first, mut last) = (None::<Instant>, None::<Instant>);
        let mut busy = Duration::ZERO;
        for (w, link) in self.links.iter_mut().enumerate() {
            match link.done.recv_timeout(WORKER_WATCHDOG) {
                Ok(mut job) => {
                    first = Some(first.map_or(job.finished, |f| f.min(job.finished)));
                    last = Some(last.map_or(job.finished, |l| l.max(job.finished)));
                    busy = busy.max(job.finished.saturating_duration_since(job.started));
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
        self.stats.busy_us += duration_us(busy);
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

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One worker thread's own state.
struct Worker {
    w: usize,
    ring: RegionRing<ImageMetadata>,
    scratch: Scratch,
    share: Share,
    image_bytes: usize,
}

impl Worker {
    /// One job at a time until the synchroniser closes the channel.
    fn run(mut self, jobs: Receiver<Job>, done: SyncSender<Job>) {
        while let Ok(mut job) = jobs.recv() {
            job.started = Instant::now();
            job.digests.clear();
            // A panic here is a bug; caught so that the synchroniser hears of it.
            job.panicked = catch_unwind(AssertUnwindSafe(|| self.band(&mut job))).is_err();
            // Dropped before answering: between images the synchroniser holds the only one.
            job.pixels = None;
            for task in &mut job.modules {
                task.ring = None;
            }
            job.finished = Instant::now();
            if done.send(job).is_err() {
                break;
            }
        }
    }

    /// Writes (or, refilling, zeroes) the band run by run, hashing each run's blocks after it.
    fn band(&mut self, job: &mut Job) {
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
        for run in &self.share.runs {
            for (m, rows) in &run.parts {
                let Some(task) = job.modules.get_mut(*m) else {
                    continue;
                };
                if job.refill {
                    if task.zero {
                        pixels.zero_rows(*m, rows.clone(), &mut writer);
                    }
                    continue;
                }
                let placed = task.outcome == Outcome::Placed
                    && task.ring.as_ref().is_some_and(|frames| {
                        // The slot's own metadata says which packets the bytes hold.
                        frames
                            .read(image_id, |slot_frame, src| {
                                pixels.write_rows_into(
                                    scratch,
                                    *m,
                                    slot_frame,
                                    src,
                                    rows.clone(),
                                    &mut writer,
                                )
                            })
                            .is_ok()
                    });
                if !placed {
                    if task.outcome == Outcome::Placed {
                        task.outcome = Outcome::Overwritten;
                    }
                    pixels.zero_rows(*m, rows.clone(), &mut writer);
                }
            }
            if job.hash {
                for k in run.blocks.clone() {
                    let start = k * BLOCK_BYTES;
                    let len = ((k + 1) * BLOCK_BYTES).min(self.image_bytes) - start;
                    match writer.bytes_mut(start, len) {
                        Ok(block) => job.digests.push(block_digest(block)),
                        Err(e) => {
                            job.error = Some(e.into());
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::{Calibration, MaskCounts, ModuleCalibration, MODULE_HEIGHT, MODULE_WIDTH};
    use std_daq_common::DetectorConfig;

    /// JUNGFRAU modules with gaps at `corners` (converted with split double pixels, or raw).
    fn jungfrau(corners: &[[u32; 4]], height: u32, width: u32, converted: bool) -> ModulePixels {
        let positions: serde_json::Map<String, serde_json::Value> = corners
            .iter()
            .enumerate()
            .map(|(m, c)| (m.to_string(), serde_json::json!(c)))
            .collect();
        let kind = if converted {
            "jungfrau-converted"
        } else {
            "jungfrau-raw"
        };
        let mut json = serde_json::json!({
            "detector_name": "split", "detector_type": kind, "n_modules": corners.len(),
            "bit_depth": 16, "chip_gaps": true,
            "image_pixel_height": height, "image_pixel_width": width,
            "start_udp_port": 50000, "module_positions": positions,
        });
        if converted {
            json["calibration_file"] = "/unused.h5".into();
            json["double_pixels"] = "split".into();
        }
        let cfg = DetectorConfig::from_json_str(&json.to_string(), "test").unwrap();
        let pixels = MODULE_WIDTH * MODULE_HEIGHT;
        let calibration = converted.then(|| Calibration {
            modules: (0..corners.len())
                .map(|_| {
                    let one = vec![1.0f32; pixels];
                    ModuleCalibration::from_values(
                        [&one, &one, &one],
                        [&one, &one, &one],
                        &vec![false; pixels],
                        &mut MaskCounts::default(),
                    )
                })
                .collect(),
            masked: MaskCounts::default(),
            id: 1,
        });
        ModulePixels::with_calibration(&cfg, calibration)
    }

    /// Every module row is in exactly one run of one band, inside that band's image rows; no
    /// run splits a coupled pair; the bands tile the image rows and its bytes; every block is
    /// hashed exactly once (by its band, after the run that completed it, or by the synchroniser).
    fn check_split(pixels: &ModulePixels, n_modules: usize, n: usize) -> Vec<Share> {
        let g = &pixels.geometry;
        let row_bytes = g.image_width * g.bytes_per_pixel;
        let image_bytes = g.image_bytes();
        let (shares, straddling) = split_image(pixels, n_modules, n, image_bytes).unwrap();
        assert_eq!(shares.len(), n);
        assert_eq!(shares[0].rows.start, 0);
        assert_eq!(shares[n - 1].rows.end, g.image_height);
        assert!(shares.windows(2).all(|p| p[0].rows.end == p[1].rows.start));
        let mut seen: Vec<Vec<usize>> = (0..n_modules).map(|m| vec![0; pixels.rows(m)]).collect();
        let mut hashed = vec![0; block_count(image_bytes)];
        for share in &shares {
            assert_eq!(
                share.bytes,
                share.rows.start * row_bytes..share.rows.end * row_bytes
            );
            let mut blocks = share.blocks.start;
            for run in &share.runs {
                assert_eq!(
                    run.blocks.start, blocks,
                    "runs hash the band's blocks in order"
                );
                blocks = run.blocks.end;
                for (m, rows) in &run.parts {
                    assert!(!rows.is_empty());
                    assert!(!pixels.rows_coupled(rows.start) && !pixels.rows_coupled(rows.end));
                    for r in rows.clone() {
                        seen[*m][r] += 1;
                        assert!(share.rows.contains(&pixels.image_row(*m, r)));
                    }
                }
            }
            assert_eq!(blocks, share.blocks.end);
            for k in share.blocks.clone() {
                hashed[k] += 1;
                let end = ((k + 1) * BLOCK_BYTES).min(image_bytes);
                assert!(share.bytes.start <= k * BLOCK_BYTES && end <= share.bytes.end);
            }
        }
        for k in straddling {
            hashed[k] += 1;
        }
        assert!(hashed.iter().all(|h| *h == 1), "{hashed:?}");
        assert!(seen.iter().flatten().all(|s| *s == 1));
        shares
    }

    #[test]
    fn bands_tile_the_image_and_never_split_a_double_pixel_from_its_gap() {
        // Side by side, the second mirrored (as in the threads bench): rows interleave.
        let pair = jungfrau(&[[0, 0, 1029, 513], [2059, 0, 1030, 513]], 514, 2060, true);
        // 2x2, mirrored in x, in y and in both.
        let quad = jungfrau(
            &[
                [0, 0, 1029, 513],
                [2059, 0, 1030, 513],
                [0, 1027, 1029, 514],
                [2059, 1027, 1030, 514],
            ],
            1028,
            2060,
            true,
        );
        let one = jungfrau(&[[0, 0, 1029, 513]], 514, 1030, true);
        let raw = jungfrau(&[[0, 0, 1029, 513]], 514, 1030, false);
        for n in 1..=5 {
            check_split(&pair, 2, n);
            check_split(&quad, 4, n);
            check_split(&one, 1, n);
            check_split(&raw, 1, n);
        }
        // Two bands of a converted module meet in the middle of the gap rows (256 | 257): each
        // gap row is made with the data row its double pixels come from.
        let halves = check_split(&pair, 2, 2);
        assert_eq!(
            (halves[0].rows.clone(), halves[1].rows.clone()),
            (0..257, 257..514)
        );
        let halves = check_split(&quad, 4, 2);
        assert_eq!(halves[0].rows, 0..514);
        // Raw modules have no coupled rows: cut where asked (514 rows in 3: at 171 and 342).
        let thirds = check_split(&raw, 1, 3);
        assert_eq!((thirds[0].rows.end, thirds[1].rows.end), (171, 342));
        // Converted, a cut at 256 or 258 would split a pair (the data row from its gap row).
        assert!(!pair.rows_coupled(171) && pair.rows_coupled(256) && pair.rows_coupled(258));
        assert!(!pair.rows_coupled(257) && !raw.rows_coupled(256));
    }
}
