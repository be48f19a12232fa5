//! `std-det-sim`: a detector simulator that sends real packets: JUNGFRAU and EIGER
//! (slsDetector format) and GigaFRoST.
//!
//! Pixel values are a deterministic function of (frame, module, pixel index) that tests and the
//! Python checker recompute independently:
//!
//! ```text
//! offset(frame, module) = ((frame mod 65535) * 7919 + module * 104729) mod 65535
//! value(frame, module, px) = 1 + (px + offset) mod 65535        (never 0, so lost data shows)
//! GigaFRoST (12 bit): value = 1 + (px + (2 * offset) mod 8190) mod 4095
//! ```
//! narrowed to the pixel width (8-bit EIGER keeps the low byte). GigaFRoST pixels are packed two
//! in three bytes: `b0 = a & 0xff, b1 = (a >> 8) | (b & 0xf) << 4, b2 = b >> 4`.
//!
//! Because the value only shifts with the frame, every payload is a slice of one precomputed
//! table: sending costs no pixel generation. Chosen packets can be dropped (`--drop`).
//!
//! JUNGFRAU dark frames per gain stage and photon hits on a known pedestal
//! ([`SimSettings::jungfrau_pixels`]) replace the ramp with the frames of [`crate::dark`] (its
//! docs give the formulas), also precomputed before the first packet.

use crate::dark::{DarkSettings, FrameSet};
use crate::eiger::{self, EigerHeader};
use crate::format::PacketFormat;
use crate::gigafrost::{Gigafrost, GigafrostHeader, PROTOCOL_ID};
use crate::jungfrau::{self, JungfrauHeader, PACKETS_PER_FRAME};
use crate::socket::{OutMessage, UdpSender, GSO_MAX_BYTES, GSO_MAX_SEGMENTS};
use socket2::SockAddr;
use std::collections::HashSet;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, Instant};
use std_daq_common::service::Shutdown;

const PERIOD: usize = 65535;
const GF_PERIOD: usize = 4095;
/// Zeros for GigaFRoST's padding bytes.
static PADDING: [u8; 36] = [0; 36];

/// Which detector the simulator plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimDetector {
    Jungfrau,
    /// One EIGER half-module stream per module, at bit depth 8, 16 or 32.
    Eiger {
        bit_depth: u8,
    },
    /// GigaFRoST streams of the given layout.
    Gigafrost(Gigafrost),
}

impl SimDetector {
    pub fn header_bytes(self) -> usize {
        match self {
            SimDetector::Gigafrost(_) => crate::gigafrost::HEADER_BYTES,
            _ => 48,
        }
    }

    /// Pixel bytes of packet `p` (without GigaFRoST's padding).
    pub fn data_bytes(self, p: u32) -> usize {
        match self {
            SimDetector::Jungfrau => jungfrau::PAYLOAD_BYTES,
            SimDetector::Eiger { .. } => eiger::PAYLOAD_BYTES,
            SimDetector::Gigafrost(g) => g.rows_in_packet(p as usize) * g.row_bytes(),
        }
    }

    /// Padding bytes after the pixels of packet `p`.
    pub fn pad_bytes(self, p: u32) -> usize {
        match self {
            SimDetector::Gigafrost(g) => g.wire_payload_bytes(p as usize) - self.data_bytes(p),
            _ => 0,
        }
    }

    /// Whole datagram of packet `p`.
    pub fn packet_bytes(self, p: u32) -> usize {
        self.header_bytes() + self.data_bytes(p) + self.pad_bytes(p)
    }

    pub fn pixels_per_module(self) -> usize {
        match self {
            SimDetector::Jungfrau => jungfrau::FRAME_BYTES / 2,
            SimDetector::Eiger { .. } => eiger::MODULE_WIDTH * eiger::MODULE_HEIGHT,
            SimDetector::Gigafrost(g) => g.module_width * g.module_height,
        }
    }

    pub fn packets_per_frame(self) -> u32 {
        match self {
            SimDetector::Jungfrau => PACKETS_PER_FRAME,
            SimDetector::Eiger { bit_depth } => {
                eiger::Eiger::new(bit_depth).packets_per_frame() as u32
            }
            SimDetector::Gigafrost(g) => g.packets_per_frame as u32,
        }
    }

