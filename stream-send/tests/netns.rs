//! Two "hosts" on one machine: network namespaces `<near>` and `<far>` joined by a veth pair
//! (10.213.x.1/30 <-> 10.213.x.2/30), created here and removed by a Drop guard even when the test
//! fails. Needs root (CI runs as root); skipped with a message otherwise (a failure with CI=true).
//!
//! The near host is the ordinary pipeline (receivers, assembler, writer, in the root namespace on
//! 127.0.0.1) plus `std-stream-send`, run in `<near>` so that its TCP goes over the veth pair (it
//! reaches the near ImageBuffer and ipc sockets through the shared file system).
//! The far host runs `std-stream-recv` and an unchanged `std-h5-writer` in `<far>` and in their
//! own mount namespace with a private tmpfs on /dev/shm: both hosts use the same detector name,
//! so without it the two ImageBuffers would collide. The far config differs from the near one
//! only in `ipc_dir` (a folder of its own, reachable from the test for writer commands).
//!
//! Checks: a run streamed across is pixel-exact in the far writer's file (h5py); then the link is
//! cut (`ip link set ... down`) mid-run while the near ring laps, restored, and every image of
//! that run is in the far file either exact or flagged lost (status 4), with the same lost count
//! from std-stream-send, std-stream-recv and the file.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use std_daq::pipeline::{default_bin_dir, Pipeline, PipelineOptions};
use std_daq_common::names;
use std_daq_common::writer_command::{Command as WCmd, Reply};
use std_writer_agent::writer_client::WriterClient;

mod netns_common;
use netns_common::{netns_possible, start_sender, verify, FarHost, Netns};

