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
use std::path::{Path, PathBuf};
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

/// `POST /pedestal`, `GET /pedestal`, `POST /pedestal/cancel` of `std-daq api` (needs
/// `--config`): one pedestal run at a time, on its own thread, as `std-daq pedestal` runs it.
///
/// Body of `POST /pedestal`: `{"gain_file": str (required), "frames_per_stage": int (1000),
/// "output": str (the config's calibration_file), "min_fraction": 0.9, "min_rms": 0.1,
/// "max_rms_factor": 3.0, "timeout_s": 600}`. `output` must be an absolute `.h5` path in the
/// folder of the config's `calibration_file` (the API never writes elsewhere). Answers 202
/// `{"pedestal_id", "state": "starting"}`, 400 (bad body, with the reason), 409 (one is
/// running), 503 (no `--config`). `GET /pedestal`: `{"pedestal_id", "state": "idle" | "starting"
/// | "running" | "succeeded" | "failed", "progress", "report" (as `std-daq pedestal` prints it)
/// or "error"}`; "running" means the run follows the image stream (start the dark frames).
#[derive(Debug)]
pub struct PedestalApi {
    cfg: Option<DetectorConfig>,
    state: std::sync::Arc<std::sync::Mutex<ApiState>>,
}

#[derive(Debug, Default)]
struct ApiState {
    id: u64,
    state: &'static str,
    progress: Option<PedestalProgress>,
    report: Option<serde_json::Value>,
    error: Option<String>,
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl PedestalApi {
    pub fn new(cfg: Option<DetectorConfig>) -> Self {
        PedestalApi {
            cfg,
            state: std::sync::Arc::new(std::sync::Mutex::new(ApiState {
                state: "idle",
                ..ApiState::default()
            })),
        }
    }

    /// Answers the pedestal routes; `None` for any other.
    pub fn route(&self, method: &str, path: &str, body: &[u8]) -> Option<(u16, serde_json::Value)> {
        match (method, path) {
            ("GET", "/pedestal") => Some((200, self.status())),
            ("POST", "/pedestal") => Some(self.start(body)),
            ("POST", "/pedestal/cancel") => {
                let st = self.state.lock().ok()?;
                st.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                Some((
                    200,
                    serde_json::json!({"pedestal_id": st.id, "cancel": "sent"}),
                ))
            }
            _ => None,
        }
    }

    fn status(&self) -> serde_json::Value {
        let Ok(st) = self.state.lock() else {
            return serde_json::json!({"error": "state lock poisoned"});
        };
        serde_json::json!({
            "pedestal_id": st.id,
            "state": st.state,
            "progress": st.progress.as_ref().map(PedestalProgress::to_json),
            "report": st.report,
            "error": st.error,
        })
    }

    fn start(&self, body: &[u8]) -> (u16, serde_json::Value) {
        let bad = |m: String| (400, serde_json::json!({ "error": m }));
        let Some(cfg) = self.cfg.clone() else {
            return (
                503,
                serde_json::json!({"error": "std-daq api was started without --config"}),
            );
        };
        let opts = match options_from_body(&cfg, body) {
            Ok(o) => o,
            Err(e) => return bad(e),
        };
        let Ok(mut st) = self.state.lock() else {
            return (500, serde_json::json!({"error": "state lock poisoned"}));
        };
        if matches!(st.state, "starting" | "running") {
            return (
                409,
                serde_json::json!({"error": "a pedestal run is in progress", "pedestal_id": st.id}),
            );
        }
        st.id += 1;
        st.state = "starting";
        st.progress = None;
        st.report = None;
        st.error = None;
        st.cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (id, cancel, state) = (st.id, st.cancel.clone(), self.state.clone());
        drop(st);
        std::thread::spawn(move || {
            let set = |f: &dyn Fn(&mut ApiState)| {
                if let Ok(mut s) = state.lock() {
                    f(&mut s);
                }
            };
            let result = run(
                &cfg,
                &opts,
                &|| cancel.load(std::sync::atomic::Ordering::Relaxed),
                &mut || set(&|s| s.state = "running"),
                &mut |p| set(&|s| s.progress = Some(p.clone())),
            );
            match result {
                Ok(report) => {
                    tracing::info!(
                        calibration_id = report.calibration_id,
                        output = %report.output.display(),
                        "pedestal run succeeded"
                    );
                    let json = report.to_json();
                    set(&|s| {
                        s.state = "succeeded";
                        s.progress = Some(report.progress.clone());
                        s.report = Some(json.clone());
                    });
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    tracing::warn!("pedestal run failed: {msg}");
                    set(&|s| {
                        s.state = "failed";
                        s.error = Some(msg.clone());
                    });
                }
            }
        });
        (
            202,
            serde_json::json!({"pedestal_id": id, "state": "starting"}),
        )
    }
}

/// The options of a `POST /pedestal` body (module docs of [`PedestalApi`]); also the body of a
/// pedestal request over RabbitMQ ([`crate::pedestal_agent`]), judged the same way. The error
/// names the field at fault.
pub fn options_from_body(cfg: &DetectorConfig, body: &[u8]) -> Result<PedestalOptions, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("the body must be a JSON object")?;
    const KEYS: [&str; 7] = [
        "gain_file",
        "frames_per_stage",
        "output",
        "min_fraction",
        "min_rms",
        "max_rms_factor",
        "timeout_s",
    ];
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(format!("unknown field {k:?} (known: {})", KEYS.join(", ")));
    }
    let gain_file = obj
        .get("gain_file")
        .and_then(|g| g.as_str())
        .ok_or("gain_file (a path) is required")?;
    let number = |k: &str, default: f64| -> Result<f64, String> {
        match obj.get(k) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or(format!("{k} must be a number")),
        }
    };
    let d = PedestalSettings::default();
    let frames = number("frames_per_stage", f64::from(d.frames_per_stage))?;
    if frames.fract() != 0.0 || !(1.0..=1e6).contains(&frames) {
        return Err("frames_per_stage must be an integer 1..=1000000".into());
    }
    let settings = PedestalSettings {
        frames_per_stage: frames as u32,
        min_fraction: number("min_fraction", d.min_fraction)?,
        min_rms: number("min_rms", d.min_rms)?,
        max_rms_factor: number("max_rms_factor", d.max_rms_factor)?,
    };
    settings.check().map_err(|e| e.to_string())?;
    let timeout = number("timeout_s", 600.0)?;
    if !(timeout > 0.0 && timeout.is_finite()) {
        return Err("timeout_s must be a positive number".into());
    }
    let calibration = cfg
        .calibration_file
        .clone()
        .ok_or("the config has no calibration_file (the API writes only next to it)")?;
    let output = match obj.get("output").and_then(|o| o.as_str()) {
        None => calibration.clone(),
        Some(o) => {
            let o = PathBuf::from(o);
            let same_dir = o.parent() == calibration.parent();
            let ok = o.is_absolute()
                && same_dir
                && o.extension().is_some_and(|e| e == "h5")
                && !o.components().any(|c| c == std::path::Component::ParentDir);
            if !ok {
                return Err(format!(
                    "output must be an absolute .h5 path in {} (the folder of the config's calibration_file)",
                    calibration.parent().unwrap_or(Path::new("/")).display()
                ));
            }
            o
        }
    };
    Ok(PedestalOptions {
        settings,
        gain_file: PathBuf::from(gain_file),
        output,
        timeout: Duration::from_secs_f64(timeout),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg() -> DetectorConfig {
        let json = serde_json::json!({
            "detector_name": "pt", "detector_type": "jungfrau-converted", "n_modules": 1,
            "bit_depth": 16, "image_pixel_height": 512, "image_pixel_width": 1024,
            "start_udp_port": 50000, "calibration_file": "/cal/jf.h5",
            "module_positions": {"0": [0, 0, 1023, 511]},
        });
        DetectorConfig::from_json_str(&json.to_string(), "test").unwrap()
    }

    #[test]
    fn api_bodies_are_checked_and_outputs_stay_next_to_the_calibration() {
        let c = cfg();
        let o =
            options_from_body(&c, br#"{"gain_file": "/g.h5", "frames_per_stage": 50}"#).unwrap();
        assert_eq!(o.output, PathBuf::from("/cal/jf.h5"));
        assert_eq!(o.settings.frames_per_stage, 50);
        let o = options_from_body(&c, br#"{"gain_file": "/g.h5", "output": "/cal/new.h5"}"#);
        assert_eq!(o.unwrap().output, PathBuf::from("/cal/new.h5"));
        for (body, words) in [
            (&br#"{"frames_per_stage": 5}"#[..], "gain_file"),
            (
                br#"{"gain_file": "/g.h5", "output": "/etc/x.h5"}"#,
                "output must be",
            ),
            (
                br#"{"gain_file": "/g.h5", "output": "/cal/../x.h5"}"#,
                "output must be",
            ),
            (
                br#"{"gain_file": "/g.h5", "frames_per_stage": 1.5}"#,
                "integer",
            ),
            (
                br#"{"gain_file": "/g.h5", "max_rms_factor": 0.5}"#,
                "above 1",
            ),
            (br#"{"gain_file": "/g.h5", "colour": 1}"#, "unknown field"),
            (b"[]", "object"),
        ] {
            let e = options_from_body(&c, body).unwrap_err();
            assert!(e.contains(words), "{e}");
        }
        let api = PedestalApi::new(None);
        assert_eq!(api.route("POST", "/pedestal", b"{}").unwrap().0, 503);
        assert_eq!(
            api.route("GET", "/pedestal", b"").unwrap().1["state"],
            "idle"
        );
        assert!(api.route("GET", "/pedestals", b"").is_none());
    }
}
