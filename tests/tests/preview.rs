//! The live preview as a viewer sees it: a plain ZMQ SUB client receives array-1.0 messages
//! (JSON header + pixels) for exactly the images the mode picks, with the simulator's pixels.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use std_daq::pipeline::{default_bin_dir, Pipeline};
use std_daq_tests::options;

/// The simulator's pixel formula (udp-recv/src/sim.rs), recomputed here.
fn pixel(frame: u64, module: u64, px: u64) -> u16 {
    let offset = ((frame % 65535) * 7919 + module * 104_729) % 65535;
    (1 + (px + offset) % 65535) as u16
}

#[test]
fn a_viewer_gets_the_picked_images_in_array_1_0_format() {
    let opts = options("preview").unwrap();
    let work = opts.work_dir.clone();
    let p = Pipeline::start(opts, Duration::from_secs(60)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let log = work.join("preview.log");
    let mut preview = Command::new(default_bin_dir().unwrap().join("std-daq"))
        .arg("preview")
        .arg("--config")
        .arg(&p.config_path)
        .args(["--bind", &endpoint, "--mode", "batch:1,5"])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();

    let ctx = zmq::Context::new();
    let viewer = ctx.socket(zmq::SUB).unwrap();
    viewer.set_rcvtimeo(20_000).unwrap();
    viewer.set_subscribe(b"").unwrap();
    viewer.connect(&endpoint).unwrap();
    // Start the detector only once the preview has seen our subscription (no slow-joiner loss).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("a viewer subscribed")
    {
        assert!(
            Instant::now() < deadline,
            "the preview never saw the viewer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p.run_simulator(20, 50.0, "", false).unwrap();

    for expected in [1u64, 6, 11, 16] {
        let parts = viewer
            .recv_multipart(0)
            .expect("a preview message within 20 s");
        assert_eq!(parts.len(), 2);
        let header: serde_json::Value = serde_json::from_slice(&parts[0]).unwrap();
        assert_eq!(header["htype"], "array-1.0");
        assert_eq!(header["shape"], serde_json::json!([1024, 1024]));
        assert_eq!(header["type"], "uint16");
        assert_eq!(header["frame"], expected);
        assert_eq!(header["status"], 1);
        let px: Vec<u16> = parts[1]
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(px.len(), 1024 * 1024);
        for (i, v) in px.iter().enumerate().step_by(997) {
            let (module, in_module) = ((i / (512 * 1024)) as u64, (i % (512 * 1024)) as u64);
            assert_eq!(
                *v,
                pixel(expected, module, in_module),
                "frame {expected} pixel {i}"
            );
        }
    }
    Command::new("kill")
        .args(["-TERM", &preview.id().to_string()])
        .status()
        .unwrap();
    assert!(preview.wait().unwrap().success());
    let stop = p.stop().unwrap();
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    std::fs::remove_dir_all(work).unwrap();
}
