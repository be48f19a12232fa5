//! The EIGER UDP packet (slsDetector format), one stream per half-module: a 48-byte header and
//! 4096 bytes of pixels; a 512x256 half-module frame at bit depth 8/16/32 is 32/64/128 packets.
//! image_id = frame number. Parsing checks every field it uses.

use crate::format::{Malformed, PacketFormat, PacketInfo};
use bytemuck::{Pod, Zeroable};

pub const HEADER_BYTES: usize = 48;
pub const PAYLOAD_BYTES: usize = 4096;
pub const PACKET_BYTES: usize = HEADER_BYTES + PAYLOAD_BYTES;
pub const MODULE_WIDTH: usize = 512;
pub const MODULE_HEIGHT: usize = 256;

/// The slsDetector header of an EIGER packet as it is on the wire (little-endian).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct EigerHeader {
    pub frame_num: u64,
    pub exp_length: u32,
    pub packet_number: u32,
    pub det_spec1: u64,
    pub timestamp: u64,
    pub module_id: u16,
    pub row: u16,
    pub column: u16,
    pub det_spec2: u16,
    pub det_spec3: u32,
    pub round_robin: u16,
    pub detector_type: u8,
    pub header_version: u8,
}

const _: () = assert!(std::mem::size_of::<EigerHeader>() == HEADER_BYTES);

/// The EIGER half-module format at one bit depth.
#[derive(Debug, Clone, Copy)]
pub struct Eiger {
    packets_per_frame: usize,
}

impl Eiger {
    /// `bit_depth` 8, 16 or 32 (the config checks it).
    pub fn new(bit_depth: u8) -> Self {
        let frame_bytes = MODULE_WIDTH * MODULE_HEIGHT * usize::from(bit_depth) / 8;
        Eiger {
            packets_per_frame: (frame_bytes / PAYLOAD_BYTES).max(1),
        }
    }

    pub fn parse_header(
        &self,
        header: &[u8],
        datagram_len: usize,
    ) -> Result<EigerHeader, Malformed> {
        if datagram_len != PACKET_BYTES || header.len() < HEADER_BYTES {
            return Err(Malformed::WrongSize(datagram_len));
        }
        let h: EigerHeader = bytemuck::pod_read_unaligned(&header[..HEADER_BYTES]);
        if h.packet_number as usize >= self.packets_per_frame {
            return Err(Malformed::PacketNumberOutOfRange(h.packet_number));
        }
        Ok(h)
    }
}

impl PacketFormat for Eiger {
    fn header_bytes(&self) -> usize {
        HEADER_BYTES
    }
    fn payload_bytes(&self) -> usize {
        PAYLOAD_BYTES
    }
    fn packets_per_frame(&self) -> usize {
        self.packets_per_frame
    }
    fn parse(&self, header: &[u8], datagram_len: usize) -> Result<PacketInfo, Malformed> {
        let h = self.parse_header(header, datagram_len)?;
        Ok(PacketInfo {
            frame: h.frame_num,
            packet: h.packet_number as usize,
            timestamp: h.timestamp,
            bunch_id_bits: h.det_spec1,
            debug: h.det_spec3,
            exptime: h.exp_length,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_golden_bytes() {
        let h = EigerHeader {
            frame_num: 0x0102_0304_0506_0708,
            exp_length: 0x1112_1314,
            packet_number: 63,
            det_spec1: 0x2122_2324_2526_2728,
            timestamp: 0x3132_3334_3536_3738,
            module_id: 0x4142,
            row: 0x4344,
            column: 0x4546,
            det_spec2: 0x4748,
            det_spec3: 0x5152_5354,
            round_robin: 0x6162,
            detector_type: 1,
            header_version: 2,
        };
        let golden: [u8; 48] = [
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // frame_num
            0x14, 0x13, 0x12, 0x11, // exp_length
            63, 0, 0, 0, // packet_number
            0x28, 0x27, 0x26, 0x25, 0x24, 0x23, 0x22, 0x21, // detSpec1
            0x38, 0x37, 0x36, 0x35, 0x34, 0x33, 0x32, 0x31, // timestamp
            0x42, 0x41, 0x44, 0x43, 0x46, 0x45, 0x48, 0x47, // module, row, column, detSpec2
            0x54, 0x53, 0x52, 0x51, // detSpec3
            0x62, 0x61, 1, 2, // round robin, detector type, header version
        ];
        assert_eq!(bytemuck::bytes_of(&h), &golden);
        let eiger = Eiger::new(16);
        assert_eq!(eiger.parse_header(&golden, PACKET_BYTES), Ok(h));
        assert_eq!(
            eiger
                .parse(&golden, PACKET_BYTES)
                .map(|i| (i.frame, i.packet)),
            Ok((h.frame_num, 63))
        );
    }

    #[test]
    fn packets_per_frame_follow_the_bit_depth() {
        assert_eq!(Eiger::new(8).packets_per_frame(), 32);
        assert_eq!(Eiger::new(16).packets_per_frame(), 64);
        assert_eq!(Eiger::new(32).packets_per_frame(), 128);
        assert_eq!(Eiger::new(16).frame_bytes(), 512 * 256 * 2);
    }

    #[test]
    fn rejects_bad_sizes_and_packet_numbers() {
        let e = Eiger::new(16);
        assert_eq!(e.parse(&[0; 48], 100), Err(Malformed::WrongSize(100)));
        assert_eq!(
            e.parse(&[0; 10], PACKET_BYTES),
            Err(Malformed::WrongSize(PACKET_BYTES))
        );
        let mut h = [0u8; 48];
        h[12] = 64; // 16 bit: packets 0..63
        assert_eq!(
            e.parse(&h, PACKET_BYTES),
            Err(Malformed::PacketNumberOutOfRange(64))
        );
        assert!(Eiger::new(32).parse(&h, PACKET_BYTES).is_ok());
    }
}
