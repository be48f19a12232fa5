//! The assembler's worker threads: the work of an image (reading every module's frame from its
//! FrameBuffer, placement or conversion, zero-filling a missing module) and the block digests of
//! its end-to-end checksum, spread over `assembler_threads` workers: worker 0 is the
//! synchroniser's own thread, the others persistent threads.
//!
//! Set-up (once, [`split_image`]): the image's rows are cut into lanes of consecutive rows, one
//! per pair of workers, sized by their workers, and each lane into runs of [`RUN_ROWS`] rows
//! that shrink to [`MIN_RUN_ROWS`] towards the middle of a two-worker lane (where its workers
//! usually meet: the one that finds no run left then waits only for a small last run), at row
//! boundaries that split no gap row from the double pixel its value comes from
//! ([`ModulePixels::rows_coupled`]); run `k` is writer `k` of the slot's [`RegionPlan`] (its rows'
//! bytes, checked disjoint).
//!
//! ```text
//!   image rows   lane 0 (workers 0 and 1)                           lane 1 (worker 2)
//!   runs         [0   ][1   ][2   ][3 ][4][5][6][7 ][8   ][9   ] ... [10  ][11  ] ...
//!                 w0 claims -->                <-- w1 claims          w2 -->
//!                 hashes each block once the runs under it are its own, from its cache
//! ```
//!
//! Per image, driven by the synchroniser's thread ([`Workers::assemble`]): it `begin`s the slot,
//! resets every lane's claims, sends every other worker its job, works worker 0's part itself
//! (no thread to wake for that part, none to wake the synchroniser after it, and no core idle
//! while it waits), then waits for the others' answers, blocked: spinning for them took CPU from
//! the receivers on a 2-core machine (end to end, fewer lossless rates). In each lane one worker
//! claims runs from the top down, the other from the bottom up (one atomic per lane), so they meet
//! wherever their speed puts the meeting: a core that other load slows down gets fewer runs.
//! For each run the worker takes that run's [`image_buffer::RegionWriter`], converts the rows of
//! every module in it straight into the slot (no extra copy) and drops the writer; then it hashes
//! the checksum blocks that now lie wholly in runs it made, through an
//! [`image_buffer::RangeView`], while their bytes are in its core's cache. Nobody waits for a
//! peer. The synchroniser, woken once per image, hashes the few blocks where two workers or two
//! lanes met (through a [`image_buffer::SlotView`], every writer dropped), combines the digests
//! in block order, builds the metadata from all modules (in module order, exactly as one thread
//! does) and commits.
//!
//! A module whose FrameBuffer slot was overwritten while a worker read its part is zero-filled
//! whole, as with one thread: a second, rare round has the workers zero that module's rows in
//! every run and hash again (no frame is read in it, so it cannot fail the same way).
//!
//! Messages are one [`Job`] per worker that travels to the worker and back (bounded channels of
//! one): its buffers are allocated at set-up and reused, so nothing is allocated per image. The
//! calibration travels with the job (`Arc`) and the worker drops it before it answers, so between
//! images the synchroniser holds the only reference and the hot swap takes it in place.
//!
//! A worker that falls behind its peers is measured and flagged ([`WorkerStats`]), never waited
//! out with a wrong pixel: the image is committed only when every worker has answered.
//!
//! Never: write outside a claimed run (the region writer refuses), make a run twice in a round
//! (the lane's claims hand each run out once), let a worker touch an image after it answered,
//! or allocate or log per image.

use crate::pixels::{ModulePixels, Scratch};
use image_buffer::{RegionError, RegionPlan, RegionRing, RingReader};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std_daq_common::checksum::{block_count, block_digest, BLOCK_BYTES};
use std_daq_common::{ImageMetadata, ModuleFrame};

/// An image whose last worker finished more than this after the first one counts as a worker
/// stall.
pub const WORKER_STALL: Duration = Duration::from_millis(1);
/// Image rows of a run (more when the image has more than 64 times as many): what a worker
/// converts before it hashes the blocks they completed; 32 rows of a 2-module-wide float32 image
/// are 258 KiB, about one checksum block, so the rows it hashes are still in its core's cache.
pub const RUN_ROWS: usize = 32;
/// The smallest run, where the two workers of a lane meet (8 rows of a 2-module float32 image:
/// about 30 µs of conversion on one core).
pub const MIN_RUN_ROWS: usize = 8;
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

