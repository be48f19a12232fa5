//! Throughput of placement and JUNGFRAU conversion per core, in GB/s of raw module input,
//! against a plain memcpy of the same bytes measured in the same run and the same memory set-up.
//!
//! Run: `cargo bench -p std-assembler --bench throughput` (optional argument: seconds per case,
//! default 2; the whole run takes 34 x that plus a few seconds of set-up).
//! Single-threaded: PSI sizes one core per module, so one module frame (module 1 of a 2-module
//! image) per iteration on one core is the figure to compare with the receiver's rate.
//!
//! Memory set-ups, each with its own memcpy baseline (1 MiB copies from the same source ring;
//! measured before and after the set-up's cases, the mean is the reference):
//! - `in-cache`: sources cycle over 8 frames (8 MiB, in L3), one destination image; the memcpy
//!   goes into one 1 MiB buffer, rewritten every time, so it stays in cache. The set-up the issue
//!   was first measured with.
//! - `realistic`: sources cycle over 64 frames (64 MiB, like a FrameBuffer ring the receiver
//!   wrote), destinations over 32 images of the case's size (like the ImageBuffer ring); the
//!   memcpy goes into a ring of 32 1 MiB buffers, and is DRAM-bound.
//! - `realistic, cold tables`: as `realistic`, but iterations cycle over the calibration tables
//!   of 8 different modules (96 MiB), so the tables come from DRAM as on a server whose cores
//!   convert more modules than their shared L3 holds tables for. With one module, its 4 MiB of G0
//!   tables stay in L3 between frames.
//!
//! Conversion cases run twice: float32 keV (the default) and photon counts as int16
//! (`converted_output: "photons_int16"`, 12.4 keV), same frames, same set-up; the photon/float
//! ratios are printed after the table.
//!
//! Conversion input patterns: `all16` (the simulator's: every 16-bit value, so all gain stages
//! including the invalid code occur, in runs of 16384 pixels) and `bragg` (G0 background, adc
//! 1000-4000, with 5x5 clusters of G1 around a G2 centre on a 40x40 grid shifted per frame:
//! 1.6 % of the pixels not in G0, on 1 in 8 rows).

use assembler::calib::{
    Calibration, MaskCounts, ModuleCalibration, Scale, MODULE_HEIGHT, MODULE_WIDTH,
};
use assembler::pixels::ModulePixels;
use std::hint::black_box;
use std::time::{Duration, Instant};
use std_daq_common::{DetectorConfig, ModuleFrame};

const PIXELS: usize = MODULE_WIDTH * MODULE_HEIGHT;
const FRAME_BYTES: usize = PIXELS * 2;
/// Source frames generated per pattern (the largest ring).
const MAX_SOURCES: usize = 64;
const PHOTON_ENERGY_KEV: f64 = 12.4;

fn config(detector_type: &str, gaps: bool, flip: bool, photons: bool) -> DetectorConfig {
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
    if photons {
        json["converted_output"] = "photons_int16".into();
        json["photon_energy_kev"] = PHOTON_ENERGY_KEV.into();
    }
    DetectorConfig::from_json_str(&json.to_string(), "bench").expect("bench config")
}

/// Calibration of a 2-module detector whose module 1 has tables number `k` (module 0 is never
/// written by the bench and gets empty tables, so that 8 table sets take 96 MiB, not 192).
fn calibration(k: usize, scale: Scale) -> Calibration {
    let p: [Vec<f32>; 3] = std::array::from_fn(|s| {
        (0..PIXELS)
            .map(|i| 1000.0 + ((i * 7 + s * 13 + k) % 500) as f32)
            .collect()
    });
    let g: [Vec<f32>; 3] = std::array::from_fn(|s| {
        (0..PIXELS)
            .map(|i| [40.0, -1.5, -0.1][s] * (1.0 + ((i + k) % 97) as f32 * 1e-3))
            .collect()
    });
    let mask: Vec<bool> = (0..PIXELS).map(|i| (i + k).is_multiple_of(1009)).collect();
    let module = ModuleCalibration::from_values_scaled(
        [&p[0], &p[1], &p[2]],
        [&g[0], &g[1], &g[2]],
        &mask,
        scale,
        &mut MaskCounts::default(),
    );
    let empty = ModuleCalibration {
        pedestal: Default::default(),
        inv_gain: Default::default(),
    };
    Calibration {
        modules: vec![empty, module],
        masked: MaskCounts::default(),
        id: 1,
    }
}

