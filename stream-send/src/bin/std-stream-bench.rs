//! std-stream-bench: replication throughput (`sender::run` -> `receiver::run`, ring to ring)
//! against a plain TCP stream of the same bytes, alternating in one run, over loopback and over a
//! veth pair between two network namespaces it creates (and removes) itself. Run by hand (root
//! for the veth pair), never in CI; see docs/benchmarks.md.
//!
//! The orchestrator runs every measurement as two child processes of this same binary: `serve`
//! (the receiving host: a `read_exact` loop into ring-sized memory, one place per slot as the
//! replication ring has, or `receiver::run` into its own ring) and `client`
//! (the sending host: `write_all` of the same bytes, or a ring re-published as fast as the far side
//! commits plus `sender::run`). Over the veth pair `serve` runs in the far namespace and `client`
//! in the near one (`ip netns exec`); over loopback both run in the current namespace. The client
//! times each run on one clock: from just before the first byte is written (plain) or the first
//! image is published (replication) to the receiver's confirmation of the last byte (plain: one
//! byte back on connection 0) or of the last commit (replication: the receiver's ImageMetadata PUB,
//! which the client follows over TCP, as a writer on the far host would).
//!
//! Replication images carry the assembler's end-to-end checksum, computed once per slot when the
//! ring is pre-filled (outside the timed region, as the assembler computes it when it makes the
//! image), so the sender sends without hashing and the receiver verifies it; `--sender-hashes`
//! publishes them without one instead (the sender's per-part fallback, as before protocol 3).
#![forbid(unsafe_code)]

use anyhow::{bail, ensure, Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};
use image_buffer::{Expect, RingOwner, RingReader};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};
use std_daq_common::checksum::{image_checksum, CHECKSUM_NONE, CHECKSUM_XXH3_BLOCKS};
use std_daq_common::service::{init_logging, Shutdown};
use std_daq_common::{ImageMetadata, ImageStatus};
use stream_send::receiver::{self, ReceiverOptions};
use stream_send::sender::{self, SenderOptions};
use stream_send::wire;

/// Replication throughput vs a plain TCP stream of the same bytes (same run, alternating trials),
/// over loopback and over a veth pair between two network namespaces (created and removed here;
/// needs root, skipped otherwise). Prints one line per run and a Markdown table.
#[derive(Debug, Parser)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Debug, ClapArgs)]
struct BenchArgs {
    /// Images per run (plus one warm-up image for replication, not timed).
    #[arg(long, default_value_t = 2000)]
    images: u64,
    /// Image height in pixels (u16 pixels).
    #[arg(long, default_value_t = 1024)]
    height: u32,
    /// Image width in pixels (u16 pixels); 1024x1024 = 2 MiB, two JUNGFRAU modules.
    #[arg(long, default_value_t = 1024)]
    width: u32,
    /// Trials per (transport, configuration, mode); plain and replication alternate.
    #[arg(long, default_value_t = 3)]
    trials: usize,
    /// Configurations CONNECTIONSxPARTS (parts 1 = whole images round-robin).
    #[arg(long, value_delimiter = ',', default_value = "1x1,2x2,2x1,4x4")]
    configs: Vec<String>,
    /// Transports: loopback, veth.
    #[arg(long, value_delimiter = ',', default_value = "loopback,veth")]
    transports: Vec<String>,
    /// Ring slots on each side (the plain sender cycles over as many image buffers).
    #[arg(long, default_value_t = 256)]
    slots: u64,
    /// MTU of the veth pair.
    #[arg(long, default_value_t = 1500)]
    veth_mtu: u32,
    /// Pin the sending end to CPU 0 and the receiving end to CPU 1 (taskset), as two hosts of
    /// one core each would be; by default both ends share all CPUs.
    #[arg(long)]
    pin: bool,
    /// Replication images without the assembler's checksum (`checksum_kind` 0): the sender hashes
    /// every part itself (the fallback). By default they carry it and the sender does not hash.
    #[arg(long)]
    sender_hashes: bool,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// (internal) The receiving end of one run.
    #[command(hide = true)]
    Serve(EndArgs),
    /// (internal) The sending end of one run.
    #[command(hide = true)]
    Client(EndArgs),
}

