//! The writer agent against the real RabbitMQ on 127.0.0.1:5672 and real pipelines (processes,
//! UDP, shared memory, HDF5 checked by h5py). Each test binds its own tag; statuses are told
//! apart by correlation id.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std_daq_tests::verify_h5;
use std_writer_agent::client::{self, ClientError};
use std_writer_agent::protocol::action;
use std_writer_agent::{Policy, StatusMessage};
use tokio::sync::mpsc;

/// Request A (60 images) and request B (40 images, sent while A runs) each produce an exact file;
/// B starts only after A's success; each reports start -> progress... -> success with the
/// request echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_write_exact_files_one_after_the_other_with_start_progress_success() {
    let (p, root, detector) = start_pipeline("agentok").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("ok");
    let agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, true).unwrap(),
    )
    .await;
    let mut observed = observe_statuses().await;
    let opts = client_options(&tag);
    let file_a = root.join("scan/a.h5");
    let file_b = root.join("scan/b.h5");
    let (id_a, id_b) = (client::new_request_id(), client::new_request_id());

    let body_a = serde_json::json!({
        "output_file": file_a, "n_images": 60,
        "user_id": "e12345", "run_id": 7, "sources": ["jf-0", "jf-1"],
    });
    let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<StatusMessage>();
    let client_a = {
        let (opts, id, body) = (opts.clone(), id_a.clone(), body_a.to_string());
        tokio::spawn(async move {
            client::send_request(&opts, &id, body.as_bytes(), |s| {
                let _ = progress_tx.send(s.clone());
            })
            .await
        })
    };
    // The simulator starts only once A runs, so A's file holds the first images sent.
    let start_a = next_for(&mut observed, &id_a).await;
    assert_eq!(start_a.action, action::REQUEST_START);
    let sim = simulate(&p, 300, 50.0);
    let client_b = {
        let (opts, id) = (opts.clone(), id_b.clone());
        let body = serde_json::json!({"output_file": file_b, "n_images": 40}).to_string();
        tokio::spawn(async move { client::send_request(&opts, &id, body.as_bytes(), |_| {}).await })
    };

    let done_a = client_a.await.unwrap().unwrap();
    let done_b = client_b.await.unwrap().unwrap();
    sim.await.unwrap();

    // What the client saw for A: start, then progress, increasing, below 60.
    let mut seen = Vec::new();
    while let Ok(s) = progress_rx.try_recv() {
        seen.push(s);
    }
    assert_eq!(seen[0], start_a);
    assert_eq!(
        start_a.message,
        format!("writing 60 images to {}", file_a.display())
    );
    assert_eq!(start_a.source, format!("{tag}.writer_agent"));
    let progress: Vec<&StatusMessage> = seen[1..].iter().collect();
    assert!(!progress.is_empty(), "no progress message: {seen:?}");
    let mut last = 0;
    for s in &progress {
        assert_eq!(s.action, action::REQUEST_PROGRESS);
        let k = s.body["images_written"].as_u64().unwrap();
        // Before the first image the simulator sends, A may say that it waits.
        if s.message.starts_with("waiting for the first image for ") {
            assert_eq!((k, last), (0, 0), "{seen:?}");
            continue;
        }
        assert!(k >= last && k <= 60, "{seen:?}");
        // "wrote k of 60 images (c safe in the file)", c <= k: published when either changed.
        let safe: u64 = s
            .message
            .strip_prefix(&format!("wrote {k} of 60 images ("))
            .and_then(|r| r.strip_suffix(" safe in the file)"))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("{}", s.message));
        assert!(safe <= k, "{}", s.message);
        last = k;
    }
    assert_eq!(done_a.action, action::REQUEST_SUCCESS);
    assert_eq!(
        done_a.message,
        format!("wrote 60 of 60 images to {}", file_a.display())
    );
    // The body echoes the request (legacy fields included) and adds what happened.
    for key in ["output_file", "n_images", "user_id", "run_id", "sources"] {
        assert_eq!(done_a.body[key], body_a[key], "{key}: {}", done_a.body);
    }
    assert_eq!(done_a.body["request_id"], id_a.as_str());
    assert_eq!(done_a.body["images_written"], 60);
    assert_eq!(done_a.body["run"]["end"], "completed");
    assert_eq!(done_a.body["run"]["images_good"], 60);
    assert!(
        done_a.body["end_timestamp"].as_f64().unwrap()
            >= done_a.body["init_timestamp"].as_f64().unwrap()
    );
    assert_eq!(
        done_b.message,
        format!("wrote 40 of 40 images to {}", file_b.display())
    );

    // B waited its turn: on the status exchange, B's start comes after A's success, and B's
    // request_queued (if B arrived while A ran, which tests/queue.rs makes sure of) before it.
    let mut order = Vec::new();
    while order.last() != Some(&(id_b.clone(), action::REQUEST_START.to_string())) {
        let s = tokio::time::timeout(WATCHDOG, observed.recv())
            .await
            .unwrap()
            .unwrap();
        if (s.request_id == id_a && s.is_final()) || s.request_id == id_b {
            order.push((s.request_id.clone(), s.action.clone()));
        }
    }
    let a_done = (id_a.clone(), action::REQUEST_SUCCESS.to_string());
    let b_queued = (id_b.clone(), action::REQUEST_QUEUED.to_string());
    let b_start = (id_b.clone(), action::REQUEST_START.to_string());
    assert!(
        order == [a_done.clone(), b_start.clone()] || order == [b_queued, a_done, b_start],
        "{order:?}"
    );

    for (file, n) in [(&file_a, 60), (&file_b, 40)] {
        let report = verify_h5(file, &detector, "").unwrap();
        assert_eq!(report["images"], n, "{report}");
        assert_eq!(report["exact_images"], n, "{report}");
        assert_eq!(report["ids_strictly_increasing"], true, "{report}");
    }
    agent.stop().await;
    stop_pipeline(p, &work).await;
}