/// `std-daq verify` on a far file: (exit ok, report). The far file's checksums are the near
/// assembler's, carried by replication.
fn std_daq_verify(file: &Path) -> (bool, serde_json::Value) {
    let out = Command::new(default_bin_dir().unwrap().join("std-daq"))
        .arg("verify")
        .arg(file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    (
        out.status.success(),
        serde_json::from_str(text.lines().next().unwrap_or("{}")).unwrap(),
    )
}

fn far_run(client: &WriterClient, file: &Path, n: u64) {
    let r = client
        .request(&WCmd::Start {
            output_file: file.display().to_string(),
            n_images: n,
            request_id: None,
            context: Default::default(),
        })
        .unwrap();
    assert!(r.ok, "{r:?}");
}

fn wait_far_run(client: &WriterClient, timeout: Duration) -> h5_writer::command::RunSummary {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Reply {
            status: Some(st), ..
        }) = client.request(&WCmd::Status)
        {
            if st.current.is_none() {
                if let Some(run) = st.last_run {
                    return run;
                }
            }
        }
        assert!(Instant::now() < deadline, "far run did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn replication_over_a_veth_pair_is_exact_and_a_cut_link_is_accounted() {
    if !netns_possible() {
        return;
    }
    let bin = default_bin_dir().unwrap();
    let id = std::process::id();
    let work = std::env::temp_dir().join(format!("std-stream-netns.{id}"));
    let _ = std::fs::remove_dir_all(&work);
    let detector = format!("ssn{id}");
    let opts = PipelineOptions {
        bin_dir: bin.clone(),
        work_dir: work.join("near"),
        detector_name: detector.clone(),
        n_modules: 2,
        start_udp_port: 40_000 + (id % 1000) as u16 * 8,
        module_buffer_slots: 64,
        // 32 slots of 2 MiB: a short outage laps the ring.
        ram_buffer_gb: 0.0625,
        log_level: "info".into(),
        extra_config: Vec::new(),
    };
    let ns = Netns::create();
    let near = Pipeline::start(opts, Duration::from_secs(60)).unwrap();

    // Far host: the same detector, its own ipc_dir. After the outage the sender catches up at
    // link speed, faster than the far writer writes HDF5: the far ring (256 slots) must absorb
    // that burst, or the writer itself flags images lost_in_buffer. Slot size (the layout
    // replication relies on) is the same on both hosts.
    let port = 41_000 + (id % 1000) as u16 * 8;
    let far = FarHost::start(
        &ns,
        &near.config_path,
        &work.join("far"),
        port,
        Some(0.5),
        "",
    );
    let (far_dir, far_config) = (far.dir.clone(), far.config.clone());
    let client = WriterClient::new(
        &zmq::Context::new(),
        &names::writer_command_endpoint(&far_config),
        Duration::from_secs(5),
    );
    far.wait_writer_connected(&names::writer_command_endpoint(&far_config));
    let sender = start_sender(
        &ns,
        &near.config_path,
        port,
        &["--connections", "2", "--parts", "2", "--link-timeout", "1"],
        &work.join("send.log"),
    );
    // The sender connects only once its subscription to the near stream is live.
    far.wait_session_open();

    // 1: a run streamed across is pixel-exact on the far side.
    let file1 = far_dir.join("run1.h5");
    far_run(&client, &file1, 100);
    let sim = near.run_simulator(100, 100.0, "", false).unwrap();
    assert_eq!(sim.frames, 100);
    let run = wait_far_run(&client, Duration::from_secs(60));
    assert_eq!(run.images_written, 100, "{run:?}");
    let report = verify(&file1, &detector);
    assert_eq!(report["exact_images"], 100, "{report}");
    assert_eq!(report["ids_strictly_increasing"], true, "{report}");
    let (ok, checked) = std_daq_verify(&file1);
    assert!(ok, "{checked}");
    assert_eq!(
        checked["checked"], 100,
        "the assembler's checksum of every image: {checked}"
    );

    // 2: cut the link mid-run; the near ring (32 slots) laps while it is down.
    let ctx = zmq::Context::new();
    let watch = ctx.socket(zmq::SUB).unwrap();
    watch.set_subscribe(b"").unwrap();
    watch.set_rcvtimeo(30_000).unwrap();
    watch.connect(&names::image_endpoint(&near.config)).unwrap();
    while !watch.recv_bytes(0).unwrap().is_empty() {} // subscribed: a heartbeat arrived
    let file2 = far_dir.join("run2.h5");
    far_run(&client, &file2, 400);
    std::thread::scope(|s| {
        // Frames 101..=500: the detector's frame numbers (image ids) go on from run 1.
        let sim = s.spawn(|| {
            let out = Command::new(bin.join("std-det-sim"))
                .arg("--config")
                .arg(&near.config_path)
                .args(["--images", "400", "--rate", "100", "--start-frame", "101"])
                .stderr(Stdio::null())
                .output()
                .unwrap();
            assert!(out.status.success());
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["frames"].as_u64().unwrap()
        });
        let mut seen = 0;
        while seen < 400 {
            if !watch.recv_bytes(0).unwrap().is_empty() {
                seen += 1;
                if seen == 100 {
                    ns.set_link(false);
                }
                if seen == 250 {
                    ns.set_link(true);
                }
            }
        }
        assert_eq!(sim.join().unwrap(), 400);
    });
    let run = wait_far_run(&client, Duration::from_secs(120));
    assert_eq!(run.images_written, 400, "{run:?}");
    let sent: serde_json::Value =
        serde_json::from_str(sender.wait_output("std-stream-send").trim()).unwrap();
    let received: serde_json::Value =
        serde_json::from_str(far.proc.wait_output("std-stream-recv").trim()).unwrap();
    let report = verify(&file2, &detector);
    let lost_in_file = report["status_counts"]["4"].as_u64().unwrap_or(0);
    eprintln!("sender {sent}\nreceiver {received}\nfile {report}");
    assert!(lost_in_file > 0, "the outage lost nothing: {report}");
    assert_eq!(sent["lost"], lost_in_file, "{sent} {report}");
    assert_eq!(received["lost"], lost_in_file, "{received} {report}");
    assert_eq!(sent["unconfirmed"], 0);
    assert_eq!(sent["delivered"], received["delivered"]);
    assert_eq!(received["checksum_errors"], 0);
    // The real assembler gave every image its checksum: the receiver verified the assembler's
    // checksums and the sender hashed nothing itself.
    assert_eq!(sent["images_without_checksum"], 0, "{sent}");
    assert_eq!(
        report["exact_images"].as_u64().unwrap() + lost_in_file,
        400,
        "{report}"
    );
    assert_eq!(report["ids_strictly_increasing"], true, "{report}");
    // Images lost in the outage are zeros without a checksum, never "corrupt".
    let (ok, checked) = std_daq_verify(&file2);
    assert!(ok, "{checked}");
    assert_eq!(checked["checked"], 400 - lost_in_file, "{checked}");
    assert_eq!(checked["without_checksum"], lost_in_file, "{checked}");
    let stop = near.stop().unwrap();
    assert!(stop.failed.is_empty(), "{:?}", stop.failed);
    drop(ns);
    let _ = std::fs::remove_dir_all(&work);
    let _: PathBuf = work;
}
