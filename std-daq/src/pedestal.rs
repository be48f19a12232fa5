//! `std-daq pedestal` (and `POST /pedestal` of the HTTP API): a pedestal run on a running
//! JUNGFRAU pipeline.
//!
//! The assembler of a `jungfrau-converted` detector writes converted images into the ImageBuffer,
//! so the run reads the **raw module frames** instead: it follows the assembler's ImageMetadata
//! stream (SUB on `ipc://<ipc_dir>/std-daq-<det>-image`) for the ids of the images the pipeline
//! completed, and copies each module's frame of that id out of the module's FrameBuffer
//! (`/dev/shm/std-daq.<det>.module-<m>`, attached read-only; the seqlock says whether the copy is
//! intact). A module frame is used only if it is whole: not missing from the image, all its
//! packets received, not overwritten while read; others are counted and skipped. The frames go
//! into [`assembler::pedestal::PedestalAccumulator`] (each frame's stage from its gain bits) until
//! every module has `frames_per_stage` frames of each of G0, G1, G2, then the calibration file is
//! written atomically with the gains of the gain file. With the assembler's `calibration_file` as
//! the output, the running assembler takes the new calibration at the next image boundary.
//!
//! The run works the same for `jungfrau-raw` (the FrameBuffers are the same).

use anyhow::{bail, Context, Result};
use assembler::pedestal::{
    self, FrameUse, GainFile, PedestalAccumulator, PedestalResult, PedestalSettings, Provenance,
    STAGE_NAMES,
};
use image_buffer::{Expect, RingReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use std_daq_common::config::jungfrau;
use std_daq_common::{names, DetectorConfig, DetectorType, ImageMetadata, ModuleFrame};

/// What to do.
#[derive(Debug, Clone)]
pub struct PedestalOptions {
    pub settings: PedestalSettings,
    /// HDF5 file with `gains` `[3, n*512, 1024]` (ADU/keV) and optionally `pixel_mask`.
    pub gain_file: PathBuf,
    /// The calibration file to write (default: the config's `calibration_file`).
    pub output: PathBuf,
    /// The whole run fails if it has not got its frames by then.
    pub timeout: Duration,
}

/// Counts while the run goes on, and at its end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PedestalProgress {
    /// Frames used per `[module][stage]`.
    pub frames: Vec<[u32; 3]>,
    pub images_seen: u64,
    /// Module frames not used: missing from the image, with missing packets, or overwritten in
    /// the FrameBuffer before they were read.
    pub module_frames_incomplete: u64,
    pub module_frames_lost: u64,
    /// Frames of a stage that already had its frames.
    pub surplus_frames: u64,
    /// Frames most of whose pixels had gain code 10.
    pub invalid_frames: u64,
}

/// The outcome: the file written and what it holds.
#[derive(Debug, Clone)]
pub struct PedestalReport {
    pub output: PathBuf,
    pub calibration_id: u64,
    pub progress: PedestalProgress,
    /// Per stage: pixels with mask bit 1, 2, 4, 8 (`assembler::pedestal` docs).
    pub masked: [[u64; 4]; 3],
    /// Pixels of `pixel_mask` set.
    pub pixels_masked: u64,
    pub median_rms: Vec<[f64; 3]>,
}

impl PedestalReport {
    pub fn to_json(&self) -> serde_json::Value {
        let stages: serde_json::Map<String, serde_json::Value> = (0..3)
            .map(|s| {
                let m = self.masked[s];
                (
                    STAGE_NAMES[s].to_string(),
                    serde_json::json!({
                        "frames": self.progress.frames.iter().map(|f| f[s]).collect::<Vec<_>>(),
                        "median_rms": self.median_rms.iter().map(|r| r[s]).collect::<Vec<_>>(),
                        "masked_too_few": m[0], "masked_rms_low": m[1],
                        "masked_rms_high": m[2], "masked_gain_file": m[3],
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "output": self.output.display().to_string(),
            "calibration_id": self.calibration_id,
            "pixels_masked": self.pixels_masked,
            "stages": stages,
            "images_seen": self.progress.images_seen,
            "module_frames_incomplete": self.progress.module_frames_incomplete,
            "module_frames_lost": self.progress.module_frames_lost,
            "surplus_frames": self.progress.surplus_frames,
            "invalid_frames": self.progress.invalid_frames,
        })
    }
}

impl PedestalProgress {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "frames": self.frames,
            "images_seen": self.images_seen,
            "module_frames_incomplete": self.module_frames_incomplete,
            "module_frames_lost": self.module_frames_lost,
            "surplus_frames": self.surplus_frames,
            "invalid_frames": self.invalid_frames,
        })
    }
}

