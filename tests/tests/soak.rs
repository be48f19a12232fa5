//! Soak: the pipeline runs write after write at a sustained rate, and every service's private
//! memory (RssAnon) and open file descriptors stay flat (reliability issue). In CI it runs for
//! `STD_DAQ_SOAK_SECONDS` (default 20); the long run is documented in docs/reliability.md:
//!
//! ```sh
//! STD_DAQ_SOAK_SECONDS=1800 STD_DAQ_SOAK_RATE=300 cargo test -p std-daq-tests --test soak -- --nocapture
//! ```
//!
//! Every run must be complete and every image good; the first two runs are the warm-up (buffers,
//! HDF5's caches and the page cache reach their working size), the figures after them must not
//! grow: file descriptors equal, RssAnon within 8 MiB.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};
use std_daq::pipeline::Pipeline;
use std_daq_tests::options;

const SERVICES: [&str; 4] = [
    "std-udp-recv-0",
    "std-udp-recv-1",
    "std-assembler",
    "std-h5-writer",
];
const IMAGES_PER_RUN: u64 = 200;
const RSS_SLACK_KB: u64 = 8 * 1024;

fn env_or(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (RssAnon in kB, open file descriptors) of a process.
fn footprint(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_anon = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    (rss_anon, fds)
}

#[test]
fn memory_and_file_descriptors_stay_flat_run_after_run() {
    let seconds = env_or("STD_DAQ_SOAK_SECONDS", 20.0);
    let rate = env_or("STD_DAQ_SOAK_RATE", 100.0);
    let opts = options("soak").unwrap();
    let work = opts.work_dir.clone();
    let mut p = Pipeline::start(opts, Duration::from_secs(60)).unwrap();
    let pids: Vec<u32> = SERVICES.iter().map(|s| p.pid(s).unwrap()).collect();
    let file = work.join("soak.h5");

    let started = Instant::now();
    let mut baseline = Vec::new();
    let mut runs = 0u64;
    let mut images = 0u64;
    while runs < 3 || started.elapsed().as_secs_f64() < seconds {
        p.start_run(&file, IMAGES_PER_RUN).unwrap();
        let first = 1 + runs * 10_000;
        p.run_simulator_with(
            IMAGES_PER_RUN,
            rate,
            &["--start-frame".into(), first.to_string()],
        )
        .unwrap();
        let run = p.wait_run(Duration::from_secs(20)).unwrap();
        assert_eq!(
            (run.end.as_str(), run.images_good),
            ("completed", IMAGES_PER_RUN),
            "run {runs}: {run:?}"
        );
        std::fs::remove_file(&file).unwrap();
        runs += 1;
        images += run.images_written;
        if runs == 2 {
            baseline = pids.iter().map(|&pid| footprint(pid)).collect();
        }
    }
    let end: Vec<(u64, u64)> = pids.iter().map(|&pid| footprint(pid)).collect();
    for (k, service) in SERVICES.iter().enumerate() {
        let ((rss0, fds0), (rss1, fds1)) = (baseline[k], end[k]);
        eprintln!(
            "FIGURES | soak {service} | {runs} runs, {images} images at {rate} Hz in {:.0} s | \
             RssAnon {rss0} -> {rss1} kB | fds {fds0} -> {fds1} |",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(fds1, fds0, "{service}: file descriptors {fds0} -> {fds1}");
        assert!(
            rss1 <= rss0 + RSS_SLACK_KB,
            "{service}: RssAnon grew {rss0} -> {rss1} kB"
        );
    }
    let stop = p.stop().unwrap();
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    std::fs::remove_dir_all(work).unwrap();
}
