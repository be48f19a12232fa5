//! A pipeline of real processes: one `std-udp-recv` per module, `std-assembler`, one
//! `std-h5-writer` per `number_of_writers` (driven as one by a [`WriterGroup`]), and
//! `std-det-sim` on demand. Children log to files in the work directory. Stopping goes
//! upstream first (receivers, then assembler, then writer) so every stage drains into the next,
//! and then checks that no shared-memory segment or ipc socket file is left behind.
//!
//! Never leaves a child running: dropping a `Pipeline` kills whatever is still alive.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};
use std_daq_common::writer_command::{Command, Reply, RunSummary};
use std_daq_common::{names, DetectorConfig};
use std_writer_agent::writer_client::ClientError;
use std_writer_agent::writer_group::WriterGroup;

/// Where to find the service binaries: next to the running executable, or one folder up (test
/// executables live in target/<profile>/deps).
pub fn default_bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        if d.join("std-udp-recv").is_file() {
            return Ok(d);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    bail!(
        "cannot find the std-daq service binaries near {}: build them with `cargo build --workspace --bins`",
        exe.display()
    )
}

/// How to set up a pipeline.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub bin_dir: PathBuf,
    /// Holds the generated config, the ipc sockets and the service logs.
    pub work_dir: PathBuf,
    pub detector_name: String,
    pub n_modules: u16,
    pub start_udp_port: u16,
    pub module_buffer_slots: u32,
    pub ram_buffer_gb: f64,
    pub log_level: String,
    /// More config keys (e.g. `module_sync_timeout_ms`), set over the generated ones.
    pub extra_config: Vec<(String, serde_json::Value)>,
}

/// Which detector a pipeline is configured (and simulated) as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimulatedDetector {
    /// JUNGFRAU modules of 1024x512, raw u16.
    Jungfrau,
    /// EIGER half-modules of 512x256 at 8, 16 or 32 bit.
    Eiger { bit_depth: u8 },
    /// A GigaFRoST image of width x height pixels from 8 streams (`n_modules` must be 8).
    Gigafrost { width: u32, height: u32 },
}

impl SimulatedDetector {
    /// (width, height) of one module.
    pub fn module_size(self) -> (u32, u32) {
        match self {
            SimulatedDetector::Jungfrau => (1024, 512),
            SimulatedDetector::Eiger { .. } => (512, 256),
            SimulatedDetector::Gigafrost { width, height } => (width / 2, height / 4),
        }
    }
}

/// A JUNGFRAU config with `n_modules` modules stacked vertically (1024 wide, 512 high each).
pub fn jungfrau_config_json(opts: &PipelineOptions) -> serde_json::Value {
    config_json(opts, SimulatedDetector::Jungfrau)
}

/// A config with `n_modules` modules of `detector` stacked vertically.
pub fn config_json(opts: &PipelineOptions, detector: SimulatedDetector) -> serde_json::Value {
    let (w, h) = detector.module_size();
    let positions: serde_json::Map<String, serde_json::Value> = (0..opts.n_modules)
        .map(|m| {
            let corners = match detector {
                // Fixed quadrant geometry; the positions are only carried along (quadrant m/2).
                SimulatedDetector::Gigafrost { .. } => {
                    let q = u32::from(m % 8 / 2);
                    let (x0, y0) = ((q % 2) * w, if q < 2 { 2 * h } else { 0 });
                    serde_json::json!([x0, y0, x0 + w - 1, y0 + 2 * h - 1])
                }
                _ => {
                    let y0 = u32::from(m) * h;
                    serde_json::json!([0, y0, w - 1, y0 + h - 1])
                }
            };
            (m.to_string(), corners)
        })
        .collect();
    let (detector_type, bit_depth) = match detector {
        SimulatedDetector::Jungfrau => ("jungfrau-raw", 16),
        SimulatedDetector::Eiger { bit_depth } => ("eiger", bit_depth),
        SimulatedDetector::Gigafrost { .. } => ("gigafrost", 12),
    };
    let (image_width, image_height) = match detector {
        SimulatedDetector::Gigafrost { width, height } => (width, height),
        _ => (w, u32::from(opts.n_modules) * h),
    };
    let mut config = serde_json::json!({
        "detector_name": opts.detector_name,
        "detector_type": detector_type,
        "n_modules": opts.n_modules,
        "bit_depth": bit_depth,
        "image_pixel_height": image_height,
        "image_pixel_width": image_width,
        "start_udp_port": opts.start_udp_port,
        "module_positions": positions,
        "log_level": opts.log_level,
        "stats_collection_period": 2.0,
        "module_buffer_slots": opts.module_buffer_slots,
        "ram_buffer_gb": opts.ram_buffer_gb,
        "udp_bind_address": "127.0.0.1",
        "ipc_dir": opts.work_dir.join("ipc").display().to_string(),
    });
    for (key, value) in &opts.extra_config {
        config[key] = value.clone();
    }
    config
}

