//! Issue 18, item 7: the replication services serve metrics where `metrics_base_address` says
//! (std-stream-send at base + 3, std-stream-recv at base + 4), with their counters, like every
//! other service. Real binaries on 127.0.0.1; the near side's ImageBuffer is made by the test in
//! place of an assembler.
#![allow(clippy::unwrap_used)]

use image_buffer::RingOwner;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use std_daq::pipeline::jungfrau_config_json;
use std_daq_common::messages::IMAGE_METADATA_VERSION;
use std_daq_common::{names, DetectorConfig, ImageMetadata, ImageStatus};
use std_daq_tests::{free_port, free_port_range, options, scrape_metrics};

/// Watchdog only: the test returns as soon as the counters show the session.
const WATCHDOG: Duration = Duration::from_secs(60);

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &std::path::Path, args: &[&str]) -> Service {
    Service(
        Command::new(bin)
            .args(args)
            .env("REDIS_SKIP", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display())),
    )
}

/// Scrapes `port` until `metric` reads `want`, with the watchdog.
fn wait_metric(port: u16, metric: &str, want: f64) {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        let got = scrape_metrics(port)
            .ok()
            .and_then(|m| m.get(metric).copied());
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "port {port}: {metric} = {got:?}, expected {want}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn stream_send_and_recv_serve_metrics_at_the_base_address_rule() {
    let mut opts = options("streammetrics").unwrap();
    let base = free_port_range(5).unwrap();
    opts.extra_config = vec![
        (
            "metrics_base_address".into(),
            format!("127.0.0.1:{base}").into(),
        ),
        ("stats_collection_period".into(), 0.1.into()),
    ];
    std::fs::create_dir_all(opts.work_dir.join("ipc")).unwrap();
    let near = jungfrau_config_json(&opts);
    // The far host's ImageBuffer and stream take another name: both hosts are this one here.
    let mut far = near.clone();
    far["detector_name"] = format!("{}far", opts.detector_name).into();
    let (near_path, far_path) = (
        opts.work_dir.join("near.json"),
        opts.work_dir.join("far.json"),
    );
    std::fs::write(&near_path, near.to_string()).unwrap();
    std::fs::write(&far_path, far.to_string()).unwrap();
    let cfg = DetectorConfig::from_file(&near_path).unwrap();
    let mut ring = RingOwner::<ImageMetadata>::create(
        &names::image_buffer_name(&cfg.detector_name),
        cfg.image_buffer_slots(),
        cfg.image_bytes() as u64,
    )
    .unwrap();

    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let far_path = far_path.display().to_string();
    let near_path = near_path.display().to_string();
    let _recv = spawn(
        &opts.bin_dir.join("std-stream-recv"),
        &["--config", &far_path, "--listen", &listen],
    );
    // Before the sender connects the receiver already serves its counters.
    wait_metric(base + 4, "std_daq_sessions", 0.0);
    // The assembler's image stream, played by the test.
    let ctx = zmq::Context::new();
    let images = ctx.socket(zmq::PUB).unwrap();
    images.bind(&names::image_endpoint(&cfg)).unwrap();
    let _send = spawn(
        &opts.bin_dir.join("std-stream-send"),
        &["--config", &near_path, "--target", &listen],
    );
    // PUB/SUB drops what is sent before the sender has subscribed: offer images, one at a time,
    // until the sender's counters show one queued.
    let deadline = Instant::now() + WATCHDOG;
    let mut image_id = 0;
    'offer: loop {
        image_id += 1;
        let meta = ImageMetadata {
            image_id,
            data_bytes: cfg.image_bytes() as u64,
            height: cfg.image_pixel_height,
            width: cfg.image_pixel_width,
            n_modules: cfg.n_modules,
            dtype: cfg.image_dtype() as u16,
            status: ImageStatus::Good as u16,
            version: IMAGE_METADATA_VERSION,
            ..bytemuck::Zeroable::zeroed()
        };
        let mut slot = ring.begin_write(image_id).unwrap();
        slot.data_mut().fill(image_id as u8);
        *slot.meta_mut() = meta;
        slot.commit();
        images.send(meta.as_bytes(), 0).unwrap();
        let offered = Instant::now();
        while offered.elapsed() < Duration::from_secs(1) {
            let queued = scrape_metrics(base + 3)
                .ok()
                .and_then(|m| m.get("std_daq_images_queued").copied());
            if queued.is_some_and(|q| q >= 1.0) {
                break 'offer;
            }
            std::thread::yield_now();
        }
        assert!(
            Instant::now() < deadline,
            "std-stream-send never queued an image"
        );
    }
    wait_metric(base + 3, "std_daq_sessions", 1.0);
    wait_metric(base + 3, "std_daq_images_delivered", 1.0);
    wait_metric(base + 4, "std_daq_sessions", 1.0);
    wait_metric(base + 4, "std_daq_images_delivered", 1.0);
    let (send, recv) = (
        scrape_metrics(base + 3).unwrap(),
        scrape_metrics(base + 4).unwrap(),
    );
    assert_eq!(send.get("std_daq_images_lost"), Some(&0.0), "{send:?}");
    assert_eq!(recv.get("std_daq_checksum_errors"), Some(&0.0), "{recv:?}");
    drop((_send, _recv));
    let _ = std::fs::remove_dir_all(&opts.work_dir);
}
