//! End-to-end assembly (issue 3): real processes with configs written here (chip gaps, mirrored
//! modules, JUNGFRAU conversion with a calibration file made by h5py), checked pixel by pixel by
//! `tests/python/verify_assembly.py`, which recomputes geometry and conversion with numpy.
//! Also: a receiver stopped mid-run (SIGSTOP) flags its module missing, and images are good
//! again once it continues (SIGCONT).
#![allow(clippy::unwrap_used)]

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};
use std_daq::pipeline::default_bin_dir;
use std_daq_common::writer_command::{Command, RunSummary};
use std_daq_common::{names, DetectorConfig};
use std_daq_tests::{python, work_dir};
use std_writer_agent::writer_client::{ClientError, WriterClient};

/// The services of one detector, started from a config file written by the test.
struct Services {
    work: PathBuf,
    config_path: PathBuf,
    config: DetectorConfig,
    bin: PathBuf,
    children: Vec<(String, Child)>,
    client: WriterClient,
}

fn kill(pid: u32, signal: &str) {
    let _ = Process::new("kill")
        .args([signal, &pid.to_string()])
        .status();
}

impl Services {
    fn start(tag: &str, mut config: serde_json::Value) -> Result<Self> {
        let work = work_dir(tag);
        std::fs::create_dir_all(work.join("ipc"))?;
        let port = 40_000 + (std::process::id() % 1000) as u16 * 8 + tag.len() as u16 * 2;
        config["detector_name"] = format!("a{tag}{}", std::process::id()).into();
        config["start_udp_port"] = port.into();
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
            s.spawn(
                &format!("std-udp-recv-{m}"),
                "std-udp-recv",
                &["--module", &m.to_string()],
            )?;
        }
        s.spawn("std-assembler", "std-assembler", &[])?;
        s.spawn("std-h5-writer", "std-h5-writer", &[])?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            s.check_alive()?;
            if let Ok(reply) = s.client.request(&Command::Status) {
                if reply.status.is_some_and(|st| st.connected) {
                    return Ok(s);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "services not ready; assembler log:\n{}",
                    s.log("std-assembler")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(&mut self, name: &str, binary: &str, extra: &[&str]) -> Result<()> {
        let log = std::fs::File::create(self.work.join(format!("{name}.log")))?;
        let child = Process::new(self.bin.join(binary))
            .arg("--config")
            .arg(&self.config_path)
            .args(extra)
            .env("REDIS_SKIP", "1")
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

    fn pid(&self, name: &str) -> u32 {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .id()
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

    fn simulator(&self, images: u64, rate: f64) -> Result<Child> {
        Ok(Process::new(self.bin.join("std-det-sim"))
            .arg("--config")
            .arg(&self.config_path)
            .args(["--images", &images.to_string(), "--rate", &rate.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.work.join("sim.log"))?)
            .spawn()?)
    }

    /// The current run's progress, or the finished run.
    fn progress(&mut self) -> Result<(bool, RunSummary)> {
        loop {
            self.check_alive()?;
            match self.client.request(&Command::Status) {
                Ok(reply) => {
                    let st = reply.status.context("no status")?;
                    return Ok(match st.current {
                        Some(run) => (false, run),
                        None => (true, st.last_run.unwrap_or_default()),
                    });
                }
                Err(ClientError::Timeout(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Polls until `done(run)` holds or the run ends.
    fn wait_until(&mut self, what: &str, done: impl Fn(&RunSummary) -> bool) -> Result<RunSummary> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (finished, run) = self.progress()?;
            if finished || done(&run) {
                return Ok(run);
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}: {run:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops upstream first; returns the names of services that did not exit cleanly.
    fn stop(mut self) -> Vec<String> {
        let mut failed = Vec::new();
        for (name, child) in &mut self.children {
            kill(child.id(), "-CONT");
            kill(child.id(), "-TERM");
            let deadline = Instant::now() + Duration::from_secs(20);
            let status = loop {
                if let Ok(Some(st)) = child.try_wait() {
                    break Some(st);
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break child.wait().ok();
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            if !status.is_some_and(|s| s.success()) {
                failed.push(name.clone());
            }
        }
        self.children.clear();
        failed
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            kill(child.id(), "-CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes a 2-module calibration file with h5py: varied pedestals and gains (signs as real
/// JUNGFRAU: G1, G2 negative), some zero gains and masked pixels.
fn write_calibration(path: &Path) -> Result<()> {
    let script = r#"
import sys, h5py, numpy as np
h, w = 1024, 1024
y, x = np.mgrid[0:h, 0:w]
peds = np.stack([1000 + (x * 7 + y) % 300, 3000 + (x + y * 3) % 500, 5000 + (x * 5) % 700]).astype(np.float64)
gains = np.stack([40 + (x % 13) * 0.5, -1.5 - (y % 7) * 0.01, -0.1 - (x % 5) * 0.002]).astype(np.float32)
gains[1, 100, 200] = 0.0
mask = ((x * 31 + y * 17) % 997 == 0).astype(np.uint8)
with h5py.File(sys.argv[1], "w") as f:
    f["gains"] = gains
    f["pedestals"] = peds
    f["pixel_mask"] = mask
"#;
    let out = Process::new(python())
        .args(["-c", script])
        .arg(path)
        .output()?;
    if !out.status.success() {
        bail!("h5py: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Runs `n` images of 2 converted JUNGFRAU modules (1030x1030 with chip gaps, the calibration
/// of [`write_calibration`]) at `module_positions`, with `extra` config keys; returns the run,
/// verify_assembly.py's report and the calibration file's path. Services must stop cleanly.
fn converted_run(
    tag: &str,
    module_positions: serde_json::Value,
    extra: serde_json::Value,
    n: u64,
) -> (RunSummary, serde_json::Value, String) {
    let work = work_dir(&format!("{tag}-cal"));
    std::fs::create_dir_all(&work).unwrap();
    let cal = work.join("calibration.h5");
    write_calibration(&cal).unwrap();
    let mut config = serde_json::json!({
        "detector_type": "jungfrau-converted", "n_modules": 2, "bit_depth": 16,
        "image_pixel_height": 1030, "image_pixel_width": 1030, "chip_gaps": true,
        "calibration_file": cal.display().to_string(),
        "module_positions": module_positions,
    });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let mut s = Services::start(tag, config).unwrap();
    let file = s.work.join("jf.h5");
    s.start_run(&file, n).unwrap();
    let mut sim = s.simulator(n, 50.0).unwrap();
    let run = s.wait_until("the run to end", |_| false).unwrap();
    assert!(sim.wait().unwrap().success());
    let (failed, s) = s.stop_ref_work();
    let report = s.verify(&file, Some(&cal)).unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    std::fs::remove_dir_all(&work).unwrap();
    let _ = std::fs::remove_dir_all(&s.work);
    (run, report, cal.display().to_string())
}

/// Two JUNGFRAU modules, converted with a calibration file, with chip gaps (split double
/// pixels); module 1 below module 0 and rotated by 180 degrees (both corners reversed).
#[test]
fn jungfrau_converted_with_calibration_gaps_and_flips_is_exact() {
    let positions = serde_json::json!({"0": [0, 0, 1029, 513], "1": [1029, 1029, 0, 516]});
    let (run, report, cal) = converted_run("jfconv", positions, serde_json::json!({}), 20);
    assert_eq!(run.images_written, 20);
    assert_eq!(
        report["shape"],
        serde_json::json!([20, 1030, 1030]),
        "{report}"
    );
    assert_eq!(report["dtype"], "float32");
    assert_eq!(report["consistent_images"], 20, "{report}");
    // The file's pixel_mask: chip gaps split (not masked), the calibration's bad pixels dead
    // (bit 1) where the images have no value, as numpy recomputes it from the calibration file.
    assert_eq!(report["pixel_mask_mismatches"], 0, "{report}");
    assert!(
        report["pixel_mask_counts"]["2"].as_u64().unwrap_or(0) > 1000,
        "{report}"
    );
    assert_eq!(report["pixel_mask_calibration"], cal, "{report}");
    assert_eq!(report["ids_strictly_increasing"], true);
    assert_eq!(
        report["status_counts"],
        serde_json::json!({"1": 20}),
        "{report}"
    );
}

/// `double_pixels: "mask"`: double pixels and their gap pixels are 0 in the images and gaps
/// (bit 0) in the file's pixel_mask; the calibration's other bad pixels dead (bit 1), module 0
/// mirrored in x.
#[test]
fn jungfrau_converted_masked_double_pixels_are_gaps_in_the_pixel_mask() {
    let positions = serde_json::json!({"0": [1029, 0, 0, 513], "1": [0, 516, 1029, 1029]});
    let extra = serde_json::json!({"double_pixels": "mask"});
    let (run, report, _) = converted_run("jfmask", positions, extra, 4);
    assert_eq!(run.images_written, 4);
    assert_eq!(report["consistent_images"], 4, "{report}");
    assert_eq!(report["pixel_mask_mismatches"], 0, "{report}");
    // Per module: 3 chip borders x 4 columns x 514 rows and 4 rows x 1030 columns, crossings
    // once; plus the 2 rows between the modules.
    let per_module = 3 * 4 * 514 + 4 * 1030 - 3 * 4 * 4;
    let gaps = report["pixel_mask_counts"]["1"].as_u64().unwrap_or(0);
    assert_eq!(gaps, 2 * per_module + 2 * 1030, "{report}");
    assert!(
        report["pixel_mask_counts"]["2"].as_u64().unwrap_or(0) > 1000,
        "{report}"
    );
}

/// Photon counts (`converted_output: "photons_int16"`, 8 keV) through the real binaries: two
/// modules, module 1 rotated by 180 degrees. The calibration makes every `gain * energy` a power
/// of two and every pedestal whole, so `(adc - pedestal) / (gain * energy)` is exact in f32 and
/// f64 and the file's pixels must equal the formula computed here with numpy exactly: round half
/// away from zero, clamp to [-32767, 32767], -32768 for masked pixels, a zero gain and gain code
/// 10. The simulator's ramp reaches every gain code, saturation and large negatives.
#[test]
fn jungfrau_photons_int16_are_exact() {
    let work = work_dir("jfphot-cal");
    std::fs::create_dir_all(&work).unwrap();
    let cal = work.join("calibration.h5");
    let script = r#"
import sys, h5py, numpy as np
h, w = 1024, 1024
y, x = np.mgrid[0:h, 0:w]
peds = np.stack([1000 + (x * 7 + y) % 300, 3000 + (x + y * 3) % 500, 5000 + (x * 5) % 700]).astype(np.float64)
# ADU/keV; times 8 keV: G0 32..256, G1 -2..-8, G2 -1/8 or -1/4 ADU per photon.
gains = np.stack([4.0 * 2.0 ** (x % 4), -0.25 * 2.0 ** (y % 3), -(2.0 ** -6) * 2.0 ** (x % 2)]).astype(np.float32)
gains[1, 100, 200] = 0.0
mask = ((x * 31 + y * 17) % 997 == 0).astype(np.uint8)
with h5py.File(sys.argv[1], "w") as f:
    f["gains"] = gains
    f["pedestals"] = peds
    f["pixel_mask"] = mask
"#;
    let out = Process::new(python())
        .args(["-c", script])
        .arg(&cal)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = serde_json::json!({
        "detector_type": "jungfrau-converted", "n_modules": 2, "bit_depth": 16,
        "image_pixel_height": 1024, "image_pixel_width": 1024,
        "calibration_file": cal.display().to_string(),
        "converted_output": "photons_int16", "photon_energy_kev": 8.0,
        "module_positions": {"0": [0, 0, 1023, 511], "1": [1023, 1023, 0, 512]},
    });
    // Tag length 8: its UDP ports (base + 2 * 8) differ from the other tests'.
    let mut s = Services::start("jfphoton", config).unwrap();
    let detector = s.config.detector_name.clone();
    let file = s.work.join("photons.h5");
    s.start_run(&file, 12).unwrap();
    let mut sim = s.simulator(12, 50.0).unwrap();
    let run = s.wait_until("the run to end", |_| false).unwrap();
    assert!(sim.wait().unwrap().success());
    let (failed, stopped) = s.stop_ref_work();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(run.images_written, 12);
    let check = r#"
import sys, json, h5py, numpy as np
data_file, cal_file, name = sys.argv[1:4]
E, MIN = 8.0, -32768
with h5py.File(cal_file, "r") as c:
    gains, peds, mask = c["gains"][:].astype(np.float64), c["pedestals"][:], c["pixel_mask"][:]

def photons(frame, m):
    # The simulator's ramp (tests/python/verify_assembly.py).
    offset = ((frame % 65535) * 7919 + m * 104729) % 65535
    raw = (1 + (np.arange(512 * 1024, dtype=np.int64) + offset) % 65535).reshape(512, 1024)
    adc, bits = (raw & 0x3FFF).astype(np.float64), raw >> 14
    rows = slice(m * 512, (m + 1) * 512)
    out = np.full(raw.shape, MIN, dtype=np.int64)
    for b, s in ((0, 0), (1, 1), (3, 2)):
        g = gains[s, rows] * E
        with np.errstate(divide="ignore", invalid="ignore"):
            x = (adc - peds[s, rows]) / g
        r = np.clip(np.sign(x) * np.floor(np.abs(x) + 0.5), -32767, 32767)
        ok = (bits == b) & (g != 0)
        out[ok] = r[ok]
    out[mask[rows] != 0] = MIN
    return out.astype(np.int16)

with h5py.File(data_file, "r") as f:
    g = f[name]
    data, ids, status = g["data"], g["image_id"][:], g["status"][:]
    report = {"dtype": str(data.dtype), "shape": list(data.shape), "exact_images": 0,
              "status": sorted(set(int(v) for v in status)), "mismatches": [],
              "min": 0, "max": 0, "negative": 0, "zero": 0, "positive": 0}
    for i in range(data.shape[0]):
        frame = int(ids[i])
        want = np.zeros((1024, 1024), dtype=np.int16)
        want[:512] = photons(frame, 0)
        want[512:] = photons(frame, 1)[::-1, ::-1]
        got = data[i]
        if np.array_equal(got, want):
            report["exact_images"] += 1
        else:
            y, x = np.argwhere(got != want)[0]
            report["mismatches"].append({"image_id": frame, "y": int(y), "x": int(x),
                                         "got": int(got[y, x]), "want": int(want[y, x])})
        report["min"] += int(np.sum(got == MIN))
        report["max"] += int(np.sum(got == 32767))
        report["negative"] += int(np.sum((got < 0) & (got != MIN)))
        report["zero"] += int(np.sum(got == 0))
        report["positive"] += int(np.sum((got > 0) & (got != 32767)))
    # Two hand-picked pixels of the first image, from the formula written out.
    frame = int(ids[0])
    report["pixel_0_0"] = [int(data[0][0, 0]), int(photons(frame, 0)[0, 0])]
print(json.dumps(report))
"#;
    let out = Process::new(python())
        .args(["-c", check])
        .arg(&file)
        .arg(&cal)
        .arg(&detector)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr))),
    )
    .unwrap();
    eprintln!("photon report: {report}");
    assert_eq!(report["dtype"], "int16", "{report}");
    assert_eq!(report["shape"], serde_json::json!([12, 1024, 1024]));
    assert_eq!(report["status"], serde_json::json!([1]), "{report}");
    assert_eq!(report["exact_images"], 12, "{report}");
    let p = &report["pixel_0_0"];
    assert_eq!(p[0], p[1], "{report}");
    // Every kind of value occurs: the markers, saturation, negatives, zeros, counts.
    for kind in ["min", "max", "negative", "zero", "positive"] {
        assert!(report[kind].as_u64().unwrap() > 1000, "{kind}: {report}");
    }
    std::fs::remove_dir_all(&work).unwrap();
    let _ = std::fs::remove_dir_all(&stopped.work);
}

/// EIGER, 4 half-modules at 16 bit in a 2x2 layout with chip gaps; the bottom half-modules are
/// mirrored vertically (`y1 < y0`), one also horizontally.
#[test]
fn eiger_half_modules_with_gaps_and_bottom_flips_are_exact() {
    let config = serde_json::json!({
        "detector_type": "eiger", "n_modules": 4, "bit_depth": 16,
        "image_pixel_height": 514, "image_pixel_width": 1030, "chip_gaps": true,
        "module_positions": {
            "0": [0, 0, 513, 255], "1": [516, 0, 1029, 255],
            "2": [0, 513, 513, 258], "3": [1029, 513, 516, 258]},
    });
    let mut s = Services::start("eigergaps", config).unwrap();
    let file = s.work.join("eiger.h5");
    s.start_run(&file, 30).unwrap();
    let mut sim = s.simulator(30, 100.0).unwrap();
    s.wait_until("the run to end", |_| false).unwrap();
    assert!(sim.wait().unwrap().success());
    let (failed, s) = s.stop_ref_work();
    let report = s.verify(&file, None).unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(
        report["shape"],
        serde_json::json!([30, 514, 1030]),
        "{report}"
    );
    assert_eq!(report["dtype"], "uint16");
    assert_eq!(report["exact_images"], 30, "{report}");
    // Gaps: each half module's empty chip-gap columns (2 x 256 rows x 4) and the 2 columns and
    // 2 rows between the half modules that no module covers.
    let gaps = 2 * 256 * 4 + (2 * 514 + 2 * 1030 - 4);
    assert_eq!(report["pixel_mask_mismatches"], 0, "{report}");
    assert_eq!(
        report["pixel_mask_counts"],
        serde_json::json!({"0": 514 * 1030 - gaps, "1": gaps}),
        "{report}"
    );
    assert_eq!(
        report["status_counts"],
        serde_json::json!({"1": 30}),
        "{report}"
    );
    let _ = std::fs::remove_dir_all(&s.work);
}

/// Module 1's receiver is stopped (SIGSTOP) mid-run: its images are flagged with module 1
/// missing (zero pixels, 128 packets counted, recorded by the writer); after SIGCONT, images are
/// good again.
#[test]
fn a_stopped_receiver_flags_its_module_and_recovers() {
    let config = serde_json::json!({
        "detector_type": "jungfrau-raw", "n_modules": 2, "bit_depth": 16,
        "image_pixel_height": 1024, "image_pixel_width": 1024,
        "module_positions": {"0": [0, 0, 1023, 511], "1": [0, 512, 1023, 1023]},
    });
    let mut s = Services::start("stopped", config).unwrap();
    let file = s.work.join("stopped.h5");
    let n = 400;
    s.start_run(&file, n).unwrap();
    let mut sim = s.simulator(n, 100.0).unwrap();
    s.wait_until("50 images", |r| r.images_written >= 50)
        .unwrap();
    let receiver = s.pid("std-udp-recv-1");
    kill(receiver, "-STOP");
    s.wait_until("30 flagged images", |r| r.images_flagged >= 30)
        .unwrap();
    kill(receiver, "-CONT");
    let run = s.wait_until("the run to end", |_| false).unwrap();
    assert!(sim.wait().unwrap().success());
    let (failed, s) = s.stop_ref_work();
    let report = s.verify(&file, None).unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(run.images_written, n, "{run:?}");
    assert_eq!(report["consistent_images"], n, "{report}");
    assert_eq!(report["ids_strictly_increasing"], true);
    // Module 0 was never missing; module 1 was, for at least 30 images.
    let missing = &report["missing_module_images"];
    assert!(missing.get("0").is_none(), "{report}");
    let gone = missing["1"].as_array().unwrap();
    assert!(gone.len() >= 30, "{report}");
    let status: Vec<u64> = report["status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    // Good before the stop, good again at the end.
    assert!(status[..40].iter().all(|s| *s == 1), "{status:?}");
    assert!(
        status[status.len() - 50..].iter().all(|s| *s == 1),
        "{status:?}"
    );
    let n_missing: Vec<u64> = report["n_missing_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        n_missing.iter().filter(|v| **v == 1).count(),
        gone.len(),
        "{report}"
    );
    let _ = std::fs::remove_dir_all(&s.work);
}

/// Where stopping leaves us: the failed services and what is needed to verify.
struct Stopped {
    work: PathBuf,
    config_path: PathBuf,
}

impl Stopped {
    fn verify(&self, file: &Path, calibration: Option<&Path>) -> Result<serde_json::Value> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/verify_assembly.py");
        let mut cmd = Process::new(python());
        cmd.arg(&script)
            .arg(file)
            .arg("--config")
            .arg(&self.config_path);
        if let Some(c) = calibration {
            cmd.arg("--calibration").arg(c);
        }
        let out = cmd.output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().with_context(|| {
            format!(
                "verify_assembly.py: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok(serde_json::from_str(line)?)
    }
}

impl Services {
    fn stop_ref_work(self) -> (Vec<String>, Stopped) {
        let stopped = Stopped {
            work: self.work.clone(),
            config_path: self.config_path.clone(),
        };
        (self.stop(), stopped)
    }
}
