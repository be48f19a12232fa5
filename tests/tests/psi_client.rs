//! PSI's own `std-daq-client` (1.3.5 from PyPI, in the project's .venv, unchanged) against the
//! real services: `std-daq up --watch-config` with the writer agent, `std-daq api`, the
//! simulator. tests/python/psi_client.py drives the client and prints a JSON report; this test
//! checks it, the files (pixel-exact, and compressed as the config set through the client says),
//! the config in Redis, and that the acquisition logs survive an API restart.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std_daq::pipeline::{config_json, SimulatedDetector};
use std_daq_common::DetectorConfig;
use std_daq_tests::stack::{poll_until, start_api, venv_python, Stack, WATCHDOG};

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    poll_until(what, WATCHDOG, || done().then_some(())).unwrap()
}

fn http_get(port: u16, path: &str) -> serde_json::Value {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The stack with `std-daq up --watch-config`, once up watches the config.
fn start(tag: &str) -> Stack {
    let mut s = Stack::start(
        tag,
        &["--watch-config", "--applied-config", "{work}/applied.json"],
    )
    .unwrap();
    wait_for("std-daq up watching the config", || {
        s.field("up", "config_id").is_some()
    });
    s
}

fn run_script(s: &Stack, part: &str) -> serde_json::Value {
    let python = venv_python().unwrap();
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/psi_client.py"))
        .args(["--url", &format!("http://127.0.0.1:{}", s.port)])
        .arg("--root")
        .arg(&s.root)
        .arg("--sim")
        .arg(s.simulator().unwrap())
        .arg("--sim-config")
        .arg(&s.config_path)
        .args(["--part", part])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    let report: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {stdout}\nstderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success(),
        "psi_client.py failed: {report}\nstderr {}\nup log: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(s.work.join("up.log")).unwrap_or_default()
    );
    report
}