/// Every 16-bit value (the simulator's pattern), frame `k` shifted.
fn all16(k: usize) -> Vec<u8> {
    (0..PIXELS)
        .flat_map(|px| (1 + ((px + k * 7919) % 65535) as u16).to_le_bytes())
        .collect()
}

/// G0 background (adc 1000-4000) with 5x5 spots on a 40x40 grid (G1, G2 centre), shifted per
/// frame `k`.
fn bragg(k: usize) -> Vec<u8> {
    let (dx, dy) = ((k * 7) % 40, (k * 17) % 40);
    (0..PIXELS)
        .flat_map(|px| {
            let (r, c) = (px / MODULE_WIDTH, px % MODULE_WIDTH);
            let h = (px as u32 ^ (k as u32).wrapping_mul(0x9e37_79b9)).wrapping_mul(0x85eb_ca6b);
            let adc = 1000 + (h >> 16) as u16 % 3000;
            let (cx, cy) = ((c + dx) % 40, (r + dy) % 40);
            let v = match (cx, cy) {
                (2, 2) => 0xc000 | adc,
                (0..5, 0..5) => 0x4000 | adc,
                _ => adc,
            };
            v.to_le_bytes()
        })
        .collect()
}

/// Runs `f(i)` (one module frame, iteration `i`) `warm` times, then for `secs`; GB/s of raw input.
fn measure(secs: f64, warm: usize, mut f: impl FnMut(usize)) -> f64 {
    for i in 0..warm {
        f(i); // fault pages in, fill caches
    }
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        for _ in 0..8 {
            f(warm + n);
            n += 1;
        }
    }
    (n * FRAME_BYTES) as f64 / start.elapsed().as_secs_f64() / 1e9
}

struct Setup {
    name: &'static str,
    n_sources: usize,
    n_images: usize,
    n_tables: usize,
}

