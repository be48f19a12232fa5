//! What the two-namespace tests share: a pair of network namespaces joined by a veth pair, a
//! child killed on drop, and the h5py checker.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether this test can make network namespaces (root, `ip`, `unshare`). In CI the prerequisites
/// are part of the job: missing, they are a failure, not a skip.
pub fn netns_possible() -> bool {
    if sh("[ $(id -u) = 0 ] && command -v ip >/dev/null && command -v unshare >/dev/null") {
        return true;
    }
    assert!(
        !std::env::var("CI").is_ok_and(|v| v == "true"),
        "CI=true: this test needs root, ip and unshare"
    );
    eprintln!("SKIPPED: needs root, ip and unshare");
    false
}

pub fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .status()
        .is_ok_and(|s| s.success())
}

/// Owns the namespaces; deleting a namespace removes its end of the veth pair (and the pair).
pub struct Netns {
    pub near: String,
    pub far: String,
}

impl Netns {
    pub fn create() -> Netns {
        let id = std::process::id();
        let n = Netns {
            near: format!("ssnear{id}"),
            far: format!("ssfar{id}"),
        };
        let sub = id % 250;
        let ok = sh(&format!(
            "set -e; ip netns add {near}; ip netns add {far}; \
             ip link add vn{id} type veth peer name vf{id}; \
             ip link set vn{id} netns {near}; ip link set vf{id} netns {far}; \
             ip -n {near} addr add 10.213.{sub}.1/30 dev vn{id}; \
             ip -n {far} addr add 10.213.{sub}.2/30 dev vf{id}; \
             ip -n {near} link set vn{id} up; ip -n {far} link set vf{id} up; \
             ip -n {near} link set lo up; ip -n {far} link set lo up",
            near = n.near,
            far = n.far
        ));
        assert!(ok, "creating network namespaces failed");
        n
    }
    pub fn far_addr(&self) -> String {
        format!("10.213.{}.2", std::process::id() % 250)
    }
    pub fn set_link(&self, up: bool) {
        let id = std::process::id();
        let state = if up { "up" } else { "down" };
        assert!(sh(&format!("ip -n {} link set vn{id} {state}", self.near)));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!(
            "ip netns del {} 2>/dev/null; ip netns del {} 2>/dev/null",
            self.near, self.far
        ));
    }
}

/// Kills (SIGTERM, then SIGKILL) a child on drop.
pub struct Proc(pub Child);
impl Proc {
    pub fn term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
    }
    pub fn wait_output(mut self, what: &str) -> String {
        self.term();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{what} did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut s = String::new();
        if let Some(mut o) = self.0.stdout.take() {
            std::io::Read::read_to_string(&mut o, &mut s).unwrap();
        }
        s
    }
}
impl Drop for Proc {
    fn drop(&mut self) {
        self.term();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn verify(file: &Path, detector: &str) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/verify_h5.py");
    let out = Command::new("/usr/bin/python3")
        .arg(script)
        .arg(file)
        .args(["--detector", detector])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("{}")).unwrap()
}

/// The far host in `<far>`: `std-stream-recv` on `<far addr>:port` and one `std-h5-writer`
/// (`writer_args`, e.g. `--writer-index 1`), in their own mount namespace with a private tmpfs on
/// /dev/shm (both hosts use the same detector name). Its config is the near one with its own
/// `ipc_dir` under `dir` (and `ram_buffer_gb` if given); logs `dir/writer.log`, `dir/recv.log`.
/// The writer stops with the receiver (trap), so no process outlives the test.
pub struct FarHost {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: std_daq_common::DetectorConfig,
    pub proc: Proc,
}

impl FarHost {
    pub fn start(
        ns: &Netns,
        near_config: &Path,
        dir: &Path,
        port: u16,
        ram_buffer_gb: Option<f64>,
        writer_args: &str,
    ) -> FarHost {
        std::fs::create_dir_all(dir.join("ipc")).unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(near_config).unwrap()).unwrap();
        cfg["ipc_dir"] = dir.join("ipc").display().to_string().into();
        if let Some(gb) = ram_buffer_gb {
            cfg["ram_buffer_gb"] = gb.into();
        }
        let config_path = dir.join("detector.json");
        std::fs::write(&config_path, cfg.to_string()).unwrap();
        let config = std_daq_common::DetectorConfig::from_file(&config_path).unwrap();
        let bin = std_daq::pipeline::default_bin_dir().unwrap();
        let script = format!(
            "set -e; mount -t tmpfs tmpfs /dev/shm; \
             {writer} --config {cfg} {writer_args} >/dev/null 2>{dir}/writer.log & W=$!; \
             {recv} --config {cfg} --listen {addr}:{port} 2>{dir}/recv.log & R=$!; \
             trap 'kill -TERM $R $W' TERM INT; \
             wait $R || true; kill -TERM $W 2>/dev/null || true; wait $W || true",
            writer = bin.join("std-h5-writer").display(),
            recv = env!("CARGO_BIN_EXE_std-stream-recv"),
            cfg = config_path.display(),
            dir = dir.display(),
            addr = ns.far_addr(),
        );
        // `unshare --mount` makes mounts private by default; the tmpfs vanishes with it.
        let proc = Proc(
            Command::new("ip")
                .args(["netns", "exec", &ns.far, "unshare", "--mount", "sh", "-c"])
                .arg(&script)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        FarHost {
            dir: dir.to_path_buf(),
            config_path,
            config,
            proc,
        }
    }

    /// Waits until the far writer at `endpoint` sees the far image stream.
    pub fn wait_writer_connected(&self, endpoint: &str) {
        let client = std_writer_agent::writer_client::WriterClient::new(
            &zmq::Context::new(),
            endpoint,
            Duration::from_secs(5),
        );
        let status = std_daq_common::writer_command::Command::Status;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !client
            .request(&status)
            .is_ok_and(|r| r.status.is_some_and(|s| s.connected))
        {
            assert!(Instant::now() < deadline, "far writer not connected");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until a sender has opened its replication session with the far receiver.
    pub fn wait_session_open(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(self.dir.join("recv.log"))
            .unwrap_or_default()
            .contains("replication session open")
        {
            assert!(Instant::now() < deadline, "the sender never connected");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `std-stream-send` in `<near>` (so its TCP goes over the veth pair) to the far host's `port`,
/// with `extra` arguments; stderr to `log`.
pub fn start_sender(ns: &Netns, near_config: &Path, port: u16, extra: &[&str], log: &Path) -> Proc {
    Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns.near])
            .arg(env!("CARGO_BIN_EXE_std-stream-send"))
            .arg("--config")
            .arg(near_config)
            .args(["--target", &format!("{}:{port}", ns.far_addr())])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}
