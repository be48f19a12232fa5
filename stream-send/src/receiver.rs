//! The receiving side: accepts the sender's connections, verifies every part's checksum, writes
//! images into the local ImageBuffer (same layout as the sending host's) strictly in the sender's
//! stream order, and republishes the identical ImageMetadata on the local PUB, so that a writer on
//! this host works unchanged.
//!
//! Threads: the caller's thread is the committer (it owns the ring and the PUB); one accept
//! thread; one reader thread per connection reads frames into a small fixed pool of part buffers
//! and checks them.
//!
//! What it must never do: publish an image as good unless every part arrived with a matching
//! checksum from an intact sender slot; trust any length or field from the wire before checking
//! it; allocate per image (part buffers are allocated once per session and recycled).

use crate::wire::{
    self, FrameHeader, Hello, Kind, Reply, Trailer, PROTOCOL_VERSION, REPLY_ACK, REPLY_MAGIC,
    REPLY_WELCOME, VERDICT_OVERWRITTEN,
};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use image_buffer::RingOwner;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown as NetShutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use std_daq_common::service::Shutdown;
use std_daq_common::{ImageMetadata, ImageStatus};

/// Empty message on the local PUB this often, like the assembler's.
pub const PUB_HEARTBEAT: Duration = Duration::from_millis(200);
const ACK_PERIOD: Duration = Duration::from_millis(50);
const POLL: Duration = Duration::from_millis(20);
const BUFFERS_PER_CONNECTION: usize = 4;

/// What the receiver expects and how patient it is.
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    pub image_bytes: u64,
    pub height: u32,
    pub width: u32,
    pub dtype: u16,
    /// No frame (heartbeats included) on a connection for this long: the session is dropped.
    pub link_timeout: Duration,
    pub stats_period: Duration,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Images committed and republished exactly as sent (whatever their detector status).
    pub images_delivered: u64,
    /// Images the sender announced as lost (overwritten in its ring before or while sending).
    pub images_lost: u64,
    /// Images whose parts failed the checksum: zeroed, flagged `LostInBuffer`, never good.
    pub checksum_errors: u64,
    /// Malformed frames or handshakes (each drops its session).
    pub protocol_errors: u64,
    pub sessions: u64,
    pub bytes_received: u64,
}

impl ReceiverStats {
    /// Every image republished, whatever its status.
    pub fn images_published(&self) -> u64 {
        self.images_delivered + self.images_lost + self.checksum_errors
    }
}

