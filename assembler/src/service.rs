//! The assembler service loop: ModuleFrames in (ZMQ PULL), images into the ImageBuffer,
//! ImageMetadata out (ZMQ PUB). Sockets and rings are passed in, so tests can run it in-process.
//!
//! The PUB also carries an empty message every `HEARTBEAT` so that subscribers can tell the
//! assembler is up (and that their subscription has reached it) before a run starts.
//!
//! With one thread ([`Assembler::with_threads`] not called, or 1) the service loop places every
//! module itself; with more, the per-module work and the checksum's block digests go to the
//! worker threads of [`crate::workers`], and this loop stays the synchroniser: it waits for them,
//! builds the metadata from all modules in module order and publishes in image_id order.

use crate::calib::{Calibration, CalibrationError};
use crate::pixels::{ModulePixels, Scratch};
use crate::sync::{ReadyImage, Synchronizer};
use crate::workers::{ImageInput, Outcome, WorkerError, WorkerStats, Workers};
use image_buffer::{Expect, ReadError, RingOwner, RingReader};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use std_daq_common::messages::IMAGE_METADATA_VERSION;
use std_daq_common::metrics::Histogram;
use std_daq_common::service::Shutdown;
use std_daq_common::status::{StatusBoard, BOARD_PERIOD};
use std_daq_common::{DetectorConfig, Dtype, ImageMetadata, ImageStatus, ModuleFrame};

pub const HEARTBEAT: Duration = Duration::from_millis(200);
/// How often the calibration file is checked for a replacement (hot swap).
pub const CALIBRATION_POLL: Duration = Duration::from_millis(250);
const POLL_MS: i64 = 10;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AssemblerStats {
    pub images: u64,
    pub images_good: u64,
    pub images_missing_packets: u64,
    pub images_lost_in_buffer: u64,
    /// Images whose modules disagreed on `frame_index`.
    pub images_id_mismatch: u64,
    /// Module frames whose FrameBuffer slot was overwritten before the assembler read it.
    pub module_frames_overwritten: u64,
    pub invalid_messages: u64,
    /// FrameBuffers re-attached because their receiver restarted.
    pub receiver_restarts: u64,
}

