//! The GigaFRoST UDP packet: a 32-byte header and 12-bit packed pixels. Each of the detector's
//! streams (std_daq "modules") carries one half of one quadrant: width/2 x height/4 pixels, rows
//! interleaved with the quadrant's other stream. A packet holds `rows_per_packet` rows starting at
//! `packet_starting_row`; the last packet of a frame may hold fewer. image_id = frame_index.
//!
//! Sizes (std_daq's exact formulas) live in `std_daq_common::gigafrost`, shared with the config's
//! FrameBuffer size. The 36 padding bytes of odd-row packets are received into the discard area,
//! never into the frame.
//!
//! `do_not_store` is bit 15 of `image_status_flags` (PSI's code reads bit 0 by an operator
//! precedence slip); the receiver keeps the whole flags word in `ModuleFrame::debug`.

use crate::format::{Malformed, PacketFormat, PacketInfo};
use bytemuck::{Pod, Zeroable};

pub const HEADER_BYTES: usize = 32;
pub const PROTOCOL_ID: u8 = 0xCB;

/// The GigaFRoST header as it is on the wire (little-endian, naturally aligned, no padding).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct GigafrostHeader {
    /// Fixed 0xCB.
    pub protocol_id: u8,
    /// Quadrant row length in 12-pixel blocks.
    pub quadrant_row_length_in_blocks: u8,
    /// Rows per quadrant (low 8 bits); bit 0 is also the "swapped rows" flag.
    pub quadrant_rows: u8,
    /// bits 6-7 quadrant (SW 0, SE 1, NW 2, NE 3), bit 5 link id, bits 2-4 correction mode,
    /// bits 0-1 the high bits of quadrant_rows.
    pub status_flags: u8,
    pub scan_id: u32,
    pub frame_index: u32,
    /// bit 15: do not store; the rest are debug bits.
    pub image_status_flags: u16,
    pub packet_starting_row: u16,
    /// Low 40 bits: timestamp; high 24 bits: exposure time.
    pub image_timing: u64,
    pub sync_time: u32,
    pub scan_time: u32,
}

const _: () = assert!(std::mem::size_of::<GigafrostHeader>() == HEADER_BYTES);

impl GigafrostHeader {
    pub fn do_not_store(&self) -> bool {
        self.image_status_flags & 0x8000 != 0
    }
    pub fn quadrant(&self) -> u8 {
        self.status_flags >> 6
    }
    pub fn link_id(&self) -> u8 {
        (self.status_flags >> 5) & 1
    }
}

pub use std_daq_common::gigafrost::{Gigafrost, LayoutError, MAX_PAYLOAD_BYTES};

impl PacketFormat for Gigafrost {
    fn parse(&self, header: &[u8], datagram_len: usize) -> Result<PacketInfo, Malformed> {
        let h = parse_header(self, header, datagram_len)?;
        Ok(PacketInfo {
            frame: u64::from(h.frame_index),
            packet: usize::from(h.packet_starting_row) / self.rows_per_packet,
            timestamp: h.image_timing & 0xFF_FFFF_FFFF,
            bunch_id_bits: u64::from(h.scan_id),
            debug: u32::from(h.image_status_flags),
            exptime: (h.image_timing >> 40) as u32,
        })
    }
    fn header_bytes(&self) -> usize {
        HEADER_BYTES
    }
    /// Frame bytes per packet position: every position is `rows_per_packet` rows long, so the
    /// slot is `packets_per_frame` of them (the last packet fills only its rows).
    fn payload_bytes(&self) -> usize {
        self.rows_per_packet * self.row_bytes()
    }
    fn packets_per_frame(&self) -> usize {
        self.packets_per_frame
    }
}

