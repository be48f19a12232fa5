//! Throughput of placement and JUNGFRAU conversion per core, in GB/s of raw module input,
//! against a plain memcpy of the same bytes measured in the same run.
//!
//! Run: `cargo bench -p std-assembler --bench throughput` (optional argument: seconds per case).
//! Single-threaded: PSI sizes one core per module, so one module frame per iteration on one core
//! is the figure to compare with the receiver's rate. Sources cycle over 8 different frames
//! (8 MiB) so that the input does not sit in L2, as a FrameBuffer written by a receiver would not.

use assembler::calib::{Calibration, MaskCounts, ModuleCalibration, MODULE_HEIGHT, MODULE_WIDTH};
use assembler::pixels::ModulePixels;
use std::hint::black_box;
use std::time::{Duration, Instant};
use std_daq_common::{DetectorConfig, ModuleFrame};

const PIXELS: usize = MODULE_WIDTH * MODULE_HEIGHT;
const FRAME_BYTES: usize = PIXELS * 2;
const N_SOURCES: usize = 8;

fn config(detector_type: &str, gaps: bool, flip: bool) -> DetectorConfig {
    let (w, h) = if gaps { (1030, 514) } else { (1024, 512) };
    let m1 = if flip {
        serde_json::json!([w - 1, 2 * h - 1, 0, h])
    } else {
        serde_json::json!([0, h, w - 1, 2 * h - 1])
    };
    let mut json = serde_json::json!({
        "detector_name": "bench", "detector_type": detector_type, "n_modules": 2,
        "bit_depth": 16, "image_pixel_height": 2 * h, "image_pixel_width": w,
        "start_udp_port": 50000, "chip_gaps": gaps,
        "module_positions": {"0": [0, 0, w - 1, h - 1], "1": m1},
    });
    if detector_type == "jungfrau-converted" {
        json["calibration_file"] = "/unused.h5".into();
    }
    DetectorConfig::from_json_str(&json.to_string(), "bench").expect("bench config")
}

fn calibration() -> Calibration {
    let module = |m: usize| {
        let p: [Vec<f32>; 3] = std::array::from_fn(|s| {
            (0..PIXELS)
                .map(|i| 1000.0 + ((i * 7 + s * 13 + m) % 500) as f32)
                .collect()
        });
        let g: [Vec<f32>; 3] = std::array::from_fn(|s| {
            (0..PIXELS)
                .map(|i| [40.0, -1.5, -0.1][s] * (1.0 + (i % 97) as f32 * 1e-3))
                .collect()
        });
        let mask: Vec<bool> = (0..PIXELS).map(|i| i % 1009 == 0).collect();
        ModuleCalibration::from_values(
            [&p[0], &p[1], &p[2]],
            [&g[0], &g[1], &g[2]],
            &mask,
            &mut MaskCounts::default(),
        )
    };
    Calibration {
        modules: vec![module(0), module(1)],
        masked: MaskCounts::default(),
    }
}

/// Runs `f` (one module frame) for `secs` and returns GB/s of raw input.
fn measure(secs: f64, mut f: impl FnMut(usize)) -> f64 {
    for i in 0..N_SOURCES * 2 {
        f(i); // warm up, fault pages in
    }
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        for _ in 0..16 {
            f(n);
            n += 1;
        }
    }
    (n * FRAME_BYTES) as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2.0);
    // Sources: all gain stages (the simulator's pattern covers every 16-bit value).
    let sources: Vec<Vec<u8>> = (0..N_SOURCES)
        .map(|k| {
            (0..PIXELS)
                .flat_map(|px| (1 + ((px + k * 7919) % 65535) as u16).to_le_bytes())
                .collect()
        })
        .collect();
    let mut frame = ModuleFrame::new(1, 1, 128);
    for p in 0..128 {
        frame.mark_received(p);
    }

    let mut dst = vec![0u8; FRAME_BYTES];
    let memcpy = measure(secs, |i| {
        dst.copy_from_slice(&sources[i % N_SOURCES]);
        black_box(&mut dst);
    });
    println!("memcpy of a module frame:                     {memcpy:6.2} GB/s");

    let mut results = Vec::new();
    for (name, kind, gaps, flip) in [
        ("raw placement, no gaps", "jungfrau-raw", false, false),
        ("raw placement, gaps + mirrored", "jungfrau-raw", true, true),
        ("conversion, no gaps", "jungfrau-converted", false, false),
        (
            "conversion, gaps + split + mirrored",
            "jungfrau-converted",
            true,
            true,
        ),
    ] {
        let cfg = config(kind, gaps, flip);
        let cal = (kind == "jungfrau-converted").then(calibration);
        let mut pixels = ModulePixels::with_calibration(&cfg, cal);
        let mut image = vec![0u8; cfg.image_bytes()];
        let gbs = measure(secs, |i| {
            pixels.write(1, &frame, &sources[i % N_SOURCES], &mut image);
            black_box(&mut image);
        });
        println!(
            "{name:<44} {gbs:6.2} GB/s = {:.2} x memcpy ({:.0} frames/s)",
            gbs / memcpy,
            gbs * 1e9 / FRAME_BYTES as f64
        );
        results.push((name, gbs / memcpy));
    }
    let raw = results[0].1;
    let conv = results[2].1;
    println!(
        "targets: raw placement >= 0.8x memcpy: {} ({raw:.2}); conversion >= 0.5x memcpy: {} ({conv:.2})",
        if raw >= 0.8 { "met" } else { "NOT met" },
        if conv >= 0.5 { "met" } else { "NOT met" },
    );
}
