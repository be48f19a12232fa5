//! std-daq: the command line around the std-daq services.
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use std_daq::pipeline::{default_bin_dir, Pipeline, PipelineOptions};

/// std-daq: detector data acquisition (JUNGFRAU, EIGER, GigaFRoST) from UDP packets to HDF5.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the whole pipeline on one machine: a simulated JUNGFRAU (default 2 modules, 1024x1024)
    /// streamed by UDP through std-udp-recv, std-assembler and std-h5-writer into an HDF5 file,
    /// each a separate process, then prints rates and losses. Needs no RabbitMQ or Redis.
    Demo(DemoArgs),
    /// Asks the writer agent (over RabbitMQ) to write the next N images into a file, shows
    /// progress, and exits 0 only when the file was written completely. Prints the request id
    /// first, for `std-daq kill`. Without --n-images the write is unbounded: it writes until
    /// `std-daq kill <request id>` stops it (then exits 0 with the count) or it reaches the
    /// agent's --max-images.
    Write(WriteArgs),
    /// Stops a running write request; its file keeps the images written so far.
    Kill(KillArgs),
    /// Runs one detector's services (a receiver per module, assembler, writer, a `std-daq
    /// preview` per entry of the config's `live_stream_configs`, optionally the writer agent,
    /// the stream sender and the pedestal service) as supervised child processes: a crashed child is restarted with
    /// backoff; SIGINT/SIGTERM stops them all in order and cleans up. Every child reads the same
    /// config (compression, metrics_base_address, ...).
    Up(UpArgs),
    /// Prints a table of every service's status from Redis (`status.*` hashes): uptime, where
    /// its Prometheus metrics are served (or "metrics off") and its counters.
    Status(StatusArgs),
    /// The HTTP control API (write sync/async, kill, request status, service status, config,
    /// OpenAPI at /openapi.json, interactive page at /docs), PSI std_daq's REST routes for
    /// std-daq-client (/daq/config, /writer/..., /daq/stats, /daq/logs/<n>, /daq/deployment;
    /// docs/api.md), the live view /daq/live (MJPEG, needs --config) and the operator's status
    /// page at / (live image, rates, counters, writes, start/stop); speaks to the writer agent
    /// over RabbitMQ.
    Api(ApiArgs),
    /// A JUNGFRAU pedestal run on the running pipeline: takes --frames dark frames per module
    /// of each gain stage G0, G1, G2 as the detector delivers them (the stage is set on the
    /// detector; each frame's stage is the one most of its pixels' gain bits say, and a pixel's
    /// value counts only if it was itself in that stage). Reads the raw module frames from the
    /// receivers' FrameBuffers (image ids from the assembler's image stream, so it also works
    /// while a jungfrau-converted assembler converts), computes per pixel and stage the mean
    /// (pedestal) and RMS, masks pixels never in a stage, stuck (RMS <= --min-rms) or noisy
    /// (RMS > --max-rms-factor x the module's median), and writes the calibration file
    /// (docs/calibration.md: gains from --gain-file, never invented; pedestals; pixel_mask; plus
    /// pedestal_rms, pedestal_mask, pedestal_counts, pedestal_frames) atomically (temp file +
    /// rename). With the default output (the config's calibration_file) a running assembler
    /// takes it at the next image, without a restart. Prints a JSON report; prints "ready" on
    /// stderr once it follows the image stream (start the dark frames after that).
    Pedestal(PedestalArgs),
    /// Checks written files: recomputes every image's end-to-end checksum (the one the
    /// assembler computed when it made the image, stored per image in /<detector>/checksum)
    /// from the pixels as any reader gets them (decompressed if compressed) and names every
    /// image that does not match or cannot be read. Prints a JSON report per file; exits 1 if
    /// any image failed. Never modifies a file.
    Verify(VerifyArgs),
    /// The pedestal service: takes pedestal requests over RabbitMQ (exchange `request`, routing
    /// key --tag, default <detector_name>.pedestal; request id = AMQP correlation_id; body the
    /// JSON of `POST /pedestal`: {"gain_file": ..., "frames_per_stage": ..., "output": ...,
    /// ...}) and runs them as `std-daq pedestal` does, one at a time. Reports on `status`:
    /// request_start, request_progress (state "running" once it follows the image stream: start
    /// the dark frames then; frame counts), then request_success with the report as message, or
    /// request_fail with the reason. A kill (exchange `kill`, same key, correlation_id = the
    /// request id) cancels the run: nothing is written, request_fail "killed". See
    /// docs/protocol.md, "Pedestal requests".
    PedestalAgent(PedestalAgentArgs),
    /// The live preview: publishes picked images in std_daq's array-1.0 format (JSON header +
    /// pixels) on a ZMQ PUB socket, without ever slowing the data path.
    Preview(PreviewArgs),
}