impl fmt::Display for ReceiverStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delivered={} lost={} checksum_errors={} protocol_errors={} sessions={} bytes_received={}",
            self.images_delivered,
            self.images_lost,
            self.checksum_errors,
            self.protocol_errors,
            self.sessions,
            self.bytes_received
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("listener: {0}")]
    Io(#[from] io::Error),
    #[error("ImageBuffer slots of {slot_bytes} bytes cannot hold {image_bytes}-byte images")]
    RingTooSmall { slot_bytes: u64, image_bytes: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartStatus {
    Good,
    Lost,
    Overwritten,
    ChecksumMismatch,
}

#[derive(Debug)]
struct Part {
    hdr: FrameHeader,
    buf: Option<Vec<u8>>,
    status: PartStatus,
}

#[derive(Debug)]
enum FromReader {
    Part(Part),
    Closed(String, bool),
}

#[derive(Debug)]
struct Session {
    hello: Hello,
    streams: Vec<TcpStream>,
    parts_rx: Vec<Receiver<FromReader>>,
    free_tx: Vec<Sender<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    ack: TcpStream,
    /// Parts of the image being collected (index = part).
    collected: Vec<Part>,
}

impl Session {
    fn close(self) {
        for s in &self.streams {
            let _ = s.shutdown(NetShutdown::Both);
        }
        drop(self.parts_rx);
        drop(self.free_tx);
        for r in self.readers {
            let _ = r.join();
        }
    }
}

/// Runs until `shutdown`; returns the final counters. `listener` is bound by the caller.
pub fn run(
    listener: TcpListener,
    ring: &mut RingOwner<ImageMetadata>,
    publisher: &zmq::Socket,
    opts: &ReceiverOptions,
    shutdown: &Shutdown,
) -> Result<ReceiverStats, RecvError> {
    if ring.slot_bytes() < opts.image_bytes {
        return Err(RecvError::RingTooSmall {
            slot_bytes: ring.slot_bytes(),
            image_bytes: opts.image_bytes,
        });
    }
    listener.set_nonblocking(true)?;
    let bytes_received = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let (conn_tx, conn_rx) = bounded::<(Hello, TcpStream)>(256);
    let accept = {
        let (opts, shutdown, rejected) = (opts.clone(), shutdown.clone(), Arc::clone(&rejected));
        thread::Builder::new()
            .name("stream-recv-accept".into())
            .spawn(move || accept_loop(&listener, &conn_tx, &opts, &shutdown, &rejected))?
    };
    let mut c = Committer {
        ring,
        publisher,
        opts,
        stats: ReceiverStats::default(),
        bytes_received,
        stream: None,
        session: None,
        collecting: None,
        stream_checksum_errors: 0,
    };
    let mut last_heartbeat: Option<Instant> = None;
    let mut last_ack = Instant::now();
    let mut last_report = Instant::now();
    while !shutdown.is_triggered() {
        loop {
            match conn_rx.try_recv() {
                Ok((hello, s)) => c.on_connection(hello, s),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    shutdown.trigger();
                    break;
                }
            }
        }
        if c.session.is_some() {
            c.step();
        } else {
            match conn_rx.recv_timeout(POLL) {
                Ok((hello, s)) => c.on_connection(hello, s),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let now = Instant::now();
        if last_heartbeat.is_none_or(|t| now.duration_since(t) >= PUB_HEARTBEAT) {
            let _ = publisher.send(&[][..], zmq::DONTWAIT);
            last_heartbeat = Some(now);
        }
        if now.duration_since(last_ack) >= ACK_PERIOD {
            c.send_ack();
            last_ack = now;
        }
        if now.duration_since(last_report) >= opts.stats_period {
            c.refresh_stats(&rejected);
            tracing::info!("{}", c.stats);
            last_report = now;
        }
    }
    c.send_ack();
    if let Some(s) = c.session.take() {
        s.close();
    }
    let _ = accept.join();
    c.refresh_stats(&rejected);
    tracing::info!("final: {}", c.stats);
    Ok(c.stats)
}

/// An accepted connection and its Hello.
type Conn = (Hello, TcpStream);

struct Committer<'a> {
    ring: &'a mut RingOwner<ImageMetadata>,
    publisher: &'a zmq::Socket,
    opts: &'a ReceiverOptions,
    stats: ReceiverStats,
    bytes_received: Arc<AtomicU64>,
    /// (stream_id, next expected seq) of the stream last served.
    stream: Option<(u64, u64)>,
    session: Option<Session>,
    /// Connections of a session being opened: (session_id, by conn_index).
    collecting: Option<(u64, Vec<Option<Conn>>)>,
    /// Checksum failures on the current stream (reported back to its sender).
    stream_checksum_errors: u64,
}

impl Committer<'_> {
    fn refresh_stats(&mut self, rejected: &AtomicU64) {
        self.stats.bytes_received = self.bytes_received.load(Ordering::Relaxed);
        self.stats.protocol_errors = self
            .stats
            .protocol_errors
            .max(rejected.load(Ordering::Relaxed));
    }

    fn on_connection(&mut self, hello: Hello, s: TcpStream) {
        if self
            .session
            .as_ref()
            .is_some_and(|a| a.hello.session_id != hello.session_id)
        {
            // The sender reconnected: whatever the old session still holds is void.
            tracing::warn!("new session from the sender: dropping the old one");
            if let Some(old) = self.session.take() {
                old.close();
            }
        }
        if self.collecting.as_ref().map(|c| c.0) != Some(hello.session_id) {
            self.collecting = Some((
                hello.session_id,
                (0..hello.n_connections).map(|_| None).collect(),
            ));
        }
        let Some((_, slots)) = self.collecting.as_mut() else {
            return;
        };
        match slots.get_mut(usize::from(hello.conn_index)) {
            Some(slot) => *slot = Some((hello, s)),
            _ => {
                self.stats.protocol_errors += 1;
                return;
            }
        }
        if slots.len() != usize::from(hello.n_connections) {
            self.stats.protocol_errors += 1;
            self.collecting = None;
            return;
        }
        if slots.iter().all(Option::is_some) {
            let Some((_, slots)) = self.collecting.take() else {
                return;
            };
            let conns: Vec<(Hello, TcpStream)> = slots.into_iter().flatten().collect();
            if let Err(e) = self.open_session(conns) {
                tracing::warn!("cannot open session: {e}");
                self.stats.protocol_errors += 1;
            }
        }
    }

    fn open_session(&mut self, conns: Vec<(Hello, TcpStream)>) -> io::Result<()> {
        let hello = conns[0].0;
        if conns.iter().any(|(h, _)| {
            h.stream_id != hello.stream_id
                || h.parts != hello.parts
                || h.first_seq != hello.first_seq
        }) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "connections of one session disagree",
            ));
        }
        let next = match self.stream {
            Some((id, next)) if id == hello.stream_id => next.max(hello.first_seq),
            _ => {
                self.stream_checksum_errors = 0;
                hello.first_seq
            }
        };
        let ack = conns[0].1.try_clone()?;
        ack.set_write_timeout(Some(self.opts.link_timeout))?;
        let welcome = Reply {
            magic: REPLY_MAGIC,
            version: PROTOCOL_VERSION,
            kind: REPLY_WELCOME,
            stream_id: hello.stream_id,
            next_seq: next,
            checksum_errors: self.stream_checksum_errors,
        };
        (&ack).write_all(bytemuck::bytes_of(&welcome))?;
        self.stream = Some((hello.stream_id, next));
        let part_bytes = wire::part_range(self.opts.image_bytes, hello.parts, 0).1 as usize;
        let mut session = Session {
            hello,
            streams: Vec::with_capacity(conns.len()),
            parts_rx: Vec::with_capacity(conns.len()),
            free_tx: Vec::with_capacity(conns.len()),
            readers: Vec::with_capacity(conns.len()),
            ack,
            collected: Vec::with_capacity(usize::from(hello.parts)),
        };
        for (_, s) in conns {
            s.set_read_timeout(Some(self.opts.link_timeout))?;
            let (parts_tx, parts_rx) = bounded::<FromReader>(BUFFERS_PER_CONNECTION);
            let (free_tx, free_rx) = bounded::<Vec<u8>>(BUFFERS_PER_CONNECTION);
            for _ in 0..BUFFERS_PER_CONNECTION {
                let _ = free_tx.send(vec![0u8; part_bytes]);
            }
            session.streams.push(s.try_clone()?);
            let (image_bytes, counter) = (self.opts.image_bytes, Arc::clone(&self.bytes_received));
            let reader = thread::Builder::new()
                .name("stream-recv-reader".into())
                .spawn(move || read_loop(s, image_bytes, &parts_tx, &free_rx, &counter))?;
            session.readers.push(reader);
            session.parts_rx.push(parts_rx);
            session.free_tx.push(free_tx);
        }
        self.stats.sessions += 1;
        tracing::info!(
            connections = hello.n_connections,
            parts = hello.parts,
            resume_seq = next,
            "replication session open"
        );
        self.session = Some(session);
        Ok(())
    }

    fn drop_session(&mut self, why: &str, protocol_error: bool) {
        if protocol_error {
            self.stats.protocol_errors += 1;
        }
        tracing::warn!("replication session closed: {why}");
        if let Some(s) = self.session.take() {
            s.close();
        }
    }

    /// Waits (up to POLL) for the next part of the next image; commits the image when complete.
    fn step(&mut self) {
        let Some((_, next_seq)) = self.stream else {
            return;
        };
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let parts = session.hello.parts;
        let k = session.collected.len() as u16;
        let c = wire::connection_of(next_seq, parts, k, session.hello.n_connections);
        let part = match session.parts_rx[c].recv_timeout(POLL) {
            Ok(FromReader::Part(p)) => p,
            Ok(FromReader::Closed(why, protocol)) => return self.drop_session(&why, protocol),
            Err(RecvTimeoutError::Timeout) => return,
            Err(RecvTimeoutError::Disconnected) => {
                return self.drop_session("reader stopped", false)
            }
        };
        let consistent = part.hdr.seq == next_seq
            && part.hdr.part_index == k
            && part.hdr.part_count == parts
            && session
                .collected
                .first()
                .is_none_or(|p0| p0.hdr.image_id == part.hdr.image_id);
        if !consistent {
            return self.drop_session("frame out of sequence", true);
        }
        session.collected.push(part);
        if session.collected.len() < usize::from(parts) {
            return;
        }
        self.commit(next_seq);
    }

    fn commit(&mut self, seq: u64) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let worst = session
            .collected
            .iter()
            .map(|p| p.status)
            .find(|s| *s != PartStatus::Good)
            .unwrap_or(PartStatus::Good);
        let first = &session.collected[0].hdr;
        let image_id = first.image_id;
        let mut meta = first.meta;
        let image_bytes = self.opts.image_bytes as usize;
        match self.ring.begin_write(image_id) {
            Ok(mut w) => {
                let data = w.data_mut();
                if worst == PartStatus::Good {
                    for p in &session.collected {
                        let (o, l) = (p.hdr.payload_offset as usize, p.hdr.payload_len as usize);
                        if let Some(buf) = &p.buf {
                            data[o..o + l].copy_from_slice(&buf[..l]);
                        }
                    }
                } else {
                    data[..image_bytes].fill(0);
                    meta.status = ImageStatus::LostInBuffer as u16;
                }
                *w.meta_mut() = meta;
                w.commit();
            }
            Err(e) => {
                // Cannot happen for decoded frames (ids are checked); never publish it.
                tracing::error!(image_id, "cannot write image: {e}");
                self.stats.protocol_errors += 1;
                meta.status = ImageStatus::LostInBuffer as u16;
            }
        }
        let _ = self.publisher.send(meta.as_bytes(), zmq::DONTWAIT);
        match worst {
            PartStatus::Good => self.stats.images_delivered += 1,
            PartStatus::Lost | PartStatus::Overwritten => self.stats.images_lost += 1,
            PartStatus::ChecksumMismatch => {
                self.stats.checksum_errors += 1;
                self.stream_checksum_errors += 1;
            }
        }
        for (p, part) in session.collected.drain(..).enumerate() {
            if let Some(buf) = part.buf {
                let c = wire::connection_of(
                    seq,
                    session.hello.parts,
                    p as u16,
                    session.hello.n_connections,
                );
                let _ = session.free_tx[c].try_send(buf);
            }
        }
        self.stream = Some((session.hello.stream_id, seq + 1));
    }

    fn send_ack(&mut self) {
        let (Some(session), Some((stream_id, next))) = (self.session.as_ref(), self.stream) else {
            return;
        };
        let ack = Reply {
            magic: REPLY_MAGIC,
            version: PROTOCOL_VERSION,
            kind: REPLY_ACK,
            stream_id,
            next_seq: next,
            checksum_errors: self.stream_checksum_errors,
        };
        if (&session.ack).write_all(bytemuck::bytes_of(&ack)).is_err() {
            self.drop_session("cannot acknowledge", false);
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    out: &Sender<(Hello, TcpStream)>,
    opts: &ReceiverOptions,
    shutdown: &Shutdown,
    rejected: &AtomicU64,
) {
    while !shutdown.is_triggered() {
        match listener.accept() {
            Ok((s, peer)) => match handshake(&s, opts) {
                Ok(hello) => {
                    if out.send((hello, s)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, "refused a replication connection: {e}");
                }
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(e) => {
                tracing::warn!("accept: {e}");
                thread::sleep(POLL);
            }
        }
    }
}

fn handshake(s: &TcpStream, opts: &ReceiverOptions) -> io::Result<Hello> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    let _ = socket2::SockRef::from(s).set_recv_buffer_size(4 << 20);
    s.set_read_timeout(Some(opts.link_timeout))?;
    let mut b = [0u8; 56];
    let mut r = s;
    r.read_exact(&mut b)?;
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let h = Hello::decode(&b).map_err(|e| invalid(e.to_string()))?;
    if h.image_bytes != opts.image_bytes
        || h.height != opts.height
        || h.width != opts.width
        || h.dtype != opts.dtype
    {
        return Err(invalid(format!(
            "sender's images are {}x{} dtype {} ({} bytes), this host's are {}x{} dtype {} ({} bytes)",
            h.height,
            h.width,
            h.dtype,
            h.image_bytes,
            opts.height,
            opts.width,
            opts.dtype,
            opts.image_bytes
        )));
    }
    Ok(h)
}

fn read_loop(
    mut s: TcpStream,
    image_bytes: u64,
    out: &Sender<FromReader>,
    free: &Receiver<Vec<u8>>,
    bytes: &AtomicU64,
) {
    let closed = |why: String, protocol: bool| {
        let _ = out.send(FromReader::Closed(why, protocol));
    };
    let mut hb = [0u8; 136];
    loop {
        if let Err(e) = s.read_exact(&mut hb) {
            return closed(format!("connection: {e}"), false);
        }
        let hdr = match FrameHeader::decode(&hb, image_bytes) {
            Ok(h) => h,
            Err(e) => return closed(e.to_string(), true),
        };
        let part = match hdr.kind() {
            Some(Kind::Heartbeat) | None => continue,
            Some(Kind::Lost) => Part {
                hdr,
                buf: None,
                status: PartStatus::Lost,
            },
            Some(Kind::Image) => {
                let Ok(mut buf) = free.recv() else { return };
                // decode() checked payload_len against this host's part size.
                let len = hdr.payload_len as usize;
                if buf.len() < len {
                    return closed("payload longer than a part".into(), true);
                }
                let mut tb = [0u8; 16];
                if let Err(e) = s
                    .read_exact(&mut buf[..len])
                    .and_then(|()| s.read_exact(&mut tb))
                {
                    return closed(format!("connection: {e}"), false);
                }
                let trailer = match Trailer::decode(&tb) {
                    Ok(t) => t,
                    Err(e) => return closed(e.to_string(), true),
                };
                bytes.fetch_add(len as u64 + 152, Ordering::Relaxed);
                let status = if trailer.verdict == VERDICT_OVERWRITTEN {
                    PartStatus::Overwritten
                } else if wire::checksum(&buf[..len]) != trailer.checksum {
                    PartStatus::ChecksumMismatch
                } else {
                    PartStatus::Good
                };
                Part {
                    hdr,
                    buf: Some(buf),
                    status,
                }
            }
        };
        if out.send(FromReader::Part(part)).is_err() {
            return;
        }
    }
}
