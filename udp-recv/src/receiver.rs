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

use crate::jungfrau::{self, PACKETS_PER_FRAME, PAYLOAD_BYTES};
use crate::socket::{PacketBatch, PacketSource, Recv};
use image_buffer::{RingOwner, MAX_IMAGE_ID};
use std::fmt;
use std::io;
use std::time::{Duration, Instant};
use std_daq_common::service::Shutdown;
use std_daq_common::status::StatusBoard;
use std_daq_common::ModuleFrame;

/// An older frame number after this long without packets is a new acquisition, not a late packet.
const RESTART_IDLE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ReceiverSettings {
    pub module_id: u16,
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
    pub duplicate_packets: u64,
    /// Packets of a frame that was already committed.
    pub late_packets: u64,
    /// Wrong size, packet number or frame number out of range.
    pub malformed_packets: u64,
    /// Committed frames whose ModuleFrame could not be handed on (the consumer is gone or full).
    pub frames_not_published: u64,
}

impl ReceiverStats {
    /// Shows the counters in the service's Redis status hash.
    pub fn publish(&self, board: &StatusBoard) {
        board.set("packets", self.packets);
        board.set("bytes", self.bytes);
        board.set("frames_complete", self.frames_complete);
        board.set("frames_incomplete", self.frames_incomplete);
        board.set("missing_packets", self.missing_packets);
        board.set("duplicate_packets", self.duplicate_packets);
        board.set("late_packets", self.late_packets);
        board.set("malformed_packets", self.malformed_packets);
        board.set("frames_not_published", self.frames_not_published);
    }
}

impl fmt::Display for ReceiverStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "packets={} bytes={} frames_complete={} frames_incomplete={} missing_packets={} \
             duplicate_packets={} late_packets={} malformed_packets={} frames_not_published={}",
            self.packets,
            self.bytes,
            self.frames_complete,
            self.frames_incomplete,
            self.missing_packets,
            self.duplicate_packets,
            self.late_packets,
            self.malformed_packets,
            self.frames_not_published
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
    Timeout,
    SourceClosed,
}

