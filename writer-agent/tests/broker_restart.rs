//! The agent survives a RabbitMQ restart (`rabbitmqctl stop_app` / `start_app`), idle or in the
//! middle of a run, and serves the next request. Its own test binary: cargo runs test binaries
//! one after another, so the restart cannot disturb the other RabbitMQ tests of this crate; the
//! tests in here take turns ([`SERIAL`]).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::process::Command;
use std_daq_tests::verify_h5;
use std_writer_agent::client::{self, ClientError};
use std_writer_agent::protocol::{action, AgentQueues};
use std_writer_agent::Policy;

/// One broker restart at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rabbitmqctl(arg: &str) {
    let out = Command::new("rabbitmqctl").arg(arg).output().unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {arg}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Restarts the broker's application even if the test fails half-way.
struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_after_a_broker_restart_and_serves_the_next_request() {
    let _serial = SERIAL.lock().await;
    // The agent's log, shown when a test fails (or with --nocapture).
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let (p, root, detector) = start_pipeline("agentrestart").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("restart");
    let mut agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, false).unwrap(),
    )
    .await;
    assert_eq!(agent.state.borrow().connections, 1);

    let guard = StartAppOnDrop;
    tokio::task::spawn_blocking(|| rabbitmqctl("stop_app"))
        .await
        .unwrap();
    tokio::time::timeout(WATCHDOG, agent.state.wait_for(|s| !s.connected))
        .await
        .expect("the agent did not notice the broker going away")
        .unwrap();
    tokio::task::spawn_blocking(|| rabbitmqctl("start_app"))
        .await
        .unwrap();
    drop(guard);
    tokio::time::timeout(
        WATCHDOG,
        agent.state.wait_for(|s| s.connected && s.connections == 2),
    )
    .await
    .expect("the agent did not reconnect")
    .unwrap();

    let file = root.join("after-restart.h5");
    let mut observed = observe_statuses().await;
    let id = client::new_request_id();
    let body = serde_json::json!({"output_file": file, "n_images": 20}).to_string();
    let opts = client_options(&tag);
    let request = {
        let id = id.clone();
        tokio::spawn(async move { client::send_request(&opts, &id, body.as_bytes(), |_| {}).await })
    };
    assert_eq!(next_for(&mut observed, &id).await.action, "request_start");
    let sim = simulate(&p, 60, 50.0);
    let done = request.await.unwrap().unwrap();
    sim.await.unwrap();
    assert_eq!(
        done.message,
        format!("wrote 20 of 20 images to {}", file.display())
    );
    let report = verify_h5(&file, &detector, "").unwrap();
    assert_eq!(report["images"], 20, "{report}");
    assert_eq!(report["exact_images"], 20, "{report}");
    agent.stop().await;
    stop_pipeline(p, &work).await;
}

/// The broker restarts while a run is writing. The agent follows the run to its end, reconnects,
/// publishes the final status it owes (a client that subscribed again gets it), acks the request
/// when the durable queue gives it back, and serves the next request. The file is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_run_still_ends_the_request_with_its_final_status() {
    let _serial = SERIAL.lock().await;
    // The agent's log, shown when a test fails (or with --nocapture).
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let (p, root, detector) = start_pipeline("agentmidrun").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("midrun");
    let mut agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, false).unwrap(),
    )
    .await;
    let mut observed = observe_statuses().await;
    let file = root.join("midrun.h5");
    let id = client::new_request_id();
    let body = serde_json::json!({"output_file": file, "n_images": 40}).to_string();
    let request = {
        let (opts, id) = (client_options(&tag), id.clone());
        tokio::spawn(async move { client::send_request(&opts, &id, body.as_bytes(), |_| {}).await })
    };
    assert_eq!(
        next_for(&mut observed, &id).await.action,
        action::REQUEST_START
    );
    simulate(&p, 20, 50.0).await.unwrap();

    // Half-way (20 of 40 images sent): the broker goes away and comes back.
    let guard = StartAppOnDrop;
    tokio::task::spawn_blocking(|| rabbitmqctl("stop_app"))
        .await
        .unwrap();
    // A client that does not reconnect learns that its connection closed.
    let err = request.await.unwrap().unwrap_err();
    assert!(matches!(err, ClientError::Closed(_)), "{err}");
    assert_eq!(
        err.to_string(),
        format!("the broker connection closed while waiting for request {id}")
    );
    tokio::task::spawn_blocking(|| rabbitmqctl("start_app"))
        .await
        .unwrap();
    drop(guard);

    // The run is still going (the agent reconnects only once it has ended): a client that
    // subscribes again now gets the final status.
    let mut observed = observe_statuses().await;
    simulate_from(&p, 40, 50.0, 1000).await.unwrap();
    let done = loop {
        let s = next_for(&mut observed, &id).await;
        if s.is_final() {
            break s;
        }
    };
    assert_eq!(done.action, action::REQUEST_SUCCESS, "{done:?}");
    assert_eq!(
        done.message,
        format!("wrote 40 of 40 images to {}", file.display())
    );
    assert_eq!(done.body["images_written"], 40);
    // Frames 1-20, then the second acquisition from frame 1000: the ids jump over 979.
    assert_eq!(
        done.body["run"]["image_ids_skipped"], 979,
        "{:?}",
        done.body
    );
    let report = verify_h5(&file, &detector, "").unwrap();
    assert_eq!(report["images"], 40, "{report}");
    assert_eq!(report["exact_images"], 40, "{report}");
    tokio::time::timeout(
        WATCHDOG,
        agent.state.wait_for(|s| s.connected && s.connections == 2),
    )
    .await
    .expect("the agent did not reconnect")
    .unwrap();

    // The next request: an exact file.
    let next = root.join("after-midrun.h5");
    let id2 = client::new_request_id();
    let body = serde_json::json!({"output_file": next, "n_images": 20}).to_string();
    let request = {
        let (opts, id) = (client_options(&tag), id2.clone());
        tokio::spawn(async move { client::send_request(&opts, &id, body.as_bytes(), |_| {}).await })
    };
    assert_eq!(
        next_for(&mut observed, &id2).await.action,
        action::REQUEST_START
    );
    let sim = simulate_from(&p, 60, 50.0, 2000);
    let done = request.await.unwrap().unwrap();
    sim.await.unwrap();
    assert_eq!(
        done.message,
        format!("wrote 20 of 20 images to {}", next.display())
    );
    let report = verify_h5(&next, &detector, "").unwrap();
    assert_eq!(report["exact_images"], 20, "{report}");
    // The first request came back from the durable queue after the restart and was only acked:
    // two requests, two final statuses, nothing left in the queue.
    let state = agent.state.borrow().clone();
    assert_eq!(
        (
            state.requests_redelivered,
            state.requests_finished,
            state.requests_succeeded
        ),
        (1, 2, 2),
        "{state:?}"
    );
    let queues = AgentQueues::for_service(&service_name(&tag));
    assert_eq!(ready_messages(&queues.requests).await, 0);
    agent.stop().await;
    stop_pipeline(p, &work).await;
}
