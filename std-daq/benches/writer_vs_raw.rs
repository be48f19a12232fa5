//! Writer throughput against a plain sequential write of the same bytes to the same filesystem,
//! measured in one run, alternating. Run by hand (not in CI):
//!
//! ```text
//! cargo bench -p std-daq --bench writer_vs_raw -- [dir] [images] [rounds]
//! ```
//! Both sides write `images` JUNGFRAU-sized images (1024x512 u16, 1 MiB) and then fsync, so the
//! figure includes getting the bytes to disk, not just into the page cache.

#![allow(clippy::unwrap_used)] // a by-hand benchmark: any failure should stop it loudly

use h5_writer::file::{ImageFile, ImageFileSpec, ImageRecord};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use std_daq_common::Dtype;

fn image(i: u64) -> Vec<u8> {
    (0..1024 * 512u64)
        .flat_map(|p| ((p * 7 + i * 13) as u16 & 0x3fff).to_le_bytes())
        .collect()
}

fn raw_write(path: &Path, images: &[Vec<u8>], n: u64) -> f64 {
    let t = Instant::now();
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    for i in 0..n {
        f.write_all(&images[(i % images.len() as u64) as usize])
            .unwrap();
    }
    let f = f.into_inner().unwrap();
    f.sync_all().unwrap();
    t.elapsed().as_secs_f64()
}

fn h5_write(path: &Path, images: &[Vec<u8>], n: u64) -> f64 {
    let spec = ImageFileSpec {
        detector_name: "bench".into(),
        n_images: n,
        height: 512,
        width: 1024,
        dtype: Dtype::Uint16,
        compression: Default::default(),
        n_modules: 1,
    };
    let t = Instant::now();
    let mut file = ImageFile::create(path, &spec).unwrap();
    for i in 0..n {
        let record = ImageRecord {
            image_id: i,
            status: 1,
            ..ImageRecord::default()
        };
        file.write_image(i, &images[(i % images.len() as u64) as usize], record)
            .unwrap();
    }
    file.close().unwrap();
    std::fs::File::open(path).unwrap().sync_all().unwrap();
    t.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let dir = PathBuf::from(args.first().cloned().unwrap_or_else(|| "/tmp".into()));
    let n: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let rounds: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let images: Vec<Vec<u8>> = (0..16).map(image).collect();
    let gb = n as f64 * (1 << 20) as f64 / 1e9;
    println!(
        "{n} images of 1 MiB ({gb:.2} GB) into {}, fsync included",
        dir.display()
    );
    let (mut raw, mut h5) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let rp = dir.join(format!("std-daq-bench-raw-{}.bin", std::process::id()));
        let hp = dir.join(format!("std-daq-bench-h5-{}.h5", std::process::id()));
        let r = gb / raw_write(&rp, &images, n);
        let h = gb / h5_write(&hp, &images, n);
        let _ = std::fs::remove_file(&rp);
        let _ = std::fs::remove_file(&hp);
        println!(
            "round {round}: raw {r:.2} GB/s, writer {h:.2} GB/s, ratio {:.2}",
            h / r
        );
        raw.push(r);
        h5.push(h);
    }
    raw.sort_by(f64::total_cmp);
    h5.sort_by(f64::total_cmp);
    let (r, h) = (raw[raw.len() / 2], h5[h5.len() / 2]);
    println!(
        "median: raw {r:.2} GB/s, writer {h:.2} GB/s, writer/raw {:.2}",
        h / r
    );
}
