//! The processing trigger and the request's metadata and trace context, against the real
//! RabbitMQ and real pipelines: the real zocalo Dispatcher (zocalo 1.5.0 from the project's
//! .venv) turning the agent's end trigger into a recipe-wrapped message, the GDA scan message on
//! `amq.topic`, `traceparent` in statuses (body and header), the file and the trigger, refusals
//! of malformed ones, and triggers that cannot be delivered (the write still succeeds, the
//! status and the counters say so).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use std_daq_common::config::{ProcessingTrigger, TriggerMode};
use std_writer_agent::client::{self, ClientError};
use std_writer_agent::protocol::{action, exchange, header_text};
use std_writer_agent::trigger::TriggerSettings;
use std_writer_agent::{broker, Policy, StatusMessage};
use tokio::sync::mpsc;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A consumer of a fresh exclusive queue bound to `exchange` with `key` on `url`.
async fn bind_queue(url: &str, exchange: &str, key: &str) -> (lapin::Connection, lapin::Consumer) {
    let conn = broker::connect(url, "std-daq trigger test").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let name = format!("std-daq-test.trigger.{}", uuid::Uuid::new_v4());
    ch.queue_declare(
        name.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        name.as_str().into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let consumer = ch
        .basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (conn, consumer)
}

/// The next message of a consumer, with the watchdog.
async fn next_message(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(WATCHDOG, consumer.next())
        .await
        .expect("no message within the watchdog")
        .unwrap()
        .unwrap()
}

/// Every status on the `status` exchange with its `traceparent` header.
async fn observe_with_headers(
    url: &str,
) -> mpsc::UnboundedReceiver<(StatusMessage, Option<String>)> {
    let conn = broker::connect(url, "std-daq test observer").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    broker::declare_exchanges(&ch).await.unwrap();
    let mut consumer = broker::bind_own_queue(&ch, exchange::STATUS, "", true)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _keep = (conn, ch);
        while let Some(Ok(d)) = consumer.next().await {
            let header = header_text(&d.properties, "traceparent");
            if tx
                .send((StatusMessage::from_amqp(&d.properties, &d.data), header))
                .is_err()
            {
                break;
            }
        }
    });
    rx
}

/// Statuses of `id` until its final one, each with its traceparent header.
async fn statuses_until_final(
    rx: &mut mpsc::UnboundedReceiver<(StatusMessage, Option<String>)>,
    id: &str,
) -> Vec<(StatusMessage, Option<String>)> {
    let mut seen = Vec::new();
    loop {
        let (s, h) = tokio::time::timeout(WATCHDOG, rx.recv())
            .await
            .expect("no status within the watchdog")
            .unwrap();
        if s.request_id != id {
            continue;
        }
        let last = s.is_final();
        seen.push((s, h));
        if last {
            return seen;
        }
    }
}

