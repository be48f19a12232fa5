//! A full disk in the middle of a write: the run ends with a definite failure that says why, the
//! data written so far stays in the `.part` file, nothing appears under the requested name, and
//! the writer takes the next request as if nothing happened.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;
use std_daq::pipeline::{Pipeline, SimulatedDetector};
use std_daq_tests::{next_run_completes_exact, options, verify_h5};

/// A 12 MiB tmpfs the test mounts (root only) and always unmounts.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: std::path::PathBuf) -> Option<Self> {
        std::fs::create_dir_all(&path).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
            .arg(&path)
            .status()
            .ok()?
            .success();
        ok.then_some(SmallDisk(path))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_run_clearly_and_the_next_run_works() {
    let opts = options("diskfull").unwrap();
    let work = opts.work_dir.clone();
    let detector = opts.detector_name.clone();
    // A checkpoint after every image, so the partial file has something to show.
    let args = std::collections::HashMap::from([(
        "std-h5-writer".to_string(),
        vec!["--checkpoint-interval-ms".to_string(), "1".to_string()],
    )]);
    let mut p = Pipeline::start_with_args(
        opts,
        SimulatedDetector::Jungfrau,
        Duration::from_secs(60),
        args,
    )
    .unwrap();
    let Some(disk) = SmallDisk::mount(work.join("small")) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let full = disk.0.join("full.h5");
    p.start_run(&full, 30).unwrap();
    p.run_simulator(30, 100.0, "", false).unwrap();
    let run = p.wait_run(Duration::from_secs(10)).unwrap();
    assert!(run.end.starts_with("failed: "), "{run:?}");
    assert!(
        run.end.contains("full.h5"),
        "the failure names the file: {}",
        run.end
    );
    assert!(run.images_written < 30, "{run:?}");
    assert!(!full.exists(), "nothing under the requested name");
    let partial = disk.0.join("full.h5.part");
    assert!(partial.exists(), "the partial data stays for inspection");
    // Nothing corrupted: the partial file opens, and every image in it is exact with its records.
    let report = verify_h5(&partial, &detector, "").unwrap();
    assert_eq!(report["record_lengths_match"], true, "{report}");
    assert_eq!(report["exact_images"], report["images"], "{report}");
    assert!(report["images"].as_u64().unwrap() > 0, "{report}");
    assert!(
        run.end.ends_with(&format!(
            "holds the {} images of its last checkpoint",
            report["images"]
        )),
        "{}",
        run.end
    );
    eprintln!(
        "FIGURES | disk full (12 MiB tmpfs, 2 MiB images) | run ends `failed: <file>: ...` \
         naming ENOSPC: {} | after {} images | .part opens: {} images, all exact, records match |",
        run.end.contains("No space left on device"),
        run.images_written,
        report["images"]
    );

    // The next request on a disk with room is served normally.
    next_run_completes_exact(p, &work.join("after.h5"), &detector).unwrap();
    drop(disk);
    std::fs::remove_dir_all(work).unwrap();
}
