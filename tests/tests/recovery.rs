//! A receiver crashes (SIGKILL, leaving its FrameBuffer behind) mid-run and is started again: the
//! new receiver replaces the stale segment, the assembler re-attaches it, the images of the gap
//! are flagged with the module missing, and later images are good again. Nothing is left behind.

use std::process::Command;
use std::time::{Duration, Instant};
use std_daq::pipeline::Pipeline;
use std_daq_tests::{options, read_status};

#[test]
fn a_crashed_receiver_restarts_and_the_pipeline_recovers() {
    let opts = options("recovery").unwrap();
    let work = opts.work_dir.clone();
    let detector = opts.detector_name.clone();
    let mut p = Pipeline::start(opts, Duration::from_secs(60)).unwrap();
    let file = work.join("recovery.h5");
    p.start_run(&file, 400).unwrap();

    let config = p.config_path.clone();
    std::thread::scope(|scope| {
        let sim = scope.spawn(|| {
            // The simulator only needs the config, so the pipeline stays free to restart a stage.
            Command::new(
                std_daq::pipeline::default_bin_dir()
                    .unwrap()
                    .join("std-det-sim"),
            )
            .arg("--config")
            .arg(&config)
            .args(["--images", "400", "--rate", "100"])
            .output()
            .unwrap()
        });
        // Crash module 1's receiver once 100 images are written (a watchdog bounds the wait).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = p.writer_status().unwrap();
            if s.current.is_some_and(|c| c.images_written >= 100) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the run did not reach 100 images"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p.restart_receiver(1, true).unwrap();
        assert!(sim.join().unwrap().status.success());
    });
    let run = p.wait_run(Duration::from_secs(10)).unwrap();
    let assembler_log = std::fs::read_to_string(work.join("std-assembler.log")).unwrap();
    let stop = p.stop().unwrap();
    assert!(stop.failed.is_empty(), "{:?}", stop.failed);
    assert!(stop.leftovers.is_empty(), "{:?}", stop.leftovers);
    assert!(
        assembler_log.contains("receiver restarted: FrameBuffer re-attached"),
        "{assembler_log}"
    );
    assert_eq!(run.images_written, 400, "{run:?}");

    let (status, modules) = read_status(&file, &detector).unwrap();
    assert!(
        status[..100].iter().all(|s| *s == 1),
        "good before the crash: {status:?}"
    );
    let flagged: Vec<usize> = (0..status.len()).filter(|i| status[*i] != 1).collect();
    assert!(!flagged.is_empty(), "the crash must show in the file");
    assert!(
        flagged
            .iter()
            .all(|i| modules[*i] == 0b10 || modules[*i] == 0),
        "only module 1 may be missing: {flagged:?} {modules:?}"
    );
    assert!(
        status[350..].iter().all(|s| *s == 1),
        "good again after the restart: {status:?}"
    );
    let last_flagged = flagged.last().copied().unwrap_or(0);
    eprintln!(
        "FIGURES | receiver 1 SIGKILLed after 100 of 400 images at 100 Hz, restarted | {} images \
         flagged module 1 missing (indexes {}..={}), all others good; the assembler re-attached \
         the new FrameBuffer |",
        flagged.len(),
        flagged[0],
        last_flagged
    );
    std::fs::remove_dir_all(work).unwrap();
}