/// Kill mid-write: the file is closed, valid and holds exactly the k images written; the status
/// is request_fail "killed after k of n images"; killing it again is answered and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_write_leaves_a_trimmed_valid_file_and_an_honest_status() {
    let (p, root, detector) = start_pipeline("agentkill").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("kill");
    let agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, false).unwrap(),
    )
    .await;
    let mut observed = observe_statuses().await;
    let opts = client_options(&tag);
    let file = root.join("killed.h5");
    let id = client::new_request_id();
    let body = serde_json::json!({"output_file": file, "n_images": 1000}).to_string();
    let request = {
        let (opts, id) = (opts.clone(), id.clone());
        tokio::spawn(async move { client::send_request(&opts, &id, body.as_bytes(), |_| {}).await })
    };
    assert_eq!(
        next_for(&mut observed, &id).await.action,
        action::REQUEST_START
    );
    let sim = simulate(&p, 200, 50.0);
    // Kill once a few images are in.
    loop {
        let s = next_for(&mut observed, &id).await;
        assert_eq!(s.action, action::REQUEST_PROGRESS, "{s:?}");
        if s.body["images_written"].as_u64().unwrap() >= 5 {
            break;
        }
    }
    client::kill(&opts, &id).await.unwrap();
    let err = request.await.unwrap().unwrap_err();
    let ClientError::Failed(status) = err else {
        panic!("expected a request_fail, got {err}")
    };
    let k = status.body["images_written"].as_u64().unwrap();
    assert!((5..1000).contains(&k), "{status:?}");
    assert_eq!(status.action, action::REQUEST_FAIL);
    assert_eq!(
        status.message,
        format!(
            "killed after {k} of 1000 images; {} holds the {k} images written",
            file.display()
        )
    );
    assert_eq!(status.body["run"]["end"], "killed");
    assert_eq!(status.body["run"]["images_written"], k);

    // A second kill for the finished request: answered, nothing changes.
    client::kill(&opts, &id).await.unwrap();
    // The observer still holds the run's own statuses; the answer to the kill comes after them.
    let again = loop {
        let s = next_for(&mut observed, &id).await;
        if s.action == action::KILL_IGNORED {
            break s;
        }
        assert!(
            s.action == action::REQUEST_PROGRESS || s == *status,
            "unexpected status after the kill: {s:?}"
        );
    };
    assert_eq!(again.action, action::KILL_IGNORED);
    assert_eq!(
        again.message,
        format!("request {id} is not running here (no request is); nothing was changed")
    );
    sim.await.unwrap();
    let report = verify_h5(&file, &detector, "").unwrap();
    assert_eq!(report["images"], k, "{report}");
    assert_eq!(report["exact_images"], k, "{report}");
    agent.stop().await;
    stop_pipeline(p, &work).await;
}