/// Runs until `shutdown` is triggered or the source closes. `publish` gets every committed frame
/// and returns false if it could not hand it on.
pub fn run(
    settings: &ReceiverSettings,
    source: &mut impl PacketSource,
    ring: &mut RingOwner<ModuleFrame>,
    publish: &mut impl FnMut(&ModuleFrame) -> bool,
    board: &StatusBoard,
    shutdown: &Shutdown,
) -> Result<ReceiverStats, ReceiveError> {
    let mut batch = PacketBatch::new(settings.batch_size);
    let mut cursor = 0usize;
    let mut stats = ReceiverStats::default();
    let mut last_committed: Option<(u64, Instant)> = None;
    let mut last_packet_at = Instant::now();
    let mut last_report = Instant::now();
    let mut reported = stats;

    'frames: loop {
        // Find the first usable packet of the next frame (without consuming it).
        let header = loop {
            if shutdown.is_triggered() {
                break 'frames;
            }
            if cursor == batch.len() {
                if last_report.elapsed() >= settings.stats_period {
                    log_stats(settings.module_id, &stats, &reported, last_report.elapsed());
                    stats.publish(board);
                    reported = stats;
                    last_report = Instant::now();
                }
                match source.recv_batch(&mut batch)? {
                    Recv::Packets(_) => {
                        cursor = 0;
                        last_packet_at = Instant::now();
                    }
                    Recv::Timeout => {
                        batch.clear();
                        cursor = 0;
                        continue;
                    }
                    Recv::Closed => break 'frames,
                }
            }
            match jungfrau::parse(batch.packet(cursor)) {
                Ok(h) if h.framenum > MAX_IMAGE_ID => {
                    stats.malformed_packets += 1;
                    cursor += 1;
                }
                Ok(h) => match last_committed {
                    Some((last, at)) if h.framenum <= last && at.elapsed() < RESTART_IDLE => {
                        stats.late_packets += 1;
                        cursor += 1;
                    }
                    _ => break h,
                },
                Err(_) => {
                    stats.malformed_packets += 1;
                    cursor += 1;
                }
            }
        };

        let image_id = header.framenum;
        let mut slot = ring.begin_write(image_id)?;
        let mut frame = ModuleFrame::new(image_id, settings.module_id, PACKETS_PER_FRAME as u16);
        frame.frame_index = header.framenum;
        frame.timestamp = header.timestamp;
        frame.bunch_id_bits = header.bunchid.to_bits();
        frame.debug = header.debug;
        frame.exptime = header.exptime;
        let mut received = 0u32;

        let end = loop {
            if cursor == batch.len() {
                match source.recv_batch(&mut batch)? {
                    Recv::Packets(_) => {
                        cursor = 0;
                        last_packet_at = Instant::now();
                    }
                    Recv::Timeout => {
                        batch.clear();
                        cursor = 0;
                        if last_packet_at.elapsed() >= settings.frame_timeout
                            || shutdown.is_triggered()
                        {
                            break FrameEnd::Timeout;
                        }
                    }
                    Recv::Closed => break FrameEnd::SourceClosed,
                }
                continue;
            }
            let packet = batch.packet(cursor);
            let h = match jungfrau::parse(packet) {
                Ok(h) if h.framenum <= MAX_IMAGE_ID => h,
                _ => {
                    stats.malformed_packets += 1;
                    cursor += 1;
                    continue;
                }
            };
            if h.framenum > image_id {
                break FrameEnd::NewerFrame;
            }
            cursor += 1;
            if h.framenum < image_id {
                stats.late_packets += 1;
                continue;
            }
            // parse() checked packetnum < PACKETS_PER_FRAME, so the range lies inside the slot.
            let p = h.packetnum as usize;
            if !frame.mark_received(p) {
                stats.duplicate_packets += 1;
                continue;
            }
            slot.data_mut()[p * PAYLOAD_BYTES..(p + 1) * PAYLOAD_BYTES]
                .copy_from_slice(&packet[jungfrau::HEADER_BYTES..]);
            stats.packets += 1;
            stats.bytes += packet.len() as u64;
            received += 1;
            if received == PACKETS_PER_FRAME {
                break FrameEnd::Complete;
            }
        };

        // Commit: zero every region whose packet did not arrive, then publish.
        let data = slot.data_mut();
        for p in 0..PACKETS_PER_FRAME as usize {
            if !frame.packet_received(p) {
                data[p * PAYLOAD_BYTES..(p + 1) * PAYLOAD_BYTES].fill(0);
            }
        }
        let missing = PACKETS_PER_FRAME - received;
        frame.n_missing_packets = missing as u16;
        *slot.meta_mut() = frame;
        slot.commit();
        if missing == 0 {
            stats.frames_complete += 1;
        } else {
            stats.frames_incomplete += 1;
            stats.missing_packets += u64::from(missing);
        }
        last_committed = Some((image_id, Instant::now()));
        if !publish(&frame) {
            stats.frames_not_published += 1;
        }
        match end {
            FrameEnd::SourceClosed => break 'frames,
            FrameEnd::Complete | FrameEnd::NewerFrame | FrameEnd::Timeout => {}
        }
    }
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
    use crate::sim;
    use image_buffer::{Expect, RingReader};
    use proptest::prelude::*;
    use std::collections::VecDeque;

    /// Hands out fixed batches of datagrams, then one timeout, then closes.
    struct VecSource {
        batches: VecDeque<Vec<Vec<u8>>>,
        timed_out: bool,
    }

    impl VecSource {
        fn new(packets: Vec<Vec<u8>>, batch: usize) -> Self {
            let batches = packets.chunks(batch.max(1)).map(|c| c.to_vec()).collect();
            VecSource {
                batches,
                timed_out: false,
            }
        }
    }

    impl PacketSource for VecSource {
        fn recv_batch(&mut self, batch: &mut PacketBatch) -> io::Result<Recv> {
            batch.clear();
            match self.batches.pop_front() {
                Some(packets) => {
                    for p in &packets {
                        assert!(batch.push(p));
                    }
                    Ok(Recv::Packets(packets.len()))
                }
                None if !self.timed_out => {
                    self.timed_out = true;
                    Ok(Recv::Timeout)
                }
                None => Ok(Recv::Closed),
            }
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
            frame_timeout: Duration::ZERO,
            stats_period: Duration::from_secs(3600),
            batch_size: 16,
        }
    }

    fn packet(frame: u64, p: u32) -> Vec<u8> {
        let table = sim::PatternTable::new();
        sim::jungfrau_packet(&table, frame, 1, p)
    }

    fn run_packets(h: &mut Harness, packets: Vec<Vec<u8>>) -> (ReceiverStats, Vec<ModuleFrame>) {
        let mut source = VecSource::new(packets, 7);
        let mut frames = Vec::new();
        let stats = run(
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
            let (stats, frames) = run_packets(&mut h, packets);
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
