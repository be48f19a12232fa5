//! The agent while a write runs, against the real RabbitMQ on 127.0.0.1:5672 and real pipelines:
//! every request is answered within a second of being published (refused, or `request_queued`
//! with its place), queued requests start in turn and write exact files, a kill takes a queued
//! request out of the line, and queued requests survive an agent crash. A run without images says
//! that it waits, and `timeout_s` ends it leaving nothing on disk. Strict mode publishes only
//! std_daq's own statuses.
//!
//! The one-second limits are deadlines (the test fails if the answer is later), not
//! measurements; everything else is synchronised on statuses, with the watchdog only as a guard.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::time::Duration;
use std_daq_tests::verify_h5;
use std_writer_agent::client;
use std_writer_agent::protocol::action;
use std_writer_agent::{Policy, StatusMessage};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Publishes a request (mandatory, confirmed) and returns when the broker confirmed it: the
/// moment it is published.
async fn publish(tag: &str, id: &str, body: &serde_json::Value) -> Instant {
    let confirm = publish_request(tag, Some(id), body.to_string().as_bytes()).await;
    assert!(
        matches!(confirm, lapin::Confirmation::Ack(None)),
        "{confirm:?}"
    );
    Instant::now()
}

/// The first status for `id`, which must arrive within a second of `published`.
async fn within_a_second(
    rx: &mut mpsc::UnboundedReceiver<StatusMessage>,
    id: &str,
    published: Instant,
) -> StatusMessage {
    tokio::time::timeout_at(published + Duration::from_secs(1), next_for(rx, id))
        .await
        .unwrap_or_else(|_| panic!("no status for request {id} within a second of publishing it"))
}

/// Statuses for `id` up to and including its final one.
async fn until_final(
    rx: &mut mpsc::UnboundedReceiver<StatusMessage>,
    id: &str,
) -> Vec<StatusMessage> {
    let mut seen = Vec::new();
    loop {
        let s = next_for(rx, id).await;
        let done = s.is_final();
        seen.push(s);
        if done {
            return seen;
        }
    }
}

/// Every status of this agent (`source`) in broker order, until `last_id` got its final one.
async fn record_until_final(
    rx: &mut mpsc::UnboundedReceiver<StatusMessage>,
    source: &str,
    last_id: &str,
) -> Vec<StatusMessage> {
    let mut seen = Vec::new();
    loop {
        let s = tokio::time::timeout(WATCHDOG, rx.recv())
            .await
            .expect("no status within the watchdog")
            .expect("observer closed");
        if s.source != source {
            continue;
        }
        let done = s.request_id == last_id && s.is_final();
        seen.push(s);
        if done {
            return seen;
        }
    }
}

fn actions_of(seen: &[StatusMessage], id: &str) -> Vec<String> {
    seen.iter()
        .filter(|s| s.request_id == id)
        .map(|s| s.action.clone())
        .collect()
}

fn position(seen: &[StatusMessage], id: &str, act: &str) -> usize {
    seen.iter()
        .position(|s| s.request_id == id && s.action == act)
        .unwrap_or_else(|| panic!("no {act} for {id}"))
}

fn assert_exact(file: &std::path::Path, detector: &str, n: u64) {
    let report = verify_h5(file, detector, "").unwrap();
    assert_eq!(report["images"], n, "{report}");
    assert_eq!(report["exact_images"], n, "{report}");
    assert_eq!(report["ids_strictly_increasing"], true, "{report}");
}

