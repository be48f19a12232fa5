//! The writer is killed (SIGKILL) in the middle of a file: nothing appears under the requested
//! name, the partial data stays in the `.part` file, and a restarted writer serves the next run.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};
use std_daq::pipeline::Pipeline;
use std_daq_tests::{next_run_completes_exact, options};

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

    // The restarted writer takes the next run.
    next_run_completes_exact(p, &work.join("next.h5"), &detector).unwrap();
    std::fs::remove_dir_all(work).unwrap();
}
