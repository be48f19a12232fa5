//! The sending side: follows the local ImageMetadata stream (ZMQ SUB), queues every image in
//! order, and sends metadata plus slot bytes straight from the local ImageBuffer over
//! `n_connections` TCP connections to `std-stream-recv`.
//!
//! Threads: the caller's thread follows the SUB (it must never block on the network, so the
//! PUB/SUB high-water mark is never reached while the link is slow or down) and does the
//! bookkeeping; a link thread connects, schedules the queue onto the workers and reconnects; one
//! worker per connection writes frames; one thread reads the receiver's acknowledgements.
//!
//! Checksums: an image whose metadata carries the assembler's end-to-end checksum
//! (`checksum_kind` [`wire::CHECKSUM_XXH3_BLOCKS`], computed once when the image was made) is
//! sent without a payload hash of its own: the slot is read once, by the socket write, and the
//! receiver verifies the assembler's checksum. Only images without one (an older or checksum-less
//! producer) are hashed here, part by part, into the trailer as before; they are counted in
//! `images_without_checksum`.
//!
//! What it must never do: drop an image silently. Every queued image ends either confirmed
//! delivered or confirmed lost (`LostInBuffer`, published on `lost_publisher`), or is reported as
//! unconfirmed at shutdown. It never sends a slot's bytes as good unless the slot's seqlock held
//! the image for the whole send.

use crate::wire::{
    self, FrameHeader, Hello, Kind, Reply, Trailer, FRAME_MAGIC, HELLO_MAGIC, PROTOCOL_VERSION,
    REPLY_WELCOME, TRAILER_MAGIC, VERDICT_INTACT, VERDICT_OVERWRITTEN,
};
use crossbeam_channel::{bounded, RecvTimeoutError, SendTimeoutError, Sender};
use image_buffer::RingReader;
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown as NetShutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};
use std_daq_common::service::Shutdown;
use std_daq_common::status::StatusBoard;
use std_daq_common::{ImageMetadata, ImageStatus};

/// Bytes on the wire per Image frame besides its payload (header + trailer).
const FRAME_OVERHEAD: usize = wire::FRAME_HEADER_BYTES + std::mem::size_of::<Trailer>();
/// Idle connections send a heartbeat frame this often.
pub const HEARTBEAT: Duration = Duration::from_millis(200);
const POLL_MS: i64 = 10;
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// How to send.
#[derive(Debug, Clone)]
pub struct SenderOptions {
    pub target: SocketAddr,
    /// Parallel TCP connections.
    pub connections: u16,
    /// Parts each image is split into (1 = whole images spread over the connections).
    pub parts: u16,
    pub image_bytes: u64,
    pub height: u32,
    pub width: u32,
    pub dtype: u16,
    /// No acknowledgement for this long: the link is considered down and reconnected.
    pub link_timeout: Duration,
    pub stats_period: Duration,
    /// At shutdown, how long to wait for the receiver to confirm what is queued.
    pub drain_timeout: Duration,
    /// Where the counters are shown (Redis status hash, Prometheus), every `stats_period` and at
    /// the end.
    pub status: StatusBoard,
}

/// Counters; `images_delivered + images_lost + unconfirmed == images_queued` at the end.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SenderStats {
    pub images_queued: u64,
    /// Confirmed by the receiver and sent from an intact slot.
    pub images_delivered: u64,
    /// Confirmed by the receiver as lost: the slot was overwritten before or while it was sent.
    pub images_lost: u64,
    /// Queued but not confirmed by the receiver when the sender stopped.
    pub images_unconfirmed: u64,
    /// Messages on the local stream that were not ImageMetadata of this detector's image size.
    pub invalid_messages: u64,
    /// Sessions (sets of connections) opened; more than one means reconnections.
    pub sessions: u64,
    /// Checksum failures the receiver reported (its images are flagged there, never good).
    pub receiver_checksum_errors: u64,
    /// Queued images whose metadata carried no assembler checksum (`checksum_kind` not
    /// CHECKSUM_XXH3_BLOCKS): this sender hashed their parts itself (the fallback).
    pub images_without_checksum: u64,
    pub bytes_sent: u64,
    /// Most images waiting (queued, not yet confirmed) at once.
    pub max_backlog: u64,
}

