//! Redis unavailable at start and mid-run (reliability issue, item 5): every service starts and
//! runs on its config file while Redis is down, says so once in its log, resumes publishing its
//! status hash when Redis comes back, and no image is lost or wrong at any point.
//!
//! The test runs its own `redis-server` on a free port (the machine's Redis is left alone), so the
//! outage is real: nothing listens on the port until the test starts the server, and the server is
//! killed mid-run. Its own test binary because it points the services at that port through
//! `REDIS_PORT` in the environment they inherit.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use std_daq::pipeline::Pipeline;
use std_daq_tests::{free_port, options, verify_h5};

const WATCHDOG: Duration = Duration::from_secs(40);

/// A private Redis on `port`, killed on drop.
struct PrivateRedis(Child);

impl PrivateRedis {
    fn start(port: u16, dir: &Path) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        PrivateRedis(child)
    }

    fn connection(&self, port: u16) -> redis::Connection {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        let deadline = Instant::now() + WATCHDOG;
        loop {
            if let Ok(c) = client.get_connection_with_timeout(Duration::from_secs(1)) {
                return c;
            }
            assert!(Instant::now() < deadline, "private redis did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WATCHDOG;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_count(work: &Path, service: &str, needle: &str) -> usize {
    std::fs::read_to_string(work.join(format!("{service}.log")))
        .unwrap_or_default()
        .matches(needle)
        .count()
}

fn run_exact(p: &mut Pipeline, file: &Path, detector: &str, first_frame: u64) {
    p.start_run(file, 30).unwrap();
    p.run_simulator_with(
        30,
        100.0,
        &["--start-frame".into(), first_frame.to_string()],
    )
    .unwrap();
    let run = p.wait_run(Duration::from_secs(10)).unwrap();
    assert_eq!((run.end.as_str(), run.images_written), ("completed", 30));
    let report = verify_h5(file, detector, "").unwrap();
    assert_eq!(report["exact_images"], 30, "{report}");
}

#[test]
fn services_run_without_redis_and_resume_reporting_when_it_returns() {
    let port = free_port().unwrap();
    // The services inherit this; nothing listens on the port yet.
    std::env::set_var("REDIS_HOST", "127.0.0.1");
    std::env::set_var("REDIS_PORT", port.to_string());
    std::env::remove_var("REDIS_SKIP");
    std::env::remove_var("SERVICE_NAME");

    let opts = options("redisdown").unwrap();
    let work = opts.work_dir.clone();
    let detector = opts.detector_name.clone();
    let mut p = Pipeline::start(opts, Duration::from_secs(60)).unwrap();
    let services = [
        "std-udp-recv-0",
        "std-udp-recv-1",
        "std-assembler",
        "std-h5-writer",
    ];
    let keys: Vec<String> = ["udp-recv-0", "udp-recv-1", "assembler", "h5-writer"]
        .iter()
        .map(|s| format!("status.std-daq.{detector}.{s}"))
        .collect();
    let url = format!("redis://127.0.0.1:{port}/");
    let warning = format!("to Redis at {url}");
    let resumed = format!("Redis at {url} is reachable again");

    // 1. Down at start: each service warns once and runs; a run is exact.
    for s in services {
        wait_for(&format!("{s}'s warning"), || {
            log_count(&work, s, &warning) == 1
        });
    }
    run_exact(&mut p, &work.join("redis-down.h5"), &detector, 1);

    // 2. Redis comes up: every status hash appears, each service logs the recovery.
    let redis_dir = work.join("redis");
    std::fs::create_dir_all(&redis_dir).unwrap();
    let server = PrivateRedis::start(port, &redis_dir);
    let mut con = server.connection(port);
    for key in &keys {
        wait_for(key, || {
            redis::cmd("EXISTS")
                .arg(key)
                .query::<i64>(&mut con)
                .unwrap()
                == 1
        });
    }
    for s in services {
        assert_eq!(log_count(&work, s, &resumed), 1, "{s}");
    }
    let writer_config: String = redis::cmd("HGET")
        .arg(&keys[3])
        .arg("config")
        .query(&mut con)
        .unwrap();
    assert!(writer_config.contains(&detector), "{writer_config}");

    // 3. Redis dies mid-run: the run is exact and each service warns a second time.
    drop(con);
    let file = work.join("redis-dies.h5");
    p.start_run(&file, 30).unwrap();
    drop(server);
    p.run_simulator_with(30, 100.0, &["--start-frame".into(), "1000".into()])
        .unwrap();
    let run = p.wait_run(Duration::from_secs(10)).unwrap();
    assert_eq!((run.end.as_str(), run.images_written), ("completed", 30));
    assert_eq!(verify_h5(&file, &detector, "").unwrap()["exact_images"], 30);
    for s in services {
        wait_for(&format!("{s}'s second warning"), || {
            log_count(&work, s, &warning) == 2
        });
    }

    // 4. Back again: reporting resumes a second time; the next run is exact.
    let server = PrivateRedis::start(port, &redis_dir);
    let mut con = server.connection(port);
    for key in &keys {
        wait_for(key, || {
            redis::cmd("EXISTS")
                .arg(key)
                .query::<i64>(&mut con)
                .unwrap()
                == 1
        });
    }
    run_exact(&mut p, &work.join("redis-back.h5"), &detector, 2000);

    eprintln!(
        "FIGURES | Redis down at start, up, killed mid-run, up again | 4 services: 2 warnings and \
         2 recoveries logged each; every status hash back within one refresh; 3 runs of 30 \
         images, 90/90 exact |"
    );
    let stop = p.stop().unwrap();
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    // A clean stop deletes the hashes at once.
    for key in &keys {
        let n: i64 = redis::cmd("EXISTS").arg(key).query(&mut con).unwrap();
        assert_eq!(n, 0, "{key} left behind");
    }
    drop(server);
    std::fs::remove_dir_all(PathBuf::from(&work)).unwrap();
}
