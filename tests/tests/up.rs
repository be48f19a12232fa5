//! `std-daq up` as an operator runs it: the services come up, a receiver is killed and restarted
//! by the supervisor, the pipeline recovers, and SIGTERM leaves no process, shared memory or ipc
//! file behind.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use std_daq::pipeline::{config_json, default_bin_dir, leftovers, SimulatedDetector};
use std_daq_common::writer_command::Command as WriterCommand;
use std_daq_common::{names, DetectorConfig};
use std_daq_tests::{options, read_status};
use std_writer_agent::writer_client::WriterClient;

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pids_of(pattern: &str) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[test]
fn up_restarts_a_killed_receiver_and_cleans_up_on_sigterm() {
    let opts = options("up").unwrap();
    let work = opts.work_dir.clone();
    std::fs::create_dir_all(work.join("ipc")).unwrap();
    let config_path = work.join("detector.json");
    let json = config_json(&opts, SimulatedDetector::Jungfrau);
    std::fs::write(&config_path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let cfg = DetectorConfig::from_file(&config_path).unwrap();
    let log_path = work.join("up.log");
    let mut up = Command::new(default_bin_dir().unwrap().join("std-daq"))
        .arg("up")
        .arg("--config")
        .arg(&config_path)
        .env("REDIS_SKIP", "1")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();

    let ctx = zmq::Context::new();
    let writer = WriterClient::new(
        &ctx,
        &names::writer_command_endpoint(&cfg),
        Duration::from_secs(2),
    );
    let status = || {
        writer
            .request(&WriterCommand::Status)
            .ok()
            .and_then(|r| r.status)
    };
    wait_for(
        "the pipeline under std-daq up",
        Duration::from_secs(60),
        || status().is_some_and(|s| s.connected),
    );
    let file = work.join("up.h5");
    let reply = writer
        .request(&WriterCommand::Start {
            output_file: file.display().to_string(),
            n_images: 400,
            request_id: None,
            context: Default::default(),
        })
        .unwrap();
    assert!(reply.ok, "{reply:?}");

    let sim = std::thread::spawn({
        let config_path = config_path.clone();
        move || {
            Command::new(default_bin_dir().unwrap().join("std-det-sim"))
                .arg("--config")
                .arg(&config_path)
                .args(["--images", "400", "--rate", "100"])
                .output()
                .unwrap()
        }
    });
    wait_for("100 images written", Duration::from_secs(60), || {
        status()
            .and_then(|s| s.current)
            .is_some_and(|c| c.images_written >= 100)
    });
    let receiver = format!("std-udp-recv --config {} --module 1", config_path.display());
    let old = pids_of(&receiver);
    assert_eq!(old.len(), 1, "{old:?}");
    Command::new("kill")
        .args(["-KILL", &old[0]])
        .status()
        .unwrap();
    wait_for(
        "the supervisor to restart the receiver",
        Duration::from_secs(30),
        || {
            let now = pids_of(&receiver);
            now.len() == 1 && now != old
        },
    );
    assert!(sim.join().unwrap().status.success());
    wait_for("the run to finish", Duration::from_secs(30), || {
        status().is_some_and(|s| s.current.is_none() && s.last_run.is_some())
    });
    let run = status().unwrap().last_run.unwrap();
    assert_eq!(run.images_written, 400, "{run:?}");
    let (st, modules) = read_status(&file, &cfg.detector_name).unwrap();
    assert!(st[..100].iter().all(|s| *s == 1), "{st:?}");
    assert!(
        st[350..].iter().all(|s| *s == 1),
        "good again after the restart: {st:?}"
    );
    assert!((0..400)
        .filter(|i| st[*i] != 1)
        .all(|i| modules[i] == 0b10 || modules[i] == 0));

    Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "std-daq up did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(exit.success(), "{exit}\n{log}");
    assert!(
        log.contains("restarting") && log.contains("std-udp-recv-1"),
        "{log}"
    );
    assert!(leftovers(&cfg).is_empty(), "{:?}", leftovers(&cfg));
    assert!(
        pids_of(&config_path.display().to_string()).is_empty(),
        "a child survived"
    );
    std::fs::remove_dir_all(work).unwrap();
}
