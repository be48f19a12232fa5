//! Benchmark (b) of issue 19: compressed (bitshuffle + LZ4) write throughput of 2 writers, each a
//! [`Writer`] with a deal in its own thread, against 1 writer writing every image, side by side
//! in one run. Both read the same pre-filled ImageBuffer of JUNGFRAU-like frames and are fed the
//! same ImageMetadata sequence; files go to tmpfs (/dev/shm) so that compression, not the disk,
//! is measured. Timed: from the first message to the files closed (records and flush included).
//!
//! `nice -n 19 cargo bench -p std-h5-writer --bench n_writers --profile dev [-- IMAGES ROUNDS]`
//! (the dev profile builds std-h5-writer at opt-level 3; see docs/benchmarks.md).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use h5_writer::command::{Command, Deal, RunContext};
use h5_writer::file::{Compression, ImageFile, ImageFileSpec, ImageRecord};
use h5_writer::service::Writer;
use image_buffer::{Expect, RingOwner, RingReader};
use std_daq_common::messages::IMAGE_METADATA_VERSION;
use std_daq_common::{DetectorConfig, Dtype, ImageMetadata, ImageStatus};

const CONFIG: &str = r#"{"detector_name":"nwbench","detector_type":"jungfrau-raw",
    "n_modules":1,"bit_depth":16,"image_pixel_height":512,"image_pixel_width":1024,
    "start_udp_port":50000,"module_positions":{"0":[0,0,1023,511]}}"#;

/// Distinct frames in the ring (the rest repeat them), so that no writer compresses one frame
/// from a hot cache over and over.
const DISTINCT_FRAMES: u64 = 32;

fn meta(cfg: &DetectorConfig, image_id: u64) -> ImageMetadata {
    ImageMetadata {
        image_id,
        data_bytes: cfg.image_bytes() as u64,
        height: cfg.image_pixel_height,
        width: cfg.image_pixel_width,
        n_modules: 1,
        dtype: Dtype::Uint16 as u16,
        status: ImageStatus::Good as u16,
        version: IMAGE_METADATA_VERSION,
        ..bytemuck::Zeroable::zeroed()
    }
}

/// Starts `writer`'s run (dealt if `deal`) into `file`, then, once every thread is at
/// `barrier`, feeds it the ImageMetadata of ids `0..images`; returns the rows written.
fn write_run(
    cfg: &DetectorConfig,
    ring_name: &str,
    file: &Path,
    images: u64,
    deal: Option<Deal>,
    barrier: &Barrier,
) -> u64 {
    let reader = RingReader::attach(ring_name, Expect::default()).unwrap();
    let mut writer = Writer::new(cfg, reader)
        .with_compression(Compression::BitshuffleLz4)
        .with_checkpoint_interval(Duration::from_secs(1));
    if let Some(d) = deal {
        writer = writer.with_share(d.writer, d.writers).unwrap();
    }
    let reply = writer.handle_command(Command::Start {
        output_file: file.display().to_string(),
        n_images: images,
        request_id: None,
        context: RunContext {
            deal,
            ..RunContext::default()
        },
    });
    assert!(reply.ok, "{reply:?}");
    let metas: Vec<ImageMetadata> = (0..images).map(|id| meta(cfg, id)).collect();
    barrier.wait();
    for m in &metas {
        writer.on_message(m.as_bytes());
    }
    let run = writer.status().last_run.unwrap();
    assert_eq!(run.end, "completed");
    assert_eq!(run.images_good, run.images_written, "every image good");
    run.images_written
}

