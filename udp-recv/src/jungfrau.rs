//! The JUNGFRAU UDP packet (slsDetector format): a 48-byte header followed by 8192 bytes of
//! pixels, 128 packets per 1024x512 u16 frame. Parsing checks every field it uses.

use bytemuck::{Pod, Zeroable};
pub use std_daq_common::config::jungfrau::{
    FRAME_BYTES, MODULE_HEIGHT, MODULE_WIDTH, PACKETS_PER_FRAME, PAYLOAD_BYTES,
};

pub const HEADER_BYTES: usize = 48;
pub const PACKET_BYTES: usize = HEADER_BYTES + PAYLOAD_BYTES;

/// The slsDetector header as it is on the wire (little-endian). All fields are naturally aligned,
/// so `repr(C)` has no padding; packets are read with an unaligned copy.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct JungfrauHeader {
    pub framenum: u64,
    pub exptime: u32,
    pub packetnum: u32,
    pub bunchid: f64,
    pub timestamp: u64,
    pub module_id: u16,
    pub row: u16,
    pub column: u16,
    pub z_coord: u16,
    pub debug: u32,
    pub round_robin: u16,
    pub detector_type: u8,
    pub header_version: u8,
}

const _: () = assert!(std::mem::size_of::<JungfrauHeader>() == HEADER_BYTES);

pub use crate::format::Malformed;
use crate::format::{PacketFormat, PacketInfo};

/// The JUNGFRAU packet format (image_id = frame number).
#[derive(Debug, Clone, Copy, Default)]
pub struct Jungfrau;

impl PacketFormat for Jungfrau {
    fn header_bytes(&self) -> usize {
        HEADER_BYTES
    }
    fn payload_bytes(&self) -> usize {
        PAYLOAD_BYTES
    }
    fn packets_per_frame(&self) -> usize {
        PACKETS_PER_FRAME as usize
    }
    fn parse(&self, header: &[u8], datagram_len: usize) -> Result<PacketInfo, Malformed> {
        let h = parse_header(header, datagram_len)?;
        Ok(PacketInfo {
            frame: h.framenum,
            packet: h.packetnum as usize,
            timestamp: h.timestamp,
            bunch_id_bits: h.bunchid.to_bits(),
            debug: h.debug,
            exptime: h.exptime,
        })
    }
}

/// Parses and checks one datagram. The payload is `&packet[HEADER_BYTES..]` when this is Ok.
pub fn parse(packet: &[u8]) -> Result<JungfrauHeader, Malformed> {
    parse_header(packet, packet.len())
}

/// Parses and checks the header of a datagram of `datagram_len` bytes whose first bytes are
/// `header` (the payload went elsewhere).
pub fn parse_header(header: &[u8], datagram_len: usize) -> Result<JungfrauHeader, Malformed> {
    if datagram_len != PACKET_BYTES || header.len() < HEADER_BYTES {
        return Err(Malformed::WrongSize(datagram_len));
    }
    let header: JungfrauHeader = bytemuck::pod_read_unaligned(&header[..HEADER_BYTES]);
    if header.packetnum >= PACKETS_PER_FRAME {
        return Err(Malformed::PacketNumberOutOfRange(header.packetnum));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_golden_bytes() {
        let h = JungfrauHeader {
            framenum: 0x0102_0304_0506_0708,
            exptime: 0x1112_1314,
            packetnum: 127,
            bunchid: 2.0,
            timestamp: 0x2122_2324_2526_2728,
            module_id: 0x3132,
            row: 0x3334,
            column: 0x3536,
            z_coord: 0x3738,
            debug: 0x4142_4344,
            round_robin: 0x5152,
            detector_type: 3,
            header_version: 2,
        };
        let golden: [u8; 48] = [
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // framenum
            0x14, 0x13, 0x12, 0x11, // exptime
            127, 0, 0, 0, // packetnum
            0, 0, 0, 0, 0, 0, 0, 0x40, // bunchid 2.0
            0x28, 0x27, 0x26, 0x25, 0x24, 0x23, 0x22, 0x21, // timestamp
            0x32, 0x31, 0x34, 0x33, 0x36, 0x35, 0x38, 0x37, // module, row, column, z
            0x44, 0x43, 0x42, 0x41, // debug
            0x52, 0x51, 3, 2, // round robin, detector type, header version
        ];
        assert_eq!(bytemuck::bytes_of(&h), &golden);
        let mut packet = golden.to_vec();
        packet.resize(PACKET_BYTES, 0);
        assert_eq!(parse(&packet), Ok(h));
    }

    #[test]
    fn rejects_bad_sizes_and_packet_numbers() {
        assert_eq!(parse(&[0; 100]), Err(Malformed::WrongSize(100)));
        assert_eq!(parse(&[]), Err(Malformed::WrongSize(0)));
        assert_eq!(
            parse(&[0; PACKET_BYTES + 1]),
            Err(Malformed::WrongSize(PACKET_BYTES + 1))
        );
        let mut p = vec![0u8; PACKET_BYTES];
        p[12] = 128;
        assert_eq!(parse(&p), Err(Malformed::PacketNumberOutOfRange(128)));
        p[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&p), Err(Malformed::PacketNumberOutOfRange(u32::MAX)));
    }
}