/// What `std-det-sim` reported.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimReport {
    pub frames: u64,
    pub packets_sent: u64,
    pub packets_dropped: u64,
    pub bytes_sent: u64,
    pub seconds: f64,
    /// Faults the simulator injected (its own record).
    pub packets_duplicated: u64,
    pub packets_reordered: u64,
    pub packets_malformed: u64,
}

/// What stopping found.
#[derive(Debug, Clone, Default)]
pub struct StopReport {
    /// Services that did not exit 0 (name, status).
    pub failed: Vec<(String, String)>,
    /// Shared-memory segments and ipc files still present after every service exited.
    pub leftovers: Vec<PathBuf>,
}

#[derive(Debug)]
struct Service {
    name: String,
    child: Child,
}

#[derive(Debug)]
pub struct Pipeline {
    opts: PipelineOptions,
    pub config_path: PathBuf,
    pub config: DetectorConfig,
    receivers: Vec<Service>,
    assembler: Option<Service>,
    /// Writer k at index k (`std-h5-writer`, `std-h5-writer-<k>` for k > 0).
    writers: Vec<Service>,
    /// Every writer, as one (a single writer's commands pass unchanged).
    pub client: WriterGroup,
    /// Extra arguments per service name (e.g. `--metrics-addr`), applied at every (re)start.
    extra_args: std::collections::HashMap<String, Vec<String>>,
}

impl Pipeline {
    /// Writes the config, starts every service and waits until the writer sees the assembler's
    /// stream (so a run started now loses no image to ZMQ's slow-joiner effect).
    pub fn start(opts: PipelineOptions, ready_timeout: Duration) -> Result<Self> {
        Self::start_detector(opts, SimulatedDetector::Jungfrau, ready_timeout)
    }

    /// [`Pipeline::start`] for any simulated detector.
    pub fn start_detector(
        opts: PipelineOptions,
        detector: SimulatedDetector,
        ready_timeout: Duration,
    ) -> Result<Self> {
        Self::start_with_args(opts, detector, ready_timeout, Default::default())
    }

