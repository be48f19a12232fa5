//! The written file is NXmx: the PyPI package `nxmx` (DIALS's reader), in the project's .venv,
//! loads files of the real pipeline for JUNGFRAU (2 modules; raw and bitshuffle-compressed, read
//! with PyPI's hdf5plugin), EIGER and GigaFRoST (tests/python/check_nxmx.py): one entry,
//! definition NXmx, one detector with one module per detector module, every transformation
//! chain resolvable to the documented lab positions, wavelength, distance, NXdata with n images
//! that are std_daq's `/<detector>/data` (checked pixel-exact by verify_h5.py); and a write
//! request's `nxmx` field sets its own file's geometry through the real agent and API.

#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use std_daq::pipeline::{Pipeline, SimulatedDetector};
use std_daq_tests::stack::venv_python;

fn check_nxmx(file: &Path) -> Value {
    let out = Command::new(venv_python().unwrap())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/check_nxmx.py"))
        .arg(file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check_nxmx.py: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

/// Writes `n` images of `detector` with `extra` config keys; returns (file, detector name).
fn write_file(
    tag: &str,
    detector: SimulatedDetector,
    n_modules: u16,
    extra: Vec<(String, Value)>,
    n: u64,
) -> (std::path::PathBuf, String, std::path::PathBuf) {
    let mut opts = std_daq_tests::options(tag).unwrap();
    opts.n_modules = n_modules;
    opts.extra_config = extra;
    let work = opts.work_dir.clone();
    let name = opts.detector_name.clone();
    let mut p = Pipeline::start_detector(opts, detector, Duration::from_secs(60)).unwrap();
    let file = work.join(format!("{tag}.h5"));
    p.start_run(&file, n).unwrap();
    p.run_simulator(n, 100.0, "", false).unwrap();
    let run = p.wait_run(Duration::from_secs(10)).unwrap();
    assert_eq!(run.images_written, n);
    let stop = p.stop().unwrap();
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    (file, name, work)
}

/// Equal up to the rounding of metres -> millimetres in float64.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// The lab position (mm) of pixel `(row, col)` by the documented geometry.
fn pixel_mm(row: f64, col: f64, bc: (f64, f64), pixel_mm: f64, distance_mm: f64) -> [f64; 3] {
    [
        (bc.0 - col) * pixel_mm,
        (bc.1 - row) * pixel_mm,
        distance_mm,
    ]
}

fn assert_module(m: &Value, origin: [u64; 2], size: [u64; 2], bc: (f64, f64), px: f64, d: f64) {
    assert_eq!(m["data_origin"], json!(origin), "{m}");
    assert_eq!(m["data_size"], json!(size), "{m}");
    let origin_mm = pixel_mm(origin[0] as f64, origin[1] as f64, bc, px, d);
    for (key, want) in [
        ("origin_mm", origin_mm),
        ("fast_step_mm", [-px, 0.0, 0.0]),
        ("slow_step_mm", [0.0, -px, 0.0]),
    ] {
        let got: Vec<f64> = m[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(
            got.len() == 3 && got.iter().zip(want).all(|(g, w)| close(*g, w)),
            "{key}: {got:?} vs {want:?}"
        );
    }
}

fn assert_common(r: &Value, n: u64, shape: [u64; 2]) {
    assert_eq!(r["entries"], 1, "{r}");
    assert_eq!(r["definition"], "NXmx");
    assert_eq!((&r["instruments"], &r["detectors"]), (&json!(1), &json!(1)));
    assert_eq!(r["signal"], "data");
    assert_eq!(r["n_images"], n);
    assert_eq!(r["shape"], json!([n, shape[0], shape[1]]));
    assert_eq!(r["same_dataset_as_std_daq_path"], true, "{r}");
    assert!(r["end_time"].is_string(), "{r}");
    assert!(r["pixel_sum"].as_f64().unwrap() > 0.0, "{r}");
}

/// One test, the pipelines one after the other: a GigaFRoST's 8 streams take 8 UDP ports, more
/// than a test's share of `std_daq_tests::options` when pipelines run side by side.
#[test]
fn files_of_every_detector_type_are_nxmx_and_a_request_sets_its_geometry() {
    gigafrost_and_eiger_files_are_nxmx_with_default_geometry();
    jungfrau_files_are_nxmx_with_the_configured_geometry_raw_and_compressed();
    a_write_request_sets_the_geometry_of_its_file();
}

fn jungfrau_files_are_nxmx_with_the_configured_geometry_raw_and_compressed() {
    let geometry = json!({"detector_distance_m": 0.2, "beam_center_x_px": 500.5,
        "beam_center_y_px": 530.0, "incident_wavelength_angstrom": 0.9537});
    for (tag, compression) in [("nxjf", "none"), ("nxjfc", "bitshuffle-lz4")] {
        let mut extra = vec![
            ("nxmx".into(), geometry.clone()),
            ("compression".into(), compression.into()),
        ];
        // The raw file also gets every service's counters for the run (`run_counters`).
        let metrics = tag == "nxjf";
        if metrics {
            let base = std_daq_tests::free_port_range(16).unwrap();
            extra.push((
                "metrics_base_address".into(),
                format!("127.0.0.1:{base}").into(),
            ));
        }
        let (file, det, work) = write_file(tag, SimulatedDetector::Jungfrau, 2, extra, 12);
        if metrics {
            let counters = std_daq_tests::root_json_attr(&file, "run_counters").unwrap();
            std_daq_tests::assert_run_counters(&counters, 2, 12);
        }
        let r = check_nxmx(&file);
        eprintln!("{tag}: {r}");
        assert_common(&r, 12, [1024, 1024]);
        assert!(close(r["wavelength_angstrom"].as_f64().unwrap(), 0.9537));
        assert!(close(r["distance_mm"].as_f64().unwrap(), 200.0));
        assert_eq!(r["beam_center"], json!([500.5, 530.0]));
        assert_eq!(r["sensor"], json!(["Si", 0.32]));
        assert_eq!(r["saturation_value"], 65535);
        assert_eq!(r["bit_depth_readout"], 16);
        assert_eq!(r["pixel_mask_gaps"], 0, "the modules tile the image");
        let modules = r["modules"].as_array().unwrap();
        assert_eq!(modules.len(), 2);
        for (m, module) in modules.iter().enumerate() {
            assert_module(
                module,
                [512 * m as u64, 0],
                [512, 1024],
                (500.5, 530.0),
                0.075,
                200.0,
            );
        }
        let report = std_daq_tests::verify_h5(&file, &det, "").unwrap();
        assert_eq!(report["exact_images"], 12, "{report}");
        std::fs::remove_dir_all(work).unwrap();
    }
}

fn gigafrost_and_eiger_files_are_nxmx_with_default_geometry() {
    let (file, det, work) = write_file(
        "nxgf",
        SimulatedDetector::Gigafrost {
            width: 480,
            height: 128,
        },
        8,
        vec![],
        6,
    );
    let r = check_nxmx(&file);
    eprintln!("gigafrost: {r}");
    assert_common(&r, 6, [128, 480]);
    assert_eq!(r["saturation_value"], 4095, "12-bit");
    let modules = r["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 1, "one sensor");
    assert_module(&modules[0], [0, 0], [128, 480], (240.0, 64.0), 0.011, 100.0);
    let report = std_daq_tests::verify_h5_as(&file, &det, "", "gigafrost").unwrap();
    assert_eq!(report["exact_images"], 6, "{report}");
    std::fs::remove_dir_all(work).unwrap();
    let (file, det, work) = write_file(
        "nxeiger",
        SimulatedDetector::Eiger { bit_depth: 16 },
        2,
        vec![],
        8,
    );
    let r = check_nxmx(&file);
    eprintln!("eiger: {r}");
    assert_common(&r, 8, [512, 512]);
    // Defaults (docs/nxmx.md): the image centre, 0.1 m, 1 angstrom, 450 um of silicon.
    assert_eq!(r["beam_center"], json!([256.0, 256.0]));
    assert!(close(r["distance_mm"].as_f64().unwrap(), 100.0));
    assert!(close(r["wavelength_angstrom"].as_f64().unwrap(), 1.0));
    assert_eq!(r["sensor"], json!(["Si", 0.45]));
    assert_eq!(r["saturation_value"], 65535);
    let modules = r["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 2, "one per half-module");
    let report = std_daq_tests::verify_h5_as(&file, &det, "", "eiger").unwrap();
    assert_eq!(report["exact_images"], 8, "{report}");
    std::fs::remove_dir_all(work).unwrap();
}

/// A write request's `nxmx` overrides the config's for its file only; a misspelt or invalid
/// value is refused with the reason, before anything is written (real agent and API).
fn a_write_request_sets_the_geometry_of_its_file() {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std_daq_tests::stack::{free_run, http, SetOnDrop, Stack};
    let stack = Stack::start("nxreq", &[]).unwrap();
    let sim = stack.simulator().unwrap();
    let (stop, next_frame) = (AtomicBool::new(false), AtomicU64::new(1));
    let file = stack.root.join("geometry.h5");
    let (ok, bad_key, bad_value) = std::thread::scope(|scope| {
        let feeder =
            scope.spawn(|| free_run(&sim, &stack.config_path, &stop, &next_frame).unwrap());
        let _stop = SetOnDrop(&stop);
        let write = |body: Value| {
            let (code, body) = http(stack.port, "POST", "/write_sync", Some(&body)).unwrap();
            (code, serde_json::from_slice::<Value>(&body).unwrap())
        };
        let ok = write(
            json!({"output_file": file.display().to_string(), "n_images": 3,
            "nxmx": {"detector_distance_m": 0.35, "beam_center_x_px": 100.0,
                     "sample_name": "lysozyme"}}),
        );
        let bad_key = write(
            json!({"output_file": stack.root.join("k.h5").display().to_string(),
            "n_images": 3, "nxmx": {"distance": 0.35}}),
        );
        let bad_value = write(
            json!({"output_file": stack.root.join("v.h5").display().to_string(),
            "n_images": 3, "nxmx": {"incident_wavelength_angstrom": -1.0}}),
        );
        drop(_stop);
        feeder.join().unwrap();
        (ok, bad_key, bad_value)
    });
    assert_eq!(ok.0, 200, "{}", ok.1);
    let r = check_nxmx(&file);
    assert!(close(r["distance_mm"].as_f64().unwrap(), 350.0), "{r}");
    // The request's beam centre x, the config's default y (the image centre).
    assert_eq!(r["beam_center"], json!([100.0, 512.0]));
    let report = std_daq_tests::verify_h5(&file, &stack.cfg.detector_name, "").unwrap();
    assert_eq!(report["exact_images"], 3, "{report}");

    assert_eq!(bad_key.0, 400, "{}", bad_key.1);
    let e = bad_key.1["error"].as_str().unwrap();
    assert!(e.contains("unknown field `distance`"), "{e}");
    assert!(!stack.root.join("k.h5").exists());
    assert_eq!(bad_value.0, 400, "{}", bad_value.1);
    let e = bad_value.1["error"].as_str().unwrap();
    assert!(
        e.contains("nxmx.incident_wavelength_angstrom = -1") && e.contains("positive"),
        "{e}"
    );
    assert!(!stack.root.join("v.h5").exists());
    stack.finish().unwrap();
}