/// Checks a GigaFRoST header against the stream layout, including the datagram's exact length.
pub fn parse_header(
    g: &Gigafrost,
    header: &[u8],
    datagram_len: usize,
) -> Result<GigafrostHeader, Malformed> {
    if header.len() < HEADER_BYTES || datagram_len < HEADER_BYTES {
        return Err(Malformed::WrongSize(datagram_len));
    }
    let h: GigafrostHeader = bytemuck::pod_read_unaligned(&header[..HEADER_BYTES]);
    let row = usize::from(h.packet_starting_row);
    if h.protocol_id != PROTOCOL_ID || row % g.rows_per_packet != 0 || row >= g.module_height {
        return Err(Malformed::PacketNumberOutOfRange(u32::from(
            h.packet_starting_row,
        )));
    }
    let p = row / g.rows_per_packet;
    if datagram_len != HEADER_BYTES + g.wire_payload_bytes(p) {
        return Err(Malformed::WrongSize(datagram_len));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_std_daq_for_2016_squared() {
        // std_daq: a 2016x2016 stream is 1008x504 px, 4 rows per packet, 6048 B per packet,
        // 126 packets per frame, 762,048 B per frame.
        let g = Gigafrost::new(2016, 2016).unwrap();
        assert_eq!((g.module_width, g.module_height), (1008, 504));
        assert_eq!(g.rows_per_packet, 4);
        assert_eq!(g.wire_payload_bytes(0), 6048);
        assert_eq!(g.packets_per_frame, 126);
        assert_eq!(g.module_bytes(), 762_048);
    }

    #[test]
    fn small_images_have_a_short_padded_last_packet() {
        // 480x128 (a 40 kHz test size): streams of 240x32.
        let g = Gigafrost::new(480, 128).unwrap();
        assert_eq!((g.module_width, g.module_height), (240, 32));
        assert_eq!(g.rows_per_packet, 20);
        assert_eq!(g.packets_per_frame, 2);
        assert_eq!(g.rows_in_packet(1), 12);
        assert_eq!(g.wire_payload_bytes(0), 20 * 360);
        // An odd row count on a width that is not a multiple of 48 carries 36 padding bytes.
        let odd = Gigafrost::new(24 * 2, 4 * 3).unwrap();
        assert_eq!(odd.rows_per_packet, 3);
        assert_eq!(odd.wire_payload_bytes(0), 3 * 36 + 36);
        assert!(Gigafrost::new(10, 8).is_err());
    }

    #[test]
    fn header_golden_bytes_and_checks() {
        let h = GigafrostHeader {
            protocol_id: 0xCB,
            quadrant_row_length_in_blocks: 84,
            quadrant_rows: 0xF8,
            status_flags: 0b1010_0101,
            scan_id: 0x0102_0304,
            frame_index: 0x1112_1314,
            image_status_flags: 0x8001,
            packet_starting_row: 8,
            image_timing: 0x2122_2324_2526_2728,
            sync_time: 0x3132_3334,
            scan_time: 0x4142_4344,
        };
        let golden: [u8; 32] = [
            0xCB,
            84,
            0xF8,
            0b1010_0101,
            0x04,
            0x03,
            0x02,
            0x01, // id, blocks, rows, flags, scan
            0x14,
            0x13,
            0x12,
            0x11,
            0x01,
            0x80,
            8,
            0, // frame, status flags, starting row
            0x28,
            0x27,
            0x26,
            0x25,
            0x24,
            0x23,
            0x22,
            0x21, // image timing
            0x34,
            0x33,
            0x32,
            0x31,
            0x44,
            0x43,
            0x42,
            0x41, // sync, scan time
        ];
        assert_eq!(bytemuck::bytes_of(&h), &golden);
        assert!(h.do_not_store());
        assert_eq!((h.quadrant(), h.link_id()), (2, 1));
        let g = Gigafrost::new(2016, 2016).unwrap();
        let info = g.parse(&golden, HEADER_BYTES + 6048).unwrap();
        assert_eq!((info.frame, info.packet), (0x1112_1314, 2));
        assert_eq!(info.timestamp, 0x24_2526_2728);
        assert_eq!(info.exptime, 0x21_2223);

        assert_eq!(g.parse(&golden, 100), Err(Malformed::WrongSize(100)));
        let mut bad = golden;
        bad[14] = 9; // not a multiple of rows_per_packet
        assert!(g.parse(&bad, HEADER_BYTES + 6048).is_err());
        let mut beyond = golden;
        beyond[14..16].copy_from_slice(&504u16.to_le_bytes());
        assert!(g.parse(&beyond, HEADER_BYTES + 6048).is_err());
        let mut wrong_id = golden;
        wrong_id[0] = 0;
        assert!(g.parse(&wrong_id, HEADER_BYTES + 6048).is_err());
    }
}
