//! What the two-namespace tests share: a pair of network namespaces joined by a veth pair, a
//! child killed on drop, and the h5py checker.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::Path;
use std::process::{Child, Command};
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
