//! The agent survives a RabbitMQ restart (`rabbitmqctl stop_app` / `start_app`) and serves the
//! next request. Its own test binary: cargo runs test binaries one after another, so the restart
//! cannot disturb the other RabbitMQ tests.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::process::Command;
use std_daq_tests::verify_h5;
use std_writer_agent::client;
use std_writer_agent::Policy;

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
