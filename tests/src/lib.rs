//! Helpers for the end-to-end tests: isolated pipelines (own detector name, UDP ports and work
//! folder) and the independent h5py checker in `tests/python/verify_h5.py`.
#![forbid(unsafe_code)]

pub mod stack;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std_daq::pipeline::{default_bin_dir, PipelineOptions};

static NEXT: AtomicU16 = AtomicU16::new(0);

/// A folder for one test, removed by the caller when the test passes.
pub fn work_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("std-daq-test.{tag}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Pipeline options no other test (or test process) shares: detector name, ports, folders.
pub fn options(tag: &str) -> Result<PipelineOptions> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let port = 20_000 + (std::process::id() % 2000) as u16 * 16 + n * 4;
    Ok(PipelineOptions {
        bin_dir: default_bin_dir()?,
        work_dir: work_dir(tag),
        detector_name: format!("t{tag}{}", std::process::id()),
        n_modules: 2,
        start_udp_port: port,
        module_buffer_slots: 64,
        ram_buffer_gb: 0.125,
        log_level: "info".into(),
        extra_config: Vec::new(),
    })
}

/// The Python with h5py (Debian's, not a pyenv one first on PATH).
pub fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Runs the h5py checker on a JUNGFRAU file and returns its JSON report.
pub fn verify_h5(file: &Path, detector: &str, drop: &str) -> Result<serde_json::Value> {
    verify_h5_as(file, detector, drop, "jungfrau")
}

/// Runs the h5py checker for a detector `kind` (`jungfrau`, `eiger`) and returns its report.
pub fn verify_h5_as(
    file: &Path,
    detector: &str,
    drop: &str,
    kind: &str,
) -> Result<serde_json::Value> {
    verify_h5_with(file, detector, drop, kind, &[])
}

/// [`verify_h5_as`] with extra checker flags (e.g. `--allow-lost-in-buffer`).
pub fn verify_h5_with(
    file: &Path,
    detector: &str,
    drop: &str,
    kind: &str,
    extra: &[&str],
) -> Result<serde_json::Value> {
    verify_h5_by(Path::new(python()), file, detector, drop, kind, extra)
}

/// [`verify_h5_with`] in the project's venv with PyPI's hdf5plugin loaded (`--hdf5plugin`), so
/// bitshuffle/LZ4 data reads without Debian's plugin.
pub fn verify_h5_venv(file: &Path, detector: &str, extra: &[&str]) -> Result<serde_json::Value> {
    let python = stack::venv_python()?;
    let mut args = vec!["--hdf5plugin"];
    args.extend_from_slice(extra);
    verify_h5_by(&python, file, detector, "", "jungfrau", &args)
}

fn verify_h5_by(
    python: &Path,
    file: &Path,
    detector: &str,
    drop: &str,
    kind: &str,
    extra: &[&str],
) -> Result<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/verify_h5.py");
    // One argument may hold at most 128 KiB (MAX_ARG_STRLEN): long drop lists go in a file.
    let drop_file = std::env::temp_dir().join(format!(
        "verify-drops.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&drop_file, drop).with_context(|| format!("writing {}", drop_file.display()))?;
    let out = Command::new(python)
        .arg(&script)
        .arg(file)
        .args(["--detector", detector, "--kind", kind])
        .arg("--drop-file")
        .arg(&drop_file)
        .args(extra)
        .output();
    let _ = std::fs::remove_file(&drop_file);
    let out = out.context("running verify_h5.py")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().last() else {
        bail!(
            "verify_h5.py printed nothing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    serde_json::from_str(line).with_context(|| format!("verify_h5.py report: {line}"))
}

/// Per-image `status` and the first word of `missing_modules` of a written file, read with h5py.
pub fn read_status(file: &Path, detector: &str) -> Result<(Vec<u64>, Vec<u64>)> {
    let out = Command::new(python())
        .arg("-c")
        .arg(format!(
            "import h5py, json; f = h5py.File({:?}); g = f[{:?}]; \
             print(json.dumps([g['status'][:].tolist(), g['missing_modules'][:, 0].tolist()]))",
            file.display().to_string(),
            detector
        ))
        .output()
        .context("running h5py")?;
    let v: (Vec<u64>, Vec<u64>) = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("h5py said: {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok(v)
}

/// After a fault: the next run (20 images; the detector's frame counter runs on from 1000, since
/// frames restarting at 1 within a second would be taken as late packets of the last
/// acquisition) completes with every image exact, and the pipeline then stops cleanly.
pub fn next_run_completes_exact(
    mut p: std_daq::pipeline::Pipeline,
    file: &Path,
    detector: &str,
) -> Result<()> {
    p.start_run(file, 20)?;
    p.run_simulator_with(20, 100.0, &["--start-frame".into(), "1000".into()])?;
    let run = p.wait_run(std::time::Duration::from_secs(10))?;
    assert_eq!((run.end.as_str(), run.images_written), ("completed", 20));
    let stop = p.stop()?;
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    let report = verify_h5(file, detector, "")?;
    assert_eq!(report["exact_images"], 20, "{report}");
    Ok(())
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for `--metrics-addr` and the like).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The samples of a service's Prometheus endpoint (`--metrics-addr 127.0.0.1:<port>`), by
/// metric name (labels dropped).
pub fn scrape_metrics(port: u16) -> Result<std::collections::HashMap<String, f64>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to the metrics port {port}"))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    if !text.starts_with("HTTP/1.1 200 OK") {
        bail!("metrics port {port} answered: {text}");
    }
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    Ok(body
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.split('{').next()?.to_string(), value.parse().ok()?))
        })
        .collect())
}