impl SenderStats {
    /// Shows the counters in the service's status hash (and so on its metrics endpoint).
    pub fn publish(&self, board: &StatusBoard) {
        board.set("images_queued", self.images_queued);
        board.set("images_delivered", self.images_delivered);
        board.set("images_lost", self.images_lost);
        board.set("images_unconfirmed", self.images_unconfirmed);
        board.set("invalid_messages", self.invalid_messages);
        board.set("sessions", self.sessions);
        board.set("receiver_checksum_errors", self.receiver_checksum_errors);
        board.set("images_without_checksum", self.images_without_checksum);
        board.set("bytes_sent", self.bytes_sent);
        board.set("max_backlog", self.max_backlog);
    }
}

impl fmt::Display for SenderStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "queued={} delivered={} lost={} unconfirmed={} invalid_messages={} sessions={} \
             receiver_checksum_errors={} images_without_checksum={} bytes_sent={} max_backlog={}",
            self.images_queued,
            self.images_delivered,
            self.images_lost,
            self.images_unconfirmed,
            self.invalid_messages,
            self.sessions,
            self.receiver_checksum_errors,
            self.images_without_checksum,
            self.bytes_sent,
            self.max_backlog
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("ZMQ: {0}")]
    Zmq(#[from] zmq::Error),
    #[error("invalid sender options: {0}")]
    Options(String),
    #[error("spawning a thread: {0}")]
    Thread(io::Error),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    meta: ImageMetadata,
    /// Some part was sent as Lost or with an Overwritten verdict.
    sent_lost: bool,
}

#[derive(Debug)]
struct State {
    /// `entries[i]` is stream position `base + i`; everything below `base` is confirmed.
    entries: VecDeque<Entry>,
    base: u64,
    next_send: u64,
    /// From the receiver: every seq below this is committed there.
    acked_next: u64,
    checksum_errors: u64,
    session_dead: bool,
    stop: bool,
    /// The local stream delivered its first message (a heartbeat at the latest): the
    /// subscription is live, so no image published from now on can be missed.
    subscribed: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    bytes_sent: AtomicU64,
    sessions: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a thread panicked; the counters are still meaningful.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn mark_dead(&self) {
        self.lock().session_dead = true;
        self.cond.notify_all();
    }
}

