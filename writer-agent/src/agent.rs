//! The writer agent: consumes write requests from RabbitMQ (std_daq_service conventions, see
//! `docs/protocol.md`), checks them ([`crate::request::Policy`]), drives `std-h5-writer` through
//! its ZMQ command socket and reports every step on the `status` exchange.
//!
//! Requests wait in a durable quorum queue named after the agent (`std-daq.<service>.requests`,
//! [`crate::protocol::AgentQueues`]), so a request sent while the agent is down or restarting is
//! served when it is back. One request at a time (prefetch 1). Every request that got its final
//! status (success or fail, refused ones included) is acked once that status is confirmed by the
//! broker; only a request the agent could not finish (it crashed or lost the broker) goes back to
//! the queue. Such a redelivered request is never written twice: if its file or `<file>.part`
//! exists, the agent takes up the run the writer is still doing for it, or reports how the writer
//! ended it, or fails it naming the leftover; a request whose final status is already out is only
//! acked. The broker delivers a request at most `max_deliveries` times (quorum queue
//! `x-delivery-limit`); one that made the agent fail every time (a poison request) is then
//! dead-lettered into `std-daq.<service>.dead-letter`, kept there for the operator, and the agent
//! answers it with `request_fail` (from a copy in `std-daq.<service>.dead-letter-notices`).
//!
//! A kill on the `kill` exchange with the request's correlation id stops the run at the next image.
//! When the broker goes away, the agent keeps following a run in progress to its end, then
//! reconnects with backoff, publishes the final status it still owes, and keeps serving.
//!
//! Must never: write anything to disk for a refused request, overwrite a file, ack a request before
//! its final status is out, or panic or exit on anything that arrives from the network. It stops
//! with an error only when its queue or an exchange exists with other settings (an operator has
//! to act).

use crate::broker::{self, amqp, BrokerError};
use crate::protocol::{
    action, correlation_id, delivery_count, echo, exchange, header_text, topic_matches, unix_now,
    AgentQueues, StatusMessage,
};
use crate::request::{self, Policy, RequestError, WriteRequest, MAX_BODY_BYTES};
use futures_lite::StreamExt;
use h5_writer::command::{ClientError, Command, Reply, RunSummary, WriterClient};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Everything the agent needs to know.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// `amqp://user:password@host:port/vhost` (vhost `/` is `%2f`).
    pub broker_url: String,
    /// Routing key bound on `request` and `kill` (`#` = every request, std_daq's primary default).
    pub tag: String,
    /// The `source` header of every status; also names the agent's queues.
    pub service_name: String,
    /// The writer's command socket (`ipc://<ipc_dir>/std-daq-<detector>-writer`).
    pub writer_endpoint: String,
    pub policy: Policy,
    /// How often the writer is asked for progress while a run is active.
    pub poll_interval: Duration,
    /// At most one `request_progress` per this interval.
    pub progress_interval: Duration,
    /// Timeout of one writer command.
    pub writer_timeout: Duration,
    /// A run whose writer has not answered for this long is reported failed.
    pub writer_lost_after: Duration,
    /// Reconnect backoff starts at 100 ms and doubles up to this.
    pub max_backoff: Duration,
    /// The broker delivers a request at most this many times (at least 1), then dead-letters it.
    pub max_deliveries: u32,
}

impl AgentSettings {
    /// Defaults for everything but the essentials.
    pub fn new(
        broker_url: &str,
        tag: &str,
        service_name: &str,
        writer_endpoint: &str,
        policy: Policy,
    ) -> Self {
        AgentSettings {
            broker_url: broker_url.into(),
            tag: tag.into(),
            service_name: service_name.into(),
            writer_endpoint: writer_endpoint.into(),
            policy,
            poll_interval: Duration::from_millis(150),
            progress_interval: Duration::from_millis(500),
            writer_timeout: Duration::from_secs(5),
            writer_lost_after: Duration::from_secs(30),
            max_backoff: Duration::from_secs(5),
            max_deliveries: DEFAULT_MAX_DELIVERIES,
        }
    }
}

/// Default of [`AgentSettings::max_deliveries`] (`--max-deliveries`).
pub const DEFAULT_MAX_DELIVERIES: u32 = 3;

