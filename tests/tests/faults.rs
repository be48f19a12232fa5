//! The packet-fault matrix (reliability issue, item 1): the real processes at a sustained rate,
//! with 10 % random loss, reordering, duplication and malformed packets, each alone and all
//! combined (plus loss bursts). For every case the counts are checked against the simulator's own
//! record, at the stage that saw them:
//!
//! - the receivers: every datagram sent is counted once (placed, duplicate/late, malformed), the
//!   kernel dropped none, and their missing packets are exactly the packets the simulator logged
//!   as not delivered whole;
//! - the file: every image is there, exact except the logged packets, which are zero, counted in
//!   `missing_packets` and flag their image.
//!
//! Each case prints a `FIGURES` line (run with `--nocapture`) for `docs/reliability.md`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use std_daq::pipeline::{Pipeline, SimulatedDetector};
use std_daq_tests::{free_port, options, scrape_metrics, verify_h5};

const IMAGES: u64 = 400;
const RATE: f64 = 300.0;

/// Receiver counters summed over both modules.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Counted {
    placed: u64,
    duplicate_or_late: u64,
    malformed: u64,
    missing: u64,
    kernel_drops: u64,
}

impl Counted {
    fn read(ports: &[u16]) -> Self {
        let mut c = Counted::default();
        for &port in ports {
            let m = scrape_metrics(port).unwrap();
            let get = |k: &str| m.get(&format!("std_daq_{k}")).map_or(0, |v| *v as u64);
            c.placed += get("packets");
            c.duplicate_or_late += get("duplicate_packets") + get("late_packets");
            c.malformed += get("malformed_packets");
            c.missing += get("missing_packets");
            c.kernel_drops += get("kernel_drops");
        }
        c
    }

    fn datagrams(&self) -> u64 {
        self.placed + self.duplicate_or_late + self.malformed
    }

    fn minus(&self, before: &Counted) -> Counted {
        Counted {
            placed: self.placed - before.placed,
            duplicate_or_late: self.duplicate_or_late - before.duplicate_or_late,
            malformed: self.malformed - before.malformed,
            missing: self.missing - before.missing,
            kernel_drops: self.kernel_drops - before.kernel_drops,
        }
    }
}

/// A folder in RAM, removed even when the test fails (its files are hundreds of MB).
struct RamFolder(std::path::PathBuf);

impl RamFolder {
    fn new(path: String) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        RamFolder(path.into())
    }
}