/// Request A runs (started, the detector not sending yet). Meanwhile a bad request is refused and
/// B and C are queued (places 1 and 2), each answer within a second; C is killed while queued.
/// Then the detector sends: A is written, then B starts and is written; both files are exact,
/// nothing exists for C or the bad request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_write_requests_are_refused_or_queued_at_once_and_queued_ones_are_written_in_turn()
{
    let (p, root, detector) = start_pipeline("agentqueue").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("queue");
    let agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, false).unwrap(),
    )
    .await;
    let mut record = observe_statuses().await;
    let mut watch = observe_statuses().await;
    let [id_a, id_bad, id_b, id_c] = std::array::from_fn(|_| client::new_request_id());
    let (file_a, file_b, file_c) = (root.join("a.h5"), root.join("b.h5"), root.join("c.h5"));

    publish(
        &tag,
        &id_a,
        &serde_json::json!({"output_file": file_a, "n_images": 30}),
    )
    .await;
    assert_eq!(
        next_for(&mut watch, &id_a).await.action,
        action::REQUEST_START
    );

    // While A waits for images: a bad request is refused at once.
    let bad = serde_json::json!({"output_file": "data/x.h5", "n_images": 5});
    let sent = publish(&tag, &id_bad, &bad).await;
    let refused = within_a_second(&mut watch, &id_bad, sent).await;
    assert_eq!(refused.action, action::REQUEST_FAIL);
    assert_eq!(
        refused.message,
        "output_file \"data/x.h5\" must be an absolute path"
    );

    // B and C are queued, with their places, at once.
    let body_b = serde_json::json!({"output_file": file_b, "n_images": 20, "run_id": 2});
    let sent = publish(&tag, &id_b, &body_b).await;
    let queued_b = within_a_second(&mut watch, &id_b, sent).await;
    assert_eq!(queued_b.action, action::REQUEST_QUEUED);
    assert_eq!(
        queued_b.message,
        format!("queued at place 1: waits for request {id_a} (running)")
    );
    assert_eq!(queued_b.body["queue_position"], 1);
    assert_eq!(queued_b.body["waiting_for"], id_a.as_str());
    assert_eq!(queued_b.body["run_id"], 2);
    assert_eq!(queued_b.body["images_written"], 0);
    let sent = publish(
        &tag,
        &id_c,
        &serde_json::json!({"output_file": file_c, "n_images": 10}),
    )
    .await;
    let queued_c = within_a_second(&mut watch, &id_c, sent).await;
    assert_eq!(queued_c.action, action::REQUEST_QUEUED);
    assert_eq!(
        queued_c.message,
        format!("queued at place 2: waits for request {id_a} (running) and 1 queued before it")
    );
    assert_eq!(queued_c.body["queue_position"], 2);
    assert_eq!(agent.state.borrow().queue_length, 2);

    // A kill takes C out of the line.
    client::kill(&client_options(&tag), &id_c).await.unwrap();
    let killed = next_for(&mut watch, &id_c).await;
    assert_eq!(killed.action, action::REQUEST_FAIL);
    assert_eq!(
        killed.message,
        "killed while queued (at place 2): the request never started and nothing was written"
    );
    assert_eq!(killed.body["killed"], true);
    assert_eq!(killed.body["output_file"], file_c.display().to_string());

    // The detector sends: A gets its 30 images, then B its 20.
    let sim = simulate(&p, 200, 50.0);
    let b = until_final(&mut watch, &id_b).await;
    sim.await.unwrap();
    let done_b = b.last().unwrap();
    assert_eq!(done_b.action, action::REQUEST_SUCCESS, "{b:?}");
    assert_eq!(
        done_b.message,
        format!("wrote 20 of 20 images to {}", file_b.display())
    );
    // init_timestamp is when B arrived (queued), not when its turn came.
    assert_eq!(
        done_b.body["init_timestamp"],
        queued_b.body["init_timestamp"]
    );

    // The order on the status exchange.
    let seen = record_until_final(&mut record, &service_name(&tag), &id_b).await;
    assert_eq!(actions_of(&seen, &id_bad), [action::REQUEST_FAIL]);
    assert_eq!(
        actions_of(&seen, &id_c),
        [action::REQUEST_QUEUED, action::REQUEST_FAIL]
    );
    for (id, first) in [
        (&id_a, action::REQUEST_START),
        (&id_b, action::REQUEST_QUEUED),
    ] {
        let acts = actions_of(&seen, id);
        assert_eq!(acts[0], first, "{acts:?}");
        assert_eq!(acts.last().unwrap(), action::REQUEST_SUCCESS, "{acts:?}");
    }
    let b_acts = actions_of(&seen, &id_b);
    assert_eq!(b_acts[1], action::REQUEST_START, "{b_acts:?}");
    assert!(
        b_acts[2..b_acts.len() - 1]
            .iter()
            .all(|a| a == action::REQUEST_PROGRESS),
        "{b_acts:?}"
    );
    let a_done = position(&seen, &id_a, action::REQUEST_SUCCESS);
    assert!(position(&seen, &id_b, action::REQUEST_QUEUED) < a_done);
    assert!(a_done < position(&seen, &id_b, action::REQUEST_START));
    assert_eq!(
        seen.iter()
            .find(|s| s.request_id == id_a && s.is_final())
            .unwrap()
            .message,
        format!("wrote 30 of 30 images to {}", file_a.display())
    );

    assert_exact(&file_a, &detector, 30);
    assert_exact(&file_b, &detector, 20);
    assert!(!file_c.exists());
    let state = agent.state.borrow().clone();
    assert_eq!(
        (
            state.requests_finished,
            state.requests_succeeded,
            state.requests_failed,
            state.requests_refused,
            state.requests_queued,
            state.queue_length
        ),
        (4, 2, 2, 1, 2, 0)
    );
    agent.stop().await;
    stop_pipeline(p, &work).await;
}