    /// [`Pipeline::start_detector`] with extra arguments for some services, by service name
    /// (`std-udp-recv-<m>`, `std-assembler`, `std-h5-writer`).
    pub fn start_with_args(
        opts: PipelineOptions,
        detector: SimulatedDetector,
        ready_timeout: Duration,
        extra_args: std::collections::HashMap<String, Vec<String>>,
    ) -> Result<Self> {
        std::fs::create_dir_all(opts.work_dir.join("ipc"))
            .with_context(|| format!("creating {}", opts.work_dir.display()))?;
        let config_path = opts.work_dir.join("detector.json");
        let json = serde_json::to_string_pretty(&config_json(&opts, detector))?;
        std::fs::write(&config_path, json)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let config = DetectorConfig::from_file(&config_path)?;
        let ctx = zmq::Context::new();
        let endpoints: Vec<String> = (0..config.number_of_writers)
            .map(|k| names::writer_command_endpoint_of(&config, k))
            .collect();
        let client = WriterGroup::new(
            &ctx,
            &endpoints,
            Duration::from_secs(5),
            Duration::from_secs(10),
        );
        let mut p = Pipeline {
            config_path,
            config,
            receivers: Vec::new(),
            assembler: None,
            writers: Vec::new(),
            client,
            opts,
            extra_args,
        };
        for m in 0..p.config.n_modules {
            let s = p.spawn(
                &format!("std-udp-recv-{m}"),
                "std-udp-recv",
                &["--module", &m.to_string()],
            )?;
            p.receivers.push(s);
        }
        p.assembler = Some(p.spawn("std-assembler", "std-assembler", &[])?);
        for k in 0..p.config.number_of_writers {
            let w = p.spawn_writer(k)?;
            p.writers.push(w);
        }
        p.wait_ready(ready_timeout)?;
        Ok(p)
    }

    /// The service name of writer `k`: `std-h5-writer`, `std-h5-writer-<k>` for k > 0.
    pub fn writer_name(k: u32) -> String {
        match k {
            0 => "std-h5-writer".into(),
            k => format!("std-h5-writer-{k}"),
        }
    }

    fn spawn_writer(&self, k: u32) -> Result<Service> {
        let name = Self::writer_name(k);
        if k == 0 {
            return self.spawn(&name, "std-h5-writer", &[]);
        }
        self.spawn(&name, "std-h5-writer", &["--writer-index", &k.to_string()])
    }

    fn spawn(&self, name: &str, binary: &str, extra: &[&str]) -> Result<Service> {
        let log_path = self.log_path(name);
        // Appended, so a restarted service keeps the log of its first life.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let exe = self.opts.bin_dir.join(binary);
        let child = Process::new(&exe)
            .arg("--config")
            .arg(&self.config_path)
            .args(extra)
            .args(self.extra_args.get(name).into_iter().flatten())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        Ok(Service {
            name: name.to_string(),
            child,
        })
    }

    pub fn log_path(&self, service: &str) -> PathBuf {
        self.opts.work_dir.join(format!("{service}.log"))
    }