/// One run of image rows, converted together by one worker; writer `k` of the region plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub rows: Range<usize>,
    /// The slot bytes of those rows (exactly).
    pub bytes: Range<usize>,
    /// (module, its rows in these image rows), in module order; modules outside them omitted.
    pub parts: Vec<(usize, Range<usize>)>,
}

/// The image cut for the workers, fixed at set-up: runs of rows (each a writer of the region
/// plan) and lanes of consecutive runs, one per pair of workers (the last lane has one worker
/// when their number is odd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub runs: Vec<Run>,
    /// Lane `j`: runs `lanes[j]`, worked by workers `2j` (from the top down) and `2j + 1` (from
    /// the bottom up), who meet wherever their speed puts the meeting.
    pub lanes: Vec<Range<usize>>,
    /// Workers the lanes are for: as asked, at most one per run, at least 1.
    pub workers: usize,
    pub image_bytes: usize,
}

/// Cuts the image of `pixels` into lanes for `n` workers (at most one per run of
/// [`RUN_ROWS`] rows), sized by their workers, and the lanes into runs: of about [`RUN_ROWS`]
/// rows, shrinking to [`MIN_RUN_ROWS`] towards the middle of a lane of two workers (uniform if
/// that would make more than [`image_buffer::MAX_REGION_WRITERS`] runs); cut only where no gap
/// row is separated from the double pixel its value comes from.
pub fn split_image(
    pixels: &ModulePixels,
    n_modules: usize,
    n: usize,
    image_bytes: usize,
) -> Result<Split, WorkerError> {
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
    let run_rows = RUN_ROWS.max(height.div_ceil(image_buffer::MAX_REGION_WRITERS));
    // The next allowed cut at or after `i`, at or before `limit` (itself allowed).
    let cut_after = |mut i: usize, limit: usize| {
        while i < limit && !may_cut(i) {
            i += 1;
        }
        i.min(limit)
    };
    let cut_before = |mut i: usize, limit: usize| {
        while i > limit && !may_cut(i) {
            i -= 1;
        }
        i.max(limit)
    };
    // Rows start..end cut into runs of `run_rows`, from the top.
    let uniform = |start: usize, end: usize| {
        let mut cuts = vec![start];
        let mut at = start;
        while at < end {
            at = cut_after((at + run_rows).min(end), end);
            cuts.push(at);
        }
        cuts
    };
    // Rows start..end for two workers meeting in the middle: runs shrink from `run_rows` to
    // `MIN_RUN_ROWS` towards the middle, so the worker that finds no run left waits for its
    // peer's last run only briefly (the straggle of each image).
    let tapered = |start: usize, end: usize| {
        let middle = cut_after(start + (end - start) / 2, end);
        let size = |distance: usize| (distance / 2).clamp(MIN_RUN_ROWS, run_rows);
        let mut cuts = vec![start];
        let mut at = start;
        while at < middle {
            at = cut_after((at + size(middle - at)).min(middle), middle);
            cuts.push(at);
        }
        let mut up = vec![end];
        let mut at = end;
        while at > middle {
            at = cut_before(at.saturating_sub(size(at - middle)).max(middle), middle);
            up.push(at);
        }
        up.pop();
        cuts.extend(up.into_iter().rev());
        cuts
    };
    let even = uniform(0, height);
    let n = n.min(even.len() - 1).max(1);
    // Lanes of 2 workers weigh 2, a lone last worker 1: lane ends at the uniform cut nearest to
    // the share of the rows their weights give.
    let n_lanes = n.div_ceil(2);
    let weight = |j: usize| if 2 * j + 1 < n { 2 } else { 1 };
    let total: usize = (0..n_lanes).map(weight).sum();
    let mut lane_rows = Vec::with_capacity(n_lanes);
    let (mut first, mut weight_so_far) = (0, 0);
    for j in 0..n_lanes {
        weight_so_far += weight(j);
        let target = height * weight_so_far / total.max(1);
        let end = if j + 1 == n_lanes {
            even.len() - 1
        } else {
            // At least one run per lane while runs last.
            let floor = (first + 1).min(even.len() - 1);
            (floor..even.len())
                .min_by_key(|&k| even[k].abs_diff(target))
                .unwrap_or(even.len() - 1)
        };
        lane_rows.push((even[first], even[end], weight(j)));
        first = end;
    }
    // Each lane's cuts: tapered for a pair of workers, uniform for a lone one; all uniform if
    // tapering would make more runs than the region plan has writers.
    let cuts_of = |taper: bool| {
        lane_rows
            .iter()
            .map(|&(start, end, workers)| {
                if taper && workers == 2 {
                    tapered(start, end)
                } else {
                    uniform(start, end)
                }
            })
            .collect::<Vec<_>>()
    };
    let runs_in = |cuts: &[Vec<usize>]| cuts.iter().map(|c| c.len() - 1).sum::<usize>();
    let mut lane_cuts = cuts_of(true);
    if runs_in(&lane_cuts) > image_buffer::MAX_REGION_WRITERS {
        lane_cuts = cuts_of(false);
    }
    let mut runs = Vec::new();
    let mut lanes = Vec::with_capacity(n_lanes);
    for cuts in &lane_cuts {
        let first = runs.len();
        for pair in cuts.windows(2) {
            let (start, end) = (pair[0], pair[1]);
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
            runs.push(Run {
                rows: start..end,
                bytes: (start * row_bytes).min(image_bytes)..(end * row_bytes).min(image_bytes),
                parts,
            });
        }
        lanes.push(first..runs.len());
    }
    Ok(Split {
        runs,
        lanes,
        workers: n,
        image_bytes,
    })
}

