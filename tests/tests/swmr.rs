//! Reading the file while it is written: a Python reader (h5py from the project's venv) opens
//! the run's `.part` in SWMR mode while the real writer writes it, and after each batch of
//! images the writer has checkpointed it sees exactly that many images, each with its ledger
//! row and matching its end-to-end checksum; the run then completes (renamed to the requested
//! name) with the reader still holding the file open, and the final file is pixel-exact.
//! The reader is driven line by line over stdin: no sleeps, the writer's status says when a
//! batch is in the file.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use std_daq::pipeline::{Pipeline, SimulatedDetector};
use std_daq_tests::stack::venv_python;
use std_daq_tests::{options, verify_h5};

const BATCH: u64 = 20;
const BATCHES: u64 = 3;

/// Waits (watchdog 60 s) until the writer reports `n` images written and checkpointed.
fn wait_checkpointed(p: &Pipeline, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = p.writer_status().unwrap();
        let now = s
            .current
            .as_ref()
            .map_or((0, 0), |c| (c.images_written, c.images_checkpointed));
        if now == (n, n) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out at {now:?}, want {n}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn h5py_reads_a_growing_count_of_exact_images_while_the_writer_writes() {
    let opts = options("swmr").unwrap();
    let work = opts.work_dir.clone();
    let det = opts.detector_name.clone();
    let args = HashMap::from([(
        "std-h5-writer".to_string(),
        vec!["--checkpoint-interval-ms".to_string(), "100".to_string()],
    )]);
    let mut p = Pipeline::start_with_args(
        opts,
        SimulatedDetector::Jungfrau,
        Duration::from_secs(60),
        args,
    )
    .unwrap();
    let file = work.join("swmr.h5");
    p.start_run(&file, BATCH * BATCHES).unwrap();
    let partial = p
        .writer_status()
        .unwrap()
        .current
        .and_then(|c| c.partial_file)
        .expect("the writer's status names the file being written");
    assert_eq!(Path::new(&partial), work.join("swmr.h5.part"));

    let mut seen = Vec::new();
    let mut reader: Option<(std::process::Child, BufReader<std::process::ChildStdout>)> = None;
    for batch in 0..BATCHES {
        let first = 1 + batch * BATCH;
        p.run_simulator_with(BATCH, 200.0, &["--start-frame".into(), first.to_string()])
            .unwrap();
        if batch == BATCHES - 1 {
            break; // the last batch completes the run
        }
        wait_checkpointed(&p, first - 1 + BATCH);
        let (child, out) = reader.get_or_insert_with(|| {
            let mut child = Command::new(venv_python().unwrap())
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/swmr_reader.py"))
                .arg(&partial)
                .arg(&det)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let out = BufReader::new(child.stdout.take().unwrap());
            (child, out)
        });
        writeln!(child.stdin.as_mut().unwrap()).unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("swmr_reader.py printed {line:?}: {e}"));
        let n = first - 1 + BATCH;
        assert_eq!(v["images"], n, "{v}");
        assert_eq!(v["rows"], n, "{v}");
        assert_eq!(
            v["exact"], n,
            "every visible image matches its checksum: {v}"
        );
        assert_eq!(
            v["image_ids"],
            serde_json::json!((1..=n).collect::<Vec<_>>()),
            "{v}"
        );
        assert_eq!(v["statuses"], serde_json::json!(vec![1; n as usize]), "{v}");
        seen.push(n);
    }
    let run = p.wait_run(Duration::from_secs(20)).unwrap();
    assert_eq!(run.images_written, BATCH * BATCHES);
    assert_eq!(
        run.end, "completed",
        "the run completes with a SWMR reader holding the file"
    );
    let (mut child, _) = reader.unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    assert_eq!(seen, [BATCH, 2 * BATCH], "a growing count, batch by batch");
    assert!(file.exists() && !work.join("swmr.h5.part").exists());
    let report = verify_h5(&file, &det, "").unwrap();
    assert_eq!(report["exact_images"], BATCH * BATCHES, "{report}");
    let stop = p.stop().unwrap();
    assert!(stop.failed.is_empty(), "{stop:?}");
    eprintln!("FIGURES | SWMR reader saw {seen:?} exact images while writing; run completed with the reader open |");
}
