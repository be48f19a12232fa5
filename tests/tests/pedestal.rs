//! Pedestal runs and calibration hot swap through the real binaries (issue 15): receivers,
//! assembler (`jungfrau-converted`, `photons_int16`, 8 keV) and writer, the simulator's JUNGFRAU
//! dark frames and photon hits (`udp_recv::dark`), and `std-daq pedestal`.
//!
//! - `pedestal_run_makes_the_calibration_and_photon_counts_are_exact`: dark frames of G0, G1, G2;
//!   `std-daq pedestal` writes the assembler's calibration file; every pedestal is within
//!   `6 * noise_rms / sqrt(frames) + 0.5` ADU of the simulator's and equal (to f32 rounding) to
//!   the exact mean of the values sent; exactly the dead, wrong-gain, noisy and gain-file-masked
//!   pixels are masked; the running assembler takes the file (no restart) and the photon-hit
//!   frames then written are exactly the simulator's photon counts (MIN where masked), every
//!   image with the new calibration_id.
//! - `a_calibration_swapped_while_the_assembler_runs_converts_from_an_image_boundary`: while the
//!   simulator plays, the calibration file is replaced; every written image equals the photon
//!   formula of the calibration its `calibration_id` names, the ids go from the old to the new one
//!   once, and both occur.
#![allow(clippy::unwrap_used)]

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use std_daq::pipeline::default_bin_dir;
use std_daq_common::writer_command::{Command, RunSummary};
use std_daq_common::{names, DetectorConfig, ImageMetadata};
use std_daq_tests::stack::{poll_until, WATCHDOG};
use std_daq_tests::work_dir;
use std_writer_agent::writer_client::{ClientError, WriterClient};
use udp_recv::dark::{self, DarkSettings, JungfrauPixels, PixelClass, MODULE_PIXELS};

const H: usize = 512;
const W: usize = 1024;
const N_MODULES: usize = 2;
const ENERGY_KEV: f64 = 8.0;
/// G0 gain 8 ADU/keV: 64 ADU per 8 keV photon (the simulator's --jungfrau-hits).
const HIT_ADU: u16 = 64;
const SEED: u64 = 11;
const MIN: i16 = i16::MIN;

/// Receivers, assembler and writer of one detector (as tests/tests/assembly.rs runs them).
struct Services {
    work: PathBuf,
    config_path: PathBuf,
    config: DetectorConfig,
    bin: PathBuf,
    children: Vec<(String, Child)>,
    client: WriterClient,
}

impl Services {
    fn start(tag: &str, work: PathBuf, mut config: serde_json::Value) -> Result<Self> {
        std::fs::create_dir_all(work.join("ipc"))?;
        config["detector_name"] = format!("p{tag}{}", std::process::id()).into();
        config["start_udp_port"] = std_daq_tests::free_port_range(2)?.into();
        config["udp_bind_address"] = "127.0.0.1".into();
        config["ipc_dir"] = work.join("ipc").display().to_string().into();
        config["module_buffer_slots"] = 64.into();
        config["ram_buffer_gb"] = 0.25.into();
        let config_path = work.join("detector.json");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;
        let parsed = DetectorConfig::from_file(&config_path)?;
        let client = WriterClient::new(
            &zmq::Context::new(),
            &names::writer_command_endpoint(&parsed),
            Duration::from_secs(5),
        );
        let mut s = Services {
            work,
            config_path,
            config: parsed,
            bin: default_bin_dir()?,
            children: Vec::new(),
            client,
        };
        for m in 0..s.config.n_modules {
            let name = format!("std-udp-recv-{m}");
            s.spawn(&name, "std-udp-recv", &["--module", &m.to_string()])?;
        }
        s.spawn("std-assembler", "std-assembler", &[])?;
        s.spawn("std-h5-writer", "std-h5-writer", &[])?;
        poll_until("the writer connected to the image stream", WATCHDOG, || {
            let reply = s.client.request(&Command::Status).ok()?;
            reply.status.is_some_and(|st| st.connected).then_some(())
        })?;
        s.check_alive()?;
        Ok(s)
    }