/// A lane's unclaimed runs `top..bottom`, packed in one atomic so that the two workers of the
/// lane claim from either end without a lock and never the same run.
#[derive(Debug, Default)]
struct Claims(AtomicU64);

impl Claims {
    fn reset(&self, runs: &Range<usize>) {
        self.0.store(
            ((runs.start as u64) << 32) | runs.end as u64,
            Ordering::Relaxed,
        );
    }

    /// The next run from the top (`down`) or from the bottom, if any is left.
    fn claim(&self, down: bool) -> Option<usize> {
        let mut v = self.0.load(Ordering::Relaxed);
        loop {
            let (top, bottom) = (v >> 32, v & 0xffff_ffff);
            if top >= bottom {
                return None;
            }
            let (next, run) = if down {
                (((top + 1) << 32) | bottom, top)
            } else {
                ((top << 32) | (bottom - 1), bottom - 1)
            };
            match self
                .0
                .compare_exchange_weak(v, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(run as usize),
                Err(now) => v = now,
            }
        }
    }
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
    /// Its rows in the runs this worker made: placed, or zero-filled (absent, overwritten).
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
    /// The blocks this worker hashed and their digests, in block order.
    blocks: Range<usize>,
    digests: Vec<u64>,
    started: Instant,
    finished: Instant,
    error: Option<RegionError>,
    panicked: bool,
}

#[derive(Debug)]
struct Link {
    /// To the worker's thread and back; `None` for worker 0, whom the synchroniser's thread
    /// runs itself ([`Workers::own`]).
    channel: Option<(SyncSender<Job>, Receiver<Job>)>,
    /// The job while it is at the synchroniser.
    job: Option<Job>,
    thread: Option<JoinHandle<()>>,
}

/// The worker threads and the image ring they write; see the module docs.
#[derive(Debug)]
pub struct Workers {
    ring: RegionRing<ImageMetadata>,
    /// Worker `w`'s job and channel (worker 0: no channel, no thread).
    links: Vec<Link>,
    /// Worker 0, run on the synchroniser's thread while the others work: one thread fewer to
    /// wake and to wait for per image, and no core idle while it waits.
    own: Worker,
    split: Arc<Split>,
    claims: Arc<[Claims]>,
    n_modules: usize,
    /// Every block digest of an image, in block order, and whether a worker hashed it.
    digests: Vec<u64>,
    hashed: Vec<bool>,
    outcomes: Vec<Outcome>,
    /// A worker stopped answering: nobody is joined.
    lost: bool,
    pub stats: WorkerStats,
}

