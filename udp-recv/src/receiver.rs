//! The receive loop: packets in, committed frames out.
//!
//! A frame is assembled in place in its FrameBuffer slot (slot = image_id % n_slots). It is
//! committed when all its packets arrived, when a packet of a newer frame arrives, after
//! `frame_timeout` without packets, or at shutdown, so the last frame of a run is never stuck.
//! At commit, the regions of packets that did not arrive are zeroed: a missing packet never shows
//! bytes of an older frame. The per-packet bitmap and the missing count travel in `ModuleFrame`.
//!
//! Every header field is checked before it is used (size, packet number, frame number range).
//! Nothing here allocates or logs per packet; counters are aggregated in [`ReceiverStats`].

use crate::format::{PacketFormat, PacketInfo};
use crate::socket::{self, PacketSource, Recv, ScatterBatch};
use image_buffer::{RingOwner, MAX_IMAGE_ID};
use std::fmt;
use std::io;
use std::time::{Duration, Instant};
use std_daq_common::service::Shutdown;
use std_daq_common::status::{StatusBoard, BOARD_PERIOD};
use std_daq_common::ModuleFrame;

/// A frame number at or below the last committed one, arriving after the detector sent nothing
/// for this long, starts a new acquisition (the detector was restarted or re-armed with its frame
/// counter from 1) instead of being a late packet.
pub const RESTART_IDLE: Duration = Duration::from_secs(1);

/// Where the receive loop reads the time: the real clock in service, an injected one in tests
/// (so an idle detector can be modelled without sleeping).
pub trait Clock {
    fn now(&self) -> Instant;
}

/// The monotonic system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[derive(Debug, Clone)]
pub struct ReceiverSettings {
    pub module_id: u16,
    /// The UDP port, for reading the kernel's drop counter of the socket (0: unknown).
    pub udp_port: u16,
    pub frame_timeout: Duration,
    pub stats_period: Duration,
    pub batch_size: usize,
}

/// Counters of one receiver since it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Valid packets placed into a frame.
    pub packets: u64,
    pub bytes: u64,
    pub frames_complete: u64,
    pub frames_incomplete: u64,
    /// Packets missing from committed frames.
    pub missing_packets: u64,
    /// Frame numbers passed over while the detector was sending: not one packet of them arrived
    /// (whole frames lost on the way). Not counted in `missing_packets`; a jump after the
    /// detector was idle for a second (a new acquisition) is not counted.
    pub frames_skipped: u64,
    pub duplicate_packets: u64,
    /// Packets of a frame that was already committed.
    pub late_packets: u64,
    /// New acquisitions recognised: a frame number at or below the last committed one after the
    /// detector was quiet for [`RESTART_IDLE`] (frame counter restarted).
    pub acquisitions_restarted: u64,
    /// Wrong size, packet number or frame number out of range.
    pub malformed_packets: u64,
    /// Committed frames whose ModuleFrame could not be handed on (the consumer is gone or full).
    pub frames_not_published: u64,
    /// Packets that did not land where expected and were placed by a copy (copies per byte =
    /// packets_copied / packets; in-order traffic lands in place).
    pub packets_copied: u64,
    /// Datagrams the kernel dropped on this socket (receive buffer full), from /proc/net/udp.
    pub kernel_drops: u64,
}

impl ReceiverStats {
    /// Shows the counters in the service's Redis status hash and metrics, stamped `counters_at`.
    pub fn publish(&self, board: &StatusBoard) {
        board.set("packets", self.packets);
        board.set("bytes", self.bytes);
        board.set("frames_complete", self.frames_complete);
        board.set("frames_incomplete", self.frames_incomplete);
        board.set("missing_packets", self.missing_packets);
        board.set("frames_skipped", self.frames_skipped);
        board.set("duplicate_packets", self.duplicate_packets);
        board.set("late_packets", self.late_packets);
        board.set("acquisitions_restarted", self.acquisitions_restarted);
        board.set("malformed_packets", self.malformed_packets);
        board.set("frames_not_published", self.frames_not_published);
        board.set("packets_copied", self.packets_copied);
        board.set("kernel_drops", self.kernel_drops);
        board.stamp_counters();
    }
}

impl fmt::Display for ReceiverStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "packets={} bytes={} frames_complete={} frames_incomplete={} missing_packets={} \
             frames_skipped={} duplicate_packets={} late_packets={} acquisitions_restarted={} \
             malformed_packets={} frames_not_published={} packets_copied={} kernel_drops={}",
            self.packets,
            self.bytes,
            self.frames_complete,
            self.frames_incomplete,
            self.missing_packets,
            self.frames_skipped,
            self.duplicate_packets,
            self.late_packets,
            self.acquisitions_restarted,
            self.malformed_packets,
            self.frames_not_published,
            self.packets_copied,
            self.kernel_drops
        )
    }
}

