//! `std-daq write` against a real agent, broker and pipeline: exit 0 with the file written on
//! success; non-zero with the agent's exact reason on failure; without --n-images an unbounded
//! write that `std-daq kill` ends, exit 0 with the count.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::process::{Command, Output};
use std_writer_agent::protocol::action;
use std_writer_agent::Policy;

fn std_daq(args: &[&str]) -> Output {
    Command::new(
        std_daq::pipeline::default_bin_dir()
            .unwrap()
            .join("std-daq"),
    )
    .args(args)
    .env("RUST_BACKTRACE", "0")
    .output()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn std_daq_write_succeeds_with_the_file_and_fails_with_the_agents_reason() {
    let (p, root, detector) = start_pipeline("cli").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("cli");
    let agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, false).unwrap(),
    )
    .await;
    let mut observed = observe_statuses().await;
    let file = root.join("cli.h5");

    let cli = {
        let (tag, file) = (tag.clone(), file.display().to_string());
        tokio::task::spawn_blocking(move || {
            std_daq(&[
                "write",
                "--n-images",
                "20",
                "--output",
                &file,
                "--tag",
                &tag,
            ])
        })
    };
    // Start the detector only once the request runs, so the file holds the first images sent.
    loop {
        let s = tokio::time::timeout(WATCHDOG, observed.recv())
            .await
            .unwrap()
            .unwrap();
        if s.action == action::REQUEST_START && s.body["output_file"] == file.display().to_string()
        {
            break;
        }
    }
    let sim = simulate(&p, 60, 50.0);
    let out = cli.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("succeeded"), "{stdout}");
    sim.await.unwrap();
    let report = std_daq_tests::verify_h5(&file, &detector, "").unwrap();
    assert_eq!(report["images"], 20, "{report}");
    assert_eq!(report["exact_images"], 20, "{report}");

    let bad = {
        let tag = tag.clone();
        tokio::task::spawn_blocking(move || {
            std_daq(&[
                "write",
                "--n-images",
                "5",
                "--output",
                "rel.h5",
                "--tag",
                &tag,
            ])
        })
        .await
        .unwrap()
    };
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("output_file \"rel.h5\" must be an absolute path"),
        "{stderr}"
    );

    // Unbounded: no --n-images; `std-daq kill <id>` is its normal end.
    let file = root.join("cli-unbounded.h5");
    let cli = {
        let (tag, file) = (tag.clone(), file.display().to_string());
        tokio::task::spawn_blocking(move || std_daq(&["write", "--output", &file, "--tag", &tag]))
    };
    let id = loop {
        let s = tokio::time::timeout(WATCHDOG, observed.recv())
            .await
            .unwrap()
            .unwrap();
        if s.action == action::REQUEST_START && s.body["output_file"] == file.display().to_string()
        {
            assert!(
                s.message.contains("until stopped (unbounded write"),
                "{s:?}"
            );
            break s.request_id;
        }
    };
    let sim = simulate_from(&p, 200, 50.0, 1000);
    loop {
        let s = next_for(&mut observed, &id).await;
        assert_eq!(s.action, action::REQUEST_PROGRESS, "{s:?}");
        if s.body["images_written"].as_u64().unwrap() >= 3 {
            break;
        }
    }
    let kill = {
        let (tag, id) = (tag.clone(), id.clone());
        tokio::task::spawn_blocking(move || std_daq(&["kill", &id, "--tag", &tag]))
            .await
            .unwrap()
    };
    assert!(kill.status.success(), "{kill:?}");
    let out = cli.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sim.await.unwrap();
    let report = std_daq_tests::verify_h5(&file, &detector, "").unwrap();
    let k = report["images"].as_u64().unwrap();
    assert!(k >= 3, "{report}");
    assert_eq!(report["exact_images"], k, "{report}");
    assert!(
        stdout.contains(&format!(
            "succeeded: wrote {k} images to {} (unbounded write, stopped)",
            file.display()
        )),
        "{stdout}"
    );

    agent.stop().await;
    stop_pipeline(p, &work).await;
}
