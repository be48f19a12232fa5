//! The whole system as an operator runs it, for end-to-end tests: `std-daq up` with the writer
//! agent (output root `<work>/data`) and `std-daq api` with the detector config, against the
//! real Redis and RabbitMQ. Processes are stopped (SIGTERM, then waited for) when dropped.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use std_daq::pipeline::{config_json, default_bin_dir, SimulatedDetector};
use std_daq_common::DetectorConfig;

/// How long a start-up step may take before the test fails.
pub const WATCHDOG: Duration = Duration::from_secs(90);

/// A child process stopped with SIGTERM on drop (SIGKILL if it is still there after 60 s).
#[derive(Debug)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `done` until it gives a value; an error after `timeout` (a watchdog, not a clock).
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = done() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The project's virtual environment (scripts/setup.sh): its Python, with an explanation when
/// it is missing.
pub fn venv_python() -> Result<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if !python.exists() {
        bail!(
            "{} is missing: run `bash scripts/setup.sh` (it creates .venv from \
             python/requirements.txt and installs python/)",
            python.display()
        );
    }
    Ok(python)
}

/// `std-daq api --config <config> --tag <tag>` on 127.0.0.1:`port` (log appended to
/// `<work>/api.log`), once it accepts connections.
pub fn start_api(work: &Path, config: &Path, tag: &str, port: u16) -> Result<Proc> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work.join("api.log"))?;
    let api = Proc(
        Command::new(default_bin_dir()?.join("std-daq"))
            .args(["api", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--tag", tag])
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting std-daq api")?,
    );
    poll_until("the API", WATCHDOG, || {
        TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
    })?;
    Ok(api)
}

/// `std-daq up` (+ agent) and `std-daq api` for one simulated JUNGFRAU of 2 modules.
#[allow(missing_debug_implementations)] // redis::Connection has no Debug
pub struct Stack {
    pub work: PathBuf,
    /// The agent's output root.
    pub root: PathBuf,
    pub config_path: PathBuf,
    pub cfg: DetectorConfig,
    /// The API's port on 127.0.0.1.
    pub port: u16,
    pub redis: redis::Connection,
    pub api: Option<Proc>,
    pub up: Option<Proc>,
}

impl Stack {
    /// Starts everything and waits until the agent is on the broker and the API answers.
    /// `up_args` are added to `std-daq up` (e.g. `--watch-config`); `{work}` in them stands for
    /// the work folder.
    pub fn start(tag: &str, up_args: &[&str]) -> Result<Stack> {
        let mut opts = crate::options(tag)?;
        // 128 images of 2 MiB: 2.5 s at the tests' 50 Hz, so a writer that a loaded 2-core CI
        // machine (a browser, the simulator, every service) leaves unscheduled for a second
        // still finds its images (seen: a 1.2 s stall flagged 10 images lost in the buffer).
        opts.ram_buffer_gb = 0.25;
        let work = opts.work_dir.clone();
        let root = work.join("data");
        std::fs::create_dir_all(work.join("ipc"))?;
        std::fs::create_dir_all(&root)?;
        let config_path = work.join("detector.json");
        let json = config_json(&opts, SimulatedDetector::Jungfrau);
        std::fs::write(&config_path, serde_json::to_string_pretty(&json)?)?;
        let cfg = DetectorConfig::from_file(&config_path)?;
        let bin = default_bin_dir()?;
        let up = Proc(
            Command::new(bin.join("std-daq"))
                .arg("up")
                .arg("--config")
                .arg(&config_path)
                .arg("--agent-output-root")
                .arg(&root)
                .args(
                    up_args
                        .iter()
                        .map(|a| a.replace("{work}", &work.display().to_string())),
                )
                .env_remove("REDIS_SKIP")
                .env_remove("SERVICE_NAME")
                .stdin(Stdio::null())
                .stderr(std::fs::File::create(work.join("up.log"))?)
                .spawn()
                .context("starting std-daq up")?,
        );
        let redis = redis::Client::open("redis://127.0.0.1:6379/")?.get_connection()?;
        let port = crate::free_port()?;
        let mut stack = Stack {
            work,
            root,
            config_path,
            cfg,
            port,
            redis,
            api: None,
            up: Some(up),
        };
        poll_until("the writer agent on the broker", WATCHDOG, || {
            (stack.field("writer-agent", "connected").as_deref() == Some("1")).then_some(())
        })?;
        stack.start_api()?;
        Ok(stack)
    }

    /// (Re)starts `std-daq api` on the same port.
    pub fn start_api(&mut self) -> Result<()> {
        self.api = None;
        self.api = Some(start_api(
            &self.work,
            &self.config_path,
            &self.cfg.detector_name,
            self.port,
        )?);
        Ok(())
    }

    /// A field of the status hash `status.std-daq.<detector>.<service>`.
    pub fn field(&mut self, service: &str, f: &str) -> Option<String> {
        redis::cmd("HGET")
            .arg(format!(
                "status.std-daq.{}.{service}",
                self.cfg.detector_name
            ))
            .arg(f)
            .query(&mut self.redis)
            .ok()
            .flatten()
    }

    /// [`Stack::field`] as a number.
    pub fn number(&mut self, service: &str, f: &str) -> Option<u64> {
        self.field(service, f)?.parse().ok()
    }

    /// The simulator binary.
    pub fn simulator(&self) -> Result<PathBuf> {
        Ok(default_bin_dir()?.join("std-det-sim"))
    }

    /// Stops the API and `std-daq up`, then removes the work folder (call when the test passed).
    pub fn finish(mut self) -> Result<()> {
        self.api = None;
        self.up = None;
        std::fs::remove_dir_all(&self.work)
            .with_context(|| format!("removing {}", self.work.display()))
    }
}

/// A free-running detector: the simulator in batches of 25 frames at 50 Hz, frame numbers running
/// on from `next_frame`, until `stop` is set (or 5000 frames). Returns the frames sent.
pub fn free_run(
    sim: &Path,
    config: &Path,
    stop: &std::sync::atomic::AtomicBool,
    next_frame: &std::sync::atomic::AtomicU64,
) -> Result<u64> {
    use std::sync::atomic::Ordering;
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) && sent < 5000 {
        let first = next_frame.fetch_add(25, Ordering::Relaxed);
        let status = Command::new(sim)
            .arg("--config")
            .arg(config)
            .args(["--images", "25", "--rate", "50"])
            .args(["--start-frame", &first.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running std-det-sim")?;
        if !status.success() {
            bail!("std-det-sim failed: {status}");
        }
        sent += 25;
    }
    Ok(sent)
}

/// Sets the flag when dropped, however the scope that holds it ends (a failed assert included).
#[derive(Debug)]
pub struct SetOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One HTTP/1.1 exchange on 127.0.0.1:`port` (Content-Length or chunked answers): (code, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    s.set_read_timeout(Some(WATCHDOG))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let code = status
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (mut length, mut chunked) = (None, false);
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).context("a chunk size")?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = length {
        out.resize(n, 0);
        r.read_exact(&mut out)?;
    } else {
        r.read_to_end(&mut out)?;
    }
    Ok((code, out))
}