/// Runs until `shutdown`, then drains (up to `drain_timeout`) and returns the final counters.
/// `sub` must already be connected and subscribed to the local image stream; `lost_publisher`
/// (optional) gets the ImageMetadata of every image confirmed lost.
pub fn run(
    opts: &SenderOptions,
    sub: &zmq::Socket,
    ring: Arc<RingReader<ImageMetadata>>,
    lost_publisher: Option<&zmq::Socket>,
    shutdown: &Shutdown,
) -> Result<SenderStats, SendError> {
    if opts.connections == 0 || opts.connections > wire::MAX_CONNECTIONS {
        return Err(SendError::Options(format!(
            "connections must be in 1..={}",
            wire::MAX_CONNECTIONS
        )));
    }
    if opts.parts == 0 || opts.parts > wire::MAX_CONNECTIONS {
        return Err(SendError::Options(format!(
            "parts must be in 1..={}",
            wire::MAX_CONNECTIONS
        )));
    }
    if opts.image_bytes > ring.slot_bytes() {
        return Err(SendError::Options(format!(
            "image of {} bytes does not fit the ring's {}-byte slots",
            opts.image_bytes,
            ring.slot_bytes()
        )));
    }
    let capacity = (ring.n_slots() as usize * 2).max(4096);
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            entries: VecDeque::with_capacity(capacity),
            base: 0,
            next_send: 0,
            acked_next: 0,
            checksum_errors: 0,
            session_dead: true,
            stop: false,
            subscribed: false,
        }),
        cond: Condvar::new(),
        bytes_sent: AtomicU64::new(0),
        sessions: AtomicU64::new(0),
    });
    let link = {
        let (opts, shared, ring) = (opts.clone(), Arc::clone(&shared), Arc::clone(&ring));
        thread::Builder::new()
            .name("stream-send-link".into())
            .spawn(move || link_loop(&opts, &shared, &ring))
            .map_err(SendError::Thread)?
    };

    let mut stats = SenderStats::default();
    let mut buf = [0u8; std_daq_common::messages::RECV_BUFFER_BYTES];
    let mut last_report = Instant::now();
    let mut drain_deadline: Option<Instant> = None;
    let result = loop {
        if shutdown.is_triggered() && drain_deadline.is_none() {
            drain_deadline = Some(Instant::now() + opts.drain_timeout);
        }
        if drain_deadline.is_none() {
            let mut items = [sub.as_poll_item(zmq::POLLIN)];
            match zmq::poll(&mut items, POLL_MS) {
                Ok(_) | Err(zmq::Error::EINTR) => {}
                Err(e) => break Err(e.into()),
            }
            if items[0].is_readable() {
                let mut st = shared.lock();
                st.subscribed = true;
                loop {
                    match sub.recv_into(&mut buf, zmq::DONTWAIT) {
                        Ok(0) => {} // heartbeat of the local assembler
                        Ok(n) if n > buf.len() => stats.invalid_messages += 1,
                        Ok(n) => match ImageMetadata::from_bytes(&buf[..n]) {
                            Ok(meta) if meta.data_bytes == opts.image_bytes => {
                                if meta.checksum_kind != wire::CHECKSUM_XXH3_BLOCKS {
                                    stats.images_without_checksum += 1;
                                    if stats.images_without_checksum == 1 {
                                        tracing::warn!(
                                            image_id = meta.image_id,
                                            checksum_kind = meta.checksum_kind,
                                            "images without the assembler's checksum: this \
                                             sender hashes them itself (counted in \
                                             images_without_checksum; logged once)"
                                        );
                                    }
                                }
                                st.entries.push_back(Entry {
                                    meta,
                                    sent_lost: false,
                                });
                                stats.images_queued += 1;
                            }
                            _ => stats.invalid_messages += 1,
                        },
                        Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                stats.max_backlog = stats.max_backlog.max(st.entries.len() as u64);
                drop(st);
                shared.cond.notify_all();
            }
        } else {
            let st = shared.lock();
            let _ = shared
                .cond
                .wait_timeout(st, Duration::from_millis(POLL_MS as u64));
        }
        confirm(&shared, &mut stats, lost_publisher);
        let now = Instant::now();
        if let Some(deadline) = drain_deadline {
            let st = shared.lock();
            if st.entries.is_empty() || now >= deadline {
                break Ok(());
            }
        }
        if now.duration_since(last_report) >= opts.stats_period {
            stats.bytes_sent = shared.bytes_sent.load(Ordering::Relaxed);
            stats.sessions = shared.sessions.load(Ordering::Relaxed);
            let backlog = shared.lock().entries.len();
            tracing::info!(backlog, "{stats}");
            stats.publish(&opts.status);
            opts.status.set("backlog", backlog);
            last_report = now;
        }
    };
    {
        let mut st = shared.lock();
        st.stop = true;
        st.session_dead = true;
    }
    shared.cond.notify_all();
    let _ = link.join();
    confirm(&shared, &mut stats, lost_publisher);
    let st = shared.lock();
    stats.images_unconfirmed = st.entries.len() as u64;
    stats.receiver_checksum_errors = st.checksum_errors;
    stats.bytes_sent = shared.bytes_sent.load(Ordering::Relaxed);
    stats.sessions = shared.sessions.load(Ordering::Relaxed);
    if stats.images_unconfirmed > 0 {
        tracing::error!(
            unconfirmed = stats.images_unconfirmed,
            first = st.entries.front().map(|e| e.meta.image_id),
            "images not confirmed by the receiver at shutdown"
        );
    }
    tracing::info!("final: {stats}");
    stats.publish(&opts.status);
    result.map(|()| stats)
}

/// Pops every confirmed entry and counts it; lost ones are published.
fn confirm(shared: &Shared, stats: &mut SenderStats, lost_publisher: Option<&zmq::Socket>) {
    let mut st = shared.lock();
    while st.base < st.acked_next {
        let Some(e) = st.entries.pop_front() else {
            break;
        };
        st.base += 1;
        if e.sent_lost {
            stats.images_lost += 1;
            if let Some(p) = lost_publisher {
                let mut meta = e.meta;
                meta.status = ImageStatus::LostInBuffer as u16;
                let _ = p.send(meta.as_bytes(), zmq::DONTWAIT);
            }
        } else {
            stats.images_delivered += 1;
        }
    }
    stats.receiver_checksum_errors = st.checksum_errors;
}

#[derive(Debug, Clone, Copy)]
struct Job {
    seq: u64,
    part: u16,
    meta: ImageMetadata,
}

/// Connects, schedules, reconnects; returns when `stop` is set.
fn link_loop(opts: &SenderOptions, shared: &Arc<Shared>, ring: &Arc<RingReader<ImageMetadata>>) {
    let stream_id = random_id();
    let mut warned = false;
    loop {
        {
            // Connect only once subscribed: a receiver's open session then means that
            // everything published on the local stream from now on is replicated.
            let mut st = shared.lock();
            while !st.subscribed && !st.stop {
                st = shared
                    .cond
                    .wait_timeout(st, RECONNECT_PAUSE)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if st.stop {
                return;
            }
        }
        let streams = match open_session(opts, shared, stream_id) {
            Ok(s) => {
                warned = false;
                s
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(target = %opts.target, "cannot open replication session: {e}; retrying");
                    warned = true;
                }
                let st = shared.lock();
                if !st.stop {
                    let _ = shared.cond.wait_timeout(st, RECONNECT_PAUSE);
                }
                continue;
            }
        };
        shared.sessions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(target = %opts.target, connections = opts.connections, "replication session open");
        run_session(opts, shared, ring, &streams);
        for s in &streams {
            let _ = s.shutdown(NetShutdown::Both);
        }
        tracing::warn!("replication session closed");
    }
}

fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn open_session(
    opts: &SenderOptions,
    shared: &Shared,
    stream_id: u64,
) -> io::Result<Vec<TcpStream>> {
    let session_id = random_id();
    let first_seq = shared.lock().base;
    let mut streams = Vec::with_capacity(usize::from(opts.connections));
    for i in 0..opts.connections {
        let s = TcpStream::connect_timeout(&opts.target, opts.link_timeout)?;
        s.set_nodelay(true)?;
        let sock = socket2::SockRef::from(&s);
        let _ = sock.set_tcp_user_timeout(Some(opts.link_timeout));
        let _ = sock.set_send_buffer_size(4 << 20);
        let hello = Hello {
            magic: HELLO_MAGIC,
            version: PROTOCOL_VERSION,
            conn_index: i,
            n_connections: opts.connections,
            parts: opts.parts,
            height: opts.height,
            stream_id,
            session_id,
            first_seq,
            image_bytes: opts.image_bytes,
            width: opts.width,
            dtype: opts.dtype,
            reserved: 0,
        };
        s.set_write_timeout(Some(opts.link_timeout))?;
        (&s).write_all(bytemuck::bytes_of(&hello))?;
        s.set_write_timeout(None)?;
        streams.push(s);
    }
    let conn0 = &streams[0];
    conn0.set_read_timeout(Some(opts.link_timeout))?;
    let mut b = [0u8; 32];
    (&*conn0).read_exact(&mut b)?;
    let welcome = Reply::decode(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if welcome.kind != REPLY_WELCOME || welcome.stream_id != stream_id {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the receiver did not welcome this stream",
        ));
    }
    let mut st = shared.lock();
    let end = st.base + st.entries.len() as u64;
    let resume = welcome.next_seq.clamp(st.base, end.max(st.base));
    st.acked_next = st.acked_next.max(resume);
    st.next_send = resume;
    st.session_dead = false;
    Ok(streams)
}

