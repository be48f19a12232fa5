//! h5py (what scientists use) reads the master file of N writers: `tests/read_master.py`, run by
//! the project's venv (`.venv`, scripts/setup.sh: h5py, hdf5plugin, xxhash) from a working
//! directory other than the master's folder, checks every position's pixels, ledger row and
//! checksum, for raw and bitshuffle-compressed sources, after the folder was moved, and with the
//! master named by a relative path; and PyPI's `nxmx` reads the NXmx groups of a master
//! (tests/python/check_nxmx.py). Without the venv it is skipped, except in CI (`CI=true`),
//! where that is a failure.
//!
//! One test on purpose, in its own binary: python inherits libhdf5's open descriptors and their
//! `flock`s from the test process (see h5py_reads_file.rs), so no other test may have a file open
//! while it runs.
#![allow(clippy::unwrap_used)]

mod master_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use h5_writer::file::Compression;
use h5_writer::master::write_master;
use master_common::*;
use std_daq_common::writer_command::MasterRequest;

/// The venv's python (as tests/src/stack.rs `venv_python`, which h5-writer cannot depend on).
fn venv_python() -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if python.exists() {
        return Some(python);
    }
    let why = format!(
        "{} is missing: run `bash scripts/setup.sh` (it creates .venv from \
         python/requirements.txt)",
        python.display()
    );
    assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{why}");
    eprintln!("SKIPPED master_h5py: {why}");
    None
}

/// Runs read_master.py on `master` (as given, relative paths against `cwd`) from `cwd`.
fn h5py_reads(
    python: &Path,
    cwd: &Path,
    master: &Path,
    req: &MasterRequest,
    missing: &[u64],
) -> serde_json::Value {
    let names: Vec<String> = req
        .sources
        .iter()
        .map(|s| {
            Path::new(&s.file)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let expected = serde_json::json!({
        "images": req.images(),
        "first_image_id": FIRST_IMAGE_ID,
        "detector": DETECTOR,
        "height": HEIGHT,
        "width": WIDTH,
        "missing": missing,
        "data_files": names,
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/read_master.py");
    // Not locking: a python started by a test running beside this one may have inherited
    // (fork) this process's descriptor of the file with HDF5's lock on it.
    let out = Command::new(python)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .arg(&script)
        .arg(master)
        .arg(expected.to_string())
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "read_master.py {}: {}",
        master.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A master with NXmx groups over two writers' 512 x 1024 files, read by tests/python/check_nxmx.py.
fn nxmx_reads(python: &Path, root: &Path, cwd: &Path, config: &str) {
    let cfg = std_daq_common::config::DetectorConfig::from_json_str(
        r#"{"detector_name":"jf-test","detector_type":"jungfrau-raw","n_modules":1,
            "bit_depth":16,"image_pixel_height":512,"image_pixel_width":1024,
            "start_udp_port":50000,"module_positions":{"0":[0,0,1023,511]}}"#,
        "test",
    )
    .unwrap();
    let nxmx = cfg.nxmx().unwrap();
    let spec = h5_writer::file::ImageFileSpec {
        height: 512,
        width: 1024,
        ..spec(Compression::None)
    };
    let folder = root.join("nxmx");
    std::fs::create_dir(&folder).unwrap();
    let mut req = write_run(&folder, "nx", &spec, Some(&nxmx), &[2, 1], &[]);
    req.n_images = Some(3);
    write_master(&req, &spec, Some(&nxmx), config).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/check_nxmx.py");
    // Not locking: a python started by a test running beside this one may have inherited
    // (fork) this process's descriptor of the file with HDF5's lock on it.
    let out = Command::new(python)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .arg(&script)
        .arg(folder.join("nx.h5"))
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check_nxmx.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["entries"], 1);
    assert_eq!(report["definition"], "NXmx");
    assert_eq!(report["shape"], serde_json::json!([3, 512, 1024]));
    assert_eq!(report["same_dataset_as_std_daq_path"], true);
    let sum: f64 = (0..3u64)
        .flat_map(|p| (0..512).flat_map(move |y| (0..1024).map(move |x| pixel(p, y, x))))
        .map(f64::from)
        .sum();
    assert_eq!(report["pixel_sum"].as_f64(), Some(sum));
}

#[test]
fn h5py_reads_the_master_from_anywhere() {
    let Some(python) = venv_python() else { return };
    let root = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let config = r#"{"detector_name":"jf-test"}"#;

    // Raw sources, two writers, uneven rows.
    let raw = root.path().join("raw");
    std::fs::create_dir(&raw).unwrap();
    let req = write_run(&raw, "run", &spec(Compression::None), None, &[5, 4], &[]);
    write_master(&req, &spec(Compression::None), None, config).unwrap();
    let report = h5py_reads(&python, elsewhere.path(), &raw.join("run.h5"), &req, &[]);
    assert_eq!(report["images"], 9);
    assert_eq!(report["checked"], 9);
    assert_eq!(
        report["sources"],
        serde_json::json!(["run_writer0.h5", "run_writer1.h5"])
    );
    assert_eq!(report["source_filters"], serde_json::json!([]));

    // The folder moved: the sources are found beside the master, from another cwd and by a
    // relative path.
    let moved = root.path().join("moved");
    std::fs::rename(&raw, &moved).unwrap();
    let report = h5py_reads(&python, elsewhere.path(), &moved.join("run.h5"), &req, &[]);
    assert_eq!(report["checked"], 9);
    let report = h5py_reads(&python, root.path(), Path::new("moved/run.h5"), &req, &[]);
    assert_eq!(report["checked"], 9);

    // NXmx: PyPI's `nxmx` (DIALS's reader) finds the run's images at /entry/data/data through
    // the master, the same dataset as /<detector>/data.
    nxmx_reads(&python, root.path(), elsewhere.path(), config);

    // Bitshuffle/LZ4 sources, three writers, a position that never came, an early end.
    if !hdf5::filters::Filter::user(32008, &[0, 2]).is_available() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "the bitshuffle HDF5 filter is missing (apt-get install bitshuffle)"
        );
        eprintln!("SKIPPED the compressed half: no bitshuffle HDF5 filter plugin");
        return;
    }
    let packed = root.path().join("packed");
    std::fs::create_dir(&packed).unwrap();
    let spec = spec(Compression::BitshuffleLz4);
    let req = write_run(&packed, "run", &spec, None, &[3, 3, 2], &[4]);
    write_master(&req, &spec, None, config).unwrap();
    let report = h5py_reads(
        &python,
        elsewhere.path(),
        &packed.join("run.h5"),
        &req,
        &[4],
    );
    assert_eq!(report["images"], 8);
    assert_eq!(report["checked"], 7);
    assert_eq!(report["source_filters"], serde_json::json!(["32008"]));
    let req = write_run(&packed, "short", &spec, None, &[3, 1, 3], &[]);
    write_master(&req, &spec, None, config).unwrap();
    let report = h5py_reads(
        &python,
        elsewhere.path(),
        &packed.join("short.h5"),
        &req,
        &[],
    );
    assert_eq!(
        (report["images"].as_u64(), report["checked"].as_u64()),
        (Some(4), Some(4))
    );
}
