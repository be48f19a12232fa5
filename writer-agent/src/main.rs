//! `std-writer-agent`: the RabbitMQ front end of `std-h5-writer`. Thin: parses flags, builds the
//! settings and runs [`std_writer_agent::Agent`] until SIGINT/SIGTERM.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;
use std_daq_common::names;
use std_daq_common::status::{load_config, RedisEnv, StatusBoard, StatusReporter};
use std_writer_agent::{Agent, AgentSettings, AgentState, Policy};

/// Takes write requests from RabbitMQ (std_daq_service conventions: exchanges `request`, `status`,
/// `kill`; request id = AMQP correlation_id) and has std-h5-writer write them. Every step is
/// reported on the `status` exchange; see docs/protocol.md. Requests wait in the durable quorum
/// queue `std-daq.<service-name>.requests`; one the broker gave up on (delivered --max-deliveries
/// times without an answer) is kept in `std-daq.<service-name>.dead-letter`. One write at a time;
/// a request that arrives while one runs is answered at once: request_fail if it is refused,
/// otherwise request_queued (std-daq extension, off with --strict-statuses) and request_start
/// when its turn comes.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Detector config (std_daq JSON); gives the writer's command socket and the default tag.
    /// Without it the config is read from Redis key config.<SERVICE_NAME>.
    #[arg(long, env = "DETECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// RabbitMQ URL (vhost `/` is written `%2f`).
    #[arg(
        long,
        env = "BROKER_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    broker: String,
    /// Routing key this agent binds on `request` and `kill`. Default: the detector name, so that
    /// two detectors sharing a broker never take each other's requests. `#` takes every request
    /// (std_daq's primary-service default).
    #[arg(long, env = "AGENT_TAG")]
    tag: Option<String>,
    /// The `source` header of every status message; also names the agent's queues
    /// (`std-daq.<service-name>.requests`, `.dead-letter`, `.dead-letter-notices`).
    /// Default: `<detector_name>.writer_agent`.
    #[arg(long, env = "SERVICE_NAME")]
    service_name: Option<String>,
    /// Folder every output_file must resolve into (no `..`, no symbolic link out of it).
    #[arg(long, env = "OUTPUT_ROOT")]
    output_root: PathBuf,
    /// Largest n_images a request may ask for. Also the most images an unbounded write (a
    /// request without n_images, written until it is killed) writes: it ends there by itself,
    /// with request_success.
    #[arg(long, env = "MAX_IMAGES", default_value_t = 1_000_000)]
    max_images: u64,
    /// Create the missing folders of output_file (inside the output root). Off: such a request is
    /// refused.
    #[arg(long, env = "CREATE_DIRS")]
    create_dirs: bool,
    /// Milliseconds between progress polls of the writer while a run is active.
    #[arg(long, default_value_t = 150)]
    poll_ms: u64,
    /// Least milliseconds between two `request_progress` messages.
    #[arg(long, default_value_t = 500)]
    progress_ms: u64,
    /// While a run has received no image yet, a `request_progress` "waiting for the first image
    /// for <s> s" (images_written 0) this often, in milliseconds. A request's optional timeout_s
    /// (seconds) ends such a run with request_fail and leaves nothing on disk.
    #[arg(long, env = "WAITING_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(10..))]
    waiting_ms: u64,
    /// How many requests the agent holds in its own queue while a write runs; each got
    /// request_queued with its place and starts in arrival order. Beyond that, requests stay in
    /// the broker's queue (std-daq.<service-name>.requests) without any status until a place
    /// frees. 0: none are held (a request sent during a write gets no status until it ends).
    #[arg(long, env = "MAX_QUEUED", default_value_t = std_writer_agent::agent::DEFAULT_MAX_QUEUED,
          value_parser = clap::value_parser!(u16).range(0..=1000))]
    max_queued: u16,
    /// Publish only std_daq's own statuses: request_start, request_success, request_fail (for
    /// clients that refuse anything else). Turns off every std-daq extension: request_queued,
    /// request_progress (the waiting-for-the-first-image reports included) and kill_ignored.
    /// Refusals still come at once; a queued request just gets nothing until its request_start.
    #[arg(long, env = "STRICT_STATUSES")]
    strict_statuses: bool,
    /// The broker delivers a request at most this many times (the request queue's
    /// x-delivery-limit is one less). A request that was delivered this often and never answered
    /// (the agent died or lost the broker each time) is moved to the dead-letter queue and its
    /// client gets request_fail. Changing it for an existing queue makes the agent stop with an
    /// error naming the queue (RabbitMQ cannot change a queue's arguments).
    #[arg(long, env = "MAX_DELIVERIES", default_value_t = std_writer_agent::agent::DEFAULT_MAX_DELIVERIES,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_deliveries: u32,
    /// Serve Prometheus metrics (GET /metrics: the request counters) on this address, e.g.
    /// 127.0.0.1:9102. Overrides the config key `metrics_base_address` (the agent's port is
    /// base + 2).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// How long one command to a writer may take, in milliseconds (default 5000).
    #[arg(long)]
    writer_timeout_ms: Option<u64>,
    /// A writer that has not answered for this many milliseconds during a run is lost: with
    /// several writers (number_of_writers) the run is ended, the master file maps what every
    /// writer surely wrote, and request_fail names the lost writer (default 30000).
    #[arg(long)]
    writer_lost_ms: Option<u64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let redis = RedisEnv::from_env();
    let cfg = load_config(args.config.as_deref(), &redis)?;
    std_daq_common::service::init_logging(&cfg.log_level);
    std_daq_common::service::warn_notices(&cfg);
    let policy = Policy::new(&args.output_root, args.max_images, args.create_dirs)
        .with_context(|| format!("output root {}", args.output_root.display()))?;
    let tag = args.tag.unwrap_or_else(|| cfg.detector_name.clone());
    let service_name = args
        .service_name
        .unwrap_or_else(|| format!("{}.writer_agent", cfg.detector_name));
    let mut settings = AgentSettings::new(
        &args.broker,
        &tag,
        &service_name,
        &names::writer_command_endpoint(&cfg),
        policy,
    );
    settings.more_writers = (1..cfg.number_of_writers)
        .map(|k| names::writer_command_endpoint_of(&cfg, k))
        .collect();
    if let Some(ms) = args.writer_timeout_ms {
        settings.writer_timeout = Duration::from_millis(ms.max(1));
    }
    if let Some(ms) = args.writer_lost_ms {
        settings.writer_lost_after = Duration::from_millis(ms);
    }
    settings.poll_interval = Duration::from_millis(args.poll_ms.max(10));
    settings.progress_interval = Duration::from_millis(args.progress_ms);
    settings.max_deliveries = args.max_deliveries;
    settings.waiting_interval = Duration::from_millis(args.waiting_ms);
    settings.max_queued = args.max_queued;
    settings.strict_statuses = args.strict_statuses;
    settings.trigger = cfg
        .processing_trigger
        .clone()
        .map(|t| std_writer_agent::trigger::TriggerSettings::new(t, &cfg.detector_name));
    let agent = Agent::new(settings).context("setting up the agent")?;
    let status_name = format!("std-daq.{}.writer-agent", cfg.detector_name);
    let board = StatusBoard::default();
    board.set("tag", &tag);
    board.set("broker", std_writer_agent::agent::redact(&args.broker));
    board.set("output_root", args.output_root.display());
    board.set("request_queue", &agent.queues().requests);
    board.set("dead_letter_queue", &agent.queues().dead_letter);
    board.set(
        "processing_trigger",
        trigger_summary(cfg.processing_trigger.as_ref()),
    );
    show_state(&board, &agent.state().borrow());
    let metrics_addr = args
        .metrics_addr
        .or(cfg.metrics_addr(std_daq_common::MetricsService::WriterAgent));
    std_daq_common::metrics::serve_if(metrics_addr, &status_name, &board, Vec::new())
        .context("starting the metrics server")?;
    let _status = StatusReporter::start(&redis, &status_name, &cfg, board.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let shutdown = agent.shutdown_handle();
        tokio::spawn(async move {
            wait_for_signal().await;
            shutdown.trigger();
        });
        let mut state = agent.state();
        tokio::spawn(async move {
            while state.changed().await.is_ok() {
                show_state(&board, &state.borrow_and_update());
            }
        });
        agent.run().await
    })?;
    Ok(())
}

/// Where the processing trigger goes, for the status board (`off` without one).
fn trigger_summary(t: Option<&std_daq_common::config::ProcessingTrigger>) -> String {
    use std_daq_common::config::TriggerMode;
    let Some(t) = t else { return "off".into() };
    let events = match (t.on_start, t.on_end) {
        (true, true) => "start,end",
        (true, false) => "start",
        _ => "end",
    };
    match &t.mode {
        TriggerMode::Zocalo { queue, recipes } => {
            format!(
                "zocalo queue {queue} recipes {} events {events}",
                recipes.join(",")
            )
        }
        TriggerMode::Topic {
            exchange,
            routing_key,
        } => format!("topic {exchange} {routing_key} events {events}"),
    }
}

/// The agent's counters on the status board (Redis status hash and /metrics).
fn show_state(board: &StatusBoard, state: &AgentState) {
    for (name, value) in state.fields() {
        board.set(name, value);
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
