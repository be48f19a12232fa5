//! The cost of the end-to-end image checksum in the assembler: the real `Assembler` (module
//! FrameBuffers and the ImageBuffer in shared memory, as in production) assembling the same
//! images with checksums (the default) and without (`Assembler::without_checksums`), side by side
//! in one run: rounds alternate between the two so drift hits both alike.
//!
//! Run: `cargo bench -p std-assembler --bench checksum` (optional argument: rounds, default 12).
//! Per image, only `emit_ready` is timed (placement or conversion, checksum, commit, publish);
//! writing the module frames into their rings (the receivers' work) happens between images,
//! untimed. Rings: 64 frames per module (a FrameBuffer the receiver cycles through), 32 images.

#![allow(clippy::unwrap_used)] // a bench: any failure is a set-up error to see at once

use assembler::service::Assembler;
use image_buffer::{Expect, RingOwner, RingReader};
use std::time::{Duration, Instant};
use std_daq_common::{DetectorConfig, ImageMetadata, ModuleFrame};

const MODULE_SLOTS: u64 = 64;
const IMAGE_SLOTS: u64 = 32;
const IMAGES_PER_ROUND: u64 = 64;

fn config(n_modules: u16, gaps: bool) -> DetectorConfig {
    let (w, h) = if gaps { (1030, 514) } else { (1024, 512) };
    let positions: serde_json::Map<String, serde_json::Value> = (0..n_modules)
        .map(|m| {
            let y = i64::from(m) * h;
            (m.to_string(), serde_json::json!([0, y, w - 1, y + h - 1]))
        })
        .collect();
    let json = serde_json::json!({
        "detector_name": "ckbench", "detector_type": "jungfrau-raw", "n_modules": n_modules,
        "bit_depth": 16, "image_pixel_height": i64::from(n_modules) * h, "image_pixel_width": w,
        "start_udp_port": 50000, "chip_gaps": gaps, "module_positions": positions,
    });
    DetectorConfig::from_json_str(&json.to_string(), "bench").expect("bench config")
}

struct Rig {
    modules: Vec<RingOwner<ModuleFrame>>,
    assembler: Assembler,
    next_id: u64,
    pattern: Vec<u8>,
}

impl Rig {
    fn new(cfg: &DetectorConfig, tag: &str, checksums: bool) -> Rig {
        let n = cfg.n_modules;
        let base = format!("ckbench-{tag}-{}", std::process::id());
        let modules: Vec<RingOwner<ModuleFrame>> = (0..n)
            .map(|m| RingOwner::create(&format!("{base}-m{m}"), MODULE_SLOTS, 1 << 20).unwrap())
            .collect();
        let readers = (0..n)
            .map(|m| RingReader::attach(&format!("{base}-m{m}"), Expect::default()).unwrap())
            .collect();
        let image: RingOwner<ImageMetadata> = RingOwner::create(
            &format!("{base}-image"),
            IMAGE_SLOTS,
            cfg.image_bytes() as u64,
        )
        .unwrap();
        let assembler = Assembler::with_calibration(cfg, None, readers, image);
        let assembler = if checksums {
            assembler
        } else {
            assembler.without_checksums()
        };
        // Realistic pixel values (not compressible runs): a hash of the index.
        let pattern = (0..(1u64 << 20) / 2)
            .flat_map(|i| ((i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 50) as u16).to_le_bytes())
            .collect();
        Rig {
            modules,
            assembler,
            next_id: 1,
            pattern,
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
            frame.n_missing_packets = 0;
            frame.frame_index = id;
            let mut slot = ring.begin_write(id).unwrap();
            slot.data_mut().copy_from_slice(&self.pattern);
            *slot.meta_mut() = frame;
            slot.commit();
            self.assembler.on_message(frame.as_bytes(), now);
        }
        let mut published = 0;
        let t = Instant::now();
        self.assembler
            .emit_ready(Instant::now(), true, &mut |_| published += 1)
            .expect("one thread: emit_ready cannot fail");
        let dt = t.elapsed();
        assert_eq!(published, 1);
        dt
    }
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
        .unwrap_or(12);
    println!(
        "| image | bytes | without checksum us/image (median) | with checksum us/image (median) | \
         checksum cost us/image | with / without time | checksum GB/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (n_modules, gaps) in [(2u16, false), (2, true), (8, false)] {
        let cfg = config(n_modules, gaps);
        let tag = format!("{n_modules}{}", if gaps { "g" } else { "" });
        let mut with = Rig::new(&cfg, &format!("{tag}c"), true);
        let mut without = Rig::new(&cfg, &format!("{tag}n"), false);
        // Warm-up: every slot of every ring touched once.
        for _ in 0..MODULE_SLOTS {
            with.image();
            without.image();
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Alternate which goes first, so neither always follows the other.
            let order: [&mut Vec<f64>; 2] = if round % 2 == 0 {
                [&mut a, &mut b]
            } else {
                [&mut b, &mut a]
            };
            let [first, second] = order;
            let (r1, r2) = if round % 2 == 0 {
                (&mut with, &mut without)
            } else {
                (&mut without, &mut with)
            };
            for _ in 0..IMAGES_PER_ROUND {
                first.push(r1.image().as_secs_f64() * 1e6);
            }
            for _ in 0..IMAGES_PER_ROUND {
                second.push(r2.image().as_secs_f64() * 1e6);
            }
        }
        let (t_with, t_without) = (median(&mut a), median(&mut b));
        let bytes = cfg.image_bytes();
        let cost = t_with - t_without;
        println!(
            "| JUNGFRAU {n_modules} modules{} raw | {:.2} MiB | {t_without:.0} | {t_with:.0} | {cost:.0} | {:.2}x | {:.1} |",
            if gaps { " + gaps" } else { "" },
            bytes as f64 / (1 << 20) as f64,
            t_with / t_without,
            if cost > 0.0 { bytes as f64 / cost / 1e3 } else { f64::INFINITY },
        );
    }
}