    /// The header the simulator sends for packet `p` of `frame` from `module` (the first
    /// `header_bytes()` bytes are used).
    pub fn header(self, frame: u64, module: u16, p: u32) -> [u8; 48] {
        let mut out = [0u8; 48];
        match self {
            SimDetector::Jungfrau => {
                out.copy_from_slice(bytemuck::bytes_of(&jungfrau_header(frame, module, p)))
            }
            SimDetector::Eiger { .. } => out.copy_from_slice(bytemuck::bytes_of(&EigerHeader {
                frame_num: frame,
                exp_length: 10,
                packet_number: p,
                det_spec1: 0,
                timestamp: frame.wrapping_mul(1000),
                module_id: module,
                row: module / 2,
                column: module % 2,
                det_spec2: 0,
                det_spec3: 0,
                round_robin: 0,
                detector_type: 1,
                header_version: 2,
            })),
            SimDetector::Gigafrost(g) => {
                let quadrant = (module % 8 / 2) as u8;
                let link = (module % 2) as u8;
                let quadrant_rows = g.module_height * 2;
                let h = GigafrostHeader {
                    protocol_id: PROTOCOL_ID,
                    quadrant_row_length_in_blocks: (g.module_width / 12).min(255) as u8,
                    quadrant_rows: (quadrant_rows & 0xff) as u8,
                    status_flags: (quadrant << 6) | (link << 5) | ((quadrant_rows >> 8) & 3) as u8,
                    scan_id: 1,
                    frame_index: frame as u32,
                    image_status_flags: 0,
                    packet_starting_row: (p as usize * g.rows_per_packet) as u16,
                    image_timing: (frame.wrapping_mul(1000) & 0xFF_FFFF_FFFF) | (10 << 40),
                    sync_time: 0,
                    scan_time: 0,
                };
                out[..crate::gigafrost::HEADER_BYTES].copy_from_slice(bytemuck::bytes_of(&h));
            }
        }
        out
    }
}

pub fn pattern_offset(frame: u64, module: u16) -> usize {
    (((frame % PERIOD as u64) * 7919 + u64::from(module) * 104_729) % PERIOD as u64) as usize
}

/// The value the simulator sends for pixel `px` (row-major in the module frame), before it is
/// narrowed to the pixel width (8-bit EIGER keeps the low byte).
pub fn pixel_value(frame: u64, module: u16, px: usize) -> u16 {
    (1 + (px + pattern_offset(frame, module)) % PERIOD) as u16
}

/// The 12-bit value the simulator sends for GigaFRoST pixel `px` of a stream frame.
pub fn gigafrost_pixel_value(frame: u64, module: u16, px: usize) -> u16 {
    (1 + (px + gigafrost_offset(frame, module)) % GF_PERIOD) as u16
}

/// Even, so that a frame starts on a whole 3-byte pixel pair of the packed table.
fn gigafrost_offset(frame: u64, module: u16) -> usize {
    (2 * pattern_offset(frame, module)) % (2 * GF_PERIOD)
}

/// All payloads as slices of one table: the pixels of (frame, module) start at the frame's
/// offset into a table whose pixel `j` is `1 + j mod period`.
#[derive(Debug)]
pub struct PatternTable {
    detector: SimDetector,
    bytes: Vec<u8>,
}

impl PatternTable {
    /// The JUNGFRAU table.
    pub fn new() -> Self {
        Self::for_detector(SimDetector::Jungfrau)
    }

    pub fn for_detector(detector: SimDetector) -> Self {
        let mut bytes = Vec::new();
        match detector {
            SimDetector::Gigafrost(_) => {
                let n = (detector.pixels_per_module() + 2 * GF_PERIOD).next_multiple_of(2);
                bytes.reserve(n * 3 / 2);
                for j in (0..n).step_by(2) {
                    let a = (1 + j % GF_PERIOD) as u16;
                    let b = (1 + (j + 1) % GF_PERIOD) as u16;
                    bytes.extend_from_slice(&pack_12bit(a, b));
                }
            }
            _ => {
                let bpp = match detector {
                    SimDetector::Eiger { bit_depth } => usize::from(bit_depth).div_ceil(8),
                    _ => 2,
                };
                let n = detector.pixels_per_module() + PERIOD;
                bytes.reserve(n * bpp);
                for j in 0..n {
                    let v = (1 + j % PERIOD) as u32;
                    bytes.extend_from_slice(&v.to_le_bytes()[..bpp]);
                }
            }
        }
        PatternTable { detector, bytes }
    }

