//! The writer agent: consumes write requests from RabbitMQ (std_daq_service conventions, see
//! `docs/protocol.md`), checks them ([`crate::request::Policy`]), drives `std-h5-writer` through
//! its ZMQ command socket and reports every step on the `status` exchange.
//!
//! One request at a time (prefetch 1): a request is acked only after its file is closed and its
//! final status is confirmed by the broker; a refused or failed one is rejected without requeue.
//! A kill on the `kill` exchange with the request's correlation id stops the run at the next image.
//! When the broker goes away, the agent keeps following a run in progress to its end, then
//! reconnects with backoff, publishes the final status it still owes, and keeps serving.
//!
//! Must never: write anything to disk for a refused request, overwrite a file, ack a request before
//! its final status is out, or panic or exit on anything that arrives from the network.

use crate::broker::{self, amqp, BrokerError};
use crate::protocol::{action, correlation_id, echo, exchange, unix_now, StatusMessage};
use crate::request::{self, Policy, RequestError};
use futures_lite::StreamExt;
use h5_writer::command::{ClientError, Command, Reply, RunSummary, WriterClient};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions};
use lapin::{Channel, Consumer};
use serde_json::{json, Map, Value};
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
    /// The `source` header of every status.
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
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// What the agent is doing, for tests and health checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentState {
    /// Consuming on a live broker connection.
    pub connected: bool,
    /// Successful (re)connections so far.
    pub connections: u64,
    /// Requests answered with a final status (success or fail).
    pub requests_finished: u64,
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
    client: Arc<WriterClient>,
    shutdown_tx: Arc<watch::Sender<bool>>,
    shutdown: watch::Receiver<bool>,
    state: watch::Sender<AgentState>,
    /// Final statuses that could not be published (broker gone); sent first after reconnecting.
    owed: Vec<StatusMessage>,
    /// The request being run, for answering stray kills.
    current: Option<String>,
}

/// How a run ended, as far as the agent knows.
enum Outcome {
    Finished(RunSummary),
    Lost(String),
}

