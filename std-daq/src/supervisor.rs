//! `std-daq up`: runs one detector's services as supervised child processes (receivers,
//! assembler, writer, one `std-daq preview` per `live_stream_configs` entry, optionally the
//! writer agent and the stream sender). A child that exits
//! is restarted with exponential backoff (1 s doubling to 32 s, reset after a minute of uptime)
//! and the restart is logged. On SIGINT/SIGTERM the children are stopped upstream first
//! (receivers, assembler, then the rest) so each drains into the next, and whatever a crashed
//! child left behind (shared memory, ipc files) is removed.
//!
//! Never: leave a child running after it returns, or restart in a tight loop.

use crate::pipeline::{leftovers, terminate, wait_with_deadline};
use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use std_daq_common::service::Shutdown;
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
    for binary in ["std-assembler", "std-h5-writer"] {
        specs.push(ServiceSpec {
            name: binary.into(),
            binary: binary.into(),
            args: with_config(&[]),
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
    let mut slots: Vec<Slot> = specs
        .into_iter()
        .map(|spec| Slot {
            spec,
            child: None,
            started: Instant::now(),
            restarts: 0,
            next_start: Some(Instant::now()),
        })
        .collect();
    while !shutdown.is_triggered() {
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
    for path in leftovers(cfg) {
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