#[test]
fn psi_std_daq_client_drives_us_unchanged() {
    let mut s = start("psic");
    let det = s.cfg.detector_name.clone();
    let r = run_script(&s, "main");

    // get_config: the config up runs with; an invalid set_config is refused with our message
    // naming the key and changes nothing.
    assert_eq!(r["config"], s.cfg.raw, "{r}");
    let invalid = r["invalid_config"].as_str().unwrap();
    assert_eq!(
        invalid,
        "config HTTP POST /daq/config: key `bit_depth`: 12 is not valid for jungfrau-raw \
         (allowed: [16])"
    );
    assert_eq!(r["config_after_invalid"], s.cfg.raw);
    // A valid change is read back and applied by up: the writer restarted on it.
    let mut expected = s.cfg.raw.clone();
    expected["compression"] = "bitshuffle-lz4".into();
    expected["writer_user_id"] = 0.into();
    assert_eq!(r["set_config"], expected);
    assert_eq!(r["config_after_valid"], expected);
    let d = &r["deployment"];
    assert_eq!(d["status"], "SUCCESS", "{d}");
    assert_eq!(d["servers"]["std-h5-writer"], "Done", "{d}");
    assert!(
        d["servers"].get("std-udp-recv-0").is_none() && d["servers"].get("std-assembler").is_none(),
        "only the writer depends on compression: {d}"
    );
    assert_eq!(r["deployment_last"], *d);
    let stored: String = redis::cmd("GET")
        .arg(format!("config.std-daq.{det}.h5-writer"))
        .query(&mut s.redis)
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stored).unwrap(),
        expected
    );
    let running: String = redis::cmd("HGET")
        .arg(format!("status.std-daq.{det}.h5-writer"))
        .arg("config")
        .query(&mut s.redis)
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&running).unwrap(),
        expected
    );

    // start_writer_async, get_status until finished: the file is exact, and compressed.
    assert_eq!(r["async_started"]["state"], "WRITING", "{r}");
    let fin = &r["async_final"];
    assert_eq!(fin["state"], "READY", "{fin}");
    let acq = &fin["acquisition"];
    assert_eq!(
        (&acq["state"], &acq["message"]),
        (&"FINISHED".into(), &"Completed.".into()),
        "{fin}"
    );
    assert_eq!(acq["stats"]["n_write_completed"], 20);
    assert_eq!(acq["info"]["n_images"], 20);
    assert!(acq["info"]["run_id"].as_u64().is_some(), "{acq}");
    assert!(acq["stats"]["stop_time"].as_f64() >= acq["stats"]["start_time"].as_f64());
    let async_file = PathBuf::from(r["async_file"].as_str().unwrap());
    let report = std_daq_tests::verify_h5(&async_file, &det, "").unwrap();
    assert_eq!(report["exact_images"], 20, "{report}");
    assert_eq!(
        std_daq_tests::data_filters(&async_file, &det).unwrap(),
        serde_json::json!({"32008": [0, 3, 2, 0, 2]}),
        "the services run with the config set through the client"
    );

    // start_writer_sync: answered when the file is complete.
    let sync = &r["sync"]["acquisition"];
    assert_eq!(
        (&sync["state"], &sync["message"]),
        (&"FINISHED".into(), &"Completed.".into()),
        "{r}"
    );
    assert_eq!(
        (&sync["stats"]["n_write_completed"], &sync["info"]["run_id"]),
        (&15.into(), &4242.into())
    );
    let sync_file = PathBuf::from(r["sync_file"].as_str().unwrap());
    let report = std_daq_tests::verify_h5(&sync_file, &det, "").unwrap();
    assert_eq!(report["exact_images"], 15, "{report}");

    // stop_writer on a bounded write: FINISHED, "Interrupted." with the agent's words, and the
    // file holds exactly the images written.
    let stopped = &r["stopped"];
    assert_eq!(stopped["state"], "READY", "{stopped}");
    let st = &stopped["acquisition"];
    assert_eq!(st["state"], "FINISHED", "{stopped}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .starts_with("Interrupted. killed after "),
        "{stopped}"
    );
    let k = st["stats"]["n_write_completed"].as_u64().unwrap();
    assert!((10..5000).contains(&k), "{stopped}");
    let stopped_file = PathBuf::from(r["stopped_file"].as_str().unwrap());
    let report = std_daq_tests::verify_h5(&stopped_file, &det, "").unwrap();
    assert_eq!(
        (report["images"].as_u64(), report["exact_images"].as_u64()),
        (Some(k), Some(k)),
        "{report}"
    );

    // A refused write: the client's exception with the agent's words; the last acquisition stays.
    assert_eq!(
        r["refused_write"],
        "output_file \"relative.h5\" must be an absolute path"
    );
    assert_eq!(r["status_after_refusal"]["acquisition"], *st);
    assert!(!s.root.join("relative.h5").exists());

    // get_stats: PSI's shape, rates from the services' status.
    for side in ["detector", "writer"] {
        for k in ["bytes_per_second", "images_per_second"] {
            let v = r["stats"][side][k].as_f64().unwrap_or(-1.0);
            assert!(v >= 0.0 && v.is_finite(), "{side}.{k}: {}", r["stats"]);
        }
    }

    // get_logs: the three acquisitions, oldest first, as get_status showed them.
    let logs = r["logs"].as_array().unwrap();
    assert_eq!(logs.len(), 3, "{logs:?}");
    assert_eq!(logs[0], *acq);
    assert_eq!(logs[1], *sync);
    assert_eq!(logs[2], *st);
    assert_eq!(r["logs_1"], serde_json::json!([st]));

    // A config that reaches up invalid (written to the stream by hand) changes nothing: up
    // validates it again and its deployment record says why.
    let mut bad = expected.clone();
    bad["bit_depth"] = 12.into();
    let bad_id: String = redis::cmd("XADD")
        .arg(std_daq::deploy::configs_key(&det))
        .arg("*")
        .arg("json")
        .arg(bad.to_string())
        .query(&mut s.redis)
        .unwrap();
    let mut record = serde_json::Value::Null;
    wait_for("up to refuse the invalid config", || {
        let text: Option<String> = redis::cmd("GET")
            .arg(std_daq::deploy::deployment_key(&det))
            .query(&mut s.redis)
            .unwrap();
        record = text
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        record["config_id"] == bad_id.as_str()
    });
    assert_eq!(record["status"], "FAILED", "{record}");
    assert!(
        record["message"]
            .as_str()
            .unwrap()
            .contains("key `bit_depth`"),
        "{record}"
    );
    let applied: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.work.join("applied.json")).unwrap())
            .unwrap();
    assert_eq!(applied, expected, "the applied config is unchanged");

    // The logs are in Redis: a restarted API still has them.
    s.start_api().unwrap();
    let port = s.port;
    let again = http_get(port, "/daq/logs/5");
    assert_eq!(again["status"], "ok");
    assert_eq!(again["logs"], r["logs"]);
    // PSI's envelope for an unknown log count.
    assert_eq!(http_get(port, "/daq/logs/x")["status"], "error");

    stop(s);
}

/// Needs the writer agent's unbounded writes (a request without n_images): until they are
/// merged the agent refuses the request and this test fails at `start_writer_async`.
#[test]
fn psi_stop_writer_ends_an_unbounded_write() {
    let s = start("psiu");
    let det = s.cfg.detector_name.clone();
    let r = run_script(&s, "unbounded");
    let stopped = &r["unbounded_stopped"];
    assert_eq!(stopped["state"], "READY", "{r}");
    let acq = &stopped["acquisition"];
    assert_eq!(acq["state"], "FINISHED", "{r}");
    let k = acq["stats"]["n_write_completed"].as_u64().unwrap();
    assert!(k >= 10, "{r}");
    let file = PathBuf::from(r["unbounded_file"].as_str().unwrap());
    let report = std_daq_tests::verify_h5(&file, &det, "").unwrap();
    assert_eq!(
        (report["images"].as_u64(), report["exact_images"].as_u64()),
        (Some(k), Some(k)),
        "{report}"
    );
    assert_eq!(r["logs_1"][0], *acq);
    stop(s);
}