    /// The pixel bytes of packet `p` of a module frame (without padding).
    pub fn payload(&self, frame: u64, module: u16, p: u32) -> &[u8] {
        let det = self.detector;
        let len = det.data_bytes(p);
        let start = match det {
            SimDetector::Gigafrost(g) => {
                (gigafrost_offset(frame, module) + p as usize * g.rows_per_packet * g.module_width)
                    * 3
                    / 2
            }
            _ => {
                let bpp = self.bytes_per_pixel();
                pattern_offset(frame, module) * bpp + p as usize * det.data_bytes(0)
            }
        };
        &self.bytes[start..start + len]
    }

    fn bytes_per_pixel(&self) -> usize {
        match self.detector {
            SimDetector::Eiger { bit_depth } => usize::from(bit_depth).div_ceil(8),
            _ => 2,
        }
    }
}

impl Default for PatternTable {
    fn default() -> Self {
        Self::new()
    }
}

/// Two 12-bit pixels in three bytes (GigaFRoST's packing as this simulator writes it).
pub fn pack_12bit(a: u16, b: u16) -> [u8; 3] {
    [
        (a & 0xff) as u8,
        ((a >> 8) & 0x0f) as u8 | ((b & 0x0f) << 4) as u8,
        (b >> 4) as u8,
    ]
}

/// The header the simulator sends for packet `p` of `frame` from `module`.
pub fn jungfrau_header(frame: u64, module: u16, p: u32) -> JungfrauHeader {
    JungfrauHeader {
        framenum: frame,
        exptime: 10,
        packetnum: p,
        bunchid: frame as f64,
        timestamp: frame.wrapping_mul(1000),
        module_id: module,
        row: 0,
        column: module,
        z_coord: 0,
        debug: 0,
        round_robin: 0,
        detector_type: 3,
        header_version: 2,
    }
}

/// One whole packet as bytes (tests).
pub fn jungfrau_packet(table: &PatternTable, frame: u64, module: u16, p: u32) -> Vec<u8> {
    detector_packet(SimDetector::Jungfrau, table, frame, module, p)
}

/// One whole packet of `detector` as bytes (tests).
pub fn detector_packet(
    detector: SimDetector,
    table: &PatternTable,
    frame: u64,
    module: u16,
    p: u32,
) -> Vec<u8> {
    let mut v = detector.header(frame, module, p)[..detector.header_bytes()].to_vec();
    v.extend_from_slice(table.payload(frame, module, p));
    v.resize(v.len() + detector.pad_bytes(p), 0);
    v
}

/// Packets to leave out: `frame:module:packet`, with `*` for every packet of that module frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropList {
    packets: HashSet<(u64, u16, u32)>,
    whole_frames: HashSet<(u64, u16)>,
}

impl DropList {
    pub fn contains(&self, frame: u64, module: u16, packet: u32) -> bool {
        self.whole_frames.contains(&(frame, module))
            || self.packets.contains(&(frame, module, packet))
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty() && self.whole_frames.is_empty()
    }
}

impl FromStr for DropList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut list = DropList::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let parts: Vec<&str> = item.split(':').collect();
            let [frame, module, packet] = parts[..] else {
                return Err(format!("drop entry {item:?} is not frame:module:packet"));
            };
            let frame: u64 = frame
                .parse()
                .map_err(|_| format!("drop entry {item:?}: bad frame number"))?;
            let module: u16 = module
                .parse()
                .map_err(|_| format!("drop entry {item:?}: bad module"))?;
            if packet == "*" {
                list.whole_frames.insert((frame, module));
            } else {
                let packet: u32 = packet
                    .parse()
                    .ok()
                    .filter(|p| *p < PACKETS_PER_FRAME)
                    .ok_or_else(|| format!("drop entry {item:?}: packet must be 0..127 or *"))?;
                list.packets.insert((frame, module, packet));
            }
        }
        Ok(list)
    }
}

#[derive(Debug, Clone)]
pub struct SimSettings {
    pub detector: SimDetector,
    pub target: IpAddr,
    pub start_port: u16,
    pub n_modules: u16,
    pub start_frame: u64,
    pub n_frames: u64,
    /// Frames per second; 0 sends as fast as possible.
    pub rate_hz: f64,
    pub drops: DropList,
    pub gso: bool,
    /// Loss, reordering, duplication, malformed packets and bursts, by rate and by list.
    pub faults: Faults,
    /// JUNGFRAU only: dark frames or photon hits ([`crate::dark`]) instead of the ramp.
    pub jungfrau_pixels: Option<DarkSettings>,
}