/// Runs one session until a connection fails, the receiver stops acknowledging, or `stop`.
fn run_session(
    opts: &SenderOptions,
    shared: &Arc<Shared>,
    ring: &Arc<RingReader<ImageMetadata>>,
    streams: &[TcpStream],
) {
    let mut workers = Vec::with_capacity(streams.len());
    let mut jobs: Vec<Sender<Job>> = Vec::with_capacity(streams.len());
    let stop_ack = Arc::new(AtomicBool::new(false));
    let ack_reader = streams[0].try_clone().ok().and_then(|s| {
        let (shared, stop_ack, timeout) =
            (Arc::clone(shared), Arc::clone(&stop_ack), opts.link_timeout);
        thread::Builder::new()
            .name("stream-send-ack".into())
            .spawn(move || ack_loop(s, &shared, &stop_ack, timeout))
            .ok()
    });
    for s in streams {
        let (tx, rx) = bounded::<Job>(4);
        let Ok(stream) = s.try_clone() else {
            shared.mark_dead();
            break;
        };
        let (shared2, ring, opts) = (Arc::clone(shared), Arc::clone(ring), opts.clone());
        match thread::Builder::new()
            .name("stream-send-worker".into())
            .spawn(move || {
                let mut w = Worker {
                    stream,
                    shared: &shared2,
                    ring: &ring,
                    opts: &opts,
                };
                if let Err(e) = w.run(&rx) {
                    tracing::warn!("replication connection failed: {e}");
                    shared2.mark_dead();
                }
            }) {
            Ok(h) => {
                workers.push(h);
                jobs.push(tx);
            }
            Err(_) => shared.mark_dead(),
        }
    }
    if ack_reader.is_none() {
        shared.mark_dead();
    }
    // Schedule: stream position by stream position, part k onto its fixed connection.
    'schedule: loop {
        let (seq, meta) = {
            let mut st = shared.lock();
            loop {
                if st.session_dead || st.stop {
                    break 'schedule;
                }
                let end = st.base + st.entries.len() as u64;
                if st.next_send < end {
                    break;
                }
                st = shared
                    .cond
                    .wait_timeout(st, HEARTBEAT)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let seq = st.next_send;
            st.next_send += 1;
            let idx = (seq - st.base) as usize;
            (seq, st.entries[idx].meta)
        };
        for part in 0..opts.parts {
            let c = wire::connection_of(seq, opts.parts, part, opts.connections);
            let mut job = Job { seq, part, meta };
            loop {
                match jobs[c].send_timeout(job, HEARTBEAT) {
                    Ok(()) => break,
                    Err(SendTimeoutError::Timeout(j)) => {
                        let st = shared.lock();
                        if st.session_dead || st.stop {
                            break 'schedule;
                        }
                        job = j;
                    }
                    Err(SendTimeoutError::Disconnected(_)) => {
                        shared.mark_dead();
                        break 'schedule;
                    }
                }
            }
        }
    }
    // Unblock everything: workers blocked in write and the ack reader see errors.
    stop_ack.store(true, Ordering::Relaxed);
    for s in streams {
        let _ = s.shutdown(NetShutdown::Both);
    }
    drop(jobs);
    for w in workers {
        let _ = w.join();
    }
    if let Some(a) = ack_reader {
        let _ = a.join();
    }
}