/// How many request ids the agent remembers whose final status went out but whose ack may not
/// have reached the broker (their redelivery is only acked).
const SETTLED_MEMORY: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// What the agent is doing and has done, for tests, health checks and the status board.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentState {
    /// Consuming on a live broker connection.
    pub connected: bool,
    /// Successful (re)connections so far.
    pub connections: u64,
    /// Requests answered with a final status (success or fail), dead-lettered ones included.
    pub requests_finished: u64,
    /// Final `request_success`.
    pub requests_succeeded: u64,
    /// Final `request_fail` (refused, killed, failed, interrupted or dead-lettered).
    pub requests_failed: u64,
    /// Failed before anything was written: the checks or the writer refused the request.
    pub requests_refused: u64,
    /// Refused because the message itself is junk: no correlation_id, too large, not UTF-8, not
    /// JSON, or not a write request.
    pub requests_malformed: u64,
    /// Deliveries the broker marked as redelivered (an earlier delivery was not settled).
    pub requests_redelivered: u64,
    /// Requests the broker gave up on (dead-lettered), answered with `request_fail`.
    pub requests_dead_lettered: u64,
}

impl AgentState {
    /// Every counter as (name, value), for the status board and `/metrics`.
    pub fn fields(&self) -> [(&'static str, u64); 9] {
        [
            ("connected", u64::from(self.connected)),
            ("connections", self.connections),
            ("requests_finished", self.requests_finished),
            ("requests_succeeded", self.requests_succeeded),
            ("requests_failed", self.requests_failed),
            ("requests_refused", self.requests_refused),
            ("requests_malformed", self.requests_malformed),
            ("requests_redelivered", self.requests_redelivered),
            ("requests_dead_lettered", self.requests_dead_lettered),
        ]
    }
}

/// Stops a running agent: a run in progress is stopped (its file closed), its request failed.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

#[derive(Debug)]
pub struct Agent {
    settings: AgentSettings,
    queues: AgentQueues,
    client: Arc<WriterClient>,
    shutdown_tx: Arc<watch::Sender<bool>>,
    shutdown: watch::Receiver<bool>,
    state: watch::Sender<AgentState>,
    /// Final statuses that could not be published (broker gone); sent first after reconnecting.
    owed: Vec<StatusMessage>,
    /// Requests whose final status is out (or owed) but whose ack may not have reached the broker.
    settled: VecDeque<String>,
    /// The request being run, for answering stray kills.
    current: Option<String>,
}

/// What the writer knows of a request's run.
enum WriterKnows {
    Running,
    Ended(RunSummary),
}

/// How a run ended, as far as the agent knows.
enum Outcome {
    Finished(RunSummary),
    /// The writer was lost mid-run: why, and how many images its last checkpoint made safe in
    /// the partial file (what the final status reports as `images_written`).
    Lost {
        why: String,
        images_safe: u64,
    },
}

const NO_CORRELATION_ID: &str =
    "the request has no correlation_id: the request id must travel as the AMQP correlation_id";

impl Agent {
    pub fn new(settings: AgentSettings) -> Result<Self, AgentError> {
        broker::short(&settings.tag)?;
        let queues = AgentQueues::for_service(&settings.service_name);
        for name in [&queues.requests, &queues.dead_letter, &queues.notices] {
            broker::short(name)?;
        }
        let ctx = zmq::Context::new();
        let client = Arc::new(WriterClient::new(
            &ctx,
            &settings.writer_endpoint,
            settings.writer_timeout,
        ));
        let (shutdown_tx, shutdown) = watch::channel(false);
        Ok(Agent {
            settings,
            queues,
            client,
            shutdown_tx: Arc::new(shutdown_tx),
            shutdown,
            state: watch::channel(AgentState::default()).0,
            owed: Vec::new(),
            settled: VecDeque::new(),
            current: None,
        })
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.shutdown_tx))
    }

    pub fn state(&self) -> watch::Receiver<AgentState> {
        self.state.subscribe()
    }

    /// The agent's durable queues.
    pub fn queues(&self) -> &AgentQueues {
        &self.queues
    }

    /// Serves until the shutdown handle is triggered. Broker trouble is not fatal: the agent
    /// reconnects with backoff. The exception: a queue or exchange that exists with other settings
    /// ([`BrokerError::is_fatal`]), which only an operator can resolve.
    pub async fn run(mut self) -> Result<(), AgentError> {
        const FIRST_BACKOFF: Duration = Duration::from_millis(100);
        let mut backoff = FIRST_BACKOFF;
        let mut shutdown = self.shutdown.clone();
        while !*shutdown.borrow() {
            let before = self.state.borrow().connections;
            match self.serve().await {
                Ok(()) => break,
                Err(e) if e.is_fatal() => {
                    self.state.send_modify(|s| s.connected = false);
                    tracing::error!("{e}");
                    return Err(e.into());
                }
                Err(e) => {
                    self.state.send_modify(|s| s.connected = false);
                    if self.state.borrow().connections > before {
                        backoff = FIRST_BACKOFF;
                    }
                    tracing::warn!("{e}; reconnecting in {backoff:?}");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = wait_shutdown(&mut shutdown) => {}
            }
            backoff = (backoff * 2).min(self.settings.max_backoff);
        }
        tracing::info!("writer agent stopped");
        Ok(())
    }

    /// One connection's life. `Ok` = shutdown requested.
    async fn serve(&mut self) -> Result<(), BrokerError> {
        let s = &self.settings;
        let conn = broker::connect(&s.broker_url, &s.service_name).await?;
        let requests_ch = conn
            .create_channel()
            .await
            .map_err(amqp("opening a channel"))?;
        requests_ch
            .basic_qos(1, BasicQosOptions::default())
            .await
            .map_err(amqp("setting prefetch"))?;
        broker::declare_exchanges(&requests_ch).await?;
        broker::declare_agent_queues(&requests_ch, &self.queues, &s.tag, s.max_deliveries).await?;
        let kill_ch = conn
            .create_channel()
            .await
            .map_err(amqp("opening a channel"))?;
        let notices_ch = conn
            .create_channel()
            .await
            .map_err(amqp("opening a channel"))?;
        notices_ch
            .basic_qos(16, BasicQosOptions::default())
            .await
            .map_err(amqp("setting prefetch"))?;
        let status_ch = conn
            .create_channel()
            .await
            .map_err(amqp("opening a channel"))?;
        status_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("enabling publisher confirms"))?;
        let mut kills = broker::bind_own_queue(&kill_ch, exchange::KILL, &s.tag, true).await?;
        while let Some(owed) = self.owed.first() {
            broker::publish_status(&status_ch, owed).await?;
            self.owed.remove(0);
        }
        let mut requests = broker::consume(&requests_ch, &self.queues.requests, false).await?;
        let mut notices = broker::consume(&notices_ch, &self.queues.notices, false).await?;
        tracing::info!(
            broker = %redact(&s.broker_url),
            tag = s.tag,
            queue = self.queues.requests,
            max_deliveries = s.max_deliveries,
            "serving write requests"
        );
        self.state.send_modify(|st| {
            st.connected = true;
            st.connections += 1;
        });
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                () = wait_shutdown(&mut shutdown) => {
                    let _ = conn.close(200, "the writer agent is shutting down".into()).await;
                    return Ok(());
                }
                delivery = requests.next() => match delivery {
                    Some(Ok(d)) => self.handle(d, &requests_ch, &mut kills, &status_ch).await?,
                    Some(Err(e)) => return Err(amqp("receiving requests")(e)),
                    None => return Err(closed("receiving requests")),
                },
                kill = kills.next() => match kill {
                    Some(Ok(k)) => self.answer_stray_kill(&k, &status_ch).await?,
                    Some(Err(e)) => return Err(amqp("receiving kills")(e)),
                    None => return Err(closed("receiving kills")),
                },
                notice = notices.next() => match notice {
                    Some(Ok(n)) => self.answer_dead_letter(n, &mut kills, &status_ch).await?,
                    Some(Err(e)) => return Err(amqp("receiving dead-letter notices")(e)),
                    None => return Err(closed("receiving dead-letter notices")),
                },
            }
        }
    }

    /// One request, from delivery to ack.
    async fn handle(
        &mut self,
        delivery: Delivery,
        requests_ch: &Channel,
        kills: &mut Consumer,
        status_ch: &Channel,
    ) -> Result<(), BrokerError> {
        let job = Job {
            id: correlation_id(&delivery.properties).unwrap_or_default(),
            echo: echo(&delivery.data, MAX_BODY_BYTES),
            received_at: unix_now(),
            source: self.settings.service_name.clone(),
        };
        let before = delivery_count(&delivery.properties);
        let redelivered = delivery.redelivered || before.is_some_and(|n| n > 0);
        tracing::info!(
            request_id = job.id,
            redelivered,
            earlier_deliveries = before,
            "request received"
        );
        if redelivered {
            self.state.send_modify(|s| s.requests_redelivered += 1);
            if let Some(i) = self.settled.iter().position(|id| *id == job.id) {
                self.settled.remove(i);
                tracing::info!(
                    request_id = job.id,
                    "redelivered after its final status went out: acked, nothing else to do"
                );
                return ack(&delivery).await;
            }
        }
        let req = match self.check_message(&job, &delivery, requests_ch).await {
            Ok(req) => req,
            Err((message, malformed)) => {
                return self
                    .refuse(&job, message, malformed, &delivery, status_ch)
                    .await
            }
        };
        if redelivered {
            if let Some(leftover) = self.leftover(&req) {
                return self
                    .resume(&job, &req, leftover, &delivery, kills, status_ch)
                    .await;
            }
        }
        let (path, mut created) = match self.settings.policy.prepare(&req) {
            Ok(ok) => ok,
            Err(e) => {
                return self
                    .refuse(&job, e.to_string(), false, &delivery, status_ch)
                    .await
            }
        };
        let output_file = path.display().to_string();
        let reply = self
            .writer(Command::Start {
                output_file: output_file.clone(),
                n_images: req.n_images,
                request_id: Some(job.id.clone()),
            })
            .await;
        let refused = match reply {
            Ok(Reply { ok: true, .. }) => None,
            Ok(r) => Some(format!(
                "the writer refused the request: {}",
                r.error.unwrap_or_default()
            )),
            Err(e) => Some(format!(
                "the writer at {} did not take the request: {e}",
                self.settings.writer_endpoint
            )),
        };
        if let Some(message) = refused {
            created.remove();
            return self
                .refuse(&job, message, false, &delivery, status_ch)
                .await;
        }
        created.keep();
        let mut broker_ok = true;
        let start = job.status(
            action::REQUEST_START,
            format!("writing {} images to {output_file}", req.n_images),
            0,
            None,
        );
        if let Err(e) = broker::publish_status(status_ch, &start).await {
            tracing::warn!("{e}");
            broker_ok = false;
        }
        self.run_to_end(&job, req.n_images, &delivery, kills, status_ch, broker_ok)
            .await
    }

    /// The checks of the message itself (correlation id, routing key, body); `Err` carries the
    /// refusal and whether the message is junk.
    async fn check_message(
        &self,
        job: &Job,
        delivery: &Delivery,
        requests_ch: &Channel,
    ) -> Result<WriteRequest, (String, bool)> {
        if job.id.is_empty() {
            return Err((NO_CORRELATION_ID.to_string(), true));
        }
        let key = delivery.routing_key.as_str();
        let tag = &self.settings.tag;
        if delivery.exchange.as_str() == exchange::REQUEST && !topic_matches(tag, key) {
            // The durable queue still has the binding of an earlier tag: drop it, so that the
            // agent now serving that tag gets the next request, and say so.
            let queue = &self.queues.requests;
            let unbound = requests_ch
                .queue_unbind(
                    queue.as_str().into(),
                    exchange::REQUEST.into(),
                    delivery.routing_key.clone(),
                    FieldTable::default(),
                )
                .await;
            let what = match unbound {
                Ok(()) => "the agent removed that binding".to_string(),
                Err(e) => format!("removing that binding failed: {e}"),
            };
            tracing::warn!("stale binding {key:?} on {queue}: {what}");
            return Err((
                format!(
                    "this agent serves tag {tag:?}, but the request came with routing key {key:?} \
                     through an old binding of its queue {queue} (was its tag changed?); {what}: \
                     send the request again"
                ),
                false,
            ));
        }
        request::parse(&delivery.data).map_err(|e| {
            let malformed = e.is_malformed();
            (e.to_string(), malformed)
        })
    }

    /// What an interrupted attempt at `req` may have left: the file itself or `<file>.part`.
    fn leftover(&self, req: &WriteRequest) -> Option<PathBuf> {
        match self.settings.policy.check(req) {
            Ok(path) => {
                let part = h5_writer::service::partial_path(&path);
                part.symlink_metadata().is_ok().then_some(part)
            }
            Err(RequestError::Exists(_)) => Some(PathBuf::from(&req.output_file)),
            Err(_) => None,
        }
    }

    /// A redelivered request that left something on disk: take up the writer's run if it is
    /// still going, report how it ended if the writer knows, otherwise fail naming the leftover.
    /// Never starts a second write.
    async fn resume(
        &mut self,
        job: &Job,
        req: &WriteRequest,
        leftover: PathBuf,
        delivery: &Delivery,
        kills: &mut Consumer,
        status_ch: &Channel,
    ) -> Result<(), BrokerError> {
        match self.writer_knows(job).await {
            Some(WriterKnows::Running) => {
                tracing::info!(
                    request_id = job.id,
                    "resuming: the writer is still running this request"
                );
                return self
                    .run_to_end(job, req.n_images, delivery, kills, status_ch, true)
                    .await;
            }
            Some(WriterKnows::Ended(run)) => {
                tracing::info!(
                    request_id = job.id,
                    "the writer ended this request while no agent followed it"
                );
                let (act, message) = describe_end(&run);
                let fin = job.status(act, message, run.images_written, Some(&run));
                return self.finish(fin, delivery, status_ch, true).await;
            }
            None => {}
        }
        let message = format!(
            "the previous attempt at this request was interrupted and left {}; std-daq never \
             overwrites data: check it and send a new request",
            leftover.display()
        );
        tracing::info!(request_id = job.id, "{message}");
        let fin = job.status(action::REQUEST_FAIL, message, 0, None);
        self.finish(fin, delivery, status_ch, true).await
    }

    /// Follows the writer's run of `job` to its end, then publishes the final status and acks.
    async fn run_to_end(
        &mut self,
        job: &Job,
        n_images: u64,
        delivery: &Delivery,
        kills: &mut Consumer,
        status_ch: &Channel,
        mut broker_ok: bool,
    ) -> Result<(), BrokerError> {
        self.current = Some(job.id.clone());
        let outcome = self
            .follow(job, n_images, kills, status_ch, &mut broker_ok)
            .await;
        self.current = None;
        let (act, message, written, run) = match outcome {
            Outcome::Finished(run) => {
                let (act, message) = describe_end(&run);
                (act, message, run.images_written, Some(run))
            }
            Outcome::Lost { why, images_safe } => (action::REQUEST_FAIL, why, images_safe, None),
        };
        tracing::info!(request_id = job.id, action = act, "{message}");
        let fin = job.status(act, message, written, run.as_ref());
        self.finish(fin, delivery, status_ch, broker_ok).await
    }
    /// Follows the writer until the run ends, publishing progress and handling kills.
    async fn follow(
        &mut self,
        job: &Job,
        n_images: u64,
        kills: &mut Consumer,
        status_ch: &Channel,
        broker_ok: &mut bool,
    ) -> Outcome {
        let mut ticker = tokio::time::interval(self.settings.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shutdown.clone();
        let mut stop_sent = false;
        let mut last_answer = Instant::now();
        let mut last_progress: ((u64, u64), Option<Instant>) = ((0, 0), None);
        // What the writer last said is in the partial file on disk (its last checkpoint).
        let mut checkpointed: Option<u64> = None;
        let output_file = job
            .echo
            .get("output_file")
            .and_then(Value::as_str)
            .unwrap_or("the output file")
            .to_string();
        let partial_note = |checkpointed: Option<u64>| match checkpointed {
            Some(k) => format!(
                "; {output_file}.part holds the {k} images of the writer's last checkpoint (more \
                 if it checkpointed again before it died)"
            ),
            None => String::new(),
        };
        let ours = |r: &RunSummary| r.request_id.as_deref() == Some(job.id.as_str());
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let status = match self.writer(Command::Status).await {
                        Ok(Reply { ok: true, status: Some(st), .. }) => st,
                        Ok(r) => return Outcome::Lost {
                            why: format!(
                                "the writer's status reply is not usable: {}{}",
                                r.error.unwrap_or_default(),
                                partial_note(checkpointed)
                            ),
                            images_safe: checkpointed.unwrap_or(0),
                        },
                        Err(e) => {
                            if last_answer.elapsed() > self.settings.writer_lost_after {
                                return Outcome::Lost {
                                    why: format!(
                                        "the writer stopped answering during the run: {e}{}",
                                        partial_note(checkpointed)
                                    ),
                                    images_safe: checkpointed.unwrap_or(0),
                                };
                            }
                            continue;
                        }
                    };
                    last_answer = Instant::now();
                    if let Some(cur) = status.current.as_ref().filter(|c| ours(c)) {
                        checkpointed = Some(cur.images_checkpointed);
                        let due = last_progress
                            .1
                            .is_none_or(|t| t.elapsed() >= self.settings.progress_interval);
                        let now = (cur.images_written, cur.images_checkpointed);
                        if now != last_progress.0 && due && *broker_ok {
                            let msg = job.status(
                                action::REQUEST_PROGRESS,
                                format!(
                                    "wrote {} of {n_images} images ({} safe in the file)",
                                    cur.images_written, cur.images_checkpointed
                                ),
                                cur.images_written,
                                None,
                            );
                            if let Err(e) = broker::publish_status(status_ch, &msg).await {
                                tracing::warn!("{e}");
                                *broker_ok = false;
                            }
                            last_progress = (now, Some(Instant::now()));
                        }
                    } else if let Some(run) = status.last_run.filter(|r| ours(r)) {
                        return Outcome::Finished(run);
                    } else {
                        return Outcome::Lost {
                            why: format!(
                                "the writer no longer knows this run (was it restarted?){}",
                                partial_note(checkpointed)
                            ),
                            images_safe: checkpointed.unwrap_or(0),
                        };
                    }
                }
                kill = kills.next(), if *broker_ok => match kill {
                    Some(Ok(k)) if correlation_id(&k.properties).as_deref() == Some(&job.id) => {
                        tracing::info!(request_id = job.id, "kill received");
                        if let Ok(Reply { ok: true, run: Some(run), .. }) = self
                            .writer(Command::Stop { reason: Some("killed".into()) })
                            .await
                        {
                            return Outcome::Finished(run);
                        }
                        // The run had already ended: the next status poll reports how.
                    }
                    Some(Ok(k)) => {
                        if let Err(e) = self.answer_stray_kill(&k, status_ch).await {
                            tracing::warn!("{e}");
                            *broker_ok = false;
                        }
                    }
                    Some(Err(_)) | None => *broker_ok = false,
                },
                () = wait_shutdown(&mut shutdown), if !stop_sent => {
                    stop_sent = true;
                    let reason = "stopped: the writer agent was shut down";
                    if let Ok(Reply { ok: true, run: Some(run), .. }) = self
                        .writer(Command::Stop { reason: Some(reason.into()) })
                        .await
                    {
                        return Outcome::Finished(run);
                    }
                }
            }
        }
    }

    /// A request refused before anything was written: `request_fail`, then ack.
    async fn refuse(
        &mut self,
        job: &Job,
        message: String,
        malformed: bool,
        delivery: &Delivery,
        status_ch: &Channel,
    ) -> Result<(), BrokerError> {
        tracing::info!(request_id = job.id, "refused: {message}");
        self.state.send_modify(|s| {
            s.requests_refused += 1;
            s.requests_malformed += u64::from(malformed);
        });
        let fin = job.status(action::REQUEST_FAIL, message, 0, None);
        self.finish(fin, delivery, status_ch, true).await
    }

    /// Publishes the final status (or keeps it for after the reconnect), then acks: the request
    /// is done, whichever way it ended.
    async fn finish(
        &mut self,
        fin: StatusMessage,
        delivery: &Delivery,
        status_ch: &Channel,
        broker_ok: bool,
    ) -> Result<(), BrokerError> {
        let success = fin.action == action::REQUEST_SUCCESS;
        self.state.send_modify(|s| {
            s.requests_finished += 1;
            if success {
                s.requests_succeeded += 1;
            } else {
                s.requests_failed += 1;
            }
        });
        let published = if broker_ok {
            broker::publish_status(status_ch, &fin).await
        } else {
            Err(closed("publishing the final status"))
        };
        if let Err(e) = published {
            self.remember_settled(&fin.request_id);
            self.owed.push(fin);
            return Err(e);
        }
        if let Err(e) = ack(delivery).await {
            self.remember_settled(&fin.request_id);
            return Err(e);
        }
        Ok(())
    }

    fn remember_settled(&mut self, id: &str) {
        if id.is_empty() {
            return;
        }
        self.settled.push_back(id.to_string());
        if self.settled.len() > SETTLED_MEMORY {
            self.settled.pop_front();
        }
    }

    /// A request the broker gave up on (a copy from the notices queue; the original stays in the
    /// dead-letter queue). Its client gets the true end: nothing more if its final status is
    /// already out; the writer's run if the writer is running or ran it (the agent died during
    /// the run once too often); otherwise `request_fail` saying it was given up. Then the copy is
    /// acked.
    async fn answer_dead_letter(
        &mut self,
        notice: Delivery,
        kills: &mut Consumer,
        status_ch: &Channel,
    ) -> Result<(), BrokerError> {
        let job = Job {
            id: correlation_id(&notice.properties).unwrap_or_default(),
            echo: echo(&notice.data, MAX_BODY_BYTES),
            received_at: unix_now(),
            source: self.settings.service_name.clone(),
        };
        let reason = header_text(&notice.properties, "x-first-death-reason")
            .unwrap_or_else(|| "unknown".into());
        tracing::warn!(
            request_id = job.id,
            reason,
            "the broker dead-lettered a request"
        );
        self.state.send_modify(|s| s.requests_dead_lettered += 1);
        if let Some(i) = self.settled.iter().position(|id| *id == job.id) {
            self.settled.remove(i);
            tracing::info!(request_id = job.id, "its final status is already out");
            return ack(&notice).await;
        }
        if let (false, Ok(req)) = (job.id.is_empty(), request::parse(&notice.data)) {
            match self.writer_knows(&job).await {
                Some(WriterKnows::Running) => {
                    tracing::info!(
                        request_id = job.id,
                        "the writer is still running it: following the run"
                    );
                    return self
                        .run_to_end(&job, req.n_images, &notice, kills, status_ch, true)
                        .await;
                }
                Some(WriterKnows::Ended(run)) => {
                    let (act, message) = describe_end(&run);
                    let fin = job.status(act, message, run.images_written, Some(&run));
                    return self.finish(fin, &notice, status_ch, true).await;
                }
                None => {}
            }
        }
        let dlq = &self.queues.dead_letter;
        let message = if reason == "delivery_limit" {
            format!(
                "the request was given up after {} deliveries: every attempt ended without a \
                 final status (the writer agent stopped or lost the broker while handling it); it \
                 is kept in the dead-letter queue {dlq}",
                self.settings.max_deliveries
            )
        } else {
            format!(
                "the broker dead-lettered the request (reason: {reason}); it is kept in the \
                 dead-letter queue {dlq}"
            )
        };
        tracing::warn!(request_id = job.id, "{message}");
        let fin = job.status(action::REQUEST_FAIL, message, 0, None);
        self.finish(fin, &notice, status_ch, true).await
    }

    /// Whether the writer is running, or last ran, the run of `job` (asked once; `None` also
    /// when the writer does not answer).
    async fn writer_knows(&self, job: &Job) -> Option<WriterKnows> {
        let ours = |r: &RunSummary| r.request_id.as_deref() == Some(job.id.as_str());
        match self.writer(Command::Status).await {
            Ok(Reply {
                ok: true,
                status: Some(st),
                ..
            }) => {
                if st.current.as_ref().is_some_and(ours) {
                    Some(WriterKnows::Running)
                } else {
                    st.last_run.filter(ours).map(WriterKnows::Ended)
                }
            }
            _ => None,
        }
    }

    /// A kill for a request this agent is not running: says so, changes nothing.
    async fn answer_stray_kill(
        &self,
        kill: &Delivery,
        status_ch: &Channel,
    ) -> Result<(), BrokerError> {
        let id = correlation_id(&kill.properties);
        let message = match (&id, &self.current) {
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
        let mut body = Map::new();
        body.insert("request_id".into(), id.clone().unwrap_or_default().into());
        body.insert("source".into(), self.settings.service_name.clone().into());
        body.insert("action".into(), action::KILL_IGNORED.into());
        body.insert("message".into(), message.clone().into());
        body.insert(
            "current_request_id".into(),
            self.current.clone().map_or(Value::Null, Value::from),
        );
        body.insert("timestamp".into(), unix_now().into());
        let msg = StatusMessage {
            request_id: id.unwrap_or_default(),
            action: action::KILL_IGNORED.into(),
            source: self.settings.service_name.clone(),
            message,
            body: Value::Object(body),
        };
        broker::publish_status(status_ch, &msg).await
    }

    /// One writer command on a blocking thread (the ZMQ client is synchronous).
    async fn writer(&self, cmd: Command) -> Result<Reply, ClientError> {
        let client = Arc::clone(&self.client);
        tokio::task::spawn_blocking(move || client.request(&cmd))
            .await
            .unwrap_or_else(|e| Err(ClientError::BadReply(format!("writer call failed: {e}"))))
    }
}

