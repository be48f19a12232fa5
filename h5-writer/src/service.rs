//! The writer service: follows the assembler's ImageMetadata stream (ZMQ SUB), and while a run is
//! active writes each image straight from its ImageBuffer slot into the run's HDF5 file. Commands
//! arrive on a REP socket (see [`crate::command`]). Sockets and the ring are passed in.
//!
//! A run is bounded (`n_images`: completed at that count) or unbounded (written until `stop`, or
//! until its optional `max_images`); either way the file grows one image at a time, so stopping
//! leaves exactly the images written.
//!
//! Before an image counts as written, the slot's sequence is checked again: an image overwritten
//! while it was being written out is replaced by zeros and flagged `LostInBuffer`, never kept as
//! good. A row without pixels (lost, or an id that never came) costs no chunk write
//! ([`ImageFile::write_zero_image`]), so overload degrades gracefully instead of snowballing.
//!
//! **N writers.** A writer is writer `k` of `n` ([`Writer::with_share`]). A start without a deal
//! writes every image in arrival order, as a single writer does. A start with a [`Deal`] writes
//! this writer's share by run position (`common::writer_command`'s module docs): row `r` of the
//! file is the image with id `first_image_id + r * n + k`. On the start it first catches up
//! from the ImageBuffer on the ids of its share it already saw go by (up to
//! [`WriterStatus::latest_image_id`]); a position whose image never came is a row with status 0,
//! its expected id and zero pixels. Ids below the run's range, or of a position already passed,
//! are ignored and counted ([`Writer::ids_ignored`]). The writer must never put an image at a
//! row other than its position's, nor drop a row: row `r` always means position `r * n + k`.

use crate::command::{
    Command, Deal, MasterRequest, Reply, RunContext, RunSummary, WriterStatus, MAX_IMAGES_REACHED,
};
use crate::file::{Compression, FileError, ImageFile, ImageFileSpec, ImageRecord};
use image_buffer::{Expect, ReadError, RingReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use std_daq_common::metrics::Histogram;
use std_daq_common::service::Shutdown;
use std_daq_common::status::StatusBoard;
use std_daq_common::{DetectorConfig, Dtype, ImageMetadata, ImageStatus};

const POLL_MS: i64 = 50;
const MAX_IMAGES_PER_POLL: usize = 32;
/// The most images an unbounded run without `max_images` may hold: HDF5's limit on an extent.
const UNBOUNDED_FILE_IMAGES: u64 = i64::MAX as u64;
/// Default of `--checkpoint-interval-ms`.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// The most rows of a dealt run filled at once, as ids that never came (a jump of the id ahead)
/// or caught up at the start: beyond this an id is ignored (counted in [`Writer::ids_ignored`])
/// and a start refused, since each row costs memory (its record) and this much time.
pub const MAX_ROWS_AT_ONCE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("ZMQ: {0}")]
    Zmq(#[from] zmq::Error),
    #[error("writer index {index} is not below the number of writers {writers}")]
    NoSuchWriter { index: u32, writers: u32 },
}

#[derive(Debug)]
struct Run {
    file: ImageFile,
    summary: RunSummary,
    first_image_at: Option<Instant>,
    last_checkpoint: Instant,
    /// This writer's share when the start carried a deal: rows by run position.
    deal: Option<Deal>,
    /// Rows at which the run ends by itself (`None`: only a stop ends it), and the run's `end`
    /// then.
    target_rows: Option<u64>,
    end_at_target: &'static str,
    /// Started with `await_first_image_id`: nothing is written until `set_first_image_id`.
    awaiting_first_image_id: bool,
    /// Every service's counters at the start, for the file's `run_counters` (crate::counters).
    counters: Option<crate::counters::RunCounters>,
}

/// What one row of the file became.
#[derive(Debug, Clone, Copy)]
enum RowOutcome {
    /// The image, with its status and missing packets (from its ImageMetadata).
    Image { status: u16, missing_packets: u32 },
    /// Overwritten in the ImageBuffer (or torn) before it was written out: zeros, status 4.
    Lost { missing_packets: u32 },
    /// Its id never came: zeros, status 0.
    NeverCame,
}

/// Where a row's ImageMetadata comes from.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    /// The image stream: the ring's slot must still hold that image.
    Stream(&'a ImageMetadata),
    /// Catch-up: the ring's slot, if it still holds the id (its ImageMetadata comes with it).
    Ring,
}

/// Writer state without sockets.
#[derive(Debug)]
pub struct Writer {
    detector_name: String,
    height: u32,
    width: u32,
    dtype: Dtype,
    /// The detector config as JSON, stored in every file.
    config_json: String,
    /// How image chunks are stored (set with [`Writer::with_compression`]).
    compression: Compression,
    /// The NXmx groups of every file (docs/nxmx.md).
    nxmx: Option<std_daq_common::nxmx::Nxmx>,
    /// Their `pixel_mask`, made when a run starts from the calibration then in use.
    pixel_masks: crate::pixel_mask::PixelMasks,
    /// The config, for a request's NXmx values over its own.
    detector: DetectorConfig,
    /// How often a run's file is made crash-consistent ([`ImageFile::checkpoint`]).
    checkpoint_interval: Duration,
    ring: RingReader<ImageMetadata>,
    run: Option<Run>,
    connected: bool,
    last_run: Option<RunSummary>,
    runs_completed: u64,
    /// Messages on the image stream that were not valid ImageMetadata for this detector.
    pub invalid_messages: u64,
    /// From an image's ImageMetadata received (≈ published: ipc takes microseconds) to the
    /// image written into the file.
    pub latency: Arc<Histogram>,
    /// Names the `.part` of the run in progress, so a restarted writer can clear the SWMR flags
    /// of the file its killed predecessor left ([`Writer::with_writing_marker`]).
    writing_marker: Option<PathBuf>,
    /// This writer's index and how many writers share a run ([`Writer::with_share`]).
    writer_index: u32,
    writers: u32,
    /// The id of the last valid ImageMetadata on the stream, running or idle.
    latest_image_id: Option<u64>,
    /// Ids on the stream a dealt run ignored: below its `first_image_id`, of a position already
    /// passed (a jump back), or more than [`MAX_ROWS_AT_ONCE`] rows ahead.
    pub ids_ignored: u64,
}

impl Writer {
    pub fn new(cfg: &DetectorConfig, ring: RingReader<ImageMetadata>) -> Self {
        Writer {
            detector_name: cfg.detector_name.clone(),
            height: cfg.image_pixel_height,
            width: cfg.image_pixel_width,
            dtype: cfg.image_dtype(),
            config_json: cfg.raw.to_string(),
            compression: Compression::None,
            nxmx: cfg
                .nxmx()
                .map_err(|e| tracing::error!("no NXmx groups in the files: {e}"))
                .ok(),
            pixel_masks: Default::default(),
            detector: cfg.clone(),
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            ring,
            run: None,
            connected: false,
            last_run: None,
            runs_completed: 0,
            invalid_messages: 0,
            latency: Histogram::new(
                "image_write_latency_seconds",
                "ImageMetadata received -> image written into the file",
            ),
            writing_marker: None,
            writer_index: 0,
            writers: 1,
            latest_image_id: None,
            ids_ignored: 0,
        }
    }

    /// This is writer `index` of `writers` (`--writer-index`, the config's `number_of_writers`):
    /// it accepts only deals for that share, and says so in its status.
    pub fn with_share(mut self, index: u32, writers: u32) -> Result<Self, WriterError> {
        if index >= writers {
            return Err(WriterError::NoSuchWriter { index, writers });
        }
        self.writer_index = index;
        self.writers = writers;
        Ok(self)
    }

    /// Keeps a marker file at `marker` naming the `.part` while a run is in progress. If one is
    /// there already, a writer died during a run: its `.part` keeps HDF5's "open for write"
    /// flags (only SWMR readers open it), which this clears so that every reader opens the file
    /// at its last checkpoint.
    pub fn with_writing_marker(mut self, marker: PathBuf) -> Self {
        if let Ok(left) = std::fs::read_to_string(&marker) {
            let left = Path::new(left.trim_end());
            if left.exists() {
                match crate::file::clear_status_flags(left) {
                    Ok(()) => tracing::info!(
                        file = %left.display(),
                        "cleared the open-for-write flags of the file a writer left when it died; \
                         it opens in any reader at its last checkpoint"
                    ),
                    Err(e) => {
                        tracing::warn!("{e}; open it with h5py swmr=True or run `h5clear -s` on it")
                    }
                }
            }
            let _ = std::fs::remove_file(&marker);
        }
        self.writing_marker = Some(marker);
        self
    }

    /// Stores images of later runs with `compression` (compressed by the writer itself).
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Checkpoints a run's file at most this often (and whenever the stream pauses), so a
    /// writer killed mid-run leaves a `.part` file readers open, holding exactly the images of
    /// its last checkpoint (`images_checkpointed` in the status).
    pub fn with_checkpoint_interval(mut self, interval: Duration) -> Self {
        self.checkpoint_interval = interval;
        self
    }

