//! The receiving side: accepts the sender's connections, verifies every image's checksum, writes
//! images into the local ImageBuffer (same layout as the sending host's) strictly in the sender's
//! stream order, and republishes the identical ImageMetadata on the local PUB, so that a writer on
//! this host works unchanged.
//!
//! Threads: the caller's thread is the committer (it commits images in stream order and owns the
//! PUB); one accept thread; one reader thread per connection reads each part's bytes straight
//! into its range of the image's ring slot (a [`SharedRing`] claim, no intermediate buffer), one
//! 256 KiB checksum block at a time, digesting each block right after it arrived (while it is in
//! cache), and checks the trailer.
//!
//! Checksums: parts lie on the block grid of the assembler's end-to-end checksum
//! ([`wire::part_range`]), so each reader digests its part's blocks independently, whatever order
//! the parts arrive in. For an image with `checksum_kind` CHECKSUM_XXH3_BLOCKS the committer,
//! once all parts are in, combines the block digests in block order and compares the result with
//! `meta.checksum` (the assembler's). For an image without one, each part's xxh3-64 is compared
//! with the sender's [`wire::Trailer::checksum`] instead (the fallback). Either mismatch, or parts
//! whose headers disagree on the image's metadata, makes the image a checksum error: zeroed,
//! committed and published with status `LostInBuffer`, counted, never good.
//!
//! What it must never do: publish an image as good unless its checksum matched and every part
//! came from an intact sender slot; trust any length or field from the wire before checking it;
//! allocate per image (block digest lists are recycled through a pool); let an image's claim on a
//! slot destroy another image's written parts.

use crate::wire::{
    self, FrameHeader, Hello, Kind, Reply, Trailer, PROTOCOL_VERSION, REPLY_ACK, REPLY_MAGIC,
    REPLY_WELCOME, VERDICT_OVERWRITTEN,
};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use image_buffer::{ClaimError, PartWriter, SharedRing};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown as NetShutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use std_daq_common::checksum::{self, BLOCK_BYTES, CHECKSUM_XXH3_BLOCKS};
use std_daq_common::service::Shutdown;
use std_daq_common::status::StatusBoard;
use std_daq_common::{ImageMetadata, ImageStatus};

/// Empty message on the local PUB this often, like the assembler's.
pub const PUB_HEARTBEAT: Duration = Duration::from_millis(200);
const ACK_PERIOD: Duration = Duration::from_millis(50);
const POLL: Duration = Duration::from_millis(20);
/// Parts a reader may have read ahead of the committer, per connection.
const PARTS_QUEUED_PER_CONNECTION: usize = 4;
/// Bytes read (then hashed) at a time: one checksum block (parts start on the block grid, so
/// every read is exactly one block, the image's last one possibly shorter); small enough to be
/// hashed from L2 right after the read.
const READ_CHUNK: usize = BLOCK_BYTES;
/// Bytes on the wire per Image frame besides its payload (header + trailer).
const FRAME_OVERHEAD: u64 = (wire::FRAME_HEADER_BYTES + std::mem::size_of::<Trailer>()) as u64;
/// How often a reader retries a slot still held by an older image the committer has not yet
/// committed (only when image ids in flight are a multiple of the ring size apart).
const SLOT_RETRY: Duration = Duration::from_micros(200);

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
    /// Where the counters are shown (Redis status hash, Prometheus), every `stats_period` and at
    /// the end.
    pub status: StatusBoard,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Images committed and republished exactly as sent (whatever their detector status).
    pub images_delivered: u64,
    /// Images the sender announced as lost (overwritten in its ring before or while sending).
    pub images_lost: u64,
    /// Images that failed the checksum (the assembler's image checksum, or for images without
    /// one the sender's per-part checksum), or whose parts disagreed on the metadata: zeroed,
    /// flagged `LostInBuffer`, never good.
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