/// A string attribute of the file's root, read with h5py.
fn file_attr(file: &Path, name: &str) -> String {
    let out = Command::new(std_daq_tests::python())
        .arg("-c")
        .arg(format!(
            "import h5py, sys; v = h5py.File({:?}).attrs[{name:?}]; \
             sys.stdout.write(v.decode() if isinstance(v, bytes) else str(v))",
            file.display().to_string()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "h5py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn trigger_settings(mode: TriggerMode, on_start: bool, attempts: u32) -> TriggerSettings {
    let mut t = TriggerSettings::new(
        ProcessingTrigger {
            mode,
            on_start,
            on_end: true,
            attempts,
        },
        "jf-test",
    );
    t.first_backoff = Duration::from_millis(50);
    t
}

/// Topic mode with start and end events: a queue bound to `amq.topic` with the configured key
/// gets the GDA scan message STARTED, then FINISHED, each with the request's traceparent header;
/// every status of the request carries the traceparent (body and header) and the metadata; the
/// file has both as attributes; the final status reports both triggers published and the
/// counter counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_trigger_sends_the_gda_scan_message_with_the_trace_context() {
    let (p, root, detector) = start_pipeline("trigtopic").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("trigtopic");
    let key = format!("gda.messages.scan.{tag}");
    let (_topic_conn, mut scans) = bind_queue(BROKER, "amq.topic", &key).await;
    let mut settings = test_settings(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, true).unwrap(),
    );
    let mut trigger = trigger_settings(
        TriggerMode::Topic {
            exchange: "amq.topic".into(),
            routing_key: key.clone(),
        },
        true,
        3,
    );
    trigger.detector_name = detector.clone();
    settings.trigger = Some(trigger);
    let agent = RunningAgent::start_with(settings).await;
    let mut observed = observe_with_headers(BROKER).await;

    let file = root.join("visit/scan-7.h5");
    let id = client::new_request_id();
    let body = serde_json::json!({
        "output_file": file, "n_images": 20,
        "metadata": {"scan_number": 7, "ispyb_dcid": 123456, "visit_directory": "/dls/i03/data/2026/cm1-1"},
    });
    let request = {
        let (opts, id, body) = (client_options(&tag), id.clone(), body.to_string());
        tokio::spawn(async move {
            client::send_request_traced(&opts, &id, body.as_bytes(), Some(TP), |_| {}).await
        })
    };
    // The start trigger comes after request_start; the images only after it.
    let started = next_message(&mut scans).await;
    let sim = simulate(&p, 60, 100.0);
    let finished = next_message(&mut scans).await;
    let done = request.await.unwrap().unwrap();
    sim.await.unwrap();

    for (delivery, status, percentage) in
        [(&started, "STARTED", 0.0), (&finished, "FINISHED", 100.0)]
    {
        let msg: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
        // The start says what was asked for, the end what the file holds.
        let frames = 20;
        assert_eq!(
            msg,
            serde_json::json!({
                "status": status, "filePath": file, "visitDirectory": "/dls/i03/data/2026/cm1-1",
                "swmrStatus": "INACTIVE", "scanNumber": 7, "scanDimensions": [frames],
                "scannables": [], "detectors": [detector], "percentageComplete": percentage,
                "processingRequest": {},
            })
        );
        assert_eq!(
            header_text(&delivery.properties, "traceparent").as_deref(),
            Some(TP)
        );
        assert_eq!(delivery.properties.delivery_mode(), &Some(2));
        assert_eq!(delivery.routing_key.as_str(), key);
    }

    // Every status of the request carries the trace context, in the body and as a header.
    let statuses = statuses_until_final(&mut observed, &id).await;
    assert!(statuses.len() >= 2, "{statuses:?}");
    for (s, header) in &statuses {
        assert_eq!(header.as_deref(), Some(TP), "{s:?}");
        assert_eq!(s.body["traceparent"], TP, "{s:?}");
        assert_eq!(s.body["metadata"]["ispyb_dcid"], 123456, "{s:?}");
    }
    assert_eq!(done.action, action::REQUEST_SUCCESS);
    assert_eq!(
        done.body["trigger"]["start"]["published"], true,
        "{}",
        done.body
    );
    assert_eq!(
        done.body["trigger"]["end"]["published"], true,
        "{}",
        done.body
    );
    assert_eq!(done.body["trigger"]["end"]["attempts"], 1, "{}", done.body);
    let state = agent.state.borrow().clone();
    assert_eq!((state.triggers_published, state.triggers_failed), (2, 0));

    // The file keeps both.
    assert_eq!(file_attr(&file, "traceparent"), TP);
    let meta: serde_json::Value = serde_json::from_str(&file_attr(&file, "metadata")).unwrap();
    assert_eq!(meta, body["metadata"]);
    assert_eq!(file_attr(&file, "request_id"), id);

    agent.stop().await;
    stop_pipeline(p, &work).await;
}