impl fmt::Display for AssemblerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "images={} good={} missing_packets={} lost_in_buffer={} id_mismatch={} module_frames_overwritten={} invalid_messages={} receiver_restarts={}",
            self.images,
            self.images_good,
            self.images_missing_packets,
            self.images_lost_in_buffer,
            self.images_id_mismatch,
            self.module_frames_overwritten,
            self.invalid_messages,
            self.receiver_restarts
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AssemblerError {
    #[error("ZMQ: {0}")]
    Zmq(#[from] zmq::Error),
    #[error(transparent)]
    Calibration(#[from] CalibrationError),
    #[error(transparent)]
    Workers(#[from] WorkerError),
}

/// The ImageBuffer, written by the service loop alone or by the worker threads.
#[derive(Debug)]
enum ImageRing {
    Single(RingOwner<ImageMetadata>),
    Workers(Workers),
}

/// What the modules of one image said, gathered in module order.
#[derive(Debug, Default)]
struct Tally {
    lost_in_buffer: bool,
    frame_index: Option<u64>,
    id_mismatch: bool,
}

/// Synchroniser, geometry and the rings, without sockets.
#[derive(Debug)]
pub struct Assembler {
    /// Shared with the worker threads while they make an image; only here between images.
    pixels: Arc<ModulePixels>,
    /// The service loop's row buffers (one thread).
    scratch: Scratch,
    sync: Synchronizer,
    /// Shared with the worker threads (each image's job carries its modules' rings).
    module_rings: Vec<Arc<RingReader<ModuleFrame>>>,
    image_ring: ImageRing,
    dtype: Dtype,
    packets_per_frame: u32,
    pub stats: AssemblerStats,
    /// From the arrival of an image's last module frame (≈ its receiver's commit: ipc takes
    /// microseconds) to its ImageMetadata published.
    pub latency: Arc<Histogram>,
    /// Hot swap of the calibration ([`Assembler::watch_calibration`]); `None` = not watched.
    calibration_watch: Option<crate::calib::CalibrationWatcher>,
    pub calibration_swaps: u64,
    /// Whether images get their end-to-end checksum (always, except to measure its cost).
    checksums: bool,
}

impl Assembler {
    /// Loads the calibration file when the config converts (`jungfrau-converted`).
    pub fn new(
        cfg: &DetectorConfig,
        module_rings: Vec<RingReader<ModuleFrame>>,
        image_ring: RingOwner<ImageMetadata>,
    ) -> Result<Self, AssemblerError> {
        let pixels = ModulePixels::from_config(cfg)?;
        Ok(Self::with_pixels(cfg, pixels, module_rings, image_ring))
    }

    /// With an in-memory calibration (tests); `None` = raw.
    pub fn with_calibration(
        cfg: &DetectorConfig,
        calibration: Option<Calibration>,
        module_rings: Vec<RingReader<ModuleFrame>>,
        image_ring: RingOwner<ImageMetadata>,
    ) -> Self {
        let pixels = ModulePixels::with_calibration(cfg, calibration);
        Self::with_pixels(cfg, pixels, module_rings, image_ring)
    }

    /// With module pixel handling already set up (calibration loaded).
    pub fn with_pixels(
        cfg: &DetectorConfig,
        pixels: ModulePixels,
        module_rings: Vec<RingReader<ModuleFrame>>,
        image_ring: RingOwner<ImageMetadata>,
    ) -> Self {
        Assembler {
            scratch: pixels.scratch(),
            pixels: Arc::new(pixels),
            sync: Synchronizer::new(
                usize::from(cfg.n_modules),
                Duration::from_millis(u64::from(cfg.module_sync_timeout_ms)),
                cfg.module_sync_queue_size as usize,
            ),
            module_rings: module_rings.into_iter().map(Arc::new).collect(),
            image_ring: ImageRing::Single(image_ring),
            dtype: cfg.image_dtype(),
            packets_per_frame: cfg.packets_per_frame(),
            stats: AssemblerStats::default(),
            latency: Histogram::new(
                "image_publish_latency_seconds",
                "last module frame of an image received -> its ImageMetadata published",
            ),
            calibration_watch: None,
            calibration_swaps: 0,
            checksums: true,
        }
    }

    /// Spreads the work of each image over `threads` worker threads, which convert it in runs of
    /// image rows ([`crate::workers`]), started now; 0 or 1 keeps the single-threaded assembly.
    pub fn with_threads(self, threads: u32) -> Result<Self, AssemblerError> {
        let n_modules = self.module_rings.len();
        let n = threads as usize;
        let ImageRing::Single(ring) = self.image_ring else {
            return Ok(self);
        };
        if n <= 1 {
            return Ok(Assembler {
                image_ring: ImageRing::Single(ring),
                ..self
            });
        }
        let workers = Workers::start(n, &self.pixels, n_modules, ring)?;
        Ok(Assembler {
            image_ring: ImageRing::Workers(workers),
            ..self
        })
    }

    /// Threads that place modules: the worker threads, or 1 (the service loop itself).
    pub fn threads(&self) -> usize {
        match &self.image_ring {
            ImageRing::Single(_) => 1,
            ImageRing::Workers(w) => w.n_workers(),
        }
    }

    /// How the worker threads kept up (all zero with one thread).
    pub fn worker_stats(&self) -> WorkerStats {
        match &self.image_ring {
            ImageRing::Single(_) => WorkerStats::default(),
            ImageRing::Workers(w) => w.stats,
        }
    }

    /// Publishes images without the end-to-end checksum (`checksum_kind` 0): only for the
    /// benchmark that measures the checksum's cost.
    pub fn without_checksums(mut self) -> Self {
        self.checksums = false;
        self
    }

    /// Watches the config's `calibration_file` for a new calibration (hot swap, taken between
    /// images by [`run`]); nothing to watch in raw modes.
    pub fn watch_calibration(&mut self, cfg: &DetectorConfig) -> std::io::Result<()> {
        let id = self.pixels.calibration_id();
        if let (Some(file), true) = (&cfg.calibration_file, id != 0) {
            self.calibration_watch = Some(crate::calib::CalibrationWatcher::start(
                file.clone(),
                usize::from(cfg.n_modules),
                crate::calib::Scale::from_config(cfg),
                id,
                CALIBRATION_POLL,
            )?);
        }
        Ok(())
    }

    /// Takes a calibration the watcher loaded, if there is one: call between images.
    pub fn take_new_calibration(&mut self) {
        let Some(watch) = &self.calibration_watch else {
            return;
        };
        if let Some(new) = watch.take() {
            let id = new.id;
            // The workers dropped their references when they answered for the last image, so
            // this is the only one and nothing is cloned.
            let old = Arc::make_mut(&mut self.pixels).swap_calibration(new);
            tracing::info!(
                calibration_id = id,
                previous_id = old.id,
                next_image_after = self.stats.images,
                "calibration swapped"
            );
            self.calibration_swaps += 1;
            watch.recycle(old);
        }
    }

    /// Shows the counters in the service's Redis status hash and metrics, stamped `counters_at`.
    pub fn publish_status(&self, board: &StatusBoard) {
        let (a, s) = (&self.stats, &self.sync.stats);
        board.set("images", a.images);
        board.set("images_good", a.images_good);
        board.set("images_missing_packets", a.images_missing_packets);
        board.set("images_lost_in_buffer", a.images_lost_in_buffer);
        board.set("images_id_mismatch", a.images_id_mismatch);
        board.set("module_frames_overwritten", a.module_frames_overwritten);
        board.set("invalid_messages", a.invalid_messages + s.invalid_frames);
        board.set("duplicate_frames", s.duplicate_frames);
        board.set("late_frames", s.late_frames);
        board.set("pending_images", self.sync.n_pending());
        board.set("calibration_id", self.pixels.calibration_id());
        board.set("calibration_swaps", self.calibration_swaps);
        let w = self.worker_stats();
        board.set("assembler_threads", self.threads());
        board.set("worker_wait_us", w.wait_us);
        board.set("worker_busy_us", w.busy_us);
        board.set("worker_straggle_us", w.straggle_us);
        board.set("worker_stalls", w.stalls);
        board.set("worker_refills", w.refills);
        board.stamp_counters();
    }

    /// A receiver that restarted created a new FrameBuffer under the same name: map the new
    /// one (the old mapping would never see its frames). Cheap (one `stat` per module); called a
    /// few times a second, never per image.
    pub fn reattach_restarted_receivers(&mut self) {
        for (m, ring) in self.module_rings.iter_mut().enumerate() {
            if !ring.is_replaced() {
                continue;
            }
            let expect = Expect {
                n_slots: Some(ring.n_slots()),
                slot_bytes: Some(ring.slot_bytes()),
            };
            // Not there yet (the receiver is still starting): try again next time.
            if let Ok(new) = RingReader::attach(ring.name(), expect) {
                tracing::info!(
                    module = m,
                    buffer = ring.name(),
                    "receiver restarted: FrameBuffer re-attached"
                );
                *ring = Arc::new(new);
                self.stats.receiver_restarts += 1;
            }
        }
    }

    /// Takes one raw message from a receiver.
    ///
    /// A ModuleFrame announces a frame its receiver has committed, so the frame must be in that
    /// module's FrameBuffer (or already overwritten there by a newer one). A message that passes
    /// the format check but names a frame the buffer never held (an empty slot, an older frame
    /// there) did not come from the receiver: it is counted as invalid and never synchronised
    /// on, so a forged or corrupted id cannot push the real frames out as "late".
    pub fn on_message(&mut self, bytes: &[u8], now: Instant) {
        let frame = match ModuleFrame::from_bytes(bytes) {
            Ok(frame) => frame,
            Err(_) => {
                self.stats.invalid_messages += 1;
                return;
            }
        };
        let announced = match self
            .module_rings
            .get(usize::from(frame.module_id))
            .map(|ring| ring.check(frame.image_id))
        {
            // Module out of range: the synchroniser counts it.
            None | Some(Ok(())) | Some(Err(ReadError::Torn)) => true,
            Some(Err(ReadError::Overwritten { found_image_id })) => found_image_id > frame.image_id,
            Some(Err(ReadError::NotPresent | ReadError::InvalidImageId)) => false,
        };
        if announced {
            self.sync.push(frame, now);
        } else {
            self.stats.invalid_messages += 1;
        }
    }

    /// Assembles and publishes every image that is ready (all of them when `flush`). Fails only
    /// when a worker thread is lost (a bug; the image in progress is not published).
    pub fn emit_ready(
        &mut self,
        now: Instant,
        flush: bool,
        publish: &mut impl FnMut(&ImageMetadata),
    ) -> Result<(), AssemblerError> {
        loop {
            let ready = if flush {
                self.sync.pop_any(now)
            } else {
                self.sync.pop_ready(now)
            };
            let Some(ready) = ready else { break };
            let meta = match self.image_ring {
                ImageRing::Single(_) => Ok(self.assemble(&ready)),
                ImageRing::Workers(_) => self.assemble_with_workers(&ready),
            };
            let last_frame_at = ready.last_frame_at;
            self.sync.recycle(ready.frames);
            if let Some(meta) = meta? {
                publish(&meta);
                self.latency.observe(last_frame_at.elapsed());
            }
        }
        Ok(())
    }

    /// The metadata every image starts from.
    fn new_meta(&self, image_id: u64, n_modules: usize) -> ImageMetadata {
        let geometry = &self.pixels.geometry;
        ImageMetadata {
            image_id,
            data_bytes: geometry.image_bytes() as u64,
            height: geometry.image_height as u32,
            width: geometry.image_width as u32,
            n_modules: n_modules as u16,
            dtype: self.dtype as u16,
            version: IMAGE_METADATA_VERSION,
            calibration_id: self.pixels.calibration_id(),
            ..bytemuck::Zeroable::zeroed()
        }
    }

    /// One thread: every module placed here, in module order.
    fn assemble(&mut self, ready: &ReadyImage) -> Option<ImageMetadata> {
        let mut meta = self.new_meta(ready.image_id, ready.frames.len());
        let ImageRing::Single(image_ring) = &mut self.image_ring else {
            return None;
        };
        // Receivers only hand on ids below MAX_IMAGE_ID, so this cannot fail for valid input.
        let mut slot = match image_ring.begin_write(ready.image_id) {
            Ok(slot) => slot,
            Err(e) => {
                tracing::error!(image_id = ready.image_id, "cannot write image: {e}");
                return None;
            }
        };
        let mut tally = Tally::default();
        let image = slot.data_mut();
        for (m, frame) in ready.frames.iter().enumerate() {
            let outcome = match frame {
                None => Outcome::Absent,
                Some(_) => {
                    let (pixels, scratch) = (&self.pixels, &mut self.scratch);
                    // The slot's own metadata says which packets the bytes hold.
                    match self.module_rings[m].read(ready.image_id, |slot_frame, src| {
                        pixels.write_into(scratch, m, slot_frame, src, image)
                    }) {
                        Ok(()) => Outcome::Placed,
                        Err(_) => Outcome::Overwritten,
                    }
                }
            };
            if outcome != Outcome::Placed {
                self.pixels.zero(m, image);
            }
            account_into(
                &mut self.stats,
                self.packets_per_frame,
                &mut meta,
                &mut tally,
                m,
                *frame,
                outcome,
            );
        }
        finish_status(&mut self.stats, &mut meta, &tally);
        if self.checksums {
            // The image was just written: the bytes are still in cache.
            let bytes = (meta.data_bytes as usize).min(image.len());
            meta.checksum = std_daq_common::checksum::image_checksum(&image[..bytes]);
            meta.checksum_kind = std_daq_common::checksum::CHECKSUM_XXH3_BLOCKS;
        }
        *slot.meta_mut() = meta;
        slot.commit();
        self.stats.images += 1;
        Some(meta)
    }

    /// Worker threads: they place the modules and hash the blocks; the metadata is built here,
    /// in module order, as with one thread.
    fn assemble_with_workers(
        &mut self,
        ready: &ReadyImage,
    ) -> Result<Option<ImageMetadata>, AssemblerError> {
        let mut meta = self.new_meta(ready.image_id, ready.frames.len());
        let ImageRing::Workers(workers) = &mut self.image_ring else {
            return Ok(None);
        };
        let (outcomes, checksum) = match workers.assemble(&ImageInput {
            image_id: ready.image_id,
            frames: &ready.frames,
            module_rings: &self.module_rings,
            pixels: &self.pixels,
            checksum: self.checksums,
        }) {
            Ok(done) => done,
            // Another image still in the slot cannot happen (one image at a time), and an id
            // beyond MAX_IMAGE_ID is never handed on by receivers: as `begin_write` failing.
            Err(WorkerError::Region {
                source: source @ image_buffer::RegionError::ImageIdTooLarge { .. },
                ..
            }) => {
                tracing::error!(image_id = ready.image_id, "cannot write image: {source}");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let mut tally = Tally::default();
        for (m, frame) in ready.frames.iter().enumerate() {
            let outcome = outcomes.get(m).copied().unwrap_or(Outcome::Absent);
            account_into(
                &mut self.stats,
                self.packets_per_frame,
                &mut meta,
                &mut tally,
                m,
                *frame,
                outcome,
            );
        }
        if let Some(checksum) = checksum {
            meta.checksum = checksum;
            meta.checksum_kind = std_daq_common::checksum::CHECKSUM_XXH3_BLOCKS;
        }
        finish_status(&mut self.stats, &mut meta, &tally);
        let ImageRing::Workers(workers) = &self.image_ring else {
            return Ok(None);
        };
        workers.commit(meta)?;
        self.stats.images += 1;
        Ok(Some(meta))
    }
}

/// Adds module `m` (its frame message, what became of its pixels) to the image's metadata.
fn account_into(
    stats: &mut AssemblerStats,
    packets_per_frame: u32,
    meta: &mut ImageMetadata,
    tally: &mut Tally,
    m: usize,
    frame: Option<ModuleFrame>,
    outcome: Outcome,
) {
    if outcome == Outcome::Overwritten {
        stats.module_frames_overwritten += 1;
        tally.lost_in_buffer = true;
    }
    match frame.filter(|_| outcome == Outcome::Placed) {
        Some(frame) => {
            meta.missing_packets += u32::from(frame.n_missing_packets);
            if let Some(count) = meta.module_missing_packets.get_mut(m) {
                *count = frame.n_missing_packets;
            }
            meta.bunch_id_bits = frame.bunch_id_bits;
            tally.id_mismatch |= tally.frame_index.is_some_and(|f| f != frame.frame_index);
            tally.frame_index.get_or_insert(frame.frame_index);
            meta.frame_index = frame.frame_index;
            meta.timestamp = frame.timestamp;
        }
        None => {
            meta.set_module_missing(m);
            meta.missing_packets += packets_per_frame;
            if let Some(count) = meta.module_missing_packets.get_mut(m) {
                *count = u16::try_from(packets_per_frame).unwrap_or(u16::MAX);
            }
        }
    }
}

/// The image's status from all its modules (and the counters).
fn finish_status(stats: &mut AssemblerStats, meta: &mut ImageMetadata, tally: &Tally) {
    let status = if tally.id_mismatch {
        stats.images_id_mismatch += 1;
        ImageStatus::IdMismatch
    } else if meta.missing_packets == 0 {
        stats.images_good += 1;
        ImageStatus::Good
    } else if tally.lost_in_buffer {
        stats.images_lost_in_buffer += 1;
        ImageStatus::LostInBuffer
    } else {
        stats.images_missing_packets += 1;
        ImageStatus::MissingPackets
    };
    meta.status = status as u16;
}

/// Runs until shutdown: receives on `pull`, publishes on `publisher`. At shutdown every pending
/// image is emitted (flagged as it stands) before returning.
pub fn run(
    assembler: &mut Assembler,
    pull: &zmq::Socket,
    publisher: &zmq::Socket,
    stats_period: Duration,
    board: &StatusBoard,
    shutdown: &Shutdown,
) -> Result<AssemblerStats, AssemblerError> {
    let mut buf = [0u8; std_daq_common::messages::RECV_BUFFER_BYTES];
    let mut last_heartbeat: Option<Instant> = None;
    let mut last_report = Instant::now();
    let mut last_board = Instant::now();
    // Counters from the start (zeros): a run starting at once reads them, not an empty board.
    assembler.publish_status(board);
    let mut publish = |meta: &ImageMetadata| {
        // PUB never blocks; a subscriber too slow for its HWM loses messages, which it sees as
        // gaps in image_id.
        let _ = publisher.send(meta.as_bytes(), zmq::DONTWAIT);
    };
    loop {
        let stopping = shutdown.is_triggered();
        let readable = {
            let mut items = [pull.as_poll_item(zmq::POLLIN)];
            poll_ignoring_signals(&mut items, if stopping { 0 } else { POLL_MS })?;
            items[0].is_readable()
        };
        if readable {
            loop {
                match pull.recv_into(&mut buf, zmq::DONTWAIT) {
                    Ok(n) => {
                        let bytes = &buf[..n.min(buf.len())];
                        if n > buf.len() {
                            assembler.stats.invalid_messages += 1;
                        } else {
                            assembler.on_message(bytes, Instant::now());
                        }
                    }
                    Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        // Between images: a calibration the watcher loaded converts from the next image on.
        assembler.take_new_calibration();
        let now = Instant::now();
        assembler.emit_ready(now, stopping && !readable, &mut publish)?;
        if stopping && !readable {
            break;
        }
        if last_heartbeat.is_none_or(|t| now.duration_since(t) >= HEARTBEAT) {
            let _ = publisher.send(&[][..], zmq::DONTWAIT);
            last_heartbeat = Some(now);
            assembler.reattach_restarted_receivers();
        }
        if now.duration_since(last_board) >= BOARD_PERIOD
            && now.duration_since(last_report) < stats_period
        {
            assembler.publish_status(board);
            last_board = now;
        }
        if now.duration_since(last_report) >= stats_period {
            last_board = now;
            let w = assembler.worker_stats();
            tracing::info!(
                pending = assembler.sync.n_pending(),
                threads = assembler.threads(),
                worker_wait_us = w.wait_us,
                worker_busy_us = w.busy_us,
                worker_straggle_us = w.straggle_us,
                worker_stalls = w.stalls,
                worker_refills = w.refills,
                "{}",
                assembler.stats
            );
            assembler.publish_status(board);
            last_report = now;
        }
    }
    tracing::info!(sync = ?assembler.sync.stats, "final: {}", assembler.stats);
    assembler.publish_status(board);
    Ok(assembler.stats)
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
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::calib::{MaskCounts, ModuleCalibration, MODULE_HEIGHT, MODULE_WIDTH};
    use image_buffer::Expect;

    const PIXELS: usize = MODULE_WIDTH * MODULE_HEIGHT;

    /// Two JUNGFRAU modules side by side as `detector_type`, with chip gaps; module 1 mirrored in x.
    fn config(name: &str, detector_type: &str) -> DetectorConfig {
        let mut json = serde_json::json!({
            "detector_name": name, "detector_type": detector_type, "n_modules": 2,
            "bit_depth": 16, "image_pixel_height": 514, "image_pixel_width": 2060,
            "start_udp_port": 50000, "chip_gaps": true,
            "module_positions": {"0": [0, 0, 1029, 513], "1": [2059, 0, 1030, 513]},
        });
        if detector_type == "jungfrau-converted" {
            json["calibration_file"] = "/unused.h5".into();
        }
        DetectorConfig::from_json_str(&json.to_string(), "test").unwrap()
    }

    struct Rig {
        modules: Vec<RingOwner<ModuleFrame>>,
        assembler: Assembler,
        images: RingReader<ImageMetadata>,
    }

    fn rig(cfg: &DetectorConfig, calibration: Option<Calibration>) -> Rig {
        let tag = format!("{}-{}", cfg.detector_name, std::process::id());
        let modules: Vec<RingOwner<ModuleFrame>> = (0..2)
            .map(|m| RingOwner::create(&format!("asm-test-{tag}-m{m}"), 4, 1 << 20).unwrap())
            .collect();
        let readers = (0..2)
            .map(|m| {
                RingReader::attach(&format!("asm-test-{tag}-m{m}"), Expect::default()).unwrap()
            })
            .collect();
        let image_name = format!("asm-test-{tag}-image");
        let owner = RingOwner::create(&image_name, 4, cfg.image_bytes() as u64).unwrap();
        let images = RingReader::attach(&image_name, Expect::default()).unwrap();
        let assembler = Assembler::with_calibration(cfg, calibration, readers, owner);
        Rig {
            modules,
            assembler,
            images,
        }
    }

    impl Rig {
        /// Module m's frame for `id`: every pixel `raw`, all packets but `lost`.
        fn send(&mut self, m: u16, id: u64, frame_index: u64, raw: u16, lost: Option<usize>) {
            let mut frame = ModuleFrame::new(id, m, 128);
            for p in (0..128).filter(|p| Some(*p) != lost) {
                frame.mark_received(p);
            }
            frame.n_missing_packets = u16::from(lost.is_some());
            frame.frame_index = frame_index;
            frame.bunch_id_bits = (frame_index as f64 + 0.5).to_bits();
            let mut slot = self.modules[usize::from(m)].begin_write(id).unwrap();
            for (i, px) in slot.data_mut().chunks_exact_mut(2).enumerate() {
                // Lost packets are zero in the slot, as the receiver leaves them.
                let v = if lost == Some(i / 4096) { 0 } else { raw };
                px.copy_from_slice(&v.to_le_bytes());
            }
            *slot.meta_mut() = frame;
            slot.commit();
            self.assembler.on_message(frame.as_bytes(), Instant::now());
        }

        fn emit(&mut self) -> Vec<ImageMetadata> {
            let mut out = Vec::new();
            self.assembler
                .emit_ready(Instant::now(), true, &mut |m| out.push(*m))
                .unwrap();
            out
        }

        fn image_f32(&self, id: u64) -> Vec<f32> {
            self.images
                .read(id, |_, data| {
                    data.chunks_exact(4)
                        .take(514 * 2060)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                })
                .unwrap()
        }
    }

    /// Well-formed ModuleFrames naming frames their FrameBuffer never held (a forged far-future
    /// id, an id whose slot is empty) are counted invalid and change nothing: the real frames
    /// after them are assembled good.
    #[test]
    fn a_module_frame_its_buffer_never_held_is_invalid_and_harmless() {
        let cfg = config("forged", "jungfrau-raw");
        let mut rig = rig(&cfg, None);
        rig.send(0, 1, 1, 7, None);
        rig.send(1, 1, 1, 7, None);
        let forged_far = ModuleFrame::new(1_000_000_000_000, 0, 128);
        let forged_empty_slot = ModuleFrame::new(3, 1, 128);
        rig.assembler
            .on_message(forged_far.as_bytes(), Instant::now());
        rig.assembler
            .on_message(forged_empty_slot.as_bytes(), Instant::now());
        assert_eq!(rig.assembler.stats.invalid_messages, 2);
        rig.send(0, 2, 2, 7, None);
        rig.send(1, 2, 2, 7, None);
        let out = rig.emit();
        let s: Vec<(u64, u16)> = out.iter().map(|m| (m.image_id, m.status)).collect();
        assert_eq!(s, vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn status_comes_from_all_modules_and_id_mismatch_is_flagged() {
        let cfg = config("st", "jungfrau-raw");
        let mut rig = rig(&cfg, None);
        rig.send(0, 1, 10, 7, None);
        rig.send(1, 1, 10, 7, Some(3)); // second module lost a packet
        rig.send(0, 2, 11, 7, None);
        rig.send(1, 2, 12, 7, None); // modules disagree on the frame
        rig.send(0, 3, 13, 7, None);
        rig.send(1, 3, 13, 7, None);
        let out = rig.emit();
        let s: Vec<(u64, u16, u32)> = out
            .iter()
            .map(|m| (m.image_id, m.status, m.missing_packets))
            .collect();
        assert_eq!(s, vec![(1, 2, 1), (2, 3, 0), (3, 1, 0)]);
        assert_eq!(out[0].dtype, 2);
        assert_eq!(rig.assembler.stats.images_id_mismatch, 1);
    }

    /// Each image carries its per-module missing packets, the detector's bunch id and the
    /// end-to-end checksum of exactly the bytes its slot holds.
    #[test]
    fn images_carry_per_module_counts_bunch_id_and_their_checksum() {
        let cfg = config("ck", "jungfrau-raw");
        let mut rig = rig(&cfg, None);
        rig.send(0, 1, 10, 7, None);
        rig.send(1, 1, 10, 9, Some(3));
        rig.send(1, 2, 11, 9, None); // module 0 never arrives
        let out = rig.emit();
        assert_eq!(out.len(), 2);
        assert_eq!(&out[0].module_missing_packets[..3], &[0, 1, 0]);
        assert_eq!(&out[1].module_missing_packets[..3], &[128, 0, 0]);
        assert_eq!(f64::from_bits(out[0].bunch_id_bits), 10.5);
        for m in &out {
            assert_eq!(
                m.checksum_kind,
                std_daq_common::checksum::CHECKSUM_XXH3_BLOCKS
            );
            let (stored, computed) = rig
                .images
                .read(m.image_id, |slot_meta, data| {
                    let bytes = &data[..m.data_bytes as usize];
                    (*slot_meta, std_daq_common::checksum::image_checksum(bytes))
                })
                .unwrap();
            assert_eq!(stored, *m, "the slot holds the published metadata");
            assert_eq!(m.checksum, computed);
        }
        assert_ne!(out[0].checksum, out[1].checksum);
    }

    #[test]
    fn without_checksums_images_have_kind_none() {
        let cfg = config("nock", "jungfrau-raw");
        let Rig {
            modules,
            assembler,
            images,
        } = rig(&cfg, None);
        let mut rig = Rig {
            modules,
            assembler: assembler.without_checksums(),
            images,
        };
        rig.send(0, 1, 1, 7, None);
        rig.send(1, 1, 1, 7, None);
        let out = rig.emit();
        assert_eq!((out[0].checksum_kind, out[0].checksum), (0, 0));
    }

    #[test]
    fn converted_images_are_float32_with_lost_rows_zero() {
        let cfg = config("cv", "jungfrau-converted");
        // Pedestal 1000 / 2000 / 3000, gains 10 / -1 / -0.125 ADU/keV everywhere; pixel 5 masked.
        let cal_module = || {
            let p: [Vec<f32>; 3] = std::array::from_fn(|s| vec![1000.0 * (s + 1) as f32; PIXELS]);
            let g: [Vec<f32>; 3] = std::array::from_fn(|s| vec![[10.0, -1.0, -0.125][s]; PIXELS]);
            let mut mask = vec![false; PIXELS];
            mask[5] = true;
            ModuleCalibration::from_values(
                [&p[0], &p[1], &p[2]],
                [&g[0], &g[1], &g[2]],
                &mask,
                &mut MaskCounts::default(),
            )
        };
        let calibration = Calibration {
            modules: vec![cal_module(), cal_module()],
            masked: MaskCounts::default(),
            id: 1,
        };
        let mut rig = rig(&cfg, Some(calibration));
        // Module 0: G0, adc 1500 -> 50 keV. Module 1: G2 (bits 11), adc 1000 -> 16000 keV,
        // packet 0 (rows 0..3) lost.
        rig.send(0, 4, 4, 1500, None);
        rig.send(1, 4, 4, 0xc000 | 1000, Some(0));
        let out = rig.emit();
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].dtype, out[0].status, out[0].missing_packets),
            (24, 2, 1)
        );
        assert_eq!(out[0].data_bytes, 514 * 2060 * 4);
        let img = rig.image_f32(4);
        let at = |x: usize, y: usize| img[y * 2060 + x];
        // Module 0 (not mirrored): ordinary pixels 50; pixel 5 masked; doubles split (25).
        assert_eq!(
            (at(0, 0), at(5, 0), at(4, 0), at(6, 10)),
            (50.0, 0.0, 50.0, 50.0)
        );
        assert_eq!(
            (at(255, 10), at(256, 10), at(257, 10), at(258, 10)),
            (25.0, 25.0, 25.0, 25.0)
        );
        assert_eq!(at(256, 256), 12.5);
        // Module 1 mirrored in x: module column c at image x = 2059 - rect_x(c).
        assert_eq!(at(2059, 100), 16000.0);
        assert_eq!(at(2059 - 5, 100), 16000.0);
        // Rows 0..3 came from the lost packet: zero, never (0 - pedestal) * gain.
        assert!((0..4).all(|y| (1030..2060).all(|x| at(x, y) == 0.0)));
        assert_eq!(at(1500, 4), 16000.0);
    }

    /// A detector of several modules for the thread tests: (config, calibration, bytes of one
    /// packet in a module frame).
    fn multi_config(kind: &str) -> (DetectorConfig, Option<Calibration>, usize) {
        let mut json = match kind {
            "gigafrost" => {
                // Fixed quadrant geometry; the positions are only carried along (quadrant m/2).
                let positions: serde_json::Map<String, serde_json::Value> = (0..8u32)
                    .map(|m| {
                        let q = m / 2;
                        let (x0, y0) = ((q % 2) * 240, if q < 2 { 64 } else { 0 });
                        (
                            m.to_string(),
                            serde_json::json!([x0, y0, x0 + 239, y0 + 63]),
                        )
                    })
                    .collect();
                serde_json::json!({
                    "detector_type": "gigafrost", "n_modules": 8, "bit_depth": 12,
                    "image_pixel_height": 128, "image_pixel_width": 480,
                    "module_positions": positions,
                })
            }
            // 2x2 JUNGFRAU modules with gaps: module 1 mirrored in x, 2 in y, 3 in both.
            _ => serde_json::json!({
                "detector_type": kind, "n_modules": 4, "bit_depth": 16, "chip_gaps": true,
                "image_pixel_height": 1028, "image_pixel_width": 2060,
                "module_positions": {
                    "0": [0, 0, 1029, 513], "1": [2059, 0, 1030, 513],
                    "2": [0, 1027, 1029, 514], "3": [2059, 1027, 1030, 514],
                },
            }),
        };
        json["detector_name"] = format!("threads-{kind}").into();
        json["start_udp_port"] = 50000.into();
        if kind == "jungfrau-converted" {
            json["calibration_file"] = "/unused.h5".into();
        }
        let cfg = DetectorConfig::from_json_str(&json.to_string(), "test").unwrap();
        let calibration = (kind == "jungfrau-converted").then(|| {
            let module = |m: usize| {
                let p: [Vec<f32>; 3] = std::array::from_fn(|s| {
                    (0..PIXELS)
                        .map(|i| ((i * 13 + s + m) % 700) as f32)
                        .collect()
                });
                let g: [Vec<f32>; 3] = std::array::from_fn(|s| {
                    (0..PIXELS)
                        .map(|i| [37.0, -1.1, -0.07][s] * (1.0 + ((i + m) % 53) as f32 * 1e-3))
                        .collect()
                });
                let mask: Vec<bool> = (0..PIXELS).map(|i| i % 101 == m).collect();
                ModuleCalibration::from_values(
                    [&p[0], &p[1], &p[2]],
                    [&g[0], &g[1], &g[2]],
                    &mask,
                    &mut MaskCounts::default(),
                )
            };
            Calibration {
                modules: (0..4).map(module).collect(),
                masked: MaskCounts::default(),
                id: 7,
            }
        });
        // GigaFRoST 240x32 streams: 2 packets of 20 and 12 rows of 360 bytes.
        let packet_bytes = if kind == "gigafrost" { 20 * 360 } else { 8192 };
        (cfg, calibration, packet_bytes)
    }

    /// Runs one scenario through an assembler with `threads` threads; returns every published
    /// ImageMetadata (in publication order) with the image bytes its slot held right then.
    fn run_scenario(
        kind: &str,
        cfg: &DetectorConfig,
        calibration: Option<Calibration>,
        packet_bytes: usize,
        threads: u32,
    ) -> Vec<(ImageMetadata, Vec<u8>)> {
        let n_modules = usize::from(cfg.n_modules);
        let tag = format!("{kind}-{threads}-{}", std::process::id());
        let frame_bytes = cfg.module_frame_bytes() as u64;
        let mut modules: Vec<RingOwner<ModuleFrame>> = (0..n_modules)
            .map(|m| RingOwner::create(&format!("asm-thr-{tag}-m{m}"), 4, frame_bytes).unwrap())
            .collect();
        let readers = (0..n_modules)
            .map(|m| RingReader::attach(&format!("asm-thr-{tag}-m{m}"), Expect::default()).unwrap())
            .collect();
        let image_name = format!("asm-thr-{tag}-image");
        let owner = RingOwner::create(&image_name, 4, cfg.image_bytes() as u64).unwrap();
        let images = RingReader::<ImageMetadata>::attach(&image_name, Expect::default()).unwrap();
        let mut assembler = Assembler::with_calibration(cfg, calibration, readers, owner)
            .with_threads(threads)
            .unwrap();
        // At most one worker per run of 32 image rows: GigaFRoST's 128 rows make 4.
        let runs = if kind == "gigafrost" { 4 } else { 64 };
        assert_eq!(assembler.threads(), threads.clamp(1, runs) as usize);
        let n_packets = cfg.packets_per_frame() as usize;
        // Module m's frame of `id` into its FrameBuffer (packet `lost` missing, its bytes zero,
        // as the receiver leaves them); announced unless `silent`.
        let mut send = |assembler: &mut Assembler,
                        m: usize,
                        id: u64,
                        frame_index: u64,
                        lost: Option<usize>,
                        silent: bool| {
            let mut frame = ModuleFrame::new(id, m as u16, n_packets as u16);
            for p in (0..n_packets).filter(|p| Some(*p) != lost) {
                frame.mark_received(p);
            }
            frame.n_missing_packets = u16::from(lost.is_some());
            frame.frame_index = frame_index;
            frame.timestamp = 1000 + frame_index;
            frame.bunch_id_bits = (frame_index as f64 * 2.0).to_bits();
            let mut slot = modules[m].begin_write(id).unwrap();
            for (i, b) in slot.data_mut().iter_mut().enumerate() {
                let h = (i as u64 ^ (id << 32) ^ ((m as u64) << 48))
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15);
                *b = if lost.is_some_and(|p| i / packet_bytes == p) {
                    0
                } else {
                    (h >> 56) as u8
                };
            }
            *slot.meta_mut() = frame;
            slot.commit();
            if !silent {
                assembler.on_message(frame.as_bytes(), Instant::now());
            }
        };
        let mut out = Vec::new();
        let mut emit = |assembler: &mut Assembler| {
            let mut metas = Vec::new();
            assembler
                .emit_ready(Instant::now(), true, &mut |m| metas.push(*m))
                .unwrap();
            // Between images the workers hold no reference: a hot swap takes it in place.
            assert_eq!(Arc::strong_count(&assembler.pixels), 1);
            for meta in metas {
                let bytes = images
                    .read(meta.image_id, |slot_meta, data| {
                        assert_eq!(*slot_meta, meta, "the slot holds the published metadata");
                        data[..meta.data_bytes as usize].to_vec()
                    })
                    .unwrap();
                out.push((meta, bytes));
            }
        };
        // 1: complete. 2: modules 1 and the last lose packet 0.
        for m in 0..n_modules {
            send(&mut assembler, m, 1, 10, None, false);
        }
        emit(&mut assembler);
        for m in 0..n_modules {
            let lost = (m == 1 || m == n_modules - 1).then_some(0);
            send(&mut assembler, m, 2, 11, lost, false);
        }
        emit(&mut assembler);
        // 3: module 2 never arrives. 4: module 0 disagrees on the frame.
        for m in (0..n_modules).filter(|m| *m != 2) {
            send(&mut assembler, m, 3, 12, None, false);
        }
        emit(&mut assembler);
        for m in 0..n_modules {
            send(
                &mut assembler,
                m,
                4,
                if m == 0 { 99 } else { 13 },
                None,
                false,
            );
        }
        emit(&mut assembler);
        // 5: module 0's frame is overwritten in its FrameBuffer (by 9) before it is read.
        for m in 0..n_modules {
            send(&mut assembler, m, 5, 14, None, false);
        }
        send(&mut assembler, 0, 9, 18, None, true);
        emit(&mut assembler);
        // 6..8: complete again, several pending at once.
        for id in 6..9 {
            for m in 0..n_modules {
                send(&mut assembler, m, id, 9 + id, None, false);
            }
        }
        emit(&mut assembler);
        // Workers: image 5's overwritten module was zeroed in every band by a second round.
        let refills = if threads > 1 { 1 } else { 0 };
        assert_eq!(assembler.worker_stats().refills, refills, "{kind}");
        out
    }

    /// 2, 3 and 5 worker threads (runs of image rows, cutting through modules) make
    /// byte-identical images, identical metadata (checksum included) in the same order as one
    /// thread: JUNGFRAU converted and raw (4 modules, gaps, mirrored) and GigaFRoST (8 interleaved
    /// streams), with missing packets, a lost module, an id mismatch and a frame overwritten in
    /// its FrameBuffer.
    #[test]
    fn worker_threads_make_the_same_images_as_one_thread() {
        use std_daq_common::checksum::{image_checksum, CHECKSUM_XXH3_BLOCKS};
        for kind in ["jungfrau-converted", "jungfrau-raw", "gigafrost"] {
            let (cfg, calibration, packet_bytes) = multi_config(kind);
            let one = run_scenario(kind, &cfg, calibration.clone(), packet_bytes, 1);
            // Real behaviour of the reference run first.
            let summary: Vec<(u64, u16)> =
                one.iter().map(|(m, _)| (m.image_id, m.status)).collect();
            let (good, missing, lost, mismatch) = (1, 2, 4, 3);
            assert_eq!(
                summary,
                vec![
                    (1, good),
                    (2, missing),
                    (3, missing),
                    (4, mismatch),
                    (5, lost),
                    (6, good),
                    (7, good),
                    (8, good)
                ],
                "{kind}"
            );
            let n_packets = cfg.packets_per_frame() as u16;
            assert_eq!(
                &one[1].0.module_missing_packets[..4],
                &[0, 1, 0, if kind == "gigafrost" { 0 } else { 1 }]
            );
            assert_eq!(
                one[2].0.module_missing_packets[2], n_packets,
                "{kind}: lost module"
            );
            assert_eq!(
                one[4].0.module_missing_packets[0], n_packets,
                "{kind}: overwritten"
            );
            for (meta, bytes) in &one {
                assert_eq!(meta.checksum_kind, CHECKSUM_XXH3_BLOCKS);
                assert_eq!(
                    meta.checksum,
                    image_checksum(bytes),
                    "{kind} {}",
                    meta.image_id
                );
                let nonzero = bytes.iter().filter(|b| **b != 0).count();
                assert!(
                    nonzero > bytes.len() / 2,
                    "{kind} {}: {nonzero}",
                    meta.image_id
                );
            }
            assert_ne!(one[0].1, one[5].1, "{kind}: images differ");
            for threads in [2, 3, 5] {
                let many = run_scenario(kind, &cfg, calibration.clone(), packet_bytes, threads);
                assert_eq!(many.len(), one.len(), "{kind}, {threads} threads");
                for ((a, a_bytes), (b, b_bytes)) in one.iter().zip(&many) {
                    assert_eq!(a, b, "{kind}, {threads} threads: metadata");
                    assert!(
                        a_bytes == b_bytes,
                        "{kind}, {threads} threads: pixels of image {}",
                        a.image_id
                    );
                }
            }
        }
    }
}
