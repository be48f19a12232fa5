//! `std-daq up`: runs one detector's services as supervised child processes (receivers,
//! assembler, writer, one `std-daq preview` per `live_stream_configs` entry, optionally the
//! writer agent and the stream sender). A child that exits
//! is restarted with exponential backoff (1 s doubling to 32 s, reset after a minute of uptime)
//! and the restart is logged. On SIGINT/SIGTERM the children are stopped upstream first
//! (receivers, assembler, then the rest) so each drains into the next, and whatever a crashed
//! child left behind (shared memory, ipc files) is removed. With `--watch-config`
//! ([`ConfigWatch`]) it also applies configs set through `std-daq api` (docs/api.md).
//!
//! Never: leave a child running after it returns, or restart in a tight loop.

use crate::pipeline::{leftovers, terminate, wait_with_deadline};
use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use std_daq_common::service::Shutdown;
use std_daq_common::status::{RedisEnv, StatusBoard, StatusReporter};
use std_daq_common::{DetectorConfig, MetricsService};

const POLL: Duration = Duration::from_millis(100);
const MAX_BACKOFF_SHIFT: u32 = 5;
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// One service to keep running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Name in logs, e.g. `std-udp-recv-0`.
    pub name: String,
    pub binary: String,
    pub args: Vec<String>,
}

/// Which optional services `up` runs besides receivers, assembler and writer.
#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    /// Run `std-writer-agent` with this writable root.
    pub agent_output_root: Option<PathBuf>,
    /// Run `std-stream-send` to this `host:port`.
    pub stream_target: Option<String>,
    /// Run `std-daq pedestal-agent` (pedestal requests over RabbitMQ, default tag
    /// `<detector_name>.pedestal`; the broker from `BROKER_URL` or its default).
    pub pedestal_agent: bool,
}