impl Drop for RamFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_packet_fault_alone_and_combined_is_counted_exactly_at_rate() {
    let mut opts = options("faults").unwrap();
    // This matrix is about packets, not about a starved CPU: buffers and the module sync window
    // hold a whole run (400 frames), so a receiver or the writer descheduled for a while on a
    // busy 2-core machine cannot turn into lost images here (those faults have their own tests:
    // recovery.rs, slow_writer.rs).
    opts.ram_buffer_gb = 1.0;
    opts.module_buffer_slots = 512;
    opts.extra_config = vec![
        ("module_sync_timeout_ms".into(), 5000.into()),
        ("module_sync_queue_size".into(), 400.into()),
    ];
    let work = opts.work_dir.clone();
    let detector = opts.detector_name.clone();
    let ports = [free_port().unwrap(), free_port().unwrap()];
    let extra: HashMap<String, Vec<String>> = (0..2)
        .map(|m| {
            (
                format!("std-udp-recv-{m}"),
                vec!["--metrics-addr".into(), format!("127.0.0.1:{}", ports[m])],
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

    let cases: [(&str, &[&str]); 6] = [
        ("none", &[]),
        ("10% loss", &["--loss-rate", "0.1"]),
        ("10% reordering", &["--reorder-rate", "0.1"]),
        ("10% duplication", &["--duplicate-rate", "0.1"]),
        ("10% malformed", &["--malformed-rate", "0.1"]),
        (
            "combined",
            &[
                "--loss-rate",
                "0.1",
                "--burst",
                "20:0.002",
                "--reorder-rate",
                "0.1",
                "--duplicate-rate",
                "0.1",
                "--malformed-rate",
                "0.1",
            ],
        ),
    ];
    // The files go to RAM (tmpfs): this matrix is about packets, and at this rate a disk busy
    // with the page cache of earlier tests would lap the ring (that case has its own test,
    // slow_writer.rs).
    let files = RamFolder::new(format!("/dev/shm/faults-test-{}", std::process::id()));
    let packets_per_run = IMAGES * 2 * 128;
    for (k, (name, faults)) in cases.iter().enumerate() {
        let file = files.0.join(format!("faults-{k}.h5"));
        let log = work.join(format!("faults-{k}.log"));
        let before = Counted::read(&ports);
        p.start_run(&file, IMAGES).unwrap();
        let mut args: Vec<String> = faults.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--seed".into(),
            (k + 7).to_string(),
            "--start-frame".into(),
            (1 + k as u64 * 10_000).to_string(),
            "--fault-log".into(),
            log.display().to_string(),
        ]);
        let sim = p.run_simulator_with(IMAGES, RATE, &args).unwrap();
        let run = p.wait_run(Duration::from_secs(20)).unwrap();

        // What the simulator says a receiver could not get whole (dropped or cut short).
        let logged = std::fs::read_to_string(&log).unwrap();
        let lost: Vec<&str> = logged.split(',').filter(|s| !s.is_empty()).collect();
        let lost_images: BTreeSet<&str> =
            lost.iter().map(|e| e.split(':').next().unwrap()).collect();
        let n_lost = lost.len() as u64;
        assert_eq!(
            n_lost,
            sim.packets_dropped + sim.packets_malformed,
            "{name}: the log lists every dropped and cut-short packet"
        );
        assert_eq!(
            sim.packets_sent,
            packets_per_run - sim.packets_dropped + sim.packets_duplicated,
            "{name}: {sim:?}"
        );

        // Receivers: their counters are published every stats period; wait (with a watchdog)
        // until every datagram of this run is in them.
        let deadline = Instant::now() + Duration::from_secs(30);
        let counted = loop {
            let c = Counted::read(&ports).minus(&before);
            if c.datagrams() >= sim.packets_sent && c.missing >= n_lost {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: receivers counted {c:?}, the simulator sent {}",
                sim.packets_sent
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(counted.kernel_drops, 0, "{name}: {counted:?}");
        assert_eq!(counted.datagrams(), sim.packets_sent, "{name}: {counted:?}");
        assert_eq!(
            counted.malformed, sim.packets_malformed,
            "{name}: {counted:?}"
        );
        assert_eq!(
            counted.duplicate_or_late, sim.packets_duplicated,
            "{name}: {counted:?}"
        );
        assert_eq!(counted.missing, n_lost, "{name}: {counted:?}");
        assert_eq!(
            counted.placed,
            packets_per_run - n_lost,
            "{name}: {counted:?}"
        );

        // The file: every image, exact but for the logged packets, which are counted.
        assert_eq!(
            (run.end.as_str(), run.images_written),
            ("completed", IMAGES)
        );
        assert_eq!(run.missing_packets, n_lost, "{name}: {run:?}");
        assert_eq!(
            run.images_flagged,
            lost_images.len() as u64,
            "{name}: {run:?}"
        );
        let report = verify_h5(&file, &detector, &logged).unwrap();
        assert_eq!(report["exact_images"], IMAGES, "{name}: {report}");
        assert_eq!(report["ids_consecutive"], true, "{name}: {report}");
        eprintln!(
            "FIGURES | {name} | {IMAGES} images at {RATE} Hz x 2 modules | sent {} (dup {}, \
             reordered {}, malformed {}), not sent {} | receivers: placed {}, duplicate/late {}, \
             malformed {}, missing {}, kernel drops {} | file: {} images, {} good, {} flagged, \
             {} missing packets, {} exact |",
            sim.packets_sent,
            sim.packets_duplicated,
            sim.packets_reordered,
            sim.packets_malformed,
            sim.packets_dropped,
            counted.placed,
            counted.duplicate_or_late,
            counted.malformed,
            counted.missing,
            counted.kernel_drops,
            run.images_written,
            run.images_good,
            run.images_flagged,
            run.missing_packets,
            report["exact_images"],
        );
        std::fs::remove_file(&file).unwrap();
    }
    let stop = p.stop().unwrap();
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    drop(files);
    std::fs::remove_dir_all(work).unwrap();
}
