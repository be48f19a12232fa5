//! Helpers for the RabbitMQ tests: an in-process agent with a unique tag, a status observer, and
//! a real pipeline (std-daq-tests options: own detector name, ports, folders).
#![allow(clippy::unwrap_used, dead_code)]

use futures_lite::StreamExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use std_daq::pipeline::Pipeline;
use std_writer_agent::protocol::exchange;
use std_writer_agent::{broker, Agent, AgentSettings, AgentState, ClientOptions, Policy};
use std_writer_agent::{ShutdownHandle, StatusMessage};
use tokio::sync::{mpsc, watch};

pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Watchdog for anything that should happen promptly; never used to synchronise.
pub const WATCHDOG: Duration = Duration::from_secs(60);

/// A routing key no other test (or test process) uses.
pub fn unique_tag(name: &str) -> String {
    format!("std-daq-test.{name}.{}", std::process::id())
}

pub fn client_options(tag: &str) -> ClientOptions {
    ClientOptions {
        broker_url: BROKER.into(),
        tag: tag.into(),
        idle_timeout: Duration::from_secs(30),
    }
}

pub struct RunningAgent {
    pub shutdown: ShutdownHandle,
    pub state: watch::Receiver<AgentState>,
    pub task: tokio::task::JoinHandle<()>,
}

impl RunningAgent {
    /// Starts an agent and waits until it consumes on the broker.
    pub async fn start(tag: &str, writer_endpoint: &str, policy: Policy) -> Self {
        let mut settings = AgentSettings::new(
            BROKER,
            tag,
            &format!("{tag}.writer_agent"),
            writer_endpoint,
            policy,
        );
        settings.poll_interval = Duration::from_millis(50);
        settings.progress_interval = Duration::from_millis(200);
        settings.writer_timeout = Duration::from_secs(2);
        settings.max_backoff = Duration::from_millis(500);
        let agent = Agent::new(settings).unwrap();
        let shutdown = agent.shutdown_handle();
        let mut state = agent.state();
        let task = tokio::spawn(async move { agent.run().await.unwrap() });
        tokio::time::timeout(WATCHDOG, state.wait_for(|s| s.connected))
            .await
            .expect("the agent did not connect to RabbitMQ")
            .unwrap();
        RunningAgent {
            shutdown,
            state,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(WATCHDOG, self.task)
            .await
            .expect("the agent did not stop")
            .unwrap();
    }
}

/// Every status on the `status` exchange whose request id is in `ids` (or any id if empty), in
/// the order the broker delivers them. Bound before it returns, so nothing published afterwards
/// is missed.
pub async fn observe_statuses() -> mpsc::UnboundedReceiver<StatusMessage> {
    let conn = broker::connect(BROKER, "std-daq test observer")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    broker::declare_exchanges(&ch).await.unwrap();
    let mut consumer = broker::bind_own_queue(&ch, exchange::STATUS, "", true)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _keep = (conn, ch);
        while let Some(Ok(d)) = consumer.next().await {
            if tx
                .send(StatusMessage::from_amqp(&d.properties, &d.data))
                .is_err()
            {
                break;
            }
        }
    });
    rx
}

/// The next status for `id` from an observer, with a watchdog.
pub async fn next_for(rx: &mut mpsc::UnboundedReceiver<StatusMessage>, id: &str) -> StatusMessage {
    loop {
        let s = tokio::time::timeout(WATCHDOG, rx.recv())
            .await
            .expect("no status within the watchdog")
            .expect("observer closed");
        if s.request_id == id {
            return s;
        }
    }
}

/// A real pipeline (2-module JUNGFRAU) with an output root inside its work folder.
pub async fn start_pipeline(name: &str) -> (Arc<Pipeline>, PathBuf, String) {
    let opts = std_daq_tests::options(name).unwrap();
    let detector = opts.detector_name.clone();
    let root = opts.work_dir.join("data");
    let p = tokio::task::spawn_blocking(move || Pipeline::start(opts, Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    std::fs::create_dir_all(&root).unwrap();
    (Arc::new(p), root, detector)
}

/// Runs the simulator on a blocking thread.
pub fn simulate(
    p: &Arc<Pipeline>,
    images: u64,
    rate: f64,
) -> tokio::task::JoinHandle<std_daq::pipeline::SimReport> {
    let p = Arc::clone(p);
    tokio::task::spawn_blocking(move || p.run_simulator(images, rate, "", false).unwrap())
}

/// Stops the pipeline cleanly and removes its work folder.
pub async fn stop_pipeline(p: Arc<Pipeline>, work: &Path) {
    let p = Arc::into_inner(p).expect("the pipeline is still shared");
    let report = tokio::task::spawn_blocking(move || p.stop().unwrap())
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
    std::fs::remove_dir_all(work).unwrap();
}

pub fn writer_endpoint(p: &Pipeline) -> String {
    std_daq_common::names::writer_command_endpoint(&p.config)
}