impl Workers {
    /// Splits the image over `n` workers (at least 1, at most one per run of rows) and starts
    /// them.
    pub fn start(
        n: usize,
        pixels: &ModulePixels,
        n_modules: usize,
        image_ring: image_buffer::RingOwner<ImageMetadata>,
    ) -> Result<Self, WorkerError> {
        let slot_bytes = image_ring.slot_bytes() as usize;
        let image_bytes = pixels.geometry.image_bytes().min(slot_bytes);
        let split = Arc::new(split_image(pixels, n_modules, n, image_bytes)?);
        let n = split.workers;
        // Checked before the owner is converted (the runs are disjoint by construction, so a
        // refused plan is a bug in the split).
        let plan = RegionPlan::new(
            slot_bytes,
            split.runs.iter().map(|r| vec![r.bytes.clone()]).collect(),
        )?;
        let ring = image_ring.into_regions(plan)?;
        let claims: Arc<[Claims]> = split.lanes.iter().map(|_| Claims::default()).collect();
        let n_blocks = block_count(image_bytes);
        let new_job = || {
            let now = Instant::now();
            Job {
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
                blocks: 0..0,
                digests: Vec::with_capacity(n_blocks),
                started: now,
                finished: now,
                error: None,
                panicked: false,
            }
        };
        let new_worker = |w: usize| Worker {
            lane: w / 2,
            down: w.is_multiple_of(2),
            ring: ring.clone(),
            scratch: pixels.scratch(),
            split: Arc::clone(&split),
            claims: Arc::clone(&claims),
        };
        let own = new_worker(0);
        let mut links = Vec::with_capacity(n);
        links.push(Link {
            channel: None,
            job: Some(new_job()),
            thread: None,
        });
        for w in 1..n {
            let (job, worker) = (new_job(), new_worker(w));
            let (jobs, jobs_rx) = sync_channel::<Job>(1);
            let (done_tx, done) = sync_channel::<Job>(1);
            let thread = std::thread::Builder::new()
                .name(format!("asm-worker-{w}"))
                .spawn(move || worker.run(jobs_rx, done_tx))
                .map_err(|source| WorkerError::Spawn { worker: w, source })?;
            links.push(Link {
                channel: Some((jobs, done)),
                job: Some(job),
                thread: Some(thread),
            });
        }
        Ok(Workers {
            ring,
            links,
            own,
            split,
            claims,
            n_modules,
            digests: vec![0; n_blocks],
            hashed: vec![false; n_blocks],
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

    /// Image `input.image_id`: begins the slot, has every module placed and, with
    /// `input.checksum`, the checksum of the image's bytes computed; returns each
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
            // Other runs may hold that module's pixels: zero them too, as one thread does.
            self.stats.refills += 1;
            self.round(image_id, None, pixels, checksum)?;
        }
        if !checksum {
            return Ok(None);
        }
        self.hashed.fill(false);
        for job in self.links.iter().filter_map(|link| link.job.as_ref()) {
            if let (Some(out), Some(hashed)) = (
                self.digests.get_mut(job.blocks.clone()),
                self.hashed.get_mut(job.blocks.clone()),
            ) {
                let n = job.digests.len().min(out.len());
                out[..n].copy_from_slice(&job.digests[..n]);
                hashed[..n].fill(true);
            }
        }
        // Blocks where two workers' runs meet, or two lanes: every worker is done now.
        if self.hashed.contains(&false) {
            let view = self.ring.view().map_err(|source| WorkerError::Region {
                worker: 0,
                image_id,
                source,
            })?;
            let data = view.data();
            let image_bytes = self.split.image_bytes;
            for (k, (out, hashed)) in self.digests.iter_mut().zip(&self.hashed).enumerate() {
                let block = block_bytes(k, image_bytes);
                if let (false, Some(bytes)) = (*hashed, data.get(block)) {
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
        // Before the jobs are sent: the channel orders these stores before the workers' claims.
        for (claims, runs) in self.claims.iter().zip(&self.split.lanes) {
            claims.reset(runs);
        }
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
            match &link.channel {
                Some((jobs, _)) => {
                    if jobs.send(job).is_err() {
                        self.lost = true;
                        return Err(lost);
                    }
                }
                None => link.job = Some(job),
            }
        }
        // Worker 0's part, here, while the others work theirs.
        if let Some(job) = self.links.first_mut().and_then(|link| link.job.as_mut()) {
            self.own.work(job);
        }
        let mut failure = None;
        let (mut first, mut last) = (None::<Instant>, None::<Instant>);
        let mut busy = Duration::ZERO;
        for (w, link) in self.links.iter_mut().enumerate() {
            let answer = match &link.channel {
                Some((_, done)) => done.recv_timeout(WORKER_WATCHDOG),
                None => link.job.take().ok_or(RecvTimeoutError::Disconnected),
            };
            match answer {
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
            let Link {
                channel, thread, ..
            } = link;
            // A closed channel ends the worker's loop.
            drop(channel);
            if let (Some(thread), false) = (thread, self.lost) {
                let _ = thread.join();
            }
        }
    }
}

/// The image bytes of checksum block `k` (the last one may be short).
fn block_bytes(k: usize, image_bytes: usize) -> Range<usize> {
    k * BLOCK_BYTES..((k + 1) * BLOCK_BYTES).min(image_bytes)
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One worker's own state.
#[derive(Debug)]
struct Worker {
    /// Its lane, and whether it claims runs from the top down (else from the bottom up).
    lane: usize,
    down: bool,
    ring: RegionRing<ImageMetadata>,
    scratch: Scratch,
    split: Arc<Split>,
    claims: Arc<[Claims]>,
}

impl Worker {
    /// One job at a time until the synchroniser closes the channel.
    fn run(mut self, jobs: Receiver<Job>, done: SyncSender<Job>) {
        while let Ok(mut job) = jobs.recv() {
            self.work(&mut job);
            if done.send(job).is_err() {
                break;
            }
        }
    }

    /// Does `job` (timed), then lets go of what it borrowed.
    fn work(&mut self, job: &mut Job) {
        job.started = Instant::now();
        job.digests.clear();
        job.blocks = 0..0;
        // A panic here is a bug; caught so that the synchroniser hears of it.
        job.panicked = catch_unwind(AssertUnwindSafe(|| self.lane(job))).is_err();
        // Dropped before answering: between images the synchroniser holds the only one.
        job.pixels = None;
        for task in &mut job.modules {
            task.ring = None;
        }
        job.finished = Instant::now();
    }

    /// Claims runs of its lane from its end until none is left; after each, hashes the blocks
    /// that now lie wholly in the runs it made (still in this core's cache).
    fn lane(&mut self, job: &mut Job) {
        let (Some(lane), Some(claims)) =
            (self.split.lanes.get(self.lane), self.claims.get(self.lane))
        else {
            return;
        };
        let runs = &self.split.runs;
        let image_bytes = self.split.image_bytes;
        let n_blocks = block_count(image_bytes);
        let lane_bytes = runs.get(lane.start).map_or(0, |r| r.bytes.start)
            ..runs
                .get(lane.end.wrapping_sub(1))
                .map_or(0, |r| r.bytes.end);
        // Down: the next block to hash, from the lane's first whole block on. Up: the lowest
        // block hashed so far, from the lane's last whole block down.
        let mut next = if self.down {
            lane_bytes.start.div_ceil(BLOCK_BYTES)
        } else if lane_bytes.end >= image_bytes {
            n_blocks
        } else {
            lane_bytes.end / BLOCK_BYTES
        };
        let first = next;
        while let Some(k) = claims.claim(self.down) {
            let Some(run) = runs.get(k) else { break };
            if let Err(e) = write_run(&self.ring, &mut self.scratch, job, k, run) {
                job.error = Some(e);
                return;
            }
            if !job.hash {
                continue;
            }
            loop {
                let block = if self.down {
                    (next < n_blocks && block_bytes(next, image_bytes).end <= run.bytes.end)
                        .then_some(next)
                } else {
                    next.checked_sub(1)
                        .filter(|b| b * BLOCK_BYTES >= run.bytes.start)
                };
                let Some(block) = block else { break };
                match self.ring.view_range(block_bytes(block, image_bytes)) {
                    Ok(view) => job.digests.push(block_digest(view.data())),
                    Err(e) => {
                        job.error = Some(e);
                        return;
                    }
                }
                next = if self.down { block + 1 } else { block };
            }
        }
        if self.down {
            job.blocks = first..next;
        } else {
            // Hashed from the bottom up: into block order.
            job.digests.reverse();
            job.blocks = next..first;
        }
    }
}

/// Writes (or, refilling, zeroes) run `k` through writer `k` of `ring`.
fn write_run(
    ring: &RegionRing<ImageMetadata>,
    scratch: &mut Scratch,
    job: &mut Job,
    k: usize,
    run: &Run,
) -> Result<(), RegionError> {
    let Some(pixels) = job.pixels.as_ref() else {
        return Err(RegionError::NoImage);
    };
    let mut writer = ring.writer(k)?;
    let image_id = job.image_id;
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
    Ok(())
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

    /// Every module row is in exactly one run, inside that run's image rows; no run splits a
    /// coupled pair; the runs tile the image rows and bytes, at most one per region writer; the
    /// lanes tile the runs, one per pair of workers, none empty.
    fn check_split(pixels: &ModulePixels, n_modules: usize, n: usize) -> Split {
        let g = &pixels.geometry;
        let row_bytes = g.image_width * g.bytes_per_pixel;
        let image_bytes = g.image_bytes();
        let split = split_image(pixels, n_modules, n, image_bytes).unwrap();
        let runs = &split.runs;
        assert!(runs.len() <= image_buffer::MAX_REGION_WRITERS);
        assert_eq!(runs[0].rows.start, 0);
        assert_eq!(runs[runs.len() - 1].rows.end, g.image_height);
        assert!(runs.windows(2).all(|p| p[0].rows.end == p[1].rows.start));
        let mut seen: Vec<Vec<usize>> = (0..n_modules).map(|m| vec![0; pixels.rows(m)]).collect();
        for run in runs {
            assert_eq!(
                run.bytes,
                run.rows.start * row_bytes..run.rows.end * row_bytes
            );
            for (m, rows) in &run.parts {
                assert!(!rows.is_empty());
                assert!(!pixels.rows_coupled(rows.start) && !pixels.rows_coupled(rows.end));
                for r in rows.clone() {
                    seen[*m][r] += 1;
                    assert!(run.rows.contains(&pixels.image_row(*m, r)));
                }
            }
        }
        assert!(seen.iter().flatten().all(|s| *s == 1));
        assert_eq!(split.lanes.len(), n.div_ceil(2));
        assert_eq!(split.lanes[0].start, 0);
        assert_eq!(split.lanes[split.lanes.len() - 1].end, runs.len());
        assert!(split.lanes.windows(2).all(|p| p[0].end == p[1].start));
        assert!(split.lanes.iter().all(|l| !l.is_empty()));
        split
    }

    #[test]
    fn runs_tile_the_image_and_never_split_a_double_pixel_from_its_gap() {
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
        // A converted module is cut in the middle of its gap rows (256 | 257), never at 256 or
        // 258: each gap row is made with the data row its double pixels come from.
        let split = check_split(&pair, 2, 2);
        assert!(split.runs.iter().any(|r| r.rows.end == 257));
        assert!(split
            .runs
            .iter()
            .all(|r| r.rows.end != 256 && r.rows.end != 258));
        assert_eq!(split.lanes, vec![0..split.runs.len()]);
        // Raw modules have no coupled rows: runs of exactly 32 rows.
        let split = check_split(&raw, 1, 3);
        assert!(split.runs.iter().any(|r| r.rows.end == 256));
        // 3 workers: a lane of two (2/3 of the rows: 11 runs of 32) whose runs shrink to 8 rows
        // where its workers meet, and one of one (runs of 32).
        let cuts: Vec<usize> = split.runs.iter().map(|r| r.rows.end).collect();
        assert_eq!(
            cuts,
            [
                32, 64, 96, 128, 152, 164, 172, 176, 180, 188, 200, 224, 256, 288, 320, 352, 384,
                416, 448, 480, 512, 514
            ]
        );
        assert_eq!(split.lanes, [0..16, 16..22]);
        // Two workers: one lane of the whole image, its smallest runs about the middle.
        let sizes: Vec<usize> = check_split(&pair, 2, 2)
            .runs
            .iter()
            .map(|r| r.rows.len())
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), 514);
        assert_eq!(sizes.iter().min(), Some(&MIN_RUN_ROWS));
        assert_eq!((sizes[0], sizes[sizes.len() - 1]), (RUN_ROWS, RUN_ROWS));
        // One worker: nothing to meet, runs of 32.
        assert!(check_split(&quad, 4, 1)
            .runs
            .iter()
            .all(|r| r.rows.len() <= RUN_ROWS + 1));
        // Converted, a cut at 256 or 258 would split a pair (the data row from its gap row).
        assert!(!pair.rows_coupled(171) && pair.rows_coupled(256) && pair.rows_coupled(258));
        assert!(!pair.rows_coupled(257) && !raw.rows_coupled(256));
    }
}