fn ack_loop(mut s: TcpStream, shared: &Shared, stop: &AtomicBool, timeout: Duration) {
    if s.set_read_timeout(Some(timeout)).is_err() {
        shared.mark_dead();
        return;
    }
    let mut b = [0u8; 32];
    loop {
        if let Err(e) = s.read_exact(&mut b) {
            if !stop.load(Ordering::Relaxed) {
                tracing::warn!("no acknowledgement from the receiver: {e}");
            }
            break;
        }
        match Reply::decode(&b) {
            Ok(r) if r.kind == wire::REPLY_ACK => {
                let mut st = shared.lock();
                let end = st.base + st.entries.len() as u64;
                // Never past what was sent: a confused receiver must not confirm unsent images.
                st.acked_next = st.acked_next.max(r.next_seq.min(end).min(st.next_send));
                st.checksum_errors = r.checksum_errors;
            }
            _ => {
                tracing::warn!("invalid reply from the receiver");
                break;
            }
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    shared.mark_dead();
}

struct Worker<'a> {
    stream: TcpStream,
    shared: &'a Shared,
    ring: &'a RingReader<ImageMetadata>,
    opts: &'a SenderOptions,
}

impl Worker<'_> {
    fn run(&mut self, jobs: &crossbeam_channel::Receiver<Job>) -> io::Result<()> {
        loop {
            match jobs.recv_timeout(HEARTBEAT) {
                Ok(job) => self.send(&job)?,
                Err(RecvTimeoutError::Timeout) => {
                    let hb = FrameHeader {
                        kind: Kind::Heartbeat as u16,
                        ..self.header(0, 0, &bytemuck::Zeroable::zeroed())
                    };
                    self.stream.write_all(bytemuck::bytes_of(&hb))?;
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }

    fn header(&self, seq: u64, part: u16, meta: &ImageMetadata) -> FrameHeader {
        let (offset, len) = wire::part_range(self.opts.image_bytes, self.opts.parts, part);
        FrameHeader {
            magic: FRAME_MAGIC,
            version: PROTOCOL_VERSION,
            kind: Kind::Image as u16,
            seq,
            image_id: meta.image_id,
            payload_offset: offset,
            payload_len: len,
            part_index: part,
            part_count: self.opts.parts,
            reserved: 0,
            meta: *meta,
        }
    }

    fn mark_lost(&self, seq: u64) {
        let mut st = self.shared.lock();
        if seq >= st.base {
            let idx = (seq - st.base) as usize;
            if let Some(e) = st.entries.get_mut(idx) {
                e.sent_lost = true;
            }
        }
    }

    fn send(&mut self, job: &Job) -> io::Result<()> {
        let header = self.header(job.seq, job.part, &job.meta);
        let (offset, len) = (header.payload_offset as usize, header.payload_len as usize);
        let ring = self.ring;
        let stream = &mut self.stream;
        let mut wrote = false;
        let sent = ring.read(job.meta.image_id, |meta, data| {
            let Some(payload) = data.get(offset..offset + len) else {
                return Ok(None);
            };
            // The assembler's checksum covers these bytes: the receiver verifies it, nothing to
            // hash here. Without one (the fallback), hash the part as it is sent.
            let sum = if meta.checksum_kind == wire::CHECKSUM_XXH3_BLOCKS {
                0
            } else {
                wire::checksum(payload)
            };
            let h = FrameHeader {
                meta: *meta,
                ..header
            };
            wrote = true;
            stream.write_all(bytemuck::bytes_of(&h))?;
            stream.write_all(payload)?;
            Ok(Some(sum))
        });
        match sent {
            Ok(Ok(Some(sum))) => {
                self.write_trailer(sum, VERDICT_INTACT)?;
                self.shared
                    .bytes_sent
                    .fetch_add((len + FRAME_OVERHEAD) as u64, Ordering::Relaxed);
                return Ok(());
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) | Err(_) => {}
        }
        // Lost: marked before the receiver can learn it, so its ack finds the mark.
        self.mark_lost(job.seq);
        if wrote {
            // The bytes already on the wire may be torn: the trailer voids them.
            self.write_trailer(0, VERDICT_OVERWRITTEN)
        } else {
            let mut meta = job.meta;
            meta.status = ImageStatus::LostInBuffer as u16;
            let lost = FrameHeader {
                kind: Kind::Lost as u16,
                payload_offset: 0,
                payload_len: 0,
                ..self.header(job.seq, job.part, &meta)
            };
            self.stream.write_all(bytemuck::bytes_of(&lost))
        }
    }

    fn write_trailer(&mut self, checksum: u64, verdict: u32) -> io::Result<()> {
        let t = Trailer {
            checksum,
            verdict,
            magic: TRAILER_MAGIC,
        };
        self.stream.write_all(bytemuck::bytes_of(&t))
    }
}
