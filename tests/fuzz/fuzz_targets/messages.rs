//! `ModuleFrame::from_bytes` and `ImageMetadata::from_bytes` on any bytes (each message travels
//! over ZMQ and through shared memory): decoding never panics; a decoded value is exactly the
//! input again (`as_bytes()`), has the supported version, and every accessor is total (in-range
//! and out-of-range indices alike).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std_daq_common::messages::{
    IMAGE_METADATA_VERSION, MAX_MODULES, MAX_PACKETS_PER_FRAME, MODULE_FRAME_VERSION,
};
use std_daq_common::{Dtype, ImageMetadata, ImageStatus, ModuleFrame};

/// Indices to probe: every valid one, the first invalid ones, and the extremes.
fn probes(max: usize) -> impl Iterator<Item = usize> {
    (0..max + 70).chain([usize::MAX / 2, usize::MAX - 1, usize::MAX])
}

fuzz_target!(|data: &[u8]| {
    match ModuleFrame::from_bytes(data) {
        Ok(f) => {
            assert_eq!(data.len(), std::mem::size_of::<ModuleFrame>());
            assert_eq!(
                f.as_bytes(),
                data,
                "a decoded ModuleFrame re-encodes to its input"
            );
            assert_eq!(f.version, MODULE_FRAME_VERSION);
            let mut received = 0u32;
            for p in probes(MAX_PACKETS_PER_FRAME) {
                let got = f.packet_received(p);
                if p >= MAX_PACKETS_PER_FRAME {
                    assert!(!got, "packet {p} is out of range and never arrived");
                } else {
                    assert_eq!(got, f.received[p / 64] >> (p % 64) & 1 == 1);
                    received += u32::from(got);
                }
            }
            let bits: u32 = f.received.iter().map(|w| w.count_ones()).sum();
            assert_eq!(received, bits);
            // Marking (the receiver's use, with p checked against the wire first) is idempotent.
            let mut g = f;
            for p in 0..MAX_PACKETS_PER_FRAME {
                assert_eq!(g.mark_received(p), !f.packet_received(p));
                assert!(g.packet_received(p) && !g.mark_received(p));
            }
        }
        Err(_) => assert!(
            data.len() != std::mem::size_of::<ModuleFrame>()
                || u16::from_le_bytes([data[46], data[47]]) != MODULE_FRAME_VERSION
        ),
    }

    match ImageMetadata::from_bytes(data) {
        Ok(m) => {
            assert_eq!(data.len(), std::mem::size_of::<ImageMetadata>());
            assert_eq!(
                m.as_bytes(),
                data,
                "decoded ImageMetadata re-encodes to its input"
            );
            assert_eq!(m.version, IMAGE_METADATA_VERSION);
            let status = m.status();
            assert!(status as u16 == m.status || status == ImageStatus::Undefined);
            let dtype = m.dtype();
            assert!(dtype as u16 == m.dtype || dtype == Dtype::Unknown);
            assert!([0, 1, 2, 4, 8].contains(&dtype.bytes()));
            let mut missing = 0u32;
            for mm in probes(MAX_MODULES) {
                let got = m.module_missing(mm);
                if mm >= MAX_MODULES {
                    assert!(!got, "module {mm} is out of range and never missing");
                } else {
                    assert_eq!(got, m.missing_modules[mm / 64] >> (mm % 64) & 1 == 1);
                    missing += u32::from(got);
                }
            }
            let bits: u32 = m.missing_modules.iter().map(|w| w.count_ones()).sum();
            assert_eq!(missing, bits);
        }
        Err(_) => assert!(
            data.len() != std::mem::size_of::<ImageMetadata>()
                || u16::from_le_bytes([data[54], data[55]]) != IMAGE_METADATA_VERSION
        ),
    }
});