/// No image comes: after request_start the run says every waiting interval that it waits for the
/// first image; at timeout_s it ends with request_fail and nothing is left on disk (not the file,
/// not its .part, not the folders made for it). The same request sent again, with images
/// arriving, is written exact; its timeout_s, shorter than the write, does not end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_without_images_says_it_waits_and_timeout_s_ends_it_leaving_nothing() {
    let (p, root, detector) = start_pipeline("agentwait").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("wait");
    let agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, true).unwrap(),
    )
    .await;
    let mut watch = observe_statuses().await;
    let file = root.join("new/sub/t.h5");
    let id = client::new_request_id();
    let body = serde_json::json!({"output_file": file, "n_images": 10, "timeout_s": 1.5});
    publish(&tag, &id, &body).await;
    let seen = until_final(&mut watch, &id).await;
    let (start, rest) = seen.split_first().unwrap();
    let (done, waiting) = rest.split_last().unwrap();
    assert_eq!(start.action, action::REQUEST_START, "{seen:?}");
    assert!(!waiting.is_empty(), "no waiting status: {seen:?}");
    for w in waiting {
        assert_eq!(w.action, action::REQUEST_PROGRESS, "{w:?}");
        assert_eq!(w.body["images_written"], 0);
        let secs = w.body["waiting_s"].as_u64().unwrap();
        assert_eq!(
            w.message,
            format!("waiting for the first image for {secs} s (gives up at timeout_s = 1.5 s)")
        );
    }
    assert_eq!(done.action, action::REQUEST_FAIL);
    let f = file.display();
    assert_eq!(
        done.message,
        format!(
            "no image arrived within timeout_s = 1.5 s; nothing was written ({f}.part was \
             removed, {f} was never created)"
        )
    );
    assert_eq!(done.body["images_written"], 0);
    assert!(done.body["run"]["end"]
        .as_str()
        .unwrap()
        .starts_with("cancelled: "));
    assert_eq!(done.body["timeout_s"], 1.5);
    // Nothing on disk: the folders made for the run went with it.
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);

    // The same request again; the detector sends: written exact, though it outlasts timeout_s.
    let id2 = client::new_request_id();
    let body = serde_json::json!({"output_file": file, "n_images": 60, "timeout_s": 2});
    publish(&tag, &id2, &body).await;
    assert_eq!(
        next_for(&mut watch, &id2).await.action,
        action::REQUEST_START
    );
    let sim = simulate(&p, 80, 15.0);
    let seen = until_final(&mut watch, &id2).await;
    sim.await.unwrap();
    let done = seen.last().unwrap();
    assert_eq!(done.action, action::REQUEST_SUCCESS, "{seen:?}");
    assert_eq!(done.message, format!("wrote 60 of 60 images to {f}"));
    // It was still writing when timeout_s passed.
    assert!(
        done.body["run"]["seconds"].as_f64().unwrap() > 2.0,
        "{done:?}"
    );
    assert_exact(&file, &detector, 60);
    agent.stop().await;
    stop_pipeline(p, &work).await;
}