impl Agent {
    pub fn new(settings: AgentSettings) -> Result<Self, AgentError> {
        broker::short(&settings.tag)?;
        let ctx = zmq::Context::new();
        let client = Arc::new(WriterClient::new(
            &ctx,
            &settings.writer_endpoint,
            settings.writer_timeout,
        ));
        let (shutdown_tx, shutdown) = watch::channel(false);
        Ok(Agent {
            settings,
            client,
            shutdown_tx: Arc::new(shutdown_tx),
            shutdown,
            state: watch::channel(AgentState::default()).0,
            owed: Vec::new(),
            current: None,
        })
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.shutdown_tx))
    }

    pub fn state(&self) -> watch::Receiver<AgentState> {
        self.state.subscribe()
    }

    /// Serves until the shutdown handle is triggered. Broker trouble is never fatal: the agent
    /// reconnects with backoff.
    pub async fn run(mut self) -> Result<(), AgentError> {
        const FIRST_BACKOFF: Duration = Duration::from_millis(100);
        let mut backoff = FIRST_BACKOFF;
        let mut shutdown = self.shutdown.clone();
        while !*shutdown.borrow() {
            let before = self.state.borrow().connections;
            match self.serve().await {
                Ok(()) => break,
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
        let kill_ch = conn
            .create_channel()
            .await
            .map_err(amqp("opening a channel"))?;
        let status_ch = conn
            .create_channel()
            .await
            .map_err(amqp("opening a channel"))?;
        status_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("enabling publisher confirms"))?;
        let mut requests =
            broker::bind_own_queue(&requests_ch, exchange::REQUEST, &s.tag, false).await?;
        let mut kills = broker::bind_own_queue(&kill_ch, exchange::KILL, &s.tag, true).await?;
        while let Some(owed) = self.owed.first() {
            broker::publish_status(&status_ch, owed).await?;
            self.owed.remove(0);
        }
        tracing::info!(
            broker = %redact(&s.broker_url),
            tag = s.tag,
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
                    Some(Ok(d)) => self.handle(d, &mut kills, &status_ch).await?,
                    Some(Err(e)) => return Err(amqp("receiving requests")(e)),
                    None => return Err(BrokerError::Amqp {
                        op: "receiving requests",
                        source: lapin::ErrorKind::InvalidConnectionState(
                            lapin::ConnectionState::Closed).into(),
                    }),
                },
                kill = kills.next() => match kill {
                    Some(Ok(k)) => self.answer_stray_kill(&k, &status_ch).await?,
                    Some(Err(e)) => return Err(amqp("receiving kills")(e)),
                    None => return Err(BrokerError::Amqp {
                        op: "receiving kills",
                        source: lapin::ErrorKind::InvalidConnectionState(
                            lapin::ConnectionState::Closed).into(),
                    }),
                },
            }
        }
    }

    /// One request, from delivery to ack/reject.
    async fn handle(
        &mut self,
        delivery: Delivery,
        kills: &mut Consumer,
        status_ch: &Channel,
    ) -> Result<(), BrokerError> {
        let job = Job {
            id: correlation_id(&delivery.properties).unwrap_or_default(),
            echo: echo(&delivery.data),
            received_at: unix_now(),
            source: self.settings.service_name.clone(),
        };
        tracing::info!(request_id = job.id, "request received");
        let checked = if job.id.is_empty() {
            Err(
                "the request has no correlation_id: the request id must travel as the AMQP \
                 correlation_id"
                    .to_string(),
            )
        } else {
            request::parse(&delivery.data)
                .and_then(|r| {
                    let (path, created) = self.settings.policy.prepare(&r)?;
                    Ok((r, path, created))
                })
                .map_err(|e: RequestError| e.to_string())
        };
        let (req, path, mut created) = match checked {
            Ok(ok) => ok,
            Err(message) => return self.refuse(&job, message, &delivery, status_ch).await,
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
            return self.refuse(&job, message, &delivery, status_ch).await;
        }
        created.keep();
        self.current = Some(job.id.clone());
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
        let outcome = self
            .follow(&job, req.n_images, kills, status_ch, &mut broker_ok)
            .await;
        self.current = None;
        let (act, message, written, run) = match outcome {
            Outcome::Finished(run) => {
                let (act, message) = describe_end(&run);
                (act, message, run.images_written, Some(run))
            }
            Outcome::Lost(why) => (action::REQUEST_FAIL, why, 0, None),
        };
        tracing::info!(request_id = job.id, action = act, "{message}");
        let fin = job.status(act, message, written, run.as_ref());
        self.finish(fin, &delivery, status_ch, broker_ok).await
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
        let mut last_progress: (u64, Option<Instant>) = (0, None);
        let ours = |r: &RunSummary| r.request_id.as_deref() == Some(job.id.as_str());
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let status = match self.writer(Command::Status).await {
                        Ok(Reply { ok: true, status: Some(st), .. }) => st,
                        Ok(r) => return Outcome::Lost(format!(
                            "the writer's status reply is not usable: {}",
                            r.error.unwrap_or_default()
                        )),
                        Err(e) => {
                            if last_answer.elapsed() > self.settings.writer_lost_after {
                                return Outcome::Lost(format!(
                                    "the writer stopped answering during the run: {e}"
                                ));
                            }
                            continue;
                        }
                    };
                    last_answer = Instant::now();
                    if let Some(cur) = status.current.as_ref().filter(|c| ours(c)) {
                        let due = last_progress
                            .1
                            .is_none_or(|t| t.elapsed() >= self.settings.progress_interval);
                        if cur.images_written != last_progress.0 && due && *broker_ok {
                            let msg = job.status(
                                action::REQUEST_PROGRESS,
                                format!("wrote {} of {n_images} images", cur.images_written),
                                cur.images_written,
                                None,
                            );
                            if let Err(e) = broker::publish_status(status_ch, &msg).await {
                                tracing::warn!("{e}");
                                *broker_ok = false;
                            }
                            last_progress = (cur.images_written, Some(Instant::now()));
                        }
                    } else if let Some(run) = status.last_run.filter(|r| ours(r)) {
                        return Outcome::Finished(run);
                    } else {
                        return Outcome::Lost(
                            "the writer no longer knows this run (was it restarted?)".into(),
                        );
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

    /// A request refused before anything was written: `request_fail`, reject without requeue.
    async fn refuse(
        &mut self,
        job: &Job,
        message: String,
        delivery: &Delivery,
        status_ch: &Channel,
    ) -> Result<(), BrokerError> {
        tracing::info!(request_id = job.id, "refused: {message}");
        let fin = job.status(action::REQUEST_FAIL, message, 0, None);
        self.finish(fin, delivery, status_ch, true).await
    }

    /// Publishes the final status (or keeps it for after the reconnect), then acks (success) or
    /// rejects without requeue (fail).
    async fn finish(
        &mut self,
        fin: StatusMessage,
        delivery: &Delivery,
        status_ch: &Channel,
        broker_ok: bool,
    ) -> Result<(), BrokerError> {
        self.state.send_modify(|s| s.requests_finished += 1);
        let published = if broker_ok {
            broker::publish_status(status_ch, &fin).await
        } else {
            Err(BrokerError::Amqp {
                op: "publishing the final status",
                source: lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed)
                    .into(),
            })
        };
        if let Err(e) = published {
            self.owed.push(fin);
            return Err(e);
        }
        if fin.action == action::REQUEST_SUCCESS {
            delivery
                .ack(BasicAckOptions::default())
                .await
                .map_err(amqp("acking the request"))?;
        } else {
            delivery
                .reject(BasicRejectOptions { requeue: false })
                .await
                .map_err(amqp("rejecting the request"))?;
        }
        Ok(())
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