    /// Checkpoints the current run's file if the interval has passed (called after each image
    /// and from the idle loop). A checkpoint that fails ends the run as failed.
    pub fn checkpoint_if_due(&mut self) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        if run.last_checkpoint.elapsed() < self.checkpoint_interval
            || run.summary.images_checkpointed == run.summary.images_written
        {
            return;
        }
        run.last_checkpoint = Instant::now();
        match run.file.checkpoint() {
            Ok(n) => run.summary.images_checkpointed = n,
            Err(e) => {
                tracing::error!("{e}");
                self.finish(&format!("failed: {e}"));
            }
        }
    }

    pub fn handle_command(&mut self, cmd: Command) -> Reply {
        match cmd {
            Command::Start {
                output_file,
                n_images,
                request_id,
                context,
            } => self.start(&output_file, Some(n_images), None, request_id, &context),
            Command::StartUnbounded {
                output_file,
                max_images,
                request_id,
                context,
            } => self.start(&output_file, None, max_images, request_id, &context),
            Command::Stop { reason } => match self.finish(reason.as_deref().unwrap_or("stopped")) {
                Some(run) => Reply {
                    ok: true,
                    run: Some(run),
                    ..Reply::default()
                },
                None => Reply::error("no run is in progress"),
            },
            Command::Status => Reply {
                ok: true,
                status: Some(self.status()),
                ..Reply::default()
            },
            Command::CancelIfEmpty { reason } => {
                self.cancel_if_empty(reason.as_deref().unwrap_or("cancelled before any image"))
            }
            Command::MakeMaster(request) => self.make_master(&request),
            Command::SetFirstImageId { first_image_id } => self.set_first_image_id(first_image_id),
        }
    }

    /// Ends the current run if it has no image yet and removes its partial file (nothing of the
    /// run stays on disk); a run with images goes on untouched.
    fn cancel_if_empty(&mut self, reason: &str) -> Reply {
        let Some(run) = self.run.take() else {
            return Reply::error("no run is in progress");
        };
        if run.summary.images_written > 0 {
            let message = format!(
                "the run has written {} images already: it goes on",
                run.summary.images_written
            );
            self.run = Some(run);
            return Reply::error(message);
        }
        let Run {
            file, mut summary, ..
        } = run;
        let partial = file.path().to_path_buf();
        // Nothing in it is worth a flush: the file goes.
        file.abandon();
        summary.images_checkpointed = 0;
        summary.end = match std::fs::remove_file(&partial) {
            Ok(()) => format!(
                "cancelled: {reason}; nothing was written ({} was removed, {} was never created)",
                partial.display(),
                summary.output_file
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!(
                "cancelled: {reason}; nothing was written ({} was never created)",
                summary.output_file
            ),
            Err(e) => format!(
                "cancelled: {reason}; no image was written, but removing {} failed: {e}",
                partial.display()
            ),
        };
        tracing::info!(
            output_file = summary.output_file,
            end = summary.end,
            "run cancelled"
        );
        self.runs_completed += 1;
        self.last_run = Some(summary.clone());
        Reply {
            ok: true,
            run: Some(summary),
            ..Reply::default()
        }
    }

    /// std-assembler restarted and created a new ImageBuffer under the same name: map the new
    /// one (the old mapping would never see its images).
    pub fn reattach_if_restarted(&mut self) {
        if !self.ring.is_replaced() {
            return;
        }
        let expect = Expect {
            n_slots: Some(self.ring.n_slots()),
            slot_bytes: Some(self.ring.slot_bytes()),
        };
        if let Ok(new) = RingReader::attach(self.ring.name(), expect) {
            tracing::info!(
                buffer = self.ring.name(),
                "assembler restarted: ImageBuffer re-attached"
            );
            self.ring = new;
        }
    }

    /// Shows the writer's state in the service's Redis status hash.
    pub fn publish_status(&self, board: &StatusBoard) {
        let status = self.status();
        board.set("state", &status.state);
        board.set("runs_completed", status.runs_completed);
        board.set("invalid_messages", self.invalid_messages);
        board.set("connected", u8::from(status.connected));
        board.set("writer_index", status.writer_index);
        board.set("writers", status.writers);
        if let Some(id) = status.latest_image_id {
            board.set("latest_image_id", id);
        }
        board.set("ids_ignored", self.ids_ignored);
        if let Some(run) = status.current.as_ref().or(status.last_run.as_ref()) {
            board.set("output_file", &run.output_file);
            board.set("images_written", run.images_written);
            board.set("images_checkpointed", run.images_checkpointed);
            // An unbounded run has no count to reach.
            match run.n_images {
                Some(n) => board.set("n_images", n),
                None => board.set("n_images", "unbounded"),
            }
            board.set("last_end", &run.end);
        }
    }

    pub fn status(&self) -> WriterStatus {
        WriterStatus {
            state: if self.run.is_some() {
                "writing"
            } else {
                "idle"
            }
            .into(),
            connected: self.connected,
            current: self.run.as_ref().map(|r| r.summary.clone()),
            last_run: self.last_run.clone(),
            runs_completed: self.runs_completed,
            latest_image_id: self.latest_image_id,
            writer_index: self.writer_index,
            writers: self.writers,
        }
    }

    /// Starts a run: `n_images` `None` is unbounded (until `stop`, or `max_images` if given).
    fn start(
        &mut self,
        output_file: &str,
        n_images: Option<u64>,
        max_images: Option<u64>,
        request_id: Option<String>,
        context: &RunContext,
    ) -> Reply {
        if let Some(run) = &self.run {
            let of = match run.summary.n_images {
                Some(n) => format!("of {n} "),
                None => "of an unbounded run's ".into(),
            };
            return Reply::error(format!(
                "a run is in progress: {} ({} {of}images written)",
                run.summary.output_file, run.summary.images_written
            ));
        }
        let path = Path::new(output_file);
        if !path.is_absolute() {
            return Reply::error(format!(
                "output_file {output_file:?} must be an absolute path"
            ));
        }
        if path.extension().and_then(|e| e.to_str()) != Some("h5") {
            return Reply::error(format!("output_file {output_file:?} must end in .h5"));
        }
        if n_images == Some(0) {
            return Reply::error("n_images must be at least 1");
        }
        // Only an unbounded run has a max_images (Command keeps the two apart).
        let max_images = if n_images.is_none() { max_images } else { None };
        if max_images == Some(0) {
            return Reply::error("max_images must be at least 1");
        }
        if !path.parent().is_some_and(Path::is_dir) {
            return Reply::error(format!(
                "the folder of output_file {output_file:?} does not exist"
            ));
        }
        if path.exists() {
            return Reply::error(format!("output_file {output_file:?} already exists"));
        }
        let limit = n_images.or(max_images);
        let (target_rows, end_at_target) = match (context.deal, n_images) {
            (None, Some(_)) => (limit, "completed"),
            (None, None) => (limit, MAX_IMAGES_REACHED),
            (Some(deal), _) => {
                if let Err(message) = self.check_deal(&deal) {
                    return Reply::error(message);
                }
                let ends = if n_images.is_some() {
                    "completed"
                } else {
                    MAX_IMAGES_REACHED
                };
                (limit.map(|n| deal.rows_of(n)), ends)
            }
        };
        let awaiting = context.deal.is_some_and(|d| d.await_first_image_id);
        let catch_up_rows = match context.deal {
            Some(deal) if !awaiting => self.catch_up_rows(&deal, target_rows),
            _ => 0,
        };
        if catch_up_rows > MAX_ROWS_AT_ONCE {
            return Reply::error(format!(
                "first_image_id {} is too far behind the newest image {} on the stream: {} rows \
                 to catch up, more than {MAX_ROWS_AT_ONCE}",
                context.deal.map_or(0, |d| d.first_image_id),
                self.latest_image_id.unwrap_or(0),
                catch_up_rows
            ));
        }
        let nxmx = match self.run_nxmx(context.nxmx.as_ref()) {
            Ok(n) => n,
            Err(e) => return Reply::error(e),
        };
        let partial = partial_path(path);
        let spec = ImageFileSpec {
            detector_name: self.detector_name.clone(),
            // The file grows image by image whatever this is; it only bounds the index.
            n_images: target_rows.unwrap_or(UNBOUNDED_FILE_IMAGES),
            height: self.height,
            width: self.width,
            dtype: self.dtype,
            compression: self.compression,
            n_modules: self.detector.n_modules,
        };
        match ImageFile::create_with_nxmx(&partial, &spec, nxmx.as_ref()) {
            Ok(mut file) => {
                let metadata = context
                    .metadata
                    .as_ref()
                    .map(|m| serde_json::Value::Object(m.clone()).to_string());
                let mut attributes = vec![
                    ("detector_config", self.config_json.as_str()),
                    ("output_file", output_file),
                    ("request_id", request_id.as_deref().unwrap_or("")),
                ];
                // Only when given: files of runs without them look as before.
                if let Some(m) = metadata.as_deref() {
                    attributes.push(("metadata", m));
                }
                if let Some(t) = context.traceparent.as_deref() {
                    attributes.push(("traceparent", t));
                }
                for (name, value) in attributes {
                    if let Err(e) = file.set_file_attribute(name, value) {
                        tracing::warn!("{e}");
                    }
                }
                // Readers may open the .part from here on (h5py swmr=True).
                if let Err(e) = file.start_swmr() {
                    tracing::warn!("{e}; the file cannot be read until the run ends");
                }
                if let Some(marker) = &self.writing_marker {
                    let text = partial.as_os_str().as_encoded_bytes();
                    if let Err(e) = std::fs::write(marker, text) {
                        tracing::warn!(marker = %marker.display(), "cannot write the marker: {e}");
                    }
                }
                tracing::info!(output_file, n_images, max_images, deal = ?context.deal, "run started");
                self.run = Some(Run {
                    file,
                    summary: RunSummary {
                        request_id,
                        output_file: output_file.to_string(),
                        n_images,
                        max_images,
                        partial_file: Some(partial.display().to_string()),
                        deal: context.deal,
                        ..RunSummary::default()
                    },
                    first_image_at: None,
                    last_checkpoint: Instant::now(),
                    deal: context.deal,
                    target_rows,
                    end_at_target,
                    awaiting_first_image_id: awaiting,
                    counters: crate::counters::RunCounters::start(&self.detector),
                });
                // An empty share ends at once, awaiting or not.
                if let Some(deal) = context.deal {
                    self.catch_up(&deal, catch_up_rows);
                }
                match &self.run {
                    Some(_) => Reply {
                        ok: true,
                        ..Reply::default()
                    },
                    // Ended at once: an empty share, every row caught up, or a failed write.
                    None => {
                        let run = self.last_run.clone();
                        let failed = run.as_ref().filter(|r| r.end.starts_with("failed"));
                        match failed {
                            Some(r) => Reply {
                                run: run.clone(),
                                ..Reply::error(r.end.clone())
                            },
                            None => Reply {
                                ok: true,
                                run,
                                ..Reply::default()
                            },
                        }
                    }
                }
            }
            Err(e) => Reply::error(e.to_string()),
        }
    }

    /// `set_first_image_id` of a run started with `await_first_image_id`: from now on rows by
    /// position, the ones already passed taken from the ImageBuffer.
    fn set_first_image_id(&mut self, first_image_id: u64) -> Reply {
        let Some(run) = self.run.as_mut() else {
            return Reply::error("no run is in progress");
        };
        let Some(mut deal) = run.deal else {
            return Reply::error("the run in progress is not shared with other writers");
        };
        if !run.awaiting_first_image_id {
            if deal.first_image_id == first_image_id {
                return Reply {
                    ok: true,
                    ..Reply::default()
                };
            }
            return Reply::error(format!(
                "the run's first_image_id is {} already",
                deal.first_image_id
            ));
        }
        deal.first_image_id = first_image_id;
        deal.await_first_image_id = false;
        let target_rows = run.target_rows;
        let rows = self.catch_up_rows(&deal, target_rows);
        if rows > MAX_ROWS_AT_ONCE {
            return Reply::error(format!(
                "first_image_id {first_image_id} is too far behind the newest image {} on the                  stream: {rows} rows to catch up, more than {MAX_ROWS_AT_ONCE}",
                self.latest_image_id.unwrap_or(0)
            ));
        }
        let Some(run) = self.run.as_mut() else {
            return Reply::error("no run is in progress");
        };
        run.deal = Some(deal);
        run.summary.deal = Some(deal);
        run.awaiting_first_image_id = false;
        tracing::info!(first_image_id, catch_up_rows = rows, "first image id set");
        self.catch_up(&deal, rows);
        Reply {
            ok: true,
            run: self.run.as_ref().map(|r| r.summary.clone()),
            ..Reply::default()
        }
    }

    /// The NXmx values of a file made now: the config's, or `over` the request's, with the
    /// current `pixel_mask`. The error names the request's bad value.
    fn run_nxmx(
        &mut self,
        over: Option<&std_daq_common::nxmx::NxmxRaw>,
    ) -> Result<Option<std_daq_common::nxmx::Nxmx>, String> {
        let nxmx = match over {
            None => self.nxmx.clone(),
            Some(over) => Some(
                self.detector
                    .nxmx_with(over)
                    .map_err(|e| format!("the request's {e}"))?,
            ),
        };
        Ok(nxmx.map(|mut n| {
            n.pixel_mask = Some(self.pixel_masks.current(&self.detector));
            n
        }))
    }

    /// `make_master`: the master file over the run's writers' files (crate::master).
    fn make_master(&mut self, request: &MasterRequest) -> Reply {
        let nxmx = match self.run_nxmx(request.nxmx.as_ref()) {
            Ok(n) => n,
            Err(e) => return Reply::error(e),
        };
        let spec = ImageFileSpec {
            detector_name: self.detector_name.clone(),
            n_images: request.n_images.unwrap_or(UNBOUNDED_FILE_IMAGES),
            height: self.height,
            width: self.width,
            dtype: self.dtype,
            compression: self.compression,
            n_modules: self.detector.n_modules,
        };
        match crate::master::write_master(request, &spec, nxmx.as_ref(), &self.config_json) {
            Ok(master) => {
                tracing::info!(
                    output_file = master.output_file,
                    images = master.images,
                    left_out = master.images_left_out,
                    "master file written"
                );
                Reply {
                    ok: true,
                    master: Some(master),
                    ..Reply::default()
                }
            }
            Err(e) => {
                tracing::error!("{e}");
                Reply::error(e.to_string())
            }
        }
    }

    /// Why this writer refuses `deal`, if it does.
    fn check_deal(&self, deal: &Deal) -> Result<(), String> {
        if deal.writers < 2 {
            return Err(format!(
                "a deal shares a run between 2 or more writers, not {}: start without a deal to \
                 write every image",
                deal.writers
            ));
        }
        if deal.writer != self.writer_index || deal.writers != self.writers {
            return Err(format!(
                "the deal is for writer {} of {}, but this is writer {} of {} (--writer-index, \
                 number_of_writers)",
                deal.writer, deal.writers, self.writer_index, self.writers
            ));
        }
        Ok(())
    }

    /// Rows of `deal`'s share whose ids were already on the stream (up to `latest_image_id`),
    /// at most `target_rows`.
    fn catch_up_rows(&self, deal: &Deal, target_rows: Option<u64>) -> u64 {
        let seen = self
            .latest_image_id
            .and_then(|latest| latest.checked_sub(deal.first_image_id))
            .map_or(0, |p| deal.rows_of(p.saturating_add(1)));
        target_rows.map_or(seen, |t| seen.min(t))
    }

    /// Writes the first `rows` rows of the new run from the ImageBuffer (their ids went by
    /// before the start came), then ends the run if that is all it has.
    fn catch_up(&mut self, deal: &Deal, rows: u64) {
        for row in 0..rows {
            let id = id_of_row(deal, row);
            if !self.write_row(id, Source::Ring, None) {
                return;
            }
        }
        self.end_if_done();
    }

    /// Writes the next row of the run, the image with id `id`, and counts it. False if the run
    /// failed (and was ended).
    fn write_row(&mut self, id: u64, source: Source<'_>, received: Option<Instant>) -> bool {
        let Some(run) = self.run.as_mut() else {
            return false;
        };
        let index = run.summary.images_written;
        match write_from_ring(&mut run.file, &self.ring, index, id, source) {
            Ok(outcome) => {
                run.first_image_at.get_or_insert_with(Instant::now);
                if let Some(received) = received {
                    self.latency.observe(received.elapsed());
                }
                count_row(&mut run.summary, id, &outcome, run.file.image_bytes());
                true
            }
            Err(e) => {
                tracing::error!("{e}");
                self.finish(&format!("failed: {e}"));
                false
            }
        }
    }

    /// A row for the id `id` of this writer's share that never came: zeros, status 0.
    fn write_never_came(&mut self, id: u64) -> bool {
        let Some(run) = self.run.as_mut() else {
            return false;
        };
        let index = run.summary.images_written;
        let record = ImageRecord {
            image_id: id,
            ..ImageRecord::default()
        };
        match run.file.write_zero_image(index, record) {
            Ok(()) => {
                count_row(
                    &mut run.summary,
                    id,
                    &RowOutcome::NeverCame,
                    run.file.image_bytes(),
                );
                true
            }
            Err(e) => {
                tracing::error!("{e}");
                self.finish(&format!("failed: {e}"));
                false
            }
        }
    }

    /// Ends the run if it has all its rows; true if it ended.
    fn end_if_done(&mut self) -> bool {
        let Some(run) = &self.run else {
            return true;
        };
        if run.target_rows == Some(run.summary.images_written) {
            let end = run.end_at_target;
            self.finish(end);
            return true;
        }
        false
    }

    /// The stream's image `meta` for a dealt run: rows for the positions of this writer's share
    /// before it that never came, then its own row if the position is this writer's.
    fn on_dealt_image(&mut self, meta: &ImageMetadata, deal: Deal, received: Instant) {
        let Some(run) = self.run.as_ref() else {
            return;
        };
        let Some(position) = meta.image_id.checked_sub(deal.first_image_id) else {
            self.ids_ignored += 1;
            return;
        };
        let next = run.summary.images_written;
        // This writer's positions below `position`: rows 0..before.
        let before = deal.rows_of(position);
        let mine = position % u64::from(deal.writers) == u64::from(deal.writer);
        // Rows that never came, up to this position or the run's end.
        let gap_end = run.target_rows.map_or(before, |t| before.min(t));
        if before < next || gap_end.saturating_sub(next) > MAX_ROWS_AT_ONCE {
            // A position already passed (a jump back), or too far ahead to fill at once.
            self.ids_ignored += 1;
            return;
        }
        for row in next..gap_end {
            if !self.write_never_came(id_of_row(&deal, row)) {
                return;
            }
        }
        if self.end_if_done() {
            return;
        }
        if mine && !self.write_row(meta.image_id, Source::Stream(meta), Some(received)) {
            return;
        }
        if !self.end_if_done() {
            self.checkpoint_if_due();
        }
    }

    /// Takes one message from the image stream (empty = heartbeat).
    pub fn on_message(&mut self, bytes: &[u8]) {
        let received = Instant::now();
        self.connected = true;
        if bytes.is_empty() {
            return;
        }
        let meta = match ImageMetadata::from_bytes(bytes) {
            Ok(m) if self.fits(&m) => m,
            _ => {
                self.invalid_messages += 1;
                return;
            }
        };
        self.latest_image_id = Some(meta.image_id);
        let Some(run) = self.run.as_mut() else {
            return;
        };
        if run.awaiting_first_image_id {
            run.summary
                .first_image_after_start
                .get_or_insert(meta.image_id);
            return;
        }
        if let Some(deal) = run.deal {
            self.on_dealt_image(&meta, deal, received);
            return;
        }
        // Every image in arrival order.
        let s = &mut run.summary;
        if let Some(last) = s
            .last_image_id
            .filter(|last| meta.image_id > last.saturating_add(1))
        {
            s.image_ids_skipped = s.image_ids_skipped.saturating_add(meta.image_id - last - 1);
        }
        if self.write_row(meta.image_id, Source::Stream(&meta), Some(received))
            && !self.end_if_done()
        {
            self.checkpoint_if_due();
        }
    }

    /// Whether `m` is an image of this detector (geometry and type).
    fn fits(&self, m: &ImageMetadata) -> bool {
        m.height == self.height && m.width == self.width && m.dtype() == self.dtype
    }

    /// Closes the current run's file, if any, and returns its summary.
    /// A file that closed cleanly (completed, stopped or killed) is renamed from its partial
    /// name to `output_file`; after a failure the partial file stays for inspection.
    pub fn finish(&mut self, end: &str) -> Option<RunSummary> {
        let run = self.run.take()?;
        let mut summary = run.summary;
        summary.end = end.to_string();
        let partial = run.file.path().to_path_buf();
        let output = Path::new(&summary.output_file).to_path_buf();
        let mut file = run.file;
        summary.seconds = run
            .first_image_at
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        summary.images_checkpointed = summary.images_written;
        if let Ok(json) = serde_json::to_string(&summary) {
            file.set_closing_attribute("run_summary", &json);
        }
        if let Some(counters) = run.counters {
            file.set_closing_attribute("run_counters", &counters.finish().to_string());
        }
        // After a failed write nothing more is written: the .part stays at its last checkpoint.
        let closed = if end.starts_with("failed") {
            Ok(file.abandon())
        } else {
            file.close()
        };
        if let Some(marker) = &self.writing_marker {
            let _ = std::fs::remove_file(marker);
        }
        if let Ok(n) = closed {
            summary.images_checkpointed = n;
        }
        match closed {
            Err(e) => {
                tracing::error!("closing {}: {e}", partial.display());
                summary.end = format!("failed: closing the file: {e}");
            }
            Ok(n) if end.starts_with("failed") => {
                summary.end = format!(
                    "{end}; {} holds the {n} images of its last checkpoint",
                    partial.display()
                );
            }
            // Never replace a file that appeared under the requested name meanwhile.
            Ok(_) if output.exists() => {
                summary.end = format!(
                    "failed: {} appeared while writing; the data is in {}",
                    output.display(),
                    partial.display()
                );
            }
            Ok(_) => {
                if let Err(e) = std::fs::rename(&partial, &output) {
                    summary.end = format!(
                        "failed: renaming {} to {}: {e}",
                        partial.display(),
                        output.display()
                    );
                }
            }
        }
        summary.seconds = run
            .first_image_at
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        tracing::info!(
            output_file = summary.output_file,
            images = summary.images_written,
            good = summary.images_good,
            flagged = summary.images_flagged,
            missing_packets = summary.missing_packets,
            lost_in_buffer = summary.images_lost_in_buffer,
            end = summary.end,
            "run finished"
        );
        self.runs_completed += 1;
        self.last_run = Some(summary.clone());
        Some(summary)
    }
}

