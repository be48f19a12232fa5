//! Issue 19: real binaries with 4 JUNGFRAU modules, 2 assembler threads and 2 writers, driven by
//! the writer agent over the real RabbitMQ. The master file at the requested `output_file` reads
//! through h5py (tests/python/verify_h5.py) as n images in image_id order, pixel-exact, all good;
//! with hdf5plugin from the project's venv for a bitshuffle/LZ4 run. A kill mid-run trims the
//! master to the images every writer wrote (request_fail, statuses honest); a writer SIGKILLed
//! mid-run (and restarted, as its supervisor would) fails the request naming that writer, and
//! nothing in the master reads as good that was not written.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use std_daq::pipeline::{Pipeline, SimulatedDetector};
use std_daq_common::names;
use std_daq_common::writer_command::writer_data_file;
use std_daq_tests::{data_filters, verify_h5_venv, verify_h5_with};
use std_writer_agent::client::{self, ClientError};
use std_writer_agent::protocol::action;
use std_writer_agent::Policy;

const MODULES: &str = "4";

/// 4 modules, 2 assembler threads, 2 writers (plus `extra` config keys).
async fn start(tag: &str, extra: Vec<(String, serde_json::Value)>) -> (Pipeline, PathBuf, String) {
    let mut opts = std_daq_tests::options(tag).unwrap();
    opts.n_modules = 4;
    opts.ram_buffer_gb = 0.5;
    opts.extra_config = vec![
        ("number_of_writers".into(), 2.into()),
        ("assembler_threads".into(), 2.into()),
    ];
    opts.extra_config.extend(extra);
    let detector = opts.detector_name.clone();
    let root = opts.work_dir.join("data");
    let p = tokio::task::spawn_blocking(move || {
        Pipeline::start_detector(opts, SimulatedDetector::Jungfrau, Duration::from_secs(60))
    })
    .await
    .unwrap()
    .unwrap();
    std::fs::create_dir_all(&root).unwrap();
    (p, root, detector)
}

async fn agent_for(tag: &str, p: &Pipeline, root: &Path) -> RunningAgent {
    let mut settings = test_settings(
        tag,
        &names::writer_command_endpoint(&p.config),
        Policy::new(root, 100_000, false).unwrap(),
    );
    settings.more_writers = vec![names::writer_command_endpoint_of(&p.config, 1)];
    settings.writer_lost_after = Duration::from_secs(5);
    RunningAgent::start_with(settings).await
}

/// The simulator as a child process, frames from `first`: the pipeline stays free for restarts.
fn simulator(p: &Pipeline, images: u64, rate: f64, first: u64) -> Child {
    Command::new(
        std_daq::pipeline::default_bin_dir()
            .unwrap()
            .join("std-det-sim"),
    )
    .arg("--config")
    .arg(&p.config_path)
    .args(["--images", &images.to_string(), "--rate", &rate.to_string()])
    .args(["--start-frame", &first.to_string()])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap()
}

async fn finish_simulator(mut sim: Child) {
    let status = tokio::task::spawn_blocking(move || sim.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "std-det-sim: {status}");
}

/// verify_h5.py on the master with 4 modules; `venv`: the project's Python with hdf5plugin.
fn verify_master(file: &Path, detector: &str, venv: bool) -> serde_json::Value {
    let extra = ["--n-modules", MODULES];
    if venv {
        return verify_h5_venv(file, detector, &extra).unwrap();
    }
    verify_h5_with(file, detector, "", "jungfrau", &extra).unwrap()
}

/// Sends a request for `n_images`; returns its id and the task that waits for its end.
async fn request(
    tag: &str,
    file: &Path,
    n_images: u64,
) -> (
    String,
    tokio::task::JoinHandle<Result<std_writer_agent::StatusMessage, ClientError>>,
) {
    let opts = client_options(tag);
    let id = client::new_request_id();
    let body = serde_json::json!({"output_file": file, "n_images": n_images}).to_string();
    let handle = {
        let id = id.clone();
        tokio::spawn(async move { client::send_request(&opts, &id, body.as_bytes(), |_| {}).await })
    };
    (id, handle)
}

/// A request for `n` images that the simulator fills (frames from 1): its final status.
async fn complete_run(
    tag: &str,
    p: &Pipeline,
    observed: &mut tokio::sync::mpsc::UnboundedReceiver<std_writer_agent::StatusMessage>,
    file: &Path,
    n: u64,
) -> std_writer_agent::StatusMessage {
    let (id, done) = request(tag, file, n).await;
    assert_eq!(next_for(observed, &id).await.action, action::REQUEST_START);
    let sim = simulator(p, n, 50.0, 1);
    let ok = done.await.unwrap().unwrap();
    finish_simulator(sim).await;
    assert_eq!(ok.action, action::REQUEST_SUCCESS, "{ok:?}");
    ok
}

/// Stops the agent and the pipeline (nothing failed, nothing left) and removes the work folder.
async fn finish(agent: RunningAgent, p: Pipeline, work: PathBuf) {
    agent.stop().await;
    let report = tokio::task::spawn_blocking(move || p.stop().unwrap())
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
    std::fs::remove_dir_all(work).unwrap();
}