impl ReceiverStats {
    /// Shows the counters in the service's status hash (and so on its metrics endpoint).
    pub fn publish(&self, board: &StatusBoard) {
        board.set("images_delivered", self.images_delivered);
        board.set("images_lost", self.images_lost);
        board.set("checksum_errors", self.checksum_errors);
        board.set("protocol_errors", self.protocol_errors);
        board.set("sessions", self.sessions);
        board.set("bytes_received", self.bytes_received);
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
    /// Good: its bytes are in the image's ring slot (the reader's claim has ended; the slot stays
    /// reserved for the image until it is committed). For an image with the assembler's checksum
    /// Good means intact at the sender: the committer checks the checksum.
    status: PartStatus,
    /// The block digests of its payload in block order (`checksum::block_digest`), for images
    /// with the assembler's checksum; empty otherwise. From and back to the session's pool.
    digests: Vec<u64>,
}

// Parts are nearly every message and travel by value: boxing them would allocate per part.
#[allow(clippy::large_enum_variant)]
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
    readers: Vec<JoinHandle<()>>,
    ack: TcpStream,
    /// Parts of the image being collected (index = part).
    collected: Vec<Part>,
    /// Where the committer returns the parts' digest lists for the readers to reuse.
    digest_pool: Sender<Vec<u64>>,
    /// The image's block digests in block order (capacity: one image's blocks).
    image_digests: Vec<u64>,
}

impl Session {
    fn close(self) {
        for s in &self.streams {
            let _ = s.shutdown(NetShutdown::Both);
        }
        drop(self.parts_rx);
        for r in self.readers {
            let _ = r.join();
        }
    }
}

/// Runs until `shutdown`; returns the final counters. `listener` is bound by the caller.
pub fn run(
    listener: TcpListener,
    ring: &SharedRing<ImageMetadata>,
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
            c.stats.publish(&opts.status);
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
    c.stats.publish(&opts.status);
    Ok(c.stats)
}

/// An accepted connection and its Hello.
type Conn = (Hello, TcpStream);

