//! The assembler service loop: ModuleFrames in (ZMQ PULL), images into the ImageBuffer,
//! ImageMetadata out (ZMQ PUB). Sockets and rings are passed in, so tests can run it in-process.
//!
//! The PUB also carries an empty message every `HEARTBEAT` so that subscribers can tell the
//! assembler is up (and that their subscription has reached it) before a run starts.

use crate::place::Geometry;
use crate::sync::{ReadyImage, Synchronizer};
use image_buffer::{RingOwner, RingReader};
use std::fmt;
use std::time::{Duration, Instant};
use std_daq_common::messages::IMAGE_METADATA_VERSION;
use std_daq_common::service::Shutdown;
use std_daq_common::status::StatusBoard;
use std_daq_common::{DetectorConfig, Dtype, ImageMetadata, ImageStatus, ModuleFrame};

pub const HEARTBEAT: Duration = Duration::from_millis(200);
const POLL_MS: i64 = 10;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AssemblerStats {
    pub images: u64,
    pub images_good: u64,
    pub images_missing_packets: u64,
    pub images_lost_in_buffer: u64,
    /// Module frames whose FrameBuffer slot was overwritten before the assembler read it.
    pub module_frames_overwritten: u64,
    pub invalid_messages: u64,
}

impl fmt::Display for AssemblerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "images={} good={} missing_packets={} lost_in_buffer={} module_frames_overwritten={} invalid_messages={}",
            self.images,
            self.images_good,
            self.images_missing_packets,
            self.images_lost_in_buffer,
            self.module_frames_overwritten,
            self.invalid_messages
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AssemblerError {
    #[error("ZMQ: {0}")]
    Zmq(#[from] zmq::Error),
}

/// Synchroniser, geometry and the rings, without sockets.
#[derive(Debug)]
pub struct Assembler {
    geometry: Geometry,
    sync: Synchronizer,
    module_rings: Vec<RingReader<ModuleFrame>>,
    image_ring: RingOwner<ImageMetadata>,
    dtype: Dtype,
    packets_per_frame: u32,
    pub stats: AssemblerStats,
}

impl Assembler {
    pub fn new(
        cfg: &DetectorConfig,
        module_rings: Vec<RingReader<ModuleFrame>>,
        image_ring: RingOwner<ImageMetadata>,
    ) -> Self {
        Assembler {
            geometry: Geometry::from_config(cfg),
            sync: Synchronizer::new(
                usize::from(cfg.n_modules),
                Duration::from_millis(u64::from(cfg.module_sync_timeout_ms)),
                cfg.module_sync_queue_size as usize,
            ),
            module_rings,
            image_ring,
            dtype: cfg.image_dtype(),
            packets_per_frame: cfg.packets_per_frame(),
            stats: AssemblerStats::default(),
        }
    }

    /// Shows the counters in the service's Redis status hash.
    pub fn publish_status(&self, board: &StatusBoard) {
        let (a, s) = (&self.stats, &self.sync.stats);
        board.set("images", a.images);
        board.set("images_good", a.images_good);
        board.set("images_missing_packets", a.images_missing_packets);
        board.set("images_lost_in_buffer", a.images_lost_in_buffer);
        board.set("module_frames_overwritten", a.module_frames_overwritten);
        board.set("invalid_messages", a.invalid_messages + s.invalid_frames);
        board.set("duplicate_frames", s.duplicate_frames);
        board.set("late_frames", s.late_frames);
        board.set("pending_images", self.sync.n_pending());
    }

    /// Takes one raw message from a receiver.
    pub fn on_message(&mut self, bytes: &[u8], now: Instant) {
        match ModuleFrame::from_bytes(bytes) {
            Ok(frame) => {
                self.sync.push(frame, now);
            }
            Err(_) => self.stats.invalid_messages += 1,
        }
    }

    /// Assembles and publishes every image that is ready (all of them when `flush`).
    pub fn emit_ready(
        &mut self,
        now: Instant,
        flush: bool,
        publish: &mut impl FnMut(&ImageMetadata),
    ) {
        loop {
            let ready = if flush {
                self.sync.pop_any(now)
            } else {
                self.sync.pop_ready(now)
            };
            let Some(ready) = ready else { break };
            if let Some(meta) = self.assemble(&ready) {
                publish(&meta);
            }
        }
    }

    fn assemble(&mut self, ready: &ReadyImage) -> Option<ImageMetadata> {
        let mut meta = ImageMetadata {
            image_id: ready.image_id,
            data_bytes: self.geometry.image_bytes() as u64,
            height: self.geometry.image_height as u32,
            width: self.geometry.image_width as u32,
            n_modules: ready.frames.len() as u16,
            dtype: self.dtype as u16,
            version: IMAGE_METADATA_VERSION,
            ..bytemuck::Zeroable::zeroed()
        };
        // Receivers only hand on ids below MAX_IMAGE_ID, so this cannot fail for valid input.
        let mut slot = match self.image_ring.begin_write(ready.image_id) {
            Ok(slot) => slot,
            Err(e) => {
                tracing::error!(image_id = ready.image_id, "cannot write image: {e}");
                return None;
            }
        };
        let mut lost_in_buffer = false;
        let image = slot.data_mut();
        for (m, frame) in ready.frames.iter().enumerate() {
            let placed = frame.and_then(|frame| {
                let geometry = &self.geometry;
                match self.module_rings[m]
                    .read(ready.image_id, |_, src| geometry.place(m, src, image))
                {
                    Ok(()) => Some(frame),
                    Err(_) => {
                        self.stats.module_frames_overwritten += 1;
                        lost_in_buffer = true;
                        None
                    }
                }
            });
            match placed {
                Some(frame) => {
                    meta.missing_packets += u32::from(frame.n_missing_packets);
                    meta.frame_index = frame.frame_index;
                    meta.timestamp = frame.timestamp;
                }
                None => {
                    self.geometry.zero(m, image);
                    meta.set_module_missing(m);
                    meta.missing_packets += self.packets_per_frame;
                }
            }
        }
        let status = if meta.missing_packets == 0 {
            self.stats.images_good += 1;
            ImageStatus::Good
        } else if lost_in_buffer {
            self.stats.images_lost_in_buffer += 1;
            ImageStatus::LostInBuffer
        } else {
            self.stats.images_missing_packets += 1;
            ImageStatus::MissingPackets
        };
        meta.status = status as u16;
        *slot.meta_mut() = meta;
        slot.commit();
        self.stats.images += 1;
        Some(meta)
    }
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
    let mut buf = [0u8; 512];
    let mut last_heartbeat: Option<Instant> = None;
    let mut last_report = Instant::now();
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
        let now = Instant::now();
        assembler.emit_ready(now, stopping && !readable, &mut publish);
        if stopping && !readable {
            break;
        }
        if last_heartbeat.is_none_or(|t| now.duration_since(t) >= HEARTBEAT) {
            let _ = publisher.send(&[][..], zmq::DONTWAIT);
            last_heartbeat = Some(now);
        }
        if now.duration_since(last_report) >= stats_period {
            tracing::info!(pending = assembler.sync.n_pending(), "{}", assembler.stats);
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