/// An unbounded write (no n_images): request_start says so, progress shows the count without a
/// total, the writer's status shows `n_images: null`, and the kill ends it with request_success
/// and the count k; the file is complete (no .part) and h5py reads exactly k exact images with
/// consecutive ids. Then, with an agent whose --max-images is 20, an unbounded write nobody stops
/// ends by itself at 20 images, also a success with a complete file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbounded_write_runs_until_killed_and_ends_in_success_with_a_complete_file() {
    use std_daq_common::writer_command::Command;
    use std_writer_agent::writer_client::WriterClient;
    let (p, root, detector) = start_pipeline("agentunb").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("unbounded");
    let agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, false).unwrap(),
    )
    .await;
    let mut observed = observe_statuses().await;
    let opts = client_options(&tag);
    let file = root.join("unbounded.h5");
    let id = client::new_request_id();
    let body = serde_json::json!({"output_file": file, "n_images": null}).to_string();
    let request = {
        let (opts, id) = (opts.clone(), id.clone());
        tokio::spawn(async move { client::send_request(&opts, &id, body.as_bytes(), |_| {}).await })
    };
    let start = next_for(&mut observed, &id).await;
    assert_eq!(start.action, action::REQUEST_START);
    assert_eq!(
        start.message,
        format!(
            "writing images to {} until stopped (unbounded write, at most 1000 images)",
            file.display()
        )
    );
    let sim = simulate(&p, 200, 50.0);
    loop {
        let s = next_for(&mut observed, &id).await;
        assert_eq!(s.action, action::REQUEST_PROGRESS, "{s:?}");
        let k = s.body["images_written"].as_u64().unwrap();
        if s.message.starts_with("waiting for the first image for ") {
            assert_eq!(k, 0, "{s:?}");
            continue;
        }
        let safe: u64 = s
            .message
            .strip_prefix(&format!("wrote {k} images ("))
            .and_then(|r| r.strip_suffix(" safe in the file)"))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("{}", s.message));
        assert!(safe <= k, "{}", s.message);
        if k >= 5 {
            break;
        }
    }
    // What a poller (the HTTP API, a bluesky device) reads from the writer.
    let writer = WriterClient::new(
        &zmq::Context::new(),
        &writer_endpoint(&p),
        std::time::Duration::from_secs(5),
    );
    let status = tokio::task::spawn_blocking(move || writer.request(&Command::Status))
        .await
        .unwrap()
        .unwrap()
        .status
        .unwrap();
    let current = status.current.expect("the unbounded run is current");
    assert_eq!(current.request_id.as_deref(), Some(id.as_str()));
    assert_eq!(current.n_images, None);
    assert_eq!(current.max_images, Some(1000));
    assert!(current.images_written >= 5, "{current:?}");

    client::kill(&opts, &id).await.unwrap();
    let done = request.await.unwrap().unwrap();
    let k = done.body["images_written"].as_u64().unwrap();
    assert!((5..=200).contains(&k), "{done:?}");
    assert_eq!(done.action, action::REQUEST_SUCCESS);
    assert_eq!(
        done.message,
        format!(
            "wrote {k} images to {} (unbounded write, stopped)",
            file.display()
        )
    );
    assert_eq!(done.body["n_images"], serde_json::Value::Null);
    assert_eq!(done.body["run"]["end"], "stopped");
    assert_eq!(done.body["run"]["n_images"], serde_json::Value::Null);
    assert_eq!(done.body["run"]["images_written"], k);
    assert_eq!(done.body["run"]["images_checkpointed"], k);
    sim.await.unwrap();
    assert!(!std_daq_common::writer_command::partial_path(&file).exists());
    let report = verify_h5(&file, &detector, "").unwrap();
    assert_eq!(report["images"], k, "{report}");
    assert_eq!(report["exact_images"], k, "{report}");
    assert_eq!(report["ids_consecutive"], true, "{report}");
    agent.stop().await;

    // Nobody stops it: it ends by itself at the agent's --max-images.
    let tag = unique_tag("unbounded-max");
    let agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 20, false).unwrap(),
    )
    .await;
    let file = root.join("capped.h5");
    let id = client::new_request_id();
    let body = serde_json::json!({"output_file": file}).to_string();
    let request = {
        let opts = client_options(&tag);
        let id = id.clone();
        tokio::spawn(async move { client::send_request(&opts, &id, body.as_bytes(), |_| {}).await })
    };
    assert_eq!(
        next_for(&mut observed, &id).await.action,
        action::REQUEST_START
    );
    let sim = simulate_from(&p, 60, 50.0, 1000);
    let done = request.await.unwrap().unwrap();
    sim.await.unwrap();
    assert_eq!(done.action, action::REQUEST_SUCCESS);
    assert_eq!(
        done.message,
        format!(
            "wrote 20 images to {} (unbounded write, ended at max_images = 20)",
            file.display()
        )
    );
    assert_eq!(done.body["run"]["end"], "max_images reached");
    assert!(!std_daq_common::writer_command::partial_path(&file).exists());
    let report = verify_h5(&file, &detector, "").unwrap();
    assert_eq!(report["images"], 20, "{report}");
    assert_eq!(report["exact_images"], 20, "{report}");
    assert_eq!(report["ids_consecutive"], true, "{report}");
    agent.stop().await;
    stop_pipeline(p, &work).await;
}

