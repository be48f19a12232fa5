//! A writer slower than the detector (reliability issue, item 7): the writer process is stalled
//! (SIGSTOP, as a hanging disk or NFS server would stall it) while the detector goes on at its
//! rate, so the ImageBuffer laps it. When it resumes, every image it had not written yet is either
//! still in its slot and written exact, or was overwritten and is recorded as lost in buffer
//! (status 4, zeros): no image is missing from the file, none is wrong, and the writer's count of
//! lost images equals the file's.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use std_daq::pipeline::{default_bin_dir, Pipeline};
use std_daq_tests::{options, verify_h5_with};

const IMAGES: u64 = 600;

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn a_stalled_writer_records_overwritten_images_as_lost_never_as_good() {
    let opts = options("slowwriter").unwrap();
    let work = opts.work_dir.clone();
    let detector = opts.detector_name.clone();
    let mut p = Pipeline::start(opts, Duration::from_secs(60)).unwrap();
    let slots = p.config.image_buffer_slots();
    assert!(slots < IMAGES / 2, "the ring must be lapped: {slots} slots");
    let writer = p.pid("std-h5-writer").unwrap();
    let file = work.join("slow-writer.h5");
    p.start_run(&file, IMAGES).unwrap();

    let mut sim = Command::new(default_bin_dir().unwrap().join("std-det-sim"))
        .arg("--config")
        .arg(&p.config_path)
        .args(["--images", &IMAGES.to_string(), "--rate", "200"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Stall the writer once it has written 100 images (a watchdog bounds the wait).
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
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(writer, "-STOP");
    // The detector finishes the acquisition while the writer is stalled.
    let sim_status = sim.wait().unwrap();
    signal(writer, "-CONT");
    assert!(sim_status.success());

    let run = p.wait_run(Duration::from_secs(20)).unwrap();
    let stop = p.stop().unwrap();
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    assert_eq!(
        (run.end.as_str(), run.images_written),
        ("completed", IMAGES)
    );
    // Every image is either good or lost in the buffer; nothing else went wrong.
    assert!(
        run.images_lost_in_buffer > 0,
        "the ring was lapped: {run:?}"
    );
    assert_eq!(run.images_flagged, run.images_lost_in_buffer, "{run:?}");
    assert_eq!(
        run.images_good + run.images_lost_in_buffer,
        IMAGES,
        "{run:?}"
    );

    let report = verify_h5_with(
        &file,
        &detector,
        "",
        "jungfrau",
        &["--allow-lost-in-buffer"],
    )
    .unwrap();
    assert_eq!(report["mismatches"], serde_json::json!([]), "{report}");
    assert_eq!(report["images"], IMAGES, "{report}");
    assert_eq!(
        report["ids_consecutive"], true,
        "every image accounted: {report}"
    );
    assert_eq!(
        report["lost_in_buffer"], run.images_lost_in_buffer,
        "{report}"
    );
    assert_eq!(
        report["exact_images"].as_u64().unwrap() + run.images_lost_in_buffer,
        IMAGES,
        "{report}"
    );
    // The newest images were still in the ring when the writer resumed.
    assert_eq!(report["last_id"], IMAGES, "{report}");
    eprintln!(
        "FIGURES | writer stalled (SIGSTOP) from image ~100 to the end of a {IMAGES}-image run at \
         200 Hz, ring of {slots} slots | {} written: {} exact, {} lost in buffer (status 4, \
         zeros), 0 missing, 0 wrong |",
        run.images_written, report["exact_images"], run.images_lost_in_buffer
    );
    std::fs::remove_dir_all(work).unwrap();
}