#[derive(Debug, clap::Args)]
struct ApiArgs {
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Detector config file (served at /config; the PSI routes /daq/* and /writer/* need it to
    /// know the detector, and serve the config last set through /daq/config once there is one).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Redis for /service_status and the PSI routes (configs, deployment, logs, stats).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// Frames per second of a /daq/live stream without ?max_fps= (at most 25).
    #[arg(long, default_value_t = std_daq::live::DEFAULT_FPS)]
    live_fps: f64,
    /// Viewers of /daq/live at once; more are answered 503.
    #[arg(long, default_value_t = std_daq::live::DEFAULT_MAX_VIEWERS)]
    live_max_viewers: usize,
    /// The writer agent's service name, the `source` of its statuses: the status page at /
    /// shows the writes of that agent. Default: <detector_name>.writer_agent (the agent's own
    /// default).
    #[arg(long)]
    agent_service_name: Option<String>,
    #[command(flatten)]
    broker: BrokerArgs,
}

#[derive(Debug, clap::Args)]
struct PreviewArgs {
    /// Detector config file.
    #[arg(long)]
    config: PathBuf,
    /// Where viewers connect (ZMQ SUB), e.g. tcp://0.0.0.0:9999.
    #[arg(long)]
    bind: String,
    /// forward (every image), periodic:N,HZ (N images HZ times a second) or batch:N,M (the first
    /// N of every M images).
    #[arg(long, default_value = "periodic:1,10")]
    mode: std_daq::preview::Mode,
    /// Images a slow viewer may have queued before ZMQ drops for it.
    #[arg(long, default_value_t = 10)]
    hwm: i32,
    /// Serve Prometheus metrics (GET /metrics: images_seen, images_sent, images_lost) on this
    /// address. `std-daq up` gives the preview of `live_stream_configs` entry i (in key order)
    /// metrics_base_address + 5 + i when the config has metrics_base_address.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    /// HDF5 files written by std-h5-writer (also a `.part` file still being written).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct PedestalArgs {
    /// Detector config file (JUNGFRAU). With --broker only used for the default --tag.
    #[arg(long, required_unless_present = "broker")]
    config: Option<PathBuf>,
    /// Do not run here: send the run as a request to `std-daq pedestal-agent` over this RabbitMQ
    /// (docs/protocol.md, "Pedestal requests"), print "ready" on stderr when it follows the image
    /// stream and the report on stdout when it succeeded. Paths (made absolute here) must be
    /// valid on the service's host; prints the request id first (`std-daq kill <id> --tag <tag>`
    /// cancels the run). E.g. amqp://guest:guest@127.0.0.1:5672/%2f.
    #[arg(long)]
    broker: Option<String>,
    /// With --broker: the pedestal service's routing key. Default: <detector_name>.pedestal.
    #[arg(long, requires = "broker")]
    tag: Option<String>,
    /// Dark frames per module and gain stage.
    #[arg(long, default_value_t = 1000)]
    frames: u32,
    /// HDF5 file with the gains: dataset `gains` [3, n_modules*512, 1024] in ADU/keV (any
    /// float type), optionally `pixel_mask` [n_modules*512, 1024] (nonzero = bad, kept masked).
    /// A calibration file is a gain file.
    #[arg(long)]
    gain_file: PathBuf,
    /// Calibration file to write. Default: the config's calibration_file (so the running
    /// assembler takes it).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Mask a stage of a pixel that was in it in fewer than this fraction of the stage's frames.
    #[arg(long, default_value_t = 0.9)]
    min_fraction: f64,
    /// Mask a stage of a pixel whose RMS is at most this (ADU): stuck.
    #[arg(long, default_value_t = 0.1)]
    min_rms: f64,
    /// Mask a stage of a pixel whose RMS is above this many times the median RMS of its module
    /// in that stage: noisy.
    #[arg(long, default_value_t = 3.0)]
    max_rms_factor: f64,
    /// Fail if the frames have not all arrived within this many seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout_s: f64,
}

#[derive(Debug, clap::Args)]
struct PedestalAgentArgs {
    /// Detector config file (JUNGFRAU); outputs may only be written next to its
    /// calibration_file.
    #[arg(long)]
    config: PathBuf,
    /// RabbitMQ URL (vhost `/` is written `%2f`).
    #[arg(
        long,
        env = "BROKER_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    broker: String,
    /// Routing key bound on `request` and `kill`. Default: <detector_name>.pedestal, which the
    /// writer agent's default tag (the detector name) does not match. Do not give the writer
    /// agent the tag `#` next to this service: it would take pedestal requests as bad writes.
    #[arg(long, env = "PEDESTAL_TAG")]
    tag: Option<String>,
    /// The `source` header of every status. Default: <detector_name>.pedestal_agent.
    #[arg(long)]
    service_name: Option<String>,
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Detector config file.
    #[arg(long)]
    config: PathBuf,
    /// Also run std-writer-agent, writing files under this folder only.
    #[arg(long)]
    agent_output_root: Option<PathBuf>,
    /// Also run std-stream-send to this host:port.
    #[arg(long)]
    stream_target: Option<String>,
    /// Also run `std-daq pedestal-agent` (JUNGFRAU pedestal runs requested over RabbitMQ,
    /// routing key <detector_name>.pedestal; broker from BROKER_URL). A config change of
    /// calibration_file restarts it, cancelling a run in progress.
    #[arg(long)]
    pedestal_agent: bool,
    /// Apply configs set at run time through `std-daq api` (`POST /daq/config`): store --config
    /// in Redis as the detector's config, watch for new ones, validate each again and restart
    /// the services whose behaviour depends on a changed key (docs/api.md). Needs Redis
    /// (REDIS_HOST, REDIS_PORT).
    #[arg(long)]
    watch_config: bool,
    /// With --watch-config: where the applied config is written for the restarted services.
    /// Default: std-daq-up.<detector>.config.json in the temporary folder.
    #[arg(long)]
    applied_config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// Redis host.
    #[arg(long, env = "REDIS_HOST", default_value = "127.0.0.1")]
    redis_host: String,
    /// Redis port.
    #[arg(long, env = "REDIS_PORT", default_value_t = 6379)]
    redis_port: u16,
    /// Only services whose name contains this.
    #[arg(long, default_value = "")]
    filter: String,
}

#[derive(Debug, clap::Args)]
struct BrokerArgs {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "BROKER_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    broker: String,
    /// The writer agent's tag (routing key); the agent's default is its detector name.
    #[arg(long, env = "AGENT_TAG")]
    tag: String,
    /// Give up when no status arrives for this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

impl BrokerArgs {
    fn options(&self) -> std_writer_agent::client::ClientOptions {
        std_writer_agent::client::ClientOptions {
            broker_url: self.broker.clone(),
            tag: self.tag.clone(),
            idle_timeout: Duration::from_secs(self.timeout),
        }
    }
}

#[derive(Debug, clap::Args)]
struct WriteArgs {
    /// Number of images to write. Without it: an unbounded write, until `std-daq kill` (which is
    /// then its normal, successful end) or the agent's --max-images.
    // Judged by the agent (0 or above its --max-images is refused with its reason).
    #[arg(long)]
    n_images: Option<u64>,
    /// Absolute path of the HDF5 file to create (must not exist).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    broker: BrokerArgs,
}

#[derive(Debug, clap::Args)]
struct KillArgs {
    /// The request id `std-daq write` printed.
    request_id: String,
    #[command(flatten)]
    broker: BrokerArgs,
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Images to acquire and write.
    #[arg(long, default_value_t = 1000)]
    images: u64,
    /// Frame rate of the simulated detector in Hz (0 = as fast as possible).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// The HDF5 file to write (must not exist yet).
    #[arg(long, default_value = "std-daq-demo.h5")]
    output: PathBuf,
    /// JUNGFRAU modules (1024x512 each, stacked vertically).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=32))]
    modules: u16,
    /// First UDP port; module m listens on port + m.
    #[arg(long, default_value_t = 50020)]
    port: u16,
    /// Packets the simulator leaves out: frame:module:packet,... (packet `*` = whole module frame).
    #[arg(long, default_value = "")]
    drop: String,
    /// Send with UDP GSO (for rates above ~1 GB/s).
    #[arg(long)]
    gso: bool,
    /// Slots per module FrameBuffer.
    #[arg(long, default_value_t = 256)]
    module_buffer_slots: u32,
    /// Size of the ImageBuffer in GiB.
    #[arg(long, default_value_t = 0.5)]
    ram_buffer_gb: f64,
    /// Keep the work folder (config, service logs) after a successful run.
    #[arg(long)]
    keep_logs: bool,
    /// std-h5-writer processes sharing the run (config key number_of_writers). With more than
    /// one, each writes its own <output stem>_writer<k>.h5 and --output is the master file whose
    /// datasets are virtual datasets over them, in image order.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    writers: u32,
    /// Worker threads converting each image in the assembler, in runs of rows (config key
    /// assembler_threads; default: one per module, at most the cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    assembler_threads: Option<u32>,
    /// The services serve Prometheus metrics from this port on 127.0.0.1 (config key
    /// metrics_base_address; the assembler here, receiver m at + 10 + m, ...), and the file gets
    /// every service's counters for the run (its run_counters attribute). 0 = off.
    #[arg(long, default_value_t = 50300)]
    metrics_port: u16,
}

fn main() -> Result<()> {
    let command = Cli::parse().command;
    // The preview is a service of its own: it logs at the config's log_level (set up once it has
    // read the config); the other commands at info.
    if !matches!(command, Cmd::Preview(_)) {
        std_daq_common::service::init_logging("info");
    }
    match command {
        Cmd::Demo(args) => demo(args),
        Cmd::Write(args) => write(args),
        Cmd::Up(args) => up(args),
        Cmd::Status(args) => status(args),
        Cmd::Preview(args) => preview(args),
        Cmd::Api(args) => api(args),
        Cmd::Pedestal(args) => pedestal(args),
        Cmd::Verify(args) => verify(args),
        Cmd::PedestalAgent(args) => pedestal_agent(args),
        Cmd::Kill(args) => {
            std_writer_agent::client::kill_blocking(&args.broker.options(), &args.request_id)?;
            println!("kill sent for request {}", args.request_id);
            Ok(())
        }
    }
}

fn verify(args: VerifyArgs) -> Result<()> {
    let mut failed = 0usize;
    for file in &args.files {
        let report = h5_writer::verify::verify_file(file)?;
        for m in &report.mismatches {
            eprintln!(
                "{}: image {} (image_id {}): checksum mismatch: stored {:#018x}, pixels give {:#018x}",
                file.display(),
                m.index,
                m.image_id,
                m.stored,
                m.computed
            );
        }
        for u in &report.unreadable {
            eprintln!(
                "{}: image {} (image_id {}): unreadable: {}",
                file.display(),
                u.index,
                u.image_id,
                u.error
            );
        }
        println!("{}", serde_json::to_string(&report)?);
        failed += usize::from(!report.ok());
    }
    if failed > 0 {
        bail!("{failed} of {} files failed verification", args.files.len());
    }
    Ok(())
}

fn up(args: UpArgs) -> Result<()> {
    use std_daq::supervisor::{self, UpOptions};
    let cfg = std_daq_common::DetectorConfig::from_file(&args.config)?;
    if args.pedestal_agent
        && !matches!(
            cfg.detector_type,
            std_daq_common::DetectorType::JungfrauRaw
                | std_daq_common::DetectorType::JungfrauConverted
        )
    {
        bail!("--pedestal-agent needs a JUNGFRAU config (detector_type jungfrau-raw or jungfrau-converted)");
    }
    // Each child logs the config's notices itself, once.
    let config = std::path::absolute(&args.config).context("resolving --config")?;
    let opts = UpOptions {
        agent_output_root: args.agent_output_root,
        stream_target: args.stream_target,
        pedestal_agent: args.pedestal_agent,
    };
    let specs = supervisor::services_for(&cfg, &config, &opts);
    let bin_dir = default_bin_dir()?;
    let watch = args.watch_config.then(|| supervisor::ConfigWatch {
        bin_dir: bin_dir.clone(),
        redis: std_daq_common::status::RedisEnv::from_env(),
        applied_path: args.applied_config.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("std-daq-up.{}.config.json", cfg.detector_name))
        }),
        config_path: config.clone(),
        opts: opts.clone(),
    });
    let shutdown = std_daq_common::service::Shutdown::on_signals()?;
    tracing::info!(
        detector = cfg.detector_name,
        services = specs.len(),
        "starting"
    );
    let report = supervisor::run_watching(&bin_dir, &cfg, specs, &shutdown, watch.as_ref())?;
    for (service, n) in &report.restarts {
        tracing::info!(service, restarts = n, "was restarted");
    }
    for path in &report.cleaned {
        tracing::info!(path = %path.display(), "removed what a killed service left behind");
    }
    if !report.failed.is_empty() {
        bail!("services did not stop cleanly: {:?}", report.failed);
    }
    tracing::info!("all services stopped");
    Ok(())
}

fn api(args: ApiArgs) -> Result<()> {
    let detector = match &args.config {
        Some(path) => Some(std_daq_common::DetectorConfig::from_file(path)?),
        None => None,
    };
    if args.live_fps.is_nan() || args.live_fps <= 0.0 || args.live_fps > std_daq::live::MAX_FPS {
        bail!(
            "--live-fps {}: use a rate above 0 and at most {}",
            args.live_fps,
            std_daq::live::MAX_FPS
        );
    }
    let config_json = detector.as_ref().map(|d| d.raw.clone());
    let agent_source = args.agent_service_name.clone().unwrap_or_else(|| {
        detector.as_ref().map_or_else(
            || format!("{}.writer_agent", args.broker.tag),
            |d| format!("{}.writer_agent", d.detector_name),
        )
    });
    let server = tiny_http::Server::http(&args.listen)
        .map_err(|e| anyhow::anyhow!("serving HTTP on {}: {e}", args.listen))?;
    tracing::info!(
        listen = args.listen,
        tag = args.broker.tag,
        "HTTP API ready (status page at /, docs at /docs)"
    );
    std_daq::api::serve(
        server,
        std_daq::api::ApiSettings {
            client: args.broker.options(),
            redis_url: args.redis_url,
            config_json,
            live: std_daq::live::LiveSettings {
                detector,
                fps: args.live_fps,
                max_viewers: args.live_max_viewers,
            },
            agent_source,
        },
    )
}

fn pedestal(args: PedestalArgs) -> Result<()> {
    use std_daq::pedestal::{self, PedestalOptions};
    if let Some(broker) = &args.broker {
        return pedestal_request(broker, &args);
    }
    let Some(config) = &args.config else {
        bail!("--config is needed (or --broker to send the run to a pedestal service)");
    };
    let cfg = std_daq_common::DetectorConfig::from_file(config)?;
    let output = match (&args.output, &cfg.calibration_file) {
        (Some(o), _) => o.clone(),
        (None, Some(c)) => c.clone(),
        (None, None) => bail!("--output is needed: the config has no calibration_file"),
    };
    if !(args.timeout_s > 0.0 && args.timeout_s.is_finite()) {
        bail!("--timeout-s must be a positive number of seconds");
    }
    let opts = PedestalOptions {
        settings: assembler::pedestal::PedestalSettings {
            frames_per_stage: args.frames,
            min_fraction: args.min_fraction,
            min_rms: args.min_rms,
            max_rms_factor: args.max_rms_factor,
        },
        gain_file: args.gain_file,
        output,
        timeout: Duration::from_secs_f64(args.timeout_s),
    };
    let shutdown = std_daq_common::service::Shutdown::on_signals()?;
    let report = pedestal::run(
        &cfg,
        &opts,
        &|| shutdown.is_triggered(),
        &mut || {
            eprintln!(
                "ready: following {}",
                std_daq_common::names::image_endpoint(&cfg)
            )
        },
        &mut |p| tracing::debug!(frames = ?p.frames, "pedestal progress"),
    )?;
    tracing::info!(
        output = %report.output.display(),
        calibration_id = report.calibration_id,
        pixels_masked = report.pixels_masked,
        "calibration written"
    );
    println!("{}", report.to_json());
    Ok(())
}

/// `std-daq pedestal --broker`: the run as a request to `std-daq pedestal-agent`.
fn pedestal_request(broker: &str, args: &PedestalArgs) -> Result<()> {
    use std_writer_agent::client::{self, BlockingError, ClientError, ClientOptions};
    let tag = match (&args.tag, &args.config) {
        (Some(t), _) => t.clone(),
        (None, Some(c)) => std_daq::pedestal_agent::default_tag(
            &std_daq_common::DetectorConfig::from_file(c)?.detector_name,
        ),
        (None, None) => bail!("--tag or --config is needed with --broker"),
    };
    let gain_file = std::path::absolute(&args.gain_file).context("resolving --gain-file")?;
    let mut body = serde_json::json!({
        "gain_file": gain_file.display().to_string(),
        "frames_per_stage": args.frames,
        "min_fraction": args.min_fraction,
        "min_rms": args.min_rms,
        "max_rms_factor": args.max_rms_factor,
        "timeout_s": args.timeout_s,
    });
    if let Some(o) = &args.output {
        let o = std::path::absolute(o).context("resolving --output")?;
        body["output"] = o.display().to_string().into();
    }
    let opts = ClientOptions {
        broker_url: broker.into(),
        tag: tag.clone(),
        // The service reports about once a second while a run goes on.
        idle_timeout: Duration::from_secs(60),
    };
    let request_id = client::new_request_id();
    eprintln!("request {request_id} to the pedestal service on tag {tag}");
    let result = client::send_request_blocking(&opts, &request_id, &body, |s| {
        let progress = s.body.get("progress").is_some();
        if s.body["state"] == "running" && !progress {
            eprintln!("ready: {}", s.message);
        } else if progress {
            tracing::debug!("{}", s.message);
        } else {
            eprintln!("{}: {}", s.action, s.message);
        }
    });
    match result {
        Ok(done) => {
            println!("{}", done.message);
            Ok(())
        }
        Err(BlockingError::Client(ClientError::Failed(st))) => {
            bail!("request {request_id} failed: {}", st.message)
        }
        Err(e) => bail!("request {request_id}: {e}"),
    }
}

fn pedestal_agent(args: PedestalAgentArgs) -> Result<()> {
    use std_daq::pedestal_agent::{PedestalAgent, PedestalAgentSettings};
    let cfg = std_daq_common::DetectorConfig::from_file(&args.config)?;
    std_daq_common::service::warn_notices(&cfg);
    let mut settings = PedestalAgentSettings::new(&args.broker, &cfg);
    if let Some(tag) = args.tag {
        settings.tag = tag;
    }
    if let Some(name) = args.service_name {
        settings.service_name = name;
    }
    let agent = PedestalAgent::new(settings, cfg.clone())?;
    let redis = std_daq_common::status::RedisEnv::from_env();
    let _status = std_daq_common::status::StatusReporter::start(
        &redis,
        &format!("std-daq.{}.pedestal-agent", cfg.detector_name),
        &cfg,
        agent.board(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = agent.shutdown_handle();
        tokio::spawn(async move {
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
            shutdown.trigger();
        });
        agent.run().await
    })?;
    Ok(())
}

fn preview(args: PreviewArgs) -> Result<()> {
    use std_daq_common::names;
    std_daq::preview::check_endpoint(&args.bind)?;
    let cfg = std_daq_common::DetectorConfig::from_file(&args.config)?;
    std_daq_common::service::init_logging(&cfg.log_level);
    std_daq_common::service::warn_notices(&cfg);
    let shutdown = std_daq_common::service::Shutdown::on_signals()?;
    let ctx = zmq::Context::new();
    let images = ctx.socket(zmq::SUB)?;
    images.set_subscribe(b"")?;
    images.connect(&names::image_endpoint(&cfg))?;
    let publisher = ctx.socket(zmq::XPUB)?;
    publisher.set_sndhwm(args.hwm)?;
    publisher.set_linger(0)?;
    publisher
        .bind(&args.bind)
        .with_context(|| format!("binding {}", args.bind))?;
    let name = names::image_buffer_name(&cfg.detector_name);
    let ring = image_buffer::RingReader::attach_for_service(
        &name,
        image_buffer::Expect::default(),
        "std-assembler's ImageBuffer",
        Duration::from_secs(10),
        || shutdown.is_triggered(),
    )
    .with_context(|| format!("attaching ImageBuffer {name}"))?;
    // One status hash per preview stream, named after where it is bound.
    let endpoint: String = args
        .bind
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let status_name = format!("std-daq.{}.preview.{endpoint}", cfg.detector_name);
    let board = std_daq_common::status::StatusBoard::default();
    board.set("bind", &args.bind);
    std_daq_common::metrics::serve_if(args.metrics_addr, &status_name, &board, Vec::new())
        .context("starting the metrics server")?;
    let redis = std_daq_common::status::RedisEnv::from_env();
    let _status =
        std_daq_common::status::StatusReporter::start(&redis, &status_name, &cfg, board.clone());
    tracing::info!(bind = args.bind, mode = ?args.mode, "preview ready");
    let stats = std_daq::preview::run(&ring, &images, &publisher, args.mode, &board, &shutdown)?;
    tracing::info!(?stats, "preview stopped");
    Ok(())
}

fn status(args: StatusArgs) -> Result<()> {
    let url = format!("redis://{}:{}/", args.redis_host, args.redis_port);
    let mut con = redis::Client::open(url.as_str())?
        .get_connection_with_timeout(Duration::from_secs(2))
        .with_context(|| format!("connecting to Redis at {url}"))?;
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("status.*").query(&mut con)?;
    keys.retain(|k| k.contains(&args.filter));
    keys.sort();
    if keys.is_empty() {
        println!("no service reports a status in Redis at {url}");
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    const SKIP: [&str; 5] = [
        "service_name",
        "config",
        "start_timestamp",
        "updated_timestamp",
        "metrics_address",
    ];
    for key in keys {
        let fields: std::collections::BTreeMap<String, String> =
            redis::cmd("HGETALL").arg(&key).query(&mut con)?;
        let started: f64 = fields
            .get("start_timestamp")
            .and_then(|t| t.parse().ok())
            .unwrap_or(now);
        let counters: Vec<String> = fields
            .iter()
            .filter(|(k, _)| !SKIP.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let metrics = fields
            .get("metrics_address")
            .map_or("metrics off".to_string(), |a| {
                format!("metrics http://{a}/metrics")
            });
        println!(
            "{:<44} up {:>8.0} s  {metrics}  {}",
            key.trim_start_matches("status."),
            now - started,
            counters.join(" ")
        );
    }
    Ok(())
}

fn write(args: WriteArgs) -> Result<()> {
    use std::io::Write as _;
    let request_id = std_writer_agent::client::new_request_id();
    let request = serde_json::json!({
        "output_file": args.output.display().to_string(),
        "n_images": args.n_images,
    });
    match args.n_images {
        Some(n) => println!(
            "request {request_id}: {n} images into {}",
            args.output.display()
        ),
        None => println!(
            "request {request_id}: images into {} until `std-daq kill {request_id}` (unbounded)",
            args.output.display()
        ),
    }
    let mut progress = |status: &std_writer_agent::protocol::StatusMessage| {
        let written = status.body["images_written"].as_u64().unwrap_or(0);
        match args.n_images {
            Some(n) => {
                let filled = (40 * written.min(n) / n) as usize;
                eprint!(
                    "\r[{}{}] {written}/{n} images ({})",
                    "=".repeat(filled),
                    " ".repeat(40 - filled),
                    status.action
                );
            }
            // No total to show a bar against.
            None => eprint!("\r{written} images ({})", status.action),
        }
        let _ = std::io::stderr().flush();
    };
    let result = std_writer_agent::client::send_request_blocking(
        &args.broker.options(),
        &request_id,
        &request,
        &mut progress,
    );
    eprintln!();
    match result {
        Ok(done) => {
            println!("request {request_id} succeeded: {}", done.message);
            Ok(())
        }
        Err(e) => bail!("request {request_id} failed: {e}"),
    }
}

/// `first .. last` as plain numbers, or `none` when no image was written.
fn image_id_range(first: Option<u64>, last: Option<u64>) -> String {
    match (first, last) {
        (Some(first), Some(last)) => format!("{first} .. {last}"),
        (Some(id), None) | (None, Some(id)) => id.to_string(),
        (None, None) => "none (no image written)".into(),
    }
}

fn demo(args: DemoArgs) -> Result<()> {
    let output = std::path::absolute(&args.output).context("resolving --output")?;
    if output.exists() {
        bail!(
            "{} already exists: choose another --output or remove it",
            output.display()
        );
    }
    let work_dir = std::env::temp_dir().join(format!("std-daq-demo.{}", std::process::id()));
    let opts = PipelineOptions {
        bin_dir: default_bin_dir()?,
        work_dir: work_dir.clone(),
        detector_name: format!("demo{}", std::process::id()),
        n_modules: args.modules,
        start_udp_port: args.port,
        module_buffer_slots: args.module_buffer_slots,
        ram_buffer_gb: args.ram_buffer_gb,
        log_level: "info".into(),
        extra_config: std::iter::once(("number_of_writers".to_string(), args.writers.into()))
            .chain(
                args.assembler_threads
                    .map(|t| ("assembler_threads".to_string(), t.into())),
            )
            .chain((args.metrics_port != 0).then(|| {
                (
                    "metrics_base_address".to_string(),
                    format!("127.0.0.1:{}", args.metrics_port).into(),
                )
            }))
            .collect(),
    };
    println!(
        "std-daq demo: starting {} receiver{}, the assembler and {} (logs in {})",
        args.modules,
        if args.modules == 1 { "" } else { "s" },
        if args.writers == 1 {
            "the writer".to_string()
        } else {
            format!("{} writers", args.writers)
        },
        work_dir.display()
    );
    let t0 = Instant::now();
    let mut pipeline = Pipeline::start(opts, Duration::from_secs(60))?;
    let ready = t0.elapsed();
    pipeline.start_run(&output, args.images)?;
    println!(
        "std-daq demo: sending {} frames at {} Hz",
        args.images, args.rate
    );
    let sim = pipeline.run_simulator(args.images, args.rate, &args.drop, args.gso)?;
    let run = pipeline.wait_run(Duration::from_secs(5))?;
    let stop = pipeline.stop()?;

    let image_mb = f64::from(args.modules) * 1024.0 * 1024.0 / 1e6;
    let sim_secs = sim.seconds.max(1e-9);
    println!();
    println!("std-daq demo summary");
    println!("  file:               {}", output.display());
    if args.writers > 1 {
        let files: Vec<String> = (0..args.writers)
            .map(|k| {
                std_daq_common::writer_command::writer_data_file(&output, k)
                    .display()
                    .to_string()
            })
            .collect();
        println!(
            "  writers' files:     {} (the file above is their master)",
            files.join(", ")
        );
    }
    println!("  images requested:   {}", args.images);
    println!(
        "  images written:     {} (good {}, flagged {})",
        run.images_written, run.images_good, run.images_flagged
    );
    println!(
        "  image ids:          {}",
        image_id_range(run.first_image_id, run.last_image_id)
    );
    println!(
        "  packets sent:       {} ({} left out on purpose)",
        sim.packets_sent, sim.packets_dropped
    );
    println!(
        "  packets lost:       {} (missing in written images)",
        run.missing_packets
    );
    println!("  images lost in shm: {}", run.images_lost_in_buffer);
    println!(
        "  detector rate:      {:.1} frames/s, {:.1} MB/s sent",
        sim.frames as f64 / sim_secs,
        sim.bytes_sent as f64 / sim_secs / 1e6
    );
    if run.seconds > 0.0 {
        println!(
            "  written:            {:.1} images/s, {:.1} MB/s over {:.2} s",
            run.images_written as f64 / run.seconds,
            run.images_written as f64 * image_mb / run.seconds,
            run.seconds
        );
    }
    if let Ok(c) = h5_writer::counters::root_json_attr(&output, "run_counters") {
        println!("  run counters:       {}", h5_writer::counters::summary(&c));
    }
    println!("  start-up:           {:.2} s", ready.as_secs_f64());
    println!("  run ended:          {}", run.end);

    let mut problems = Vec::new();
    if !stop.failed.is_empty() {
        problems.push(format!(
            "services that did not exit cleanly: {:?}",
            stop.failed
        ));
    }
    if !stop.leftovers.is_empty() {
        problems.push(format!("left behind: {:?}", stop.leftovers));
    }
    if run.images_written != args.images {
        problems.push(format!(
            "only {} of {} images were written",
            run.images_written, args.images
        ));
    }
    if problems.is_empty() {
        if !args.keep_logs {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
        println!("  clean shutdown:     yes (no processes, shm segments or ipc files left)");
        Ok(())
    } else {
        bail!(
            "{}\n(service logs kept in {})",
            problems.join("\n"),
            work_dir.display()
        )
    }
}