#[derive(Debug, Clone, ClapArgs)]
struct EndArgs {
    /// plain or repl.
    #[arg(long)]
    mode: String,
    /// serve: address to bind; client: address of the serve end.
    #[arg(long)]
    addr: IpAddr,
    /// client: the serve end's data port.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// client (repl): the serve end's ImageMetadata PUB port.
    #[arg(long, default_value_t = 0)]
    pub_port: u16,
    #[arg(long)]
    connections: u16,
    #[arg(long)]
    parts: u16,
    #[arg(long)]
    images: u64,
    #[arg(long)]
    height: u32,
    #[arg(long)]
    width: u32,
    #[arg(long)]
    slots: u64,
    /// client (repl): publish images without the assembler's checksum.
    #[arg(long)]
    sender_hashes: bool,
}

impl EndArgs {
    fn image_bytes(&self) -> u64 {
        u64::from(self.height) * u64::from(self.width) * 2
    }
    fn to_args(&self) -> Vec<String> {
        vec![
            "--mode".into(),
            self.mode.clone(),
            "--addr".into(),
            self.addr.to_string(),
            "--port".into(),
            self.port.to_string(),
            "--pub-port".into(),
            self.pub_port.to_string(),
            "--connections".into(),
            self.connections.to_string(),
            "--parts".into(),
            self.parts.to_string(),
            "--images".into(),
            self.images.to_string(),
            "--height".into(),
            self.height.to_string(),
            "--width".into(),
            self.width.to_string(),
            "--slots".into(),
            self.slots.to_string(),
        ]
        .into_iter()
        .chain(self.sender_hashes.then(|| "--sender-hashes".to_string()))
        .collect()
    }
    /// The longest part (parts on the checksum block grid need not be equal).
    fn max_part_bytes(&self) -> usize {
        (0..self.parts)
            .map(|k| wire::part_range(self.image_bytes(), self.parts, k).1)
            .max()
            .unwrap_or(0) as usize
    }
}

const WATCHDOG: Duration = Duration::from_secs(60);
/// First image id of a replication run (the warm-up image); the timed ones follow.
const FIRST_ID: u64 = 1000;
const DTYPE_U16: u16 = 2;

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.role {
        Some(Role::Serve(a)) => {
            init_logging("error");
            serve(&a)
        }
        Some(Role::Client(a)) => {
            init_logging("error");
            client(&a)
        }
        None => orchestrate(&cli.bench),
    }
}

// ------------------------------------------------------------------------------------------------
// The receiving end.

fn serve(a: &EndArgs) -> Result<()> {
    let listener = TcpListener::bind((a.addr, 0)).context("binding the data port")?;
    let port = listener.local_addr()?.port();
    match a.mode.as_str() {
        "plain" => {
            // Where the bytes land, like the replication receiver's ring: per connection, one
            // part-sized place per ring slot (`slots` x part bytes), touched before the run.
            let part_bytes = a.max_part_bytes();
            let mut sinks: Vec<Vec<u8>> = (0..a.connections)
                .map(|_| vec![1u8; part_bytes * a.slots as usize])
                .collect();
            say(&format!("ready {port} 0"))?;
            serve_plain(a, &listener, &mut sinks)
        }
        "repl" => serve_repl(a, listener, port),
        m => bail!("unknown mode {m}"),
    }
}

/// CPU seconds (user + system, all threads) this process has used so far; 0 if unknown.
fn cpu_seconds() -> f64 {
    // /proc/self/stat: fields 14 and 15 (after the parenthesised command) in clock ticks.
    const TICKS_PER_SECOND: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / TICKS_PER_SECOND
}

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Accepts `connections` connections, each announcing its index in 2 bytes.
fn accept_indexed(listener: &TcpListener, connections: u16) -> Result<Vec<TcpStream>> {
    let mut conns: Vec<Option<TcpStream>> = (0..connections).map(|_| None).collect();
    for _ in 0..connections {
        let (s, _) = listener.accept()?;
        // The same socket settings as the replication receiver's.
        s.set_nodelay(true)?;
        let _ = socket2::SockRef::from(&s).set_recv_buffer_size(4 << 20);
        s.set_read_timeout(Some(WATCHDOG))?;
        let mut idx = [0u8; 2];
        (&s).read_exact(&mut idx)?;
        let i = usize::from(u16::from_le_bytes(idx));
        ensure!(
            i < conns.len() && conns[i].is_none(),
            "bad connection index {i}"
        );
        conns[i] = Some(s);
    }
    Ok(conns.into_iter().flatten().collect())
}

