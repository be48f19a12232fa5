//! The writer is killed (SIGKILL) in the middle of a file (reliability issue, item 3): nothing
//! appears under the requested name, the `.part` file opens in h5py and holds exactly the images
//! of the writer's last checkpoint, each exact with its records, and a restarted writer serves
//! the next run.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};
use std_daq::pipeline::{Pipeline, SimulatedDetector};
use std_daq_tests::{next_run_completes_exact, options, verify_h5};

fn checkpointed(p: &Pipeline) -> (u64, u64) {
    p.writer_status()
        .unwrap()
        .current
        .map_or((0, 0), |c| (c.images_written, c.images_checkpointed))
}

fn wait_until(p: &Pipeline, what: &str, done: impl Fn((u64, u64)) -> bool) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = checkpointed(p);
        if done(s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Checks the `.part` file a killed run left: it opens, every dataset has the same length, and
/// every image in it is exact. Returns how many images it holds.
fn partial_file_images(partial: &std::path::Path, detector: &str) -> u64 {
    let report = verify_h5(partial, detector, "").unwrap();
    assert_eq!(report["record_lengths_match"], true, "{report}");
    assert_eq!(report["images"], report["exact_images"], "{report}");
    assert_eq!(report["ids_consecutive"], true, "{report}");
    report["images"].as_u64().unwrap()
}

#[test]
fn a_writer_killed_mid_file_leaves_a_readable_partial_file_of_its_last_checkpoint() {
    let opts = options("writercrash").unwrap();
    let work = opts.work_dir.clone();
    let detector = opts.detector_name.clone();
    let args = HashMap::from([(
        "std-h5-writer".to_string(),
        vec!["--checkpoint-interval-ms".to_string(), "200".to_string()],
    )]);
    let mut p = Pipeline::start_with_args(
        opts,
        SimulatedDetector::Jungfrau,
        Duration::from_secs(60),
        args,
    )
    .unwrap();

    // 1. Killed while the stream pauses: the status reported 100 checkpointed, the file holds
    //    exactly those 100.
    let file = work.join("paused.h5");
    p.start_run(&file, 300).unwrap();
    p.run_simulator_with(100, 100.0, &[]).unwrap();
    let reported = wait_until(&p, "the checkpoint of 100 images", |s| s == (100, 100));
    p.restart_writer(true).unwrap();
    assert!(
        !file.exists(),
        "a killed run leaves no file under the requested name"
    );
    let partial = work.join("paused.h5.part");
    assert_eq!(partial_file_images(&partial, &detector), reported.1);

    // 2. Killed while images stream in: the file holds at least what was last reported
    //    checkpointed (a checkpoint may land between the report and the kill), all exact.
    let file = work.join("streaming.h5");
    p.start_run(&file, 400).unwrap();
    let config = p.config_path.clone();
    let reported = std::thread::scope(|scope| {
        let sim = scope.spawn(|| {
            std::process::Command::new(
                std_daq::pipeline::default_bin_dir()
                    .unwrap()
                    .join("std-det-sim"),
            )
            .arg("--config")
            .arg(&config)
            .args(["--images", "300", "--rate", "100", "--start-frame", "200"])
            .output()
            .unwrap()
        });
        let reported = wait_until(&p, "a checkpoint of 50 images", |s| s.1 >= 50);
        p.restart_writer(true).unwrap();
        assert!(sim.join().unwrap().status.success());
        reported
    });
    assert!(!file.exists());
    let held = partial_file_images(&work.join("streaming.h5.part"), &detector);
    assert!(
        held >= reported.1 && held < 300,
        "held {held}, last reported {reported:?}"
    );
    eprintln!(
        "FIGURES | writer SIGKILLed | paused stream: status said 100 checkpointed, .part holds \
         100 exact | streaming at 100 Hz: status said {} checkpointed ({} written), .part holds \
         {held}, all exact, record lengths match |",
        reported.1, reported.0
    );

    // The restarted writer takes the next run.
    next_run_completes_exact(p, &work.join("next.h5"), &detector).unwrap();
    std::fs::remove_dir_all(work).unwrap();
}
