//! `std-daq pedestal-agent`: JUNGFRAU pedestal runs requested over RabbitMQ, with the
//! std_daq_service conventions the writer agent follows (docs/protocol.md, "Pedestal requests").
//!
//! The service binds a private queue (uuid4 name, exclusive, auto-delete) to the `request`
//! exchange with its own routing key, by default `<detector_name>.pedestal` ([`default_tag`]),
//! and one to `kill` with the same key. A request's id is its AMQP `correlation_id`; its body is
//! the JSON of `POST /pedestal` and is judged by the same function
//! ([`crate::pedestal::options_from_body`]: unknown fields refused, `output` only next to the
//! config's `calibration_file`). Every status goes to the `status` exchange, the request body
//! echoed, headers `action`, `source` (the service name, default
//! `<detector_name>.pedestal_agent`) and `message`:
//!
//! - `request_fail` at once for a body that is refused, a request without correlation id, or one
//!   that arrives while a run is in progress (one run at a time);
//! - otherwise `request_start`, then `request_progress` (std-daq extension) with `state:
//!   "running"` once the run follows the image stream (start the dark frames then) and the frame
//!   counts about once a second, then the final status: `request_success` whose `message` is the
//!   report (the JSON `std-daq pedestal` prints, also in the body as `report`), or
//!   `request_fail` saying why (the gain file, a timeout, no receivers, ...);
//! - a kill with the running request's correlation id cancels the run: nothing is written, the
//!   old calibration stays, and the request ends with `request_fail` "killed: ..." (body
//!   `killed: true`), never `request_success`. A kill for anything else gets `kill_ignored`.
//!
//! When the broker goes away the run goes on; the service reconnects with backoff and publishes
//! the statuses it still owes. On shutdown a running run is cancelled (`request_fail`).
//!
//! Must never: run two pedestal runs at once, write anywhere but where
//! [`crate::pedestal::options_from_body`] allows, report a killed or cancelled run as a success,
//! or panic or stop on anything that arrives from the network.

use crate::pedestal::{self, PedestalProgress, PedestalReport};
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::ConfirmSelectOptions;
use lapin::Channel;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use std_daq_common::status::StatusBoard;
use std_daq_common::{names, DetectorConfig};
use std_writer_agent::broker::{self, BrokerError};
use std_writer_agent::protocol::{action, correlation_id, echo, exchange, unix_now};
use std_writer_agent::StatusMessage;
use tokio::sync::{mpsc, watch};

/// The largest request body judged; a larger one is refused unread.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The default routing key of the pedestal service of detector `detector_name`. It differs from
/// the writer agent's default tag (the detector name): a topic binding `jf` does not match the
/// key `jf.pedestal`, so write requests and pedestal requests never meet (a writer agent bound
/// with `#` would take both; give it its detector name as tag then).
pub fn default_tag(detector_name: &str) -> String {
    format!("{detector_name}.pedestal")
}

/// The default service name (`source` of every status).
pub fn default_service_name(detector_name: &str) -> String {
    format!("{detector_name}.pedestal_agent")
}

/// How the service runs.
#[derive(Debug, Clone)]
pub struct PedestalAgentSettings {
    /// `amqp://user:password@host:port/vhost`.
    pub broker_url: String,
    /// Routing key bound on `request` and `kill`.
    pub tag: String,
    /// The `source` header of every status; the connection's name in the management UI.
    pub service_name: String,
    /// Least time between two progress statuses with frame counts.
    pub progress_interval: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
}

