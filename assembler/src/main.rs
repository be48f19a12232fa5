//! std-assembler: synchronises module frames and assembles images into the ImageBuffer.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use assembler::pixels::ModulePixels;
use assembler::service::{self, Assembler};
use clap::Parser;
use image_buffer::{Expect, RingOwner, RingReader};
use std::path::PathBuf;
use std::time::Duration;
use std_daq_common::service::{init_logging, warn_notices, Shutdown};
use std_daq_common::status::{load_config, RedisEnv, StatusBoard, StatusReporter};
use std_daq_common::{names, ImageMetadata, MetricsService, ModuleFrame};

/// Synchronises the frames of all modules by image_id, places each module into the ImageBuffer
/// (/dev/shm/std-daq.<detector>.image) at its module_positions place (with chip gaps when
/// `chip_gaps` is set; jungfrau-converted: float32 keV or photon counts from `calibration_file`,
/// see docs/calibration.md; a replaced calibration file is taken without restart, between two
/// images, and each image's ImageMetadata.calibration_id says which converted it), and publishes ImageMetadata
/// (status computed from all modules) on ipc://<ipc_dir>/std-daq-<detector>-image. Waits for every
/// receiver's FrameBuffer to exist before it starts. Stops on SIGINT/SIGTERM after emitting every
/// pending image.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Detector config file (std_daq JSON). Without it the config is read from Redis key
    /// config.<SERVICE_NAME>.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9100. Overrides
    /// the config key `metrics_base_address` (the assembler's port is base + 0).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Threads that place and convert each image (and hash it), in runs of image rows across
    /// all modules: the service loop's own thread and N - 1 worker threads; 1 = the service
    /// loop does it alone. Overrides the config key
    /// `assembler_threads`; without either, one per module up to the cores this process may use.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(std_daq_common::config::MAX_ASSEMBLER_THREADS)))]
    threads: Option<u32>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let redis = RedisEnv::from_env();
    let cfg = load_config(args.config.as_deref(), &redis)?;
    init_logging(&cfg.log_level);
    warn_notices(&cfg);
    let shutdown = Shutdown::on_signals().context("installing signal handlers")?;
    // Before waiting for receivers: a bad calibration file fails the start at once.
    let pixels = ModulePixels::from_config(&cfg)?;
    if let Some(file) = &cfg.calibration_file {
        tracing::info!(
            calibration = %file.display(),
            calibration_id = pixels.calibration_id(),
            "calibration loaded"
        );
    }

    let ctx = zmq::Context::new();
    let pull = ctx.socket(zmq::PULL)?;
    pull.set_rcvhwm(100_000)?;
    let sync = names::sync_endpoint(&cfg);
    pull.bind(&sync)
        .with_context(|| format!("binding {sync}"))?;
    let publisher = ctx.socket(zmq::PUB)?;
    publisher.set_sndhwm(100_000)?;
    publisher.set_linger(1000)?;
    let image_endpoint = names::image_endpoint(&cfg);
    publisher
        .bind(&image_endpoint)
        .with_context(|| format!("binding {image_endpoint}"))?;

    let image_name = names::image_buffer_name(&cfg.detector_name);
    let image_ring: RingOwner<ImageMetadata> = RingOwner::create(
        &image_name,
        cfg.image_buffer_slots(),
        cfg.image_bytes() as u64,
    )
    .with_context(|| format!("creating ImageBuffer {image_name}"))?;

    let mut module_rings = Vec::new();
    for m in 0..cfg.n_modules {
        let name = names::module_buffer_name(&cfg.detector_name, m);
        let expect = Expect {
            n_slots: Some(u64::from(cfg.module_buffer_slots)),
            slot_bytes: Some(cfg.module_frame_bytes() as u64),
        };
        let ring: RingReader<ModuleFrame> = RingReader::attach_for_service(
            &name,
            expect,
            &format!("the receiver of module {m}"),
            Duration::from_secs(10),
            || shutdown.is_triggered(),
        )
        .with_context(|| format!("attaching FrameBuffer {name}"))?;
        module_rings.push(ring);
    }
    tracing::info!(
        modules = cfg.n_modules,
        image_buffer = %image_ring.path().display(),
        slots = image_ring.n_slots(),
        %sync,
        publish = %image_endpoint,
        "assembling"
    );
    let threads = args
        .threads
        .unwrap_or_else(|| cfg.assembler_threads_or_default());
    let mut assembler = Assembler::with_pixels(&cfg, pixels, module_rings, image_ring)
        .with_threads(threads)
        .context("starting the assembler worker threads")?;
    tracing::info!(
        requested = threads,
        threads = assembler.threads(),
        "assembler threads (at most one per module; 1 = no worker threads)"
    );
    // Hot swap: a replaced calibration_file is loaded off the hot path, taken between images.
    assembler
        .watch_calibration(&cfg)
        .context("starting the calibration file watcher")?;
    let board = StatusBoard::default();
    std_daq_common::metrics::serve_if(
        args.metrics_addr
            .or(cfg.metrics_addr(MetricsService::Assembler)),
        &format!("std-daq.{}.assembler", cfg.detector_name),
        &board,
        vec![assembler.latency.clone()],
    )
    .context("starting the metrics server")?;
    let _status = StatusReporter::start(
        &redis,
        &format!("std-daq.{}.assembler", cfg.detector_name),
        &cfg,
        board.clone(),
    );
    service::run(
        &mut assembler,
        &pull,
        &publisher,
        Duration::from_secs_f64(cfg.stats_collection_period),
        &board,
        &shutdown,
    )?;
    drop((pull, publisher));
    names::remove_ipc_file(&sync);
    names::remove_ipc_file(&image_endpoint);
    Ok(())
}
