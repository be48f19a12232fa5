//! std-recv-bench: the highest frame rate one receiver takes without loss, against a "drain"
//! baseline (a bare recvmmsg loop on the same socket settings), in the same run. Run by hand.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::Parser;
use image_buffer::RingOwner;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std_daq_common::service::Shutdown;
use std_daq_common::status::StatusBoard;
use std_daq_common::ModuleFrame;
use udp_recv::eiger::Eiger;
use udp_recv::format::PacketFormat;
use udp_recv::gigafrost::Gigafrost;
use udp_recv::jungfrau::Jungfrau;
use udp_recv::receiver::{self, ReceiverSettings};
use udp_recv::sim::{self, DropList, SimDetector, SimSettings};
use udp_recv::socket::{self, PacketSource, Recv, ScatterBatch, UdpReceiver};

/// Finds the highest frame rate one std-udp-recv (JUNGFRAU module, EIGER half-module or GigaFRoST
/// stream) takes without loss on loopback, fed by
/// a UDP-GSO sender pinned to another core, alternating each trial with a drain baseline (a bare
/// recvmmsg loop that discards everything). Prints one line per trial and a Markdown table.
#[derive(Debug, Parser)]
struct Args {
    /// Detector: jungfrau, eiger8, eiger16, eiger32 or gigafrost (2016x2016 image, one stream).
    #[arg(long, default_value = "jungfrau")]
    detector: String,
    /// Frame rates to try (frames/s).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,1500,2000,2500,3000"
    )]
    rates: Vec<f64>,
    /// Trials per rate and mode.
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Seconds per trial.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Socket receive buffer in MiB (SO_RCVBUFFORCE as root).
    #[arg(long, default_value_t = 256)]
    rcvbuf_mib: usize,
    /// Datagrams per recvmmsg call.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// UDP port.
    #[arg(long, default_value_t = 47000)]
    port: u16,
    /// CPU for the receiver; the sender takes the other one.
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// FrameBuffer slots.
    #[arg(long, default_value_t = 1000)]
    slots: u64,
}

/// Ends the source once the sender is done and the socket has been quiet for a while.
struct UntilQuiet<'a> {
    inner: &'a mut UdpReceiver,
    sender_done: &'a AtomicBool,
    quiet_timeouts: u32,
}

impl PacketSource for UntilQuiet<'_> {
    fn recv_scatter(
        &mut self,
        batch: &mut ScatterBatch,
        header_len: usize,
        dest: &mut [u8],
        payload_len: usize,
    ) -> std::io::Result<Recv> {
        let r = self
            .inner
            .recv_scatter(batch, header_len, dest, payload_len)?;
        match r {
            Recv::Timeout if self.sender_done.load(Ordering::Acquire) => {
                self.quiet_timeouts += 1;
                Ok(if self.quiet_timeouts > 50 {
                    Recv::Closed
                } else {
                    Recv::Timeout
                })
            }
            Recv::Timeout => Ok(Recv::Timeout),
            other => {
                self.quiet_timeouts = 0;
                Ok(other)
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Trial {
    packets_expected: u64,
    packets_received: u64,
    sent_rate: f64,
    cpu_ns_per_packet: f64,
    packets_copied: u64,
}

/// The format under test, for the receive loop and the simulator.
#[derive(Debug, Clone, Copy)]
enum Format {
    Jungfrau(Jungfrau),
    Eiger(Eiger, u8),
    Gigafrost(Gigafrost),
}

impl Format {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "jungfrau" => Format::Jungfrau(Jungfrau),
            "eiger8" => Format::Eiger(Eiger::new(8), 8),
            "eiger16" => Format::Eiger(Eiger::new(16), 16),
            "eiger32" => Format::Eiger(Eiger::new(32), 32),
            "gigafrost" => Format::Gigafrost(Gigafrost::new(2016, 2016)?),
            other => anyhow::bail!("unknown --detector {other}"),
        })
    }
    fn sim(self) -> SimDetector {
        match self {
            Format::Jungfrau(_) => SimDetector::Jungfrau,
            Format::Eiger(_, bit_depth) => SimDetector::Eiger { bit_depth },
            Format::Gigafrost(g) => SimDetector::Gigafrost(g),
        }
    }
    fn format(&self) -> &dyn FormatInfo {
        match self {
            Format::Jungfrau(f) => f,
            Format::Eiger(f, _) => f,
            Format::Gigafrost(f) => f,
        }
    }
}

/// Object-safe sizes of a format (PacketFormat itself is used generically).
trait FormatInfo {
    fn header(&self) -> usize;
    fn payload(&self) -> usize;
    fn frame(&self) -> usize;
    fn packets(&self) -> usize;
}

impl<F: PacketFormat> FormatInfo for F {
    fn header(&self) -> usize {
        self.header_bytes()
    }
    fn payload(&self) -> usize {
        self.payload_bytes()
    }
    fn frame(&self) -> usize {
        self.frame_bytes()
    }
    fn packets(&self) -> usize {
        self.packets_per_frame()
    }
}