/// Where payloads come from: the ramp table, or precomputed JUNGFRAU dark/hit frames.
#[derive(Debug)]
enum Payloads {
    Pattern(PatternTable),
    Frames(FrameSet),
}

impl Payloads {
    fn payload(&self, frame: u64, module: u16, p: u32) -> &[u8] {
        match self {
            Payloads::Pattern(t) => t.payload(frame, module, p),
            Payloads::Frames(f) => f.payload(frame, module, p),
        }
    }
}

/// Faults injected on purpose, each by rate (probability per packet) and by explicit list.
/// Random choices come from a seeded generator, so a run is reproducible.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub loss_rate: f64,
    pub reorder_rate: f64,
    pub duplicate_rate: f64,
    pub malformed_rate: f64,
    /// Probability per packet that a burst of `burst_len` consecutive packets is lost.
    pub burst_rate: f64,
    pub burst_len: u32,
    /// Packets sent twice.
    pub duplicates: DropList,
    /// Packets sent cut short (a malformed datagram) instead of whole.
    pub malformed: DropList,
    /// Packets swapped with the packet after them.
    pub reorders: DropList,
    pub seed: u64,
}

/// How one packet goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outgoing {
    Whole(u32),
    /// Cut short: header plus a few payload bytes.
    Truncated(u32),
}

/// A small seeded generator (xorshift64*), enough to pick faults reproducibly.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// Decides, packet by packet, what the simulator sends: drops by list, and faults by list and by
/// rate (reproducible from the seed).
#[derive(Debug)]
struct FaultInjector<'a> {
    drops: &'a DropList,
    faults: &'a Faults,
    rng: Rng,
    burst_left: u32,
}

impl<'a> FaultInjector<'a> {
    fn new(drops: &'a DropList, faults: &'a Faults) -> Self {
        FaultInjector {
            drops,
            faults,
            rng: Rng(faults.seed | 1),
            burst_left: 0,
        }
    }