/// The id of row `row` of `deal`'s share: `first_image_id + row * writers + writer`.
fn id_of_row(deal: &Deal, row: u64) -> u64 {
    row.saturating_mul(u64::from(deal.writers))
        .saturating_add(u64::from(deal.writer))
        .saturating_add(deal.first_image_id)
}

/// Writes image `id` from its ImageBuffer slot as row `index`. An image no longer in its slot
/// (or torn while written out) becomes zeros flagged lost in buffer; in a catch-up ([`Source::Ring`])
/// a slot that never held it (empty, or an older image) means the id never came.
fn write_from_ring(
    file: &mut ImageFile,
    ring: &RingReader<ImageMetadata>,
    index: u64,
    id: u64,
    source: Source<'_>,
) -> Result<RowOutcome, FileError> {
    let image_bytes = file.image_bytes();
    let (height, width) = (file.spec().height, file.spec().width);
    let dtype = file.spec().dtype;
    let read = ring.read(id, |slot_meta, data| {
        let meta = match source {
            Source::Stream(m) => m,
            Source::Ring => slot_meta,
        };
        if meta.image_id != id
            || meta.height != height
            || meta.width != width
            || meta.dtype() != dtype
        {
            // Not an image of this detector in the slot: keep nothing of it.
            return Ok(None);
        }
        let record = ImageRecord::from(meta);
        match data.get(..image_bytes) {
            Some(image) => file.write_image(index, image, record)?,
            None => file.write_zero_image(index, record.without_checksum())?,
        }
        Ok(Some(RowOutcome::Image {
            status: meta.status,
            missing_packets: meta.missing_packets,
        }))
    });
    let lost = |missing_packets| RowOutcome::Lost { missing_packets };
    let outcome = match read {
        Ok(Ok(Some(image))) => return Ok(image),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => lost(0),
        Err(ReadError::Overwritten { found_image_id }) if found_image_id < id => match source {
            Source::Ring => RowOutcome::NeverCame,
            Source::Stream(m) => lost(m.missing_packets),
        },
        Err(ReadError::NotPresent | ReadError::InvalidImageId)
            if matches!(source, Source::Ring) =>
        {
            RowOutcome::NeverCame
        }
        Err(_) => match source {
            Source::Stream(m) => lost(m.missing_packets),
            Source::Ring => lost(0),
        },
    };
    // Zeros: no chunk write unless the image's chunk went in before the slot changed.
    let record = match (outcome, source) {
        (RowOutcome::NeverCame, _) => ImageRecord {
            image_id: id,
            ..ImageRecord::default()
        },
        (_, Source::Stream(m)) => ImageRecord {
            status: ImageStatus::LostInBuffer as u16,
            ..ImageRecord::from(m).without_checksum()
        },
        (_, Source::Ring) => ImageRecord {
            image_id: id,
            status: ImageStatus::LostInBuffer as u16,
            ..ImageRecord::default()
        },
    };
    file.write_zero_image(index, record)?;
    Ok(outcome)
}

