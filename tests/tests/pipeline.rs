//! End-to-end: the real binaries as processes, real UDP on loopback, real shared memory, real
//! ZMQ, a real HDF5 file checked by h5py.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;
use std_daq::pipeline::{default_bin_dir, Pipeline, SimulatedDetector};
use std_daq_tests::{options, verify_h5, verify_h5_as, work_dir};

/// Packets the simulator leaves out, and what the file must then say for those images.
const DROPS: &str = "3:0:0,3:0:77,10:1:127,12:0:*,20:0:5,20:1:5,40:1:127";

#[test]
fn dropped_packets_are_flagged_exactly_and_everything_else_is_exact() {
    let opts = options("drops").unwrap();
    let work = opts.work_dir.clone();
    let detector = opts.detector_name.clone();
    let mut p = Pipeline::start(opts, Duration::from_secs(60)).unwrap();
    let file = work.join("drops.h5");

    // A bad request is refused with a reason and changes nothing.
    let err = p
        .start_run(std::path::Path::new("relative.h5"), 5)
        .unwrap_err();
    assert!(
        err.to_string().contains("must be an absolute path"),
        "{err}"
    );

    p.start_run(&file, 40).unwrap();
    let sim = p.run_simulator(40, 200.0, DROPS, false).unwrap();
    assert_eq!(sim.packets_dropped, 2 + 1 + 128 + 2 + 1);
    let run = p.wait_run(Duration::from_secs(10)).unwrap();
    let stop = p.stop().unwrap();
    assert!(stop.failed.is_empty(), "{:?}", stop.failed);
    assert!(stop.leftovers.is_empty(), "{:?}", stop.leftovers);

    assert_eq!(run.end, "completed");
    assert_eq!(run.images_written, 40);
    assert_eq!(run.images_flagged, 5);
    assert_eq!(run.missing_packets, 134);

    let report = verify_h5(&file, &detector, DROPS).unwrap();
    assert_eq!(report["images"], 40, "{report}");
    assert_eq!(report["exact_images"], 40, "{report}");
    assert_eq!(report["ids_strictly_increasing"], true, "{report}");
    assert_eq!(report["first_id"], 1, "{report}");
    // Exactly these images are flagged, with exactly these missing counts (a module frame that
    // never arrived counts all its 128 packets; the run's last frame lost its last packet).
    assert_eq!(
        report["flagged"],
        serde_json::json!({"3": 2, "10": 1, "12": 128, "20": 2, "40": 1}),
        "{report}"
    );
    assert_eq!(
        report["status_counts"],
        serde_json::json!({"1": 35, "2": 5})
    );
    std::fs::remove_dir_all(work).unwrap();
}

#[test]
fn demo_command_writes_a_pixel_exact_file() {
    let work = work_dir("demo");
    std::fs::create_dir_all(&work).unwrap();
    let file = work.join("demo.h5");
    let port = 30_000 + (std::process::id() % 1000) as u16 * 4;
    let metrics_port = std_daq_tests::free_port_range(16).unwrap();
    let out = Command::new(default_bin_dir().unwrap().join("std-daq"))
        .args([
            "demo",
            "--images",
            "300",
            "--rate",
            "300",
            "--port",
            &port.to_string(),
            "--metrics-port",
            &metrics_port.to_string(),
        ])
        .arg("--output")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("images written:     300 (good 300, flagged 0)"),
        "{stdout}"
    );
    assert!(stdout.contains("clean shutdown:     yes"), "{stdout}");
    // The file's run_counters, summarised: every packet of 2 modules x 300 frames x 128.
    assert!(
        stdout.contains(
            "run counters:       2 receivers: 76800 packets (0 malformed, 0 missing); \
             assembler: 300 images (300 good, 0 lost in buffer)"
        ),
        "{stdout}"
    );

    let h5ls = Command::new("h5ls").arg(&file).output().unwrap();
    let detector = String::from_utf8_lossy(&h5ls.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let report = verify_h5(&file, &detector, "").unwrap();
    assert_eq!(
        report["shape"],
        serde_json::json!([300, 1024, 1024]),
        "{report}"
    );
    assert_eq!(report["dtype"], "uint16");
    assert_eq!(report["chunks"], serde_json::json!([1, 1024, 1024]));
    assert_eq!(report["exact_images"], 300, "{report}");
    assert_eq!(report["ids_strictly_increasing"], true);
    assert_eq!(report["status_counts"], serde_json::json!({"1": 300}));
    std::fs::remove_dir_all(work).unwrap();
}

