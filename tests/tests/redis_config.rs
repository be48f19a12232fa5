//! A service configured from Redis (std_daq_service's `config.<SERVICE_NAME>`) and reporting its
//! status hash `status.<SERVICE_NAME>` there, run as a real process.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use std_daq::pipeline::default_bin_dir;

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_config_stored_in_redis_drives_a_receiver_and_its_status_hash_comes_and_goes() {
    let pid = std::process::id();
    let service = format!("test.beamline.udp-recv-{pid}");
    let detector = format!("redis{pid}");
    let port = 40_000 + (pid % 2000) as u16 * 2;
    let config = serde_json::json!({
        "detector_name": detector, "detector_type": "jungfrau-raw", "n_modules": 1,
        "bit_depth": 16, "image_pixel_height": 512, "image_pixel_width": 1024,
        "start_udp_port": port, "module_positions": {"0": [0, 0, 1023, 511]},
        "module_buffer_slots": 4, "udp_bind_address": "127.0.0.1",
        "ipc_dir": std::env::temp_dir().display().to_string(),
    });
    let client = redis::Client::open("redis://127.0.0.1:6379/").unwrap();
    let mut con = client.get_connection().unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("config.{service}"))
        .arg(config.to_string())
        .query(&mut con)
        .unwrap();

    let mut child = Command::new(default_bin_dir().unwrap().join("std-udp-recv"))
        .args(["--module", "0"])
        .env("SERVICE_NAME", &service)
        .env_remove("REDIS_SKIP")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let segment = std::path::PathBuf::from(format!("/dev/shm/std-daq.{detector}.module-0"));
    let status_key = format!("status.{service}");
    wait_for(
        "the FrameBuffer named by the Redis config",
        Duration::from_secs(20),
        || segment.exists(),
    );
    wait_for("the status hash", Duration::from_secs(20), || {
        let n: i64 = redis::cmd("EXISTS")
            .arg(&status_key)
            .query(&mut con)
            .unwrap();
        n == 1
    });
    let name: String = redis::cmd("HGET")
        .arg(&status_key)
        .arg("service_name")
        .query(&mut con)
        .unwrap();
    assert_eq!(name, service);
    let cfg: String = redis::cmd("HGET")
        .arg(&status_key)
        .arg("config")
        .query(&mut con)
        .unwrap();
    assert!(cfg.contains(&detector), "{cfg}");
    let ttl: i64 = redis::cmd("TTL").arg(&status_key).query(&mut con).unwrap();
    assert!((1..=15).contains(&ttl), "ttl {ttl}");

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let n: i64 = redis::cmd("EXISTS")
        .arg(&status_key)
        .query(&mut con)
        .unwrap();
    assert_eq!(n, 0, "the status hash must go when the service stops");
    assert!(!segment.exists(), "the owner unlinks its FrameBuffer");
    let _: () = redis::cmd("DEL")
        .arg(format!("config.{service}"))
        .query(&mut con)
        .unwrap();
}
