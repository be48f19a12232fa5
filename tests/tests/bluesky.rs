//! bluesky acquires through std-daq: a real `RunEngine` (the project's .venv: bluesky 1.15.1,
//! ophyd-async 0.21.3) runs `bp.count([det], num=5)` and a fly scan with
//! `stddaq_bluesky.StdDaqDetector` against the real services (`std-daq up` with the writer agent,
//! `std-daq api`) and the simulator. tests/python/bluesky_run.py runs the plans and reads the
//! data back through the stream resources; this test checks the documents, that the datums cover
//! the file's frames, that every row read back is the simulator's frame, and the files with the
//! independent checker (tests/python/verify_h5.py, Debian's h5py).
//!
//! Two acquire logics: the simulator driven by the device (one frame per trigger: the file holds
//! exactly the run's frames) and the default free-running one (the simulator sends frames on its
//! own; made by the blueapi device factory).

#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std_daq_tests::stack::{free_run, venv_python, SetOnDrop, Stack};

fn run_plans(stack: &Stack, dir: &Path, args: &[&str]) -> Value {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new(venv_python().unwrap())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/bluesky_run.py"))
        .args(["--url", &format!("http://127.0.0.1:{}", stack.port)])
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bluesky_run.py failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

/// The run's datums as (start, stop).
fn datums(run: &Value) -> Vec<(u64, u64)> {
    run["datums"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["start"].as_u64().unwrap(), d["stop"].as_u64().unwrap()))
        .collect()
}

/// The one stream resource of a run: its file, checked against where the PathProvider wrote.
fn resource_file(run: &Value, file: &Path) -> std::path::PathBuf {
    let res = run["stream_resources"].as_array().unwrap();
    assert_eq!(res.len(), 1, "{run}");
    assert_eq!(res[0]["data_key"], "det");
    assert_eq!(res[0]["mimetype"], "application/x-hdf5");
    assert_eq!(res[0]["uri"], format!("file://localhost{}", file.display()));
    assert_eq!(
        res[0]["parameters"],
        json!({"chunk_shape": [1, 1024, 1024], "dataset": "/entry/data/data"})
    );
    assert_eq!(
        run["data_keys"]["det"],
        json!({"shape": [1, 1024, 1024], "dtype_numpy": "<u2", "external": "STREAM:"})
    );
    file.to_path_buf()
}

/// Every row the datums name was read back and is the simulator's frame of its image id.
fn read_back_exact(run: &Value, rows: u64) {
    let rb = &run["read_back"];
    assert_eq!(rb["not_exact"], json!([]), "{rb}");
    assert_eq!(rb["exact"], rows, "{rb}");
    let read: Vec<u64> = rb["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_u64().unwrap())
        .collect();
    assert_eq!(
        read,
        (0..rows).collect::<Vec<_>>(),
        "rows in order, none twice"
    );
}

/// The independent checker: every image of the file is exact; returns how many it holds.
fn file_exact(file: &Path, det: &str) -> u64 {
    let report = std_daq_tests::verify_h5(file, det, "").unwrap();
    let images = report["images"].as_u64().unwrap();
    assert_eq!(report["exact_images"], images, "{report}");
    assert_eq!(report["ids_consecutive"], true, "{report}");
    images
}

fn count_documents_are_standard(run: &Value) {
    assert_eq!(run["exit_status"], "success", "{run}");
    assert_eq!(
        run["counts"],
        json!({"start": 1, "descriptor": 1, "stream_resource": 1, "stream_datum": 5, "event": 5, "stop": 1})
    );
    let order: Vec<&str> = run["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut want = vec!["start", "descriptor", "stream_resource"];
    for _ in 0..5 {
        want.extend(["stream_datum", "event"]);
    }
    want.push("stop");
    assert_eq!(order, want);
    assert_eq!(datums(run), (0..5).map(|k| (k, k + 1)).collect::<Vec<_>>());
}

#[test]
fn a_run_engine_counts_and_flies_with_the_std_daq_device() {
    let stack = Stack::start("bluesky", &[]).unwrap();
    let det = stack.cfg.detector_name.clone();
    let sim = stack.simulator().unwrap();

    // The device drives the simulator: rows and events match one to one.
    let dir = stack.root.join("driven");
    let config = stack.config_path.display().to_string();
    let report = run_plans(
        &stack,
        &dir,
        &[
            "--plans",
            "count,fly",
            "--acquire",
            "sim",
            "--sim",
            &sim.display().to_string(),
            "--config",
            &config,
            "--fly-frames",
            "20",
        ],
    );
    let (count, fly) = (&report[0], &report[1]);
    count_documents_are_standard(count);
    let file = resource_file(count, &dir.join("scan_00000.h5"));
    read_back_exact(count, 5);
    assert_eq!(
        file_exact(&file, &det),
        5,
        "the file holds exactly the run's frames"
    );
    assert_eq!(count["final_status"]["images_written"], 5, "{count}");

    assert_eq!(fly["exit_status"], "success", "{fly}");
    let c = &fly["counts"];
    assert_eq!(
        (
            &c["start"],
            &c["descriptor"],
            &c["stream_resource"],
            &c["stop"]
        ),
        (&json!(1), &json!(1), &json!(1), &json!(1)),
        "{fly}"
    );
    // The datums cover 0..20 without a gap or an overlap.
    let d = datums(fly);
    assert_eq!(d.first().map(|x| x.0), Some(0), "{d:?}");
    assert_eq!(d.last().map(|x| x.1), Some(20), "{d:?}");
    assert!(d.windows(2).all(|w| w[0].1 == w[1].0), "{d:?}");
    let file = resource_file(fly, &dir.join("scan_00001.h5"));
    read_back_exact(fly, 20);
    assert_eq!(file_exact(&file, &det), 20);

    // A free-running detector, the device from the blueapi factory with its default logic.
    let stop = AtomicBool::new(false);
    let next_frame = AtomicU64::new(10_000);
    let dir = stack.root.join("free");
    let report = std::thread::scope(|scope| {
        let feeder =
            scope.spawn(|| free_run(&sim, &stack.config_path, &stop, &next_frame).unwrap());
        let _stop = SetOnDrop(&stop);
        let report = run_plans(&stack, &dir, &["--plans", "count", "--acquire", "free"]);
        drop(_stop);
        feeder.join().unwrap();
        report
    });
    let count = &report[0];
    count_documents_are_standard(count);
    let file = resource_file(count, &dir.join("scan_00000.h5"));
    read_back_exact(count, 5);
    // std-daq wrote every frame that came while the write was open: the first 5 are the events'.
    let images = file_exact(&file, &det);
    assert!(images >= 5, "{images}");
    assert_eq!(count["final_status"]["images_written"], images, "{count}");
    eprintln!(
        "free-running count: 5 events, {images} frames in {}",
        file.display()
    );

    stack.finish().unwrap();
}
