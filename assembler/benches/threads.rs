//! Assembler worker threads (issue 19, benchmark (a)): the real `Assembler` (module FrameBuffers
//! and the ImageBuffer in shared memory, as in production) converting the same JUNGFRAU images
//! with 1 thread (the service loop alone) and with 2 worker threads, side by side in one run:
//! rounds alternate between the two so drift and the other load on the machine hit both alike.
//!
//! Run: `cargo bench -p std-assembler --bench threads` (optional argument: rounds, default 20).
//! Cases: float32 conversion with chip gaps, split double pixels and mirrored modules; 2 modules
//! (side by side, so their rows interleave in the image) and 4 modules (2x2). Per image only
//! `emit_ready` is timed (placement and conversion, the end-to-end checksum, commit, publish);
//! announcing the module frames (the receivers' work) happens between images, untimed, and only
//! rewrites the slots' metadata: the pixel data were written once, at set-up (8 different frames
//! per module cycling through 8 FrameBuffer slots). With 2 threads the two workers are the only
//! busy threads: worker 0 is the synchroniser's own thread, worker 1 a thread of its own.
//!
//! Printed: GB/s of raw module input (1 MiB per module frame) and images/s of the per-round
//! medians, the 2-thread / 1-thread ratio of the medians and of the best rounds (on a machine
//! other jobs share, the best round is the one they disturbed least), and the worker counters
//! (wait, straggle, stalls). Before and after the cases, the machine's own ceiling: the same
//! compute-bound work (xxh3 of a 256 KiB buffer that stays in L2) on 1 thread and on 2 threads
//! at once, as a throughput ratio (a VM whose 2 vCPUs do not deliver 2 cores shows it there), and
//! the same for memory-bound work (32 MiB copies).

#![allow(clippy::unwrap_used)] // a bench: any failure is a set-up error to see at once

use assembler::calib::{Calibration, MaskCounts, ModuleCalibration, MODULE_HEIGHT, MODULE_WIDTH};
use assembler::service::Assembler;
use image_buffer::{Expect, RingOwner, RingReader};
use std::time::{Duration, Instant};
use std_daq_common::{DetectorConfig, ImageMetadata, ModuleFrame};

const PIXELS: usize = MODULE_WIDTH * MODULE_HEIGHT;
const FRAME_BYTES: usize = PIXELS * 2;
const MODULE_SLOTS: u64 = 8;
const IMAGE_SLOTS: u64 = 8;
const IMAGES_PER_ROUND: u64 = 40;

/// `n_modules` (2 or 4) JUNGFRAU modules with gaps: module 1 mirrored in x, 2 in y, 3 in both.
fn config(n_modules: u16) -> DetectorConfig {
    let corners = [
        [0, 0, 1029, 513],
        [2059, 0, 1030, 513],
        [0, 1027, 1029, 514],
        [2059, 1027, 1030, 514],
    ];
    let positions: serde_json::Map<String, serde_json::Value> = (0..usize::from(n_modules))
        .map(|m| (m.to_string(), serde_json::json!(corners[m])))
        .collect();
    let json = serde_json::json!({
        "detector_name": "thrbench", "detector_type": "jungfrau-converted",
        "n_modules": n_modules, "bit_depth": 16, "chip_gaps": true, "double_pixels": "split",
        "image_pixel_height": if n_modules > 2 { 1028 } else { 514 }, "image_pixel_width": 2060,
        "start_udp_port": 50000, "calibration_file": "/unused.h5", "module_positions": positions,
    });
    DetectorConfig::from_json_str(&json.to_string(), "bench").expect("bench config")
}

fn calibration(n_modules: usize) -> Calibration {
    let module = |k: usize| {
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
        ModuleCalibration::from_values(
            [&p[0], &p[1], &p[2]],
            [&g[0], &g[1], &g[2]],
            &mask,
            &mut MaskCounts::default(),
        )
    };
    Calibration {
        modules: (0..n_modules).map(module).collect(),
        masked: MaskCounts::default(),
        id: 1,
    }
}

