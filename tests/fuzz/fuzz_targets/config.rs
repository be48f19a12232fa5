//! `DetectorConfig::from_json_str` on any text (configs come from files and from Redis): parsing
//! never panics, and a config it accepts is one every service can size itself from: the derived
//! sizes neither panic nor overflow (overflow checks are on), every module has a place inside the
//! image and a UDP port, and a module frame fits the `ModuleFrame` packet bitmap.
//!
//! Input: text starting with `{` (or whitespace) is the config itself (the seeds are real
//! configs). Anything else describes one field by field (see [`structured`]), so that numbers
//! reach every validation edge without the fuzzer having to type digits into JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std_daq_common::config::module_rect_size;
use std_daq_common::messages::MAX_PACKETS_PER_FRAME;
use std_daq_common::{DetectorConfig, DetectorType};

/// Reads the input front to back; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// A size: mostly small or detector-like, sometimes any u32.
    fn size(&mut self) -> u32 {
        match self.u8() % 4 {
            0 => self.u32(),
            1 => u32::from(self.u16()),
            2 => [
                1,
                12,
                24,
                48,
                256,
                480,
                512,
                514,
                1024,
                1030,
                2048,
                20560,
                u32::MAX,
            ][usize::from(self.u8() % 13)],
            _ => u32::from(self.u8()) * 8,
        }
    }
}

/// A config built field by field: type, bit depth, modules (stacked at their real size, flipped or
/// not, or with corners taken from the input), image size (the modules' bounding box, or from the
/// input), and the optional keys.
fn structured(data: &[u8]) -> Value {
    let mut b = Bytes(data);
    let detector_type = [
        DetectorType::JungfrauRaw,
        DetectorType::JungfrauConverted,
        DetectorType::Eiger,
        DetectorType::Gigafrost,
    ][usize::from(b.u8() % 4)];
    let flags = b.u8();
    let chip_gaps = flags & 1 != 0;
    let bit_depth = [8u8, 12, 16, 32, b.u8()][usize::from(b.u8() % 5)];
    let n_modules = match b.u8() % 8 {
        0 => b.u16(),
        7 => 8,
        k => u16::from(k),
    };
    let (mw, mh) =
        module_rect_size(detector_type, chip_gaps).unwrap_or_else(|| (b.size(), b.size()));
    let mut positions = serde_json::Map::new();
    let (mut width, mut height) = (1u64, 1u64);
    for m in 0..n_modules.min(64) {
        let corners = if flags & 2 != 0 {
            [0; 4].map(|_| i64::from(b.u32() as i32))
        } else {
            let y0 = i64::from(m) * i64::from(mh);
            let (x1, y1) = (i64::from(mw) - 1, y0 + i64::from(mh) - 1);
            match b.u8() % 4 {
                0 => [0, y0, x1, y1],
                1 => [x1, y0, 0, y1],
                2 => [0, y1, x1, y0],
                _ => [x1, y1, 0, y0],
            }
        };
        width = width.max(corners[0].max(corners[2]).max(0) as u64 + 1);
        height = height.max(corners[1].max(corners[3]).max(0) as u64 + 1);
        positions.insert(m.to_string(), json!(corners));
    }
    let (width, height) = if flags & 4 != 0 {
        (u64::from(b.size()), u64::from(b.size()))
    } else {
        (width, height)
    };
    let mut v = json!({
        "detector_name": "fuzz",
        "detector_type": detector_type.as_str(),
        "n_modules": n_modules,
        "bit_depth": bit_depth,
        "image_pixel_height": height,
        "image_pixel_width": width,
        "start_udp_port": if flags & 8 != 0 { b.u16() } else { 50020 },
        "module_positions": positions,
        "chip_gaps": chip_gaps,
    });
    if detector_type == DetectorType::JungfrauConverted || flags & 16 != 0 {
        v["calibration_file"] = json!("/cal/jf.h5");
    }
    if flags & 32 != 0 {
        v["double_pixels"] = json!(["split", "mask", "spilt"][usize::from(b.u8() % 3)]);
    }
    if flags & 64 != 0 {
        v["ram_buffer_gb"] = json!(f64::from(b.u16()) / 64.0);
        v["module_buffer_slots"] = json!(b.u32() % 4096);
    }
    if flags & 128 != 0 {
        v["udp_bind_address"] =
            json!(["127.0.0.1", "::1", "0.0.0.0", "localhost"][usize::from(b.u8() % 4)]);
    }
    v
}

fuzz_target!(|data: &[u8]| {
    let text = match data.first() {
        Some(b'{' | b' ' | b'\t' | b'\n' | b'\r') => match std::str::from_utf8(data) {
            Ok(text) => text.to_string(),
            Err(_) => return,
        },
        _ => structured(data).to_string(),
    };
    let Ok(c) = DetectorConfig::from_json_str(&text, "fuzz") else {
        return;
    };

    let n = usize::from(c.n_modules);
    assert!(n >= 1);
    assert_eq!(c.module_positions.len(), n);
    for (m, pos) in c.module_positions.iter().enumerate() {
        // Each module lies inside the image (the assembler indexes pixels with these).
        assert!(pos.left() < c.image_pixel_width && pos.top() < c.image_pixel_height);
        assert!(u64::from(pos.left()) + u64::from(pos.width()) <= u64::from(c.image_pixel_width));
        assert!(u64::from(pos.top()) + u64::from(pos.height()) <= u64::from(c.image_pixel_height));
        let port = c.udp_port(m as u16);
        assert_eq!(u32::from(port), u32::from(c.start_udp_port) + m as u32);
    }

    let frame_bytes = c.module_frame_bytes();
    let packets = c.packets_per_frame();
    assert!(frame_bytes > 0, "a module frame has bytes");
    assert!(packets >= 1, "a module frame has packets");
    assert!(
        packets as usize <= MAX_PACKETS_PER_FRAME,
        "{} packets per frame do not fit the {MAX_PACKETS_PER_FRAME}-packet ModuleFrame bitmap \
         ({} {}x{})",
        packets,
        c.detector_type,
        c.image_pixel_width,
        c.image_pixel_height
    );
    assert!(
        u16::try_from(packets).is_ok(),
        "n_packets_expected is a u16"
    );

    let bpp = c.image_bytes_per_pixel();
    assert!([1, 2, 4].contains(&bpp));
    assert_eq!(c.image_dtype().bytes(), bpp);
    let image_bytes = c.image_bytes();
    assert!(image_bytes >= bpp);
    let slots = c.image_buffer_slots();
    assert!(slots >= 2);
    assert!(c.ram_buffer_gb > 0.0 || slots == 1000);
    if c.detector_type == DetectorType::Gigafrost {
        assert_eq!(c.n_modules, 8);
    }
});
