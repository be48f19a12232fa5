//! std-det-sim: sends simulated JUNGFRAU packets.
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use std_daq_common::service::{init_logging, Shutdown};
use std_daq_common::DetectorConfig;
use std_daq_common::DetectorType;
use udp_recv::dark::{DarkSettings, JungfrauPixels};
use udp_recv::gigafrost::Gigafrost;
use udp_recv::sim::{self, DropList, Faults, SimDetector, SimSettings};

/// Simulates a JUNGFRAU, EIGER or GigaFRoST detector: sends real packets (JUNGFRAU: 8240 bytes,
/// 128 per module frame; EIGER: 4144 bytes, 32/64/128 per half-module frame at 8/16/32 bit;
/// GigaFRoST: 32-byte header and 12-bit pixels, sizes from the image size) for every module of the
/// config to start_udp_port + module, paced at --rate frames/s.
/// Pixel values follow a formula tests recompute (see the udp_recv::sim module docs). JUNGFRAU can
/// instead play dark frames of one gain stage (--jungfrau-dark G0|G1|G2: per-pixel pedestal plus
/// Gaussian noise from --pixel-seed, a few dead, wrong-gain and noisy pixels) or photon hits on
/// the G0 pedestal (--jungfrau-hits), by the formulas in the udp_recv::dark module docs
/// (docs/calibration.md). Prints a JSON report on stdout when done.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Detector config file; gives n_modules and start_udp_port.
    #[arg(long)]
    config: PathBuf,
    /// Number of frames to send per module.
    #[arg(long, default_value_t = 100)]
    images: u64,
    /// Frames per second; 0 sends as fast as the machine allows.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Frame number of the first frame (JUNGFRAU counts from 1).
    #[arg(long, default_value_t = 1)]
    start_frame: u64,
    /// Send nothing for this long before the first packet, as a detector armed and waiting for
    /// its trigger. With --start-frame 1 after an earlier run, more than 1000 ms plays a detector
    /// whose frame counter restarted: the receivers take it as a new acquisition.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Address to send to.
    #[arg(long, default_value = "127.0.0.1")]
    target: IpAddr,
    /// Packets to leave out: comma-separated frame:module:packet, packet `*` = the whole module frame.
    #[arg(long, default_value = "")]
    drop: DropList,
    /// Use UDP GSO (UDP_SEGMENT) so the kernel splits runs of packets: needed above ~1 GB/s.
    #[arg(long)]
    gso: bool,
    /// Probability that a packet is lost.
    #[arg(long, default_value_t = 0.0)]
    loss_rate: f64,
    /// Probability that a packet is swapped with the next one.
    #[arg(long, default_value_t = 0.0)]
    reorder_rate: f64,
    /// Probability that a packet is sent twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate_rate: f64,
    /// Probability that a packet is sent cut short (malformed).
    #[arg(long, default_value_t = 0.0)]
    malformed_rate: f64,
    /// Bursts of loss: LEN:RATE, a burst of LEN consecutive packets starting with probability RATE.
    #[arg(long, value_parser = parse_burst)]
    burst: Option<(u32, f64)>,
    /// Packets to send twice: frame:module:packet,...
    #[arg(long, default_value = "")]
    duplicate: DropList,
    /// Packets to send cut short: frame:module:packet,...
    #[arg(long, default_value = "")]
    malformed: DropList,
    /// Packets to swap with the packet after them: frame:module:packet,...
    #[arg(long, default_value = "")]
    reorder: DropList,
    /// Seed of the fault generator (same seed, same faults).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// JUNGFRAU: play dark frames with the detector in this gain stage (G0, G1 or G2) instead of
    /// the ramp: pedestal + noise per pixel from --pixel-seed (udp_recv::dark).
    #[arg(long, value_parser = udp_recv::dark::parse_stage, conflicts_with = "jungfrau_hits")]
    jungfrau_dark: Option<usize>,
    /// JUNGFRAU: play G0 frames of known photon hits, each photon HIT_ADU ADU above the rounded
    /// G0 pedestal of --pixel-seed (no noise; udp_recv::dark).
    #[arg(long, value_name = "HIT_ADU")]
    jungfrau_hits: Option<u16>,
    /// Seed of the dark/hit frames' pedestals, noise and dead/noisy pixels.
    #[arg(long, default_value_t = 1)]
    pixel_seed: u64,
    /// Distinct dark/hit frames per module (noise and hits repeat with this period; each costs
    /// 1 MiB per module of memory, computed before sending).
    #[arg(long, default_value_t = udp_recv::dark::DEFAULT_DISTINCT_FRAMES)]
    noise_frames: usize,
    /// Write every packet a receiver will not get whole (frame:module:packet, comma-separated,
    /// the --drop syntax) to this file.
    #[arg(long)]
    fault_log: Option<std::path::PathBuf>,
}