impl PedestalAgentSettings {
    /// The defaults for the detector of `cfg`.
    pub fn new(broker_url: &str, cfg: &DetectorConfig) -> Self {
        PedestalAgentSettings {
            broker_url: broker_url.into(),
            tag: default_tag(&cfg.detector_name),
            service_name: default_service_name(&cfg.detector_name),
            progress_interval: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// Why the service stopped.
#[derive(Debug)]
pub enum PedestalAgentError {
    /// The broker refused something only an operator can change (an exchange with other
    /// settings, a tag that is no AMQP name).
    Broker(BrokerError),
    /// The config is not one of a JUNGFRAU.
    NotJungfrau(String),
}

impl std::fmt::Display for PedestalAgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PedestalAgentError::Broker(e) => write!(f, "{e}"),
            PedestalAgentError::NotJungfrau(det) => write!(
                f,
                "detector {det}: a pedestal service needs a JUNGFRAU (detector_type jungfrau-raw \
                 or jungfrau-converted)"
            ),
        }
    }
}

impl std::error::Error for PedestalAgentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PedestalAgentError::Broker(e) => Some(e),
            PedestalAgentError::NotJungfrau(_) => None,
        }
    }
}

/// Stops a running [`PedestalAgent`] (a running run is cancelled and failed).
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

/// What the blocking run thread tells the service loop.
#[derive(Debug)]
enum Event {
    /// The run follows the image stream.
    Ready,
    Progress(PedestalProgress),
}

/// The run in progress.
#[derive(Debug)]
struct Running {
    job: Job,
    cancel: Arc<AtomicBool>,
    /// A kill for it arrived.
    killed: bool,
    /// The service stops.
    stopping: bool,
    ready: bool,
    frames_per_stage: u32,
    last_progress: Option<Instant>,
    events: mpsc::UnboundedReceiver<Event>,
    handle: tokio::task::JoinHandle<anyhow::Result<PedestalReport>>,
}

/// One request: its id, echo and source, for its statuses.
#[derive(Debug, Clone)]
struct Job {
    id: String,
    echo: Map<String, Value>,
    received_at: f64,
    source: String,
}

impl Job {
    fn status(&self, act: &str, message: String, extra: Value) -> StatusMessage {
        let final_ = act == action::REQUEST_SUCCESS || act == action::REQUEST_FAIL;
        let mut body = self.echo.clone();
        let fields = json!({
            "request_id": self.id,
            "source": self.source,
            "action": act,
            "message": message,
            "init_timestamp": self.received_at,
            "end_timestamp": if final_ { Value::from(unix_now()) } else { Value::Null },
        });
        for f in [fields, extra] {
            if let Value::Object(f) = f {
                body.extend(f);
            }
        }
        StatusMessage {
            request_id: self.id.clone(),
            action: act.into(),
            source: self.source.clone(),
            message,
            body: Value::Object(body),
        }
    }
}

/// The service: [`PedestalAgent::run`] until its [`ShutdownHandle`] is triggered.
#[derive(Debug)]
pub struct PedestalAgent {
    settings: PedestalAgentSettings,
    cfg: DetectorConfig,
    shutdown: watch::Receiver<bool>,
    shutdown_tx: Arc<watch::Sender<bool>>,
    run: Option<Running>,
    /// Statuses that could not be published (the broker went away), oldest first.
    owed: Vec<StatusMessage>,
    /// The service's counters (its Redis status hash): [`PedestalAgent::board`].
    board: StatusBoard,
    counts: Counts,
}

/// Counters of the status hash.
#[derive(Debug, Default)]
struct Counts {
    requests_received: u64,
    requests_refused: u64,
    runs_succeeded: u64,
    runs_failed: u64,
    runs_killed: u64,
}

impl PedestalAgent {
    pub fn new(
        settings: PedestalAgentSettings,
        cfg: DetectorConfig,
    ) -> Result<Self, PedestalAgentError> {
        use std_daq_common::DetectorType;
        if !matches!(
            cfg.detector_type,
            DetectorType::JungfrauRaw | DetectorType::JungfrauConverted
        ) {
            return Err(PedestalAgentError::NotJungfrau(cfg.detector_name.clone()));
        }
        broker::short(&settings.tag).map_err(PedestalAgentError::Broker)?;
        let (tx, rx) = watch::channel(false);
        let agent = PedestalAgent {
            settings,
            cfg,
            shutdown: rx,
            shutdown_tx: Arc::new(tx),
            run: None,
            owed: Vec::new(),
            board: StatusBoard::default(),
            counts: Counts::default(),
        };
        agent.board.set("tag", &agent.settings.tag);
        agent.board.set(
            "broker",
            std_writer_agent::agent::redact(&agent.settings.broker_url),
        );
        agent.board.set("connected", 0);
        agent.show();
        Ok(agent)
    }

