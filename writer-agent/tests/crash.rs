//! The agent binary killed (SIGKILL) while it holds a request, against the real broker and real
//! pipelines. The request waits in the agent's durable quorum queue and comes back to the
//! restarted agent, which never writes it twice:
//! - killed before the writer took it, every time: after `--max-deliveries` deliveries the broker
//!   dead-letters it, the client gets `request_fail`, and the next request is written;
//! - killed while the writer runs it: the restarted agent takes the run up and the client gets
//!   its `request_success`;
//! - killed, and the writer lost the run too: `request_fail` naming the `.part` left behind;
//! - killed mid-run with `--max-deliveries 1` (dead-lettered at once): the restarted agent still
//!   follows the writer's run and the client gets its success.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use lapin::types::AMQPValue;
use std::path::Path;
use std::sync::Arc;
use std_daq_common::writer_command::Command;
use std_daq_tests::verify_h5;
use std_writer_agent::client::{self, ClientError, ClientOptions};
use std_writer_agent::protocol::{action, AgentQueues};
use std_writer_agent::{Policy, StatusMessage};
use tokio::sync::mpsc;

/// A client waiting for `id` (idle timeout = the watchdog); its non-final statuses on a channel.
fn send(
    tag: &str,
    id: &str,
    body: &serde_json::Value,
) -> (
    tokio::task::JoinHandle<Result<StatusMessage, ClientError>>,
    mpsc::UnboundedReceiver<StatusMessage>,
) {
    let opts = ClientOptions {
        idle_timeout: WATCHDOG,
        ..client_options(tag)
    };
    let (id, body) = (id.to_string(), body.to_string());
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        client::send_request(&opts, &id, body.as_bytes(), |s| {
            let _ = tx.send(s.clone());
        })
        .await
    });
    (task, rx)
}

fn drain(rx: &mut mpsc::UnboundedReceiver<StatusMessage>) -> Vec<String> {
    let mut actions = Vec::new();
    while let Ok(s) = rx.try_recv() {
        actions.push(s.action);
    }
    actions
}

/// A command socket that takes commands and never answers: a writer that hangs. The agent
/// waiting for it holds the request and has created nothing, the moment a poison request would
/// crash it.
struct HangingWriter {
    ctx: zmq::Context,
    endpoint: String,
    socket: Option<zmq::Socket>,
}

impl HangingWriter {
    fn bind(endpoint: &str) -> Self {
        let mut w = HangingWriter {
            ctx: zmq::Context::new(),
            endpoint: endpoint.to_string(),
            socket: None,
        };
        w.rebind();
        w
    }

    /// A fresh socket (a REP socket that received a command waits to answer it).
    fn rebind(&mut self) {
        self.socket = None;
        let s = self.ctx.socket(zmq::REP).unwrap();
        s.set_linger(0).unwrap();
        s.set_rcvtimeo(i32::try_from(WATCHDOG.as_millis()).unwrap())
            .unwrap();
        s.bind(&self.endpoint).unwrap();
        self.socket = Some(s);
    }

    /// The next command (within the watchdog), left unanswered.
    async fn next_command(&mut self) -> Command {
        let socket = self.socket.take().unwrap();
        let (socket, bytes) = tokio::task::spawn_blocking(move || {
            let bytes = socket.recv_bytes(0);
            (socket, bytes)
        })
        .await
        .unwrap();
        self.socket = Some(socket);
        let bytes = bytes.expect("the agent sent the writer no command within the watchdog");
        serde_json::from_slice(&bytes).unwrap()
    }
}

/// The pipeline's config with another ipc folder: the agent started with it talks to the
/// writer command socket in that folder.
fn config_with_ipc_dir(config: &Path, ipc_dir: &Path, out: &Path) {
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(config).unwrap()).unwrap();
    cfg["ipc_dir"] = ipc_dir.display().to_string().into();
    std::fs::write(out, cfg.to_string()).unwrap();
}

fn header<'a>(h: &'a lapin::types::FieldTable, name: &str) -> &'a AMQPValue {
    h.inner()
        .get(name)
        .unwrap_or_else(|| panic!("no header {name}: {h:?}"))
}