fn parse_burst(s: &str) -> Result<(u32, f64), String> {
    let (len, rate) = s
        .split_once(':')
        .ok_or("expected LEN:RATE, e.g. 20:0.001")?;
    let len = len
        .parse()
        .map_err(|_| format!("bad burst length {len:?}"))?;
    let rate: f64 = rate
        .parse()
        .map_err(|_| format!("bad burst rate {rate:?}"))?;
    if !(0.0..=1.0).contains(&rate) {
        return Err(format!("burst rate {rate} is not a probability"));
    }
    Ok((len, rate))
}

fn main() -> Result<()> {
    let args = Args::parse();
    init_logging("info");
    let cfg = DetectorConfig::from_file(&args.config)?;
    let detector = match cfg.detector_type {
        DetectorType::Eiger => SimDetector::Eiger {
            bit_depth: cfg.bit_depth,
        },
        DetectorType::Gigafrost => SimDetector::Gigafrost(
            Gigafrost::new(cfg.image_pixel_width, cfg.image_pixel_height)
                .context("the config's image size")?,
        ),
        DetectorType::JungfrauRaw | DetectorType::JungfrauConverted => SimDetector::Jungfrau,
    };
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a non-negative number of frames per second");
    }
    let shutdown = Shutdown::on_signals().context("installing signal handlers")?;
    let jungfrau_pixels = match (args.jungfrau_dark, args.jungfrau_hits) {
        (Some(stage), _) => Some(JungfrauPixels::Dark { stage }),
        (None, Some(hit_adu)) => Some(JungfrauPixels::Hits { hit_adu }),
        (None, None) => None,
    };
    if jungfrau_pixels.is_some() && detector != SimDetector::Jungfrau {
        bail!("--jungfrau-dark and --jungfrau-hits need a JUNGFRAU config");
    }
    if !(1..=udp_recv::dark::MAX_DISTINCT_FRAMES).contains(&args.noise_frames) {
        bail!(
            "--noise-frames must be 1..={}",
            udp_recv::dark::MAX_DISTINCT_FRAMES
        );
    }
    let settings = SimSettings {
        detector,
        target: args.target,
        start_port: cfg.start_udp_port,
        n_modules: cfg.n_modules,
        start_frame: args.start_frame,
        n_frames: args.images,
        rate_hz: args.rate,
        drops: args.drop,
        gso: args.gso,
        faults: Faults {
            loss_rate: args.loss_rate,
            reorder_rate: args.reorder_rate,
            duplicate_rate: args.duplicate_rate,
            malformed_rate: args.malformed_rate,
            burst_rate: args.burst.map_or(0.0, |b| b.1),
            burst_len: args.burst.map_or(0, |b| b.0),
            duplicates: args.duplicate,
            malformed: args.malformed,
            reorders: args.reorder,
            seed: args.seed,
        },
        jungfrau_pixels: jungfrau_pixels.map(|pixels| DarkSettings {
            pixels,
            seed: args.pixel_seed,
            n_distinct: args.noise_frames,
        }),
    };
    for (name, rate) in [
        ("--loss-rate", args.loss_rate),
        ("--reorder-rate", args.reorder_rate),
        ("--duplicate-rate", args.duplicate_rate),
        ("--malformed-rate", args.malformed_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            bail!("{name} {rate} is not a probability (0..1)");
        }
    }
    let quiet_until = Instant::now() + Duration::from_millis(args.delay_ms);
    while !shutdown.is_triggered() {
        let left = quiet_until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
    let mut lost = Vec::new();
    let report = sim::run_logging_losses(
        &settings,
        &shutdown,
        args.fault_log.is_some().then_some(&mut lost),
    )
    .context("sending packets")?;
    if let Some(path) = &args.fault_log {
        let text: Vec<String> = lost
            .iter()
            .map(|(f, m, p)| format!("{f}:{m}:{p}"))
            .collect();
        std::fs::write(path, text.join(","))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    tracing::info!(
        frames = report.frames,
        packets = report.packets_sent,
        dropped_on_purpose = report.packets_dropped,
        frame_rate = format_args!("{:.1}", report.frames as f64 / secs),
        gbytes_per_s = format_args!("{:.3}", report.bytes_sent as f64 / secs / 1e9),
        behind_schedule = report.frames_behind_schedule,
        "done"
    );
    println!(
        "{{\"frames\":{},\"packets_sent\":{},\"packets_dropped\":{},\"bytes_sent\":{},\"seconds\":{:.6},\"frames_behind_schedule\":{},\"packets_duplicated\":{},\"packets_reordered\":{},\"packets_malformed\":{},\"bursts\":{}}}",
        report.frames,
        report.packets_sent,
        report.packets_dropped,
        report.bytes_sent,
        secs,
        report.frames_behind_schedule,
        report.packets_duplicated,
        report.packets_reordered,
        report.packets_malformed,
        report.bursts
    );
    Ok(())
}