    /// The service's state for its status hash (`std-daq status`): `connected`, `state` (idle,
    /// starting, running), `current_request_id`, `requests_received`, `requests_refused`,
    /// `runs_succeeded`, `runs_failed`, `runs_killed`, `last_calibration_id`.
    pub fn board(&self) -> StatusBoard {
        self.board.clone()
    }

    fn show(&self) {
        let b = &self.board;
        let c = &self.counts;
        let (state, current) = match &self.run {
            None => ("idle", String::new()),
            Some(r) if r.ready => ("running", r.job.id.clone()),
            Some(r) => ("starting", r.job.id.clone()),
        };
        b.set("state", state);
        b.set("current_request_id", current);
        b.set("requests_received", c.requests_received);
        b.set("requests_refused", c.requests_refused);
        b.set("runs_succeeded", c.runs_succeeded);
        b.set("runs_failed", c.runs_failed);
        b.set("runs_killed", c.runs_killed);
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.shutdown_tx))
    }

    /// Serves until shutdown. Broker trouble is not fatal (reconnects with backoff), except an
    /// exchange with other settings or a bad tag ([`BrokerError::is_fatal`]).
    pub async fn run(mut self) -> Result<(), PedestalAgentError> {
        const FIRST_BACKOFF: Duration = Duration::from_millis(100);
        let mut backoff = FIRST_BACKOFF;
        let mut shutdown = self.shutdown.clone();
        while !*shutdown.borrow() {
            let mut served = false;
            match self.serve(&mut served).await {
                Ok(()) => break,
                Err(e) if e.is_fatal() => {
                    self.board.set("connected", 0);
                    tracing::error!("{e}");
                    self.abandon().await;
                    return Err(PedestalAgentError::Broker(e));
                }
                Err(e) => {
                    self.board.set("connected", 0);
                    if served {
                        backoff = FIRST_BACKOFF;
                    }
                    tracing::warn!("{e}; reconnecting in {backoff:?}");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
            backoff = (backoff * 2).min(self.settings.max_backoff);
        }
        self.abandon().await;
        tracing::info!("pedestal service stopped");
        Ok(())
    }

    /// A run still going when the service stops without a broker: cancelled, logged.
    async fn abandon(&mut self) {
        if let Some(run) = self.run.take() {
            run.cancel.store(true, Ordering::Relaxed);
            let result = run.handle.await;
            tracing::warn!(
                request_id = run.job.id,
                ok = matches!(result, Ok(Ok(_))),
                "the pedestal service stopped without a broker; the run was cancelled and its \
                 final status could not be published"
            );
        }
    }

    /// One connection's life. `Ok` = shutdown requested.
    async fn serve(&mut self, served: &mut bool) -> Result<(), BrokerError> {
        let s = self.settings.clone();
        let conn = broker::connect(&s.broker_url, &s.service_name).await?;
        let open = || async {
            conn.create_channel()
                .await
                .map_err(|source| BrokerError::Amqp {
                    op: "opening a channel",
                    source,
                })
        };
        let requests_ch = open().await?;
        broker::declare_exchanges(&requests_ch).await?;
        let kill_ch = open().await?;
        let status_ch = open().await?;
        status_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|source| BrokerError::Amqp {
                op: "enabling publisher confirms",
                source,
            })?;
        while let Some(owed) = self.owed.first() {
            broker::publish_status(&status_ch, owed).await?;
            self.owed.remove(0);
        }
        // Requests need no ack: the queue is this connection's own, a request the service could
        // not answer goes with it (the client's idle timeout tells it).
        let mut requests =
            broker::bind_own_queue(&requests_ch, exchange::REQUEST, &s.tag, true).await?;
        let mut kills = broker::bind_own_queue(&kill_ch, exchange::KILL, &s.tag, true).await?;
        *served = true;
        self.board.set("connected", 1);
        tracing::info!(
            broker = %std_writer_agent::agent::redact(&s.broker_url),
            tag = s.tag,
            source = s.service_name,
            "serving pedestal requests"
        );
        let mut shutdown = self.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                self.stop_run(&status_ch).await?;
                let _ = conn
                    .close(200, "the pedestal service is shutting down".into())
                    .await;
                return Ok(());
            }
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => {}
                delivery = requests.next() => match delivery {
                    Some(Ok(d)) => self.on_request(&d, &status_ch).await?,
                    Some(Err(source)) => {
                        return Err(BrokerError::Amqp { op: "receiving requests", source })
                    }
                    None => return Err(closed("receiving requests")),
                },
                kill = kills.next() => match kill {
                    Some(Ok(k)) => self.on_kill(&k, &status_ch).await?,
                    Some(Err(source)) => {
                        return Err(BrokerError::Amqp { op: "receiving kills", source })
                    }
                    None => return Err(closed("receiving kills")),
                },
                step = next_step(&mut self.run) => self.on_step(step, &status_ch).await?,
            }
        }
    }

    async fn on_request(&mut self, d: &Delivery, status_ch: &Channel) -> Result<(), BrokerError> {
        let job = Job {
            id: correlation_id(&d.properties).unwrap_or_default(),
            echo: echo(&d.data, MAX_BODY_BYTES),
            received_at: unix_now(),
            source: self.settings.service_name.clone(),
        };
        tracing::info!(request_id = job.id, "pedestal request received");
        self.counts.requests_received += 1;
        let refusal = if job.id.is_empty() {
            Some("a pedestal request needs its request id as the AMQP correlation_id".to_string())
        } else if let Some(run) = &self.run {
            Some(format!(
                "a pedestal run is in progress (request {}); one runs at a time, send this again \
                 when it ended",
                run.job.id
            ))
        } else if d.data.len() > MAX_BODY_BYTES {
            Some(format!(
                "the body is {} bytes; a pedestal request is at most {MAX_BODY_BYTES} bytes",
                d.data.len()
            ))
        } else {
            None
        };
        let opts = match refusal {
            Some(r) => Err(r),
            None => pedestal::options_from_body(&self.cfg, &d.data),
        };
        let opts = match opts {
            Ok(o) => o,
            Err(reason) => {
                tracing::info!(request_id = job.id, "refused: {reason}");
                self.counts.requests_refused += 1;
                self.show();
                let fin = job.status(action::REQUEST_FAIL, reason, json!({}));
                return self.publish(fin, status_ch).await;
            }
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, events) = mpsc::unbounded_channel();
        let (cfg, opts_run, flag) = (self.cfg.clone(), opts.clone(), Arc::clone(&cancel));
        let handle = tokio::task::spawn_blocking(move || {
            let progress_tx = tx.clone();
            pedestal::run(
                &cfg,
                &opts_run,
                &|| flag.load(Ordering::Relaxed),
                &mut || {
                    let _ = tx.send(Event::Ready);
                },
                &mut |p| {
                    let _ = progress_tx.send(Event::Progress(p.clone()));
                },
            )
        });
        let message = format!(
            "pedestal run: {} frames per module of each gain stage G0, G1, G2 into {} (gains \
             from {}, timeout {:?}); waiting for the image stream",
            opts.settings.frames_per_stage,
            opts.output.display(),
            opts.gain_file.display(),
            opts.timeout
        );
        let start = job.status(
            action::REQUEST_START,
            message,
            json!({"state": "starting", "output": opts.output.display().to_string()}),
        );
        self.run = Some(Running {
            job,
            cancel,
            killed: false,
            stopping: false,
            ready: false,
            frames_per_stage: opts.settings.frames_per_stage,
            last_progress: None,
            events,
            handle,
        });
        self.show();
        self.publish(start, status_ch).await
    }

    async fn on_kill(&mut self, k: &Delivery, status_ch: &Channel) -> Result<(), BrokerError> {
        let id = correlation_id(&k.properties);
        if let (Some(id), Some(run)) = (&id, &mut self.run) {
            if *id == run.job.id {
                tracing::info!(
                    request_id = id,
                    "kill received: cancelling the pedestal run"
                );
                run.killed = true;
                run.cancel.store(true, Ordering::Relaxed);
                // The final status comes when the run has stopped.
                return Ok(());
            }
        }
        let current = self.run.as_ref().map(|r| r.job.id.clone());
        let message = match (&id, &current) {
            (None, _) => {
                "a kill needs the request id as its correlation_id; nothing was changed".to_string()
            }
            (Some(id), Some(cur)) => {
                format!("request {id} is not running here (request {cur} is); nothing was changed")
            }
            (Some(id), None) => {
                format!("request {id} is not running here (no request is); nothing was changed")
            }
        };
        tracing::info!("{message}");
        let job = Job {
            id: id.unwrap_or_default(),
            echo: Map::new(),
            received_at: unix_now(),
            source: self.settings.service_name.clone(),
        };
        let msg = job.status(
            action::KILL_IGNORED,
            message,
            json!({"current_request_id": current}),
        );
        broker::publish_status(status_ch, &msg).await
    }

    async fn on_step(&mut self, step: Step, status_ch: &Channel) -> Result<(), BrokerError> {
        let Some(run) = &mut self.run else {
            return Ok(());
        };
        match step {
            Step::Event(Event::Ready) => {
                run.ready = true;
                self.show();
                let Some(run) = &self.run else {
                    return Ok(());
                };
                let message = format!(
                    "following the image stream {}: start the dark frames",
                    names::image_endpoint(&self.cfg)
                );
                let msg = run.job.status(
                    action::REQUEST_PROGRESS,
                    message,
                    json!({"state": "running"}),
                );
                broker::publish_status(status_ch, &msg).await
            }
            Step::Event(Event::Progress(p)) => {
                let due = run
                    .last_progress
                    .is_none_or(|t| t.elapsed() >= self.settings.progress_interval);
                if !run.ready || !due {
                    return Ok(());
                }
                run.last_progress = Some(Instant::now());
                let message = format!(
                    "frames per module [G0, G1, G2]: {:?} of {} each",
                    p.frames, run.frames_per_stage
                );
                let msg = run.job.status(
                    action::REQUEST_PROGRESS,
                    message,
                    json!({"state": "running", "progress": p.to_json()}),
                );
                broker::publish_status(status_ch, &msg).await
            }
            Step::Done(result) => {
                let Some(run) = self.run.take() else {
                    return Ok(());
                };
                let fin = final_status(&run, result);
                match fin.action.as_str() {
                    action::REQUEST_SUCCESS => {
                        self.counts.runs_succeeded += 1;
                        if let Some(id) = fin.body["report"]["calibration_id"].as_u64() {
                            self.board.set("last_calibration_id", id);
                        }
                    }
                    _ if fin.body["killed"] == true => self.counts.runs_killed += 1,
                    _ => self.counts.runs_failed += 1,
                }
                self.show();
                tracing::info!(
                    request_id = run.job.id,
                    action = fin.action,
                    "pedestal request ended: {}",
                    fin.message
                );
                self.publish(fin, status_ch).await
            }
        }
    }

    /// On shutdown: cancels a running run and publishes its end.
    async fn stop_run(&mut self, status_ch: &Channel) -> Result<(), BrokerError> {
        let Some(run) = &mut self.run else {
            return Ok(());
        };
        run.stopping = true;
        run.cancel.store(true, Ordering::Relaxed);
        let result = (&mut run.handle).await;
        self.on_step(Step::Done(result), status_ch).await
    }

    /// Publishes `msg`; kept to publish after reconnecting if the broker is gone.
    async fn publish(
        &mut self,
        msg: StatusMessage,
        status_ch: &Channel,
    ) -> Result<(), BrokerError> {
        match broker::publish_status(status_ch, &msg).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.owed.push(msg);
                Err(e)
            }
        }
    }
}

