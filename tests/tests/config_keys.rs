//! Config keys as the services use them (issue 18 items 4, 5, 7), with the real binaries:
//!
//! - under `std-daq up`, one config turns on metrics for every service at ports that follow
//!   from `metrics_base_address` (scraped, the live stream's preview included), each service publishes that address in its Redis
//!   status hash and `std-daq status` prints it; `compression` makes the writer's file
//!   bitshuffle-LZ4; a `live_stream_configs` entry runs a preview that sends the images; each
//!   no-effect key is warned about exactly once per service start;
//! - `std-h5-writer --compression` and `--metrics-addr` override the config keys;
//! - `log_level` filters what a service logs.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use std_daq::pipeline::{config_json, default_bin_dir, leftovers, Pipeline, SimulatedDetector};
use std_daq_common::writer_command::Command as WriterCommand;
use std_daq_common::{names, DetectorConfig, MetricsService};
use std_daq_tests::{data_filters, free_port, free_port_range, options, scrape_metrics, verify_h5};
use std_writer_agent::writer_client::WriterClient;

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn up_runs_what_the_config_says_metrics_compression_live_stream_and_warnings() {
    let mut opts = options("cfgup").unwrap();
    let work = opts.work_dir.clone();
    std::fs::create_dir_all(work.join("ipc")).unwrap();
    // Base + 0 .. base + 11: assembler, writer, agent, ..., receivers 0 and 1.
    let base = free_port_range(12).unwrap();
    let preview_port = free_port().unwrap();
    let preview = format!("tcp://127.0.0.1:{preview_port}");
    opts.extra_config = vec![
        (
            "metrics_base_address".into(),
            format!("127.0.0.1:{base}").into(),
        ),
        ("compression".into(), "bitshuffle-lz4".into()),
        (
            "live_stream_configs".into(),
            serde_json::json!({ &preview: {"type": "forward"} }),
        ),
        // Two keys without effect here: each warned about once per service start.
        ("delay_filter_timeout".into(), 10.into()),
        ("writer_user_id".into(), 12345.into()),
        ("number_of_writers".into(), 1.into()),
    ];
    let config_path = work.join("detector.json");
    let json = config_json(&opts, SimulatedDetector::Jungfrau);
    std::fs::write(&config_path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let cfg = DetectorConfig::from_file(&config_path).unwrap();
    assert_eq!(cfg.notices.len(), 2, "{:?}", cfg.notices);
    let log_path = work.join("up.log");
    let bin = default_bin_dir().unwrap();
    let mut up = Command::new(bin.join("std-daq"))
        .arg("up")
        .arg("--config")
        .arg(&config_path)
        .arg("--agent-output-root")
        .arg(&work)
        .env_remove("SERVICE_NAME")
        .env_remove("REDIS_SKIP")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

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
    // A viewer on the live stream, subscribed before the images come.
    let viewer = ctx.socket(zmq::SUB).unwrap();
    viewer.set_subscribe(b"").unwrap();
    viewer.set_rcvtimeo(30_000).unwrap();
    viewer.connect(&preview).unwrap();
    wait_for(
        "the preview to see its viewer",
        Duration::from_secs(60),
        || {
            log()
                .lines()
                .any(|l| l.starts_with("[std-daq-preview-0]") && l.contains("a viewer subscribed"))
        },
    );

    let file = work.join("cfgup.h5");
    let reply = writer
        .request(&WriterCommand::Start {
            output_file: file.display().to_string(),
            n_images: 20,
            request_id: None,
            context: Default::default(),
        })
        .unwrap();
    assert!(reply.ok, "{reply:?}");
    let sim = Command::new(bin.join("std-det-sim"))
        .arg("--config")
        .arg(&config_path)
        .args(["--images", "20", "--rate", "50"])
        .output()
        .unwrap();
    assert!(
        sim.status.success(),
        "{}",
        String::from_utf8_lossy(&sim.stderr)
    );
    wait_for("the run to finish", Duration::from_secs(30), || {
        status().is_some_and(|s| s.current.is_none() && s.last_run.is_some())
    });
    assert_eq!(status().unwrap().last_run.unwrap().images_written, 20);

    // The preview (forward) sent images in array-1.0.
    let parts = viewer
        .recv_multipart(0)
        .expect("an image on the live stream");
    assert_eq!(parts.len(), 2);
    let header: serde_json::Value = serde_json::from_slice(&parts[0]).unwrap();
    assert_eq!(header["htype"], "array-1.0", "{header}");
    assert_eq!(header["shape"], serde_json::json!([1024, 1024]), "{header}");
    assert_eq!(parts[1].len(), cfg.image_bytes());

    // Metrics at the ports the rule gives, with the run's counts.
    let port = |s| cfg.metrics_addr(s).unwrap().port();
    let services = [
        (
            "assembler",
            MetricsService::Assembler,
            "std_daq_images",
            20.0,
        ),
        (
            "h5-writer",
            MetricsService::Writer,
            "std_daq_images_written",
            20.0,
        ),
        (
            "udp-recv-0",
            MetricsService::Receiver(0),
            "std_daq_frames_complete",
            20.0,
        ),
        (
            "udp-recv-1",
            MetricsService::Receiver(1),
            "std_daq_frames_complete",
            20.0,
        ),
    ];
    assert_eq!(port(MetricsService::Receiver(1)), base + 11);
    for (name, service, metric, want) in services {
        wait_for(
            &format!("{metric} = {want} on {name}'s port {}", port(service)),
            Duration::from_secs(30),
            || {
                scrape_metrics(port(service))
                    .ok()
                    .and_then(|m| m.get(metric).copied())
                    == Some(want)
            },
        );
    }
    wait_for(
        "the agent's metrics to show it connected to RabbitMQ",
        Duration::from_secs(30),
        || {
            scrape_metrics(port(MetricsService::WriterAgent))
                .ok()
                .and_then(|m| m.get("std_daq_connected").copied())
                == Some(1.0)
        },
    );

    // The live stream (entry 0) at base + 5, counting what it sent.
    assert_eq!(port(MetricsService::Preview(0)), base + 5);
    wait_for("the preview's metrics", Duration::from_secs(30), || {
        scrape_metrics(port(MetricsService::Preview(0)))
            .ok()
            .and_then(|m| m.get("std_daq_images_sent").copied())
            .is_some_and(|n| n >= 1.0)
    });

    // The status hashes carry the address; `std-daq status` prints it for every service.
    let preview_status = format!("preview.tcp___127_0_0_1_{preview_port}");
    let expect: Vec<(String, String)> = [
        ("assembler", MetricsService::Assembler),
        ("h5-writer", MetricsService::Writer),
        ("writer-agent", MetricsService::WriterAgent),
        ("udp-recv-0", MetricsService::Receiver(0)),
        ("udp-recv-1", MetricsService::Receiver(1)),
        (preview_status.as_str(), MetricsService::Preview(0)),
    ]
    .into_iter()
    .map(|(name, s)| {
        (
            format!("std-daq.{}.{name} ", cfg.detector_name),
            format!("metrics http://127.0.0.1:{}/metrics", port(s)),
        )
    })
    .collect();
    let mut printed = String::new();
    wait_for(
        "std-daq status to show every metrics address",
        Duration::from_secs(30),
        || {
            let out = Command::new(bin.join("std-daq"))
                .args(["status", "--filter", &cfg.detector_name])
                .output()
                .unwrap();
            printed = String::from_utf8_lossy(&out.stdout).into_owned();
            expect.iter().all(|(service, metrics)| {
                printed
                    .lines()
                    .any(|l| l.starts_with(service.as_str()) && l.contains(metrics.as_str()))
            })
        },
    );

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
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = log();
    assert!(exit.success(), "{exit}\n{log}");
    assert!(leftovers(&cfg).is_empty(), "{:?}", leftovers(&cfg));

    // The file is bitshuffle + LZ4 as the config says, and every image exact through the filter.
    assert_eq!(
        data_filters(&file, &cfg.detector_name).unwrap(),
        serde_json::json!({"32008": [0, 3, 2, 0, 2]})
    );
    let report = verify_h5(&file, &cfg.detector_name, "").unwrap();
    assert_eq!(report["exact_images"], 20, "{report}");

    // Each no-effect key: one warning per start of each child, naming the key and the file.
    let children = [
        "std-udp-recv-0",
        "std-udp-recv-1",
        "std-assembler",
        "std-h5-writer",
        "std-writer-agent",
        "std-daq-preview-0",
    ];
    for child in children {
        let starts = log
            .lines()
            .filter(|l| !l.starts_with('[') && l.contains("started"))
            .filter(|l| l.contains(&format!("service=\"{child}\"")))
            .count();
        assert!(starts >= 1, "{child} never started:\n{log}");
        for key in ["delay_filter_timeout", "writer_user_id"] {
            let warnings = log
                .lines()
                .filter(|l| l.starts_with(&format!("[{child}] ")))
                .filter(|l| {
                    l.contains("WARN")
                        && l.contains(&format!("key `{key}` has no effect here"))
                        && l.contains(&config_path.display().to_string())
                })
                .count();
            assert_eq!(warnings, starts, "{child}, {key}:\n{log}");
        }
    }
    std::fs::remove_dir_all(work).unwrap();
}

#[test]
fn the_writers_flags_override_the_config_keys() {
    let mut opts = options("cfgflag").unwrap();
    let base = free_port_range(12).unwrap();
    let writer_port = free_port().unwrap();
    opts.extra_config = vec![
        ("compression".into(), "bitshuffle-lz4".into()),
        (
            "metrics_base_address".into(),
            format!("127.0.0.1:{base}").into(),
        ),
    ];
    let work = opts.work_dir.clone();
    let extra = HashMap::from([(
        "std-h5-writer".to_string(),
        vec![
            "--compression".to_string(),
            "none".to_string(),
            "--metrics-addr".to_string(),
            format!("127.0.0.1:{writer_port}"),
        ],
    )]);
    let mut p = Pipeline::start_with_args(
        opts,
        SimulatedDetector::Jungfrau,
        Duration::from_secs(60),
        extra,
    )
    .unwrap();
    let file = work.join("flag.h5");
    p.start_run(&file, 10).unwrap();
    p.run_simulator(10, 100.0, "", false).unwrap();
    let run = p.wait_run(Duration::from_secs(10)).unwrap();
    assert_eq!(run.images_written, 10);
    // The writer serves where its flag says, not at base + 1; the others follow the rule.
    let cfg = p.config.clone();
    assert!(cfg.metrics_addr(MetricsService::Writer).unwrap().port() != writer_port);
    wait_for(
        "the writer's metrics at --metrics-addr",
        Duration::from_secs(30),
        || {
            scrape_metrics(writer_port)
                .ok()
                .and_then(|m| m.get("std_daq_images_written").copied())
                == Some(10.0)
        },
    );
    assert!(
        std::net::TcpStream::connect(cfg.metrics_addr(MetricsService::Writer).unwrap()).is_err(),
        "nothing serves at base + 1"
    );
    for service in [
        MetricsService::Assembler,
        MetricsService::Receiver(0),
        MetricsService::Receiver(1),
    ] {
        scrape_metrics(cfg.metrics_addr(service).unwrap().port()).unwrap();
    }
    let detector = p.config.detector_name.clone();
    let writer_log = std::fs::read_to_string(p.log_path("std-h5-writer")).unwrap();
    let stop = p.stop().unwrap();
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    assert!(
        writer_log.lines().any(|l| l.contains("image chunks")
            && l.contains("none")
            && l.contains("--compression")),
        "{writer_log}"
    );
    assert_eq!(
        data_filters(&file, &detector).unwrap(),
        serde_json::json!({})
    );
    std::fs::remove_dir_all(work).unwrap();
}

/// `log_level` is the services' log filter (spdlog's `warning` accepted): at `warning` a receiver
/// logs its warnings (the notice of a no-effect key) and no INFO line; at `info` it does.
#[test]
fn log_level_is_the_services_log_filter() {
    for (level, info_lines) in [("warning", false), ("info", true)] {
        let mut opts = options(&format!("loglevel{info_lines}")).unwrap();
        opts.log_level = level.into();
        opts.n_modules = 1;
        opts.extra_config = vec![("gpfs_block_size".into(), 16_777_216.into())];
        let work = opts.work_dir.clone();
        std::fs::create_dir_all(work.join("ipc")).unwrap();
        let config_path = work.join("detector.json");
        let json = config_json(&opts, SimulatedDetector::Jungfrau);
        std::fs::write(&config_path, json.to_string()).unwrap();
        let cfg = DetectorConfig::from_file(&config_path).unwrap();
        let log_path = work.join("recv.log");
        let mut recv = Command::new(default_bin_dir().unwrap().join("std-udp-recv"))
            .arg("--config")
            .arg(&config_path)
            .args(["--module", "0"])
            .env("REDIS_SKIP", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        // Its FrameBuffer exists once it is set up (after the notices were logged).
        let segment =
            std::path::Path::new("/dev/shm").join(names::module_buffer_name(&cfg.detector_name, 0));
        wait_for(
            "the receiver's FrameBuffer",
            Duration::from_secs(30),
            || segment.exists(),
        );
        Command::new("kill")
            .args(["-TERM", &recv.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let exit = loop {
            if let Some(s) = recv.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the receiver did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(exit.success(), "{exit}\n{log}");
        let warnings = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("key `gpfs_block_size` has no effect"))
            .count();
        assert_eq!(warnings, 1, "{level}:\n{log}");
        assert_eq!(
            log.lines().any(|l| l.contains(" INFO ")),
            info_lines,
            "{level}:\n{log}"
        );
        assert!(leftovers(&cfg).is_empty(), "{:?}", leftovers(&cfg));
        std::fs::remove_dir_all(work).unwrap();
    }
}