/// Triggers that cannot be delivered: a zocalo queue that does not exist (the mandatory publish
/// comes back) and a topic exchange that does not exist (the broker closes the publishing
/// channel). Each write still succeeds with its complete file; its final status says the trigger
/// was not published and why, after the configured attempts; `triggers_failed` counts them; the
/// agent goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_that_cannot_be_delivered_never_fails_the_write() {
    let (p, root, detector) = start_pipeline("trigfail").await;
    let work = root.parent().unwrap().to_path_buf();
    let mut frame = 1;
    for (name, mode, expect) in [
        (
            "noqueue",
            TriggerMode::Zocalo {
                queue: format!("std-daq-test.no-such-queue.{}", std::process::id()),
                recipes: vec!["x".into()],
            },
            "RabbitMQ returned the message sent to queue std-daq-test.no-such-queue.",
        ),
        (
            "noexchange",
            TriggerMode::Topic {
                exchange: format!("std-daq-test.no-such-exchange.{}", std::process::id()),
                routing_key: "gda.messages.scan".into(),
            },
            "NOT_FOUND - no exchange 'std-daq-test.no-such-exchange.",
        ),
    ] {
        let tag = unique_tag(&format!("trigfail-{name}"));
        let mut settings = test_settings(
            &tag,
            &writer_endpoint(&p),
            Policy::new(&root, 1000, true).unwrap(),
        );
        settings.trigger = Some(trigger_settings(mode, false, 2));
        let agent = RunningAgent::start_with(settings).await;
        let mut observed = observe_statuses().await;
        let file = root.join(format!("{name}.h5"));
        let id = client::new_request_id();
        let request = {
            let (opts, id) = (client_options(&tag), id.clone());
            let body = serde_json::json!({"output_file": file, "n_images": 10}).to_string();
            tokio::spawn(
                async move { client::send_request(&opts, &id, body.as_bytes(), |_| {}).await },
            )
        };
        assert_eq!(
            next_for(&mut observed, &id).await.action,
            action::REQUEST_START
        );
        let sim = simulate_from(&p, 30, 100.0, frame);
        frame += 1000;
        let done = request.await.unwrap().unwrap();
        sim.await.unwrap();
        assert_eq!(done.action, action::REQUEST_SUCCESS, "{name}");
        assert_eq!(done.body["images_written"], 10);
        let end = &done.body["trigger"]["end"];
        assert_eq!(end["published"], false, "{name}: {}", done.body);
        assert_eq!(end["attempts"], 2, "{name}: {}", done.body);
        let error = end["error"].as_str().unwrap();
        assert!(error.contains(expect), "{name}: {error}");
        assert!(done.body["trigger"].get("start").is_none());
        let report = std_daq_tests::verify_h5(&file, &detector, "").unwrap();
        assert_eq!(report["images"], 10, "{report}");
        let state = agent.state.borrow().clone();
        assert_eq!((state.triggers_published, state.triggers_failed), (0, 1));
        assert_eq!(state.requests_succeeded, 1);
        assert!(state.connected, "the agent lost its connection: {state:?}");
        agent.stop().await;
    }
    stop_pipeline(p, &work).await;
}