/// What the run did next.
#[derive(Debug)]
enum Step {
    Event(Event),
    Done(Result<anyhow::Result<PedestalReport>, tokio::task::JoinError>),
}

/// The next event or the end of the running run; never ready without one.
async fn next_step(run: &mut Option<Running>) -> Step {
    let Some(run) = run else {
        return std::future::pending().await;
    };
    tokio::select! {
        biased;
        Some(e) = run.events.recv() => Step::Event(e),
        r = &mut run.handle => Step::Done(r),
    }
}

/// The final status of a run that ended.
fn final_status(
    run: &Running,
    result: Result<anyhow::Result<PedestalReport>, tokio::task::JoinError>,
) -> StatusMessage {
    let fail = |message: String, extra: Value| run.job.status(action::REQUEST_FAIL, message, extra);
    match result {
        Ok(Ok(report)) => {
            let json = report.to_json();
            // A kill that came after the file was in place cannot undo it: the run succeeded,
            // and the status says so honestly.
            let extra = if run.killed || run.stopping {
                json!({"report": json, "state": "succeeded", "kill_too_late": true})
            } else {
                json!({"report": json, "state": "succeeded"})
            };
            run.job
                .status(action::REQUEST_SUCCESS, json.to_string(), extra)
        }
        Ok(Err(e)) if run.killed => fail(
            format!("killed: the pedestal run was cancelled and nothing was written ({e:#})"),
            json!({"killed": true, "state": "failed"}),
        ),
        Ok(Err(e)) if run.stopping => fail(
            format!(
                "the pedestal service is stopping: the run was cancelled and nothing was \
                 written ({e:#})"
            ),
            json!({"state": "failed"}),
        ),
        Ok(Err(e)) => fail(
            format!("pedestal run failed: {e:#}"),
            json!({"state": "failed"}),
        ),
        Err(e) => fail(
            format!("the pedestal run crashed: {e}"),
            json!({"state": "failed"}),
        ),
    }
}