/// The services of one detector, in start order (upstream first).
pub fn services_for(cfg: &DetectorConfig, config: &Path, opts: &UpOptions) -> Vec<ServiceSpec> {
    let c = config.display().to_string();
    let with_config = |extra: &[&str]| {
        let mut v = vec!["--config".to_string(), c.clone()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let mut specs: Vec<ServiceSpec> = (0..cfg.n_modules)
        .map(|m| ServiceSpec {
            name: format!("std-udp-recv-{m}"),
            binary: "std-udp-recv".into(),
            args: with_config(&["--module", &m.to_string()]),
        })
        .collect();
    specs.push(ServiceSpec {
        name: "std-assembler".into(),
        binary: "std-assembler".into(),
        args: with_config(&[]),
    });
    // Writer 0 is `std-h5-writer` as with one writer; writer k > 0 `std-h5-writer-<k>`.
    for k in 0..cfg.number_of_writers {
        let index = k.to_string();
        specs.push(ServiceSpec {
            name: crate::pipeline::Pipeline::writer_name(k),
            binary: "std-h5-writer".into(),
            args: if k == 0 {
                with_config(&[])
            } else {
                with_config(&["--writer-index", &index])
            },
        });
    }
    if let Some(root) = &opts.agent_output_root {
        specs.push(ServiceSpec {
            name: "std-writer-agent".into(),
            binary: "std-writer-agent".into(),
            args: with_config(&["--output-root", &root.display().to_string()]),
        });
    }
    // std_daq's live streams: one preview per entry, its type mapped onto a preview mode (the
    // config checked each entry at load).
    for (i, stream) in cfg.live_streams.iter().enumerate() {
        specs.push(ServiceSpec {
            name: format!("std-daq-preview-{i}"),
            binary: "std-daq".into(),
            args: {
                let mut v = vec!["preview".to_string()];
                v.extend(with_config(&[
                    "--bind",
                    &stream.endpoint,
                    "--mode",
                    &stream.mode.preview_arg(),
                ]));
                // The preview does not know its index: its port of the metrics rule is given.
                if let Some(addr) = cfg.metrics_addr(MetricsService::Preview(i as u16)) {
                    v.extend(["--metrics-addr".to_string(), addr.to_string()]);
                }
                v
            },
        });
    }
    if opts.pedestal_agent {
        specs.push(ServiceSpec {
            name: "std-daq-pedestal-agent".into(),
            binary: "std-daq".into(),
            args: {
                let mut v = vec!["pedestal-agent".to_string()];
                v.extend(with_config(&[]));
                v
            },
        });
    }
    if let Some(target) = &opts.stream_target {
        specs.push(ServiceSpec {
            name: "std-stream-send".into(),
            binary: "std-stream-send".into(),
            args: with_config(&["--target", target]),
        });
    }
    specs
}

#[derive(Debug)]
struct Slot {
    spec: ServiceSpec,
    child: Option<Child>,
    started: Instant,
    restarts: u32,
    next_start: Option<Instant>,
}

/// What happened while `up` ran.
#[derive(Debug, Default, Clone)]
pub struct UpReport {
    /// (service, how many times it was restarted)
    pub restarts: Vec<(String, u32)>,
    /// Children that did not exit 0 at shutdown.
    pub failed: Vec<(String, String)>,
    /// Stale shared memory or ipc files removed after every child had exited.
    pub cleaned: Vec<PathBuf>,
}

/// Starts every service, keeps them running until `shutdown`, then stops and cleans up.
pub fn run(
    bin_dir: &Path,
    cfg: &DetectorConfig,
    specs: Vec<ServiceSpec>,
    shutdown: &Shutdown,
) -> Result<UpReport> {
    run_watching(bin_dir, cfg, specs, shutdown, None)
}

fn new_slot(spec: ServiceSpec) -> Slot {
    Slot {
        spec,
        child: None,
        started: Instant::now(),
        restarts: 0,
        next_start: Some(Instant::now()),
    }
}

/// [`run`], and with `watch` also applies the configs set at run time (`POST /daq/config` of
/// `std-daq api`): see [`ConfigWatch`].
pub fn run_watching(
    bin_dir: &Path,
    cfg: &DetectorConfig,
    specs: Vec<ServiceSpec>,
    shutdown: &Shutdown,
    watch: Option<&ConfigWatch>,
) -> Result<UpReport> {
    let mut slots: Vec<Slot> = specs.into_iter().map(new_slot).collect();
    let mut cfg = cfg.clone();
    let mut watcher = match watch {
        Some(w) => Some(Watcher::start(w, &cfg)?),
        None => None,
    };
    let mut cleaned_on_apply = Vec::new();
    while !shutdown.is_triggered() {
        if let Some(w) = watcher.as_mut() {
            if let Some(new) = w.poll(&cfg) {
                apply(&mut slots, &cfg, &new, w, &mut cleaned_on_apply)?;
                cfg = new;
            }
        }
        let now = Instant::now();
        for slot in &mut slots {
            if let Some(child) = &mut slot.child {
                if let Some(status) = child.try_wait()? {
                    slot.child = None;
                    if now.duration_since(slot.started) > STABLE_AFTER {
                        slot.restarts = 0;
                    }
                    let backoff = Duration::from_secs(1 << slot.restarts.min(MAX_BACKOFF_SHIFT));
                    tracing::warn!(
                        service = slot.spec.name,
                        %status,
                        "exited; restarting in {backoff:?}"
                    );
                    slot.restarts += 1;
                    slot.next_start = Some(now + backoff);
                }
            }
            if slot.child.is_none() && slot.next_start.is_some_and(|t| now >= t) {
                match spawn(bin_dir, &slot.spec) {
                    Ok(child) => {
                        tracing::info!(
                            service = slot.spec.name,
                            pid = child.id(),
                            restarts = slot.restarts,
                            "started"
                        );
                        slot.child = Some(child);
                        slot.started = now;
                        slot.next_start = None;
                    }
                    Err(e) => {
                        tracing::error!(service = slot.spec.name, "cannot start: {e:#}");
                        slot.next_start = Some(now + Duration::from_secs(5));
                    }
                }
            }
        }
        std::thread::sleep(POLL);
    }

    tracing::info!("stopping");
    let mut report = UpReport::default();
    // Upstream first: receivers, then the assembler, then everything downstream of it.
    let stages: [&dyn Fn(&ServiceSpec) -> bool; 3] = [
        &|s| s.binary == "std-udp-recv",
        &|s| s.binary == "std-assembler",
        &|_| true,
    ];
    for in_stage in stages {
        for slot in slots.iter().filter(|s| in_stage(&s.spec)) {
            if let Some(child) = &slot.child {
                terminate(child)?;
            }
        }
        for slot in slots.iter_mut().filter(|s| in_stage(&s.spec)) {
            if let Some(mut child) = slot.child.take() {
                let status: ExitStatus = wait_with_deadline(&mut child, Duration::from_secs(20))?;
                if !status.success() {
                    report
                        .failed
                        .push((slot.spec.name.clone(), status.to_string()));
                }
            }
        }
    }
    report.restarts = slots
        .iter()
        .filter(|s| s.restarts > 0)
        .map(|s| (s.spec.name.clone(), s.restarts))
        .collect();
    // Every child has exited: anything of this detector still in /dev/shm or the ipc folder was
    // left by a child that was killed and is stale.
    report.cleaned = cleaned_on_apply;
    for path in leftovers(&cfg) {
        if std::fs::remove_file(&path).is_ok() {
            report.cleaned.push(path);
        }
    }
    Ok(report)
}

/// Starts a child whose stderr lines are copied to ours, prefixed with the service name.
fn spawn(bin_dir: &Path, spec: &ServiceSpec) -> Result<Child> {
    let exe = bin_dir.join(&spec.binary);
    let mut child = Command::new(&exe)
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    if let Some(stderr) = child.stderr.take() {
        let name = spec.name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(std::io::stderr(), "[{name}] {line}");
            }
        });
    }
    Ok(child)
}