struct Committer<'a> {
    ring: &'a SharedRing<ImageMetadata>,
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
        // Digest lists in flight: up to PARTS_QUEUED_PER_CONNECTION queued + one being read per
        // connection, plus the parts the committer collects.
        let pool_len = conns.len() * (PARTS_QUEUED_PER_CONNECTION + 2) + usize::from(hello.parts);
        let (digest_pool, pool_rx) = bounded::<Vec<u64>>(pool_len);
        let image_blocks = checksum::block_count(self.opts.image_bytes as usize);
        let mut session = Session {
            hello,
            streams: Vec::with_capacity(conns.len()),
            parts_rx: Vec::with_capacity(conns.len()),
            readers: Vec::with_capacity(conns.len()),
            ack,
            collected: Vec::with_capacity(usize::from(hello.parts)),
            digest_pool,
            image_digests: Vec::with_capacity(image_blocks),
        };
        for (_, s) in conns {
            s.set_read_timeout(Some(self.opts.link_timeout))?;
            let (parts_tx, parts_rx) = bounded::<FromReader>(PARTS_QUEUED_PER_CONNECTION);
            session.streams.push(s.try_clone()?);
            let reader = Reader {
                stream: s,
                image_bytes: self.opts.image_bytes,
                link_timeout: self.opts.link_timeout,
                ring: self.ring.clone(),
                bytes: Arc::clone(&self.bytes_received),
                digest_pool: pool_rx.clone(),
            };
            let reader = thread::Builder::new()
                .name("stream-recv-reader".into())
                .spawn(move || reader.run(&parts_tx))?;
            session.readers.push(reader);
            session.parts_rx.push(parts_rx);
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
        // Its readers are joined and its parts dropped: images it started stay uncommitted.
        let emptied = self.ring.abandon_unfinished();
        if emptied > 0 {
            tracing::info!(
                images = emptied,
                "emptied the ring slots of unfinished images (the sender resends them)"
            );
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
        let mut worst = session
            .collected
            .iter()
            .map(|p| p.status)
            .find(|s| *s != PartStatus::Good)
            .unwrap_or(PartStatus::Good);
        let first = &session.collected[0].hdr;
        let image_id = first.image_id;
        let mut meta = first.meta;
        let image_bytes = self.opts.image_bytes as usize;
        if worst == PartStatus::Good && !image_checksum_ok(session, &meta) {
            worst = PartStatus::ChecksumMismatch;
        }
        for p in session.collected.drain(..) {
            if p.digests.capacity() > 0 {
                // Full only if more lists were made than are ever in flight: then it is freed.
                let _ = session.digest_pool.try_send(p.digests);
            }
        }
        if worst != PartStatus::Good {
            mark_lost(&mut meta);
            // Never leave an image's bytes half-replaced: zero the whole image.
            match self.ring.claim(image_id, seq, 0, image_bytes) {
                Ok(mut w) => w.data_mut().fill(0),
                Err(e) => {
                    // The slot is held by a newer image (ids a ring-size multiple apart): this
                    // one is published as lost without touching it.
                    tracing::warn!(image_id, "lost image not zeroed in the ring: {e}");
                    worst = PartStatus::Lost;
                }
            }
        }
        if let Err(e) = self.ring.commit(image_id, meta) {
            if worst == PartStatus::Good {
                tracing::error!(image_id, "cannot commit image: {e}");
                self.stats.protocol_errors += 1;
                worst = PartStatus::Lost;
            }
            mark_lost(&mut meta);
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

/// The metadata of an image published with zero pixels (or not committed): status
/// `LostInBuffer`, and no checksum, because the assembler's no longer describes the pixels (a
/// writer stores the metadata's checksum with the image; `checksum_kind` 0 is the file format's
/// "the pixels are not the assembler's", docs/file-format.md).
fn mark_lost(meta: &mut ImageMetadata) {
    meta.status = ImageStatus::LostInBuffer as u16;
    meta.checksum = 0;
    meta.checksum_kind = checksum::CHECKSUM_NONE;
}

/// Whether the intact parts collected for one image (all of them, in part order) are the image
/// the assembler checksummed: every part's header carries the same metadata as part 0's (`meta`),
/// and for an image with the assembler's checksum the block digests, combined in block order,
/// equal `meta.checksum`. (Without one, each part was already checked against its trailer.)
fn image_checksum_ok(session: &mut Session, meta: &ImageMetadata) -> bool {
    if session.collected.iter().any(|p| p.hdr.meta != *meta) {
        return false;
    }
    if meta.checksum_kind != CHECKSUM_XXH3_BLOCKS {
        return true;
    }
    session.image_digests.clear();
    for p in &session.collected {
        let len = usize::try_from(p.hdr.payload_len).unwrap_or(usize::MAX);
        if p.digests.len() != checksum::block_count(len) {
            return false;
        }
        session.image_digests.extend_from_slice(&p.digests);
    }
    checksum::combine(&session.image_digests) == meta.checksum
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

/// One connection's reader thread.
struct Reader {
    stream: TcpStream,
    image_bytes: u64,
    link_timeout: Duration,
    ring: SharedRing<ImageMetadata>,
    bytes: Arc<AtomicU64>,
    /// Recycled digest lists (see [`Part::digests`]).
    digest_pool: Receiver<Vec<u64>>,
}

impl Reader {
    fn run(mut self, out: &Sender<FromReader>) {
        let closed = |why: String, protocol: bool| {
            let _ = out.send(FromReader::Closed(why, protocol));
        };
        let mut hasher = wire::ChecksumState::new();
        let mut hb = [0u8; wire::FRAME_HEADER_BYTES];
        loop {
            if let Err(e) = self.stream.read_exact(&mut hb) {
                return closed(format!("connection: {e}"), false);
            }
            let hdr = match FrameHeader::decode(&hb, self.image_bytes) {
                Ok(h) => h,
                Err(e) => return closed(e.to_string(), true),
            };
            let part = match hdr.kind() {
                Some(Kind::Heartbeat) | None => continue,
                Some(Kind::Lost) => Part {
                    hdr,
                    status: PartStatus::Lost,
                    digests: Vec::new(),
                },
                Some(Kind::Image) => match self.read_part(hdr, &mut hasher) {
                    Ok(part) => part,
                    Err((why, protocol)) => return closed(why, protocol),
                },
            };
            if out.send(FromReader::Part(part)).is_err() {
                return;
            }
        }
    }

    /// Reads an Image frame's payload into its slot range and its trailer; Err(why, protocol).
    fn read_part(
        &mut self,
        hdr: FrameHeader,
        hasher: &mut wire::ChecksumState,
    ) -> Result<Part, (String, bool)> {
        // decode() checked offset and length against this host's image size.
        let (offset, len) = (hdr.payload_offset as usize, hdr.payload_len as usize);
        let mut writer = self.claim(&hdr, offset, len)?;
        // The assembler's checksum: digest block by block (the part starts on the block grid, so
        // each READ_CHUNK is one block). Without one: hash the part for its trailer.
        let blocks = hdr.meta.checksum_kind == CHECKSUM_XXH3_BLOCKS;
        let mut digests = Vec::new();
        if blocks && writer.is_some() {
            digests = self.digest_pool.try_recv().unwrap_or_default();
            digests.clear();
            digests.reserve(checksum::block_count(len));
        }
        hasher.reset();
        let io = |e: io::Error| (format!("connection: {e}"), false);
        match writer.as_mut() {
            Some(w) => {
                for chunk in w.data_mut().chunks_mut(READ_CHUNK) {
                    self.stream.read_exact(chunk).map_err(io)?;
                    if blocks {
                        digests.push(checksum::block_digest(chunk));
                    } else {
                        hasher.update(chunk);
                    }
                }
            }
            None => {
                // The slot belongs to a newer image: read past the bytes, the part is lost.
                let mut sink = [0u8; 4096];
                let mut left = len;
                while left > 0 {
                    let n = left.min(sink.len());
                    self.stream.read_exact(&mut sink[..n]).map_err(io)?;
                    left -= n;
                }
            }
        }
        let mut tb = [0u8; 16];
        self.stream.read_exact(&mut tb).map_err(io)?;
        let trailer = Trailer::decode(&tb).map_err(|e| (e.to_string(), true))?;
        self.bytes
            .fetch_add(len as u64 + FRAME_OVERHEAD, Ordering::Relaxed);
        let status = if writer.is_none() {
            PartStatus::Lost
        } else if trailer.verdict == VERDICT_OVERWRITTEN {
            PartStatus::Overwritten
        } else if !blocks && hasher.digest() != trailer.checksum {
            PartStatus::ChecksumMismatch
        } else {
            // With the assembler's checksum the committer verifies the whole image.
            PartStatus::Good
        };
        Ok(Part {
            hdr,
            status,
            digests,
        })
    }

    /// The part's range of its image's slot. A slot still held by an older image (committed
    /// soon, in stream order) is retried; one held by a newer image gives None (part lost).
    fn claim(
        &self,
        hdr: &FrameHeader,
        offset: usize,
        len: usize,
    ) -> Result<Option<PartWriter<ImageMetadata>>, (String, bool)> {
        let deadline = Instant::now() + self.link_timeout;
        loop {
            match self.ring.claim(hdr.image_id, hdr.seq, offset, len) {
                Ok(w) => return Ok(Some(w)),
                Err(ClaimError::SlotBusy { holder_tag, .. }) if holder_tag > hdr.seq => {
                    return Ok(None)
                }
                Err(ClaimError::SlotBusy { .. }) if Instant::now() < deadline => {
                    thread::sleep(SLOT_RETRY)
                }
                Err(e) => return Err((format!("image {}: {e}", hdr.image_id), true)),
            }
        }
    }
}
