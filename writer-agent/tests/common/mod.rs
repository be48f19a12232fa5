//! Helpers for the RabbitMQ tests: an in-process agent with a unique tag, the agent binary as a
//! child process, a status observer, and a real pipeline (std-daq-tests options: own detector
//! name, ports, folders). Every agent's durable queues are deleted when its test ends.
#![allow(clippy::unwrap_used, dead_code)]

use futures_lite::StreamExt;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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

/// The service name the test agents of `tag` use (it names their queues).
pub fn service_name(tag: &str) -> String {
    format!("{tag}.writer_agent")
}

/// Deletes the durable queues of an agent's service name when dropped, even if the test failed.
pub struct QueuesGuard(Option<String>);

impl QueuesGuard {
    pub fn new(service_name: &str) -> Self {
        QueuesGuard(Some(service_name.to_string()))
    }

    /// Keeps the queues (the test starts the agent again and hands them on).
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for QueuesGuard {
    fn drop(&mut self) {
        let Some(service) = self.0.take() else { return };
        // A runtime of its own on a thread of its own: drop may run inside the test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            if let Err(e) = rt.block_on(broker::delete_agent_queues(BROKER, &service)) {
                eprintln!("deleting the queues of {service}: {e}");
            }
        })
        .join();
    }
}

/// The settings the in-process test agents use (short intervals).
pub fn test_settings(tag: &str, writer_endpoint: &str, policy: Policy) -> AgentSettings {
    let mut settings = AgentSettings::new(BROKER, tag, &service_name(tag), writer_endpoint, policy);
    settings.poll_interval = Duration::from_millis(50);
    settings.progress_interval = Duration::from_millis(200);
    settings.writer_timeout = Duration::from_secs(2);
    settings.max_backoff = Duration::from_millis(500);
    settings.waiting_interval = Duration::from_millis(300);
    settings
}

pub struct RunningAgent {
    pub shutdown: ShutdownHandle,
    pub state: watch::Receiver<AgentState>,
    pub task: tokio::task::JoinHandle<()>,
    pub queues: QueuesGuard,
}

impl RunningAgent {
    /// Starts an agent and waits until it consumes on the broker.
    pub async fn start(tag: &str, writer_endpoint: &str, policy: Policy) -> Self {
        Self::start_with(test_settings(tag, writer_endpoint, policy)).await
    }

    pub async fn start_with(settings: AgentSettings) -> Self {
        let queues = QueuesGuard::new(&settings.service_name);
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
            queues,
        }
    }

    /// Stops the agent and deletes its queues.
    pub async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(WATCHDOG, self.task)
            .await
            .expect("the agent did not stop")
            .unwrap();
    }

    /// Stops the agent, keeping its queues (and what waits in them) for the next agent.
    pub async fn stop_keeping_queues(mut self) {
        self.queues.disarm();
        self.stop().await;
    }
}

/// The agent binary (`std-writer-agent`) as a child process, its log lines on a channel.
pub struct AgentProcess {
    pub child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl AgentProcess {
    /// Starts `std-writer-agent --config <config> --output-root <root> --tag <tag>
    /// --service-name <service_name(tag)>` plus `extra` (no Redis status, info logs).
    pub fn spawn(config: &Path, root: &Path, tag: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_std-writer-agent"))
            .arg("--config")
            .arg(config)
            .arg("--output-root")
            .arg(root)
            .args(["--tag", tag, "--service-name", &service_name(tag)])
            .args([
                "--broker",
                BROKER,
                "--poll-ms",
                "50",
                "--progress-ms",
                "200",
            ])
            .args(extra)
            .env("REDIS_SKIP", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting std-writer-agent");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[agent {}] {line}", std::process::id());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        AgentProcess { child, lines }
    }

    /// The next log line containing `needle` (earlier lines are skipped), with the watchdog.
    pub async fn wait_log(&mut self, needle: &str) -> String {
        loop {
            let line = tokio::time::timeout(WATCHDOG, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("the agent logged no {needle:?} within the watchdog"))
                .unwrap_or_else(|| panic!("the agent's log ended before {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Waits until the agent consumes its queue.
    pub async fn wait_serving(&mut self) {
        self.wait_log("serving write requests").await;
    }

    /// SIGKILL: a crash, as far as the broker and the writer can tell.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit.
    pub async fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        let mut child = std::mem::replace(&mut self.child, dummy_child());
        tokio::time::timeout(
            WATCHDOG,
            tokio::task::spawn_blocking(move || child.wait().unwrap()),
        )
        .await
        .expect("the agent did not stop on SIGTERM")
        .unwrap()
    }
}

/// An already-reaped child, to leave in a [`AgentProcess`] whose real child was taken.
fn dummy_child() -> Child {
    let mut c = Command::new("true").spawn().unwrap();
    let _ = c.wait();
    c
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Runs the simulator from frame `start_frame` on a blocking thread (a second burst in the same
/// second must not restart at frame 1: those would be taken as late packets).
pub fn simulate_from(
    p: &Arc<Pipeline>,
    images: u64,
    rate: f64,
    start_frame: u64,
) -> tokio::task::JoinHandle<std_daq::pipeline::SimReport> {
    let p = Arc::clone(p);
    tokio::task::spawn_blocking(move || {
        p.run_simulator_with(
            images,
            rate,
            &["--start-frame".into(), start_frame.to_string()],
        )
        .unwrap()
    })
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

/// A channel on a connection of its own (keep the connection alive while using the channel).
pub async fn test_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = broker::connect(BROKER, "std-daq test").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// Messages ready in a queue (passive declare: fails if the queue does not exist).
pub async fn ready_messages(queue: &str) -> u32 {
    let (conn, ch) = test_channel().await;
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
    q.message_count()
}

/// Publishes `body` on the `request` exchange with `routing_key`, `mandatory` and publisher
/// confirms, like a client; `correlation_id` None sends none. Returns the broker's confirmation
/// (`Ack(Some(_))`: returned, nobody bound).
pub async fn publish_request(
    routing_key: &str,
    correlation_id: Option<&str>,
    body: &[u8],
) -> lapin::Confirmation {
    let (conn, ch) = test_channel().await;
    broker::declare_exchanges(&ch).await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut props = lapin::BasicProperties::default();
    if let Some(id) = correlation_id {
        props = props.with_correlation_id(id.into());
    }
    let confirm = ch
        .basic_publish(
            exchange::REQUEST.into(),
            routing_key.into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
    confirm
}
