//! h5py (what scientists use) opens a file written by `ImageFile`.
//!
//! Its own test binary on purpose: a child process inherits every open file descriptor of the test
//! process, and libhdf5 opens files without `O_CLOEXEC` and holds a `flock` on them. Spawned next
//! to the unit tests, python would keep the lock of whatever file another test thread has open,
//! and that test's own re-open would then fail with "unable to lock file".
#![allow(clippy::unwrap_used)]

use std::process::Command;

use h5_writer::file::{Compression, ImageFile, ImageFileSpec, ImageRecord};
use std_daq_common::Dtype;

const PYTHON: &str = "/usr/bin/python3";

fn pixel(i: u64, y: usize, x: usize) -> u16 {
    (i as u16) * 1000 + (y as u16) * 10 + x as u16 + 1
}

#[test]
fn h5py_reads_the_file() {
    let probe = Command::new(PYTHON).args(["-c", "import h5py"]).output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("SKIPPED h5py_reads_the_file: {PYTHON} cannot import h5py");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h5py.h5");
    let spec = ImageFileSpec {
        detector_name: "jf-test".into(),
        n_images: 4,
        height: 6,
        width: 8,
        dtype: Dtype::Uint16,
        compression: Compression::None,
        n_modules: 2,
    };
    let mut f = ImageFile::create(&path, &spec).unwrap();
    for i in 0..3u64 {
        let image: Vec<u8> = (0..6)
            .flat_map(|y| (0..8).map(move |x| (y, x)))
            .flat_map(|(y, x)| pixel(i, y, x).to_le_bytes())
            .collect();
        let mut record = ImageRecord {
            image_id: 5000 + i,
            status: if i == 1 { 4 } else { 1 },
            missing_packets: i as u32,
            frame_index: 70 + i,
            timestamp: 1_000_000 + i,
            bunch_id: 0.5 + i as f64,
            checksum: 0xffff_ffff_ffff_fff0 + i,
            checksum_kind: 1,
            calibration_id: 99,
            ..ImageRecord::default()
        };
        record.module_missing_packets[1] = i as u16;
        f.write_image(i, &image, record).unwrap();
    }
    assert_eq!(f.close().unwrap(), 3);

    let script = r#"
import sys, h5py
with h5py.File(sys.argv[1], "r") as f:
    d = f["jf-test/data"]
    print(d.shape, d.dtype, d.chunks, d.maxshape, d.compression, int(d[2, 5, 7]))
    print(f["jf-test/image_id"].dtype, list(f["jf-test/image_id"][:]))
    print(f["jf-test/status"].dtype, list(f["jf-test/status"][:]))
    print(f["jf-test/missing_packets"].dtype, list(f["jf-test/missing_packets"][:]))
    g = f["jf-test"]
    print([int(v) for v in g["frame_index"]], [int(v) for v in g["timestamp"]], [float(v) for v in g["bunch_id"]])
    print(g["module_missing_packets"].dtype, g["module_missing_packets"][:].tolist())
    print([int(v) for v in g["lost_in_buffer"]], [hex(int(v)) for v in g["checksum"]], [int(v) for v in g["checksum_kind"]], [int(v) for v in g["calibration_id"]])
    print(g["module_missing_packets"].attrs["units"], g["bunch_id"].attrs["description"][:24])
"#;
    // Not locking: a python started by a test running beside this one may have inherited
    // (fork) this process's descriptor of the file with HDF5's lock on it.
    let out = Command::new(PYTHON)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .args(["-c", script])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "h5py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            format!(
                "(3, 6, 8) uint16 (1, 6, 8) (None, 6, 8) None {}",
                pixel(2, 5, 7)
            )
            .as_str(),
            "uint64 [5000, 5001, 5002]",
            "uint16 [1, 4, 1]",
            "uint32 [0, 1, 2]",
            "[70, 71, 72] [1000000, 1000001, 1000002] [0.5, 1.5, 2.5]",
            "uint16 [[0, 0], [0, 1], [0, 2]]",
            "[0, 1, 0] ['0xfffffffffffffff0', '0xfffffffffffffff1', '0xfffffffffffffff2'] [1, 1, 1] [99, 99, 99]",
            "packets the detector's pulse/bun",
        ],
        "h5py output:\n{stdout}"
    );
}

/// Rows without pixels (a lost image, a trailing one) have no chunk and h5py reads them as
/// zeros (the dataset's defined fill value), between and after rows with pixels.
#[test]
fn h5py_reads_rows_without_a_chunk_as_zeros() {
    let probe = Command::new(PYTHON).args(["-c", "import h5py"]).output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("SKIPPED h5py_reads_rows_without_a_chunk_as_zeros: {PYTHON} cannot import h5py");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("holes.h5");
    let spec = ImageFileSpec {
        detector_name: "jf-test".into(),
        n_images: 4,
        height: 6,
        width: 8,
        dtype: Dtype::Uint16,
        compression: Compression::None,
        n_modules: 1,
    };
    let image = |i: u64| -> Vec<u8> {
        (0..6)
            .flat_map(|y| (0..8).map(move |x| (y, x)))
            .flat_map(|(y, x)| pixel(i, y, x).to_le_bytes())
            .collect()
    };
    let lost = |i: u64| ImageRecord {
        image_id: 5000 + i,
        status: 4,
        ..ImageRecord::default()
    };
    let mut f = ImageFile::create(&path, &spec).unwrap();
    f.write_image(0, &image(0), ImageRecord::default()).unwrap();
    f.write_zero_image(1, lost(1)).unwrap();
    f.write_image(2, &image(2), ImageRecord::default()).unwrap();
    f.write_zero_image(3, lost(3)).unwrap();
    assert_eq!(f.close().unwrap(), 4);
    let script = r#"
import sys, h5py
with h5py.File(sys.argv[1], "r") as f:
    d = f["jf-test/data"]
    a = d[()]
    print(d.shape, d.fillvalue, d.id.get_num_chunks(), int(a[1].max()), int(a[3].max()), int(a[2, 5, 7]))
"#;
    // Not locking: a python started by a test running beside this one may have inherited
    // (fork) this process's descriptor of the file with HDF5's lock on it.
    let out = Command::new(PYTHON)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .args(["-c", script])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "h5py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        format!("(4, 6, 8) 0 2 0 0 {}", pixel(2, 5, 7))
    );
}
