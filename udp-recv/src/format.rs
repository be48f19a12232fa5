//! What the receive loop needs to know about a detector's packets: header and payload sizes,
//! packets per frame, and a checked parse of the header into (frame id, packet index, metadata).
//!
//! A `parse` must check every field it returns: the packet index is used as an offset into the
//! FrameBuffer slot, so it must be below `packets_per_frame()`.

use std_daq_common::ModuleFrame;

/// Why a datagram was not accepted as a packet of this detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    WrongSize(usize),
    PacketNumberOutOfRange(u32),
}

/// A checked packet header.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PacketInfo {
    /// The id stages synchronise on (JUNGFRAU, EIGER: the frame number).
    pub frame: u64,
    /// Position of the payload in the frame, below `packets_per_frame()`.
    pub packet: usize,
    pub timestamp: u64,
    pub bunch_id_bits: u64,
    pub debug: u32,
    pub exptime: u32,
}

impl PacketInfo {
    /// Copies the per-frame fields into the frame's metadata.
    pub fn fill(&self, frame: &mut ModuleFrame) {
        frame.frame_index = self.frame;
        frame.timestamp = self.timestamp;
        frame.bunch_id_bits = self.bunch_id_bits;
        frame.debug = self.debug;
        frame.exptime = self.exptime;
    }
}

pub trait PacketFormat {
    fn header_bytes(&self) -> usize;
    fn payload_bytes(&self) -> usize;
    fn packets_per_frame(&self) -> usize;
    /// Checks the header of a datagram of `datagram_len` bytes whose first bytes are `header`.
    fn parse(&self, header: &[u8], datagram_len: usize) -> Result<PacketInfo, Malformed>;

    fn packet_bytes(&self) -> usize {
        self.header_bytes() + self.payload_bytes()
    }

    fn frame_bytes(&self) -> usize {
        self.payload_bytes() * self.packets_per_frame()
    }
}
