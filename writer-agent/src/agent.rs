//! The writer agent: consumes write requests from RabbitMQ (std_daq_service conventions, see
//! `docs/protocol.md`), checks them ([`crate::request::Policy`]), drives `std-h5-writer` through
//! its ZMQ command socket and reports every step on the `status` exchange.
//!
//! Requests wait in a durable quorum queue named after the agent (`std-daq.<service>.requests`,
//! [`crate::protocol::AgentQueues`]), so a request sent while the agent is down or restarting is
//! served when it is back. One write at a time, but every request is answered at once: while a
//! write runs the agent keeps receiving (prefetch `max_queued + 1`); a request that fails the
//! checks that touch nothing on disk gets its `request_fail` then and there, a valid one gets
//! `request_queued` (its place in the line) and waits, unacked, in an in-agent FIFO. When the
//! write ends, the next one is handled exactly as a fresh delivery (every check again, then
//! `request_start`). The FIFO belongs to one connection: after a crash or reconnect the broker
//! delivers its requests again and the redelivery rules below apply.
//!
//! Every request that got its final status (success or fail, refused ones included) is acked
//! once that status is confirmed by the broker; only a request the agent could not finish (it
//! crashed or lost the broker, or it was still queued) goes back to the queue. Such a redelivered
//! request is never written twice: if its file or `<file>.part` exists, the agent takes up the
//! run the writer is still doing for it, or reports how the writer ended it, or fails it naming
//! the leftover; a request whose final status is already out is only acked. The broker delivers
//! a request at most `max_deliveries` times (quorum queue `x-delivery-limit`, which also counts
//! the returns of queued requests); one that made the agent fail every time (a poison request)
//! is then dead-lettered into `std-daq.<service>.dead-letter`, kept there for the operator, and
//! the agent answers it with `request_fail` (from a copy in
//! `std-daq.<service>.dead-letter-notices`).
//!
//! A kill on the `kill` exchange with the request's correlation id stops the run at the next image,
//! or takes a queued request out of the line (`request_fail`, nothing written). A request without
//! `n_images` is an unbounded write: the kill is its normal end (`request_success` with the count,
//! the file complete); it also ends by itself, successfully, at the policy's `--max-images`. While a run has
//! no image yet the agent says so every `waiting_interval` (`request_progress`, images_written
//! 0); a request with `timeout_s` whose run got no image in that time is cancelled by the writer,
//! leaving nothing on disk. `strict_statuses` turns every std-daq extension status off.
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
use crate::request::{self, CreatedDirs, Policy, RequestError, WriteRequest, MAX_BODY_BYTES};
use crate::trigger::{self, TriggerSettings};
use crate::writer_client::ClientError;
use crate::writer_group::WriterGroup;
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use std_daq_common::writer_command::{Command, Reply, RunContext, RunSummary, MAX_IMAGES_REACHED};
use tokio::sync::watch;
use tracing::Instrument;

/// Everything the agent needs to know.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// `amqp://user:password@host:port/vhost` (vhost `/` is `%2f`).
    pub broker_url: String,
    /// Routing key bound on `request` and `kill` (`#` = every request, std_daq's primary default).
    pub tag: String,
    /// The `source` header of every status; also names the agent's queues.
    pub service_name: String,
    /// The writer's command socket (`ipc://<ipc_dir>/std-daq-<detector>-writer`); with several
    /// writers, writer 0's.
    pub writer_endpoint: String,
    /// The command sockets of writers 1.. when `number_of_writers` > 1 (empty: one writer). The
    /// agent then drives them as one ([`WriterGroup`]).
    pub more_writers: Vec<String>,
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
    /// Requests the agent holds queued while a write runs (the prefetch is one more). Further
    /// requests stay in the broker's queue, unanswered, until a place frees.
    pub max_queued: u16,
    /// Only request_start, request_success and request_fail are published (std_daq's own set):
    /// no request_queued, request_progress (waiting included) or kill_ignored.
    pub strict_statuses: bool,
    /// While a run has no image, a "waiting for the first image" `request_progress` this often.
    pub waiting_interval: Duration,
    /// The processing trigger (config key `processing_trigger`); `None`: none is sent.
    pub trigger: Option<TriggerSettings>,
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
            more_writers: Vec::new(),
            policy,
            poll_interval: Duration::from_millis(150),
            progress_interval: Duration::from_millis(500),
            writer_timeout: Duration::from_secs(5),
            writer_lost_after: Duration::from_secs(30),
            max_backoff: Duration::from_secs(5),
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            max_queued: DEFAULT_MAX_QUEUED,
            strict_statuses: false,
            waiting_interval: DEFAULT_WAITING_INTERVAL,
            trigger: None,
        }
    }
}

/// Default of [`AgentSettings::max_deliveries`] (`--max-deliveries`).
pub const DEFAULT_MAX_DELIVERIES: u32 = 3;

