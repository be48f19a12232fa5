//! The HTTP control API (`std-daq api`) in front of a real agent, broker and pipeline: an
//! asynchronous write produces an exact file and its statuses, a kill stops a write honestly,
//! a bad request is a 400 with the agent's words, and the docs are served.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use std_writer_agent::Policy;

/// A minimal HTTP/1.1 client: (status code, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    http_with(port, method, path, body, "")
}

/// [`http`] with extra header lines (`"Name: value\r\n"` each).
fn http_with(port: u16, method: &str, path: &str, body: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn wait_status(
    port: u16,
    id: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        let (code, body) = http(port, "GET", &format!("/status/{id}"), "");
        assert_eq!(code, 200, "{body}");
        let v = json(&body);
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "status of {id} stuck at {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Api(Child);
impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_write_kill_and_refusal_behave_like_the_agent() {
    let (p, root, detector) = start_pipeline("http").await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("http");
    let agent = RunningAgent::start(
        &tag,
        &writer_endpoint(&p),
        Policy::new(&root, 1000, false).unwrap(),
    )
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _api = Api(Command::new(
        std_daq::pipeline::default_bin_dir()
            .unwrap()
            .join("std-daq"),
    )
    .args([
        "api",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--tag",
        &tag,
        "--broker",
        BROKER,
    ])
    .arg("--config")
    .arg(&p.config_path)
    .stdin(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap());
    let deadline = Instant::now() + WATCHDOG;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the API did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, docs) = http(port, "GET", "/docs", "");
    assert!(code == 200 && docs.contains("write_async"), "{docs}");
    let (code, spec) = http(port, "GET", "/openapi.json", "");
    assert_eq!(code, 200);
    assert!(json(&spec)["paths"]["/write_sync"]["post"].is_object());
    let (code, config) = http(port, "GET", "/config", "");
    assert_eq!(
        (code, json(&config)["detector_name"].as_str()),
        (200, Some(detector.as_str()))
    );

    // A bad request: 400 with exactly the agent's request_fail message, nothing written.
    let (code, body) = http(
        port,
        "POST",
        "/write_sync",
        r#"{"output_file": "rel.h5", "n_images": 5}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        json(&body)["error"],
        "output_file \"rel.h5\" must be an absolute path"
    );

    // The HTTP traceparent header goes on to the agent (as the AMQP header), on our routes and
    // PSI's: a malformed one is refused by the agent, with its words.
    let bad_tp = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7\r\n";
    let tp_body = serde_json::json!({"output_file": root.join("tp.h5"), "n_images": 5}).to_string();
    let (code, body) = http_with(port, "POST", "/write_sync", &tp_body, bad_tp);
    assert_eq!(code, 400, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .starts_with("the AMQP header traceparent must be a W3C trace context"),
        "{body}"
    );
    let (code, body) = http_with(port, "POST", "/writer/write_sync", &tp_body, bad_tp);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["status"], "error", "{body}");
    assert!(
        body.contains("the AMQP header traceparent must be a W3C trace context"),
        "{body}"
    );
    assert!(!root.join("tp.h5").exists());

    // An asynchronous write: 202 with an id, then the statuses up to success, and an exact file;
    // its HTTP traceparent is the request's trace context.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let file = root.join("http.h5");
    let (code, body) = http_with(
        port,
        "POST",
        "/write_async",
        &serde_json::json!({"output_file": file, "n_images": 30}).to_string(),
        &format!("traceparent: {tp}\r\n"),
    );
    assert_eq!(code, 202, "{body}");
    let id = json(&body)["request_id"].as_str().unwrap().to_string();
    wait_status(port, &id, |v| v["action"] == "request_start");
    simulate(&p, 60, 50.0).await.unwrap();
    let done = wait_status(port, &id, |v| {
        v["action"] == "request_success" || v["action"] == "request_fail"
    });
    assert_eq!(done["action"], "request_success", "{done}");
    assert_eq!(done["body"]["traceparent"], tp, "{done}");
    let report = std_daq_tests::verify_h5(&file, &detector, "").unwrap();
    assert_eq!(report["exact_images"], 30, "{report}");

    // A kill through the API: request_fail saying it was killed after k of n images.
    let killed = root.join("killed.h5");
    let (code, body) = http(
        port,
        "POST",
        "/write_async",
        &serde_json::json!({"output_file": killed, "n_images": 500}).to_string(),
    );
    assert_eq!(code, 202, "{body}");
    let id = json(&body)["request_id"].as_str().unwrap().to_string();
    wait_status(port, &id, |v| v["action"] == "request_start");
    let sim = simulate(&p, 300, 50.0);
    wait_status(port, &id, |v| {
        v["body"]["images_written"].as_u64().unwrap_or(0) >= 10
    });
    let (code, body) = http(
        port,
        "POST",
        "/write_kill",
        &serde_json::json!({"request_id": id}).to_string(),
    );
    assert_eq!(code, 200, "{body}");
    let end = wait_status(port, &id, |v| {
        v["action"] == "request_fail" || v["action"] == "request_success"
    });
    assert_eq!(end["action"], "request_fail", "{end}");
    let message = end["message"].as_str().unwrap();
    assert!(message.starts_with("killed after "), "{message}");
    sim.await.unwrap();
    let k = end["body"]["images_written"].as_u64().unwrap();
    let report = std_daq_tests::verify_h5(&killed, &detector, "").unwrap();
    assert_eq!(
        (report["images"].as_u64(), report["exact_images"].as_u64()),
        (Some(k), Some(k)),
        "{report}"
    );

    agent.stop().await;
    stop_pipeline(p, &work).await;
}