const SETUPS: [Setup; 3] = [
    Setup {
        name: "in-cache",
        n_sources: 8,
        n_images: 1,
        n_tables: 1,
    },
    Setup {
        name: "realistic",
        n_sources: 64,
        n_images: 32,
        n_tables: 1,
    },
    Setup {
        name: "realistic, cold tables",
        n_sources: 64,
        n_images: 32,
        n_tables: 8,
    },
];

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2.0);
    let t0 = Instant::now();
    let patterns: [(&str, Vec<Vec<u8>>); 2] = [
        ("all16", (0..MAX_SOURCES).map(all16).collect()),
        ("bragg", (0..MAX_SOURCES).map(bragg).collect()),
    ];
    let tables: Vec<Calibration> = (0..8).map(|k| calibration(k, Scale::Energy)).collect();
    let photon_tables: Vec<Calibration> = (0..8)
        .map(|k| {
            calibration(
                k,
                Scale::Photons {
                    energy_kev: PHOTON_ENERGY_KEV,
                },
            )
        })
        .collect();
    let mut frame = ModuleFrame::new(1, 1, 128);
    for p in 0..128 {
        frame.mark_received(p);
    }
    println!(
        "set-up {:.1} s; {secs} s per case; GB/s of raw input (1 MiB per module frame), one core",
        t0.elapsed().as_secs_f64()
    );
    println!();
    println!("| set-up | case | input | GB/s | x memcpy | frames/s |");
    println!("|---|---|---|---|---|---|");

    let mut verdicts = Vec::new();
    let mut ratios = Vec::new();
    for setup in &SETUPS {
        let sources = |p: usize| &patterns[p].1[..setup.n_sources];
        let warm = setup.n_sources.max(setup.n_images) + 8;
        let mut copies = vec![vec![0u8; FRAME_BYTES]; setup.n_images];
        let mut memcpy = || {
            let src = sources(0);
            measure(secs, warm, |i| {
                let dst = &mut copies[i % setup.n_images];
                dst.copy_from_slice(&src[i % setup.n_sources]);
                black_box(dst);
            })
        };
        let memcpy_before = memcpy();

        let mut cases: Vec<(String, f64)> = Vec::new();
        let layouts = [
            (
                "raw placement, no gaps",
                "jungfrau-raw",
                false,
                false,
                false,
            ),
            (
                "raw placement, gaps + mirrored",
                "jungfrau-raw",
                true,
                true,
                false,
            ),
            (
                "conversion, no gaps",
                "jungfrau-converted",
                false,
                false,
                false,
            ),
            (
                "conversion, gaps + split + mirrored",
                "jungfrau-converted",
                true,
                true,
                false,
            ),
            (
                "photons int16, no gaps",
                "jungfrau-converted",
                false,
                false,
                true,
            ),
            (
                "photons int16, gaps + split + mirrored",
                "jungfrau-converted",
                true,
                true,
                true,
            ),
        ];
        for (name, kind, gaps, flip, photons) in layouts {
            let converted = kind == "jungfrau-converted";
            if setup.n_tables > 1 && !converted {
                continue; // raw placement reads no tables
            }
            let cfg = config(kind, gaps, flip, photons);
            let tables = if photons { &photon_tables } else { &tables };
            let mut pixels: Vec<ModulePixels> = if converted {
                tables[..setup.n_tables]
                    .iter()
                    .map(|t| ModulePixels::with_calibration(&cfg, Some(t.clone())))
                    .collect()
            } else {
                vec![ModulePixels::with_calibration(&cfg, None)]
            };
            let mut images = vec![vec![0u8; cfg.image_bytes()]; setup.n_images];
            let inputs = if converted { patterns.len() } else { 1 };
            for (p, (pattern, _)) in patterns.iter().enumerate().take(inputs) {
                let src = sources(p);
                let n_px = pixels.len();
                let gbs = measure(secs, warm, |i| {
                    let image = &mut images[i % setup.n_images];
                    pixels[i % n_px].write(1, &frame, &src[i % setup.n_sources], image);
                    black_box(image);
                });
                let input = if converted { pattern } else { "any" };
                cases.push((format!("{name} | {input}"), gbs));
            }
        }
        let memcpy_after = memcpy();
        let reference = (memcpy_before + memcpy_after) / 2.0;
        println!(
            "| {} | memcpy (before / after the cases) | | {memcpy_before:.2} / {memcpy_after:.2} | 1 | |",
            setup.name
        );
        for (case, gbs) in &cases {
            println!(
                "| {} | {case} | {gbs:.2} | {:.2} | {:.0} |",
                setup.name,
                gbs / reference,
                gbs * 1e9 / FRAME_BYTES as f64
            );
        }
        for (case, gbs) in &cases {
            let Some(rest) = case.strip_prefix("photons int16") else {
                continue;
            };
            let float = format!("conversion{rest}");
            if let Some((_, f)) = cases.iter().find(|(c, _)| *c == float) {
                ratios.push(format!(
                    "{}: photons int16{rest}: {:.2}x float32 ({gbs:.2} vs {f:.2} GB/s), {:.2}x memcpy",
                    setup.name,
                    gbs / f,
                    gbs / reference
                ));
            }
        }
        let worst_conversion = cases
            .iter()
            .filter(|(c, _)| c.starts_with("conversion, no gaps"))
            .map(|(_, g)| g / reference)
            .fold(f64::INFINITY, f64::min);
        let raw = cases
            .iter()
            .find(|(c, _)| c.starts_with("raw placement, no gaps"))
            .map(|(_, g)| g / reference);
        verdicts.push((setup.name, raw, worst_conversion));
    }
    println!();
    for line in &ratios {
        println!("{line}");
    }
    println!();
    for (name, raw, conv) in verdicts {
        let met = |ok: bool| if ok { "met" } else { "NOT met" };
        let raw = raw.map_or(String::new(), |r| {
            format!("raw placement >= 0.8x memcpy: {} ({r:.2}); ", met(r >= 0.8))
        });
        println!(
            "{name}: {raw}conversion (no gaps, both inputs) >= 0.5x memcpy: {} ({conv:.2})",
            met(conv >= 0.5)
        );
    }
    println!("total {:.0} s", t0.elapsed().as_secs_f64());
}
