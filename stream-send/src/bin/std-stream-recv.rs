//! std-stream-recv: receives a replicated detector stream into this host's ImageBuffer.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::Parser;
use image_buffer::RingOwner;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;
use std_daq_common::service::{init_logging, warn_notices, Shutdown};
use std_daq_common::status::{RedisEnv, StatusBoard, StatusReporter};
use std_daq_common::{names, DetectorConfig, ImageMetadata, MetricsService};
use stream_send::receiver::{self, ReceiverOptions};

/// Accepts std-stream-send's connections, writes every image into this host's ImageBuffer
/// (/dev/shm/std-daq.<detector>.image, created here with the same layout as the assembler's) and
/// publishes the identical ImageMetadata on ipc://<ipc_dir>/std-daq-<detector>-image, so a writer
/// on this host works unchanged. Takes the assembler's place: do not run an assembler for the
/// same detector on this host. Images whose checksum fails, or that the sender lost, are
/// published with status 4 (lost_in_buffer) and zero pixels. Stops on SIGINT/SIGTERM.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Detector config file (std_daq JSON); must describe the same images as the sender's.
    #[arg(long)]
    config: PathBuf,
    /// Address to listen on for std-stream-send (host:port).
    #[arg(long)]
    listen: String,
    /// Seconds without any frame on a connection before the session is dropped (the sender
    /// reconnects).
    #[arg(long, default_value_t = 2.0)]
    link_timeout: f64,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9104. Overrides
    /// the config key `metrics_base_address` (this service's port is base + 4).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = DetectorConfig::from_file(&args.config)?;
    init_logging(&cfg.log_level);
    warn_notices(&cfg);
    let shutdown = Shutdown::on_signals().context("installing signal handlers")?;
    let listener =
        TcpListener::bind(&args.listen).with_context(|| format!("listening on {}", args.listen))?;

    let ctx = zmq::Context::new();
    let publisher = ctx.socket(zmq::PUB)?;
    publisher.set_sndhwm(100_000)?;
    publisher.set_linger(1000)?;
    let image_endpoint = names::image_endpoint(&cfg);
    publisher
        .bind(&image_endpoint)
        .with_context(|| format!("binding {image_endpoint}"))?;
    let name = names::image_buffer_name(&cfg.detector_name);
    let ring = RingOwner::<ImageMetadata>::create(
        &name,
        cfg.image_buffer_slots(),
        cfg.image_bytes() as u64,
    )
    .with_context(|| format!("creating ImageBuffer {name}"))?
    .into_shared();
    // Counters in the Redis hash status.std-daq.<detector>.stream-recv and on /metrics.
    let service = format!("std-daq.{}.stream-recv", cfg.detector_name);
    let status = StatusBoard::default();
    status.set("listen", &args.listen);
    std_daq_common::metrics::serve_if(
        args.metrics_addr
            .or(cfg.metrics_addr(MetricsService::StreamRecv)),
        &service,
        &status,
        Vec::new(),
    )
    .context("starting the metrics server")?;
    let _reporter = StatusReporter::start(&RedisEnv::from_env(), &service, &cfg, status.clone());
    let opts = ReceiverOptions {
        image_bytes: cfg.image_bytes() as u64,
        height: cfg.image_pixel_height,
        width: cfg.image_pixel_width,
        dtype: cfg.image_dtype() as u16,
        link_timeout: Duration::from_secs_f64(args.link_timeout),
        stats_period: Duration::from_secs_f64(cfg.stats_collection_period),
        status,
    };
    tracing::info!(listen = %args.listen, publish = %image_endpoint, "receiving");
    let stats = receiver::run(listener, &ring, &publisher, &opts, &shutdown)?;
    // Best effort: a closed stdout must not turn a clean stop into a panic.
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        serde_json::json!({
            "delivered": stats.images_delivered,
            "lost": stats.images_lost,
            "checksum_errors": stats.checksum_errors,
            "protocol_errors": stats.protocol_errors,
            "sessions": stats.sessions,
            "bytes_received": stats.bytes_received,
        })
    );
    drop(publisher);
    names::remove_ipc_file(&image_endpoint);
    Ok(())
}
