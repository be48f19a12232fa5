//! Any bytes, any image size, any claimed length: parse never panics, and an accepted header's
//! packet index is below the packets per frame of that layout.
#![no_main]

use libfuzzer_sys::fuzz_target;
use udp_recv::format::PacketFormat;
use udp_recv::gigafrost::Gigafrost;

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let width = u32::from(u16::from_le_bytes([data[0], data[1]]));
    let height = u32::from(u16::from_le_bytes([data[2], data[3]]));
    let Ok(g) = Gigafrost::new(width, height) else { return };
    let claimed = usize::from(u16::from_le_bytes([data[4], data[5]]));
    if let Ok(info) = g.parse(&data[6..], claimed) {
        assert!(info.packet < g.packets_per_frame());
    }
});