/// Malformed trace contexts and metadata are refused with request_fail saying why, before
/// anything is written; a refused request's status has no traceparent header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_traceparent_and_metadata_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let tag = unique_tag("trigrefuse");
    // The writer is never asked: every request here fails the checks first.
    let agent = RunningAgent::start(
        &tag,
        "ipc:///nonexistent/std-daq-test-writer",
        Policy::new(&root, 1000, true).unwrap(),
    )
    .await;
    let mut observed = observe_with_headers(BROKER).await;
    let file = root.join("a.h5");
    let other = "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01";
    let cases: Vec<(serde_json::Value, Option<&str>, String)> = vec![
        (
            serde_json::json!({"output_file": file, "n_images": 1}),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"),
            "the AMQP header traceparent must be a W3C trace context 00-<32 hex trace id>-<16 hex \
             parent id>-<2 hex flags> (lowercase, ids not all zero): it needs 4 fields separated \
             by '-'; got \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7\""
                .into(),
        ),
        (
            serde_json::json!({"output_file": file, "n_images": 1,
                               "traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"}),
            None,
            "traceparent must be a W3C trace context 00-<32 hex trace id>-<16 hex parent id>-<2 \
             hex flags> (lowercase, ids not all zero): the trace id must not be all zeros; got \
             \"00-00000000000000000000000000000000-00f067aa0ba902b7-01\""
                .into(),
        ),
        (
            serde_json::json!({"output_file": file, "n_images": 1, "traceparent": other}),
            Some(TP),
            format!(
                "the AMQP header traceparent ({TP}) and the request's traceparent field ({other}) \
                 differ: send one of them, or the same in both"
            ),
        ),
        (
            serde_json::json!({"output_file": file, "n_images": 1, "metadata": ["dcid", 5]}),
            None,
            "metadata must be a JSON object (e.g. {\"dcid\": 12345, \"scan_id\": \"s-42\"}) or \
             null, got [\"dcid\",5]"
                .into(),
        ),
    ];
    for (body, header, message) in cases {
        let id = client::new_request_id();
        let result = client::send_request_traced(
            &client_options(&tag),
            &id,
            body.to_string().as_bytes(),
            header,
            |_| {},
        )
        .await;
        let Err(ClientError::Failed(fail)) = result else {
            panic!("{body}: {result:?}")
        };
        assert_eq!(fail.action, action::REQUEST_FAIL);
        assert_eq!(fail.message, message);
        let statuses = statuses_until_final(&mut observed, &id).await;
        assert_eq!(statuses.len(), 1, "{statuses:?}");
        // A malformed or disputed trace context is not passed on.
        if body.get("traceparent").is_none() || header.is_none() {
            assert_eq!(statuses[0].1, None, "{statuses:?}");
        }
    }
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    let state = agent.state.borrow().clone();
    assert_eq!(state.requests_refused, 4);
    assert_eq!(state.requests_malformed, 0);
    agent.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The real zocalo Dispatcher.

/// The project's virtual environment (scripts/setup.sh), with zocalo 1.5.0 and workflows 3.3.
fn venv_bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.venv/bin")
        .join(name)
}

/// Runs `rabbitmqctl` with `args`; panics with its output when it fails.
fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A vhost of this test's own (the Dispatcher consumes the fixed queue `processing_recipe`: in
/// its own vhost it never takes another user's messages, nor this test's another's), deleted on
/// drop.
struct Vhost(String);

impl Vhost {
    fn create(name: &str) -> Self {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", name])
            .output();
        rabbitmqctl(&["add_vhost", name]);
        rabbitmqctl(&["set_permissions", "-p", name, "guest", ".*", ".*", ".*"]);
        Vhost(name.into())
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.0])
            .output();
    }
}