/// Errors that stop the receiver (input from the network never does).
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("receiving from the socket failed: {0}")]
    Socket(#[from] io::Error),
    #[error("FrameBuffer: {0}")]
    Ring(#[from] image_buffer::RingError),
}

/// Where the frame being assembled stands.
enum FrameEnd {
    Complete,
    NewerFrame,
    /// A packet starting a new acquisition (frame counter restarted) is waiting.
    NewAcquisition,
    Timeout,
    SourceClosed,
}

/// Copies of datagrams that did not land where they belong: placed by the copy path.
struct Pending {
    buf: Vec<u8>,
    /// The true length of each datagram (the payload kept may be shorter, e.g. padding).
    lens: Vec<usize>,
    /// Whether each datagram arrived after the detector had been quiet for [`RESTART_IDLE`].
    after_idle: Vec<bool>,
    header_bytes: usize,
    packet_bytes: usize,
    len: usize,
    head: usize,
}

impl Pending {
    fn new(capacity: usize, header_bytes: usize, packet_bytes: usize) -> Self {
        Pending {
            buf: vec![0; capacity.max(1) * packet_bytes],
            lens: vec![0; capacity.max(1)],
            after_idle: vec![false; capacity.max(1)],
            header_bytes,
            packet_bytes,
            len: 0,
            head: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.head == self.len
    }

    /// Stores header + payload as one packet. Pending is only filled from one batch while empty,
    /// so it never holds more than its capacity.
    fn push(&mut self, header: &[u8], payload: &[u8], datagram_len: usize, after_idle: bool) {
        if self.is_empty() {
            self.head = 0;
            self.len = 0;
        }
        let (hb, pb) = (self.header_bytes, self.packet_bytes);
        let at = self.len * pb;
        if at + pb > self.buf.len() {
            return;
        }
        self.buf[at..at + hb].copy_from_slice(&header[..hb]);
        self.buf[at + hb..at + pb].copy_from_slice(payload);
        self.lens[self.len] = datagram_len;
        self.after_idle[self.len] = after_idle;
        self.len += 1;
    }

    /// The oldest packet (header + payload as kept), its datagram's true length and whether it
    /// arrived after the detector had been quiet.
    fn front(&self) -> Option<(&[u8], usize, bool)> {
        (!self.is_empty()).then(|| {
            let at = self.head * self.packet_bytes;
            (
                &self.buf[at..at + self.packet_bytes],
                self.lens[self.head],
                self.after_idle[self.head],
            )
        })
    }

    fn pop(&mut self) {
        if !self.is_empty() {
            self.head += 1;
        }
    }
}

enum Class {
    Usable(PacketInfo),
    /// The first packet of a new acquisition: a frame at or below the last committed one that
    /// arrived after the detector was quiet.
    NewAcquisition(PacketInfo),
    Late,
    Malformed,
}

/// Checks a header; a frame at or before the last committed one is late, unless it arrived after
/// the detector had been quiet for [`RESTART_IDLE`]: then it starts a new acquisition.
fn classify(
    format: &impl PacketFormat,
    header: &[u8],
    datagram_len: usize,
    last_committed: Option<(u64, Instant)>,
    after_idle: bool,
) -> Class {
    match format.parse(header, datagram_len) {
        Ok(h) if h.frame > MAX_IMAGE_ID => Class::Malformed,
        Ok(h) => match last_committed {
            Some((last, _)) if h.frame <= last && after_idle => Class::NewAcquisition(h),
            Some((last, _)) if h.frame <= last => Class::Late,
            _ => Class::Usable(h),
        },
        Err(_) => Class::Malformed,
    }
}

/// The run of not-yet-received packet positions where the next datagrams are expected: starts
/// at the first free position at or after `hint` (wrapping to the first free one) and ends at the
/// next received position, so a landing datagram can never overwrite data that arrived.
fn next_free_run(frame: &ModuleFrame, hint: usize, n: usize) -> Option<(usize, usize)> {
    let start = (hint..n)
        .chain(0..hint.min(n))
        .find(|p| !frame.packet_received(*p))?;
    let end = (start..n).find(|p| frame.packet_received(*p)).unwrap_or(n);
    Some((start, end))
}

/// Runs until `shutdown` is triggered or the source closes. `publish` gets every committed frame
/// and returns false if it could not hand it on.
///
/// Datagrams are received straight into the slot of the frame expected next, at the positions
/// expected next (zero copies after the kernel's); a datagram that lands elsewhere (loss,
/// reordering, another frame) is copied aside first and then placed by copying. The header goes
/// to a side buffer.
pub fn run<F: PacketFormat>(
    format: &F,
    settings: &ReceiverSettings,
    source: &mut impl PacketSource,
    ring: &mut RingOwner<ModuleFrame>,
    publish: &mut impl FnMut(&ModuleFrame) -> bool,
    board: &StatusBoard,
    shutdown: &Shutdown,
) -> Result<ReceiverStats, ReceiveError> {
    run_with_clock(
        format,
        settings,
        source,
        ring,
        publish,
        board,
        shutdown,
        &SystemClock,
    )
}

/// [`run`] reading the time from `clock`.
#[allow(clippy::too_many_arguments)]
pub fn run_with_clock<F: PacketFormat>(
    format: &F,
    settings: &ReceiverSettings,
    source: &mut impl PacketSource,
    ring: &mut RingOwner<ModuleFrame>,
    publish: &mut impl FnMut(&ModuleFrame) -> bool,
    board: &StatusBoard,
    shutdown: &Shutdown,
    clock: &impl Clock,
) -> Result<ReceiverStats, ReceiveError> {
    let ppf = format.packets_per_frame();
    let (header_bytes, payload_bytes) = (format.header_bytes(), format.payload_bytes());
    let packet_bytes = format.packet_bytes();
    let mut batch = ScatterBatch::new(settings.batch_size);
    let mut scratch = vec![0u8; batch.capacity() * payload_bytes];
    let mut pending = Pending::new(batch.capacity(), header_bytes, packet_bytes);
    let mut stats = ReceiverStats::default();
    let mut last_committed: Option<(u64, Instant)> = None;
    let mut expected_next: Option<u64> = None;
    let mut last_packet_at = clock.now();
    let mut last_report = clock.now();
    let mut reported = stats;
    let drops_at_start = socket::kernel_drops(settings.udp_port).unwrap_or(0);
    let kernel_drops =
        || socket::kernel_drops(settings.udp_port).map_or(0, |d| d.saturating_sub(drops_at_start));
    let mut last_board = clock.now();
    // Counters from the start (zeros): a run starting at once reads them, not an empty board.
    stats.publish(board);
    let mut report = |stats: &mut ReceiverStats| {
        let now = clock.now();
        // The board (metrics, run counters) between log lines; /proc is read at the log period.
        if now.duration_since(last_board) >= BOARD_PERIOD
            && now.duration_since(last_report) < settings.stats_period
        {
            stats.publish(board);
            last_board = now;
        }
        if now.duration_since(last_report) >= settings.stats_period {
            stats.kernel_drops = kernel_drops();
            log_stats(
                settings.module_id,
                stats,
                &reported,
                now.duration_since(last_report),
            );
            stats.publish(board);
            reported = *stats;
            last_report = now;
            last_board = now;
        }
    };
    // A batch arrived: notes its time and says whether the detector had been quiet before it.
    let arrived = |last_packet_at: &mut Instant| {
        let now = clock.now();
        let after_idle = now.duration_since(*last_packet_at) >= RESTART_IDLE;
        *last_packet_at = now;
        after_idle
    };

    // At shutdown (or when a test source closes) packets already copied aside are still placed.
    'frames: while !shutdown.is_triggered() || !pending.is_empty() {
        // The frame to open: the first usable pending packet's, else the one after the last.
        let mut image_id = None;
        while let Some((packet, len, after_idle)) = pending.front() {
            match classify(format, packet, len, last_committed, after_idle) {
                Class::Usable(h) => {
                    image_id = Some(h.frame);
                    break;
                }
                Class::NewAcquisition(h) => {
                    // The detector restarted its frame counter: what came before is history.
                    tracing::info!(
                        module = settings.module_id,
                        frame = h.frame,
                        last_frame = last_committed.map_or(0, |(id, _)| id),
                        "new acquisition: frame number restarted after the detector was quiet"
                    );
                    stats.acquisitions_restarted += 1;
                    last_committed = None;
                    image_id = Some(h.frame);
                    break;
                }
                Class::Late => stats.late_packets += 1,
                Class::Malformed => stats.malformed_packets += 1,
            }
            pending.pop();
        }
        let Some(image_id) = image_id.or(expected_next) else {
            // Nothing expected: wait for packets, received aside.
            report(&mut stats);
            match source.recv_scatter(&mut batch, header_bytes, &mut scratch, payload_bytes)? {
                Recv::Packets(k) => {
                    let after_idle = arrived(&mut last_packet_at);
                    for i in 0..k {
                        // Checked (and counted if malformed) when taken from pending.
                        pending.push(
                            batch.header(i),
                            &scratch[i * payload_bytes..(i + 1) * payload_bytes],
                            batch.datagram_len(i),
                            after_idle,
                        );
                    }
                }
                Recv::Timeout => {}
                Recv::Closed => break 'frames,
            }
            continue;
        };

        let mut slot = ring.begin_write(image_id)?;
        let mut frame = ModuleFrame::new(image_id, settings.module_id, ppf as u16);
        // When this frame's first packet was placed (its header filled the frame's fields then);
        // tells a skip from a new acquisition.
        let mut first_packet_at: Option<Instant> = None;
        let mut received = 0usize;
        let mut hint = 0usize;

        let end = loop {
            // Place what was copied aside and belongs to this frame.
            let mut new_acquisition = false;
            while let Some((packet, len, after_idle)) = pending.front() {
                match classify(format, packet, len, last_committed, after_idle) {
                    Class::Malformed => stats.malformed_packets += 1,
                    Class::Late => stats.late_packets += 1,
                    // Left pending: the frame open now ends first (abandoned if it is empty).
                    Class::NewAcquisition(_) => {
                        new_acquisition = true;
                        break;
                    }
                    Class::Usable(h) if h.frame < image_id => stats.late_packets += 1,
                    Class::Usable(h) if h.frame > image_id => break,
                    Class::Usable(h) => {
                        // parse() checked packet < packets_per_frame: the range lies in the slot.
                        let p = h.packet;
                        if frame.mark_received(p) {
                            if first_packet_at.is_none() {
                                h.fill(&mut frame);
                                first_packet_at = Some(clock.now());
                            }
                            slot.data_mut()[p * payload_bytes..(p + 1) * payload_bytes]
                                .copy_from_slice(&packet[header_bytes..]);
                            received += 1;
                            stats.packets += 1;
                            stats.packets_copied += 1;
                            stats.bytes += len as u64;
                        } else {
                            stats.duplicate_packets += 1;
                        }
                    }
                }
                pending.pop();
            }
            if new_acquisition {
                break FrameEnd::NewAcquisition;
            }
            if received == ppf {
                break FrameEnd::Complete;
            }
            if !pending.is_empty() {
                break FrameEnd::NewerFrame;
            }
            let Some((start, stop)) = next_free_run(&frame, hint, ppf) else {
                break FrameEnd::Complete;
            };
            let dest = &mut slot.data_mut()[start * payload_bytes..stop * payload_bytes];
            match source.recv_scatter(&mut batch, header_bytes, dest, payload_bytes)? {
                Recv::Packets(k) => {
                    let after_idle = arrived(&mut last_packet_at);
                    for i in 0..k {
                        let len = batch.datagram_len(i);
                        let q = start + i;
                        match classify(format, batch.header(i), len, last_committed, after_idle) {
                            Class::Malformed => stats.malformed_packets += 1,
                            Class::Usable(h) if h.frame == image_id && h.packet == q => {
                                // Landed where it belongs: no copy.
                                frame.mark_received(q);
                                if first_packet_at.is_none() {
                                    h.fill(&mut frame);
                                    first_packet_at = Some(clock.now());
                                }
                                received += 1;
                                stats.packets += 1;
                                stats.bytes += len as u64;
                            }
                            // Elsewhere (reordered, duplicate, late, another frame or a new
                            // acquisition): copy it aside before anything is placed over where
                            // it landed.
                            _ => pending.push(
                                batch.header(i),
                                &dest[i * payload_bytes..(i + 1) * payload_bytes],
                                len,
                                after_idle,
                            ),
                        }
                    }
                    hint = start + k;
                }
                Recv::Timeout => {
                    report(&mut stats);
                    if shutdown.is_triggered()
                        || (received > 0
                            && clock.now().duration_since(last_packet_at) >= settings.frame_timeout)
                    {
                        break FrameEnd::Timeout;
                    }
                }
                Recv::Closed => break FrameEnd::SourceClosed,
            }
        };

        if received == 0 {
            // The expected frame never came (frames were skipped, or the detector restarted its
            // frame counter): drop the slot uncommitted, counted as nothing.
            drop(slot);
            expected_next = None;
            if matches!(end, FrameEnd::SourceClosed) && pending.is_empty() {
                break 'frames;
            }
            continue;
        }
        // Commit: zero every region whose packet did not arrive, then publish.
        let data = slot.data_mut();
        for p in 0..ppf {
            if !frame.packet_received(p) {
                data[p * payload_bytes..(p + 1) * payload_bytes].fill(0);
            }
        }
        if let (Some((last, at)), Some(first)) = (last_committed, first_packet_at) {
            if image_id > last.saturating_add(1) && first.duration_since(at) < RESTART_IDLE {
                stats.frames_skipped = stats.frames_skipped.saturating_add(image_id - last - 1);
            }
        }
        let missing = ppf - received;
        frame.n_missing_packets = missing as u16;
        *slot.meta_mut() = frame;
        slot.commit();
        if missing == 0 {
            stats.frames_complete += 1;
        } else {
            stats.frames_incomplete += 1;
            stats.missing_packets += missing as u64;
        }
        last_committed = Some((image_id, clock.now()));
        expected_next = image_id.checked_add(1).filter(|id| *id <= MAX_IMAGE_ID);
        if !publish(&frame) {
            stats.frames_not_published += 1;
        }
        // Per frame a clock read; the board and the log only at their periods, also while the
        // detector streams without pause (no receive timeout then).
        report(&mut stats);
        if matches!(end, FrameEnd::SourceClosed) && pending.is_empty() {
            break 'frames;
        }
    }
    stats.kernel_drops = kernel_drops();
    tracing::info!(module = settings.module_id, "final: {stats}");
    stats.publish(board);
    Ok(stats)
}

fn log_stats(module: u16, now: &ReceiverStats, before: &ReceiverStats, elapsed: Duration) {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let frames = (now.frames_complete + now.frames_incomplete)
        - (before.frames_complete + before.frames_incomplete);
    tracing::info!(
        module,
        frame_rate = format_args!("{:.1}", frames as f64 / secs),
        gbytes_per_s = format_args!("{:.3}", (now.bytes - before.bytes) as f64 / secs / 1e9),
        "{now}"
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::jungfrau;
    use crate::sim;
    use image_buffer::{Expect, RingReader};
    use proptest::prelude::*;
    use std::collections::VecDeque;

    /// A clock the test moves: the detector's quiet time without sleeping.
    #[derive(Clone)]
    struct TestClock(std::rc::Rc<std::cell::Cell<Instant>>);

    impl Clock for TestClock {
        fn now(&self) -> Instant {
            self.0.get()
        }
    }

    enum Step {
        Packet(Vec<u8>),
        /// The detector sends nothing for this long (one receive timeout, the clock moves on).
        Quiet(Duration),
    }

    /// Plays a script of packets and quiet times against a [`TestClock`], then closes.
    struct ScriptSource {
        steps: VecDeque<Step>,
        clock: TestClock,
        batch: usize,
    }

    impl PacketSource for ScriptSource {
        fn recv_scatter(
            &mut self,
            batch: &mut ScatterBatch,
            header_len: usize,
            dest: &mut [u8],
            payload_len: usize,
        ) -> io::Result<Recv> {
            let n = self
                .batch
                .min(batch.capacity())
                .min(dest.len() / payload_len);
            let mut k = 0;
            while k < n {
                match self.steps.front() {
                    Some(Step::Packet(p)) => {
                        batch.scatter(
                            k,
                            p,
                            header_len,
                            &mut dest[k * payload_len..(k + 1) * payload_len],
                        );
                        k += 1;
                        self.steps.pop_front();
                    }
                    Some(Step::Quiet(_)) | None => break,
                }
            }
            batch.set_len(k);
            if k > 0 {
                return Ok(Recv::Packets(k));
            }
            match self.steps.pop_front() {
                Some(Step::Quiet(d)) => {
                    self.clock.0.set(self.clock.0.get() + d);
                    Ok(Recv::Timeout)
                }
                _ => Ok(Recv::Closed),
            }
        }
    }

    /// Plays fixed batches of datagrams (scattered like the kernel would), then one timeout,
    /// then closes.
    fn vec_source(packets: Vec<Vec<u8>>, batch: usize) -> ScriptSource {
        let steps = packets
            .into_iter()
            .map(Step::Packet)
            .chain([Step::Quiet(Duration::ZERO)]);
        ScriptSource {
            steps: steps.collect(),
            clock: TestClock(std::rc::Rc::new(std::cell::Cell::new(Instant::now()))),
            batch: batch.max(1),
        }
    }

    struct Harness {
        ring: RingOwner<ModuleFrame>,
        reader: RingReader<ModuleFrame>,
    }

    fn harness(tag: &str, slots: u64) -> Harness {
        let name = format!("std-daq.test-recv-{tag}-{}", std::process::id());
        let ring = RingOwner::create(&name, slots, jungfrau::FRAME_BYTES as u64).unwrap();
        let reader = RingReader::attach(&name, Expect::default()).unwrap();
        Harness { ring, reader }
    }

    fn settings() -> ReceiverSettings {
        ReceiverSettings {
            module_id: 1,
            udp_port: 0,
            frame_timeout: Duration::ZERO,
            stats_period: Duration::from_secs(3600),
            batch_size: 16,
        }
    }

    fn packet(frame: u64, p: u32) -> Vec<u8> {
        static TABLE: std::sync::OnceLock<sim::PatternTable> = std::sync::OnceLock::new();
        sim::jungfrau_packet(TABLE.get_or_init(sim::PatternTable::new), frame, 1, p)
    }

    fn run_packets(h: &mut Harness, packets: Vec<Vec<u8>>) -> (ReceiverStats, Vec<ModuleFrame>) {
        let mut source = vec_source(packets, 7);
        let mut frames = Vec::new();
        let stats = run(
            &crate::jungfrau::Jungfrau,
            &settings(),
            &mut source,
            &mut h.ring,
            &mut |f| {
                frames.push(*f);
                true
            },
            &StatusBoard::default(),
            &Shutdown::new(),
        )
        .unwrap();
        (stats, frames)
    }

    /// Checks a committed frame: received packets hold the simulator's pattern, others zero.
    fn assert_frame(h: &Harness, frame: u64, expected_received: &[bool]) {
        let mut data = vec![0u8; jungfrau::FRAME_BYTES];
        let meta = h.reader.copy_out(frame, &mut data).unwrap();
        let pixels: &[u16] = bytemuck::cast_slice(&data);
        let mut missing = 0;
        for (p, &got) in expected_received.iter().enumerate() {
            assert_eq!(
                meta.packet_received(p),
                got,
                "frame {frame} packet {p} bitmap"
            );
            let chunk = &pixels[p * 4096..(p + 1) * 4096];
            if got {
                for (i, v) in chunk.iter().enumerate() {
                    assert_eq!(
                        *v,
                        sim::pixel_value(frame, 1, p * 4096 + i),
                        "frame {frame} px"
                    );
                }
            } else {
                missing += 1;
                assert!(
                    chunk.iter().all(|v| *v == 0),
                    "frame {frame} packet {p} not zeroed"
                );
            }
        }
        assert_eq!(meta.n_missing_packets, missing);
        assert_eq!(meta.image_id, frame);
    }

    #[test]
    fn complete_frames_in_order() {
        let mut h = harness("complete", 4);
        let packets = (1..=3u64)
            .flat_map(|f| (0..128).map(move |p| packet(f, p)))
            .collect();
        let (stats, frames) = run_packets(&mut h, packets);
        assert_eq!(
            frames.iter().map(|f| f.image_id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        for f in 1..=3 {
            assert_frame(&h, f, &[true; 128]);
        }
        assert_eq!(stats.frames_complete, 3);
        assert_eq!(stats.packets, 3 * 128);
        assert_eq!(stats.missing_packets, 0);
        // Only the first batch (7 datagrams, before any frame was expected) took the copy path;
        // every later packet landed in its slot directly.
        assert_eq!(stats.packets_copied, 7);
    }

    #[test]
    fn frames_of_which_nothing_arrived_are_counted_as_skipped() {
        let mut h = harness("skipped", 8);
        // Frames 12 and 13 never arrive; 15 arrives without its first packet.
        let packets = [10u64, 11, 14, 15]
            .into_iter()
            .flat_map(|f| {
                (0..128)
                    .filter(move |p| f != 15 || *p != 0)
                    .map(move |p| packet(f, p))
            })
            .collect();
        let (stats, frames) = run_packets(&mut h, packets);
        assert_eq!(
            frames.iter().map(|f| f.image_id).collect::<Vec<_>>(),
            [10, 11, 14, 15]
        );
        assert_eq!(stats.frames_skipped, 2);
        assert_eq!(stats.missing_packets, 1);
        assert_eq!(stats.frames_complete, 3);
        assert_eq!(stats.frames_incomplete, 1);
    }

    #[test]
    fn missing_packets_are_zero_even_over_an_older_frame() {
        // Two slots: frame 3 lands in frame 1's slot, which held a full pattern.
        let mut h = harness("zeroed", 2);
        let mut packets: Vec<Vec<u8>> = Vec::new();
        for f in 1..=3u64 {
            for p in 0..128 {
                let dropped = f == 3 && (p == 0 || p == 64 || p == 127);
                if !dropped {
                    packets.push(packet(f, p));
                }
            }
        }
        let (stats, frames) = run_packets(&mut h, packets);
        assert_eq!(frames.len(), 3);
        let mut expected = [true; 128];
        expected[0] = false;
        expected[64] = false;
        expected[127] = false;
        assert_frame(&h, 3, &expected);
        assert_eq!(stats.frames_incomplete, 1);
        assert_eq!(stats.missing_packets, 3);
    }

    #[test]
    fn duplicates_late_and_malformed_are_counted_and_dropped() {
        let mut h = harness("bad", 4);
        let mut packets = vec![packet(5, 0), packet(5, 0), vec![0u8; 100]];
        let mut bad_number = packet(5, 1);
        bad_number[12..16].copy_from_slice(&200u32.to_le_bytes());
        packets.push(bad_number);
        let mut huge_frame = packet(5, 1);
        huge_frame[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
        packets.push(huge_frame);
        packets.extend((1..128).map(|p| packet(5, p)));
        packets.push(packet(5, 3)); // late: frame 5 is complete and committed
        packets.push(packet(4, 3)); // late: older than the last commit
        packets.extend((0..128).map(|p| packet(6, p)));
        let (stats, frames) = run_packets(&mut h, packets);
        assert_eq!(frames.len(), 2);
        assert_frame(&h, 5, &[true; 128]);
        assert_frame(&h, 6, &[true; 128]);
        assert_eq!(stats.duplicate_packets, 1);
        assert_eq!(stats.malformed_packets, 3);
        assert_eq!(stats.late_packets, 2);
        assert_eq!(stats.frames_complete, 2);
    }

    #[test]
    fn last_frame_without_its_last_packet_is_committed_on_timeout() {
        let mut h = harness("tail", 4);
        let packets = (0..127).map(|p| packet(9, p)).collect();
        let (stats, frames) = run_packets(&mut h, packets);
        assert_eq!(frames.len(), 1);
        let mut expected = [true; 128];
        expected[127] = false;
        assert_frame(&h, 9, &expected);
        assert_eq!(stats.missing_packets, 1);
    }

    fn run_script(
        h: &mut Harness,
        steps: Vec<Step>,
        frame_timeout: Duration,
    ) -> (ReceiverStats, Vec<ModuleFrame>) {
        let clock = TestClock(std::rc::Rc::new(std::cell::Cell::new(Instant::now())));
        let mut source = ScriptSource {
            steps: steps.into(),
            clock: clock.clone(),
            batch: 7,
        };
        let mut frames = Vec::new();
        let stats = run_with_clock(
            &crate::jungfrau::Jungfrau,
            &ReceiverSettings {
                frame_timeout,
                ..settings()
            },
            &mut source,
            &mut h.ring,
            &mut |f| {
                frames.push(*f);
                true
            },
            &StatusBoard::default(),
            &Shutdown::new(),
            &clock,
        )
        .unwrap();
        (stats, frames)
    }

    fn frames_of(ids: std::ops::RangeInclusive<u64>) -> impl Iterator<Item = Step> {
        ids.flat_map(|f| (0..128).map(move |p| Step::Packet(packet(f, p))))
    }

    /// Issue 18: a detector restarted (or re-armed with its frame counter at 1) after being quiet
    /// lost the whole next acquisition as late packets, because the receive loop had already
    /// opened the frame it expected next.
    #[test]
    fn a_frame_counter_restarting_after_the_detector_was_quiet_is_a_new_acquisition() {
        let mut h = harness("restart", 8);
        let steps = frames_of(1..=3)
            .chain([Step::Quiet(RESTART_IDLE + Duration::from_millis(1))])
            .chain(frames_of(1..=2))
            .collect();
        let (stats, frames) = run_script(&mut h, steps, Duration::from_millis(100));
        assert_eq!(
            frames.iter().map(|f| f.image_id).collect::<Vec<_>>(),
            [1, 2, 3, 1, 2]
        );
        assert!(frames.iter().all(|f| f.n_missing_packets == 0));
        // The second acquisition's frames hold its pixels (frame 3's slot was opened for the
        // frame expected next when the source closed).
        for f in 1..=2 {
            assert_frame(&h, f, &[true; 128]);
        }
        assert_eq!(stats.acquisitions_restarted, 1);
        assert_eq!(stats.late_packets, 0);
        assert_eq!(stats.frames_skipped, 0);
        assert_eq!(stats.frames_complete, 5);
        assert_eq!(stats.packets, 5 * 128);
    }

    #[test]
    fn an_older_frame_without_the_quiet_time_is_late() {
        let mut h = harness("notquiet", 8);
        let steps = frames_of(1..=3)
            .chain([Step::Quiet(RESTART_IDLE - Duration::from_millis(1))])
            .chain(frames_of(1..=2))
            .chain(frames_of(4..=4))
            .collect();
        let (stats, frames) = run_script(&mut h, steps, Duration::from_millis(100));
        assert_eq!(
            frames.iter().map(|f| f.image_id).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(stats.acquisitions_restarted, 0);
        assert_eq!(stats.late_packets, 2 * 128);
        assert_frame(&h, 4, &[true; 128]);
    }

    /// A frame still open when the detector restarts (its frame timeout longer than the quiet
    /// time) is committed with what it has; then the new acquisition starts.
    #[test]
    fn a_restart_commits_the_open_frame_first() {
        let mut h = harness("restartopen", 8);
        let steps = frames_of(1..=1)
            .chain((0..100).map(|p| Step::Packet(packet(2, p))))
            .chain([Step::Quiet(RESTART_IDLE * 2)])
            .chain(frames_of(1..=1))
            .collect();
        let (stats, frames) = run_script(&mut h, steps, RESTART_IDLE * 10);
        assert_eq!(
            frames.iter().map(|f| f.image_id).collect::<Vec<_>>(),
            [1, 2, 1]
        );
        assert_eq!(frames[1].n_missing_packets, 28);
        assert_eq!(stats.acquisitions_restarted, 1);
        assert_eq!(stats.late_packets, 0);
        assert_eq!(stats.missing_packets, 28);
        assert_frame(&h, 1, &[true; 128]);
    }

    #[test]
    fn eiger_16_bit_frames_with_loss_are_exact() {
        use crate::eiger::Eiger;
        use sim::SimDetector;
        let det = SimDetector::Eiger { bit_depth: 16 };
        let table = sim::PatternTable::for_detector(det);
        let format = Eiger::new(16);
        let name = format!("std-daq.test-recv-eiger-{}", std::process::id());
        let mut ring = RingOwner::create(&name, 4, format.frame_bytes() as u64).unwrap();
        let reader: RingReader<ModuleFrame> = RingReader::attach(&name, Expect::default()).unwrap();
        let dropped = |f: u64, p: u32| (f == 2 && p % 10 == 3) || (f == 3 && p == 63);
        let packets: Vec<Vec<u8>> = (1..=3u64)
            .flat_map(|f| (0..64u32).map(move |p| (f, p)))
            .filter(|&(f, p)| !dropped(f, p))
            .map(|(f, p)| sim::detector_packet(det, &table, f, 2, p))
            .collect();
        let mut frames = Vec::new();
        let mut settings = settings();
        settings.module_id = 2;
        let stats = run(
            &format,
            &settings,
            &mut vec_source(packets, 16),
            &mut ring,
            &mut |f| {
                frames.push(*f);
                true
            },
            &StatusBoard::default(),
            &Shutdown::new(),
        )
        .unwrap();
        assert_eq!(
            frames.iter().map(|f| f.image_id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        for f in 1..=3u64 {
            let mut data = vec![0u8; format.frame_bytes()];
            let meta = reader.copy_out(f, &mut data).unwrap();
            let px: &[u16] = bytemuck::cast_slice(&data);
            let mut missing = 0;
            for p in 0..64u32 {
                let chunk = &px[p as usize * 2048..(p as usize + 1) * 2048];
                if dropped(f, p) {
                    missing += 1;
                    assert!(chunk.iter().all(|v| *v == 0));
                    assert!(!meta.packet_received(p as usize));
                } else {
                    for (i, v) in chunk.iter().enumerate() {
                        assert_eq!(*v, sim::pixel_value(f, 2, p as usize * 2048 + i));
                    }
                }
            }
            assert_eq!(meta.n_missing_packets, missing);
            assert_eq!(meta.n_packets_expected, 64);
        }
        assert_eq!(stats.missing_packets, 7 + 1);
    }

    /// GigaFRoST streams of 60x200 pixels: 81-row packets (odd, so each carries 36 padding
    /// bytes) and a short 38-row last packet.
    #[test]
    fn gigafrost_frames_with_padding_and_a_short_last_packet_are_exact() {
        use crate::gigafrost::Gigafrost;
        use sim::SimDetector;
        let g = Gigafrost::new(120, 800).unwrap();
        assert_eq!(
            (g.rows_per_packet, g.packets_per_frame, g.rows_in_packet(2)),
            (81, 3, 38)
        );
        let det = SimDetector::Gigafrost(g);
        assert_eq!(det.pad_bytes(0), 36);
        let table = sim::PatternTable::for_detector(det);
        let name = format!("std-daq.test-recv-gf-{}", std::process::id());
        let mut ring = RingOwner::create(&name, 4, g.slot_bytes() as u64).unwrap();
        let reader: RingReader<ModuleFrame> = RingReader::attach(&name, Expect::default()).unwrap();
        let dropped = |f: u64, p: u32| (f == 2 && p == 1) || (f == 3 && p == 2);
        let packets: Vec<Vec<u8>> = (1..=3u64)
            .flat_map(|f| (0..3u32).map(move |p| (f, p)))
            .filter(|&(f, p)| !dropped(f, p))
            .map(|(f, p)| sim::detector_packet(det, &table, f, 5, p))
            .collect();
        let mut frames = Vec::new();
        let stats = run(
            &g,
            &settings(),
            &mut vec_source(packets, 2),
            &mut ring,
            &mut |f| {
                frames.push(*f);
                true
            },
            &StatusBoard::default(),
            &Shutdown::new(),
        )
        .unwrap();
        assert_eq!(
            frames.iter().map(|f| f.image_id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(stats.malformed_packets, 0);
        let row_bytes = g.row_bytes();
        for f in 1..=3u64 {
            let mut data = vec![0u8; g.slot_bytes()];
            let meta = reader.copy_out(f, &mut data).unwrap();
            for p in 0..3u32 {
                let start = p as usize * g.rows_per_packet * row_bytes;
                let len = g.rows_in_packet(p as usize) * row_bytes;
                let got = &data[start..start + len];
                if dropped(f, p) {
                    assert!(
                        got.iter().all(|b| *b == 0),
                        "frame {f} packet {p} not zeroed"
                    );
                } else {
                    assert_eq!(got, table.payload(f, 5, p), "frame {f} packet {p}");
                }
            }
            assert_eq!(meta.n_missing_packets, if f == 1 { 0 } else { 1 });
        }
        // Unpacking the stream gives the simulator's 12-bit values.
        let mut data = vec![0u8; g.slot_bytes()];
        reader.copy_out(1, &mut data).unwrap();
        for (i, pair) in data[..g.module_bytes()]
            .chunks_exact(3)
            .enumerate()
            .take(500)
        {
            let a = u16::from(pair[0]) | (u16::from(pair[1] & 0x0f) << 8);
            let b = u16::from(pair[1] >> 4) | (u16::from(pair[2]) << 4);
            assert_eq!(a, sim::gigafrost_pixel_value(1, 5, 2 * i));
            assert_eq!(b, sim::gigafrost_pixel_value(1, 5, 2 * i + 1));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// Random loss, order within a frame and duplication: every committed frame equals the
        /// pattern where packets arrived and zero elsewhere; bitmap and counts are exact.
        #[test]
        fn random_loss_reorder_duplication(
            keep in proptest::collection::vec(proptest::bool::weighted(0.9), 3 * 128),
            dup in proptest::collection::vec(proptest::bool::weighted(0.05), 3 * 128),
            seed in any::<u64>(),
        ) {
            let mut h = harness(&format!("prop{seed}"), 4);
            let mut packets = Vec::new();
            let mut expected = vec![[false; 128]; 3];
            let mut n_dup = 0;
            let mut rng = seed | 1;
            for f in 0..3u64 {
                let mut order: Vec<u32> = (0..128).collect();
                for i in (1..order.len()).rev() {
                    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
                    order.swap(i, (rng % (i as u64 + 1)) as usize);
                }
                for p in order {
                    let k = f as usize * 128 + p as usize;
                    if keep[k] {
                        expected[f as usize][p as usize] = true;
                        packets.push(packet(f + 10, p));
                        if dup[k] { packets.push(packet(f + 10, p)); n_dup += 1; }
                    }
                }
            }
            let n_datagrams = packets.len() as u64;
            let (stats, frames) = run_packets(&mut h, packets);
            prop_assert_eq!(
                stats.packets + stats.duplicate_packets + stats.late_packets + stats.malformed_packets,
                n_datagrams
            );
            let sent_frames: Vec<u64> = (0..3u64).filter(|f| expected[*f as usize].iter().any(|r| *r)).map(|f| f + 10).collect();
            prop_assert_eq!(frames.iter().map(|f| f.image_id).collect::<Vec<_>>(), sent_frames.clone());
            for f in &sent_frames {
                assert_frame(&h, *f, &expected[(*f - 10) as usize]);
            }
            let missing: u64 = sent_frames.iter().map(|f| expected[(*f - 10) as usize].iter().filter(|r| !**r).count() as u64).sum();
            prop_assert_eq!(stats.missing_packets, missing);
            // A copy of the packet that completed its frame arrives after the commit: late.
            prop_assert_eq!(stats.duplicate_packets + stats.late_packets, n_dup);
        }
    }
}
