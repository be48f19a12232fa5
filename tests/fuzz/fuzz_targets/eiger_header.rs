//! Any bytes, any bit depth, any claimed length: parse never panics, and an accepted header's
//! packet index is below the packets per frame of that bit depth.
#![no_main]

use libfuzzer_sys::fuzz_target;
use udp_recv::eiger::{Eiger, PACKET_BYTES};
use udp_recv::format::PacketFormat;

fuzz_target!(|data: &[u8]| {
    let Some((&first, header)) = data.split_first() else { return };
    let bit_depth = [8u8, 16, 32][usize::from(first % 3)];
    let claimed = if first & 0x80 == 0 { PACKET_BYTES } else { header.len() };
    let format = Eiger::new(bit_depth);
    if let Ok(info) = format.parse(header, claimed) {
        assert!(info.packet < format.packets_per_frame());
    }
});
