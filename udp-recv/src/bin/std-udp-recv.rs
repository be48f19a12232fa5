//! std-udp-recv: receives one detector module's UDP packets into its FrameBuffer.
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use clap::Parser;
use image_buffer::RingOwner;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use std_daq_common::service::{init_logging, warn_notices, Shutdown};
use std_daq_common::status::{load_config, RedisEnv, StatusBoard, StatusReporter};
use std_daq_common::{names, ModuleFrame};
use std_daq_common::{DetectorType, MetricsService};
use udp_recv::eiger::Eiger;
use udp_recv::gigafrost::Gigafrost;
use udp_recv::jungfrau::Jungfrau;
use udp_recv::receiver::{self, ReceiverSettings};
use udp_recv::socket::UdpReceiver;

/// Receives one detector module's UDP packets (port = start_udp_port + module) with recvmmsg,
/// assembles each frame in place in the module's FrameBuffer (/dev/shm/std-daq.<detector>.module-<m>),
/// zero-fills missing packets, and pushes a ModuleFrame per frame to std-assembler over ZMQ.
/// Counters are logged every stats_collection_period seconds and at exit. Stops on SIGINT/SIGTERM.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Detector config file (std_daq JSON: detector_name, detector_type, n_modules, ...).
    /// Without it the config is read from Redis key config.<SERVICE_NAME>.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Module id, 0-based; the receiver listens on start_udp_port + module.
    #[arg(long)]
    module: u16,
    /// Socket receive buffer in MiB. Above net.core.rmem_max the kernel clamps it unless the
    /// receiver runs as root (then SO_RCVBUFFORCE is used).
    #[arg(long, default_value_t = 128)]
    rcvbuf_mib: usize,
    /// Datagrams per recvmmsg call.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Pin the receiver to this CPU (one core per module, away from the NIC's interrupts).
    #[arg(long)]
    cpu: Option<usize>,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9110. Overrides
    /// the config key `metrics_base_address` (module m's port is base + 10 + m).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let redis = RedisEnv::from_env();
    let cfg = load_config(args.config.as_deref(), &redis)?;
    init_logging(&cfg.log_level);
    warn_notices(&cfg);
    if args.module >= cfg.n_modules {
        bail!(
            "--module {} is out of range: the config has n_modules = {}",
            args.module,
            cfg.n_modules
        );
    }
    let shutdown = Shutdown::on_signals().context("installing signal handlers")?;
    if let Some(cpu) = args.cpu {
        udp_recv::socket::pin_current_thread(cpu)
            .with_context(|| format!("pinning the receiver to CPU {cpu}"))?;
    }

    let bind_ip: IpAddr = cfg.udp_bind_address.parse().context("udp_bind_address")?;
    let addr = SocketAddr::new(bind_ip, cfg.udp_port(args.module));
    let (mut socket, rcvbuf) = UdpReceiver::bind(
        addr,
        args.rcvbuf_mib << 20,
        Duration::from_millis(u64::from(cfg.frame_timeout_ms).clamp(1, 5)),
        args.batch,
    )
    .with_context(|| format!("binding UDP {addr}"))?;
    if rcvbuf.clamped() {
        tracing::warn!(
            requested = rcvbuf.requested,
            effective = rcvbuf.effective,
            rmem_max = ?rcvbuf.rmem_max,
            "the kernel clamped the socket receive buffer: raise net.core.rmem_max or run as root"
        );
    }

    let ring_name = names::module_buffer_name(&cfg.detector_name, args.module);
    let mut ring: RingOwner<ModuleFrame> = RingOwner::create(
        &ring_name,
        u64::from(cfg.module_buffer_slots),
        cfg.module_frame_bytes() as u64,
    )
    .with_context(|| format!("creating FrameBuffer {ring_name}"))?;

    let ctx = zmq::Context::new();
    let push = ctx.socket(zmq::PUSH)?;
    push.set_sndhwm(100_000)?;
    push.set_linger(2000)?;
    let endpoint = names::sync_endpoint(&cfg);
    push.connect(&endpoint)
        .with_context(|| format!("connecting to {endpoint}"))?;

    tracing::info!(
        module = args.module,
        cpu = ?args.cpu,
        %addr,
        rcvbuf = rcvbuf.effective,
        buffer = %ring.path().display(),
        slots = ring.n_slots(),
        sync = %endpoint,
        "receiving"
    );
    let settings = ReceiverSettings {
        module_id: args.module,
        udp_port: addr.port(),
        frame_timeout: Duration::from_millis(u64::from(cfg.frame_timeout_ms)),
        stats_period: Duration::from_secs_f64(cfg.stats_collection_period),
        batch_size: args.batch,
    };
    let board = StatusBoard::default();
    std_daq_common::metrics::serve_if(
        args.metrics_addr
            .or(cfg.metrics_addr(MetricsService::Receiver(args.module))),
        &format!("std-daq.{}.udp-recv-{}", cfg.detector_name, args.module),
        &board,
        vec![],
    )
    .context("starting the metrics server")?;
    board.set("udp_address", addr);
    board.set("rcvbuf_bytes", rcvbuf.effective);
    let _status = StatusReporter::start(
        &redis,
        &format!("std-daq.{}.udp-recv-{}", cfg.detector_name, args.module),
        &cfg,
        board.clone(),
    );
    let mut publish = |frame: &ModuleFrame| push.send(frame.as_bytes(), zmq::DONTWAIT).is_ok();
    let stats = match cfg.detector_type {
        DetectorType::Eiger => receiver::run(
            &Eiger::new(cfg.bit_depth),
            &settings,
            &mut socket,
            &mut ring,
            &mut publish,
            &board,
            &shutdown,
        )?,
        DetectorType::Gigafrost => receiver::run(
            &Gigafrost::new(cfg.image_pixel_width, cfg.image_pixel_height)
                .context("the config's image size")?,
            &settings,
            &mut socket,
            &mut ring,
            &mut publish,
            &board,
            &shutdown,
        )?,
        DetectorType::JungfrauRaw | DetectorType::JungfrauConverted => receiver::run(
            &Jungfrau,
            &settings,
            &mut socket,
            &mut ring,
            &mut publish,
            &board,
            &shutdown,
        )?,
    };
    if stats.frames_not_published > 0 {
        tracing::warn!(
            frames = stats.frames_not_published,
            "frames could not be handed to the assembler (not running or too slow)"
        );
    }
    Ok(())
}