/// The first of `n` consecutive TCP ports on 127.0.0.1 that were all free a moment ago (for a
/// `metrics_base_address`, whose services' ports follow from it).
pub fn free_port_range(n: u16) -> Result<u16> {
    // Below the kernel's ephemeral range (32768-60999 by default): ports reserved here for a child
    // to bind later cannot be taken meanwhile as the local port of an outgoing connection (a
    // metrics scrape, a broker client), which happened with ranges picked inside it.
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    // Tests of one binary run in parallel: each call starts elsewhere.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let seed = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(call.wrapping_mul(2003));
    for attempt in 0..200u32 {
        let offset = seed.wrapping_add(attempt.wrapping_mul(997)) % (SPAN - u32::from(n));
        let base = u16::try_from(LOW + offset).context("port range")?;
        let all_free =
            (base..base + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return Ok(base);
        }
    }
    bail!("found no {n} consecutive free TCP ports on 127.0.0.1 between 20000 and 32000")
}

/// A root attribute of `file` that holds JSON text (`run_summary`, `run_counters`, ...).
pub fn root_json_attr(file: &Path, name: &str) -> Result<serde_json::Value> {
    h5_writer::counters::root_json_attr(file, name).map_err(anyhow::Error::msg)
}

/// Asserts a file's `run_counters` (docs/file-format.md): each of `modules` receivers took
/// exactly the run's packets (JUNGFRAU: 128 per frame) and the assembler made exactly `images`,
/// all good, none lost in its buffer.
pub fn assert_run_counters(c: &serde_json::Value, modules: u16, images: u64) {
    for m in 0..modules {
        let run = &c["services"][format!("udp-recv-{m}")]["run"];
        assert_eq!(run["packets"], images * 128, "udp-recv-{m}: {c}");
        assert_eq!(run["frames_complete"], images, "udp-recv-{m}: {c}");
        assert_eq!(run["malformed_packets"], 0, "udp-recv-{m}: {c}");
        assert_eq!(run["missing_packets"], 0, "udp-recv-{m}: {c}");
    }
    let assembler = &c["services"]["assembler"]["run"];
    assert_eq!(assembler["images"], images, "{c}");
    assert_eq!(assembler["images_good"], images, "{c}");
    assert_eq!(assembler["images_lost_in_buffer"], 0, "{c}");
    assert!(c["end_time"].as_f64() > c["start_time"].as_f64(), "{c}");
}

/// The filters of `/<detector>/data` in an HDF5 file, as h5py reports them (e.g.
/// `{"32008": [0, 3, 2, 0, 2]}` for bitshuffle + LZ4, `{}` for none).
pub fn data_filters(file: &Path, detector: &str) -> Result<serde_json::Value> {
    let out = Command::new(python())
        .arg("-c")
        .arg(format!(
            "import h5py, json; f = h5py.File({:?}); \
             print(json.dumps({{k: list(v) for k, v in f[{:?}]['data']._filters.items()}}))",
            file.display().to_string(),
            detector
        ))
        .output()
        .context("running h5py")?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("h5py said: {}", String::from_utf8_lossy(&out.stderr)))
}
