//! Every service's Prometheus endpoint, scraped after a run with chosen losses: the counters
//! match what the simulator sent and what the file holds.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};
use std_daq::pipeline::{Pipeline, SimulatedDetector};
use std_daq_tests::{free_port, options, scrape_metrics};

#[test]
fn metrics_endpoints_count_what_the_run_did() {
    const DROPS: &str = "5:0:*,7:1:3,7:1:4";
    let opts = options("metrics").unwrap();
    let work = opts.work_dir.clone();
    let ports: Vec<u16> = (0..4).map(|_| free_port().unwrap()).collect();
    let services = [
        "std-udp-recv-0",
        "std-udp-recv-1",
        "std-assembler",
        "std-h5-writer",
    ];
    let extra: HashMap<String, Vec<String>> = services
        .iter()
        .zip(&ports)
        .map(|(s, p)| {
            (
                s.to_string(),
                vec!["--metrics-addr".into(), format!("127.0.0.1:{p}")],
            )
        })
        .collect();
    let mut p = Pipeline::start_with_args(
        opts,
        SimulatedDetector::Jungfrau,
        Duration::from_secs(60),
        extra,
    )
    .unwrap();
    p.start_run(&work.join("metrics.h5"), 50).unwrap();
    let sim = p.run_simulator(50, 100.0, DROPS, false).unwrap();
    let run = p.wait_run(Duration::from_secs(10)).unwrap();
    assert_eq!(run.images_written, 50);

    // Services publish their counters every stats period (2 s here): wait until the receivers'
    // totals are final, with a watchdog.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (r0, r1) = loop {
        let (r0, r1) = (
            scrape_metrics(ports[0]).unwrap(),
            scrape_metrics(ports[1]).unwrap(),
        );
        let total = r0.get("std_daq_packets").copied().unwrap_or(0.0)
            + r1.get("std_daq_packets").copied().unwrap_or(0.0);
        if total as u64 == sim.packets_sent {
            break (r0, r1);
        }
        assert!(
            Instant::now() < deadline,
            "receivers counted {total}, the simulator sent {}",
            sim.packets_sent
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Packets sent by the simulator = packets counted by the receivers; plus the ones it left
    // out, that is every packet of the run.
    assert_eq!(sim.packets_sent + sim.packets_dropped, 50 * 2 * 128);
    assert_eq!(sim.packets_dropped, 128 + 2);
    // Receiver 1 saw frame 7 without packets 3 and 4; receiver 0 never saw frame 5 at all.
    assert_eq!(r1["std_daq_missing_packets"], 2.0);
    assert_eq!(r1["std_daq_frames_incomplete"], 1.0);
    assert_eq!(r0["std_daq_frames_complete"], 49.0);
    // ... and counts it as skipped: not one of its packets came.
    assert_eq!(r0["std_daq_frames_skipped"], 1.0);
    assert_eq!(r1["std_daq_frames_skipped"], 0.0);
    assert_eq!(
        r0["std_daq_malformed_packets"] + r1["std_daq_malformed_packets"],
        0.0
    );

    let wait_for = |port: u16, name: &str, want: f64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = scrape_metrics(port).unwrap().get(name).copied();
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} on :{port} is {got:?}, want {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(ports[2], "std_daq_images", 50.0);
    wait_for(ports[2], "std_daq_images_good", 48.0);
    wait_for(ports[2], "std_daq_images_missing_packets", 2.0);
    wait_for(ports[3], "std_daq_images_written", 50.0);
    // Latency histograms: one observation per image published / written.
    wait_for(
        ports[2],
        "std_daq_image_publish_latency_seconds_count",
        50.0,
    );
    wait_for(ports[3], "std_daq_image_write_latency_seconds_count", 50.0);
    let writer = scrape_metrics(ports[3]).unwrap();
    assert_eq!(writer["std_daq_connected"], 1.0);
    assert!(writer["std_daq_image_write_latency_seconds_sum"] > 0.0);
    let stop = p.stop().unwrap();
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    std::fs::remove_dir_all(work).unwrap();
}
