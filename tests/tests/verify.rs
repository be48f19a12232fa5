//! The end-to-end checksum reaches the file: the real pipeline (simulated JUNGFRAU, 2 modules,
//! raw and bitshuffle-compressed) writes files that `std-daq verify` passes with every image
//! checked; one byte flipped inside image 3's chunk on disk makes `std-daq verify` fail naming
//! exactly that image (and its image_id), whatever the compression. The stored checksums are
//! also recomputed by an independent Python implementation of the documented algorithm.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use std_daq::pipeline::{default_bin_dir, Pipeline, SimulatedDetector};
use std_daq_tests::stack::venv_python;

const N: u64 = 8;
const FLIPPED: u64 = 3;

fn verify(file: &Path) -> (bool, serde_json::Value, String) {
    let out = Command::new(default_bin_dir().unwrap().join("std-daq"))
        .arg("verify")
        .arg(file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(stdout.lines().next().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "std-daq verify printed no report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (file offset, stored size) of image `index`'s chunk and its image_id, from h5py.
fn chunk_of(file: &Path, detector: &str, index: u64) -> (u64, u64, u64) {
    let script = r#"
import sys, h5py
with h5py.File(sys.argv[1], "r") as f:
    g = f[sys.argv[2]]
    i = int(sys.argv[3])
    info = g["data"].id.get_chunk_info_by_coord((i, 0, 0))
    print(info.byte_offset, info.size, int(g["image_id"][i]))
"#;
    let out = Command::new(venv_python().unwrap())
        .args(["-c", script])
        .arg(file)
        .arg(detector)
        .arg(index.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    (v[0], v[1], v[2])
}

fn python_checksums(file: &Path, detector: &str) -> serde_json::Value {
    let out = Command::new(venv_python().unwrap())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/checksums.py"))
        .arg(file)
        .arg(detector)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "checksums.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn verify_passes_written_files_and_names_the_image_with_a_flipped_byte() {
    for (tag, compression) in [("vfraw", "none"), ("vfbs", "bitshuffle-lz4")] {
        let mut opts = std_daq_tests::options(tag).unwrap();
        opts.n_modules = 2;
        opts.extra_config = vec![("compression".into(), compression.into())];
        let work = opts.work_dir.clone();
        let det = opts.detector_name.clone();
        let mut p =
            Pipeline::start_detector(opts, SimulatedDetector::Jungfrau, Duration::from_secs(60))
                .unwrap();
        let file = work.join(format!("{tag}.h5"));
        p.start_run(&file, N).unwrap();
        p.run_simulator(N, 100.0, "", false).unwrap();
        let run = p.wait_run(Duration::from_secs(10)).unwrap();
        assert_eq!(run.images_written, N);
        let stop = p.stop().unwrap();
        assert!(stop.failed.is_empty(), "{stop:?}");

        let (ok, report, stderr) = verify(&file);
        assert!(ok, "{tag}: {report} {stderr}");
        assert_eq!(report["images"], N, "{tag}: {report}");
        assert_eq!(
            report["checked"], N,
            "{tag}: every image carries a checksum: {report}"
        );
        // The same checksums from an independent implementation (Python xxhash, h5py,
        // hdf5plugin): the algorithm is the documented one, not whatever the Rust code does.
        let py = python_checksums(&file, &det);
        assert_eq!(
            py["kinds"],
            serde_json::json!(vec![1; N as usize]),
            "{tag}: {py}"
        );
        assert_eq!(py["computed"], py["stored"], "{tag}: {py}");

        let (offset, size, image_id) = chunk_of(&file, &det, FLIPPED);
        let at = offset + size / 2;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .unwrap();
        let mut byte = [0u8];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut byte).unwrap();
        byte[0] ^= 0x5a;
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&byte).unwrap();
        drop(f);

        let (ok, report, stderr) = verify(&file);
        assert!(
            !ok,
            "{tag}: a flipped byte must fail verification: {report}"
        );
        let failed: Vec<(u64, u64)> = report["mismatches"]
            .as_array()
            .unwrap()
            .iter()
            .chain(report["unreadable"].as_array().unwrap())
            .map(|m| {
                (
                    m["index"].as_u64().unwrap(),
                    m["image_id"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(failed, vec![(FLIPPED, image_id)], "{tag}: {report}");
        assert!(
            stderr.contains(&format!("image {FLIPPED} (image_id {image_id})")),
            "{tag}: {stderr}"
        );
        eprintln!("{tag}: {stderr}");
    }
}