fn text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => s.to_string(),
        other => panic!("not a string: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_request_is_dead_lettered_after_max_deliveries_and_the_next_request_succeeds() {
    let (p, root, detector) = start_pipeline("agentpoison").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("poison");
    let _queues = QueuesGuard::new(&service_name(&tag));
    let queues = AgentQueues::for_service(&service_name(&tag));
    let hang_dir = work.join("hang");
    std::fs::create_dir_all(&hang_dir).unwrap();
    let hang_config = work.join("hang-config.json");
    config_with_ipc_dir(&p.config_path, &hang_dir, &hang_config);
    let mut writer = HangingWriter::bind(&format!(
        "ipc://{}/std-daq-{detector}-writer",
        hang_dir.display()
    ));

    let mut agent = AgentProcess::spawn(&hang_config, &root, &tag, &["--max-deliveries", "3"]);
    agent.wait_serving().await;
    let file = root.join("poison.h5");
    let id = client::new_request_id();
    let body = serde_json::json!({"output_file": file, "n_images": 10});
    let (request, mut seen) = send(&tag, &id, &body);
    for delivery in 1..=3u64 {
        // The agent holds the request and asks the writer to start it: it dies right there.
        let received = agent.wait_log("request received").await;
        assert!(received.contains(&id), "{received}");
        // The quorum queue's count of earlier unsettled deliveries (no header the first time).
        let expected = match delivery {
            1 => "redelivered=false".to_string(),
            n => format!("redelivered=true earlier_deliveries={}", n - 1),
        };
        assert!(received.ends_with(&expected), "{received}");
        assert_eq!(
            writer.next_command().await,
            Command::Start {
                output_file: file.display().to_string(),
                n_images: 10,
                request_id: Some(id.clone()),
                context: Default::default(),
            }
        );
        agent.crash();
        writer.rebind();
        // After the third crash the broker gives up; the next agent talks to the real writer.
        let config = if delivery < 3 {
            &hang_config
        } else {
            &p.config_path
        };
        agent = AgentProcess::spawn(config, &root, &tag, &["--max-deliveries", "3"]);
        agent.wait_serving().await;
    }

    // What the client sees: no status while the agent died three times, then request_fail.
    let err = request.await.unwrap().unwrap_err();
    let ClientError::Failed(status) = err else {
        panic!("expected a request_fail, got {err}")
    };
    assert_eq!(
        status.message,
        format!(
            "the request was given up after 3 deliveries: every attempt ended without a final \
             status (the writer agent stopped or lost the broker while handling it); it is kept \
             in the dead-letter queue {}",
            queues.dead_letter
        )
    );
    assert_eq!(status.body["output_file"], body["output_file"]);
    assert_eq!(status.body["images_written"], 0);
    assert!(drain(&mut seen).is_empty());
    assert!(!file.exists());

    // The original waits in the dead-letter queue, with the broker's reason.
    assert_eq!(ready_messages(&queues.dead_letter).await, 1);
    assert_eq!(ready_messages(&queues.notices).await, 0);
    assert_eq!(ready_messages(&queues.requests).await, 0);
    let (conn, ch) = test_channel().await;
    let dead = ch
        .basic_get(queues.dead_letter.as_str().into(), Default::default())
        .await
        .unwrap()
        .expect("the dead-letter queue is empty")
        .delivery;
    assert_eq!(dead.data, body.to_string().as_bytes());
    assert_eq!(
        dead.properties.correlation_id().as_ref().unwrap().as_str(),
        id
    );
    let headers = dead.properties.headers().as_ref().unwrap();
    assert_eq!(
        text(header(headers, "x-first-death-reason")),
        "delivery_limit"
    );
    assert_eq!(
        text(header(headers, "x-first-death-queue")),
        queues.requests
    );
    let AMQPValue::FieldArray(deaths) = header(headers, "x-death") else {
        panic!("x-death is not an array: {headers:?}")
    };
    let AMQPValue::FieldTable(death) = &deaths.as_slice()[0] else {
        panic!("{deaths:?}")
    };
    assert_eq!(text(header(death, "reason")), "delivery_limit");
    assert_eq!(text(header(death, "exchange")), "request");
    assert_eq!(
        header(death, "routing-keys"),
        &AMQPValue::FieldArray(vec![AMQPValue::LongString(tag.as_str().into())].into())
    );
    let _ = conn.close(200, "done".into()).await;

    // The agent serves the next request: an exact file.
    let next = root.join("after-poison.h5");
    let mut observed = observe_statuses().await;
    let id2 = client::new_request_id();
    let (request, _) = send(
        &tag,
        &id2,
        &serde_json::json!({"output_file": next, "n_images": 20}),
    );
    assert_eq!(
        next_for(&mut observed, &id2).await.action,
        action::REQUEST_START
    );
    let sim = simulate(&p, 60, 50.0);
    let done = request.await.unwrap().unwrap();
    sim.await.unwrap();
    assert_eq!(
        done.message,
        format!("wrote 20 of 20 images to {}", next.display())
    );
    let report = verify_h5(&next, &detector, "").unwrap();
    assert_eq!(report["exact_images"], 20, "{report}");
    assert!(agent.terminate().await.success());
    drop(writer);
    stop_pipeline(p, &work).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_run_takes_the_run_up_again_and_the_client_gets_its_success() {
    let (p, root, detector) = start_pipeline("agentresume").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("resume");
    let _queues = QueuesGuard::new(&service_name(&tag));
    let mut agent = AgentProcess::spawn(&p.config_path, &root, &tag, &[]);
    agent.wait_serving().await;
    let mut observed = observe_statuses().await;
    let file = root.join("resumed.h5");
    let id = client::new_request_id();
    let (request, mut seen) = send(
        &tag,
        &id,
        &serde_json::json!({"output_file": file, "n_images": 40}),
    );
    assert_eq!(
        next_for(&mut observed, &id).await.action,
        action::REQUEST_START
    );
    simulate(&p, 20, 50.0).await.unwrap();
    agent.crash();

    // The writer still runs the request; the restarted agent gets it again and follows that run.
    let mut agent = AgentProcess::spawn(&p.config_path, &root, &tag, &[]);
    let resumed = agent
        .wait_log("resuming: the writer is still running this request")
        .await;
    assert!(resumed.contains(&id), "{resumed}");
    simulate_from(&p, 40, 50.0, 1000).await.unwrap();
    let done = request.await.unwrap().unwrap();
    assert_eq!(done.action, action::REQUEST_SUCCESS);
    assert_eq!(
        done.message,
        format!("wrote 40 of 40 images to {}", file.display())
    );
    assert_eq!(done.body["run"]["end"], "completed");
    // One start (the first agent's), then progress only: the run was not started twice.
    let actions = drain(&mut seen);
    assert_eq!(actions[0], action::REQUEST_START, "{actions:?}");
    assert!(
        actions[1..].iter().all(|a| a == action::REQUEST_PROGRESS),
        "{actions:?}"
    );
    let report = verify_h5(&file, &detector, "").unwrap();
    assert_eq!(report["images"], 40, "{report}");
    assert_eq!(report["exact_images"], 40, "{report}");
    assert_eq!(report["ids_strictly_increasing"], true, "{report}");
    assert!(agent.terminate().await.success());
    stop_pipeline(p, &work).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_request_the_writer_lost_fails_naming_its_leftover_and_the_next_succeeds() {
    let (mut p, root, detector) = start_pipeline("agentleftover").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("leftover");
    let _queues = QueuesGuard::new(&service_name(&tag));
    let mut agent = AgentProcess::spawn(&p.config_path, &root, &tag, &[]);
    agent.wait_serving().await;
    let mut observed = observe_statuses().await;
    let file = root.join("left.h5");
    let part = root.join("left.h5.part");
    let id = client::new_request_id();
    let (request, _) = send(
        &tag,
        &id,
        &serde_json::json!({"output_file": file, "n_images": 40}),
    );
    assert_eq!(
        next_for(&mut observed, &id).await.action,
        action::REQUEST_START
    );
    simulate(&p, 10, 50.0).await.unwrap();
    agent.crash();
    // The writer dies too: the run is gone, its partial file stays.
    tokio::task::block_in_place(|| Arc::get_mut(&mut p).unwrap().restart_writer(true)).unwrap();
    assert!(part.exists() && !file.exists());

    let mut agent = AgentProcess::spawn(&p.config_path, &root, &tag, &[]);
    agent.wait_serving().await;
    let err = request.await.unwrap().unwrap_err();
    let ClientError::Failed(status) = err else {
        panic!("expected a request_fail, got {err}")
    };
    assert_eq!(
        status.message,
        format!(
            "the previous attempt at this request was interrupted and left {}; std-daq never \
             overwrites data: check it and send a new request",
            part.display()
        )
    );
    assert!(part.exists() && !file.exists());

    let next = root.join("next.h5");
    let id2 = client::new_request_id();
    let (request, _) = send(
        &tag,
        &id2,
        &serde_json::json!({"output_file": next, "n_images": 20}),
    );
    assert_eq!(
        next_for(&mut observed, &id2).await.action,
        action::REQUEST_START
    );
    let sim = simulate_from(&p, 40, 50.0, 1000);
    let done = request.await.unwrap().unwrap();
    sim.await.unwrap();
    assert_eq!(
        done.message,
        format!("wrote 20 of 20 images to {}", next.display())
    );
    let report = verify_h5(&next, &detector, "").unwrap();
    assert_eq!(report["exact_images"], 20, "{report}");
    assert!(agent.terminate().await.success());
    stop_pipeline(p, &work).await;
}

/// With `--max-deliveries 1` the broker dead-letters the request as soon as the agent dies
/// holding it, here in the middle of its run. The writer still runs it, so the restarted agent
/// (answering the dead-letter notice) follows that run and the client gets its true end, success,
/// not "given up".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dead_lettered_while_the_writer_runs_it_still_gets_its_true_final_status() {
    let (p, root, detector) = start_pipeline("agentdlrun").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("dlrun");
    let _queues = QueuesGuard::new(&service_name(&tag));
    let queues = AgentQueues::for_service(&service_name(&tag));
    let once = ["--max-deliveries", "1"];
    let mut agent = AgentProcess::spawn(&p.config_path, &root, &tag, &once);
    agent.wait_serving().await;
    let mut observed = observe_statuses().await;
    let file = root.join("dead-but-running.h5");
    let id = client::new_request_id();
    let (request, _) = send(
        &tag,
        &id,
        &serde_json::json!({"output_file": file, "n_images": 40}),
    );
    assert_eq!(
        next_for(&mut observed, &id).await.action,
        action::REQUEST_START
    );
    simulate(&p, 20, 50.0).await.unwrap();
    agent.crash();

    let mut agent = AgentProcess::spawn(&p.config_path, &root, &tag, &once);
    let line = agent
        .wait_log("the writer is still running it: following the run")
        .await;
    assert!(line.contains(&id), "{line}");
    simulate_from(&p, 40, 50.0, 1000).await.unwrap();
    let done = request.await.unwrap().unwrap();
    assert_eq!(
        done.message,
        format!("wrote 40 of 40 images to {}", file.display())
    );
    let report = verify_h5(&file, &detector, "").unwrap();
    assert_eq!(report["exact_images"], 40, "{report}");
    // The original stays in the dead-letter queue for the operator; its notice was used up.
    assert_eq!(ready_messages(&queues.dead_letter).await, 1);
    assert_eq!(ready_messages(&queues.notices).await, 0);
    assert!(agent.terminate().await.success());
    stop_pipeline(p, &work).await;
}

/// The writer (not the agent) is SIGKILLed mid-run and restarted, as a supervisor would: the
/// request ends `request_fail` saying the writer lost the run and how many images its `.part`
/// holds (the last checkpoint the agent saw); the `.part` opens and holds exactly those images,
/// exact; the next request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_killed_mid_run_fails_the_request_naming_what_its_partial_file_holds() {
    let (mut p, root, detector) = start_pipeline("writerkilled").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("writerkilled");
    let agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, false).unwrap(),
    )
    .await;
    let file = root.join("killed.h5");
    let id = client::new_request_id();
    let (request, mut statuses) = send(
        &tag,
        &id,
        &serde_json::json!({"output_file": file, "n_images": 300}),
    );
    let start = tokio::time::timeout(WATCHDOG, statuses.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(start.action, action::REQUEST_START);
    // 100 images, then the stream pauses: the writer checkpoints them, the agent reports it.
    simulate(&p, 100, 100.0).await.unwrap();
    loop {
        let s = tokio::time::timeout(WATCHDOG, statuses.recv())
            .await
            .expect("no progress saying 100 images are safe")
            .unwrap();
        assert_eq!(s.action, action::REQUEST_PROGRESS, "{s:?}");
        if s.message == "wrote 100 of 300 images (100 safe in the file)" {
            break;
        }
    }
    let pm = Arc::get_mut(&mut p).expect("the pipeline is not shared now");
    tokio::task::block_in_place(|| pm.restart_writer(true)).unwrap();

    let done = match tokio::time::timeout(WATCHDOG, request)
        .await
        .unwrap()
        .unwrap()
    {
        Err(ClientError::Failed(status)) => status,
        other => panic!("expected request_fail, got {other:?}"),
    };
    assert_eq!(done.action, action::REQUEST_FAIL);
    assert_eq!(
        done.message,
        format!(
            "the writer no longer knows this run (was it restarted?); {}.part holds the 100 \
             images of the writer's last checkpoint (more if it checkpointed again before it died)",
            file.display()
        )
    );
    // The body counts what the partial file is known to hold.
    assert_eq!(done.body["images_written"], 100, "{:?}", done.body);
    assert!(!file.exists());
    let partial = root.join("killed.h5.part");
    let report = tokio::task::spawn_blocking(move || verify_h5(&partial, &detector, "").unwrap())
        .await
        .unwrap();
    assert_eq!(report["images"], 100, "{report}");
    assert_eq!(report["exact_images"], 100, "{report}");
    assert_eq!(report["record_lengths_match"], true, "{report}");
    agent.stop().await;
    stop_pipeline(p, &work).await;
}