/// Default of [`AgentSettings::max_queued`] (`--max-queued`).
pub const DEFAULT_MAX_QUEUED: u16 = 100;

/// Default of [`AgentSettings::waiting_interval`] (`--waiting-ms`).
pub const DEFAULT_WAITING_INTERVAL: Duration = Duration::from_secs(5);

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
    /// Requests that had to wait for a running write (queued in the agent).
    pub requests_queued: u64,
    /// Requests waiting in the agent's queue now.
    pub queue_length: u64,
    /// Processing triggers the broker confirmed (and routed).
    pub triggers_published: u64,
    /// Processing triggers given up after every attempt failed.
    pub triggers_failed: u64,
}

impl AgentState {
    /// Every counter as (name, value), for the status board and `/metrics`.
    pub fn fields(&self) -> [(&'static str, u64); 13] {
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
            ("requests_queued", self.requests_queued),
            ("queue_length", self.queue_length),
            ("triggers_published", self.triggers_published),
            ("triggers_failed", self.triggers_failed),
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
    client: Arc<WriterGroup>,
    shutdown_tx: Arc<watch::Sender<bool>>,
    shutdown: watch::Receiver<bool>,
    state: watch::Sender<AgentState>,
    /// Final statuses that could not be published (broker gone); sent first after reconnecting.
    owed: Vec<StatusMessage>,
    /// Requests whose final status is out (or owed) but whose ack may not have reached the broker.
    settled: VecDeque<String>,
    /// The request being run, for answering stray kills.
    current: Option<String>,
    /// Valid requests received while a write runs, in arrival order, unacked (this connection's).
    queued: VecDeque<Waiting>,
    /// The outcome of the running write's start trigger, reported with its final status.
    start_trigger: Option<trigger::Outcome>,
}

/// A request waiting in the agent's queue for the running write to end.
#[derive(Debug)]
struct Waiting {
    delivery: Delivery,
    /// When the agent received it (its statuses' `init_timestamp`).
    received_at: f64,
}

/// The broker side of one connection, as the request handling needs it.
struct Links<'a> {
    /// For the processing trigger's own channels.
    conn: &'a Connection,
    requests_ch: &'a Channel,
    requests: &'a mut Consumer,
    kills: &'a mut Consumer,
    status_ch: &'a Channel,
}

/// What the writer knows of a request's run.
enum WriterKnows {
    Running,
    // Boxed: a summary is large next to `Running`.
    Ended(Box<RunSummary>),
}

/// How a run ended, as far as the agent knows.
#[allow(clippy::large_enum_variant)] // one per run, never stored
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
        let endpoints: Vec<String> = std::iter::once(settings.writer_endpoint.clone())
            .chain(settings.more_writers.iter().cloned())
            .collect();
        let client = Arc::new(WriterGroup::new(
            &ctx,
            &endpoints,
            settings.writer_timeout,
            settings.writer_lost_after,
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
            queued: VecDeque::new(),
            start_trigger: None,
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
        // The running request plus the queued ones; the broker keeps the rest.
        requests_ch
            .basic_qos(s.max_queued.saturating_add(1), BasicQosOptions::default())
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
        // Deliveries queued on an earlier connection come back from the broker.
        self.queued.clear();
        self.state.send_modify(|st| st.queue_length = 0);
        let mut requests = broker::consume(&requests_ch, &self.queues.requests, false).await?;
        let mut notices = broker::consume(&notices_ch, &self.queues.notices, false).await?;
        tracing::info!(
            broker = %redact(&s.broker_url),
            tag = s.tag,
            queue = self.queues.requests,
            max_deliveries = s.max_deliveries,
            max_queued = s.max_queued,
            strict_statuses = s.strict_statuses,
            "serving write requests"
        );
        self.state.send_modify(|st| {
            st.connected = true;
            st.connections += 1;
        });
        let mut shutdown = self.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                // Queued requests go back to the broker's queue with the connection.
                let _ = conn
                    .close(200, "the writer agent is shutting down".into())
                    .await;
                return Ok(());
            }
            if let Some(next) = self.queued.pop_front() {
                self.state
                    .send_modify(|st| st.queue_length = self.queued.len() as u64);
                let mut links = Links {
                    conn: &conn,
                    requests_ch: &requests_ch,
                    requests: &mut requests,
                    kills: &mut kills,
                    status_ch: &status_ch,
                };
                self.handle(next.delivery, Some(next.received_at), &mut links)
                    .await?;
                continue;
            }
            tokio::select! {
                () = wait_shutdown(&mut shutdown) => {}
                delivery = requests.next() => match delivery {
                    Some(Ok(d)) => {
                        let mut links = Links {
                            conn: &conn,
                            requests_ch: &requests_ch,
                            requests: &mut requests,
                            kills: &mut kills,
                            status_ch: &status_ch,
                        };
                        self.handle(d, None, &mut links).await?
                    }
                    Some(Err(e)) => return Err(amqp("receiving requests")(e)),
                    None => return Err(closed("receiving requests")),
                },
                kill = kills.next() => match kill {
                    Some(Ok(k)) => self.answer_kill(&k, &status_ch).await?,
                    Some(Err(e)) => return Err(amqp("receiving kills")(e)),
                    None => return Err(closed("receiving kills")),
                },
                notice = notices.next() => match notice {
                    Some(Ok(n)) => {
                        let mut links = Links {
                            conn: &conn,
                            requests_ch: &requests_ch,
                            requests: &mut requests,
                            kills: &mut kills,
                            status_ch: &status_ch,
                        };
                        self.answer_dead_letter(n, &mut links).await?
                    }
                    Some(Err(e)) => return Err(amqp("receiving dead-letter notices")(e)),
                    None => return Err(closed("receiving dead-letter notices")),
                },
            }
        }
    }

    /// [`Agent::handle_request`] in a tracing span `request` with the request id and, when the
    /// message carries a valid one, its `traceparent`: every log line about the request has them.
    async fn handle(
        &mut self,
        delivery: Delivery,
        queued_at: Option<f64>,
        links: &mut Links<'_>,
    ) -> Result<(), BrokerError> {
        let span = tracing::info_span!(
            "request",
            request_id = %correlation_id(&delivery.properties).unwrap_or_default(),
            traceparent = tracing::field::Empty,
        );
        if let Some(t) = traceparent_hint(&delivery) {
            span.record("traceparent", tracing::field::display(&t));
        }
        self.handle_request(delivery, queued_at, links)
            .instrument(span)
            .await
    }

    /// One request, from delivery (or its turn in the agent's queue: `queued_at` is when it
    /// arrived) to ack.
    async fn handle_request(
        &mut self,
        delivery: Delivery,
        queued_at: Option<f64>,
        links: &mut Links<'_>,
    ) -> Result<(), BrokerError> {
        let mut job = self.job_for(&delivery, queued_at.unwrap_or_else(unix_now));
        let redelivered = match queued_at {
            // Received, logged and counted when it was queued.
            Some(_) => {
                tracing::info!(request_id = job.id, "a queued request's turn");
                is_redelivery(&delivery)
            }
            None => self.received(&job, &delivery),
        };
        if redelivered && self.forget_settled(&job.id) {
            tracing::info!(
                request_id = job.id,
                "redelivered after its final status went out: acked, nothing else to do"
            );
            return ack(&delivery).await;
        }
        let status_ch = links.status_ch;
        let req = match self.check_message(&job, &delivery, links.requests_ch).await {
            Ok(req) => req,
            Err((message, malformed)) => {
                return self
                    .refuse(&job, message, malformed, &delivery, status_ch)
                    .await
            }
        };
        job.take_traceparent(&req);
        if redelivered {
            if let Some(leftover) = self.leftover(&req) {
                return self.resume(&job, &req, leftover, &delivery, links).await;
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
        let max_images = self.settings.policy.max_images();
        let reply = self
            .writer(Command::start_with(
                output_file.clone(),
                req.n_images,
                // An unbounded write stops at the policy's limit, in the writer (exactly there).
                Some(max_images),
                Some(job.id.clone()),
                RunContext {
                    metadata: req.metadata.clone(),
                    traceparent: req.traceparent.clone(),
                    nxmx: req.nxmx.clone(),
                    deal: None,
                },
            ))
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
        let mut broker_ok = true;
        let what = match req.n_images {
            Some(n) => format!("writing {n} images to {output_file}"),
            None => format!(
                "writing images to {output_file} until stopped (unbounded write, at most \
                 {max_images} images)"
            ),
        };
        let start = job.status(action::REQUEST_START, what, 0, None);
        if let Err(e) = broker::publish_status(status_ch, &start).await {
            tracing::warn!("{e}");
            broker_ok = false;
        }
        // After request_start: a consumer that hears of the write has its status to follow.
        self.start_trigger = None;
        if let Some(t) = self.settings.trigger.as_ref().filter(|t| t.config.on_start) {
            let facts = trigger::WriteFacts {
                request_id: &job.id,
                output_file: &output_file,
                number_of_frames: req.n_images,
                metadata: req.metadata.as_ref(),
                traceparent: req.traceparent.as_deref(),
            };
            let outcome = trigger::publish(links.conn, t, trigger::Event::Start, &facts).await;
            self.count_trigger(&job.id, &outcome);
            self.start_trigger = Some(outcome);
        }
        self.run_to_end(&job, &req, &delivery, created, links, broker_ok)
            .await
    }

    /// What every status about the request of `delivery` carries.
    fn job_for(&self, delivery: &Delivery, received_at: f64) -> Job {
        Job {
            id: correlation_id(&delivery.properties).unwrap_or_default(),
            echo: echo(&delivery.data, MAX_BODY_BYTES),
            received_at,
            source: self.settings.service_name.clone(),
        }
    }

    /// Logs and counts a delivery; returns whether it is a redelivery.
    fn received(&self, job: &Job, delivery: &Delivery) -> bool {
        let before = delivery_count(&delivery.properties);
        let redelivered = is_redelivery(delivery);
        tracing::info!(
            request_id = job.id,
            redelivered,
            earlier_deliveries = before,
            "request received"
        );
        if redelivered {
            self.state.send_modify(|s| s.requests_redelivered += 1);
        }
        redelivered
    }

    /// Whether `id`'s final status is already out (then it is forgotten: its redelivery is the
    /// last the agent will see of it).
    fn forget_settled(&mut self, id: &str) -> bool {
        match self.settled.iter().position(|s| s == id) {
            Some(i) => {
                self.settled.remove(i);
                true
            }
            None => false,
        }
    }

    /// A request delivered while a write runs: refused at once if a check that touches nothing
    /// on disk fails, otherwise queued (unacked) and told its place in the line.
    async fn take_in(
        &mut self,
        delivery: Delivery,
        requests_ch: &Channel,
        status_ch: &Channel,
    ) -> Result<(), BrokerError> {
        let mut job = self.job_for(&delivery, unix_now());
        let redelivered = self.received(&job, &delivery);
        if redelivered && self.forget_settled(&job.id) {
            tracing::info!(
                request_id = job.id,
                "redelivered after its final status went out: acked, nothing else to do"
            );
            return ack(&delivery).await;
        }
        let req = match self.check_message(&job, &delivery, requests_ch).await {
            Ok(req) => req,
            Err((message, malformed)) => {
                return self
                    .refuse(&job, message, malformed, &delivery, status_ch)
                    .await
            }
        };
        job.take_traceparent(&req);
        if let Err(e) = self.settings.policy.check(&req) {
            // What an interrupted attempt left is judged at its turn (see `resume`).
            if !(redelivered && self.leftover(&req).is_some()) {
                return self
                    .refuse(&job, e.to_string(), false, &delivery, status_ch)
                    .await;
            }
        }
        self.queued.push_back(Waiting {
            delivery,
            received_at: job.received_at,
        });
        let place = self.queued.len();
        self.state.send_modify(|s| {
            s.requests_queued += 1;
            s.queue_length = place as u64;
        });
        let running = self.current.clone().unwrap_or_default();
        let before = match place {
            1 => String::new(),
            n => format!(" and {} queued before it", n - 1),
        };
        let message =
            format!("queued at place {place}: waits for request {running} (running){before}");
        tracing::info!(request_id = job.id, "{message}");
        if self.settings.strict_statuses {
            return Ok(());
        }
        let mut msg = job.status(action::REQUEST_QUEUED, message, 0, None);
        msg.insert("queue_position", place.into());
        msg.insert("waiting_for", running.into());
        broker::publish_status(status_ch, &msg).await
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
        parse_with_header(delivery).map_err(|e| {
            let malformed = e.is_malformed();
            (e.to_string(), malformed)
        })
    }

    /// What an interrupted attempt at `req` may have left: the file itself or `<file>.part`.
    fn leftover(&self, req: &WriteRequest) -> Option<PathBuf> {
        match self.settings.policy.check(req) {
            Ok(path) => {
                let part = std_daq_common::writer_command::partial_path(&path);
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
        links: &mut Links<'_>,
    ) -> Result<(), BrokerError> {
        match self.writer_knows(job).await {
            Some(WriterKnows::Running) => {
                tracing::info!(
                    request_id = job.id,
                    "resuming: the writer is still running this request"
                );
                let none = CreatedDirs::default();
                return self.run_to_end(job, req, delivery, none, links, true).await;
            }
            Some(WriterKnows::Ended(run)) => {
                tracing::info!(
                    request_id = job.id,
                    "the writer ended this request while no agent followed it"
                );
                let (act, message) = describe_end(&run);
                let mut fin = job.status(act, message, run.images_written, Some(&*run));
                // The agent that followed it may have died before its end trigger.
                self.end_trigger(links.conn, job, req, Some(&*run), &mut fin)
                    .await;
                return self.finish(fin, delivery, links.status_ch, true).await;
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
        self.finish(fin, delivery, links.status_ch, true).await
    }

    /// Follows the writer's run of `job` to its end, then publishes the final status and acks.
    /// `created`: the folders made for it, removed again if the run was cancelled empty.
    async fn run_to_end(
        &mut self,
        job: &Job,
        req: &WriteRequest,
        delivery: &Delivery,
        mut created: CreatedDirs,
        links: &mut Links<'_>,
        mut broker_ok: bool,
    ) -> Result<(), BrokerError> {
        self.current = Some(job.id.clone());
        let outcome = self.follow(job, req, links, &mut broker_ok).await;
        self.current = None;
        let (act, message, written, run) = match outcome {
            Outcome::Finished(run) => {
                let (act, message) = describe_end(&run);
                (act, message, run.images_written, Some(run))
            }
            Outcome::Lost { why, images_safe } => (action::REQUEST_FAIL, why, images_safe, None),
        };
        match &run {
            // The writer removed the empty file; the folders made for it go too.
            Some(r) if r.end.starts_with(CANCELLED) => created.remove(),
            _ => created.keep(),
        }
        tracing::info!(request_id = job.id, action = act, "{message}");
        let mut fin = job.status(act, message, written, run.as_ref());
        self.end_trigger(links.conn, job, req, run.as_ref(), &mut fin)
            .await;
        self.finish(fin, delivery, links.status_ch, broker_ok).await
    }

    /// The end trigger of a write, if one is configured, published before the final status
    /// (so that the status reports how it went) and only for a file that is complete under its
    /// name and holds at least one image ([`file_complete`]); then the trigger outcomes (start
    /// and end) go into `fin` as `trigger`. Never changes the final action.
    async fn end_trigger(
        &mut self,
        conn: &Connection,
        job: &Job,
        req: &WriteRequest,
        run: Option<&RunSummary>,
        fin: &mut StatusMessage,
    ) {
        let start = self.start_trigger.take();
        let Some(t) = self.settings.trigger.clone() else {
            return;
        };
        let mut report = Map::new();
        if let Some(start) = start {
            report.insert("start".into(), start.to_json());
        }
        if t.config.on_end {
            let end = match run.filter(|r| file_complete(r)) {
                Some(r) => {
                    let facts = trigger::WriteFacts {
                        request_id: &job.id,
                        output_file: &r.output_file,
                        number_of_frames: Some(r.images_written),
                        metadata: req.metadata.as_ref(),
                        traceparent: req.traceparent.as_deref(),
                    };
                    let outcome = trigger::publish(conn, &t, trigger::Event::End, &facts).await;
                    self.count_trigger(&job.id, &outcome);
                    outcome.to_json()
                }
                None => {
                    let why = match run {
                        Some(r) => format!(
                            "not sent: the write left no complete file with images ({} images, \
                             end {:?})",
                            r.images_written, r.end
                        ),
                        None => "not sent: the writer was lost, the file is not complete".into(),
                    };
                    tracing::info!(request_id = job.id, "end trigger {why}");
                    json!({"published": false, "attempts": 0, "error": Value::Null, "skipped": why})
                }
            };
            report.insert("end".into(), end);
        }
        if !report.is_empty() {
            fin.insert("trigger", Value::Object(report));
        }
    }

    /// Counts and logs a trigger's outcome.
    fn count_trigger(&self, request_id: &str, outcome: &trigger::Outcome) {
        let event = outcome.event.as_str();
        match &outcome.error {
            None => {
                tracing::info!(
                    request_id,
                    event,
                    attempts = outcome.attempts,
                    "processing trigger published"
                );
                self.state.send_modify(|s| s.triggers_published += 1);
            }
            Some(e) => {
                tracing::warn!(
                    request_id,
                    event,
                    attempts = outcome.attempts,
                    "processing trigger given up (the write is not affected): {e}"
                );
                self.state.send_modify(|s| s.triggers_failed += 1);
            }
        }
    }

    /// Follows the writer until the run ends: publishes progress (and, while no image came,
    /// that it waits), cancels an empty run at its `timeout_s`, handles kills, and takes in the
    /// requests that arrive meanwhile ([`Agent::take_in`]).
    async fn follow(
        &mut self,
        job: &Job,
        req: &WriteRequest,
        links: &mut Links<'_>,
        broker_ok: &mut bool,
    ) -> Outcome {
        let n_images = req.n_images;
        let timeout = req.timeout();
        let strict = self.settings.strict_statuses;
        let Links {
            requests_ch,
            requests,
            kills,
            status_ch,
            ..
        } = links;
        let (requests_ch, status_ch) = (*requests_ch, *status_ch);
        let mut ticker = tokio::time::interval(self.settings.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shutdown.clone();
        let mut stop_sent = false;
        let mut last_answer = Instant::now();
        let mut last_progress: ((u64, u64), Option<Instant>) = ((0, 0), None);
        // Measured from the start of following: for a run taken up after an agent restart the
        // wait (and timeout_s) counts from then.
        let following_since = Instant::now();
        let mut last_waiting = following_since;
        // The writer said no to cancelling (an image came, or the run ended): never again.
        let mut cancel_refused = false;
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
        // The status poll runs beside the other branches, so a writer slow to answer (or silent
        // until its command timeout) never delays the first status of a new request or a kill.
        let mut poll: Option<tokio::task::JoinHandle<Result<Reply, ClientError>>> = None;
        loop {
            tokio::select! {
                _ = ticker.tick(), if poll.is_none() => {
                    let client = Arc::clone(&self.client);
                    poll = Some(tokio::task::spawn_blocking(move || {
                        client.request(&Command::Status)
                    }));
                }
                polled = async {
                    match poll.as_mut() {
                        Some(p) => p.await,
                        None => std::future::pending().await,
                    }
                }, if poll.is_some() => {
                    poll = None;
                    let polled = polled.unwrap_or_else(|e| {
                        Err(ClientError::BadReply(format!("writer call failed: {e}")))
                    });
                    let status = match polled {
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
                        let waited = following_since.elapsed();
                        if cur.images_written == 0 {
                            if let Some(t) = timeout.filter(|t| waited >= *t && !cancel_refused) {
                                let reason = format!(
                                    "no image arrived within timeout_s = {} s",
                                    seconds_text(t)
                                );
                                match self
                                    .writer(Command::CancelIfEmpty { reason: Some(reason) })
                                    .await
                                {
                                    Ok(Reply { ok: true, run: Some(run), .. }) => {
                                        return Outcome::Finished(run)
                                    }
                                    // An image came meanwhile, or the run ended: the next poll
                                    // tells.
                                    Ok(_) => cancel_refused = true,
                                    // Asked again at the next poll.
                                    Err(e) => tracing::warn!("cancelling an empty run: {e}"),
                                }
                                continue;
                            }
                            if last_waiting.elapsed() >= self.settings.waiting_interval
                                && *broker_ok
                                && !strict
                            {
                                let mut message = format!(
                                    "waiting for the first image for {} s",
                                    waited.as_secs()
                                );
                                if let Some(t) = timeout {
                                    message.push_str(&format!(
                                        " (gives up at timeout_s = {} s)",
                                        seconds_text(t)
                                    ));
                                }
                                let mut msg =
                                    job.status(action::REQUEST_PROGRESS, message, 0, None);
                                msg.insert("waiting_s", waited.as_secs().into());
                                if let Err(e) = broker::publish_status(status_ch, &msg).await {
                                    tracing::warn!("{e}");
                                    *broker_ok = false;
                                }
                                last_waiting = Instant::now();
                            }
                        }
                        let due = last_progress
                            .1
                            .is_none_or(|t| t.elapsed() >= self.settings.progress_interval);
                        let now = (cur.images_written, cur.images_checkpointed);
                        if now != last_progress.0 && due && *broker_ok && !strict {
                            let of = n_images.map_or(String::new(), |n| format!(" of {n}"));
                            let mut msg = job.status(
                                action::REQUEST_PROGRESS,
                                format!(
                                    "wrote {}{of} images ({} safe in the file)",
                                    cur.images_written, cur.images_checkpointed
                                ),
                                cur.images_written,
                                None,
                            );
                            // The file to open while it is written (h5py swmr=True).
                            if let Some(p) = &cur.partial_file {
                                msg.insert("partial_file", p.clone().into());
                            }
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
                        // For an unbounded write the kill is its normal end: `stopped`.
                        let reason = if n_images.is_none() { STOPPED } else { "killed" };
                        if let Ok(Reply { ok: true, run: Some(run), .. }) = self
                            .writer(Command::Stop { reason: Some(reason.into()) })
                            .await
                        {
                            return Outcome::Finished(run);
                        }
                        // The run had already ended: the next status poll reports how.
                    }
                    Some(Ok(k)) => {
                        if let Err(e) = self.answer_kill(&k, status_ch).await {
                            tracing::warn!("{e}");
                            *broker_ok = false;
                        }
                    }
                    Some(Err(_)) | None => *broker_ok = false,
                },
                // Not while shutting down: what arrives then stays with the broker.
                delivery = requests.next(), if *broker_ok && !stop_sent => match delivery {
                    Some(Ok(d)) => {
                        if let Err(e) = self.take_in(d, requests_ch, status_ch).await {
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
        links: &mut Links<'_>,
    ) -> Result<(), BrokerError> {
        let status_ch = links.status_ch;
        let job = self.job_for(&notice, unix_now());
        let reason = header_text(&notice.properties, "x-first-death-reason")
            .unwrap_or_else(|| "unknown".into());
        tracing::warn!(
            request_id = job.id,
            reason,
            "the broker dead-lettered a request"
        );
        self.state.send_modify(|s| s.requests_dead_lettered += 1);
        if self.forget_settled(&job.id) {
            tracing::info!(request_id = job.id, "its final status is already out");
            return ack(&notice).await;
        }
        if let (false, Ok(req)) = (job.id.is_empty(), parse_with_header(&notice)) {
            match self.writer_knows(&job).await {
                Some(WriterKnows::Running) => {
                    tracing::info!(
                        request_id = job.id,
                        "the writer is still running it: following the run"
                    );
                    let none = CreatedDirs::default();
                    return self
                        .run_to_end(&job, &req, &notice, none, links, true)
                        .await;
                }
                Some(WriterKnows::Ended(run)) => {
                    let (act, message) = describe_end(&run);
                    let mut fin = job.status(act, message, run.images_written, Some(&*run));
                    self.end_trigger(links.conn, &job, &req, Some(&*run), &mut fin)
                        .await;
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
                    st.last_run
                        .filter(ours)
                        .map(|r| WriterKnows::Ended(Box::new(r)))
                }
            }
            _ => None,
        }
    }

    /// A kill for a request this agent is not running: a queued one is taken out of the line
    /// and failed (nothing was written for it); for any other the agent says so and changes
    /// nothing.
    async fn answer_kill(
        &mut self,
        kill: &Delivery,
        status_ch: &Channel,
    ) -> Result<(), BrokerError> {
        let id = correlation_id(&kill.properties);
        let place = id.as_deref().and_then(|id| {
            self.queued
                .iter()
                .position(|w| correlation_id(&w.delivery.properties).as_deref() == Some(id))
        });
        let Some(waiting) = place.and_then(|i| self.queued.remove(i)) else {
            return self.answer_stray_kill(kill, status_ch).await;
        };
        self.state
            .send_modify(|s| s.queue_length = self.queued.len() as u64);
        let job = self.job_for(&waiting.delivery, waiting.received_at);
        let message = format!(
            "killed while queued (at place {}): the request never started and nothing was written",
            place.map_or(0, |i| i + 1)
        );
        tracing::info!(request_id = job.id, "{message}");
        let mut fin = job.status(action::REQUEST_FAIL, message, 0, None);
        fin.insert("killed", true.into());
        self.finish(fin, &waiting.delivery, status_ch, true).await
    }

    /// A kill for a request this agent neither runs nor holds: says so (`kill_ignored`, not in
    /// strict mode), changes nothing.
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
        if self.settings.strict_statuses {
            return Ok(());
        }
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
    /// A trace context that came only as the AMQP header goes into the echo, so that every
    /// status carries it (body field and header).
    fn take_traceparent(&mut self, req: &WriteRequest) {
        if let Some(t) = &req.traceparent {
            self.echo.insert("traceparent".into(), t.clone().into());
        }
    }

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
    let (k, file) = (run.images_written, &run.output_file);
    let flagged = || {
        if run.images_flagged > 0 {
            format!(
                "; {} of them flagged incomplete ({} packets missing, {} lost in the buffer)",
                run.images_flagged, run.missing_packets, run.images_lost_in_buffer
            )
        } else {
            String::new()
        }
    };
    let end = run.end.as_str();
    if let Some(why) = end.strip_prefix(CANCELLED) {
        // The writer's words say what was removed.
        return (action::REQUEST_FAIL, why.to_string());
    }
    let Some(n) = run.n_images else {
        // Unbounded: a stop (the kill; `killed` from an agent before unbounded writes, or a stop
        // on the writer's own socket) and the limit are its normal ends.
        return match end {
            STOPPED | "killed" => (
                action::REQUEST_SUCCESS,
                format!(
                    "wrote {k} images to {file} (unbounded write, stopped){}",
                    flagged()
                ),
            ),
            MAX_IMAGES_REACHED => (
                action::REQUEST_SUCCESS,
                format!(
                    "wrote {k} images to {file} (unbounded write, ended at max_images = {}){}",
                    run.max_images.unwrap_or(k),
                    flagged()
                ),
            ),
            end => (
                action::REQUEST_FAIL,
                format!("the unbounded write ended after {k} images: {end}"),
            ),
        };
    };
    match end {
        "completed" => (
            action::REQUEST_SUCCESS,
            format!("wrote {k} of {n} images to {file}{}", flagged()),
        ),
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

/// Whether a run left its file complete under its name with at least one image: the rule for
/// the end trigger. Completed, killed and stopped runs (an unbounded write's kill, the agent's
/// shutdown) and an unbounded write at its max_images close the file holding exactly the images
/// written; a failed or cancelled run leaves no such file.
fn file_complete(run: &RunSummary) -> bool {
    let end = run.end.as_str();
    run.images_written > 0
        && (end == "completed"
            || end == "killed"
            || end == MAX_IMAGES_REACHED
            || end == STOPPED
            || end.starts_with("stopped:"))
}

/// Parses a request body and takes in the trace context of its AMQP header `traceparent`.
fn parse_with_header(delivery: &Delivery) -> Result<WriteRequest, RequestError> {
    let mut req = request::parse(&delivery.data)?;
    let header = header_text(&delivery.properties, "traceparent");
    request::merge_traceparent(&mut req, header.as_deref())?;
    Ok(req)
}

/// A valid trace context of a delivery (its header, else its body's field), for log lines
/// before the request is parsed.
fn traceparent_hint(delivery: &Delivery) -> Option<String> {
    let valid = |t: &String| request::check_traceparent(t).is_ok();
    header_text(&delivery.properties, "traceparent")
        .filter(valid)
        .or_else(|| {
            echo(&delivery.data, MAX_BODY_BYTES)
                .get("traceparent")
                .and_then(Value::as_str)
                .map(String::from)
                .filter(valid)
        })
}

/// The stop reason (and run `end`) of an unbounded write ended by its kill.
const STOPPED: &str = "stopped";

/// How the `end` of a run the writer cancelled for having no image begins
/// ([`Command::CancelIfEmpty`]).
const CANCELLED: &str = "cancelled: ";

/// Whether the broker delivered this before without it being settled.
fn is_redelivery(delivery: &Delivery) -> bool {
    delivery.redelivered || delivery_count(&delivery.properties).is_some_and(|n| n > 0)
}

/// Seconds as a person writes them: `2`, `0.5`.
fn seconds_text(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", s as u64)
    } else {
        format!("{s}")
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
            n_images: Some(10),
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
        // Cancelled empty (timeout_s): the writer's words, which say what was removed.
        assert_eq!(
            describe_end(&run(
                "cancelled: no image arrived within timeout_s = 2 s; nothing was written (x)",
                0
            )),
            (
                action::REQUEST_FAIL,
                "no image arrived within timeout_s = 2 s; nothing was written (x)".into()
            )
        );
    }

    /// An unbounded write's stop and limit are successes with the count; any other end is a
    /// failure that says so.
    #[test]
    fn unbounded_end_messages_report_the_count() {
        let run = |end: &str, k| RunSummary {
            output_file: "/d/u.h5".into(),
            n_images: None,
            max_images: Some(50),
            images_written: k,
            end: end.into(),
            ..RunSummary::default()
        };
        for end in ["stopped", "killed"] {
            assert_eq!(
                describe_end(&run(end, 137)),
                (
                    action::REQUEST_SUCCESS,
                    "wrote 137 images to /d/u.h5 (unbounded write, stopped)".into()
                )
            );
        }
        assert_eq!(
            describe_end(&run("stopped", 0)),
            (
                action::REQUEST_SUCCESS,
                "wrote 0 images to /d/u.h5 (unbounded write, stopped)".into()
            )
        );
        assert_eq!(
            describe_end(&run(MAX_IMAGES_REACHED, 50)),
            (
                action::REQUEST_SUCCESS,
                "wrote 50 images to /d/u.h5 (unbounded write, ended at max_images = 50)".into()
            )
        );
        let flagged = RunSummary {
            images_flagged: 2,
            missing_packets: 7,
            ..run("stopped", 9)
        };
        assert_eq!(
            describe_end(&flagged).1,
            "wrote 9 images to /d/u.h5 (unbounded write, stopped); 2 of them flagged incomplete \
             (7 packets missing, 0 lost in the buffer)"
        );
        for (end, message) in [
            (
                "stopped: the writer agent was shut down",
                "the unbounded write ended after 3 images: stopped: the writer agent was shut down",
            ),
            (
                "failed: disk full",
                "the unbounded write ended after 3 images: failed: disk full",
            ),
        ] {
            assert_eq!(
                describe_end(&run(end, 3)),
                (action::REQUEST_FAIL, message.into())
            );
        }
        assert_eq!(
            describe_end(&run(
                "cancelled: no image within 2 s; nothing was written (x)",
                0
            )),
            (
                action::REQUEST_FAIL,
                "no image within 2 s; nothing was written (x)".into()
            )
        );
    }

    /// The end trigger goes only for a file complete under its name with images.
    #[test]
    fn end_trigger_rule_is_a_complete_file_with_images() {
        let run = |end: &str, k| RunSummary {
            images_written: k,
            end: end.into(),
            ..RunSummary::default()
        };
        for end in [
            "completed",
            "killed",
            "stopped",
            "stopped: the writer agent was shut down",
            MAX_IMAGES_REACHED,
        ] {
            assert!(file_complete(&run(end, 3)), "{end}");
            assert!(!file_complete(&run(end, 0)), "{end} with no image");
        }
        for end in [
            "failed: disk full",
            "cancelled: no image arrived within timeout_s = 2 s; nothing was written",
        ] {
            assert!(!file_complete(&run(end, 3)), "{end}");
        }
    }

    #[test]
    fn seconds_are_written_as_people_write_them() {
        assert_eq!(seconds_text(Duration::from_secs(30)), "30");
        assert_eq!(seconds_text(Duration::from_millis(1500)), "1.5");
        assert_eq!(seconds_text(Duration::from_millis(250)), "0.25");
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
