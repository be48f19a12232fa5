//! Issue 18: a detector whose frame counter restarts (restarted, re-armed with `startingfnum 1`,
//! power-cycled) after an idle gap. Two acquisitions both numbered from 1, each written through
//! the agent (real RabbitMQ, real pipeline processes): the second file must be exact, not lost as
//! late packets; and one request spanning the restart gets the new images after the old.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std_daq_tests::verify_h5;
use std_writer_agent::client;
use std_writer_agent::protocol::action;
use std_writer_agent::Policy;

/// More than the receivers' and the assembler's restart rule (`RESTART_IDLE`, 1 s): the
/// detector's quiet time between the acquisitions. This is the stimulus, not a synchronisation:
/// every step below waits on a status or a process.
const DETECTOR_QUIET_MS: u64 = 1500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_acquisitions_numbered_from_1_are_both_written_exact() {
    let (p, root, detector) = start_pipeline("restart").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("restart");
    let agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, true).unwrap(),
    )
    .await;
    let mut observed = observe_statuses().await;
    let opts = client_options(&tag);
    const N: u64 = 120;

    let mut files = Vec::new();
    for (run, delay_ms) in [("first", 0), ("second", DETECTOR_QUIET_MS)] {
        let file = root.join(format!("{run}.h5"));
        let id = client::new_request_id();
        let body = serde_json::json!({"output_file": file, "n_images": N}).to_string();
        let request = {
            let (opts, id) = (opts.clone(), id.clone());
            tokio::spawn(
                async move { client::send_request(&opts, &id, body.as_bytes(), |_| {}).await },
            )
        };
        // The detector starts only once the write runs, so the file holds exactly its frames.
        loop {
            let s = next_for(&mut observed, &id).await;
            assert_ne!(s.action, action::REQUEST_FAIL, "{run}: {s:?}");
            if s.action == action::REQUEST_START {
                break;
            }
        }
        let sim = {
            let p = std::sync::Arc::clone(&p);
            tokio::task::spawn_blocking(move || {
                p.run_simulator_with(N, 200.0, &["--delay-ms".into(), delay_ms.to_string()])
                    .unwrap()
            })
        };
        let done = tokio::time::timeout(WATCHDOG, request)
            .await
            .unwrap_or_else(|_| panic!("{run} acquisition: no final status within the watchdog"))
            .unwrap()
            .unwrap();
        sim.await.unwrap();
        assert_eq!(done.action, action::REQUEST_SUCCESS, "{run}: {done:?}");
        assert_eq!(
            done.message,
            format!("wrote {N} of {N} images to {}", file.display())
        );
        files.push(file);
    }

    for file in &files {
        let report = verify_h5(file, &detector, "").unwrap();
        assert_eq!(report["images"], N, "{report}");
        assert_eq!(report["exact_images"], N, "{report}");
        assert_eq!(report["first_id"], 1, "{report}");
        assert_eq!(report["last_id"], N, "{report}");
        assert_eq!(report["ids_consecutive"], true, "{report}");
    }
    agent.stop().await;
    stop_pipeline(p, &work).await;
}

/// One write request spanning the restart: it gets the second acquisition's images (ids from 1
/// again) after the first's, every one exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_spanning_the_restart_gets_the_new_images() {
    let (p, root, detector) = start_pipeline("restartspan").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("restartspan");
    let agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, true).unwrap(),
    )
    .await;
    let mut observed = observe_statuses().await;
    const N: u64 = 60;
    let file = root.join("span.h5");
    let id = client::new_request_id();
    let body = serde_json::json!({"output_file": file, "n_images": 2 * N}).to_string();
    let request = {
        let (opts, id) = (client_options(&tag), id.clone());
        tokio::spawn(async move { client::send_request(&opts, &id, body.as_bytes(), |_| {}).await })
    };
    assert_eq!(
        next_for(&mut observed, &id).await.action,
        action::REQUEST_START
    );
    for delay_ms in [0, DETECTOR_QUIET_MS] {
        let p = std::sync::Arc::clone(&p);
        tokio::task::spawn_blocking(move || {
            p.run_simulator_with(N, 200.0, &["--delay-ms".into(), delay_ms.to_string()])
                .unwrap()
        })
        .await
        .unwrap();
    }
    let done = tokio::time::timeout(WATCHDOG, request)
        .await
        .expect("no final status within the watchdog")
        .unwrap()
        .unwrap();
    assert_eq!(done.action, action::REQUEST_SUCCESS, "{done:?}");
    assert_eq!(done.body["run"]["first_image_id"], 1, "{}", done.body);
    assert_eq!(done.body["run"]["last_image_id"], N, "{}", done.body);
    let report = verify_h5(&file, &detector, "").unwrap();
    assert_eq!(report["images"], 2 * N, "{report}");
    assert_eq!(report["exact_images"], 2 * N, "{report}");
    assert_eq!(report["first_id"], 1, "{report}");
    assert_eq!(report["last_id"], N, "{report}");
    assert_eq!(report["ids_strictly_increasing"], false, "{report}");
    agent.stop().await;
    stop_pipeline(p, &work).await;
}