/// Each bad request gets request_fail with exactly what is wrong, is not requeued, and leaves
/// nothing on disk (not even a folder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_exact_reasons_and_leave_nothing_on_disk() {
    let base = tempfile::tempdir().unwrap();
    let base_path = std::fs::canonicalize(base.path()).unwrap();
    let root = base_path.join("root");
    let outside = base_path.join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("taken.h5"), b"precious").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
    // No writer behind this endpoint: a valid request reaches it and is refused.
    let endpoint = format!("ipc://{}/no-writer", base_path.display());
    let tag = unique_tag("bad");
    let agent = RunningAgent::start(&tag, &endpoint, Policy::new(&root, 100, true).unwrap()).await;
    let opts = client_options(&tag);
    let r = root.display().to_string();
    let not_json = serde_json::from_slice::<serde_json::Value>(b"write please")
        .unwrap_err()
        .to_string();
    let cases: Vec<(String, String)> = vec![
        (
            r#"{"output_file":"data/a.h5","n_images":5}"#.into(),
            "output_file \"data/a.h5\" must be an absolute path".into(),
        ),
        (
            format!(r#"{{"output_file":"{r}/a.txt","n_images":5}}"#),
            format!("output_file \"{r}/a.txt\" must end in .h5"),
        ),
        (
            format!(r#"{{"output_file":"{}/a.h5","n_images":5}}"#, outside.display()),
            format!(
                "output_file \"{}/a.h5\" is outside the output root {r}",
                outside.display()
            ),
        ),
        (
            format!(r#"{{"output_file":"{r}/../outside/a.h5","n_images":5}}"#),
            format!("output_file \"{r}/../outside/a.h5\" must not contain '..'"),
        ),
        (
            format!(r#"{{"output_file":"{r}/taken.h5","n_images":5}}"#),
            format!("output_file \"{r}/taken.h5\" already exists (std-daq never overwrites data)"),
        ),
        (
            format!(r#"{{"output_file":"{r}/a.h5","n_images":0}}"#),
            "n_images must be between 1 and 100, got 0".into(),
        ),
        (
            format!(r#"{{"output_file":"{r}/a.h5","n_images":101}}"#),
            "n_images must be between 1 and 100, got 101".into(),
        ),
        (
            "write please".into(),
            format!("the request body is not JSON: {not_json}"),
        ),
        (
            format!(r#"{{"output_file":"{r}/a.h5","n_images":"ten"}}"#),
            "the request body is not a valid write request: invalid type: string \"ten\", expected u64".into(),
        ),
        (
            format!(r#"{{"output_file":"{r}/a.h5","n_images":-3}}"#),
            "the request body is not a valid write request: invalid value: integer `-3`, expected u64".into(),
        ),
        (
            r#"{"output_file":17,"n_images":3}"#.into(),
            "the request body is not a valid write request: invalid type: integer `17`, expected a string".into(),
        ),
        // No n_images is an unbounded write: it passes every check and reaches the (absent)
        // writer.
        (
            format!(r#"{{"output_file":"{r}/a.h5"}}"#),
            format!(
                "the writer at {endpoint} did not take the request: the writer did not answer within 2s"
            ),
        ),
        (
            format!(r#"{{"output_file":"{r}/a.h5","n_images":5,"overwrite":true}}"#),
            "the request body is not a valid write request: unknown field `overwrite`, expected one of `output_file`, `n_images`, `user_id`, `run_id`, `sources`, `timestamp`, `timeout_s`, `metadata`, `traceparent`, `nxmx`".into(),
        ),
        (
            format!(r#"{{"output_file":"{r}/a.h5","n_images":5,"timeout_s":-1}}"#),
            "timeout_s must be a number of seconds above 0 and at most 1000000 (or null for no timeout), got -1".into(),
        ),
        (
            format!(r#"{{"output_file":"{r}/escape/a.h5","n_images":5}}"#),
            format!(
                "output_file \"{r}/escape/a.h5\" leaves the output root {r} through the symbolic link {r}/escape (-> {})",
                outside.display()
            ),
        ),
        (
            format!(r#"{{"output_file":"{r}/new/sub/a.h5","n_images":5}}"#),
            format!(
                "the writer at {endpoint} did not take the request: the writer did not answer within 2s"
            ),
        ),
    ];
    let n_cases = cases.len() as u64;
    for (body, message) in cases {
        let id = client::new_request_id();
        let err = client::send_request(&opts, &id, body.as_bytes(), |_| {})
            .await
            .unwrap_err();
        let ClientError::Failed(status) = err else {
            panic!("{body}: expected a request_fail, got {err}")
        };
        assert_eq!(status.action, action::REQUEST_FAIL, "{body}");
        assert_eq!(status.message, message, "{body}");
        assert_eq!(status.request_id, id);
        assert_eq!(status.body["message"], message.as_str());
        assert_eq!(status.body["images_written"], 0);
        match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Object(sent)) => {
                for (k, v) in sent {
                    assert_eq!(status.body[&k], v, "echo of {k}");
                }
            }
            _ => assert_eq!(status.body["raw_request"], body.as_str()),
        }
    }
    // Acked, not requeued: exactly one final status per request, then the agent is idle.
    assert_eq!(agent.state.borrow().requests_finished, n_cases);
    assert_eq!(agent.state.borrow().requests_refused, n_cases);

    // Killing a request nobody runs is answered and changes nothing.
    let mut observed = observe_statuses().await;
    let unknown = client::new_request_id();
    client::kill(&opts, &unknown).await.unwrap();
    let answer = next_for(&mut observed, &unknown).await;
    assert_eq!(answer.action, action::KILL_IGNORED);
    assert_eq!(
        answer.message,
        format!("request {unknown} is not running here (no request is); nothing was changed")
    );
    agent.stop().await;

    let mut left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["escape", "taken.h5"]);
    assert_eq!(std::fs::read(root.join("taken.h5")).unwrap(), b"precious");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

/// A request to a tag no agent listens on fails at once with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_nobody_listens_for_fails_at_once() {
    let opts = client_options(&unique_tag("nobody"));
    let err = client::write(
        &opts,
        &serde_json::json!({"output_file": "/x/a.h5", "n_images": 1}),
        |_| {},
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "no writer agent is listening for tag {:?} (the broker returned the request)",
            opts.tag
        )
    );
}

/// The pika client written from docs/protocol.md alone (tests/python/pika_write.py) drives a real
/// write: its statuses are start, progress..., success, and the file is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pika_client_written_from_the_protocol_doc_writes_a_file() {
    use std::io::BufRead;
    let (p, root, detector) = start_pipeline("agentpika").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("pika");
    let agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, false).unwrap(),
    )
    .await;
    let file = root.join("pika.h5");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/pika_write.py");
    let mut child = std::process::Command::new(std_daq_tests::python())
        .arg(&script)
        .args([BROKER, &tag])
        .arg(&file)
        .arg("30")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running pika_write.py (needs python3-pika)");
    let stdout = child.stdout.take().unwrap();
    // Lines as the script prints them; the simulator starts at request_start.
    let (line_tx, mut line_rx) = mpsc::unbounded_channel::<serde_json::Value>();
    let reader = tokio::task::spawn_blocking(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let v = serde_json::from_str(&line).unwrap_or_else(|_| panic!("pika: {line}"));
            let _ = line_tx.send(v);
        }
    });
    let first = tokio::time::timeout(WATCHDOG, line_rx.recv())
        .await
        .unwrap()
        .expect("pika_write.py printed no status (is python3-pika installed?)");
    assert_eq!(first["action"], "request_start", "{first}");
    assert_eq!(
        first["message"],
        format!("writing 30 images to {}", file.display())
    );
    let sim = simulate(&p, 90, 50.0);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    reader.await.unwrap();
    sim.await.unwrap();
    let mut lines = Vec::new();
    while let Ok(v) = line_rx.try_recv() {
        lines.push(v);
    }
    assert!(status.success(), "pika_write.py failed: {lines:?}");
    let last = lines.pop().unwrap();
    assert_eq!(last["action"], "request_success");
    assert_eq!(
        last["message"],
        format!("wrote 30 of 30 images to {}", file.display())
    );
    assert_eq!(last["images_written"], 30);
    assert!(
        lines.iter().all(|l| l["action"] == "request_progress"),
        "{lines:?}"
    );
    let report = verify_h5(&file, &detector, "").unwrap();
    assert_eq!(report["exact_images"], 30, "{report}");
    agent.stop().await;
    stop_pipeline(p, &work).await;
}

/// Junk on the request exchange (not UTF-8, empty, not an object, huge, no correlation id) and a
/// request through a stale binding each get request_fail with exactly what is wrong, are counted,
/// and the agent keeps serving on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_requests_are_refused_with_exact_reasons_counted_and_the_agent_keeps_serving() {
    let base = tempfile::tempdir().unwrap();
    let base_path = std::fs::canonicalize(base.path()).unwrap();
    let root = base_path.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let endpoint = format!("ipc://{}/no-writer", base_path.display());
    let tag = unique_tag("junk");
    let agent = RunningAgent::start(&tag, &endpoint, Policy::new(&root, 100, false).unwrap()).await;
    let opts = client_options(&tag);
    let r = root.display();
    let huge = format!(
        r#"{{"output_file":"{r}/a.h5","n_images":1,"user_id":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    let cases: Vec<(Vec<u8>, String)> = vec![
        (
            b"\xff\xfe{}".to_vec(),
            "the request body is not UTF-8 text: invalid utf-8 sequence of 1 bytes from index 0"
                .into(),
        ),
        (
            Vec::new(),
            "the request body is not JSON: EOF while parsing a value at line 1 column 0".into(),
        ),
        (
            format!(r#"["{r}/a.h5", 5]"#).into_bytes(),
            "the request body is not a valid write request: expected a JSON object, got an array"
                .into(),
        ),
        (
            br#""write please""#.to_vec(),
            "the request body is not a valid write request: expected a JSON object, got a string"
                .into(),
        ),
        (
            b"null".to_vec(),
            "the request body is not a valid write request: expected a JSON object, got null"
                .into(),
        ),
        (
            b"17".to_vec(),
            "the request body is not a valid write request: expected a JSON object, got a number"
                .into(),
        ),
        (
            huge.clone().into_bytes(),
            format!(
                "the request body is {} bytes; a write request is at most 65536 bytes",
                huge.len()
            ),
        ),
    ];
    let n_junk = cases.len() as u64;
    for (body, message) in cases {
        let id = client::new_request_id();
        let err = client::send_request(&opts, &id, &body, |_| {})
            .await
            .unwrap_err();
        let ClientError::Failed(status) = err else {
            panic!("{message}: expected a request_fail, got {err}")
        };
        assert_eq!(status.action, action::REQUEST_FAIL);
        assert_eq!(status.message, message);
        assert_eq!(status.request_id, id);
        // The echo of a body that is not a JSON object: its first 1000 characters, as text.
        let text: String = String::from_utf8_lossy(&body).chars().take(1000).collect();
        assert_eq!(status.body["raw_request"], text.as_str(), "{message}");
    }

    // No correlation id: answered all the same (a status without correlation id, told apart
    // here by the agent's source).
    let mut observed = observe_statuses().await;
    let body = format!(r#"{{"output_file":"{r}/a.h5","n_images":1}}"#);
    assert!(matches!(
        publish_request(&tag, None, body.as_bytes()).await,
        lapin::Confirmation::Ack(None)
    ));
    let status = loop {
        let s = tokio::time::timeout(WATCHDOG, observed.recv())
            .await
            .unwrap()
            .unwrap();
        if s.source == service_name(&tag) {
            break s;
        }
    };
    assert_eq!(
        (status.request_id.as_str(), status.action.as_str()),
        ("", action::REQUEST_FAIL)
    );
    assert_eq!(
        status.message,
        "the request has no correlation_id: the request id must travel as the AMQP correlation_id"
    );

    // A binding left from an earlier tag: refused (not written by the wrong agent), and removed.
    let (conn, ch) = test_channel().await;
    let queue = std_writer_agent::protocol::AgentQueues::for_service(&service_name(&tag)).requests;
    let old_tag = format!("{tag}.old");
    ch.queue_bind(
        queue.as_str().into(),
        "request".into(),
        old_tag.as_str().into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "done".into()).await;
    let err = client::send_request(
        &client_options(&old_tag),
        &client::new_request_id(),
        body.as_bytes(),
        |_| {},
    )
    .await
    .unwrap_err();
    let ClientError::Failed(status) = err else {
        panic!("expected a request_fail, got {err}")
    };
    assert_eq!(
        status.message,
        format!(
            "this agent serves tag {tag:?}, but the request came with routing key {old_tag:?} \
             through an old binding of its queue {queue} (was its tag changed?); the agent \
             removed that binding: send the request again"
        )
    );
    let again = client::write(&client_options(&old_tag), &serde_json::json!({}), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(again, ClientError::NoAgent(_)), "{again}");

    // Still serving on its first connection: a kill is answered.
    let unknown = client::new_request_id();
    client::kill(&opts, &unknown).await.unwrap();
    assert_eq!(
        next_for(&mut observed, &unknown).await.action,
        action::KILL_IGNORED
    );
    let state = agent.state.borrow().clone();
    assert_eq!(
        state,
        std_writer_agent::AgentState {
            connected: true,
            connections: 1,
            requests_finished: n_junk + 2,
            requests_succeeded: 0,
            requests_failed: n_junk + 2,
            requests_refused: n_junk + 2,
            requests_malformed: n_junk + 1,
            requests_redelivered: 0,
            requests_dead_lettered: 0,
            requests_queued: 0,
            queue_length: 0,
            triggers_published: 0,
            triggers_failed: 0,
        }
    );
    agent.stop().await;
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
}

/// A request published while the agent is down waits in the agent's durable queue (the broker
/// does not return it) and is written when the agent is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_while_the_agent_is_down_waits_and_is_written_when_it_is_back() {
    let (p, root, detector) = start_pipeline("agentdown").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("down");
    let policy = Policy::new(&root, 1000, false).unwrap();
    let agent = RunningAgent::start(&tag, &writer_endpoint(&p), policy.clone()).await;
    agent.stop_keeping_queues().await;

    let mut observed = observe_statuses().await;
    let file = root.join("waited.h5");
    let id = client::new_request_id();
    let body = serde_json::json!({"output_file": file, "n_images": 20}).to_string();
    assert!(matches!(
        publish_request(&tag, Some(&id), body.as_bytes()).await,
        lapin::Confirmation::Ack(None)
    ));
    let queues = std_writer_agent::protocol::AgentQueues::for_service(&service_name(&tag));
    assert_eq!(ready_messages(&queues.requests).await, 1);

    let agent = RunningAgent::start(&tag, &writer_endpoint(&p), policy).await;
    let start = next_for(&mut observed, &id).await;
    assert_eq!(start.action, action::REQUEST_START);
    let sim = simulate(&p, 60, 50.0);
    let done = loop {
        let s = next_for(&mut observed, &id).await;
        if s.is_final() {
            break s;
        }
    };
    sim.await.unwrap();
    assert_eq!(done.action, action::REQUEST_SUCCESS, "{done:?}");
    assert_eq!(
        done.message,
        format!("wrote 20 of 20 images to {}", file.display())
    );
    let report = verify_h5(&file, &detector, "").unwrap();
    assert_eq!(report["exact_images"], 20, "{report}");
    assert_eq!(agent.state.borrow().requests_redelivered, 0);
    agent.stop().await;
    stop_pipeline(p, &work).await;
}

/// A request queue that exists with other arguments (here: a classic queue of the same name)
/// stops the agent at once with an error naming the queue and what to do; it does not loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queue_with_other_arguments_stops_the_agent_with_a_clear_error() {
    let base = tempfile::tempdir().unwrap();
    let tag = unique_tag("mismatch");
    let _queues = QueuesGuard::new(&service_name(&tag));
    let queue = std_writer_agent::protocol::AgentQueues::for_service(&service_name(&tag)).requests;
    let (conn, ch) = test_channel().await;
    ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "done".into()).await;
    let settings = test_settings(
        &tag,
        &format!("ipc://{}/no-writer", base.path().display()),
        Policy::new(base.path(), 10, false).unwrap(),
    );
    let agent = std_writer_agent::Agent::new(settings).unwrap();
    let err = tokio::time::timeout(WATCHDOG, agent.run())
        .await
        .expect("the agent kept retrying")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "RabbitMQ refused to declare the queue {queue}: PRECONDITION_FAILED - inequivalent \
             arg 'x-dead-letter-exchange' for queue '{queue}' in vhost '/': received the value \
             'std-daq.dead-letter' of type 'longstr' but current is none. The queue exists with other arguments (made by \
             another std-daq version, with another --max-deliveries, or by someone else). Check \
             that it holds no request still needed (rabbitmqctl list_queues name messages), \
             delete it (rabbitmqctl delete_queue {queue}) and start the agent again, or give \
             this agent another --service-name"
        )
    );
}