/// G0 background (adc 1000-4000), 1 pixel in 64 in G1 and 1 in 512 in G2; frame `k` shifted.
fn frame_pixels(k: usize) -> Vec<u8> {
    (0..PIXELS)
        .flat_map(|px| {
            let h = (px as u32 ^ (k as u32).wrapping_mul(0x9e37_79b9)).wrapping_mul(0x85eb_ca6b);
            let adc = 1000 + (h >> 16) as u16 % 3000;
            let v = match h % 512 {
                0 => 0xc000 | adc,
                1..8 => 0x4000 | adc,
                _ => adc,
            };
            v.to_le_bytes()
        })
        .collect()
}

struct Rig {
    modules: Vec<RingOwner<ModuleFrame>>,
    assembler: Assembler,
    next_id: u64,
}

impl Rig {
    fn new(cfg: &DetectorConfig, tag: &str, threads: u32, frames: &[Vec<u8>]) -> Rig {
        let n = cfg.n_modules;
        let base = format!("thrbench-{tag}-{}", std::process::id());
        let mut modules: Vec<RingOwner<ModuleFrame>> = (0..n)
            .map(|m| {
                RingOwner::create(&format!("{base}-m{m}"), MODULE_SLOTS, FRAME_BYTES as u64)
                    .unwrap()
            })
            .collect();
        // The pixel data, once: slot s of module m holds frame (s + m) of the pattern.
        for (m, ring) in modules.iter_mut().enumerate() {
            for s in 0..MODULE_SLOTS {
                let mut slot = ring.begin_write(s).unwrap();
                let k = (s as usize + m) % frames.len();
                slot.data_mut()[..FRAME_BYTES].copy_from_slice(&frames[k]);
                slot.commit();
            }
        }
        let readers = (0..n)
            .map(|m| RingReader::attach(&format!("{base}-m{m}"), Expect::default()).unwrap())
            .collect();
        let image: RingOwner<ImageMetadata> = RingOwner::create(
            &format!("{base}-image"),
            IMAGE_SLOTS,
            cfg.image_bytes() as u64,
        )
        .unwrap();
        let assembler =
            Assembler::with_calibration(cfg, Some(calibration(usize::from(n))), readers, image)
                .with_threads(threads)
                .unwrap();
        assert_eq!(assembler.threads(), threads as usize);
        Rig {
            modules,
            assembler,
            next_id: 1,
        }
    }

    /// Assembles one image; returns the time of `emit_ready` alone.
    fn image(&mut self) -> Duration {
        let id = self.next_id;
        self.next_id += 1;
        let now = Instant::now();
        for (m, ring) in self.modules.iter_mut().enumerate() {
            let mut frame = ModuleFrame::new(id, m as u16, 128);
            for p in 0..128 {
                frame.mark_received(p);
            }
            frame.frame_index = id;
            // Only the metadata: the slot keeps the pixels written at set-up.
            let mut slot = ring.begin_write(id).unwrap();
            *slot.meta_mut() = frame;
            slot.commit();
            self.assembler.on_message(frame.as_bytes(), now);
        }
        let mut published = 0;
        let t = Instant::now();
        self.assembler
            .emit_ready(Instant::now(), true, &mut |_| published += 1)
            .unwrap();
        let dt = t.elapsed();
        assert_eq!(published, 1);
        dt
    }

    /// Seconds for one round of images.
    fn round(&mut self) -> f64 {
        (0..IMAGES_PER_ROUND)
            .map(|_| self.image().as_secs_f64())
            .sum()
    }
}

/// Throughput of 2 threads copying independently (each 32 MiB from one buffer to another, so
/// memory-bound) over 1 thread doing the same; and the bytes read and written per second by
/// 1 thread and by the 2 together, in GB/s.
fn memory_ceiling() -> (f64, f64, f64) {
    let len = 32 << 20;
    let make = || (vec![1u8; len], vec![0u8; len]);
    let work = |bufs: &mut (Vec<u8>, Vec<u8>)| {
        let t = Instant::now();
        for _ in 0..10 {
            bufs.1.copy_from_slice(&bufs.0);
            std::hint::black_box(&mut bufs.1);
        }
        t.elapsed().as_secs_f64()
    };
    let (mut a, mut b) = (make(), make());
    work(&mut a);
    work(&mut b);
    let one = work(&mut a);
    let two = std::thread::scope(|s| {
        let t = s.spawn(|| work(&mut a));
        let u = work(&mut b);
        t.join().unwrap().max(u)
    });
    let moved = (2 * 10 * len) as f64 / 1e9;
    (2.0 * one / two, moved / one, 2.0 * moved / two)
}