    /// The packets of one module frame in sending order; counts what was injected in `report`.
    fn sequence(
        &mut self,
        frame: u64,
        module: u16,
        ppf: u32,
        report: &mut SimReport,
        out: &mut Vec<Outgoing>,
    ) {
        let (drops, faults) = (self.drops, self.faults);
        let rng = &mut self.rng;
        let burst_left = &mut self.burst_left;
        out.clear();
        for p in 0..ppf {
            if *burst_left > 0 {
                *burst_left -= 1;
                report.packets_dropped += 1;
                continue;
            }
            if rng.chance(faults.burst_rate) && faults.burst_len > 0 {
                *burst_left = faults.burst_len - 1;
                report.packets_dropped += 1;
                report.bursts += 1;
                continue;
            }
            if drops.contains(frame, module, p) || rng.chance(faults.loss_rate) {
                report.packets_dropped += 1;
                continue;
            }
            if faults.malformed.contains(frame, module, p) || rng.chance(faults.malformed_rate) {
                out.push(Outgoing::Truncated(p));
                report.packets_malformed += 1;
                continue;
            }
            out.push(Outgoing::Whole(p));
            if faults.duplicates.contains(frame, module, p) || rng.chance(faults.duplicate_rate) {
                out.push(Outgoing::Whole(p));
                report.packets_duplicated += 1;
            }
        }
        // Reorder: swap a packet with the one after it in the sequence.
        let mut i = 0;
        while i + 1 < out.len() {
            let p = match out[i] {
                Outgoing::Whole(p) | Outgoing::Truncated(p) => p,
            };
            if faults.reorders.contains(frame, module, p) || rng.chance(faults.reorder_rate) {
                out.swap(i, i + 1);
                report.packets_reordered += 1;
                i += 2;
            } else {
                i += 1;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SimReport {
    pub frames: u64,
    pub packets_sent: u64,
    pub packets_dropped: u64,
    pub bytes_sent: u64,
    pub elapsed: Duration,
    /// Frames that started later than their slot in the schedule by more than one period.
    pub frames_behind_schedule: u64,
    pub packets_duplicated: u64,
    pub packets_reordered: u64,
    pub packets_malformed: u64,
    pub bursts: u64,
}

/// Sends `n_frames` frames from every module, paced at `rate_hz`.
pub fn run(settings: &SimSettings, shutdown: &Shutdown) -> io::Result<SimReport> {
    run_logging_losses(settings, shutdown, None)
}

/// [`run`], also listing in `lost` every (frame, module, packet) a receiver will not get whole
/// (dropped, in a burst, or sent malformed), so a test can tell exactly which pixels must be 0.
pub fn run_logging_losses(
    settings: &SimSettings,
    shutdown: &Shutdown,
    mut lost: Option<&mut Vec<(u64, u16, u32)>>,
) -> io::Result<SimReport> {
    let det = settings.detector;
    let table = match (settings.jungfrau_pixels, det) {
        (Some(dark), SimDetector::Jungfrau) => {
            Payloads::Frames(FrameSet::new(&dark, settings.n_modules))
        }
        (Some(_), _) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "dark frames and photon hits are JUNGFRAU only",
            ))
        }
        (None, _) => Payloads::Pattern(PatternTable::for_detector(det)),
    };
    let ppf = det.packets_per_frame();
    let hb = det.header_bytes();
    let segment = det.packet_bytes(0);
    let bind_ip: IpAddr = if settings.target.is_loopback() {
        settings.target
    } else if settings.target.is_ipv4() {
        IpAddr::from([0, 0, 0, 0])
    } else {
        IpAddr::from([0u16; 8])
    };
    let gso = settings.gso.then_some(segment as u16);
    let mut sender = UdpSender::new(SocketAddr::new(bind_ip, 0), 8 << 20, gso)?;
    let dests: Vec<SockAddr> = (0..settings.n_modules)
        .map(|m| SockAddr::from(SocketAddr::new(settings.target, settings.start_port + m)))
        .collect();
    let per_message = if settings.gso {
        (GSO_MAX_BYTES / segment).min(GSO_MAX_SEGMENTS)
    } else {
        1
    };
    let n_packets = usize::from(settings.n_modules) * ppf as usize;
    let mut headers = vec![[0u8; 48]; n_packets];
    let period = (settings.rate_hz > 0.0).then(|| Duration::from_secs_f64(1.0 / settings.rate_hz));
    let mut report = SimReport::default();
    let mut injector = FaultInjector::new(&settings.drops, &settings.faults);
    let mut sequence: Vec<Outgoing> = Vec::with_capacity(2 * ppf as usize);
    let start = Instant::now();

    for i in 0..settings.n_frames {
        if shutdown.is_triggered() {
            break;
        }
        if let Some(period) = period {
            let due = start + period.mul_f64(i as f64);
            let now = Instant::now();
            if now < due {
                std::thread::sleep(due - now);
            } else if now - due > period {
                report.frames_behind_schedule += 1;
            }
        }
        let frame = settings.start_frame + i;
        for m in 0..settings.n_modules {
            for p in 0..ppf {
                headers[usize::from(m) * ppf as usize + p as usize] = det.header(frame, m, p);
            }
        }
        // Gather: [header, payload] per packet; with GSO, runs of up to `per_message` packets.
        let mut parts: Vec<IoSlice<'_>> = Vec::with_capacity(3 * n_packets);
        let mut runs: Vec<(usize, usize, u16)> = Vec::new(); // (first part, part count, module)
        for m in 0..settings.n_modules {
            injector.sequence(frame, m, ppf, &mut report, &mut sequence);
            if let Some(lost) = lost.as_deref_mut() {
                let mut whole = [false; 256];
                for send in &sequence {
                    if let Outgoing::Whole(p) = send {
                        whole[*p as usize] = true;
                    }
                }
                lost.extend(
                    (0..ppf)
                        .filter(|p| !whole[*p as usize])
                        .map(|p| (frame, m, p)),
                );
            }
            // A GSO message is a run of equal-size datagrams in order (only its last may be
            // shorter): every packet that is not the next one of a full size starts a new run.
            let mut run_len = 0;
            let mut next_in_order = None;
            for &send in &sequence {
                let (p, whole) = match send {
                    Outgoing::Whole(p) => (p, true),
                    Outgoing::Truncated(p) => (p, false),
                };
                let k = usize::from(m) * ppf as usize + p as usize;
                let full = whole && det.packet_bytes(p) == segment;
                if run_len == 0 || run_len == per_message || next_in_order != Some(p) || !full {
                    runs.push((parts.len(), 0, m));
                    run_len = 0;
                }
                parts.push(IoSlice::new(&headers[k][..hb]));
                let payload = table.payload(frame, m, p);
                let pad = det.pad_bytes(p);
                let mut n_parts = 2;
                if whole {
                    parts.push(IoSlice::new(payload));
                    if pad > 0 {
                        parts.push(IoSlice::new(&PADDING[..pad]));
                        n_parts = 3;
                    }
                    report.bytes_sent += det.packet_bytes(p) as u64;
                } else {
                    parts.push(IoSlice::new(&payload[..payload.len().min(100)]));
                    report.bytes_sent += (hb + payload.len().min(100)) as u64;
                }
                if let Some(last) = runs.last_mut() {
                    last.1 += n_parts;
                }
                report.packets_sent += 1;
                // A short datagram must end its GSO run.
                run_len = if full { run_len + 1 } else { per_message };
                next_in_order = Some(p + 1);
            }
        }
        let messages: Vec<OutMessage<'_>> = runs
            .iter()
            .map(|&(first, count, m)| OutMessage {
                dest: &dests[usize::from(m)],
                parts: &parts[first..first + count],
            })
            .collect();
        sender.send_all(&messages)?;
        report.frames += 1;
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn table_matches_formula() {
        let t = PatternTable::new();
        for (frame, module, p) in [(1u64, 0u16, 0u32), (77, 1, 127), (65535 * 3 + 5, 3, 64)] {
            let payload: Vec<u16> = t
                .payload(frame, module, p)
                .chunks(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect();
            for (i, v) in payload.iter().enumerate() {
                assert_eq!(*v, pixel_value(frame, module, p as usize * 4096 + i));
                assert_ne!(*v, 0);
            }
        }
        // Python's checker uses the same numbers: spot values computed by hand.
        assert_eq!(pattern_offset(1, 0), 7919);
        assert_eq!(pixel_value(1, 0, 0), 7920);
        assert_eq!(pixel_value(0, 1, 0), 1 + (104_729 % 65535) as u16);
    }

    #[test]
    fn faults_by_list_shape_the_sending_order() {
        let faults = Faults {
            duplicates: "1:0:2".parse().unwrap(),
            malformed: "1:0:4".parse().unwrap(),
            reorders: "1:0:0".parse().unwrap(),
            ..Faults::default()
        };
        let drops: DropList = "1:0:5".parse().unwrap();
        let (mut report, mut out) = (SimReport::default(), Vec::new());
        FaultInjector::new(&drops, &faults).sequence(1, 0, 7, &mut report, &mut out);
        use Outgoing::*;
        assert_eq!(
            out,
            [
                Whole(1),
                Whole(0),
                Whole(2),
                Whole(2),
                Whole(3),
                Truncated(4),
                Whole(6)
            ]
        );
        assert_eq!(
            (
                report.packets_dropped,
                report.packets_duplicated,
                report.packets_malformed
            ),
            (1, 1, 1)
        );
        assert_eq!(report.packets_reordered, 1);
    }

    #[test]
    fn faults_by_rate_are_reproducible_and_near_their_rate() {
        let faults = Faults {
            loss_rate: 0.1,
            burst_rate: 0.01,
            burst_len: 5,
            seed: 42,
            ..Faults::default()
        };
        let run = || {
            let (mut report, mut out) = (SimReport::default(), Vec::new());
            let no_drops = DropList::default();
            let mut injector = FaultInjector::new(&no_drops, &faults);
            let mut sent = 0;
            for f in 0..100 {
                injector.sequence(f, 0, 128, &mut report, &mut out);
                sent += out.len();
            }
            (report.packets_dropped, report.bursts, sent)
        };
        let (dropped, bursts, sent) = run();
        assert_eq!(run(), (dropped, bursts, sent), "same seed, same faults");
        assert_eq!(dropped as usize + sent, 12_800);
        // ~10% random loss plus ~1% bursts of 5: well inside these bounds.
        assert!((1000..2600).contains(&dropped), "dropped {dropped}");
        assert!(bursts > 0);
    }

    #[test]
    fn drop_list_parses_and_rejects() {
        let d: DropList = "3:0:5, 4:1:*".parse().unwrap();
        assert!(d.contains(3, 0, 5) && !d.contains(3, 0, 6));
        assert!(d.contains(4, 1, 0) && d.contains(4, 1, 127) && !d.contains(4, 0, 0));
        assert!("3:0".parse::<DropList>().is_err());
        assert!("3:0:128".parse::<DropList>().is_err());
        assert!("x:0:1".parse::<DropList>().is_err());
        assert!("".parse::<DropList>().unwrap().is_empty());
    }
}
