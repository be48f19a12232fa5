//! std-stream-send: replicates this host's ImageBuffer and ImageMetadata stream to a
//! `std-stream-recv` on another host.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::Parser;
use image_buffer::{Expect, RingReader};
use std::io::Write;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use std_daq_common::service::{init_logging, warn_notices, Shutdown};
use std_daq_common::status::{RedisEnv, StatusBoard, StatusReporter};
use std_daq_common::{names, DetectorConfig, ImageMetadata, MetricsService};
use stream_send::sender::{self, SenderOptions};

/// Follows the assembler's ImageMetadata stream (ipc://<ipc_dir>/std-daq-<detector>-image) and
/// sends each image's metadata and bytes, read straight from the ImageBuffer
/// (/dev/shm/std-daq.<detector>.image), over TCP to std-stream-recv. Nothing is dropped
/// silently: images the receiver confirms as lost (overwritten here before they could be sent)
/// are published with status 4 (lost_in_buffer) on
/// ipc://<ipc_dir>/std-daq-<detector>-stream-send-lost. Reconnects after a network outage.
/// On SIGINT/SIGTERM it stops following the stream and waits for the receiver to confirm what is
/// queued (see --drain-timeout).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Detector config file (std_daq JSON).
    #[arg(long)]
    config: PathBuf,
    /// Where std-stream-recv listens (host:port).
    #[arg(long)]
    target: String,
    /// Parallel TCP connections.
    #[arg(long, default_value_t = 1)]
    connections: u16,
    /// Parts each image is split into; each part travels on its own connection in turn
    /// (1 = whole images spread over the connections by stream position).
    #[arg(long, default_value_t = 1)]
    parts: u16,
    /// Seconds without acknowledgement before the link counts as down and is reconnected.
    #[arg(long, default_value_t = 2.0)]
    link_timeout: f64,
    /// Seconds to wait at shutdown for the receiver to confirm every queued image.
    #[arg(long, default_value_t = 10.0)]
    drain_timeout: f64,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9103. Overrides
    /// the config key `metrics_base_address` (this service's port is base + 3).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = DetectorConfig::from_file(&args.config)?;
    init_logging(&cfg.log_level);
    warn_notices(&cfg);
    let shutdown = Shutdown::on_signals().context("installing signal handlers")?;
    let target = args
        .target
        .to_socket_addrs()
        .with_context(|| format!("resolving --target {}", args.target))?
        .next()
        .with_context(|| format!("--target {} resolves to no address", args.target))?;

    let ctx = zmq::Context::new();
    let sub = ctx.socket(zmq::SUB)?;
    sub.set_rcvhwm(1_000_000)?;
    sub.set_subscribe(b"")?;
    let image_endpoint = names::image_endpoint(&cfg);
    sub.connect(&image_endpoint)
        .with_context(|| format!("connecting {image_endpoint}"))?;
    let lost = ctx.socket(zmq::PUB)?;
    let lost_endpoint = names::stream_send_lost_endpoint(&cfg);
    lost.bind(&lost_endpoint)
        .with_context(|| format!("binding {lost_endpoint}"))?;

    let name = names::image_buffer_name(&cfg.detector_name);
    let expect = Expect {
        n_slots: Some(cfg.image_buffer_slots()),
        slot_bytes: Some(cfg.image_bytes() as u64),
    };
    let ring: RingReader<ImageMetadata> = RingReader::attach_for_service(
        &name,
        expect,
        "std-assembler's ImageBuffer",
        Duration::from_secs(10),
        || shutdown.is_triggered(),
    )
    .with_context(|| format!("attaching ImageBuffer {name}"))?;
    // Counters in the Redis hash status.std-daq.<detector>.stream-send and on /metrics.
    let service = format!("std-daq.{}.stream-send", cfg.detector_name);
    let status = StatusBoard::default();
    status.set("target", target);
    std_daq_common::metrics::serve_if(
        args.metrics_addr
            .or(cfg.metrics_addr(MetricsService::StreamSend)),
        &service,
        &status,
        Vec::new(),
    )
    .context("starting the metrics server")?;
    let _reporter = StatusReporter::start(&RedisEnv::from_env(), &service, &cfg, status.clone());
    let opts = SenderOptions {
        target,
        connections: args.connections,
        parts: args.parts,
        image_bytes: cfg.image_bytes() as u64,
        height: cfg.image_pixel_height,
        width: cfg.image_pixel_width,
        dtype: cfg.image_dtype() as u16,
        link_timeout: Duration::from_secs_f64(args.link_timeout),
        stats_period: Duration::from_secs_f64(cfg.stats_collection_period),
        drain_timeout: Duration::from_secs_f64(args.drain_timeout),
        status,
    };
    tracing::info!(%target, connections = opts.connections, parts = opts.parts, "replicating");
    let stats = sender::run(&opts, &sub, Arc::new(ring), Some(&lost), &shutdown)?;
    // Best effort: a closed stdout must not turn a clean stop into a panic.
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        serde_json::json!({
            "queued": stats.images_queued,
            "delivered": stats.images_delivered,
            "lost": stats.images_lost,
            "unconfirmed": stats.images_unconfirmed,
            "sessions": stats.sessions,
            "receiver_checksum_errors": stats.receiver_checksum_errors,
            "images_without_checksum": stats.images_without_checksum,
            "bytes_sent": stats.bytes_sent,
        })
    );
    drop((sub, lost));
    names::remove_ipc_file(&lost_endpoint);
    Ok(())
}
