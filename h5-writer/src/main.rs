//! std-h5-writer: writes images from the ImageBuffer into HDF5 files on command.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::Parser;
use h5_writer::file::Compression;
use h5_writer::service::{self, Writer};
use image_buffer::{Expect, RingReader};
use std::path::PathBuf;
use std::time::Duration;
use std_daq_common::service::{init_logging, warn_notices, Shutdown};
use std_daq_common::status::{load_config, RedisEnv, StatusBoard, StatusReporter};
use std_daq_common::{names, ImageCompression, ImageMetadata, MetricsService};

/// Follows std-assembler's ImageMetadata stream and, on a start command, writes the next
/// n_images images into an HDF5 file (/<detector_name>/data [n, H, W] by direct chunk writes
/// from the ImageBuffer, plus image_id, status and missing_packets). Commands are JSON on the
/// REP socket ipc://<ipc_dir>/std-daq-<detector>-writer:
/// {"command":"start","output_file":"/abs/file.h5","n_images":N}, {"command":"stop"},
/// {"command":"status"}. Without n_images (or null) the run is unbounded: every image until
/// "stop" (optional "max_images": M ends it after M). Stops on SIGINT/SIGTERM, closing an open
/// file with what it holds.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Detector config file (std_daq JSON). Without it the config is read from Redis key
    /// config.<SERVICE_NAME>.
    #[arg(long)]
    config: Option<PathBuf>,
    /// How image chunks are stored: `none`, or `bitshuffle-lz4` (HDF5 filter 32008, compressed
    /// by the writer; readers need the bitshuffle plugin, e.g. Debian's `bitshuffle` package or
    /// Python's hdf5plugin). Overrides the config key `compression` (default `none`).
    #[arg(long, value_parser = ["none", "bitshuffle-lz4"])]
    compression: Option<String>,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9101. Overrides
    /// the config key `metrics_base_address` (the writer's port is base + 1).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Make the file being written crash-consistent at most this often (milliseconds; also
    /// whenever the image stream pauses): if the writer dies, its `<file>.part` holds exactly the
    /// `images_checkpointed` the status last reported (SWMR readers open it as it is, every
    /// reader once the restarted writer cleared its flags). SWMR readers of the `.part`
    /// (h5py swmr=True) see the file grow checkpoint by checkpoint.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    checkpoint_interval_ms: u64,
    /// Which of the config's `number_of_writers` writers this is (0-based). Writer K > 0 takes
    /// its commands at `ipc://<ipc_dir>/std-daq-<detector>-writer-K` and reports to Redis as
    /// `std-daq.<detector>.h5-writer-K`; writer 0 is named as a single writer is.
    #[arg(long, default_value_t = 0)]
    writer_index: u32,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let redis = RedisEnv::from_env();
    let cfg = load_config(args.config.as_deref(), &redis)?;
    init_logging(&cfg.log_level);
    warn_notices(&cfg);
    let writer_index = args.writer_index;
    if writer_index >= cfg.number_of_writers {
        anyhow::bail!(
            "--writer-index {writer_index} is not below the config's number_of_writers ({}): \
             writers are numbered 0..{}",
            cfg.number_of_writers,
            cfg.number_of_writers
        );
    }
    // Writer 0 keeps the single writer's names, so one-writer setups are unchanged.
    let service_name = match writer_index {
        0 => format!("std-daq.{}.h5-writer", cfg.detector_name),
        k => format!("std-daq.{}.h5-writer-{k}", cfg.detector_name),
    };
    let shutdown = Shutdown::on_signals().context("installing signal handlers")?;

    let ctx = zmq::Context::new();
    let sub = ctx.socket(zmq::SUB)?;
    sub.set_rcvhwm(100_000)?;
    sub.set_subscribe(b"")?;
    let image_endpoint = names::image_endpoint(&cfg);
    sub.connect(&image_endpoint)
        .with_context(|| format!("connecting to {image_endpoint}"))?;
    let rep = ctx.socket(zmq::REP)?;
    rep.set_linger(0)?;
    let command_endpoint = names::writer_command_endpoint_of(&cfg, writer_index);
    rep.bind(&command_endpoint)
        .with_context(|| format!("binding {command_endpoint}"))?;

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
    tracing::info!(
        image_buffer = %ring.path().display(),
        stream = %image_endpoint,
        commands = %command_endpoint,
        writer = writer_index,
        writers = cfg.number_of_writers,
        "ready"
    );
    // The flag's values are the config's (clap checked them).
    let compression = match args.compression.as_deref() {
        Some(flag) => flag.parse().unwrap_or(cfg.compression),
        None => cfg.compression,
    };
    tracing::info!(
        compression = compression.as_str(),
        from = if args.compression.is_some() {
            "--compression"
        } else {
            "config"
        },
        "image chunks"
    );
    let compression = match compression {
        ImageCompression::BitshuffleLz4 => Compression::BitshuffleLz4,
        ImageCompression::None => Compression::None,
    };
    let mut writer = Writer::new(&cfg, ring)
        .with_compression(compression)
        .with_checkpoint_interval(std::time::Duration::from_millis(
            args.checkpoint_interval_ms,
        ))
        .with_writing_marker(names::writer_marker_path_of(&cfg, writer_index))
        .with_share(writer_index, cfg.number_of_writers)?;
    let board = StatusBoard::default();
    // Writer 0 at base + 1, writers 1.. after the receivers (docs/configuration.md).
    let config_metrics = match writer_index {
        0 => cfg.metrics_addr(MetricsService::Writer),
        k => u16::try_from(k)
            .ok()
            .and_then(|k| cfg.metrics_addr(MetricsService::OtherWriter(k))),
    };
    std_daq_common::metrics::serve_if(
        args.metrics_addr.or(config_metrics),
        &service_name,
        &board,
        vec![writer.latency.clone()],
    )
    .context("starting the metrics server")?;
    let _status = StatusReporter::start(&redis, &service_name, &cfg, board.clone());
    service::run(&mut writer, &sub, &rep, &board, &shutdown)?;
    drop((sub, rep));
    names::remove_ipc_file(&command_endpoint);
    Ok(())
}