/// `std-daq up --watch-config`: where configs set at run time come from and where the applied one
/// is written for the children.
///
/// At start `up` stores its `--config` as the detector's current config (stream
/// `std-daq.<det>.configs`) and keeps the status hash `status.std-daq.<det>.up` (which tells
/// `std-daq api` that a supervisor applies configs). Every second it looks at the newest entry
/// of the stream; a new one is validated again (exactly as a config file, and the detector name
/// may not change), written to `applied_path`, and applied: the children whose behaviour depends
/// on a changed key ([`crate::deploy::ServiceKind::depends_on`]) are stopped in drain order and
/// started on the applied config; services the new config adds or drops are started or stopped.
/// Progress goes to `std-daq.<det>.deployment` (`GET /daq/deployment`). A refused config changes
/// nothing; its deployment record says why.
#[derive(Debug, Clone)]
pub struct ConfigWatch {
    pub redis: RedisEnv,
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
    pub applied_path: PathBuf,
    /// The config file `up` was started with (named in the record of the start).
    pub config_path: PathBuf,
    pub opts: UpOptions,
}

struct Watcher {
    watch: ConfigWatch,
    bin_dir: PathBuf,
    con: Option<redis::Connection>,
    last_id: Option<String>,
    last_check: Instant,
    config_id: String,
    deployment_key: String,
    _status: StatusReporter,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("last_id", &self.last_id)
            .finish()
    }
}