/// The request being handled: what every status about it carries.
struct Job {
    id: String,
    echo: Map<String, Value>,
    received_at: f64,
    source: String,
}

impl Job {
    fn status(
        &self,
        act: &str,
        message: String,
        images_written: u64,
        run: Option<&RunSummary>,
    ) -> StatusMessage {
        let final_ = act == action::REQUEST_SUCCESS || act == action::REQUEST_FAIL;
        let mut body = self.echo.clone();
        let fields = json!({
            "request_id": self.id,
            "source": self.source,
            "action": act,
            "message": message,
            "images_written": images_written,
            "init_timestamp": self.received_at,
            "end_timestamp": if final_ { Value::from(unix_now()) } else { Value::Null },
            "run": run.map_or(Value::Null, |r| serde_json::to_value(r).unwrap_or(Value::Null)),
        });
        if let Value::Object(fields) = fields {
            body.extend(fields);
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

/// The final action and message for a run the writer finished.
fn describe_end(run: &RunSummary) -> (&'static str, String) {
    let (k, n, file) = (run.images_written, run.n_images, &run.output_file);
    match run.end.as_str() {
        "completed" => {
            let mut message = format!("wrote {k} of {n} images to {file}");
            if run.images_flagged > 0 {
                message.push_str(&format!(
                    "; {} of them flagged incomplete ({} packets missing, {} lost in the buffer)",
                    run.images_flagged, run.missing_packets, run.images_lost_in_buffer
                ));
            }
            (action::REQUEST_SUCCESS, message)
        }
        "killed" => (
            action::REQUEST_FAIL,
            format!("killed after {k} of {n} images; {file} holds the {k} images written"),
        ),
        end => (
            action::REQUEST_FAIL,
            format!("the write ended after {k} of {n} images: {end}"),
        ),
    }
}

/// Acks a delivery; an ack lapin could not send (its channel is closed) is an error: the broker
/// will deliver the message again.
async fn ack(delivery: &Delivery) -> Result<(), BrokerError> {
    match delivery.ack(BasicAckOptions::default()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(closed("acking a message")),
        Err(e) => Err(amqp("acking a message")(e)),
    }
}

/// The error for a connection found closed.
fn closed(op: &'static str) -> BrokerError {
    BrokerError::Amqp {
        op,
        source: lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed).into(),
    }
}

async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The broker URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_messages_are_honest() {
        let run = |end: &str, k| RunSummary {
            output_file: "/d/a.h5".into(),
            n_images: 10,
            images_written: k,
            end: end.into(),
            ..RunSummary::default()
        };
        assert_eq!(
            describe_end(&run("completed", 10)),
            (
                action::REQUEST_SUCCESS,
                "wrote 10 of 10 images to /d/a.h5".into()
            )
        );
        assert_eq!(
            describe_end(&run("killed", 4)),
            (
                action::REQUEST_FAIL,
                "killed after 4 of 10 images; /d/a.h5 holds the 4 images written".into()
            )
        );
        assert_eq!(
            describe_end(&run("failed: disk full", 2)),
            (
                action::REQUEST_FAIL,
                "the write ended after 2 of 10 images: failed: disk full".into()
            )
        );
    }

    #[test]
    fn redact_hides_the_password() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host"), "amqp://host");
    }
}