/// One measurement with `writers` writers (1: no deal): seconds, rows written, bytes on disk.
fn measure(
    cfg: &DetectorConfig,
    ring_name: &str,
    dir: &Path,
    tag: &str,
    images: u64,
    writers: u32,
) -> (f64, u64, u64) {
    let barrier = Arc::new(Barrier::new(writers as usize + 1));
    let files: Vec<_> = (0..writers)
        .map(|k| dir.join(format!("{tag}_writer{k}.h5")))
        .collect();
    let threads: Vec<_> = (0..writers)
        .map(|k| {
            let (cfg, ring_name, file, barrier) = (
                cfg.clone(),
                ring_name.to_string(),
                files[k as usize].clone(),
                barrier.clone(),
            );
            let deal = (writers > 1).then_some(Deal {
                writer: k,
                writers,
                first_image_id: 0,
                await_first_image_id: false,
            });
            std::thread::spawn(move || write_run(&cfg, &ring_name, &file, images, deal, &barrier))
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let rows: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let secs = start.elapsed().as_secs_f64();
    let bytes = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    for f in &files {
        std::fs::remove_file(f).unwrap();
    }
    (secs, rows, bytes)
}

/// Issue 19's overload fix: what a row without pixels costs, now (record only, no chunk) and
/// before (a compressed zero chunk written, what `write_zero_image` did): microseconds per row.
fn lost_row_cost(cfg: &DetectorConfig, dir: &Path, rows: u64) -> (f64, f64) {
    let spec = ImageFileSpec {
        detector_name: "nwbench".into(),
        n_images: rows,
        height: cfg.image_pixel_height,
        width: cfg.image_pixel_width,
        dtype: Dtype::Uint16,
        compression: Compression::BitshuffleLz4,
        n_modules: 1,
    };
    let lost = ImageRecord {
        status: ImageStatus::LostInBuffer as u16,
        ..ImageRecord::default()
    };
    let zeros = vec![0u8; cfg.image_bytes()];
    let mut per_row = [0.0; 2];
    for (k, chunk) in [false, true].into_iter().enumerate() {
        let path = dir.join(format!("lost{k}.h5"));
        let mut f = ImageFile::create(&path, &spec).unwrap();
        let start = Instant::now();
        for i in 0..rows {
            if chunk {
                f.write_image(i, &zeros, lost).unwrap();
            } else {
                f.write_zero_image(i, lost).unwrap();
            }
        }
        f.close().unwrap();
        per_row[k] = start.elapsed().as_secs_f64() * 1e6 / rows as f64;
        std::fs::remove_file(&path).unwrap();
    }
    (per_row[0], per_row[1])
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let images = args.first().copied().unwrap_or(512);
    let rounds = args.get(1).copied().unwrap_or(3);
    let cfg = DetectorConfig::from_json_str(CONFIG, "bench").unwrap();
    let (h, w) = (
        cfg.image_pixel_height as usize,
        cfg.image_pixel_width as usize,
    );
    let ring_name = format!("std-daq.nwbench-{}.image", std::process::id());
    let mut ring: RingOwner<ImageMetadata> =
        RingOwner::create(&ring_name, images, cfg.image_bytes() as u64).unwrap();
    let frames: Vec<Vec<u8>> = (0..DISTINCT_FRAMES)
        .map(|seed| common::u16_bytes(&common::jungfrau_raw(h, w, seed)))
        .collect();
    for id in 0..images {
        let mut slot = ring.begin_write(id).unwrap();
        slot.data_mut()[..cfg.image_bytes()]
            .copy_from_slice(&frames[(id % DISTINCT_FRAMES) as usize]);
        *slot.meta_mut() = meta(&cfg, id);
        slot.commit();
    }
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let raw_gb = (images * cfg.image_bytes() as u64) as f64 / 1e9;
    println!(
        "n_writers bench: {images} JUNGFRAU-like {h}x{w} u16 frames ({raw_gb:.2} GB raw), \
         bitshuffle+LZ4, files on {}, {rounds} rounds, load {}",
        dir.path().display(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternating, so a change of load hits both alike.
        for writers in [1u32, 2] {
            let (secs, rows, bytes) = measure(
                &cfg,
                &ring_name,
                dir.path(),
                &format!("r{round}w{writers}"),
                images,
                writers,
            );
            assert_eq!(rows, images, "the writers' rows are the run's images");
            let gbs = raw_gb / secs;
            println!(
                "  round {round} writers {writers}: {secs:.3} s  {gbs:.2} GB/s raw  \
                 {:.0} images/s  ratio {:.2}",
                images as f64 / secs,
                raw_gb * 1e9 / bytes as f64
            );
            if writers == 1 { &mut one } else { &mut two }.push(gbs);
        }
    }
    let (now, before) = lost_row_cost(&cfg, dir.path(), images);
    println!(
        "a row lost in the buffer: {now:.1} us (no chunk) vs {before:.1} us (a zero chunk, as \
         before issue 19)"
    );
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m1, m2) = (median(&mut one), median(&mut two));
    println!(
        "median: 1 writer {m1:.2} GB/s, 2 writers {m2:.2} GB/s: {:.2}x; load after {}",
        m2 / m1,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
