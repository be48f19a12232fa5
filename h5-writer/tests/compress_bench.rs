//! Throughput of bitshuffle+LZ4 chunk compression on JUNGFRAU-like data, one core.
//!
//! `cargo test -p std-h5-writer --release --test compress_bench -- --ignored --nocapture`
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use h5_writer::compress::{decompress, Compressor};

fn measure(name: &str, image: &[u8], min_secs: f64) {
    let mut c = Compressor::new(2).unwrap();
    let compressed = c.compress(image).unwrap().len();
    // Warm up, then as many rounds as fit in `min_secs`.
    let start = Instant::now();
    let mut rounds = 0u64;
    let mut total = 0usize;
    while start.elapsed().as_secs_f64() < min_secs {
        total += c.compress(std::hint::black_box(image)).unwrap().len();
        rounds += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(total, compressed * rounds as usize);
    let gbs = (image.len() as u64 * rounds) as f64 / secs / 1e9;

    let chunk = c.compress(image).unwrap().to_vec();
    let mut out = Vec::new();
    let start = Instant::now();
    let mut drounds = 0u64;
    while start.elapsed().as_secs_f64() < min_secs / 2.0 {
        decompress(std::hint::black_box(&chunk), 2, &mut out).unwrap();
        drounds += 1;
    }
    let dgbs = (image.len() as u64 * drounds) as f64 / start.elapsed().as_secs_f64() / 1e9;
    assert_eq!(out, image);

    // Uncompressed "compression" for comparison: the copy the writer would otherwise not make.
    let mut copy = vec![0u8; image.len()];
    let start = Instant::now();
    let mut crounds = 0u64;
    while start.elapsed().as_secs_f64() < min_secs / 4.0 {
        copy.copy_from_slice(std::hint::black_box(image));
        std::hint::black_box(&copy);
        crounds += 1;
    }
    let cgbs = (image.len() as u64 * crounds) as f64 / start.elapsed().as_secs_f64() / 1e9;

    println!(
        "{name:<34} {:>8} B -> {compressed:>8} B  ratio {:>5.2}  compress {gbs:>5.2} GB/s \
         ({:>6.0} images/s)  decompress {dgbs:>5.2} GB/s  memcpy {cgbs:>5.1} GB/s",
        image.len(),
        image.len() as f64 / compressed as f64,
        rounds as f64 / secs,
    );
}

#[test]
#[ignore = "benchmark: run in --release with --nocapture"]
fn bench_bitshuffle_lz4_jungfrau() {
    println!("one thread, u16, bitshuffle block 4096 elements");
    for (h, w) in [(512, 1024), (1024, 1024)] {
        let raw = common::u16_bytes(&common::jungfrau_raw(h, w, 1));
        measure(&format!("{h}x{w} raw (pedestal+noise)"), &raw, 2.0);
        let cor = common::u16_bytes(&common::jungfrau_corrected(h, w, 2));
        measure(&format!("{h}x{w} corrected (photons)"), &cor, 2.0);
    }
    let zeros = vec![0u8; 1024 * 1024 * 2];
    measure("1024x1024 zeros", &zeros, 1.0);
    let mut rng = common::Rng::new(5);
    let random: Vec<u8> = (0..1024 * 1024 * 2).map(|_| rng.next_u64() as u8).collect();
    measure("1024x1024 random bytes", &random, 1.0);
}