/// Strict mode: while A waits for images (and times out), B is queued without request_queued,
/// and the bad request sent after B is refused at once; A, B and the bad request get only
/// request_start / request_success / request_fail: no request_queued, no request_progress
/// (waiting or writing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_publishes_only_start_success_and_fail() {
    let (p, root, detector) = start_pipeline("agentstrict").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("strict");
    let mut settings = test_settings(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, false).unwrap(),
    );
    settings.strict_statuses = true;
    let agent = RunningAgent::start_with(settings).await;
    let mut record = observe_statuses().await;
    let mut watch = observe_statuses().await;
    let [id_a, id_b, id_bad] = std::array::from_fn(|_| client::new_request_id());
    let (file_a, file_b) = (root.join("a.h5"), root.join("b.h5"));

    // A times out after 3 s without images: ten waiting intervals of the test settings.
    let body_a = serde_json::json!({"output_file": file_a, "n_images": 10, "timeout_s": 3});
    publish(&tag, &id_a, &body_a).await;
    assert_eq!(
        next_for(&mut watch, &id_a).await.action,
        action::REQUEST_START
    );
    publish(
        &tag,
        &id_b,
        &serde_json::json!({"output_file": file_b, "n_images": 40}),
    )
    .await;
    let sent = publish(
        &tag,
        &id_bad,
        &serde_json::json!({"output_file": "x.h5", "n_images": 1}),
    )
    .await;
    let refused = within_a_second(&mut watch, &id_bad, sent).await;
    assert_eq!(refused.action, action::REQUEST_FAIL);
    // B was delivered before the bad request, so it was taken into the agent's queue by now.
    assert_eq!(agent.state.borrow().requests_queued, 1);

    let a_done = next_for(&mut watch, &id_a).await;
    assert_eq!(a_done.action, action::REQUEST_FAIL, "{a_done:?}");
    assert!(
        a_done
            .message
            .starts_with("no image arrived within timeout_s = 3 s;"),
        "{a_done:?}"
    );
    assert_eq!(
        next_for(&mut watch, &id_b).await.action,
        action::REQUEST_START
    );
    // B's write lasts a second: a non-strict agent would report progress several times.
    let sim = simulate(&p, 120, 40.0);
    let b = until_final(&mut watch, &id_b).await;
    sim.await.unwrap();
    assert_eq!(b.last().unwrap().action, action::REQUEST_SUCCESS, "{b:?}");

    let seen = record_until_final(&mut record, &service_name(&tag), &id_b).await;
    assert_eq!(
        actions_of(&seen, &id_a),
        [action::REQUEST_START, action::REQUEST_FAIL]
    );
    assert_eq!(actions_of(&seen, &id_bad), [action::REQUEST_FAIL]);
    assert_eq!(
        actions_of(&seen, &id_b),
        [action::REQUEST_START, action::REQUEST_SUCCESS]
    );
    let allowed = [
        action::REQUEST_START,
        action::REQUEST_SUCCESS,
        action::REQUEST_FAIL,
    ];
    assert!(
        seen.iter().all(|s| allowed.contains(&s.action.as_str())),
        "{seen:?}"
    );
    assert!(!file_a.exists());
    assert_exact(&file_b, &detector, 40);
    agent.stop().await;
    stop_pipeline(p, &work).await;
}