/// Counts one row written into the run's summary.
fn count_row(s: &mut RunSummary, id: u64, outcome: &RowOutcome, image_bytes: usize) {
    s.images_written += 1;
    s.bytes_written += image_bytes as u64;
    s.first_image_id.get_or_insert(id);
    s.last_image_id = Some(id);
    match outcome {
        RowOutcome::Image {
            status,
            missing_packets,
        } => {
            s.missing_packets += u64::from(*missing_packets);
            if *status == ImageStatus::Good as u16 {
                s.images_good += 1;
            } else {
                s.images_flagged += 1;
            }
        }
        RowOutcome::Lost { missing_packets } => {
            s.missing_packets += u64::from(*missing_packets);
            s.images_lost_in_buffer += 1;
            s.images_flagged += 1;
        }
        RowOutcome::NeverCame => {
            s.image_ids_skipped += 1;
            s.images_flagged += 1;
        }
    }
}

/// Where a run's file is written until it is complete: `<output_file>.part`.
pub use std_daq_common::writer_command::partial_path;

/// Runs until shutdown; a run still open then is closed with what it has.
pub fn run(
    writer: &mut Writer,
    sub: &zmq::Socket,
    rep: &zmq::Socket,
    board: &StatusBoard,
    shutdown: &Shutdown,
) -> Result<(), WriterError> {
    let mut last_status = Instant::now();
    let mut buf = [0u8; std_daq_common::messages::RECV_BUFFER_BYTES];
    let mut last_invalid_report = 0;
    let mut last_report = Instant::now();
    let (mut last_ignored_report, mut last_ignored_at) = (0, Instant::now());
    while !shutdown.is_triggered() {
        let (images, command) = {
            let mut items = [sub.as_poll_item(zmq::POLLIN), rep.as_poll_item(zmq::POLLIN)];
            poll_ignoring_signals(&mut items, POLL_MS)?;
            (items[0].is_readable(), items[1].is_readable())
        };
        if images {
            // Bounded, so that commands (status, stop) are answered while images stream in.
            for _ in 0..MAX_IMAGES_PER_POLL {
                match sub.recv_into(&mut buf, zmq::DONTWAIT) {
                    Ok(n) if n <= buf.len() => writer.on_message(&buf[..n]),
                    Ok(_) => writer.invalid_messages += 1,
                    Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if command {
            let request = rep.recv_bytes(0)?;
            let reply = match serde_json::from_slice::<Command>(&request) {
                Ok(cmd) => writer.handle_command(cmd),
                Err(e) => Reply::error(format!("invalid command: {e}")),
            };
            let body = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
            rep.send(body, 0)?;
        }
        writer.checkpoint_if_due();
        if last_status.elapsed() >= Duration::from_secs(1) {
            writer.publish_status(board);
            writer.reattach_if_restarted();
            last_status = Instant::now();
        }
        if writer.invalid_messages != last_invalid_report
            && last_report.elapsed() >= Duration::from_secs(5)
        {
            tracing::warn!(
                count = writer.invalid_messages,
                "messages on the image stream that are not this detector's ImageMetadata"
            );
            last_invalid_report = writer.invalid_messages;
            last_report = Instant::now();
        }
        if writer.ids_ignored != last_ignored_report
            && last_ignored_at.elapsed() >= Duration::from_secs(5)
        {
            tracing::warn!(
                count = writer.ids_ignored,
                "image ids a dealt run ignored: below its first_image_id, a jump back, or too \
                 far ahead"
            );
            last_ignored_report = writer.ids_ignored;
            last_ignored_at = Instant::now();
        }
    }
    writer.finish("stopped: the writer was shut down");
    Ok(())
}

/// `zmq::poll`, where a signal arriving (shutdown) counts as "nothing ready".
fn poll_ignoring_signals(
    items: &mut [zmq::PollItem<'_>],
    timeout_ms: i64,
) -> Result<(), zmq::Error> {
    match zmq::poll(items, timeout_ms) {
        Ok(_) | Err(zmq::Error::EINTR) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image_buffer::{Expect, RingOwner};
    use std_daq_common::messages::IMAGE_METADATA_VERSION;

    const ONE_MODULE: &str = r#"{"detector_name":"wtest","detector_type":"jungfrau-raw",
        "n_modules":1,"bit_depth":16,"image_pixel_height":512,"image_pixel_width":1024,
        "start_udp_port":50000,"module_positions":{"0":[0,0,1023,511]}}"#;

    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn meta(cfg: &DetectorConfig, image_id: u64) -> ImageMetadata {
        ImageMetadata {
            image_id,
            data_bytes: cfg.image_bytes() as u64,
            height: cfg.image_pixel_height,
            width: cfg.image_pixel_width,
            n_modules: 1,
            dtype: Dtype::Uint16 as u16,
            status: ImageStatus::Good as u16,
            version: IMAGE_METADATA_VERSION,
            ..bytemuck::Zeroable::zeroed()
        }
    }

    fn publish(ring: &mut RingOwner<ImageMetadata>, cfg: &DetectorConfig, image_id: u64) {
        let mut slot = ring.begin_write(image_id).unwrap();
        slot.data_mut().fill(image_id as u8 + 1);
        *slot.meta_mut() = meta(cfg, image_id);
        slot.commit();
    }

    /// A one-module detector, its ImageBuffer of `slots` and a writer with a run of `n_images`
    /// started into `<tmp>/<tag>-<pid>/run.h5`: (config, ring, writer, dir, file).
    fn started_run(
        tag: &str,
        slots: u64,
        n_images: u64,
    ) -> (
        DetectorConfig,
        RingOwner<ImageMetadata>,
        Writer,
        std::path::PathBuf,
        std::path::PathBuf,
    ) {
        let cfg = DetectorConfig::from_json_str(ONE_MODULE, "test").unwrap();
        let name = format!("std-daq.{tag}-{}.image", std::process::id());
        let ring = RingOwner::create(&name, slots, cfg.image_bytes() as u64).unwrap();
        let reader = RingReader::attach(&name, Expect::default()).unwrap();
        let mut writer = Writer::new(&cfg, reader);
        let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("run.h5");
        let reply = writer.handle_command(Command::Start {
            output_file: file.display().to_string(),
            n_images,
            request_id: None,
            context: RunContext {
                metadata: serde_json::json!({"dcid": 7, "scan": "s1"})
                    .as_object()
                    .cloned(),
                traceparent: Some(TRACEPARENT.into()),
                nxmx: None,
                deal: None,
            },
        });
        assert!(reply.ok, "{reply:?}");
        (cfg, ring, writer, dir, file)
    }

    /// The writer is told about image 0 only after the ring (2 slots) has moved on to image 2:
    /// the file must hold zeros flagged lost_in_buffer for it, never image 2's pixels.
    #[test]
    fn an_overwritten_image_is_zeroed_and_flagged_never_written_as_good() {
        let (cfg, mut ring, mut writer, dir, file) = started_run("wtest", 2, 3);

        for id in 0..3 {
            publish(&mut ring, &cfg, id);
        }
        for id in 0..3 {
            writer.on_message(meta(&cfg, id).as_bytes());
        }
        let run = writer.status().last_run.unwrap();
        assert_eq!(run.end, "completed");
        assert_eq!(run.images_written, 3);
        assert_eq!(run.images_lost_in_buffer, 1);
        assert_eq!(run.images_good, 2);

        assert!(
            !partial_path(&file).exists(),
            "the partial file was renamed"
        );
        let f = hdf5::File::open(&file).unwrap();
        let attr = |loc: &hdf5::Location, name: &str| -> String {
            let v: hdf5::types::VarLenUnicode = loc.attr(name).unwrap().read_scalar().unwrap();
            v.as_str().to_string()
        };
        assert_eq!(attr(&f, "NX_class"), "NXroot");
        assert_eq!(attr(&f.group("wtest").unwrap(), "NX_class"), "NXdata");
        assert_eq!(attr(&f.group("wtest").unwrap(), "signal"), "data");
        assert!(attr(&f, "detector_config").contains("\"detector_name\":\"wtest\""));
        assert!(attr(&f, "software").starts_with("std-daq "));
        assert!(attr(&f, "end_time") >= attr(&f, "start_time"));
        // The run context of the start command.
        let metadata: serde_json::Value = serde_json::from_str(&attr(&f, "metadata")).unwrap();
        assert_eq!(metadata, serde_json::json!({"dcid": 7, "scan": "s1"}));
        assert_eq!(attr(&f, "traceparent"), TRACEPARENT);
        let modules: Vec<u64> = f
            .dataset("wtest/missing_modules")
            .unwrap()
            .read_raw()
            .unwrap();
        assert_eq!(modules, vec![0; 12]);
        let status: Vec<u16> = f.dataset("wtest/status").unwrap().read_raw().unwrap();
        assert_eq!(status, [ImageStatus::LostInBuffer as u16, 1, 1]);
        let data: Vec<u16> = f.dataset("wtest/data").unwrap().read_raw().unwrap();
        let per_image = 512 * 1024;
        assert!(data[..per_image].iter().all(|v| *v == 0));
        // The lost image cost no chunk write.
        let ds = f.dataset("wtest/data").unwrap();
        assert_eq!(ds.num_chunks(), Some(2));
        assert_eq!(ds.chunk_info(0).unwrap().offset, [1, 0, 0]);
        assert!(data[per_image..2 * per_image].iter().all(|v| *v == 0x0202));
        assert!(data[2 * per_image..].iter().all(|v| *v == 0x0303));
        drop(f);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Ids 5 and 6 never come: the run counts them, and a jump back (a restarted frame counter)
    /// counts nothing.
    #[test]
    fn image_ids_that_never_came_are_counted_in_the_run_summary() {
        let (cfg, mut ring, mut writer, dir, file) = started_run("wtest3", 8, 5);
        for id in [3, 4, 7, 1, 2] {
            publish(&mut ring, &cfg, id);
            writer.on_message(meta(&cfg, id).as_bytes());
        }
        let run = writer.status().last_run.unwrap();
        assert_eq!(run.end, "completed");
        assert_eq!(run.images_written, 5);
        assert_eq!(run.images_good, 5);
        assert_eq!(run.image_ids_skipped, 2);
        let f = hdf5::File::open(&file).unwrap();
        let ids: Vec<u64> = f.dataset("wtest/image_id").unwrap().read_raw().unwrap();
        assert_eq!(ids, [3, 4, 7, 1, 2]);
        drop(f);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// cancel_if_empty ends a run without images and leaves nothing on disk; a run that has an
    /// image is not touched and completes.
    #[test]
    fn cancel_if_empty_removes_an_empty_run_and_never_ends_one_with_images() {
        let (cfg, mut ring, mut writer, dir, file) = started_run("wtest4", 4, 2);
        assert!(partial_path(&file).exists());
        let reply = writer.handle_command(Command::CancelIfEmpty {
            reason: Some("no image within 2 s".into()),
        });
        assert!(reply.ok, "{reply:?}");
        let run = reply.run.unwrap();
        let part = partial_path(&file);
        assert_eq!(
            run.end,
            format!(
                "cancelled: no image within 2 s; nothing was written ({} was removed, {} was \
                 never created)",
                part.display(),
                file.display()
            )
        );
        assert_eq!(run.images_written, 0);
        assert_eq!(writer.status().state, "idle");
        assert_eq!(writer.status().last_run, Some(run));
        assert!(!part.exists() && !file.exists());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let again = writer.handle_command(Command::CancelIfEmpty { reason: None });
        assert_eq!(again.error.as_deref(), Some("no run is in progress"));

        // The same file again; one image arrives: cancelling is refused and the run completes.
        let reply = writer.handle_command(Command::Start {
            output_file: file.display().to_string(),
            n_images: 2,
            request_id: None,
            context: RunContext::default(),
        });
        assert!(reply.ok, "{reply:?}");
        publish(&mut ring, &cfg, 0);
        writer.on_message(meta(&cfg, 0).as_bytes());
        let refused = writer.handle_command(Command::CancelIfEmpty { reason: None });
        assert!(!refused.ok);
        assert_eq!(
            refused.error.as_deref(),
            Some("the run has written 1 images already: it goes on")
        );
        assert_eq!(writer.status().state, "writing");
        publish(&mut ring, &cfg, 1);
        writer.on_message(meta(&cfg, 1).as_bytes());
        let run = writer.status().last_run.unwrap();
        assert_eq!((run.end.as_str(), run.images_written), ("completed", 2));
        assert!(file.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A start without n_images writes every image until stop: the status shows `n_images: null`
    /// while it runs, and stop closes a complete file (no .part) holding exactly those images.
    /// With max_images the run ends by itself there, the file complete too.
    #[test]
    fn an_unbounded_run_writes_until_stopped_or_its_max_images() {
        let cfg = DetectorConfig::from_json_str(ONE_MODULE, "test").unwrap();
        let name = format!("std-daq.wtest5-{}.image", std::process::id());
        let mut ring = RingOwner::create(&name, 8, cfg.image_bytes() as u64).unwrap();
        let mut writer = Writer::new(&cfg, RingReader::attach(&name, Expect::default()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("unbounded.h5");
        let start: Command = serde_json::from_str(&format!(
            r#"{{"command":"start","output_file":"{}","request_id":"u1"}}"#,
            file.display()
        ))
        .unwrap();
        let reply = writer.handle_command(start);
        assert!(reply.ok, "{reply:?}");
        for id in 10..15 {
            publish(&mut ring, &cfg, id);
            writer.on_message(meta(&cfg, id).as_bytes());
        }
        let status = writer.status();
        assert_eq!(status.state, "writing");
        let current = status.current.unwrap();
        assert_eq!((current.n_images, current.images_written), (None, 5));
        let shown = serde_json::to_value(writer.handle_command(Command::Status)).unwrap();
        assert_eq!(
            shown["status"]["current"]["n_images"],
            serde_json::Value::Null
        );
        assert_eq!(shown["status"]["current"]["images_written"], 5);

        let reply = writer.handle_command(Command::Stop { reason: None });
        let run = reply.run.unwrap();
        assert_eq!(run.end, "stopped");
        assert_eq!((run.images_written, run.images_checkpointed), (5, 5));
        assert_eq!(
            (run.first_image_id, run.last_image_id),
            (Some(10), Some(14))
        );
        assert_eq!(run.request_id.as_deref(), Some("u1"));
        assert!(!partial_path(&file).exists());
        let f = hdf5::File::open(&file).unwrap();
        assert_eq!(f.dataset("wtest/data").unwrap().shape(), vec![5, 512, 1024]);
        let ids: Vec<u64> = f.dataset("wtest/image_id").unwrap().read_raw().unwrap();
        assert_eq!(ids, [10, 11, 12, 13, 14]);
        let data: Vec<u16> = f.dataset("wtest/data").unwrap().read_raw().unwrap();
        let per_image = 512 * 1024;
        for (i, id) in (10u16..15).enumerate() {
            let v = (id + 1) * 0x0101;
            assert!(data[i * per_image..(i + 1) * per_image]
                .iter()
                .all(|p| *p == v));
        }
        drop(f);

        // Capped: ends by itself at max_images, the next image is not written.
        let capped = dir.path().join("capped.h5");
        let reply = writer.handle_command(Command::start(
            capped.display().to_string(),
            None,
            Some(2),
            None,
        ));
        assert!(reply.ok, "{reply:?}");
        for id in 20..23 {
            publish(&mut ring, &cfg, id);
            writer.on_message(meta(&cfg, id).as_bytes());
        }
        let run = writer.status().last_run.unwrap();
        assert_eq!(run.end, MAX_IMAGES_REACHED);
        assert_eq!((run.n_images, run.max_images), (None, Some(2)));
        assert_eq!((run.images_written, run.last_image_id), (2, Some(21)));
        assert_eq!(writer.status().state, "idle");
        let f = hdf5::File::open(&capped).unwrap();
        let ids: Vec<u64> = f.dataset("wtest/image_id").unwrap().read_raw().unwrap();
        assert_eq!(ids, [20, 21]);
        assert!(!partial_path(&capped).exists());

        let zero = writer.handle_command(Command::start(
            dir.path().join("z.h5").display().to_string(),
            None,
            Some(0),
            None,
        ));
        assert_eq!(zero.error.as_deref(), Some("max_images must be at least 1"));
    }

    #[test]
    fn bad_start_requests_are_refused_with_the_reason() {
        let cfg = DetectorConfig::from_json_str(ONE_MODULE, "test").unwrap();
        let name = format!("std-daq.wtest2-{}.image", std::process::id());
        let _ring: RingOwner<ImageMetadata> =
            RingOwner::create(&name, 2, cfg.image_bytes() as u64).unwrap();
        let mut writer = Writer::new(&cfg, RingReader::attach(&name, Expect::default()).unwrap());
        let start = |output_file: &str, n_images| Command::Start {
            output_file: output_file.into(),
            n_images,
            request_id: None,
            context: RunContext::default(),
        };
        let cases = [
            (
                start("rel.h5", 1),
                "output_file \"rel.h5\" must be an absolute path",
            ),
            (
                start("/tmp/x.txt", 1),
                "output_file \"/tmp/x.txt\" must end in .h5",
            ),
            (start("/tmp/x.h5", 0), "n_images must be at least 1"),
            (
                start("/nonexistent-dir/x.h5", 1),
                "the folder of output_file \"/nonexistent-dir/x.h5\" does not exist",
            ),
            (Command::Stop { reason: None }, "no run is in progress"),
        ];
        for (cmd, message) in cases {
            let reply = writer.handle_command(cmd);
            assert!(!reply.ok);
            assert_eq!(reply.error.as_deref(), Some(message));
        }
    }

    /// Image `id`'s pixels in the dealt tests: every u16 pixel `id * 3 + p % 7`, distinct per id.
    fn dealt_pixels(cfg: &DetectorConfig, id: u64) -> Vec<u16> {
        let n = cfg.image_bytes() / 2;
        (0..n).map(|p| (id * 3 + (p % 7) as u64) as u16).collect()
    }

    /// Publishes image `id` with [`dealt_pixels`] and its real checksum (so `verify` checks it).
    fn publish_dealt(ring: &mut RingOwner<ImageMetadata>, cfg: &DetectorConfig, id: u64) {
        let pixels = dealt_pixels(cfg, id);
        let bytes: &[u8] = bytemuck::cast_slice(&pixels);
        let mut slot = ring.begin_write(id).unwrap();
        slot.data_mut()[..bytes.len()].copy_from_slice(bytes);
        *slot.meta_mut() = dealt_meta(cfg, id);
        slot.commit();
    }

    fn dealt_meta(cfg: &DetectorConfig, id: u64) -> ImageMetadata {
        let pixels = dealt_pixels(cfg, id);
        ImageMetadata {
            checksum: std_daq_common::checksum::image_checksum(bytemuck::cast_slice(&pixels)),
            checksum_kind: std_daq_common::checksum::CHECKSUM_XXH3_BLOCKS,
            ..meta(cfg, id)
        }
    }

    /// A ring of `slots` and `writers` writers over it (writer k = `with_share(k, writers)`).
    fn dealt_setup(
        tag: &str,
        slots: u64,
        writers: u32,
    ) -> (
        DetectorConfig,
        RingOwner<ImageMetadata>,
        Vec<Writer>,
        tempfile::TempDir,
    ) {
        let cfg = DetectorConfig::from_json_str(ONE_MODULE, "test").unwrap();
        let name = format!("std-daq.{tag}-{}.image", std::process::id());
        let ring = RingOwner::create(&name, slots, cfg.image_bytes() as u64).unwrap();
        let all = (0..writers)
            .map(|k| {
                let reader = RingReader::attach(&name, Expect::default()).unwrap();
                Writer::new(&cfg, reader).with_share(k, writers).unwrap()
            })
            .collect();
        (cfg, ring, all, tempfile::tempdir().unwrap())
    }

    fn dealt_start(file: &Path, n_images: u64, deal: Deal) -> Command {
        Command::Start {
            output_file: file.display().to_string(),
            n_images,
            request_id: None,
            context: RunContext {
                deal: Some(deal),
                ..RunContext::default()
            },
        }
    }

    fn deal(writer: u32, writers: u32, first_image_id: u64) -> Deal {
        Deal {
            writer,
            writers,
            first_image_id,
            await_first_image_id: false,
        }
    }

    /// What a closed file holds: (image ids, status, pixels per row, rows with a chunk).
    fn rows_of_file(file: &Path) -> (Vec<u64>, Vec<u16>, Vec<Vec<u16>>, Vec<u64>) {
        let f = hdf5::File::open(file).unwrap();
        let ids: Vec<u64> = f.dataset("wtest/image_id").unwrap().read_raw().unwrap();
        let status: Vec<u16> = f.dataset("wtest/status").unwrap().read_raw().unwrap();
        let data = f.dataset("wtest/data").unwrap();
        let pixels: Vec<u16> = data.read_raw().unwrap();
        let per_image = 512 * 1024;
        assert_eq!(pixels.len(), ids.len() * per_image);
        let rows = pixels.chunks(per_image).map(<[u16]>::to_vec).collect();
        let chunks = (0..data.num_chunks().unwrap())
            .map(|i| data.chunk_info(i).unwrap().offset[0])
            .collect();
        (ids, status, rows, chunks)
    }

    /// The agent's start: writers awaiting the first image id write nothing and report the first
    /// image they saw; writer 1 started later saw a later one. Set to the later id, both take the
    /// images they passed from the ring and their files hold the interleaved run from there.
    #[test]
    fn writers_awaiting_the_first_image_id_start_where_it_is_set() {
        let (cfg, mut ring, mut writers, dir) = dealt_setup("wawait", 16, 2);
        let files: Vec<_> = (0..2)
            .map(|k| dir.path().join(format!("run_writer{k}.h5")))
            .collect();
        let awaiting = |k| Deal {
            await_first_image_id: true,
            ..deal(k, 2, 0)
        };
        // The detector's ids restarted: the stream saw 5000 before; the run's images are 7.. .
        publish_dealt(&mut ring, &cfg, 5000);
        for w in &mut writers {
            w.on_message(dealt_meta(&cfg, 5000).as_bytes());
        }
        assert!(
            writers[0]
                .handle_command(dealt_start(&files[0], 6, awaiting(0)))
                .ok
        );
        publish_dealt(&mut ring, &cfg, 7);
        writers[0].on_message(dealt_meta(&cfg, 7).as_bytes());
        assert!(
            writers[1]
                .handle_command(dealt_start(&files[1], 6, awaiting(1)))
                .ok
        );
        for id in 8..=9 {
            publish_dealt(&mut ring, &cfg, id);
            for w in &mut writers {
                w.on_message(dealt_meta(&cfg, id).as_bytes());
            }
        }
        let first: Vec<Option<u64>> = writers
            .iter()
            .map(|w| w.status().current.unwrap().first_image_after_start)
            .collect();
        assert_eq!(first, vec![Some(7), Some(8)]);
        assert!(writers
            .iter()
            .all(|w| w.status().current.unwrap().images_written == 0));
        for w in &mut writers {
            let reply = w.handle_command(Command::SetFirstImageId { first_image_id: 8 });
            assert!(reply.ok, "{reply:?}");
        }
        // Caught up from the ring: writer 0 has 8, writer 1 has 9.
        for id in 10..=13 {
            publish_dealt(&mut ring, &cfg, id);
            for w in &mut writers {
                w.on_message(dealt_meta(&cfg, id).as_bytes());
            }
        }
        let want: [Vec<u64>; 2] = [vec![8, 10, 12], vec![9, 11, 13]];
        for k in 0..2 {
            let run = writers[k].status().last_run.unwrap();
            assert_eq!(run.end, "completed", "writer {k}: {run:?}");
            assert_eq!(run.deal.unwrap().first_image_id, 8);
            assert_eq!(run.images_good, 3);
            let (ids, status, rows, _) = rows_of_file(&files[k]);
            assert_eq!(ids, want[k]);
            assert!(status.iter().all(|s| *s == 1));
            for (row, id) in rows.iter().zip(&want[k]) {
                assert_eq!(row, &dealt_pixels(&cfg, *id), "writer {k} image {id}");
            }
        }
        // Only a dealt run that awaits takes a first image id.
        let again = writers[0].handle_command(Command::SetFirstImageId { first_image_id: 8 });
        assert_eq!(again.error.as_deref(), Some("no run is in progress"));
    }

    /// Two writers with deals over one ring and one stream (the same messages to both): their
    /// files hold exactly the interleaved run positions, pixel for pixel, and verify.
    #[test]
    fn two_dealt_writers_hold_exactly_the_interleaved_positions() {
        let (cfg, mut ring, mut writers, dir) = dealt_setup("wdeal2", 8, 2);
        let files: Vec<_> = (0..2)
            .map(|k| dir.path().join(format!("run_writer{k}.h5")))
            .collect();
        for (k, w) in writers.iter_mut().enumerate() {
            let reply = w.handle_command(dealt_start(&files[k], 9, deal(k as u32, 2, 100)));
            assert!(reply.ok, "{reply:?}");
        }
        // An id below the run is ignored by both.
        for id in [99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110] {
            publish_dealt(&mut ring, &cfg, id);
            for w in &mut writers {
                w.on_message(dealt_meta(&cfg, id).as_bytes());
            }
        }
        let runs: Vec<RunSummary> = writers
            .iter()
            .map(|w| w.status().last_run.unwrap())
            .collect();
        // 9 positions: writer 0 has 100 102 104 106 108, writer 1 has 101 103 105 107.
        let want: [Vec<u64>; 2] = [vec![100, 102, 104, 106, 108], vec![101, 103, 105, 107]];
        for k in 0..2 {
            let run = &runs[k];
            assert_eq!(run.end, "completed", "writer {k}");
            assert_eq!(run.deal, Some(deal(k as u32, 2, 100)));
            assert_eq!(run.images_written, want[k].len() as u64);
            assert_eq!(run.images_good, want[k].len() as u64);
            assert_eq!((run.image_ids_skipped, run.images_lost_in_buffer), (0, 0));
            assert_eq!(run.first_image_id, Some(want[k][0]));
            assert_eq!(run.last_image_id, want[k].last().copied());
            let (ids, status, rows, chunks) = rows_of_file(&files[k]);
            assert_eq!(ids, want[k]);
            assert!(status.iter().all(|s| *s == 1));
            for (row, id) in rows.iter().zip(&want[k]) {
                assert!(*row == dealt_pixels(&cfg, *id), "writer {k} image {id}");
            }
            assert_eq!(chunks.len(), want[k].len());
            let report = crate::verify::verify_file(&files[k]).unwrap();
            assert!(report.ok(), "{report:?}");
            assert_eq!(report.checked, want[k].len() as u64);
        }
        // Writer 0 ignored 99; writer 1 also 99 (110 came after its run ended).
        assert_eq!((writers[0].ids_ignored, writers[1].ids_ignored), (1, 1));
        let status = writers[1].status();
        assert_eq!(
            (status.writer_index, status.writers, status.latest_image_id),
            (1, 2, Some(110))
        );
    }

    /// Writer 0 is started after it saw ids 100..106 go by (104 never came): it catches up
    /// from the ring, 102's slot overwritten = lost in buffer (zeros, no chunk), 104 never in
    /// the ring = status 0; then it follows the stream. Every image it has verifies.
    #[test]
    fn a_writer_started_late_catches_up_from_the_ring() {
        let (cfg, mut ring, mut writers, dir) = dealt_setup("wdeal3", 4, 2);
        let w = &mut writers[0];
        assert_eq!(w.status().latest_image_id, None);
        for id in [100, 101, 102, 103, 105, 106] {
            publish_dealt(&mut ring, &cfg, id);
            w.on_message(dealt_meta(&cfg, id).as_bytes());
        }
        assert_eq!(w.status().latest_image_id, Some(106));
        let file = dir.path().join("late_writer0.h5");
        let reply = w.handle_command(dealt_start(&file, 10, deal(0, 2, 100)));
        assert!(reply.ok, "{reply:?}");
        let current = w.status().current.unwrap();
        assert_eq!(current.images_written, 4, "caught up on 100 102 104 106");
        for id in 107..110 {
            publish_dealt(&mut ring, &cfg, id);
            w.on_message(dealt_meta(&cfg, id).as_bytes());
        }
        let run = w.status().last_run.unwrap();
        assert_eq!(run.end, "completed");
        assert_eq!(run.images_written, 5);
        assert_eq!(
            (
                run.images_good,
                run.images_lost_in_buffer,
                run.image_ids_skipped,
                run.images_flagged
            ),
            (3, 1, 1, 2)
        );
        let (ids, status, rows, chunks) = rows_of_file(&file);
        assert_eq!(ids, [100, 102, 104, 106, 108]);
        assert_eq!(status, [1, 4, 0, 1, 1]);
        assert!(rows[0] == dealt_pixels(&cfg, 100));
        assert!(rows[1].iter().chain(&rows[2]).all(|p| *p == 0));
        assert!(rows[3] == dealt_pixels(&cfg, 106));
        assert!(rows[4] == dealt_pixels(&cfg, 108));
        // The lost row and the one that never came cost no chunk.
        assert_eq!(chunks, [0, 3, 4]);
        let report = crate::verify::verify_file(&file).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.checked, report.without_checksum), (3, 2));
    }

    /// Ids of this writer's share that never came are status-0 rows with their expected id;
    /// a jump back within the run is ignored and counted; a jump past the run's end completes
    /// it with status-0 rows.
    #[test]
    fn dealt_ids_that_never_came_are_status_zero_rows() {
        let (cfg, mut ring, mut writers, dir) = dealt_setup("wdeal4", 16, 2);
        let w = &mut writers[1];
        let file = dir.path().join("gaps_writer1.h5");
        let reply = w.handle_command(dealt_start(&file, 14, deal(1, 2, 100)));
        assert!(reply.ok, "{reply:?}");
        // 103 and 105 never come; 101 comes again (a jump back); then the detector jumps to 120.
        for id in [100, 101, 102, 104, 106, 107, 101, 108, 120] {
            publish_dealt(&mut ring, &cfg, id);
            w.on_message(dealt_meta(&cfg, id).as_bytes());
        }
        let run = w.status().last_run.unwrap();
        assert_eq!(run.end, "completed");
        // Positions 1 3 5 7 9 11 13: 101 103 105 107 109 111 113.
        assert_eq!(run.images_written, 7);
        assert_eq!((run.images_good, run.image_ids_skipped), (2, 5));
        assert_eq!(w.ids_ignored, 1);
        let (ids, status, rows, chunks) = rows_of_file(&file);
        assert_eq!(ids, [101, 103, 105, 107, 109, 111, 113]);
        assert_eq!(status, [1, 0, 0, 1, 0, 0, 0]);
        assert!(rows[0] == dealt_pixels(&cfg, 101));
        assert!(rows[3] == dealt_pixels(&cfg, 107));
        assert!(rows[1].iter().all(|p| *p == 0));
        assert_eq!(chunks, [0, 3]);
        let f = hdf5::File::open(&file).unwrap();
        let kinds: Vec<u16> = f
            .dataset("wtest/checksum_kind")
            .unwrap()
            .read_raw()
            .unwrap();
        assert_eq!(kinds, [1, 0, 0, 1, 0, 0, 0]);
    }

    /// A deal for another share, or for a single writer, is refused; a share of nothing
    /// completes at once with an empty file.
    #[test]
    fn a_deal_for_another_writer_is_refused() {
        let (cfg, ring, mut writers, dir) = dealt_setup("wdeal5", 4, 2);
        let file = dir.path().join("r_writer0.h5");
        let w = &mut writers[0];
        let cases = [
            (
                deal(1, 2, 5),
                "the deal is for writer 1 of 2, but this is writer 0 of 2 (--writer-index, \
                 number_of_writers)",
            ),
            (
                deal(0, 3, 5),
                "the deal is for writer 0 of 3, but this is writer 0 of 2 (--writer-index, \
                 number_of_writers)",
            ),
            (
                deal(0, 1, 5),
                "a deal shares a run between 2 or more writers, not 1: start without a deal to \
                 write every image",
            ),
        ];
        for (d, message) in cases {
            let reply = w.handle_command(dealt_start(&file, 4, d));
            assert_eq!(reply.error.as_deref(), Some(message));
            assert!(!file.exists() && !partial_path(&file).exists());
        }
        assert!(matches!(
            Writer::new(
                &cfg,
                RingReader::attach(ring.name(), Expect::default()).unwrap()
            )
            .with_share(2, 2),
            Err(WriterError::NoSuchWriter {
                index: 2,
                writers: 2
            })
        ));
        // One image over two writers: writer 1 has no row.
        let empty = dir.path().join("r_writer1.h5");
        let reply = writers[1].handle_command(dealt_start(&empty, 1, deal(1, 2, 5)));
        assert!(reply.ok, "{reply:?}");
        let run = reply.run.unwrap();
        assert_eq!((run.end.as_str(), run.images_written), ("completed", 0));
        assert_eq!(writers[1].status().state, "idle");
        let (ids, ..) = rows_of_file(&empty);
        assert!(ids.is_empty());
    }

    /// An unbounded dealt run ends at its share of max_images (writer 0 of 2, max 5: positions
    /// 0 2 4), and one without a limit writes its share until stopped.
    #[test]
    fn an_unbounded_dealt_run_ends_at_its_share_of_max_images_or_at_stop() {
        let (cfg, mut ring, mut writers, dir) = dealt_setup("wdeal6", 16, 2);
        let w = &mut writers[0];
        let capped = dir.path().join("capped_writer0.h5");
        let start = |file: &Path, max_images| Command::StartUnbounded {
            output_file: file.display().to_string(),
            max_images,
            request_id: None,
            context: RunContext {
                deal: Some(deal(0, 2, 10)),
                ..RunContext::default()
            },
        };
        assert!(w.handle_command(start(&capped, Some(5))).ok);
        for id in 10..20 {
            publish_dealt(&mut ring, &cfg, id);
            w.on_message(dealt_meta(&cfg, id).as_bytes());
        }
        let run = w.status().last_run.unwrap();
        assert_eq!(
            (run.end.as_str(), run.images_written),
            (MAX_IMAGES_REACHED, 3)
        );
        assert_eq!(rows_of_file(&capped).0, [10, 12, 14]);

        let open = dir.path().join("open_writer0.h5");
        assert!(w.handle_command(start(&open, None)).ok);
        // The same first_image_id 10: ids 10..19 went by already and are caught up from the
        // ring (10 12 14 16 18).
        assert_eq!(w.status().current.unwrap().images_written, 5);
        for id in 20..23 {
            publish_dealt(&mut ring, &cfg, id);
            w.on_message(dealt_meta(&cfg, id).as_bytes());
        }
        let run = w
            .handle_command(Command::Stop { reason: None })
            .run
            .unwrap();
        assert_eq!((run.end.as_str(), run.images_written), ("stopped", 7));
        let (ids, status, rows, _) = rows_of_file(&open);
        assert_eq!(ids, [10, 12, 14, 16, 18, 20, 22]);
        assert!(status.iter().all(|s| *s == 1));
        assert!(rows[3] == dealt_pixels(&cfg, 16));
    }

    /// The files of two dealt writers (one position that never came, one image lost in the
    /// ring) make a master (master.rs) that reads the run in position order: pixels, ids and
    /// status, zeros where there were no pixels.
    #[test]
    fn dealt_writers_files_make_a_master_of_the_run_in_position_order() {
        let (cfg, mut ring, mut writers, dir) = dealt_setup("wdeal7", 4, 2);
        let output = dir.path().join("run.h5");
        let files: Vec<_> = (0..2)
            .map(|k| std_daq_common::writer_command::writer_data_file(&output, k))
            .collect();
        for (k, w) in writers.iter_mut().enumerate() {
            let reply = w.handle_command(dealt_start(&files[k], 8, deal(k as u32, 2, 40)));
            assert!(reply.ok, "{reply:?}");
        }
        // 43 never comes; 45 is overwritten (by 49) before the writers are told about it.
        let mut feed = |ring: &mut RingOwner<ImageMetadata>, publish: &[u64], tell: &[u64]| {
            for id in publish {
                publish_dealt(ring, &cfg, *id);
            }
            for id in tell {
                for w in writers.iter_mut() {
                    w.on_message(dealt_meta(&cfg, *id).as_bytes());
                }
            }
        };
        // The ring has 4 slots: each image is told before its slot is reused, except 45.
        feed(&mut ring, &[40, 41, 42], &[40, 41, 42]);
        feed(&mut ring, &[44], &[44]);
        feed(&mut ring, &[45, 49], &[45]);
        feed(&mut ring, &[46, 47], &[46, 47]);
        let runs: Vec<RunSummary> = writers
            .iter()
            .map(|w| w.status().last_run.unwrap())
            .collect();
        assert_eq!(
            runs.iter()
                .map(|r| (r.end.as_str(), r.images_written))
                .collect::<Vec<_>>(),
            [("completed", 4), ("completed", 4)]
        );
        assert_eq!(runs[0].images_good, 4);
        assert_eq!(
            (runs[1].images_lost_in_buffer, runs[1].image_ids_skipped),
            (1, 1)
        );
        let request = crate::command::MasterRequest {
            output_file: output.display().to_string(),
            writers: 2,
            first_image_id: 40,
            n_images: Some(8),
            sources: (0..2)
                .map(|k| crate::command::MasterSource {
                    writer: k,
                    file: files[k as usize].display().to_string(),
                    rows: runs[k as usize].images_written,
                })
                .collect(),
            request_id: None,
            metadata: None,
            traceparent: None,
            nxmx: None,
            run_summary: None,
        };
        let spec = ImageFileSpec {
            detector_name: "wtest".into(),
            n_images: 8,
            height: 512,
            width: 1024,
            dtype: Dtype::Uint16,
            compression: Compression::None,
            n_modules: 1,
        };
        let summary = crate::master::write_master(&request, &spec, None, "{}").unwrap();
        assert_eq!(summary.images, 8);
        let f = hdf5::File::open(&output).unwrap();
        let ids: Vec<u64> = f.dataset("wtest/image_id").unwrap().read_raw().unwrap();
        let status: Vec<u16> = f.dataset("wtest/status").unwrap().read_raw().unwrap();
        let pixels: Vec<u16> = f.dataset("wtest/data").unwrap().read_raw().unwrap();
        assert_eq!(ids, (40..48).collect::<Vec<u64>>());
        assert_eq!(status, [1, 1, 1, 0, 1, 4, 1, 1]);
        for (p, row) in pixels.chunks(512 * 1024).enumerate() {
            let id = 40 + p as u64;
            if matches!(id, 43 | 45) {
                assert!(row.iter().all(|v| *v == 0), "position {p}");
            } else {
                assert!(*row == dealt_pixels(&cfg, id)[..], "position {p}");
            }
        }
    }
}
