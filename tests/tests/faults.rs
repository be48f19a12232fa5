//! Faults injected by the simulator at once (random loss, bursts, reordering, duplication,
//! malformed packets), through the real processes: every image in the file is exact except the
//! packets the simulator says a receiver could not get, which are zero and counted.

use std::time::Duration;
use std_daq::pipeline::Pipeline;
use std_daq_tests::{options, verify_h5};

#[test]
fn combined_faults_leave_exactly_the_lost_packets_zero_and_counted() {
    let opts = options("faults").unwrap();
    let work = opts.work_dir.clone();
    let detector = opts.detector_name.clone();
    let mut p = Pipeline::start(opts, Duration::from_secs(60)).unwrap();
    let file = work.join("faults.h5");
    let log = work.join("faults.log");
    p.start_run(&file, 60).unwrap();
    let args: Vec<String> = [
        "--loss-rate",
        "0.1",
        "--burst",
        "20:0.002",
        "--reorder-rate",
        "0.05",
        "--duplicate-rate",
        "0.05",
        "--malformed-rate",
        "0.02",
        "--seed",
        "7",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--fault-log".to_string(), log.display().to_string()])
    .collect();
    let sim = p.run_simulator_with(60, 100.0, &args).unwrap();
    let run = p.wait_run(Duration::from_secs(10)).unwrap();
    let stop = p.stop().unwrap();
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    assert_eq!(run.images_written, 60, "{run:?}");

    let lost = std::fs::read_to_string(&log).unwrap();
    let n_lost = lost.split(',').filter(|s| !s.is_empty()).count() as u64;
    assert!(
        n_lost > 1000,
        "about 10% of 15360 packets should be lost, got {n_lost}"
    );
    assert_eq!(
        run.missing_packets, n_lost,
        "every lost packet is counted once"
    );
    assert!(sim.packets_sent > 0);
    let report = verify_h5(&file, &detector, &lost).unwrap();
    assert_eq!(report["exact_images"], 60, "{report}");
    assert_eq!(report["ids_strictly_increasing"], true, "{report}");
    std::fs::remove_dir_all(work).unwrap();
}