fn trial(
    args: &Args,
    format: Format,
    rate: f64,
    drain: bool,
    ring: &mut RingOwner<ModuleFrame>,
) -> Result<Trial> {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), args.port);
    let (mut udp, _) = UdpReceiver::bind(
        addr,
        args.rcvbuf_mib << 20,
        Duration::from_millis(2),
        args.batch,
    )
    .with_context(|| format!("binding {addr}"))?;
    let frames = (rate * args.seconds) as u64;
    let sender_done = Arc::new(AtomicBool::new(false));
    let settings = SimSettings {
        detector: format.sim(),
        target: IpAddr::V4(Ipv4Addr::LOCALHOST),
        start_port: args.port,
        n_modules: 1,
        start_frame: 1,
        n_frames: frames,
        rate_hz: rate,
        drops: DropList::default(),
        gso: true,
        faults: Default::default(),
        jungfrau_pixels: None,
    };
    let sender_cpu = if args.cpu == 0 { 1 } else { 0 };
    let done = Arc::clone(&sender_done);
    let sender = std::thread::spawn(move || {
        let _ = socket::pin_current_thread(sender_cpu);
        let report = sim::run(&settings, &Shutdown::new());
        done.store(true, Ordering::Release);
        report
    });
    let cpu0 = socket::thread_cpu_time().unwrap_or_default();
    let mut source = UntilQuiet {
        inner: &mut udp,
        sender_done: &sender_done,
        quiet_timeouts: 0,
    };
    let mut copied = 0;
    let received = if drain {
        let mut batch = ScatterBatch::new(args.batch);
        let (hb, pb) = (format.format().header(), format.format().payload());
        let mut sink = vec![0u8; args.batch * pb];
        let mut n = 0u64;
        loop {
            match source.recv_scatter(&mut batch, hb, &mut sink, pb)? {
                Recv::Packets(k) => {
                    n += (0..k).filter(|i| batch.datagram_len(*i) >= hb).count() as u64
                }
                Recv::Timeout => {}
                Recv::Closed => break n,
            }
        }
    } else {
        let settings = ReceiverSettings {
            module_id: 0,
            udp_port: args.port,
            frame_timeout: Duration::from_millis(20),
            stats_period: Duration::from_secs(3600),
            batch_size: args.batch,
        };
        let (board, stop) = (StatusBoard::default(), Shutdown::new());
        let mut publish = |_: &ModuleFrame| true;
        let stats = match format {
            Format::Jungfrau(f) => receiver::run(
                &f,
                &settings,
                &mut source,
                ring,
                &mut publish,
                &board,
                &stop,
            )?,
            Format::Eiger(f, _) => receiver::run(
                &f,
                &settings,
                &mut source,
                ring,
                &mut publish,
                &board,
                &stop,
            )?,
            Format::Gigafrost(f) => receiver::run(
                &f,
                &settings,
                &mut source,
                ring,
                &mut publish,
                &board,
                &stop,
            )?,
        };
        copied = stats.packets_copied;
        stats.packets
    };
    let cpu = socket::thread_cpu_time()
        .unwrap_or_default()
        .saturating_sub(cpu0);
    let report = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?
        .context("sender")?;
    Ok(Trial {
        packets_expected: report.packets_sent,
        packets_received: received,
        sent_rate: report.frames as f64 / report.elapsed.as_secs_f64().max(1e-9),
        cpu_ns_per_packet: cpu.as_nanos() as f64 / received.max(1) as f64,
        packets_copied: copied,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    socket::pin_current_thread(args.cpu).context("pinning the receiver")?;
    let name = format!("std-daq.recv-bench-{}", std::process::id());
    let format = Format::parse(&args.detector)?;
    let info = format.format();
    let mut ring: RingOwner<ModuleFrame> =
        RingOwner::create(&name, args.slots, info.frame() as u64)?;
    println!(
        "one {} stream ({} packets/frame), {} s trials, rcvbuf {} MiB, batch {}",
        args.detector,
        info.packets(),
        args.seconds,
        args.rcvbuf_mib,
        args.batch
    );
    // Warm-up: page cache, ring pages, CPU frequency.
    trial(&args, format, args.rates[0], false, &mut ring)?;
    let mut table = Vec::new();
    for &rate in &args.rates {
        let mut lossless = [0usize; 2];
        let mut cpu = [0f64; 2];
        for t in 0..args.trials {
            for (m, drain) in [(0, true), (1, false)] {
                let r = trial(&args, format, rate, drain, &mut ring)?;
                let lost = r.packets_expected.saturating_sub(r.packets_received);
                let loss_pct = 100.0 * lost as f64 / r.packets_expected.max(1) as f64;
                println!(
                    "rate={rate} trial={t} mode={} sent_rate={:.0} lost_packets={lost} ({loss_pct:.3}%) cpu_ns_per_packet={:.0} packets_copied={}",
                    if drain { "drain" } else { "receiver" },
                    r.sent_rate,
                    r.cpu_ns_per_packet,
                    r.packets_copied
                );
                if lost == 0 {
                    lossless[m] += 1;
                }
                cpu[m] += r.cpu_ns_per_packet / args.trials as f64;
            }
        }
        table.push((rate, lossless, cpu));
    }
    println!("\n| frames/s | GB/s | drain lossless | receiver lossless | drain ns/packet | receiver ns/packet |");
    println!("|---|---|---|---|---|---|");
    for (rate, lossless, cpu) in table {
        println!(
            "| {rate} | {:.2} | {} of {} | {} of {} | {:.0} | {:.0} |",
            rate * (info.packets() * (info.header() + info.payload())) as f64 / 1e9,
            lossless[0],
            args.trials,
            lossless[1],
            args.trials,
            cpu[0],
            cpu[1]
        );
    }
    Ok(())
}