/// The agent binary crashes while A runs and B waits in its queue: both come back from the
/// broker; the restarted agent takes A's run up, queues B again (request_queued again), and
/// writes B after A. Both files exact, nothing written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_come_back_after_an_agent_crash_and_are_written_in_turn() {
    let (p, root, detector) = start_pipeline("agentqcrash").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("qcrash");
    let _queues = QueuesGuard::new(&service_name(&tag));
    let mut agent = AgentProcess::spawn(&p.config_path, &root, &tag, &[]);
    agent.wait_serving().await;
    let mut watch = observe_statuses().await;
    let [id_a, id_b] = std::array::from_fn(|_| client::new_request_id());
    let (file_a, file_b) = (root.join("a.h5"), root.join("b.h5"));
    publish(
        &tag,
        &id_a,
        &serde_json::json!({"output_file": file_a, "n_images": 30}),
    )
    .await;
    assert_eq!(
        next_for(&mut watch, &id_a).await.action,
        action::REQUEST_START
    );
    let sent = publish(
        &tag,
        &id_b,
        &serde_json::json!({"output_file": file_b, "n_images": 20}),
    )
    .await;
    assert_eq!(
        within_a_second(&mut watch, &id_b, sent).await.action,
        action::REQUEST_QUEUED
    );
    agent.crash();

    let mut agent = AgentProcess::spawn(&p.config_path, &root, &tag, &[]);
    let resumed = agent
        .wait_log("resuming: the writer is still running this request")
        .await;
    assert!(resumed.contains(&id_a), "{resumed}");
    let again = next_for(&mut watch, &id_b).await;
    assert_eq!(again.action, action::REQUEST_QUEUED, "{again:?}");
    assert_eq!(
        again.message,
        format!("queued at place 1: waits for request {id_a} (running)")
    );
    let sim = simulate(&p, 200, 50.0);
    let a = until_final(&mut watch, &id_a).await;
    let b = until_final(&mut watch, &id_b).await;
    sim.await.unwrap();
    assert_eq!(
        a.last().unwrap().message,
        format!("wrote 30 of 30 images to {}", file_a.display())
    );
    assert!(a.iter().all(|s| s.action != action::REQUEST_START), "{a:?}");
    assert_eq!(b[0].action, action::REQUEST_START, "{b:?}");
    assert_eq!(
        b.last().unwrap().message,
        format!("wrote 20 of 20 images to {}", file_b.display())
    );
    assert_exact(&file_a, &detector, 30);
    assert_exact(&file_b, &detector, 20);
    assert!(agent.terminate().await.success());
    stop_pipeline(p, &work).await;
}

/// Issue 18: "whatever the agent is doing" includes waiting for a writer that does not answer.
/// The writer is stopped (SIGSTOP) during a write, and the agent's writer commands time out only
/// after 10 s: a new request still gets `request_queued` within a second, and a bad one its
/// `request_fail`. Resumed, the writer finishes A, then B is written; both files exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_does_not_answer_never_delays_the_first_status() {
    let (p, root, detector) = start_pipeline("agenthang").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("hang");
    let mut settings = test_settings(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, false).unwrap(),
    );
    settings.writer_timeout = Duration::from_secs(10);
    let agent = RunningAgent::start_with(settings).await;
    let mut watch = observe_statuses().await;
    let [id_a, id_bad, id_b] = std::array::from_fn(|_| client::new_request_id());
    let (file_a, file_b) = (root.join("a.h5"), root.join("b.h5"));
    publish(
        &tag,
        &id_a,
        &serde_json::json!({"output_file": file_a, "n_images": 20}),
    )
    .await;
    assert_eq!(
        next_for(&mut watch, &id_a).await.action,
        action::REQUEST_START
    );

    let writer_pid = p.pid("std-h5-writer").expect("the writer runs").to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &writer_pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} {writer_pid}");
    };
    signal("-STOP");
    let sent = publish(
        &tag,
        &id_bad,
        &serde_json::json!({"output_file": "rel.h5", "n_images": 5}),
    )
    .await;
    let refused = within_a_second(&mut watch, &id_bad, sent).await;
    assert_eq!(refused.action, action::REQUEST_FAIL, "{refused:?}");
    let sent = publish(
        &tag,
        &id_b,
        &serde_json::json!({"output_file": file_b, "n_images": 10}),
    )
    .await;
    let queued = within_a_second(&mut watch, &id_b, sent).await;
    assert_eq!(queued.action, action::REQUEST_QUEUED, "{queued:?}");
    signal("-CONT");

    // Enough frames for A's 20 and, after A's success, B's 10.
    let sim = simulate(&p, 200, 50.0);
    let done_a = until_final(&mut watch, &id_a).await;
    let done_b = until_final(&mut watch, &id_b).await;
    sim.await.unwrap();
    assert_eq!(
        done_a.last().unwrap().action,
        action::REQUEST_SUCCESS,
        "{done_a:?}"
    );
    assert_eq!(
        done_b.last().unwrap().action,
        action::REQUEST_SUCCESS,
        "{done_b:?}"
    );
    assert_exact(&file_a, &detector, 20);
    assert_exact(&file_b, &detector, 10);
    agent.stop().await;
    stop_pipeline(p, &work).await;
}