/// A child process killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How many consumers `queue` has (passive declare).
async fn consumers(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .consumer_count()
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// The agent binary, configured by the detector config key `processing_trigger` (zocalo mode),
/// writes a file; the real zocalo Dispatcher takes the end trigger from `processing_recipe`,
/// loads the test's recipe and sends the recipe-wrapped message to the test's queue, with the
/// file name and the frame count filled in. The agent logs the request's traceparent on its
/// lines and counts the trigger in /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zocalo_dispatcher_runs_the_recipe_of_the_end_trigger() {
    let dispatcher_bin = venv_bin("zocalo.service");
    if !dispatcher_bin.exists() {
        let why = format!(
            "{} is missing: run scripts/setup.sh (it installs python/requirements.txt, with \
             zocalo, into .venv)",
            dispatcher_bin.display()
        );
        assert!(std::env::var("CI").is_err(), "{why}");
        eprintln!("skipped: {why}");
        return;
    }
    let (p, root, detector) = start_pipeline("trigzocalo").await;
    let work = root.parent().unwrap().to_path_buf();
    let vhost = Vhost::create(&format!("std-daq-test-zocalo-{}", std::process::id()));
    let url = vhost.url();

    // What the Dispatcher needs before it starts: the fanout exchanges of every workflows
    // service, its queue, and the queue our recipe sends to.
    let conn = broker::connect(&url, "std-daq zocalo test").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    for name in ["command", "transient.status"] {
        ch.exchange_declare(
            name.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let out_queue = "stddaq.test.processing";
    for queue in ["processing_recipe", out_queue] {
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let recipes = work.join("recipes");
    std::fs::create_dir_all(&recipes).unwrap();
    let recipe = serde_json::json!({
        "1": {"service": "std-daq test consumer", "queue": out_queue,
              "parameters": {"file": "{filename}", "frames": "{number_of_frames}",
                             "event": "{event}", "dcid": "{ispyb_dcid}"}},
        "start": [[1, {"from": "std-daq"}]],
    });
    std::fs::write(recipes.join("stddaq-test.json"), recipe.to_string()).unwrap();
    let zocalo_config = work.join("zocalo.yml");
    std::fs::write(
        &zocalo_config,
        format!(
            "version: 1\n\
             rabbit-local:\n  plugin: pika\n  host: 127.0.0.1\n  port: 5672\n  username: guest\n  \
             password: guest\n  vhost: {}\n\
             storage:\n  plugin: storage\n  zocalo.recipe_directory: {}\n\
             environments:\n  default:\n    plugins: [rabbit-local, storage]\n",
            vhost.0,
            recipes.display()
        ),
    )
    .unwrap();
    let dispatcher_log = work.join("dispatcher.log");
    let _dispatcher = Proc(
        Command::new(&dispatcher_bin)
            .args(["-s", "Dispatcher"])
            .env("ZOCALO_CONFIG", &zocalo_config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(work.join("dispatcher.out")).unwrap())
            .stderr(std::fs::File::create(&dispatcher_log).unwrap())
            .spawn()
            .unwrap(),
    );
    // Ready when it consumes processing_recipe (polled: a real condition, the watchdog only
    // bounds it).
    let deadline = Instant::now() + WATCHDOG;
    while consumers(&ch, "processing_recipe").await == 0 {
        assert!(
            Instant::now() < deadline,
            "the Dispatcher did not consume processing_recipe: {}",
            std::fs::read_to_string(&dispatcher_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut processed = ch
        .basic_consume(
            out_queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();

    // The agent binary with the trigger in its detector config.
    let mut config = p.config.raw.clone();
    config["processing_trigger"] = serde_json::json!({
        "mode": "zocalo", "recipes": ["stddaq-test"], "events": ["end"],
    });
    let config_file = work.join("agent-config.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let tag = unique_tag("trigzocalo");
    let metrics_port = free_port();
    let mut agent = Proc(
        Command::new(env!("CARGO_BIN_EXE_std-writer-agent"))
            .arg("--config")
            .arg(&config_file)
            .arg("--output-root")
            .arg(&root)
            .args(["--tag", &tag, "--service-name", &service_name(&tag)])
            .args(["--broker", &url, "--poll-ms", "50", "--progress-ms", "200"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .arg("--create-dirs")
            .env("REDIS_SKIP", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (line_tx, mut lines) = mpsc::unbounded_channel::<String>();
    let stderr = agent.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("[agent] {line}");
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    wait_log(&mut lines, "serving write requests").await;

    let mut observed = observe_with_headers(&url).await;
    let file = root.join("zocalo/run-1.h5");
    let id = client::new_request_id();
    let body = serde_json::json!({
        "output_file": file, "n_images": 20, "metadata": {"ispyb_dcid": 987654},
    });
    let request = {
        let mut opts = client_options(&tag);
        opts.broker_url = url.clone();
        let (id, body) = (id.clone(), body.to_string());
        tokio::spawn(async move {
            client::send_request_traced(&opts, &id, body.as_bytes(), Some(TP), |_| {}).await
        })
    };
    let start = statuses_until_first(&mut observed, &id).await;
    assert_eq!(start.0.action, action::REQUEST_START, "{:?}", start.0);
    let sim = simulate(&p, 60, 100.0);
    let done = request.await.unwrap().unwrap();
    sim.await.unwrap();
    assert_eq!(done.action, action::REQUEST_SUCCESS, "{done:?}");
    assert_eq!(
        done.body["trigger"]["end"]["published"], true,
        "{}",
        done.body
    );
    let report = std_daq_tests::verify_h5(&file, &detector, "").unwrap();
    assert_eq!(report["images"], 20, "{report}");

    // What the Dispatcher made of it: the recipe-wrapped message of step 1.
    let wrapped = next_message(&mut processed).await;
    let headers = wrapped.properties.headers().clone().unwrap_or_default();
    let flag = headers.inner().get("workflows-recipe").cloned();
    assert!(
        matches!(flag, Some(AMQPValue::Boolean(true)))
            || matches!(&flag, Some(AMQPValue::LongString(s)) if s.to_string().eq_ignore_ascii_case("true")),
        "workflows-recipe header: {flag:?}"
    );
    let msg: serde_json::Value = serde_json::from_slice(&wrapped.data).unwrap();
    assert_eq!(msg["recipe-pointer"], 1, "{msg}");
    assert_eq!(
        msg["payload"],
        serde_json::json!({"from": "std-daq"}),
        "{msg}"
    );
    let params = &msg["recipe"]["1"]["parameters"];
    assert_eq!(params["file"], file.display().to_string(), "{msg}");
    // The Dispatcher fills placeholders in as text.
    assert_eq!(params["frames"], "20", "{msg}");
    assert_eq!(params["event"], "end", "{msg}");
    assert_eq!(params["dcid"], "987654", "{msg}");
    assert!(msg["environment"]["ID"].is_string(), "{msg}");

    // The agent's lines about the request carry its trace context; /metrics counts the trigger.
    let line = wait_log(&mut lines, "processing trigger published").await;
    assert!(line.contains(&format!("traceparent={TP}")), "{line}");
    assert!(line.contains(&id), "{line}");
    let metrics = http_get(metrics_port, "/metrics");
    let sample = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("std_daq_{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .map(String::from)
    };
    assert_eq!(
        sample("triggers_published").as_deref(),
        Some("1"),
        "{metrics}"
    );
    assert_eq!(sample("triggers_failed").as_deref(), Some("0"), "{metrics}");

    let _ = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || {
        let _ = agent.0.wait();
    })
    .await;
    drop(conn);
    stop_pipeline(p, &work).await;
    drop(vhost);
}

/// The first status of `id`.
async fn statuses_until_first(
    rx: &mut mpsc::UnboundedReceiver<(StatusMessage, Option<String>)>,
    id: &str,
) -> (StatusMessage, Option<String>) {
    loop {
        let (s, h) = tokio::time::timeout(WATCHDOG, rx.recv())
            .await
            .expect("no status within the watchdog")
            .unwrap();
        if s.request_id == id {
            return (s, h);
        }
    }
}

/// The next line containing `needle` (earlier ones are skipped), with the watchdog.
async fn wait_log(lines: &mut mpsc::UnboundedReceiver<String>, needle: &str) -> String {
    loop {
        let line = tokio::time::timeout(WATCHDOG, lines.recv())
            .await
            .unwrap_or_else(|_| panic!("no log line with {needle:?}"))
            .unwrap_or_else(|| panic!("the agent's log ended before {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}