fn closed(op: &'static str) -> BrokerError {
    BrokerError::Amqp {
        op,
        source: lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed).into(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn default_names_keep_pedestal_and_write_requests_apart() {
        let tag = default_tag("jf");
        assert_eq!(tag, "jf.pedestal");
        assert_eq!(default_service_name("jf"), "jf.pedestal_agent");
        // The writer agent's default binding (its detector name) does not match it.
        assert!(!std_writer_agent::protocol::topic_matches("jf", &tag));
        assert!(std_writer_agent::protocol::topic_matches("#", &tag));
    }

    #[test]
    fn statuses_echo_the_request_and_odd_bodies_do_not_panic() {
        let job = Job {
            id: "r1".into(),
            echo: echo(b"\xff not json", MAX_BODY_BYTES),
            received_at: 1.0,
            source: "jf.pedestal_agent".into(),
        };
        let st = job.status(action::REQUEST_FAIL, "no".into(), json!({"killed": true}));
        assert_eq!(st.body["raw_request"], "\u{fffd} not json");
        assert_eq!(st.body["killed"], true);
        assert_eq!(st.body["request_id"], "r1");
        assert!(st.is_final());
        let job = Job {
            echo: echo(br#"{"gain_file": "/g.h5"}"#, MAX_BODY_BYTES),
            ..job
        };
        let st = job.status(action::REQUEST_START, "go".into(), json!({}));
        assert_eq!(st.body["gain_file"], "/g.h5");
        assert_eq!(st.body["end_timestamp"], Value::Null);
    }
}