    fn spawn(&mut self, name: &str, binary: &str, extra: &[&str]) -> Result<()> {
        let log = std::fs::File::create(self.work.join(format!("{name}.log")))?;
        let child = Process::new(self.bin.join(binary))
            .arg("--config")
            .arg(&self.config_path)
            .args(extra)
            .env("REDIS_SKIP", "1")
            // Tests of this binary run in parallel and spawn children while the test process has
            // HDF5 files open; libhdf5 opens without O_CLOEXEC, so a child can inherit a locked
            // descriptor and make the assembler's open of a calibration file fail (EAGAIN).
            .env("HDF5_USE_FILE_LOCKING", "FALSE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.work.join(format!("{name}.log"))).unwrap_or_default()
    }

    fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Some(st) = child.try_wait()? {
                let name = name.clone();
                bail!("{name} exited ({st}):\n{}", self.log(&name));
            }
        }
        Ok(())
    }

    fn start_run(&self, file: &Path, n: u64) -> Result<()> {
        let reply = self.client.request(&Command::Start {
            output_file: file.display().to_string(),
            n_images: n,
            request_id: None,
            context: Default::default(),
        })?;
        if !reply.ok {
            bail!("writer refused: {:?}", reply.error);
        }
        Ok(())
    }

    /// Polls the writer until its current run ended; its summary.
    fn wait_run_end(&mut self) -> Result<RunSummary> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            self.check_alive()?;
            match self.client.request(&Command::Status) {
                Ok(reply) => {
                    let st = reply.status.context("no status")?;
                    if st.current.is_none() {
                        return Ok(st.last_run.unwrap_or_default());
                    }
                }
                Err(ClientError::Timeout(_)) => {}
                Err(e) => return Err(e.into()),
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for the writer's run to end");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs the simulator to the end with `args` (after --config).
    fn simulate(&self, args: &[String]) -> Result<()> {
        let out = Process::new(self.bin.join("std-det-sim"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running std-det-sim")?;
        if !out.status.success() {
            bail!(
                "std-det-sim {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = Process::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for (_, child) in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Records `(image_id, calibration_id)` of every ImageMetadata the assembler publishes.
struct Follower {
    seen: Arc<Mutex<Vec<(u64, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Follower {
    /// Subscribes and returns once the first heartbeat arrived (the subscription is live).
    fn start(cfg: &DetectorConfig) -> Result<Self> {
        let ctx = zmq::Context::new();
        let sub = ctx.socket(zmq::SUB)?;
        sub.set_subscribe(b"")?;
        sub.set_rcvtimeo(50)?;
        sub.connect(&names::image_endpoint(cfg))?;
        poll_until("the assembler's heartbeat", WATCHDOG, || {
            sub.recv_bytes(0).ok().map(drop)
        })?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let _ctx = ctx;
            while !st.load(Ordering::Relaxed) {
                if let Ok(b) = sub.recv_bytes(0) {
                    if let Ok(m) = ImageMetadata::from_bytes(&b) {
                        s.lock().unwrap().push((m.image_id, m.calibration_id));
                    }
                }
            }
        });
        Ok(Follower {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    fn ids(&self) -> Vec<(u64, u64)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A calibration as the test writes and reads it: stacked `[3, n*512, 1024]` and `[n*512, 1024]`.
#[derive(Debug, Clone)]
struct Cal {
    gains: Vec<f32>,
    pedestals: Vec<f32>,
    mask: Vec<u8>,
}

const PLANE: usize = N_MODULES * H * W;

/// Opens an HDF5 file without HDF5's file lock. The tests of this binary run in parallel and
/// spawn children while this process has HDF5 files open; libhdf5 opens without O_CLOEXEC, so a
/// child started meanwhile keeps the locked descriptor (and its lock) for its life, and this
/// process's next open of the same file fails with EAGAIN (seen with the HTTP and RabbitMQ
/// tests in parallel). The children run without locking too (`HDF5_USE_FILE_LOCKING=FALSE`).
fn h5_open(path: &Path) -> hdf5::Result<hdf5::File> {
    hdf5::File::with_options()
        .with_fapl(|p| p.file_locking(false))
        .open(path)
}

/// [`h5_open`] for a new file.
fn h5_create(path: &Path) -> hdf5::Result<hdf5::File> {
    hdf5::File::with_options()
        .with_fapl(|p| p.file_locking(false))
        .create(path)
}

fn write_cal(path: &Path, c: &Cal) -> Result<()> {
    let tmp = path.with_extension("tmp.h5");
    {
        let f = h5_create(&tmp)?;
        let stack = [3, N_MODULES * H, W];
        f.new_dataset::<f32>()
            .shape(stack)
            .create("gains")?
            .write_raw(&c.gains)?;
        f.new_dataset::<f32>()
            .shape(stack)
            .create("pedestals")?
            .write_raw(&c.pedestals)?;
        f.new_dataset::<u8>()
            .shape([N_MODULES * H, W])
            .create("pixel_mask")?
            .write_raw(&c.mask)?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn read_cal(path: &Path) -> Result<Cal> {
    let f = h5_open(path)?;
    Ok(Cal {
        gains: f.dataset("gains")?.read_raw::<f32>()?,
        pedestals: f.dataset("pedestals")?.read_raw::<f32>()?,
        mask: f.dataset("pixel_mask")?.read_raw::<u8>()?,
    })
}

/// Gains whose `gain * 8 keV` is a power of two (G0 64, G1 -2, G2 -1/2 ADU per photon), so
/// the conversion is exact in f32 and f64; a few pixels masked in the gain file.
fn gain_file() -> Cal {
    let mut gains = vec![0f32; 3 * PLANE];
    gains[..PLANE].fill(8.0);
    gains[PLANE..2 * PLANE].fill(-0.25);
    gains[2 * PLANE..].fill(-0.0625);
    let mask = (0..PLANE)
        .map(|i| u8::from(i % 99_991 == 77))
        .collect::<Vec<_>>();
    Cal {
        gains,
        pedestals: vec![0.0; 3 * PLANE],
        mask,
    }
}

/// The assembler's photon count of raw pixel `v` at stacked pixel `i` (docs/calibration.md),
/// computed in f64: exact here because every `gain * energy` is a power of two.
fn photon(c: &Cal, i: usize, v: u16) -> i16 {
    if c.mask[i] != 0 {
        return MIN;
    }
    let stage = match v >> 14 {
        0 => 0,
        1 => 1,
        3 => 2,
        _ => return MIN,
    };
    let g = f64::from(c.gains[stage * PLANE + i]) * ENERGY_KEV;
    let p = f64::from(c.pedestals[stage * PLANE + i]);
    if g == 0.0 || !g.is_finite() || !p.is_finite() {
        return MIN;
    }
    let x = (f64::from(v & 0x3fff) - p) / g;
    x.round().clamp(-32767.0, 32767.0) as i16
}

/// `/<det>/data` and `/<det>/image_id` of a written file.
fn read_images(file: &Path, det: &str) -> Result<(Vec<i16>, Vec<u64>)> {
    let f = h5_open(file)?;
    let data = f.dataset(&format!("{det}/data"))?;
    let shape = data.shape();
    if shape[1..] != [N_MODULES * H, W] {
        bail!("data shape {shape:?}");
    }
    Ok((
        data.read_raw::<i16>()?,
        f.dataset(&format!("{det}/image_id"))?.read_raw::<u64>()?,
    ))
}

fn config(cal: &Path) -> serde_json::Value {
    serde_json::json!({
        "detector_type": "jungfrau-converted", "n_modules": 2, "bit_depth": 16,
        "image_pixel_height": 1024, "image_pixel_width": 1024,
        "calibration_file": cal.display().to_string(),
        "converted_output": "photons_int16", "photon_energy_kev": ENERGY_KEV,
        "module_positions": {"0": [0, 0, 1023, 511], "1": [0, 512, 1023, 1023]},
    })
}

/// Dark frames of G0, G1, G2 in turn, `frames` of each (`frames` distinct noise frames, so each
/// is used once), frame numbers from `first` on.
fn play_darks(s: &Services, frames: u64, first: u64) -> Result<()> {
    for (stage, name) in ["G0", "G1", "G2"].iter().enumerate() {
        s.simulate(&[
            "--jungfrau-dark".into(),
            name.to_string(),
            "--images".into(),
            frames.to_string(),
            "--start-frame".into(),
            (first + stage as u64 * frames).to_string(),
            "--noise-frames".into(),
            frames.to_string(),
            "--pixel-seed".into(),
            SEED.to_string(),
            "--rate".into(),
            "50".into(),
        ])?;
    }
    Ok(())
}

/// The assembler's log says it swapped in calibration `id` (it takes a replaced file without
/// restart, at an image boundary).
fn wait_for_swap(s: &Services, id: u64) -> Result<()> {
    poll_until(
        "the assembler to swap in the new calibration",
        WATCHDOG,
        || {
            s.log("std-assembler")
                .lines()
                .any(|l| l.contains("calibration swapped") && l.contains(&id.to_string()))
                .then_some(())
        },
    )
}

/// Frames per stage = distinct noise frames: each noise frame is used exactly once.
const FRAMES: u64 = 32;

#[test]
fn pedestal_run_makes_the_calibration_and_photon_counts_are_exact() {
    let work = work_dir("pedestal");
    std::fs::create_dir_all(&work).unwrap();
    let gain_path = work.join("gains.h5");
    let cal_path = work.join("calibration.h5");
    let gains = gain_file();
    write_cal(&gain_path, &gains).unwrap();
    // Before the first pedestal run: the gains with pedestals 0.
    write_cal(&cal_path, &gains).unwrap();
    let mut s = Services::start("ped", work.clone(), config(&cal_path)).unwrap();
    let det = s.config.detector_name.clone();
    let follower = Follower::start(&s.config).unwrap();

    // The pedestal run, following the stream before the first dark frame.
    let mut pedestal = Process::new(s.bin.join("std-daq"))
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .arg("pedestal")
        .arg("--config")
        .arg(&s.config_path)
        .arg("--gain-file")
        .arg(&gain_path)
        .args(["--frames", &FRAMES.to_string(), "--timeout-s", "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(pedestal.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let log_path = work.join("pedestal.log");
    std::thread::spawn(move || {
        let mut log = std::fs::File::create(log_path).unwrap();
        for line in stderr.lines().map_while(Result::ok) {
            use std::io::Write;
            let _ = writeln!(log, "{line}");
            let _ = tx.send(line);
        }
    });
    poll_until("std-daq pedestal ready", WATCHDOG, || {
        rx.try_recv().ok().filter(|l| l.starts_with("ready"))
    })
    .unwrap();

    play_darks(&s, FRAMES, 1).unwrap();
    let out = pedestal.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "std-daq pedestal failed: {stdout}\n{}",
        std::fs::read_to_string(work.join("pedestal.log")).unwrap_or_default()
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    eprintln!("pedestal report: {report}");
    let new_id = report["calibration_id"].as_u64().unwrap();

    // The file: datasets of docs/calibration.md plus RMS and masks; the id is the content's.
    let cal = read_cal(&cal_path).unwrap();
    assert_eq!(cal.gains, gains.gains, "gains are the gain file's");
    let mask_bool: Vec<bool> = cal.mask.iter().map(|m| *m != 0).collect();
    assert_eq!(
        assembler::calib::calibration_id(&cal.gains, &cal.pedestals, &mask_bool),
        new_id
    );
    let f = h5_open(&cal_path).unwrap();
    let rms = f
        .dataset("pedestal_rms")
        .unwrap()
        .read_raw::<f32>()
        .unwrap();
    let stage_mask = f
        .dataset("pedestal_mask")
        .unwrap()
        .read_raw::<u8>()
        .unwrap();
    let frames = f
        .dataset("pedestal_frames")
        .unwrap()
        .read_raw::<u32>()
        .unwrap();
    assert_eq!(frames, vec![FRAMES as u32; 3 * N_MODULES]);
    drop(f);

    // Every pixel against the simulator: pedestal within the statistical tolerance, equal to the
    // exact mean of what was sent, masks exactly the bad pixels.
    let (mut worst_sigma, mut worst_exact, mut classes) = (0f64, 0f64, [0usize; 4]);
    let mut frame_values = vec![0u16; MODULE_PIXELS];
    for stage in 0..3 {
        let settings = DarkSettings {
            pixels: JungfrauPixels::Dark { stage },
            seed: SEED,
            n_distinct: FRAMES as usize,
        };
        for m in 0..N_MODULES as u16 {
            let mut sum = vec![0u64; MODULE_PIXELS];
            let mut sum2 = vec![0u64; MODULE_PIXELS];
            for k in 0..FRAMES {
                let frame = 1 + stage as u64 * FRAMES + k;
                for (px, v) in frame_values.iter_mut().enumerate() {
                    *v = dark::raw_value(&settings, frame, m, px);
                }
                for px in 0..MODULE_PIXELS {
                    let a = u64::from(frame_values[px] & 0x3fff);
                    sum[px] += a;
                    sum2[px] += a * a;
                }
            }
            for px in 0..MODULE_PIXELS {
                let i = usize::from(m) * MODULE_PIXELS + px;
                let k = stage * PLANE + i;
                let class = dark::pixel_class(SEED, m, px);
                if stage == 0 {
                    classes[class as usize] += 1;
                }
                let bits = stage_mask[k];
                let gain_masked = gains.mask[i] != 0;
                assert_eq!(
                    bits & 8 != 0,
                    gain_masked,
                    "gain mask bit, pixel {i} stage {stage}"
                );
                let want = match class {
                    PixelClass::Normal => 0,
                    PixelClass::Dead if stage == 0 => 2,
                    PixelClass::Dead | PixelClass::WrongGain => 1,
                    PixelClass::Noisy => 4,
                };
                assert_eq!(
                    bits & 7,
                    want,
                    "mask of pixel {px} of module {m} ({class:?}) in stage {stage}"
                );
                assert_eq!(cal.mask[i] != 0, want != 0 || gain_masked, "pixel_mask {i}");
                if class != PixelClass::Normal {
                    continue;
                }
                let n = FRAMES as f64;
                let mean = sum[px] as f64 / n;
                let exact_rms = ((sum2[px] as f64 / n) - mean * mean).max(0.0).sqrt();
                let got = f64::from(cal.pedestals[k]);
                let truth = dark::pedestal(SEED, m, stage, px);
                let sigma = dark::noise_rms(SEED, m, stage, px);
                let tolerance = 6.0 * sigma / n.sqrt() + 0.5;
                assert!(
                    (got - truth).abs() <= tolerance,
                    "pedestal of pixel {px} module {m} stage {stage}: {got} vs {truth} (tolerance {tolerance})"
                );
                worst_sigma = worst_sigma.max((got - truth).abs() / (sigma / n.sqrt()));
                // f32 storage: within half an ulp of ~14000 (2^-11), plus the RMS's rounding.
                assert!((got - mean).abs() <= 1e-3, "{got} vs exact mean {mean}");
                worst_exact = worst_exact.max((got - mean).abs());
                assert!(
                    (f64::from(rms[k]) - exact_rms).abs() <= 1e-3 * exact_rms.max(1.0),
                    "rms of pixel {px} module {m} stage {stage}: {} vs {exact_rms}",
                    rms[k]
                );
            }
        }
    }
    eprintln!(
        "pedestals: worst |mean - pedestal| = {worst_sigma:.2} standard errors, worst vs the exact \
         mean {worst_exact:e} ADU; classes (normal, dead, wrong gain, noisy) {classes:?}"
    );
    assert!(
        classes[1] > 0 && classes[2] > 0 && classes[3] > 0,
        "{classes:?}"
    );

    // The running assembler takes the file at an image boundary: poll its log (no restart).
    poll_until(
        "the assembler to swap in the new calibration",
        WATCHDOG,
        || {
            s.log("std-assembler")
                .lines()
                .any(|l| l.contains("calibration swapped") && l.contains(&new_id.to_string()))
                .then_some(())
        },
    )
    .unwrap();

    // Photon hits on the pedestal: the counts are exactly the simulator's photons.
    const HITS: u64 = 16;
    const HIT_PATTERNS: usize = 8;
    let first = 3 * FRAMES + 1;
    let file = work.join("hits.h5");
    s.start_run(&file, HITS).unwrap();
    s.simulate(&[
        "--jungfrau-hits".into(),
        HIT_ADU.to_string(),
        "--images".into(),
        HITS.to_string(),
        "--start-frame".into(),
        first.to_string(),
        "--noise-frames".into(),
        HIT_PATTERNS.to_string(),
        "--pixel-seed".into(),
        SEED.to_string(),
        "--rate".into(),
        "50".into(),
    ])
    .unwrap();
    let run = s.wait_run_end().unwrap();
    assert_eq!(run.images_written, HITS, "{run:?}");
    let (data, ids) = read_images(&file, &det).unwrap();
    let hits = DarkSettings {
        pixels: JungfrauPixels::Hits { hit_adu: HIT_ADU },
        seed: SEED,
        n_distinct: HIT_PATTERNS,
    };
    let (mut photons_seen, mut masked_seen) = (0u64, 0u64);
    for (n, &frame) in ids.iter().enumerate() {
        assert!((first..first + HITS).contains(&frame), "image id {frame}");
        let image = &data[n * PLANE..(n + 1) * PLANE];
        let k = (frame % HIT_PATTERNS as u64) as usize;
        for m in 0..N_MODULES as u16 {
            for px in 0..MODULE_PIXELS {
                let i = usize::from(m) * MODULE_PIXELS + px;
                let got = image[i];
                let raw = dark::raw_value(&hits, frame, m, px);
                // The documented formula with the file's calibration...
                assert_eq!(
                    got,
                    photon(&cal, i, raw),
                    "image {frame} pixel {i} raw {raw:#x}"
                );
                // ...which is the simulator's photons wherever the pixel is not masked.
                let want = if cal.mask[i] != 0 {
                    MIN
                } else {
                    dark::photons(k, m, px) as i16
                };
                assert_eq!(got, want, "image {frame} module {m} pixel {px}");
                photons_seen += u64::from(got > 0);
                masked_seen += u64::from(got == MIN);
            }
        }
    }
    eprintln!("hits: {photons_seen} pixels with photons, {masked_seen} masked, all exact");
    assert!(photons_seen > 10_000 && masked_seen > 0);
    let seen = follower.ids();
    let hit_ids: Vec<u64> = seen
        .iter()
        .filter(|(id, _)| *id >= first)
        .map(|(_, c)| *c)
        .collect();
    assert_eq!(hit_ids.len() as u64, HITS, "{seen:?}");
    assert!(hit_ids.iter().all(|c| *c == new_id), "{seen:?}");
    drop(follower);
    drop(s);
    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn a_calibration_swapped_while_the_assembler_runs_converts_from_an_image_boundary() {
    let work = work_dir("calswap");
    std::fs::create_dir_all(&work).unwrap();
    let cal_path = work.join("calibration.h5");
    // A: pedestals 1000 + (i * 7) % 300; B: 3000 + (i * 3) % 500, another mask pixel set.
    let a = {
        let mut c = gain_file();
        for (i, p) in c.pedestals.iter_mut().enumerate() {
            *p = 1000.0 + ((i * 7) % 300) as f32;
        }
        c
    };
    let b = {
        let mut c = gain_file();
        for (i, p) in c.pedestals.iter_mut().enumerate() {
            *p = 3000.0 + ((i * 3) % 500) as f32;
        }
        for (i, m) in c.mask.iter_mut().enumerate() {
            *m = u8::from(i % 50_021 == 3);
        }
        c
    };
    write_cal(&cal_path, &a).unwrap();
    let id = |c: &Cal| {
        let mask: Vec<bool> = c.mask.iter().map(|m| *m != 0).collect();
        assembler::calib::calibration_id(&c.gains, &c.pedestals, &mask)
    };
    let (id_a, id_b) = (id(&a), id(&b));
    assert_ne!(id_a, id_b);
    let mut s = Services::start("swap", work.clone(), config(&cal_path)).unwrap();
    let det = s.config.detector_name.clone();
    let follower = Follower::start(&s.config).unwrap();
    const IMAGES: u64 = 150;
    let file = work.join("swap.h5");
    s.start_run(&file, IMAGES).unwrap();
    let sim = {
        let (bin, config) = (s.bin.clone(), s.config_path.clone());
        std::thread::spawn(move || {
            Process::new(bin.join("std-det-sim"))
                .arg("--config")
                .arg(config)
                .args(["--images", &IMAGES.to_string(), "--rate", "50"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
        })
    };
    // Swap once a third of the images went by with A.
    poll_until("images converted with A", WATCHDOG, || {
        (follower.ids().len() >= 50).then_some(())
    })
    .unwrap();
    write_cal(&cal_path, &b).unwrap();
    poll_until("images converted with B", WATCHDOG, || {
        follower.ids().iter().any(|(_, c)| *c == id_b).then_some(())
    })
    .unwrap();
    assert!(sim.join().unwrap().unwrap().success());
    let run = s.wait_run_end().unwrap();
    assert_eq!(run.images_written, IMAGES, "{run:?}");
    let seen = follower.ids();
    let by_id: std::collections::HashMap<u64, u64> = seen.iter().copied().collect();
    let (data, ids) = read_images(&file, &det).unwrap();
    let (mut with_a, mut with_b, mut swapped) = (0, 0, false);
    for (n, &frame) in ids.iter().enumerate() {
        let cid = *by_id
            .get(&frame)
            .unwrap_or_else(|| panic!("image {frame} not seen"));
        let c = if cid == id_a {
            assert!(!swapped, "image {frame} with A after an image with B");
            with_a += 1;
            &a
        } else if cid == id_b {
            swapped = true;
            with_b += 1;
            &b
        } else {
            panic!("image {frame}: calibration_id {cid} is neither A {id_a} nor B {id_b}");
        };
        let image = &data[n * PLANE..(n + 1) * PLANE];
        for m in 0..N_MODULES as u16 {
            for px in 0..MODULE_PIXELS {
                let i = usize::from(m) * MODULE_PIXELS + px;
                let raw = udp_recv::sim::pixel_value(frame, m, px);
                assert_eq!(
                    image[i],
                    photon(c, i, raw),
                    "image {frame} (calibration {cid}) pixel {i}"
                );
            }
        }
    }
    // The file's ledger records which calibration converted each image.
    let file_cids = h5_open(&file)
        .unwrap()
        .dataset(&format!("{det}/calibration_id"))
        .unwrap()
        .read_raw::<u64>()
        .unwrap();
    let want: Vec<u64> = ids.iter().map(|f| by_id[f]).collect();
    assert_eq!(file_cids, want, "calibration_id per image in the file");
    eprintln!("swap: {with_a} images with A, then {with_b} with B, every pixel exact");
    assert!(with_a >= 50 && with_b > 0, "{with_a} {with_b}");
    drop(follower);
    drop(s);
    std::fs::remove_dir_all(&work).unwrap();
}

/// The same run as a request to the HTTP API (`POST /pedestal`, then `GET /pedestal` until it
/// succeeded): the calibration file is written, its id reported, and the assembler takes it.
#[test]
fn a_pedestal_run_requested_over_http_writes_the_calibration_the_assembler_takes() {
    use std_daq_tests::stack::{http, start_api};
    let work = work_dir("pedapi");
    std::fs::create_dir_all(&work).unwrap();
    let gain_path = work.join("gains.h5");
    let cal_path = work.join("calibration.h5");
    let gains = gain_file();
    write_cal(&gain_path, &gains).unwrap();
    write_cal(&cal_path, &gains).unwrap();
    let s = Services::start("pedapi", work.clone(), config(&cal_path)).unwrap();
    let port = std_daq_tests::free_port().unwrap();
    let _api = start_api(&work, &s.config_path, &s.config.detector_name, port).unwrap();
    let json = |r: (u16, Vec<u8>)| -> (u16, serde_json::Value) {
        (r.0, serde_json::from_slice(&r.1).unwrap())
    };
    let (code, v) = json(
        http(
            port,
            "POST",
            "/pedestal",
            Some(&serde_json::json!({"frames_per_stage": 8})),
        )
        .unwrap(),
    );
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("gain_file"), "{v}");
    let body = serde_json::json!({"gain_file": gain_path.display().to_string(), "frames_per_stage": 8, "timeout_s": 120});
    let (code, v) = json(http(port, "POST", "/pedestal", Some(&body)).unwrap());
    assert_eq!(code, 202, "{v}");
    let (code, v) = json(http(port, "POST", "/pedestal", Some(&body)).unwrap());
    assert_eq!(code, 409, "a second run while one is in progress: {v}");
    poll_until("the run following the image stream", WATCHDOG, || {
        let (_, v) = json(http(port, "GET", "/pedestal", None).ok()?);
        (v["state"] == "running").then_some(())
    })
    .unwrap();
    play_darks(&s, 8, 1).unwrap();
    let v = poll_until("the run to end", WATCHDOG, || {
        let (_, v) = json(http(port, "GET", "/pedestal", None).ok()?);
        (v["state"] != "running").then_some(v)
    })
    .unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    let report = &v["report"];
    assert_eq!(
        report["stages"]["G1"]["frames"],
        serde_json::json!([8, 8]),
        "{v}"
    );
    let id = report["calibration_id"].as_u64().unwrap();
    let cal = read_cal(&cal_path).unwrap();
    let mask: Vec<bool> = cal.mask.iter().map(|m| *m != 0).collect();
    assert_eq!(
        assembler::calib::calibration_id(&cal.gains, &cal.pedestals, &mask),
        id
    );
    assert_eq!(cal.gains, gains.gains);
    // Dead, wrong-gain, noisy and gain-file pixels, nothing else (8 frames: as many as the
    // first test's 32 for these classes).
    let bad = (0..PLANE)
        .filter(|&i| {
            let (m, px) = ((i / MODULE_PIXELS) as u16, i % MODULE_PIXELS);
            dark::pixel_class(SEED, m, px) != PixelClass::Normal || gains.mask[i] != 0
        })
        .count() as u64;
    assert_eq!(report["pixels_masked"].as_u64(), Some(bad), "{v}");
    wait_for_swap(&s, id).unwrap();
    drop(s);
    std::fs::remove_dir_all(&work).unwrap();
}

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Whether RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) answer (scripts/setup.sh starts
/// them). Without them the test is skipped with a reason, except in CI (`CI=true`), where it
/// fails.
fn broker_available(test: &str) -> bool {
    let reach = |port: u16, what: &str| {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .map(drop)
            .map_err(|e| format!("{what} on 127.0.0.1:{port} is not reachable ({e})"))
    };
    match reach(5672, "RabbitMQ").and_then(|()| reach(6379, "Redis")) {
        Ok(()) => true,
        Err(e) => {
            let why = format!("{test}: {e}");
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{why}; in CI every prerequisite must be there (run scripts/setup.sh)");
            }
            eprintln!("skipped: {why} (run scripts/setup.sh)");
            false
        }
    }
}

/// One request of a thread of its own: its statuses as they come, then its outcome.
struct Request {
    id: String,
    statuses: std::sync::mpsc::Receiver<std_writer_agent::StatusMessage>,
    thread: std::thread::JoinHandle<
        Result<std_writer_agent::StatusMessage, std_writer_agent::client::BlockingError>,
    >,
}

impl Request {
    fn send(opts: &std_writer_agent::ClientOptions, body: &serde_json::Value) -> Request {
        let id = std_writer_agent::client::new_request_id();
        let (tx, statuses) = std::sync::mpsc::channel();
        let (opts, rid, body) = (opts.clone(), id.clone(), body.clone());
        let thread = std::thread::spawn(move || {
            std_writer_agent::client::send_request_blocking(&opts, &rid, &body, |s| {
                let _ = tx.send(s.clone());
            })
        });
        Request {
            id,
            statuses,
            thread,
        }
    }

    /// The non-final statuses up to and including the first with `state: "running"` (the run
    /// follows the image stream).
    fn until_running(&self) -> Vec<std_writer_agent::StatusMessage> {
        let mut seen = Vec::new();
        loop {
            let s = self
                .statuses
                .recv_timeout(WATCHDOG)
                .unwrap_or_else(|e| panic!("no running status ({e}); seen {seen:?}"));
            let running = s.body["state"] == "running";
            seen.push(s);
            if running {
                return seen;
            }
        }
    }

    /// The final status (request_success) or the request_fail one, and the statuses before.
    fn end(
        self,
    ) -> (
        Result<std_writer_agent::StatusMessage, std_writer_agent::StatusMessage>,
        Vec<std_writer_agent::StatusMessage>,
    ) {
        use std_writer_agent::client::{BlockingError, ClientError};
        let result = match self.thread.join().unwrap() {
            Ok(s) => Ok(s),
            Err(BlockingError::Client(ClientError::Failed(s))) => Err(*s),
            Err(e) => panic!("request {}: {e}", self.id),
        };
        (result, self.statuses.try_iter().collect())
    }
}

/// The same run as a request over RabbitMQ to `std-daq pedestal-agent` (real broker, real
/// binaries): a refused body (request_fail naming the field), a run killed while it follows
/// the stream (request_fail "killed", no file, the old calibration kept; a request sent
/// meanwhile refused as "in progress"), then a run that succeeds: request_start, progress with
/// state "running", request_success whose message is the report, its calibration_id the file's;
/// then the same through `std-daq pedestal --broker`; the service's Redis counters; SIGTERM
/// during a run ends it with request_fail.
#[test]
fn a_pedestal_run_requested_over_rabbitmq_reports_start_then_success_and_a_kill_writes_nothing() {
    use std_daq_tests::stack::Proc;
    use std_writer_agent::protocol::action;
    if !broker_available("pedestal over RabbitMQ") {
        return;
    }
    let work = work_dir("pedamqp");
    std::fs::create_dir_all(&work).unwrap();
    let gain_path = work.join("gains.h5");
    let cal_path = work.join("calibration.h5");
    let gains = gain_file();
    write_cal(&gain_path, &gains).unwrap();
    write_cal(&cal_path, &gains).unwrap();
    let s = Services::start("pedamqp", work.clone(), config(&cal_path)).unwrap();
    let det = s.config.detector_name.clone();
    let agent_log = work.join("pedestal-agent.log");
    let agent = Proc(
        Process::new(s.bin.join("std-daq"))
            .arg("pedestal-agent")
            .arg("--config")
            .arg(&s.config_path)
            .args(["--broker", BROKER])
            .env("HDF5_USE_FILE_LOCKING", "FALSE")
            .env_remove("PEDESTAL_TAG")
            .env_remove("REDIS_SKIP")
            .env_remove("SERVICE_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log).unwrap())
            .spawn()
            .unwrap(),
    );
    poll_until("the pedestal service on the broker", WATCHDOG, || {
        std::fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .contains("serving pedestal requests")
            .then_some(())
    })
    .unwrap();
    let opts = std_writer_agent::ClientOptions {
        broker_url: BROKER.into(),
        // The documented default routing key.
        tag: format!("{det}.pedestal"),
        idle_timeout: WATCHDOG,
    };
    let source = format!("{det}.pedestal_agent");
    let gain = gain_path.display().to_string();

    // Refused bodies: the HTTP route's checks, the field named, nothing started.
    for (body, words) in [
        (
            serde_json::json!({"gain_file": gain, "frames_per_stage": 8, "colour": 1}),
            "unknown field \"colour\"",
        ),
        (serde_json::json!({"frames_per_stage": 8}), "gain_file"),
        (
            serde_json::json!({"gain_file": gain, "output": "/tmp/elsewhere.h5"}),
            "output must be",
        ),
    ] {
        let (result, before) = Request::send(&opts, &body).end();
        let fail = result.unwrap_err();
        assert_eq!(fail.action, action::REQUEST_FAIL);
        assert!(fail.message.contains(words), "{words}: {fail:?}");
        assert_eq!(fail.source, source);
        assert!(before.is_empty(), "statuses before a refusal: {before:?}");
    }

    // Killed while it follows the stream: request_fail "killed", nothing written.
    let killed_path = work.join("killed.h5");
    let before_files = std::fs::read_dir(&work).unwrap().count();
    let body = serde_json::json!({
        "gain_file": gain, "frames_per_stage": 8, "timeout_s": 120,
        "output": killed_path.display().to_string(),
    });
    let victim = Request::send(&opts, &body);
    let seen = victim.until_running();
    assert_eq!(seen[0].action, action::REQUEST_START, "{seen:?}");
    // One run at a time.
    let (second, _) = Request::send(&opts, &body).end();
    let second = second.unwrap_err();
    assert!(second.message.contains("in progress"), "{second:?}");
    std_writer_agent::client::kill_blocking(&opts, &victim.id).unwrap();
    let (result, _) = victim.end();
    let fail = result.unwrap_err();
    assert_eq!(fail.action, action::REQUEST_FAIL);
    assert!(fail.message.starts_with("killed"), "{fail:?}");
    assert_eq!(fail.body["killed"], true, "{fail:?}");
    assert!(!killed_path.exists());
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), before_files);
    assert_eq!(read_cal(&cal_path).unwrap().pedestals, gains.pedestals);

    // The run that succeeds, into the config's calibration_file.
    let body = serde_json::json!({"gain_file": gain, "frames_per_stage": 8, "timeout_s": 120});
    let run = Request::send(&opts, &body);
    let seen = run.until_running();
    assert_eq!(seen[0].action, action::REQUEST_START, "{seen:?}");
    assert!(
        seen[1..]
            .iter()
            .all(|s| s.action == action::REQUEST_PROGRESS),
        "{seen:?}"
    );
    play_darks(&s, 8, 1).unwrap();
    let (result, after) = run.end();
    let done = result.unwrap_or_else(|f| panic!("request_fail: {f:?}"));
    assert_eq!(done.action, action::REQUEST_SUCCESS);
    assert!(
        after.iter().all(|s| s.action == action::REQUEST_PROGRESS),
        "{after:?}"
    );
    let report: serde_json::Value = serde_json::from_str(&done.message).unwrap();
    assert_eq!(done.body["report"], report);
    assert_eq!(done.body["gain_file"], gain.as_str(), "the request echoed");
    assert_eq!(
        report["stages"]["G1"]["frames"],
        serde_json::json!([8, 8]),
        "{report}"
    );
    assert_eq!(report["output"], cal_path.display().to_string());
    let id = report["calibration_id"].as_u64().unwrap();
    let cal = read_cal(&cal_path).unwrap();
    let mask: Vec<bool> = cal.mask.iter().map(|m| *m != 0).collect();
    assert_eq!(
        assembler::calib::calibration_id(&cal.gains, &cal.pedestals, &mask),
        id
    );
    // The file's attribute (decimal text) is the reported id.
    let f = h5_open(&cal_path).unwrap();
    let attr: hdf5::types::VarLenUnicode = f.attr("calibration_id").unwrap().read_scalar().unwrap();
    drop(f);
    assert_eq!(attr.as_str(), id.to_string());
    assert_eq!(cal.gains, gains.gains);
    wait_for_swap(&s, id).unwrap();

    // The same through the CLI: `std-daq pedestal --broker` (a refusal, then a run).
    let cli = |extra: &[&str]| {
        let mut c = Process::new(s.bin.join("std-daq"));
        c.args(["pedestal", "--broker", BROKER, "--tag", &opts.tag])
            .args(["--gain-file", &gain, "--frames", "8", "--timeout-s", "120"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let out = cli(&["--output", "/tmp/elsewhere.h5"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("output must be"), "{err}");
    let mut child = cli(&[]).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "{lines:?}");
        let ready = line.starts_with("ready:");
        lines.push(line);
        if ready {
            break;
        }
    }
    play_darks(&s, 8, 3 * 8 + 1).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{lines:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = h5_open(&cal_path).unwrap();
    let attr: hdf5::types::VarLenUnicode = f.attr("calibration_id").unwrap().read_scalar().unwrap();
    drop(f);
    assert_eq!(report["calibration_id"].to_string(), attr.as_str());

    // Its status hash (refreshed every few seconds) counts what happened: 5 refusals (3 bodies,
    // one "in progress", the CLI's), 1 killed run, 2 that succeeded.
    let mut redis = redis::Client::open("redis://127.0.0.1:6379/")
        .unwrap()
        .get_connection()
        .unwrap();
    let key = format!("status.std-daq.{det}.pedestal-agent");
    let want = [
        ("requests_received", "8"),
        ("requests_refused", "5"),
        ("runs_killed", "1"),
        ("runs_succeeded", "2"),
        ("runs_failed", "0"),
        ("state", "idle"),
    ];
    let mut last: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let counted = poll_until("the pedestal service's status hash", WATCHDOG, || {
        last = redis::cmd("HGETALL").arg(&key).query(&mut redis).ok()?;
        want.iter()
            .all(|(k, v)| last.get(*k).map(String::as_str) == Some(*v))
            .then_some(())
    });
    assert!(counted.is_ok(), "{key}: {last:?}");
    assert_eq!(last.get("last_calibration_id"), Some(&attr.to_string()));

    // SIGTERM during a run: cancelled, request_fail saying so, nothing written.
    let body = serde_json::json!({
        "gain_file": gain, "frames_per_stage": 8, "timeout_s": 120,
        "output": killed_path.display().to_string(),
    });
    let last_run = Request::send(&opts, &body);
    last_run.until_running();
    drop(agent);
    let (result, _) = last_run.end();
    let fail = result.unwrap_err();
    assert!(
        fail.message.starts_with("the pedestal service is stopping"),
        "{fail:?}"
    );
    assert!(!killed_path.exists());
    drop(s);
    std::fs::remove_dir_all(&work).unwrap();
}