/// Runs a pedestal run on the detector of `cfg`. `on_ready` is called once the image stream is
/// live (the first heartbeat or image arrived: frames from now on are seen), `on_progress` at most
/// a few times a second, `cancelled` is polled as often.
pub fn run(
    cfg: &DetectorConfig,
    opts: &PedestalOptions,
    cancelled: &dyn Fn() -> bool,
    on_ready: &mut dyn FnMut(),
    on_progress: &mut dyn FnMut(&PedestalProgress),
) -> Result<PedestalReport> {
    if !matches!(
        cfg.detector_type,
        DetectorType::JungfrauRaw | DetectorType::JungfrauConverted
    ) {
        bail!("a pedestal run needs a JUNGFRAU detector (detector_type jungfrau-raw or jungfrau-converted)");
    }
    opts.settings.check().map_err(anyhow::Error::msg)?;
    let n = usize::from(cfg.n_modules);
    // The gain file first: a wrong one fails before any frame is taken.
    let gains = GainFile::load(&opts.gain_file, n)
        .with_context(|| format!("reading gain file {}", opts.gain_file.display()))?;
    let deadline = Instant::now() + opts.timeout;
    let mut rings = Vec::with_capacity(n);
    for m in 0..cfg.n_modules {
        let name = names::module_buffer_name(&cfg.detector_name, m);
        let expect = Expect {
            n_slots: Some(u64::from(cfg.module_buffer_slots)),
            slot_bytes: Some(cfg.module_frame_bytes() as u64),
        };
        let ring: RingReader<ModuleFrame> =
            RingReader::attach_wait(&name, expect, opts.timeout, cancelled).with_context(|| {
                format!("attaching FrameBuffer {name} (is receiver {m} running?)")
            })?;
        rings.push((name, expect, ring));
    }
    let ctx = zmq::Context::new();
    let sub = ctx.socket(zmq::SUB)?;
    sub.set_subscribe(b"")?;
    sub.set_rcvhwm(100_000)?;
    let endpoint = names::image_endpoint(cfg);
    sub.connect(&endpoint)
        .with_context(|| format!("connecting to {endpoint}"))?;

    let mut acc = PedestalAccumulator::new(n, opts.settings);
    let mut progress = PedestalProgress {
        frames: vec![[0; 3]; n],
        ..PedestalProgress::default()
    };
    let mut bytes = vec![0u8; jungfrau::FRAME_BYTES];
    let mut pixels = vec![0u16; jungfrau::FRAME_BYTES / 2];
    let mut msg = [0u8; 4096];
    let mut ready = false;
    let mut last_progress = Instant::now();
    while !acc.is_complete() {
        if cancelled() {
            bail!(
                "cancelled with {:?} frames per module and stage",
                acc.frames()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {:?}: frames per module [G0, G1, G2] {:?} of {} each \
                 (is the detector sending dark frames of every stage?)",
                opts.timeout,
                acc.frames(),
                opts.settings.frames_per_stage
            );
        }
        if last_progress.elapsed() >= Duration::from_millis(250) {
            progress.frames = acc.frames();
            on_progress(&progress);
            last_progress = Instant::now();
            // A restarted receiver made a new FrameBuffer under the same name.
            for (name, expect, ring) in &mut rings {
                if ring.is_replaced() {
                    if let Ok(new) = RingReader::attach(name, *expect) {
                        *ring = new;
                    }
                }
            }
        }
        let mut items = [sub.as_poll_item(zmq::POLLIN)];
        match zmq::poll(&mut items, 100) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => return Err(e).context("polling the image stream"),
        }
        if !items[0].is_readable() {
            continue;
        }
        let len = match sub.recv_into(&mut msg, zmq::DONTWAIT) {
            Ok(len) => len,
            Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => continue,
            Err(e) => return Err(e).context("receiving from the image stream"),
        };
        if !ready {
            ready = true;
            on_ready();
        }
        if len == 0 || len > msg.len() {
            continue; // heartbeat (or not ours)
        }
        let Ok(meta) = ImageMetadata::from_bytes(&msg[..len]) else {
            continue;
        };
        progress.images_seen += 1;
        for (m, (_, _, ring)) in rings.iter().enumerate() {
            if meta.module_missing(m) {
                progress.module_frames_incomplete += 1;
                continue;
            }
            match ring.copy_out(meta.image_id, &mut bytes) {
                Ok(frame) if frame.n_missing_packets == 0 => {
                    for (p, b) in pixels.iter_mut().zip(bytes.chunks_exact(2)) {
                        *p = u16::from_le_bytes([b[0], b[1]]);
                    }
                    match acc.add_frame(m, &pixels) {
                        FrameUse::Counted(_) => {}
                        FrameUse::Surplus(_) => progress.surplus_frames += 1,
                        FrameUse::Invalid => progress.invalid_frames += 1,
                    }
                }
                Ok(_) => progress.module_frames_incomplete += 1,
                Err(_) => progress.module_frames_lost += 1,
            }
        }
    }
    progress.frames = acc.frames();
    on_progress(&progress);
    let result: PedestalResult = acc.finish(&gains.gains, &gains.mask);
    let provenance = Provenance {
        gain_file: opts.gain_file.clone(),
        detector_name: cfg.detector_name.clone(),
        settings: opts.settings,
    };
    let calibration_id = pedestal::write_calibration(&opts.output, &gains, &result, &provenance)
        .with_context(|| format!("writing the calibration file {}", opts.output.display()))?;
    Ok(PedestalReport {
        output: opts.output.clone(),
        calibration_id,
        progress,
        masked: result.masked,
        pixels_masked: result.pixel_mask.iter().map(|m| u64::from(*m)).sum(),
        median_rms: result.median_rms,
    })
}
