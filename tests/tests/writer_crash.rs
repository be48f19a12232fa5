//! The writer is killed (SIGKILL) in the middle of a file: nothing appears under the requested
//! name, the partial data stays in the `.part` file, and a restarted writer serves the next run.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};
use std_daq::pipeline::Pipeline;
use std_daq_tests::{options, verify_h5};

#[test]
fn a_writer_killed_mid_file_leaves_no_file_under_the_requested_name() {
    let opts = options("writercrash").unwrap();
    let work = opts.work_dir.clone();
    let detector = opts.detector_name.clone();
    let mut p = Pipeline::start(opts, Duration::from_secs(60)).unwrap();
    let file = work.join("crash.h5");
    p.start_run(&file, 300).unwrap();
    let config = p.config_path.clone();
    std::thread::scope(|scope| {
        let sim = scope.spawn(|| {
            std::process::Command::new(
                std_daq::pipeline::default_bin_dir()
                    .unwrap()
                    .join("std-det-sim"),
            )
            .arg("--config")
            .arg(&config)
            .args(["--images", "300", "--rate", "100"])
            .output()
            .unwrap()
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let written = |p: &Pipeline| {
            p.writer_status()
                .unwrap()
                .current
                .map_or(0, |c| c.images_written)
        };
        while written(&p) < 50 {
            assert!(Instant::now() < deadline, "the run did not reach 50 images");
            std::thread::sleep(Duration::from_millis(20));
        }
        p.restart_writer(true).unwrap();
        assert!(sim.join().unwrap().status.success());
    });
    assert!(
        !file.exists(),
        "a killed run must not leave a file under the requested name"
    );
    let partial = work.join("crash.h5.part");
    assert!(partial.exists(), "the partial data stays for inspection");

    // The restarted writer takes the next run (the detector's frame counter runs on).
    let next = work.join("next.h5");
    p.start_run(&next, 20).unwrap();
    p.run_simulator_with(20, 100.0, &["--start-frame".into(), "1000".into()])
        .unwrap();
    let run = p.wait_run(Duration::from_secs(10)).unwrap();
    assert_eq!((run.end.as_str(), run.images_written), ("completed", 20));
    let stop = p.stop().unwrap();
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    let report = verify_h5(&next, &detector, "").unwrap();
    assert_eq!(report["exact_images"], 20, "{report}");
    std::fs::remove_dir_all(work).unwrap();
}