    /// The last lines of a service's log, for error messages.
    pub fn log_tail(&self, service: &str) -> String {
        let text = std::fs::read_to_string(self.log_path(service)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn services_mut(&mut self) -> impl Iterator<Item = &mut Service> {
        self.receivers
            .iter_mut()
            .chain(self.assembler.as_mut())
            .chain(self.writers.iter_mut())
    }

    /// The process id of a running service (`std-udp-recv-<m>`, `std-assembler`,
    /// `std-h5-writer`), for tests that stop, stall or inspect it.
    pub fn pid(&self, service: &str) -> Option<u32> {
        self.receivers
            .iter()
            .chain(self.assembler.as_ref())
            .chain(self.writers.iter())
            .find(|s| s.name == service)
            .map(|s| s.child.id())
    }

    /// Fails if any service has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let mut dead = None;
        for s in self.services_mut() {
            if let Some(status) = s.child.try_wait()? {
                dead = Some((s.name.clone(), status));
                break;
            }
        }
        if let Some((name, status)) = dead {
            bail!(
                "{name} exited ({status}); its log ends with:\n{}",
                self.log_tail(&name)
            );
        }
        Ok(())
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if let Ok(Reply {
                ok: true,
                status: Some(status),
                ..
            }) = self.client.request(&Command::Status)
            {
                if status.connected {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the pipeline was not ready within {timeout:?}; writer log:\n{}",
                    self.log_tail("std-h5-writer")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops receiver `module` (SIGKILL when `crash`, else SIGTERM), waits for it to exit, and
    /// starts it again, as a supervisor would after a crash.
    pub fn restart_receiver(&mut self, module: u16, crash: bool) -> Result<()> {
        let i = usize::from(module);
        if i >= self.receivers.len() {
            bail!("no receiver for module {module}");
        }
        if crash {
            self.receivers[i].child.kill()?;
        } else {
            terminate(&self.receivers[i].child)?;
        }
        wait_with_deadline(&mut self.receivers[i].child, Duration::from_secs(20))?;
        let name = format!("std-udp-recv-{module}");
        let fresh = self.spawn(&name, "std-udp-recv", &["--module", &module.to_string()])?;
        self.receivers[i] = fresh;
        Ok(())
    }

    /// Stops std-h5-writer (SIGKILL when `crash`, else SIGTERM) and starts it again; returns
    /// once the new writer sees the image stream.
    pub fn restart_writer(&mut self, crash: bool) -> Result<()> {
        self.restart_writer_k(0, crash)
    }

    /// [`Pipeline::restart_writer`] for writer `k`.
    pub fn restart_writer_k(&mut self, k: u32, crash: bool) -> Result<()> {
        let name = Self::writer_name(k);
        let Some(i) = self.writers.iter().position(|w| w.name == name) else {
            bail!("no writer {k} running");
        };
        let writer = &mut self.writers[i];
        if crash {
            writer.child.kill()?;
        } else {
            terminate(&writer.child)?;
        }
        wait_with_deadline(&mut writer.child, Duration::from_secs(20))?;
        let fresh = self.spawn_writer(k)?;
        self.writers[i] = fresh;
        self.wait_ready(Duration::from_secs(60))
    }

    /// Stops writer `k` for good (SIGTERM) and leaves it out of the pipeline: for set-ups where
    /// another host runs that writer (its command socket then lives elsewhere).
    pub fn stop_writer_k(&mut self, k: u32) -> Result<()> {
        let Some(i) = self
            .writers
            .iter()
            .position(|w| w.name == Self::writer_name(k))
        else {
            bail!("no writer {k} running");
        };
        let mut writer = self.writers.remove(i);
        terminate(&writer.child)?;
        let status = wait_with_deadline(&mut writer.child, Duration::from_secs(20))?;
        if !status.success() {
            bail!("writer {k} exited {status}");
        }
        Ok(())
    }

    /// The writer's status.
    pub fn writer_status(&self) -> Result<std_daq_common::writer_command::WriterStatus> {
        self.client
            .request(&Command::Status)?
            .status
            .ok_or_else(|| anyhow!("the writer's status reply has no status"))
    }

    /// Asks the writer to write the next `n_images` images into `output_file`.
    pub fn start_run(&self, output_file: &Path, n_images: u64) -> Result<()> {
        let reply = self.client.request(&Command::Start {
            output_file: output_file.display().to_string(),
            n_images,
            request_id: None,
            context: Default::default(),
        })?;
        if !reply.ok {
            bail!(
                "the writer refused the run: {}",
                reply.error.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Runs `std-det-sim` to completion and returns its report.
    pub fn run_simulator(
        &self,
        images: u64,
        rate: f64,
        drop: &str,
        gso: bool,
    ) -> Result<SimReport> {
        let mut args = vec!["--drop".to_string(), drop.to_string()];
        if gso {
            args.push("--gso".into());
        }
        self.run_simulator_with(images, rate, &args)
    }

    /// Runs `std-det-sim` with extra arguments (fault injection, `--fault-log`, ...).
    pub fn run_simulator_with(
        &self,
        images: u64,
        rate: f64,
        extra: &[String],
    ) -> Result<SimReport> {
        let exe = self.opts.bin_dir.join("std-det-sim");
        let mut cmd = Process::new(&exe);
        cmd.arg("--config")
            .arg(&self.config_path)
            .args(["--images", &images.to_string(), "--rate", &rate.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(self.log_path("std-det-sim"))?);
        let out = cmd
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "std-det-sim failed ({}):\n{}",
                out.status,
                self.log_tail("std-det-sim")
            );
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("reading std-det-sim's JSON report")?;
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Ok(SimReport {
            frames: n("frames"),
            packets_sent: n("packets_sent"),
            packets_dropped: n("packets_dropped"),
            bytes_sent: n("bytes_sent"),
            seconds: v["seconds"].as_f64().unwrap_or(0.0),
            packets_duplicated: n("packets_duplicated"),
            packets_reordered: n("packets_reordered"),
            packets_malformed: n("packets_malformed"),
        })
    }

    /// Waits for the current run to finish. If no image arrives for `idle_timeout`, the run is
    /// stopped (the file keeps what it has) and its summary returned.
    pub fn wait_run(&mut self, idle_timeout: Duration) -> Result<RunSummary> {
        let mut last_progress = (u64::MAX, Instant::now());
        loop {
            self.check_alive()?;
            let status = match self.client.request(&Command::Status) {
                Ok(reply) => reply
                    .status
                    .ok_or_else(|| anyhow!("the writer's status reply has no status"))?,
                // A writer busy with a burst of images may answer late; it is alive (checked above).
                Err(ClientError::Timeout(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            match status.current {
                None => {
                    return status
                        .last_run
                        .ok_or_else(|| anyhow!("the writer reports no run at all"))
                }
                Some(current) => {
                    if current.images_written != last_progress.0 {
                        last_progress = (current.images_written, Instant::now());
                    } else if last_progress.1.elapsed() > idle_timeout {
                        tracing::warn!(
                            written = current.images_written,
                            requested = current.n_images,
                            "no image for {idle_timeout:?}: stopping the run"
                        );
                        let reply = self.client.request(&Command::Stop { reason: None })?;
                        if let Some(run) = reply.run {
                            return Ok(run);
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops every service upstream first and reports failures and leftovers.
    pub fn stop(mut self) -> Result<StopReport> {
        let mut report = StopReport::default();
        let receivers = std::mem::take(&mut self.receivers);
        let stages = [
            receivers,
            self.assembler.take().into_iter().collect(),
            std::mem::take(&mut self.writers),
        ];
        for stage in stages {
            for s in &stage {
                terminate(&s.child)?;
            }
            for mut s in stage {
                let status = wait_with_deadline(&mut s.child, Duration::from_secs(20))?;
                if !status.success() {
                    report.failed.push((s.name.clone(), status.to_string()));
                }
            }
        }
        report.leftovers = leftovers(&self.config);
        Ok(report)
    }
}

/// Shared-memory segments and ipc socket files of `cfg`'s detector that exist now.
pub fn leftovers(cfg: &DetectorConfig) -> Vec<PathBuf> {
    let prefix = format!("std-daq.{}.", cfg.detector_name);
    let ipc_prefix = format!("std-daq-{}-", cfg.detector_name);
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/dev/shm") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().contains(&prefix) {
                found.push(e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(&cfg.ipc_dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&ipc_prefix) {
                found.push(e.path());
            }
        }
    }
    found
}

/// Sends SIGTERM (a service then finishes what it holds and cleans up).
pub(crate) fn terminate(child: &Child) -> Result<()> {
    let status = Process::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .context("running kill")?;
    // A child that already exited cannot be signalled; its exit status tells the story.
    let _ = status;
    Ok(())
}

/// Waits for a child to exit; SIGKILLs it after `timeout`.
pub(crate) fn wait_with_deadline(
    child: &mut Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            child.kill()?;
            return Ok(child.wait()?);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Pipeline {
    /// After an error: SIGTERM everything still running (so owners unlink their segments), then
    /// SIGKILL whatever has not exited after a few seconds.
    fn drop(&mut self) {
        let services: Vec<&mut Service> = self.services_mut().collect();
        for s in &services {
            let _ = terminate(&s.child);
        }
        for s in services {
            let _ = wait_with_deadline(&mut s.child, Duration::from_secs(5));
        }
    }
}