impl Watcher {
    fn start(watch: &ConfigWatch, cfg: &DetectorConfig) -> Result<Self> {
        use crate::deploy;
        if watch.redis.skip {
            anyhow::bail!("--watch-config needs Redis, but REDIS_SKIP is set");
        }
        let det = &cfg.detector_name;
        let mut con = redis::Client::open(watch.redis.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .with_context(|| {
                format!(
                    "--watch-config: connecting to Redis at {}",
                    watch.redis.url()
                )
            })?;
        let origin = format!("std-daq up --config {}", watch.config_path.display());
        let id: String = deploy::add_config(det, &cfg.raw.to_string(), &origin)
            .query(&mut con)
            .context("--watch-config: storing the config in Redis")?;
        let now = std_writer_agent::protocol::unix_now();
        let record = deploy::deployment(
            &id,
            "SUCCESS",
            &format!("Config {id}: {origin} started every service with it."),
            &serde_json::Map::new(),
            now,
            Some(now),
        );
        let _: () = redis::cmd("SET")
            .arg(deploy::deployment_key(det))
            .arg(record.to_string())
            .query(&mut con)
            .context("--watch-config: storing the deployment record")?;
        let board = StatusBoard::default();
        board.set("watch_config", deploy::configs_key(det));
        board.set("applied_config", watch.applied_path.display());
        board.set("config_id", &id);
        let env = RedisEnv {
            service_name: None,
            ..watch.redis.clone()
        };
        let status = StatusReporter::start(&env, &deploy::supervisor_status_name(det), cfg, board);
        tracing::info!(
            config_id = id,
            "watching {} for config changes",
            deploy::configs_key(det)
        );
        Ok(Watcher {
            bin_dir: watch.bin_dir.clone(),
            watch: watch.clone(),
            con: Some(con),
            last_id: Some(id.clone()),
            last_check: Instant::now(),
            config_id: id,
            deployment_key: deploy::deployment_key(det),
            _status: status,
        })
    }

    /// A new, valid config to apply, at most once a second. A refused one is recorded and
    /// skipped.
    fn poll(&mut self, cfg: &DetectorConfig) -> Option<DetectorConfig> {
        use crate::deploy;
        if self.last_check.elapsed() < Duration::from_secs(1) {
            return None;
        }
        self.last_check = Instant::now();
        let key = deploy::configs_key(&cfg.detector_name);
        if self.con.is_none() {
            self.con = redis::Client::open(self.watch.redis.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
                .ok();
        }
        let con = self.con.as_mut()?;
        let reply: redis::Value = match redis::cmd("XREVRANGE")
            .arg(&key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(con)
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("--watch-config: reading {key}: {e} (retrying)");
                self.con = None;
                return None;
            }
        };
        let (id, json) = crate::compat::newest_entry(&reply)?;
        if self.last_id.as_deref() == Some(id.as_str()) {
            return None;
        }
        self.last_id = Some(id.clone());
        self.config_id = id.clone();
        let origin = format!("Redis stream {key} entry {id}");
        let now = std_writer_agent::protocol::unix_now();
        let parsed = serde_json::from_str::<serde_json::Value>(&json)
            .map_err(|e| format!("config {origin}: not JSON: {e}"))
            .and_then(|v| deploy::validate_change(cfg, &v, &origin));
        match parsed {
            Ok(new) => Some(new),
            Err(e) => {
                tracing::error!("refused, nothing changed: {e}");
                self.record(
                    "FAILED",
                    &format!("Config {id} refused, nothing changed: {e}"),
                    &serde_json::Map::new(),
                    now,
                    Some(now),
                );
                None
            }
        }
    }

    fn record(
        &mut self,
        status: &str,
        message: &str,
        services: &serde_json::Map<String, serde_json::Value>,
        start: f64,
        stop: Option<f64>,
    ) {
        use crate::deploy;
        let Some(con) = self.con.as_mut() else { return };
        let record = deploy::deployment(&self.config_id, status, message, services, start, stop);
        let key = self.deployment_key.clone();
        if let Err(e) = redis::cmd("SET")
            .arg(&key)
            .arg(record.to_string())
            .query::<()>(con)
        {
            tracing::warn!("--watch-config: storing the deployment record: {e}");
        }
    }
}

/// Applies a validated new config: writes it for the children, restarts those that depend on a
/// changed key (drain order), starts added services and stops dropped ones.
fn apply(
    slots: &mut Vec<Slot>,
    old: &DetectorConfig,
    new: &DetectorConfig,
    w: &mut Watcher,
    cleaned: &mut Vec<PathBuf>,
) -> Result<()> {
    use crate::deploy::{self, ServiceKind};
    let start = std_writer_agent::protocol::unix_now();
    let keys = deploy::changed_keys(&old.raw, &new.raw);
    let path = &w.watch.applied_path;
    let tmp = path.with_extension("json.tmp");
    let written = serde_json::to_string_pretty(&new.raw)
        .map_err(std::io::Error::other)
        .and_then(|text| std::fs::write(&tmp, text))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let message = format!(
            "Config {} not applied, nothing changed: cannot write {}: {e}",
            w.config_id,
            path.display()
        );
        tracing::error!("{message}");
        w.record(
            "FAILED",
            &message,
            &serde_json::Map::new(),
            start,
            Some(start),
        );
        return Ok(());
    }
    let new_specs = services_for(new, path, &w.watch.opts);
    // Args with the config path left out: the same service doing the same thing.
    let strip = |spec: &ServiceSpec| -> Vec<String> {
        let mut a = spec.args.clone();
        if let Some(i) = a.iter().position(|x| x == "--config") {
            a.drain(i..(i + 2).min(a.len()));
        }
        a
    };
    let keep = |slot: &Slot| -> bool {
        let kind = ServiceKind::of(&slot.spec.binary, &slot.spec.args);
        new_specs
            .iter()
            .any(|n| n.name == slot.spec.name && strip(n) == strip(&slot.spec))
            && kind.is_some_and(|k| !keys.iter().any(|key| k.depends_on(key)))
    };
    let going: Vec<String> = slots
        .iter()
        .filter(|s| !keep(s))
        .map(|s| s.spec.name.clone())
        .collect();
    let mut services: serde_json::Map<String, serde_json::Value> = going
        .iter()
        .map(|n| (n.clone(), "Deploying".into()))
        .collect();
    w.record(
        "RUNNING",
        &format!("Config {}: restarting {}", w.config_id, going.join(", ")),
        &services,
        start,
        None,
    );
    tracing::info!(config_id = w.config_id, changed = ?keys, restart = ?going, "applying a new config");
    // Drain order, as at shutdown.
    let stages: [&dyn Fn(&ServiceSpec) -> bool; 3] = [
        &|s| s.binary == "std-udp-recv",
        &|s| s.binary == "std-assembler",
        &|_| true,
    ];
    let mut failed = Vec::new();
    for in_stage in stages {
        for slot in slots
            .iter()
            .filter(|s| going.contains(&s.spec.name) && in_stage(&s.spec))
        {
            if let Some(child) = &slot.child {
                terminate(child)?;
            }
        }
        for slot in slots
            .iter_mut()
            .filter(|s| going.contains(&s.spec.name) && in_stage(&s.spec))
        {
            if let Some(mut child) = slot.child.take() {
                let status = wait_with_deadline(&mut child, Duration::from_secs(20))?;
                if !status.success() {
                    failed.push(format!("{} exited {status}", slot.spec.name));
                }
            }
        }
    }
    // Everything stopped that owned what the new config changes: stale segments of stopped
    // owners go (a kept service's own segments are in use and stay).
    if going
        .iter()
        .any(|n| n.starts_with("std-udp-recv") || n == "std-assembler")
    {
        let stopped_all = slots.iter().all(|s| s.child.is_none());
        if stopped_all {
            for p in leftovers(old) {
                if std::fs::remove_file(&p).is_ok() {
                    cleaned.push(p);
                }
            }
        }
    }
    let mut old_slots: Vec<Slot> = std::mem::take(slots);
    for spec in new_specs {
        match old_slots
            .iter()
            .position(|s| s.spec.name == spec.name && !going.contains(&s.spec.name))
        {
            Some(i) => {
                let mut slot = old_slots.remove(i);
                slot.spec = spec;
                slots.push(slot);
            }
            None => {
                services.insert(spec.name.clone(), "Done".into());
                let mut slot = new_slot(spec);
                if let Some(old) = old_slots.iter().find(|s| s.spec.name == slot.spec.name) {
                    slot.restarts = old.restarts;
                }
                slots.push(slot);
            }
        }
    }
    for name in &going {
        if !slots.iter().any(|s| &s.spec.name == name) {
            services.insert(name.clone(), "Removed".into());
        }
    }
    // Start the new children now, and report the deployment done when the writer answers
    // (the agent's next request needs it; the other services have no command socket).
    for slot in slots.iter_mut().filter(|s| s.child.is_none()) {
        match spawn(&w.bin_dir, &slot.spec) {
            Ok(child) => {
                tracing::info!(
                    service = slot.spec.name,
                    pid = child.id(),
                    "started on the new config"
                );
                slot.child = Some(child);
                slot.started = Instant::now();
                slot.next_start = None;
            }
            Err(e) => {
                failed.push(format!("{} cannot start: {e:#}", slot.spec.name));
                services.insert(slot.spec.name.clone(), "Error".into());
            }
        }
    }
    // Every writer that (re)started must answer before the next request comes.
    let ctx = zmq::Context::new();
    for k in 0..new.number_of_writers {
        let name = crate::pipeline::Pipeline::writer_name(k);
        if !going.contains(&name) {
            continue;
        }
        let client = std_writer_agent::writer_client::WriterClient::new(
            &ctx,
            &std_daq_common::names::writer_command_endpoint_of(new, k),
            Duration::from_millis(500),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if client
                .request(&std_daq_common::writer_command::Command::Status)
                .is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                failed.push(format!("{name} did not answer within 30 s"));
                services.insert(name.clone(), "Error".into());
                break;
            }
            std::thread::sleep(POLL);
        }
    }
    let stop = std_writer_agent::protocol::unix_now();
    let what = if keys.is_empty() {
        "nothing changed".to_string()
    } else {
        format!("changed {}", keys.join(", "))
    };
    if failed.is_empty() {
        w.record(
            "SUCCESS",
            &format!(
                "Config {} applied ({what}); restarted {}.",
                w.config_id,
                if going.is_empty() {
                    "nothing".into()
                } else {
                    going.join(", ")
                }
            ),
            &services,
            start,
            Some(stop),
        );
    } else {
        w.record(
            "FAILED",
            &format!(
                "Config {} applied ({what}); restarted {}; but: {}.",
                w.config_id,
                going.join(", "),
                failed.join("; ")
            ),
            &services,
            start,
            Some(stop),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::deploy::ServiceKind;

    #[test]
    fn the_pedestal_service_runs_only_when_asked_and_is_told_from_a_preview() {
        let json = serde_json::json!({
            "detector_name": "pt", "detector_type": "jungfrau-converted", "n_modules": 1,
            "bit_depth": 16, "image_pixel_height": 512, "image_pixel_width": 1024,
            "start_udp_port": 50000, "calibration_file": "/cal/jf.h5",
            "module_positions": {"0": [0, 0, 1023, 511]},
        });
        let cfg = DetectorConfig::from_json_str(&json.to_string(), "test").unwrap();
        let path = Path::new("/etc/jf.json");
        let plain = services_for(&cfg, path, &UpOptions::default());
        assert!(plain.iter().all(|s| s.name != "std-daq-pedestal-agent"));
        let opts = UpOptions {
            pedestal_agent: true,
            ..UpOptions::default()
        };
        let specs = services_for(&cfg, path, &opts);
        let agent = specs
            .iter()
            .find(|s| s.name == "std-daq-pedestal-agent")
            .unwrap();
        assert_eq!(agent.binary, "std-daq");
        assert_eq!(agent.args, ["pedestal-agent", "--config", "/etc/jf.json"]);
        assert_eq!(
            ServiceKind::of(&agent.binary, &agent.args),
            Some(ServiceKind::PedestalAgent)
        );
        assert_eq!(specs.len(), plain.len() + 1);
    }

    /// `number_of_writers` 3: writer 0 as with one writer, writers 1 and 2 with their index.
    #[test]
    fn every_writer_of_number_of_writers_is_a_service() {
        let json = serde_json::json!({
            "detector_name": "nw", "detector_type": "jungfrau-raw", "n_modules": 1,
            "bit_depth": 16, "image_pixel_height": 512, "image_pixel_width": 1024,
            "start_udp_port": 50000, "number_of_writers": 3,
            "module_positions": {"0": [0, 0, 1023, 511]},
        });
        let cfg = DetectorConfig::from_json_str(&json.to_string(), "test").unwrap();
        let specs = services_for(&cfg, Path::new("/etc/nw.json"), &UpOptions::default());
        let writers: Vec<(&str, Vec<&str>)> = specs
            .iter()
            .filter(|s| s.binary == "std-h5-writer")
            .map(|s| (s.name.as_str(), s.args.iter().map(String::as_str).collect()))
            .collect();
        assert_eq!(
            writers,
            vec![
                ("std-h5-writer", vec!["--config", "/etc/nw.json"]),
                (
                    "std-h5-writer-1",
                    vec!["--config", "/etc/nw.json", "--writer-index", "1"]
                ),
                (
                    "std-h5-writer-2",
                    vec!["--config", "/etc/nw.json", "--writer-index", "2"]
                ),
            ]
        );
        assert!(specs
            .iter()
            .filter(|s| s.binary == "std-h5-writer")
            .all(|s| ServiceKind::of(&s.binary, &s.args) == Some(ServiceKind::Writer)));
    }
}