#[test]
fn a_bad_config_names_the_key_and_the_file() {
    let work = work_dir("badcfg");
    std::fs::create_dir_all(&work).unwrap();
    let cfg = work.join("bad.json");
    std::fs::write(
        &cfg,
        r#"{"detector_name":"x","detector_type":"jungfrau-raw","n_modules":1,"bit_depth":16,
            "image_pixel_height":512,"image_pixel_width":1024,"start_udp_port":50000,
            "module_positions":{"0":[0,0,1023,511]},"modul_sync_timeout_ms":5}"#,
    )
    .unwrap();
    for binary in ["std-udp-recv", "std-assembler", "std-h5-writer"] {
        let out = Command::new(default_bin_dir().unwrap().join(binary))
            .arg("--config")
            .arg(&cfg)
            .args(if binary == "std-udp-recv" {
                &["--module", "0"][..]
            } else {
                &[]
            })
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{binary} accepted a bad config");
        assert!(
            stderr.contains(&cfg.display().to_string())
                && stderr.contains("unknown field `modul_sync_timeout_ms`"),
            "{binary}: {stderr}"
        );
    }
    std::fs::remove_dir_all(work).unwrap();
}

/// EIGER: two 16-bit half-modules (64 packets of 4096 bytes per frame), with chosen losses.
#[test]
fn eiger_half_modules_stream_pixel_exact_with_losses_flagged() {
    const EIGER_DROPS: &str = "2:0:0,5:1:63,7:0:*,30:1:63";
    let opts = options("eiger").unwrap();
    let work = opts.work_dir.clone();
    let detector = opts.detector_name.clone();
    let mut p = Pipeline::start_detector(
        opts,
        SimulatedDetector::Eiger { bit_depth: 16 },
        Duration::from_secs(60),
    )
    .unwrap();
    let file = work.join("eiger.h5");
    p.start_run(&file, 30).unwrap();
    let sim = p.run_simulator(30, 200.0, EIGER_DROPS, false).unwrap();
    assert_eq!(sim.packets_sent, 30 * 2 * 64 - (1 + 1 + 64 + 1));
    let run = p.wait_run(Duration::from_secs(10)).unwrap();
    let stop = p.stop().unwrap();
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    assert_eq!(run.images_written, 30);

    let report = verify_h5_as(&file, &detector, EIGER_DROPS, "eiger").unwrap();
    assert_eq!(
        report["shape"],
        serde_json::json!([30, 512, 512]),
        "{report}"
    );
    assert_eq!(report["dtype"], "uint16");
    assert_eq!(report["exact_images"], 30, "{report}");
    assert_eq!(
        report["flagged"],
        serde_json::json!({"2": 1, "5": 1, "7": 64, "30": 1}),
        "{report}"
    );
    std::fs::remove_dir_all(work).unwrap();
}

/// GigaFRoST: 8 streams of a 480x128 image (240x32 per stream, 2 packets of 20 and 12 rows),
/// 12-bit pixels unpacked and placed in quadrants with the north ones mirrored, with losses.
#[test]
fn gigafrost_streams_assemble_pixel_exact_with_losses_flagged() {
    const GF_DROPS: &str = "3:0:0,4:5:1,9:7:*";
    let mut opts = options("gigafrost").unwrap();
    opts.n_modules = 8;
    let work = opts.work_dir.clone();
    let detector = opts.detector_name.clone();
    let mut p = Pipeline::start_detector(
        opts,
        SimulatedDetector::Gigafrost {
            width: 480,
            height: 128,
        },
        Duration::from_secs(60),
    )
    .unwrap();
    let file = work.join("gigafrost.h5");
    p.start_run(&file, 20).unwrap();
    let sim = p.run_simulator(20, 100.0, GF_DROPS, false).unwrap();
    assert_eq!(sim.packets_sent, 20 * 8 * 2 - (1 + 1 + 2));
    let run = p.wait_run(Duration::from_secs(10)).unwrap();
    let stop = p.stop().unwrap();
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    assert_eq!(run.images_written, 20);

    let report = verify_h5_as(&file, &detector, GF_DROPS, "gigafrost").unwrap();
    assert_eq!(
        report["shape"],
        serde_json::json!([20, 128, 480]),
        "{report}"
    );
    assert_eq!(report["dtype"], "uint16");
    assert_eq!(report["exact_images"], 20, "{report}");
    assert_eq!(
        report["flagged"],
        serde_json::json!({"3": 1, "4": 1, "9": 2}),
        "{report}"
    );
    std::fs::remove_dir_all(work).unwrap();
}