/// The parts (offset, len) connection `c` carries, in order, over the whole run: the same
/// assignment as replication's (`wire::connection_of`).
fn parts_of(a: &EndArgs, c: usize) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    let image_bytes = a.image_bytes();
    (0..a.images).flat_map(move |seq| {
        (0..a.parts)
            .filter(move |&k| wire::connection_of(seq, a.parts, k, a.connections) == c)
            .map(move |k| {
                let (o, l) = wire::part_range(image_bytes, a.parts, k);
                (seq, o, l)
            })
    })
}

fn serve_plain(a: &EndArgs, listener: &TcpListener, sinks: &mut [Vec<u8>]) -> Result<()> {
    let conns = accept_indexed(listener, a.connections)?;
    let cpu0 = cpu_seconds();
    let part_bytes = a.max_part_bytes();
    let received: u64 = thread::scope(|s| -> Result<u64> {
        let handles: Vec<_> = conns
            .iter()
            .zip(sinks.iter_mut())
            .enumerate()
            .map(|(c, (conn, sink))| {
                s.spawn(move || -> std::io::Result<u64> {
                    let mut r = conn;
                    let mut n = 0;
                    for (seq, _, len) in parts_of(a, c) {
                        let at = (seq % a.slots) as usize * part_bytes;
                        r.read_exact(&mut sink[at..at + len as usize])?;
                        n += len;
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
        }
        Ok(total)
    })?;
    (&conns[0]).write_all(&[1])?;
    say(&serde_json::json!({ "bytes_received": received, "cpu": cpu_seconds() - cpu0 }).to_string())
}

fn serve_repl(a: &EndArgs, listener: TcpListener, port: u16) -> Result<()> {
    let ctx = zmq::Context::new();
    let publisher = ctx.socket(zmq::PUB)?;
    publisher.set_sndhwm(1_000_000)?;
    publisher.set_linger(0)?;
    publisher.bind(&format!("tcp://{}:0", a.addr))?;
    let endpoint = publisher
        .get_last_endpoint()?
        .map_err(|_| anyhow::anyhow!("PUB endpoint is not UTF-8"))?;
    let pub_port: u16 = endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("PUB port")?;
    let name = format!("ssb-{}-far", std::process::id());
    let ring = RingOwner::<ImageMetadata>::create(&name, a.slots, a.image_bytes())?.into_shared();
    let opts = ReceiverOptions {
        image_bytes: a.image_bytes(),
        height: a.height,
        width: a.width,
        dtype: DTYPE_U16,
        link_timeout: Duration::from_secs(5),
        stats_period: Duration::from_secs(3600),
        status: Default::default(),
    };
    let shutdown = Shutdown::new();
    {
        // Stop when the orchestrator closes our stdin.
        let shutdown = shutdown.clone();
        thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            shutdown.trigger();
        });
    }
    say(&format!("ready {port} {pub_port}"))?;
    let cpu0 = cpu_seconds();
    let st = receiver::run(listener, &ring, &publisher, &opts, &shutdown)?;
    say(&serde_json::json!({
        "delivered": st.images_delivered,
        "lost": st.images_lost,
        "checksum_errors": st.checksum_errors,
        "protocol_errors": st.protocol_errors,
        "sessions": st.sessions,
        "bytes_received": st.bytes_received,
        "cpu": cpu_seconds() - cpu0,
    })
    .to_string())
}

// ------------------------------------------------------------------------------------------------
// The sending end.

fn client(a: &EndArgs) -> Result<()> {
    match a.mode.as_str() {
        "plain" => client_plain(a),
        "repl" => client_repl(a),
        m => bail!("unknown mode {m}"),
    }
}

/// Non-trivial pixel bytes (the checksums must do real work), cheap to generate.
fn pattern(buf: &mut [u8], seed: u64) {
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let v = (seed ^ (i as u64))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .to_le_bytes();
        w.copy_from_slice(&v[..w.len()]);
    }
}

fn client_plain(a: &EndArgs) -> Result<()> {
    let image_bytes = a.image_bytes() as usize;
    // As many image buffers as the replication ring has slots: the same bytes, the same memory.
    let mut src = vec![0u8; image_bytes * a.slots as usize];
    for (i, img) in src.chunks_mut(image_bytes).enumerate() {
        pattern(img, i as u64);
    }
    let target = SocketAddr::new(a.addr, a.port);
    let mut conns = Vec::new();
    for i in 0..a.connections {
        let s = TcpStream::connect_timeout(&target, WATCHDOG)?;
        // The same socket settings as the replication sender's.
        s.set_nodelay(true)?;
        let _ = socket2::SockRef::from(&s).set_send_buffer_size(4 << 20);
        (&s).write_all(&i.to_le_bytes())?;
        conns.push(s);
    }
    let start = Barrier::new(conns.len() + 1);
    let mut cpu0 = 0.0;
    let (src, start_ref) = (&src, &start);
    let (t0, sent) = thread::scope(|s| -> Result<(Instant, u64)> {
        let handles: Vec<_> = conns
            .iter()
            .enumerate()
            .map(|(c, conn)| {
                s.spawn(move || -> std::io::Result<u64> {
                    let mut w = conn;
                    let mut n = 0;
                    start_ref.wait();
                    for (seq, off, len) in parts_of(a, c) {
                        let at = (seq % a.slots) as usize * image_bytes + off as usize;
                        w.write_all(&src[at..at + len as usize])?;
                        n += len;
                    }
                    Ok(n)
                })
            })
            .collect();
        let t0 = Instant::now();
        cpu0 = cpu_seconds();
        start.wait();
        let mut total = 0;
        for h in handles {
            total += h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        Ok((t0, total))
    })?;
    conns[0].set_read_timeout(Some(WATCHDOG))?;
    let mut done = [0u8; 1];
    (&conns[0]).read_exact(&mut done)?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    ensure!(sent == a.images * a.image_bytes(), "sent {sent} bytes");
    say(&serde_json::json!({
        "seconds": secs,
        "cpu": cpu,
        "bytes": sent,
        "gbps": sent as f64 / secs / 1e9,
    })
    .to_string())
}

/// `checksum`: the assembler's checksum of the image's pixels (ignored with `--sender-hashes`).
fn meta_of(a: &EndArgs, id: u64, checksum: u64) -> ImageMetadata {
    let (checksum, checksum_kind) = if a.sender_hashes {
        (0, CHECKSUM_NONE)
    } else {
        (checksum, CHECKSUM_XXH3_BLOCKS)
    };
    ImageMetadata {
        checksum,
        checksum_kind,
        image_id: id,
        frame_index: id,
        timestamp: id,
        data_bytes: a.image_bytes(),
        height: a.height,
        width: a.width,
        n_modules: 1,
        dtype: DTYPE_U16,
        status: ImageStatus::Good as u16,
        version: std_daq_common::messages::IMAGE_METADATA_VERSION,
        ..bytemuck::Zeroable::zeroed()
    }
}

/// Follows the far side's ImageMetadata PUB: the highest image id committed, and losses.
struct Progress {
    sub: zmq::Socket,
    committed: Option<u64>,
    not_good: u64,
    buf: [u8; std_daq_common::messages::RECV_BUFFER_BYTES],
}

impl Progress {
    /// Takes one message (waiting up to the watchdog if `block`); false if none was there.
    fn poll(&mut self, block: bool) -> Result<bool> {
        let flags = if block { 0 } else { zmq::DONTWAIT };
        match self.sub.recv_into(&mut self.buf, flags) {
            Ok(0) => Ok(true),
            Ok(n) if n <= self.buf.len() => {
                let m = ImageMetadata::from_bytes(&self.buf[..n])?;
                if m.status != ImageStatus::Good as u16 {
                    self.not_good += 1;
                }
                self.committed = Some(self.committed.map_or(m.image_id, |c| c.max(m.image_id)));
                Ok(true)
            }
            Ok(n) => bail!("{n}-byte message on the far PUB"),
            Err(zmq::Error::EAGAIN) if !block => Ok(false),
            Err(zmq::Error::EAGAIN) => bail!("the far side committed nothing for {WATCHDOG:?}"),
            Err(e) => Err(e.into()),
        }
    }
    fn wait_for(&mut self, id: u64) -> Result<()> {
        while self.committed.is_none_or(|c| c < id) {
            self.poll(true)?;
        }
        Ok(())
    }
}

fn client_repl(a: &EndArgs) -> Result<()> {
    let image_bytes = a.image_bytes();
    let name = format!("ssb-{}-near", std::process::id());
    let mut ring: RingOwner<ImageMetadata> = RingOwner::create(&name, a.slots, image_bytes)?;
    // Pre-fill every slot once; later images re-commit a slot (new id and metadata, same pixels)
    // once the far side has committed the image it held. The checksum of each slot's pixels is
    // computed here, once, as the assembler computes it after writing an image: not timed.
    let mut sums = Vec::with_capacity(a.slots as usize);
    for id in FIRST_ID..FIRST_ID + a.slots {
        let mut w = ring.begin_write(id)?;
        let data = &mut w.data_mut()[..image_bytes as usize];
        pattern(data, id);
        let sum = image_checksum(data);
        sums.push(sum);
        *w.meta_mut() = meta_of(a, id, sum);
        w.commit();
    }
    // Image `id` re-uses the pixels of the pre-filled image with the same slot.
    let sum_of = |id: u64| sums[((id - FIRST_ID) % a.slots) as usize];
    let reader = Arc::new(RingReader::<ImageMetadata>::attach(
        &name,
        Expect::default(),
    )?);
    let ctx = zmq::Context::new();
    let xpub = ctx.socket(zmq::XPUB)?;
    xpub.set_sndhwm(1_000_000)?;
    let local = format!("inproc://{name}");
    xpub.bind(&local)?;
    let sub = ctx.socket(zmq::SUB)?;
    sub.set_rcvhwm(1_000_000)?;
    sub.set_subscribe(b"")?;
    sub.connect(&local)?;
    xpub.set_rcvtimeo(WATCHDOG.as_millis() as i32)?;
    ensure!(xpub.recv_bytes(0)? == [1u8], "unexpected XPUB message");

    let mut progress = Progress {
        sub: ctx.socket(zmq::SUB)?,
        committed: None,
        not_good: 0,
        buf: [0; std_daq_common::messages::RECV_BUFFER_BYTES],
    };
    progress.sub.set_rcvhwm(1_000_000)?;
    progress.sub.set_subscribe(b"")?;
    progress.sub.set_rcvtimeo(WATCHDOG.as_millis() as i32)?;
    progress
        .sub
        .connect(&format!("tcp://{}:{}", a.addr, a.pub_port))?;
    // A heartbeat of the far PUB: our subscription there is live.
    progress.poll(true)?;

    let opts = SenderOptions {
        target: SocketAddr::new(a.addr, a.port),
        connections: a.connections,
        parts: a.parts,
        image_bytes,
        height: a.height,
        width: a.width,
        dtype: DTYPE_U16,
        link_timeout: Duration::from_secs(5),
        stats_period: Duration::from_secs(3600),
        status: Default::default(),
        drain_timeout: Duration::from_secs(10),
    };
    let shutdown = Shutdown::new();
    let sender = {
        let shutdown = shutdown.clone();
        thread::spawn(move || sender::run(&opts, &sub, reader, None, &shutdown))
    };
    // Warm-up image (not timed): the sender subscribes, connects and opens its session.
    xpub.send(meta_of(a, FIRST_ID, sum_of(FIRST_ID)).as_bytes(), 0)?;
    progress.wait_for(FIRST_ID)?;

    let last = FIRST_ID + a.images;
    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let mut stalls = 0u64;
    for id in FIRST_ID + 1..=last {
        // Slot id % slots held id - slots: reuse it only once the far side has committed that.
        while progress.committed.is_none_or(|c| c + a.slots <= id) {
            progress.poll(true)?;
            stalls += 1;
        }
        let mut w = ring.begin_write(id)?;
        let meta = meta_of(a, id, sum_of(id));
        *w.meta_mut() = meta;
        w.commit();
        xpub.send(meta.as_bytes(), 0)?;
        while progress.poll(false)? {}
    }
    progress.wait_for(last)?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    shutdown.trigger();
    let st = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let bytes = a.images * image_bytes;
    say(&serde_json::json!({
        "seconds": secs,
        "cpu": cpu,
        "bytes": bytes,
        "gbps": bytes as f64 / secs / 1e9,
        "delivered": st.images_delivered,
        "lost": st.images_lost,
        "unconfirmed": st.images_unconfirmed,
        "sessions": st.sessions,
        "images_without_checksum": st.images_without_checksum,
        "not_good_seen": progress.not_good,
        "producer_stalls": stalls,
    })
    .to_string())
}

// ------------------------------------------------------------------------------------------------
// The orchestrator.

fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .status()
        .is_ok_and(|s| s.success())
}

/// Two network namespaces joined by a veth pair; removed on drop (deleting a namespace removes
/// its end of the pair, and with it the pair).
struct Netns {
    near: String,
    far: String,
    near_ip: String,
    far_ip: String,
}

impl Netns {
    fn create(mtu: u32) -> Result<Netns> {
        let id = std::process::id();
        let sub = id % 250;
        let n = Netns {
            near: format!("ssbnear{id}"),
            far: format!("ssbfar{id}"),
            near_ip: format!("10.214.{sub}.1"),
            far_ip: format!("10.214.{sub}.2"),
        };
        let ok = sh(&format!(
            "set -e; ip netns add {near}; ip netns add {far}; \
             ip link add bn{id} mtu {mtu} type veth peer name bf{id} mtu {mtu}; \
             ip link set bn{id} netns {near}; ip link set bf{id} netns {far}; \
             ip -n {near} addr add {nip}/30 dev bn{id}; \
             ip -n {far} addr add {fip}/30 dev bf{id}; \
             ip -n {near} link set bn{id} up; ip -n {far} link set bf{id} up; \
             ip -n {near} link set lo up; ip -n {far} link set lo up",
            near = n.near,
            far = n.far,
            nip = n.near_ip,
            fip = n.far_ip,
        ));
        // Whatever was created is removed by drop.
        ensure!(ok, "creating the network namespaces failed");
        Ok(n)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!(
            "ip netns del {} 2>/dev/null; ip netns del {} 2>/dev/null; \
             ip link del bn{} 2>/dev/null",
            self.near,
            self.far,
            std::process::id()
        ));
    }
}