/// Waits for a progress of at least `k` images.
async fn progress_at_least(
    observed: &mut tokio::sync::mpsc::UnboundedReceiver<std_writer_agent::StatusMessage>,
    id: &str,
    k: u64,
) {
    loop {
        let s = next_for(observed, id).await;
        assert!(
            s.action == action::REQUEST_PROGRESS || s.action == action::REQUEST_START,
            "{s:?}"
        );
        if s.body["images_written"].as_u64().unwrap_or(0) >= k {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_complete_kill_and_lose_a_writer_with_an_honest_master() {
    let (mut p, root, detector) = start("nwriters", vec![]).await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("nwriters");
    let agent = agent_for(&tag, &p, &root).await;
    let mut observed = observe_statuses().await;

    // 1. A complete run: the master holds every image, exact, in order, all good; each writer's
    //    file holds its half.
    let file = root.join("full.h5");
    let ok = complete_run(&tag, &p, &mut observed, &file, 60).await;
    assert_eq!(
        ok.message,
        format!("wrote 60 of 60 images to {}", file.display())
    );
    let report = verify_master(&file, &detector, false);
    assert_eq!(report["images"], 60, "{report}");
    assert_eq!(report["exact_images"], 60, "{report}");
    assert_eq!(report["ids_consecutive"], true, "{report}");
    assert_eq!(
        report["status_counts"],
        serde_json::json!({"1": 60}),
        "{report}"
    );
    for k in 0..2 {
        let part = verify_h5_with(
            &writer_data_file(&file, k),
            &detector,
            "",
            "jungfrau",
            &["--n-modules", MODULES],
        )
        .unwrap();
        assert_eq!(part["images"], 30, "writer {k}: {part}");
        assert_eq!(part["exact_images"], 30, "writer {k}: {part}");
    }

    // 2. Killed mid-run: request_fail, the master holds exactly the k images every writer wrote,
    //    all exact and good.
    let file = root.join("killed.h5");
    let (id, done) = request(&tag, &file, 1000).await;
    assert_eq!(
        next_for(&mut observed, &id).await.action,
        action::REQUEST_START
    );
    let sim = simulator(&p, 150, 50.0, 1000);
    progress_at_least(&mut observed, &id, 20).await;
    client::kill(&client_options(&tag), &id).await.unwrap();
    let ClientError::Failed(status) = done.await.unwrap().unwrap_err() else {
        panic!("expected request_fail")
    };
    finish_simulator(sim).await;
    let k = status.body["images_written"].as_u64().unwrap();
    assert!((20..1000).contains(&k), "{status:?}");
    assert_eq!(status.body["run"]["end"], "killed", "{status:?}");
    let report = verify_master(&file, &detector, false);
    assert_eq!(report["images"], k, "{report}");
    assert_eq!(report["exact_images"], k, "{report}");
    assert_eq!(report["status_counts"]["1"], k, "{report}");

    // 3. Writer 1 SIGKILLed mid-run (its supervisor restarts it): request_fail naming writer 1
    //    and what is safe; the master reads only what was written, every image exact and good.
    let file = root.join("lost.h5");
    let (id, done) = request(&tag, &file, 1000).await;
    assert_eq!(
        next_for(&mut observed, &id).await.action,
        action::REQUEST_START
    );
    let sim = simulator(&p, 300, 50.0, 2000);
    progress_at_least(&mut observed, &id, 40).await;
    tokio::task::block_in_place(|| p.restart_writer_k(1, true)).unwrap();
    let ClientError::Failed(status) = done.await.unwrap().unwrap_err() else {
        panic!("expected request_fail")
    };
    finish_simulator(sim).await;
    let message = &status.message;
    assert!(message.contains("writer 1 ("), "{message}");
    assert!(message.contains("no longer knows the run"), "{message}");
    assert!(
        message.contains("lost_writer1.h5.part holds at least"),
        "{message}"
    );
    assert!(message.contains("the master file"), "{message}");
    let k = status.body["images_written"].as_u64().unwrap();
    let report = verify_master(&file, &detector, false);
    assert_eq!(report["images"], k, "{report}");
    assert_eq!(report["exact_images"], k, "{report}");
    assert_eq!(report["status_counts"]["1"], k, "{report}");

    finish(agent, p, work).await;
}

/// bitshuffle + LZ4: the master reads through PyPI's hdf5plugin (the project's venv), every
/// image exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_master_reads_exact_through_hdf5plugin() {
    let metrics = format!("127.0.0.1:{}", std_daq_tests::free_port_range(16).unwrap());
    let (p, root, detector) = start(
        "nwriterslz4",
        vec![
            ("compression".into(), "bitshuffle-lz4".into()),
            ("metrics_base_address".into(), metrics.into()),
        ],
    )
    .await;
    let work = root.parent().unwrap().to_path_buf();
    let tag = unique_tag("nwriterslz4");
    let agent = agent_for(&tag, &p, &root).await;
    let mut observed = observe_statuses().await;
    let file = root.join("lz4.h5");
    complete_run(&tag, &p, &mut observed, &file, 40).await;
    let report = verify_master(&file, &detector, true);
    assert_eq!(report["images"], 40, "{report}");
    assert_eq!(report["exact_images"], 40, "{report}");
    assert_eq!(
        report["status_counts"],
        serde_json::json!({"1": 40}),
        "{report}"
    );
    let filters = data_filters(&writer_data_file(&file, 0), &detector).unwrap();
    assert!(filters.get("32008").is_some(), "{filters}");
    // The master carries every service's counters for the run (from writer 0's data file).
    let counters = std_daq_tests::root_json_attr(&file, "run_counters").unwrap();
    std_daq_tests::assert_run_counters(&counters, 4, 40);
    finish(agent, p, work).await;
}

/// Nobody polls the writers while the detector runs (the demo's way: start, run the simulator,
/// then wait): the run still starts at its first image, so a ring much smaller than the run loses
/// nothing. (When the first image id was only set by a status poll, all but the last ring's worth
/// of images were lost here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_image_id_is_set_without_anyone_polling() {
    let mut opts = std_daq_tests::options("nwritersnopoll").unwrap();
    // 16 slots of 2 MiB for a run of 150 images.
    opts.ram_buffer_gb = 0.03125;
    opts.extra_config = vec![("number_of_writers".into(), 2.into())];
    let detector = opts.detector_name.clone();
    let work = opts.work_dir.clone();
    let folder = work.clone();
    let report = tokio::task::spawn_blocking(move || {
        let mut p =
            Pipeline::start_detector(opts, SimulatedDetector::Jungfrau, Duration::from_secs(60))
                .unwrap();
        let file = work.join("nopoll.h5");
        p.start_run(&file, 150).unwrap();
        p.run_simulator(150, 100.0, "", false).unwrap();
        let run = p.wait_run(Duration::from_secs(10)).unwrap();
        assert_eq!((run.end.as_str(), run.images_written), ("completed", 150));
        let stop = p.stop().unwrap();
        assert!(
            stop.failed.is_empty() && stop.leftovers.is_empty(),
            "{stop:?}"
        );
        verify_h5_with(&file, &detector, "", "jungfrau", &[]).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(report["exact_images"], 150, "{report}");
    assert_eq!(
        report["status_counts"],
        serde_json::json!({"1": 150}),
        "{report}"
    );
    std::fs::remove_dir_all(folder).unwrap();
}

/// The agent restarted mid-run: a new writer group (the new agent's) takes up the run every
/// writer is running for one request, follows it to its end and writes the master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_group_takes_up_the_run_its_writers_are_running() {
    use std_daq_common::writer_command::Command as WCmd;
    use std_writer_agent::writer_group::WriterGroup;
    let mut opts = std_daq_tests::options("nwritersadopt").unwrap();
    opts.extra_config = vec![("number_of_writers".into(), 2.into())];
    let detector = opts.detector_name.clone();
    let work = opts.work_dir.clone();
    let folder = work.clone();
    let report = tokio::task::spawn_blocking(move || {
        let p =
            Pipeline::start_detector(opts, SimulatedDetector::Jungfrau, Duration::from_secs(60))
                .unwrap();
        let file = work.join("adopted.h5");
        let started = p
            .client
            .request(&WCmd::Start {
                output_file: file.display().to_string(),
                n_images: 40,
                request_id: Some("adopt-1".into()),
                context: Default::default(),
            })
            .unwrap();
        assert!(started.ok, "{started:?}");
        // The first group (agent) is gone; a new one sees the run as its own.
        let endpoints: Vec<String> = (0..2)
            .map(|k| names::writer_command_endpoint_of(&p.config, k))
            .collect();
        let group = WriterGroup::new(
            &zmq::Context::new(),
            &endpoints,
            Duration::from_secs(5),
            Duration::from_secs(10),
        );
        let status = group.request(&WCmd::Status).unwrap().status.unwrap();
        let current = status.current.expect("the new group takes up the run");
        assert_eq!(current.request_id.as_deref(), Some("adopt-1"));
        assert_eq!(current.output_file, file.display().to_string());
        p.run_simulator(40, 50.0, "", false).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let run = loop {
            let st = group.request(&WCmd::Status).unwrap().status.unwrap();
            if st.current.is_none() {
                break st.last_run.unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "the run did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!((run.end.as_str(), run.images_written), ("completed", 40));
        let stop = p.stop().unwrap();
        assert!(
            stop.failed.is_empty() && stop.leftovers.is_empty(),
            "{stop:?}"
        );
        verify_h5_with(&file, &detector, "", "jungfrau", &[]).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(report["exact_images"], 40, "{report}");
    assert_eq!(
        report["status_counts"],
        serde_json::json!({"1": 40}),
        "{report}"
    );
    std::fs::remove_dir_all(folder).unwrap();
}