fn stop(mut s: Stack) {
    let det = s.cfg.detector_name.clone();
    drop(s.api.take());
    drop(s.up.take());
    for key in [
        std_daq::deploy::configs_key(&det),
        std_daq::deploy::deployment_key(&det),
        std_daq::deploy::logs_key(&det),
    ]
    .into_iter()
    .chain(
        std_daq::deploy::service_names(&s.cfg)
            .into_iter()
            .map(|n| format!("config.{n}")),
    ) {
        let _: () = redis::cmd("DEL").arg(key).query(&mut s.redis).unwrap();
    }
    assert!(
        std_daq::pipeline::leftovers(&s.cfg).is_empty(),
        "{:?}",
        std_daq::pipeline::leftovers(&s.cfg)
    );
    std::fs::remove_dir_all(&s.work).unwrap();
}

fn http_post(port: u16, path: &str, body: &str) -> serde_json::Value {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Without `std-daq up --watch-config` (and without an agent): a config is stored and the answer
/// names what must be restarted; the detector name cannot change; a write has no agent to go to.
#[test]
fn without_a_supervisor_a_config_is_stored_and_names_the_restarts() {
    let opts = std_daq_tests::options("psin").unwrap();
    let work = opts.work_dir.clone();
    std::fs::create_dir_all(&work).unwrap();
    let config_path = work.join("detector.json");
    let json = config_json(&opts, SimulatedDetector::Jungfrau);
    std::fs::write(&config_path, json.to_string()).unwrap();
    let cfg = DetectorConfig::from_file(&config_path).unwrap();
    let det = cfg.detector_name.clone();
    let port = std_daq_tests::free_port().unwrap();
    let api = start_api(&work, &config_path, &det, port).unwrap();

    let r = http_post(port, "/daq/config", r#"{"detector_name": "other"}"#);
    assert_eq!(r["status"], "error", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("key `detector_name`"),
        "{r}"
    );
    let r = http_post(port, "/daq/config", "[1, 2]");
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(
        http_get(port, "/daq/config")["config"],
        cfg.raw,
        "nothing changed"
    );

    let r = http_post(port, "/daq/config", r#"{"writer_user_id": 5}"#);
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(
        http_get(port, "/daq/deployment")["deployment"]["status"],
        "SUCCESS"
    );
    let r = http_post(
        port,
        "/daq/config",
        r#"{"frame_timeout_ms": 50, "writer_user_id": null}"#,
    );
    assert_eq!(r["status"], "ok", "{r}");
    assert!(
        r["config"].get("writer_user_id").is_none(),
        "null removes a key: {r}"
    );
    let message = r["message"].as_str().unwrap();
    assert!(
        message.contains("restart std-udp-recv (every module), std-h5-writer yourself"),
        "{message}"
    );
    let d = http_get(port, "/daq/deployment")["deployment"].clone();
    assert_eq!(d["status"], "RESTART_NEEDED", "{d}");
    assert_eq!(d["message"], message);
    let mut redis = redis::Client::open("redis://127.0.0.1:6379/")
        .unwrap()
        .get_connection()
        .unwrap();
    let stored: String = redis::cmd("GET")
        .arg(format!("config.std-daq.{det}.udp-recv-1"))
        .query(&mut redis)
        .unwrap();
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored["frame_timeout_ms"], 50);
    assert_eq!(http_get(port, "/daq/config")["config"], stored);

    let r = http_post(
        port,
        "/writer/write_async",
        r#"{"output_file": "/tmp/x.h5", "n_images": 1}"#,
    );
    assert_eq!(r["status"], "error", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("no writer agent"),
        "{r}"
    );
    assert_eq!(http_get(port, "/writer/status")["writer"]["state"], "READY");
    assert_eq!(http_post(port, "/writer/stop", "{}")["status"], "ok");
    assert_eq!(http_get(port, "/daq/logs/3")["logs"], serde_json::json!([]));

    drop(api);
    let mut keys = vec![
        std_daq::deploy::configs_key(&det),
        std_daq::deploy::deployment_key(&det),
    ];
    keys.extend(
        std_daq::deploy::service_names(&cfg)
            .into_iter()
            .map(|n| format!("config.{n}")),
    );
    for key in keys {
        let _: () = redis::cmd("DEL").arg(key).query(&mut redis).unwrap();
    }
    std::fs::remove_dir_all(&work).unwrap();
}