/// Throughput of 2 threads hashing independently over 1 thread doing the same per thread.
fn machine_ceiling() -> f64 {
    let buf: Vec<u8> = (0..256 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    let work = |buf: &[u8]| {
        let t = Instant::now();
        let mut h = 0u64;
        for _ in 0..4000 {
            h ^= std_daq_common::checksum::block_digest(std::hint::black_box(buf));
        }
        std::hint::black_box(h);
        t.elapsed().as_secs_f64()
    };
    work(&buf);
    let one = work(&buf);
    let two = std::thread::scope(|s| {
        let a = s.spawn(|| work(&buf));
        let b = work(&buf);
        a.join().unwrap().max(b)
    });
    2.0 * one / two
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let t0 = Instant::now();
    let frames: Vec<Vec<u8>> = (0..8).map(frame_pixels).collect();
    println!(
        "{rounds} rounds of {IMAGES_PER_ROUND} images per case and thread count, alternating; \
         medians of the rounds; GB/s of raw module input"
    );
    println!();
    println!(
        "| case | 1 thread GB/s | 1 thread images/s | 2 threads GB/s | 2 threads images/s | \
         2 / 1 (medians) | 2 / 1 (best rounds) | worker wait us/image | of it busy | \
         straggle us/image | stalls |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let ceiling_before = (machine_ceiling(), memory_ceiling());
    let mut ratios = Vec::new();
    for n_modules in [2u16, 4] {
        let cfg = config(n_modules);
        let mut one = Rig::new(&cfg, &format!("{n_modules}-1"), 1, &frames);
        let mut two = Rig::new(&cfg, &format!("{n_modules}-2"), 2, &frames);
        // Warm-up: fault in and fill caches.
        one.round();
        two.round();
        let before = two.assembler.worker_stats();
        let (mut t1, mut t2) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            t1.push(one.round());
            t2.push(two.round());
        }
        let after = two.assembler.worker_stats();
        let images = (rounds as u64 * IMAGES_PER_ROUND) as f64;
        let best = |t: &[f64]| t.iter().copied().fold(f64::INFINITY, f64::min);
        let best_ratio = best(&t1) / best(&t2);
        let (s1, s2) = (median(&mut t1), median(&mut t2));
        let per_round = IMAGES_PER_ROUND as f64;
        let bytes = per_round * f64::from(n_modules) * FRAME_BYTES as f64;
        let ratio = s1 / s2;
        println!(
            "| JUNGFRAU converted float32, {n_modules} modules, gaps + split + mirrored | {:.2} | \
             {:.0} | {:.2} | {:.0} | {ratio:.2} | {best_ratio:.2} | {:.0} | {:.0} | {:.0} | {} |",
            bytes / s1 / 1e9,
            per_round / s1,
            bytes / s2 / 1e9,
            per_round / s2,
            (after.wait_us - before.wait_us) as f64 / images,
            (after.busy_us - before.busy_us) as f64 / images,
            (after.straggle_us - before.straggle_us) as f64 / images,
            after.stalls - before.stalls,
        );
        ratios.push((n_modules, ratio, best_ratio));
    }
    println!();
    let memory_after = memory_ceiling();
    println!(
        "machine ceiling, 2 threads / 1 thread, before / after the cases: compute (in-cache \
         xxh3) {:.2}x / {:.2}x, memory (32 MiB copies) {:.2}x / {:.2}x (GB/s read + written: \
         1 thread {:.1} / {:.1}, 2 threads {:.1} / {:.1})",
        ceiling_before.0,
        machine_ceiling(),
        ceiling_before.1 .0,
        memory_after.0,
        ceiling_before.1 .1,
        memory_after.1,
        ceiling_before.1 .2,
        memory_after.2,
    );
    for (n, r, b) in ratios {
        let met = |r: f64| if r >= 1.7 { "met" } else { "NOT met" };
        println!(
            "{n} modules: 2 threads >= 1.7x 1 thread: medians {} ({r:.2}x), best rounds {} ({b:.2}x)",
            met(r),
            met(b)
        );
    }
    println!("total {:.0} s", t0.elapsed().as_secs_f64());
}
