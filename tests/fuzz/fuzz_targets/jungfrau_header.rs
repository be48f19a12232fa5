//! Any bytes with any claimed datagram length: parse never panics, and an accepted header's
//! packet index is in range (it is used as an offset into the slot).
#![no_main]

use libfuzzer_sys::fuzz_target;
use udp_recv::format::PacketFormat;
use udp_recv::jungfrau::{Jungfrau, PACKETS_PER_FRAME, PACKET_BYTES};

fuzz_target!(|data: &[u8]| {
    let claimed = data
        .first()
        .map_or(data.len(), |b| if b & 1 == 0 { PACKET_BYTES } else { data.len() });
    let header = data.get(1..).unwrap_or(&[]);
    if let Ok(info) = Jungfrau.parse(header, claimed) {
        assert!(info.packet < PACKETS_PER_FRAME as usize);
        assert_eq!(claimed, PACKET_BYTES);
    }
    let _ = udp_recv::jungfrau::parse(data);
});