/// A child process of this binary, killed on drop if still running.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    /// `cpu`: pin the child to this CPU.
    fn spawn(netns: Option<&str>, role: &str, args: &EndArgs, cpu: Option<u32>) -> Result<Proc> {
        let exe = std::env::current_exe()?;
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = netns {
            argv.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        if let Some(cpu) = cpu {
            argv.extend(["taskset".into(), "-c".into(), cpu.to_string()]);
        }
        let mut cmd = match argv.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = cmd
            .arg(role)
            .args(args.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {role}"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("child stdout")?);
        Ok(Proc {
            child,
            stdin,
            stdout,
        })
    }
    fn line(&mut self, what: &str) -> Result<String> {
        let mut l = String::new();
        self.stdout.read_line(&mut l)?;
        ensure!(!l.is_empty(), "{what} ended without output");
        Ok(l.trim().to_owned())
    }
    fn json(&mut self, what: &str) -> Result<serde_json::Value> {
        let l = self.line(what)?;
        serde_json::from_str(&l).with_context(|| format!("{what}: {l}"))
    }
    fn finish(mut self, what: &str) -> Result<serde_json::Value> {
        drop(self.stdin.take());
        let v = self.json(what)?;
        let status = self.child.wait()?;
        ensure!(status.success(), "{what} failed: {status}");
        Ok(v)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Transport {
    name: String,
    /// (near, far) namespaces; None = the current one.
    ns: Option<(String, String)>,
    far_ip: IpAddr,
}

/// One run's result.
#[derive(Debug, Clone)]
struct Run {
    /// GB/s of image bytes.
    gbps: f64,
    /// CPU seconds of both ends (all threads, user + system) per GB of image bytes.
    cpu_per_gb: f64,
    /// Set if anything was not delivered exactly.
    note: String,
}

fn run_once(t: &Transport, mode: &str, base: &EndArgs, pin: bool) -> Result<Run> {
    let serve_args = EndArgs {
        mode: mode.into(),
        addr: t.far_ip,
        ..base.clone()
    };
    let (near, far) = match &t.ns {
        Some((n, f)) => (Some(n.as_str()), Some(f.as_str())),
        None => (None, None),
    };
    let mut server = Proc::spawn(far, "serve", &serve_args, pin.then_some(1))?;
    let ready = server.line("serve")?;
    let mut words = ready.split_whitespace();
    ensure!(words.next() == Some("ready"), "serve said {ready}");
    let port: u16 = words.next().context("port")?.parse()?;
    let pub_port: u16 = words.next().context("pub port")?.parse()?;
    let client_args = EndArgs {
        port,
        pub_port,
        ..serve_args
    };
    let mut client = Proc::spawn(near, "client", &client_args, pin.then_some(0))?;
    let c = client.json("client")?;
    let c_status = client.child.wait()?;
    ensure!(c_status.success(), "client failed: {c_status}");
    let s = server.finish("serve")?;
    let gbps = c["gbps"].as_f64().context("gbps")?;
    let gb = c["bytes"].as_f64().context("bytes")? / 1e9;
    let cpu = c["cpu"].as_f64().unwrap_or(0.0) + s["cpu"].as_f64().unwrap_or(0.0);
    let mut note = String::new();
    if mode == "repl" {
        let want = base.images + 1;
        // With the assembler's checksum the sender must not have hashed a single image.
        let without_checksum = if base.sender_hashes { want } else { 0 };
        if c["delivered"] != want
            || c["lost"] != 0
            || s["delivered"] != want
            || s["lost"] != 0
            || s["checksum_errors"] != 0
            || c["images_without_checksum"] != without_checksum
        {
            note = format!("NOT EXACT: sender {c} receiver {s}");
        } else {
            note = format!("producer_stalls={}", c["producer_stalls"]);
        }
    } else if s["bytes_received"] != c["bytes"] {
        note = format!("NOT EXACT: sent {c} received {s}");
    }
    Ok(Run {
        gbps,
        cpu_per_gb: cpu / gb,
        note,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn parse_config(c: &str) -> Result<(u16, u16)> {
    let (conns, parts) = c
        .split_once('x')
        .with_context(|| format!("configuration {c}: expected CONNECTIONSxPARTS"))?;
    Ok((conns.parse()?, parts.parse()?))
}

fn orchestrate(b: &BenchArgs) -> Result<()> {
    let configs: Vec<(u16, u16)> = b
        .configs
        .iter()
        .map(|c| parse_config(c))
        .collect::<Result<_>>()?;
    let mut netns = None;
    let mut transports = Vec::new();
    for t in &b.transports {
        match t.as_str() {
            "loopback" => transports.push(Transport {
                name: "loopback".into(),
                ns: None,
                far_ip: "127.0.0.1".parse()?,
            }),
            "veth" => {
                if !sh("[ $(id -u) = 0 ] && command -v ip >/dev/null") {
                    eprintln!("veth SKIPPED: needs root and ip");
                    continue;
                }
                let n = Netns::create(b.veth_mtu)?;
                transports.push(Transport {
                    name: format!("veth (MTU {})", b.veth_mtu),
                    ns: Some((n.near.clone(), n.far.clone())),
                    far_ip: n.far_ip.parse()?,
                });
                netns = Some(n);
            }
            other => bail!("unknown transport {other}"),
        }
    }
    let image_bytes = u64::from(b.height) * u64::from(b.width) * 2;
    if b.pin {
        ensure!(
            sh("command -v taskset >/dev/null") && thread::available_parallelism()?.get() >= 2,
            "--pin needs taskset (util-linux) and at least 2 CPUs"
        );
    }
    println!(
        "# {} images of {}x{} u16 ({} B) per run, {} trials, ring/buffer slots {}{}; {}",
        b.images,
        b.height,
        b.width,
        image_bytes,
        b.trials,
        b.slots,
        if b.pin {
            ", sending end on CPU 0, receiving end on CPU 1"
        } else {
            ""
        },
        if b.sender_hashes {
            "replication images WITHOUT the assembler's checksum (the sender hashes every part)"
        } else {
            "replication images with the assembler's checksum (the sender does not hash)"
        }
    );
    // results[transport][config] = (plain GB/s per trial, replication GB/s per trial)
    let mut results = vec![vec![(Vec::new(), Vec::new()); configs.len()]; transports.len()];
    let mut notes = Vec::new();
    for trial in 0..b.trials {
        for (ti, t) in transports.iter().enumerate() {
            for (ci, &(connections, parts)) in configs.iter().enumerate() {
                let base = EndArgs {
                    mode: String::new(),
                    addr: t.far_ip,
                    port: 0,
                    pub_port: 0,
                    connections,
                    parts,
                    images: b.images,
                    height: b.height,
                    width: b.width,
                    slots: b.slots,
                    sender_hashes: b.sender_hashes,
                };
                // Alternate which mode goes first.
                let order = if trial % 2 == 0 {
                    ["plain", "repl"]
                } else {
                    ["repl", "plain"]
                };
                for mode in order {
                    let run = run_once(t, mode, &base, b.pin)?;
                    println!(
                        "trial {} {} {}x{} {:5} {:.3} GB/s {:.3} CPU-s/GB {}",
                        trial + 1,
                        t.name,
                        connections,
                        parts,
                        mode,
                        run.gbps,
                        run.cpu_per_gb,
                        run.note
                    );
                    if run.note.starts_with("NOT EXACT") {
                        notes.push(run.note.clone());
                    }
                    let r = &mut results[ti][ci];
                    if mode == "plain" {
                        r.0.push(run);
                    } else {
                        r.1.push(run);
                    }
                }
            }
        }
    }
    println!();
    println!(
        "| transport | connections x parts | plain TCP GB/s (median; trials) | replication GB/s \
         (median; trials) | ratio | >= 0.8x | CPU-s/GB plain | CPU-s/GB replication |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let fmt = |v: &[Run]| {
        v.iter()
            .map(|x| format!("{:.2}", x.gbps))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let gbps = |v: &[Run]| median(&v.iter().map(|x| x.gbps).collect::<Vec<_>>());
    let cpu = |v: &[Run]| median(&v.iter().map(|x| x.cpu_per_gb).collect::<Vec<_>>());
    for (ti, t) in transports.iter().enumerate() {
        for (ci, &(connections, parts)) in configs.iter().enumerate() {
            let (p, r) = &results[ti][ci];
            let (mp, mr) = (gbps(p), gbps(r));
            let ratio = mr / mp;
            println!(
                "| {} | {}x{} | {:.2} ({}) | {:.2} ({}) | {:.2} | {} | {:.2} | {:.2} |",
                t.name,
                connections,
                parts,
                mp,
                fmt(p),
                mr,
                fmt(r),
                ratio,
                if ratio >= 0.8 { "yes" } else { "no" },
                cpu(p),
                cpu(r)
            );
        }
    }
    drop(netns);
    ensure!(notes.is_empty(), "some runs were not exact: {notes:?}");
    Ok(())
}
