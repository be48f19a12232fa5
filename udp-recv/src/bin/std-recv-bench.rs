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
use udp_recv::jungfrau::{
    FRAME_BYTES, HEADER_BYTES, PACKETS_PER_FRAME, PACKET_BYTES, PAYLOAD_BYTES,
};
use udp_recv::receiver::{self, ReceiverSettings};
use udp_recv::sim::{self, DropList, SimDetector, SimSettings};
use udp_recv::socket::{self, PacketSource, Recv, ScatterBatch, UdpReceiver};

/// Finds the highest JUNGFRAU frame rate one std-udp-recv takes without loss on loopback, fed by
/// a UDP-GSO sender pinned to another core, alternating each trial with a drain baseline (a bare
/// recvmmsg loop that discards everything). Prints one line per trial and a Markdown table.
#[derive(Debug, Parser)]
struct Args {
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

fn trial(args: &Args, rate: f64, drain: bool, ring: &mut RingOwner<ModuleFrame>) -> Result<Trial> {
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
        detector: SimDetector::Jungfrau,
        target: IpAddr::V4(Ipv4Addr::LOCALHOST),
        start_port: args.port,
        n_modules: 1,
        start_frame: 1,
        n_frames: frames,
        rate_hz: rate,
        drops: DropList::default(),
        gso: true,
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
        let mut sink = vec![0u8; args.batch * PAYLOAD_BYTES];
        let mut n = 0u64;
        loop {
            match source.recv_scatter(&mut batch, HEADER_BYTES, &mut sink, PAYLOAD_BYTES)? {
                Recv::Packets(k) => {
                    n += (0..k)
                        .filter(|i| batch.datagram_len(*i) == PACKET_BYTES)
                        .count() as u64
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
        let stats = receiver::run(
            &udp_recv::jungfrau::Jungfrau,
            &settings,
            &mut source,
            ring,
            &mut |_| true,
            &StatusBoard::default(),
            &Shutdown::new(),
        )?;
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
    let mut ring: RingOwner<ModuleFrame> =
        RingOwner::create(&name, args.slots, FRAME_BYTES as u64)?;
    println!(
        "one JUNGFRAU module ({} packets/frame), {} s trials, rcvbuf {} MiB, batch {}",
        PACKETS_PER_FRAME, args.seconds, args.rcvbuf_mib, args.batch
    );
    // Warm-up: page cache, ring pages, CPU frequency.
    trial(&args, args.rates[0], false, &mut ring)?;
    let mut table = Vec::new();
    for &rate in &args.rates {
        let mut lossless = [0usize; 2];
        let mut cpu = [0f64; 2];
        for t in 0..args.trials {
            for (m, drain) in [(0, true), (1, false)] {
                let r = trial(&args, rate, drain, &mut ring)?;
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
            rate * (PACKETS_PER_FRAME as usize * PACKET_BYTES) as f64 / 1e9,
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
