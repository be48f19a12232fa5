//! Every service's counters for a run, for the file's `run_counters` attribute
//! (docs/file-format.md): each service of the detector that serves metrics
//! (`metrics_base_address`) is read at the run's start and at its end, and the file keeps both
//! readings and their difference, so a file says how many packets its receivers took, dropped
//! as malformed or lost, how many images the assembler made, lost in its buffer or straggled on,
//! without the operator's Prometheus history.
//!
//! A reading is `GET /metrics` of the service's own endpoint (its live board, not the status
//! hash Redis holds up to 5 s old), with a short timeout. The start readings are taken before
//! the run's start is answered, i.e. before the detector is triggered; the end reading is
//! repeated until the board's `counters_at` is not older than the run's end (the receivers and
//! the assembler refresh it every 100 ms), so it counts every packet and image of the run. Exact
//! for a detector that is quiet when the run starts and ends (a triggered acquisition); a
//! free-running one adds what arrived between the services' last refresh and those moments. A
//! service that does not answer is named in `unreachable`, never a reason to fail the run.
//!
//! Never: read per image, or hold up a run's start or end beyond [`READ_TIMEOUT`] and
//! [`FRESH_WITHIN`].

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use std_daq_common::config::MetricsService;
use std_daq_common::status::COUNTERS_AT;
use std_daq_common::DetectorConfig;

/// How long one service may take to answer (connect, request, response).
pub const READ_TIMEOUT: Duration = Duration::from_millis(500);
/// A metrics page larger than this is not a std-daq service's.
const MAX_PAGE: u64 = 1 << 20;

/// One service's counters at one moment: `std_daq_<name>` samples without labels other than
/// `service` (histograms are left out).
pub type Reading = BTreeMap<String, f64>;

/// The services whose counters a run's file keeps, by name and metrics address.
pub fn services(cfg: &DetectorConfig) -> Vec<(String, SocketAddr)> {
    let mut out = Vec::new();
    let mut add = |name: String, s: MetricsService| {
        if let Some(addr) = cfg.metrics_addr(s) {
            out.push((name, addr));
        }
    };
    for m in 0..cfg.n_modules {
        add(format!("udp-recv-{m}"), MetricsService::Receiver(m));
    }
    add("assembler".into(), MetricsService::Assembler);
    add("h5-writer-0".into(), MetricsService::Writer);
    for k in 1..cfg.number_of_writers.max(1) {
        add(
            format!("h5-writer-{k}"),
            MetricsService::OtherWriter(k as u16),
        );
    }
    add("writer-agent".into(), MetricsService::WriterAgent);
    add("stream-send".into(), MetricsService::StreamSend);
    out
}

/// Reads one service's counters.
pub fn read(addr: SocketAddr) -> std::io::Result<Reading> {
    let mut s = TcpStream::connect_timeout(&addr, READ_TIMEOUT)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.set_write_timeout(Some(READ_TIMEOUT))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: std-daq\r\nConnection: close\r\n\r\n")?;
    let mut page = String::new();
    s.take(MAX_PAGE).read_to_string(&mut page)?;
    let (head, body) = page.split_once("\r\n\r\n").unwrap_or(("", ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "answered {:?}",
            head.lines().next().unwrap_or("nothing")
        )));
    }
    Ok(parse(body))
}

/// The `std_daq_<name>{service="..."} <value>` lines of a metrics page.
pub fn parse(body: &str) -> Reading {
    body.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("std_daq_")?.split_once('{')?;
            let (labels, value) = rest.split_once("} ")?;
            // Only the service label: a histogram's buckets have `le` too.
            if labels.contains(',') {
                return None;
            }
            Some((name.to_string(), value.trim().parse::<f64>().ok()?))
        })
        .collect()
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// How long a reading waits for a service's board to be refreshed after the moment it is for.
pub const FRESH_WITHIN: Duration = Duration::from_secs(1);

/// One service's counters as of `not_before` (UNIX seconds) or later: read again (every 20 ms,
/// up to [`FRESH_WITHIN`]) while its board's `counters_at` is older. A service without
/// `counters_at` is taken as read.
fn read_fresh(addr: SocketAddr, not_before: f64) -> Result<Reading, String> {
    let deadline = std::time::Instant::now() + FRESH_WITHIN;
    loop {
        let r = read(addr).map_err(|e| format!("{addr}: {e}"))?;
        match r.get(COUNTERS_AT) {
            Some(at) if *at < not_before && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => return Ok(r),
        }
    }
}

/// Every service read as of now, in parallel (one thread each: a slow one costs its timeout
/// once); `fresh`: each reading as of now or later ([`read_fresh`]).
fn read_all(services: &[(String, SocketAddr)], fresh: bool) -> Readings {
    let at = now_s();
    let not_before = if fresh { at } else { 0.0 };
    let handles: Vec<_> = services
        .iter()
        .map(|(name, addr)| {
            let addr = *addr;
            (
                name.clone(),
                std::thread::spawn(move || read_fresh(addr, not_before)),
            )
        })
        .collect();
    let readings = handles
        .into_iter()
        .map(|(name, h)| {
            let r = h
                .join()
                .unwrap_or_else(|_| Err("the reading thread panicked".into()));
            (name, r)
        })
        .collect();
    (at, readings)
}

type Readings = (f64, Vec<(String, Result<Reading, String>)>);

/// The start readings of a run.
#[derive(Debug)]
pub struct RunCounters {
    services: Vec<(String, SocketAddr)>,
    start: Readings,
}

impl RunCounters {
    /// Reads every service of `cfg` now, before the run's start is answered (so before the
    /// detector is triggered; a few ms, at most [`READ_TIMEOUT`]); None without
    /// `metrics_base_address`.
    pub fn start(cfg: &DetectorConfig) -> Option<Self> {
        Self::for_services(services(cfg))
    }

    fn for_services(services: Vec<(String, SocketAddr)>) -> Option<Self> {
        if services.is_empty() {
            return None;
        }
        // As the boards are now: waiting for a refresh could count the run's first packets as
        // before it, when the detector starts at once.
        let start = read_all(&services, false);
        Some(RunCounters { services, start })
    }

    /// Reads every service again and returns the `run_counters` JSON: per service `start`,
    /// `end` and `run` (end - start, for every counter read both times), the reading times
    /// (`start_time`, `end_time`, UNIX seconds) and `unreachable` (service: why).
    pub fn finish(self) -> Value {
        let (start_time, start) = self.start;
        // Fresh boards: every packet and image before the run's end is on them.
        let (end_time, end) = read_all(&self.services, true);
        let mut start: BTreeMap<String, Result<Reading, String>> = start.into_iter().collect();
        let mut services = Map::new();
        let mut unreachable = Map::new();
        for (name, end) in end {
            let start = start.remove(&name).unwrap_or(Err("not read".into()));
            match (start, end) {
                (Ok(s), Ok(e)) => {
                    let run: Map<String, Value> = e
                        .iter()
                        .filter(|(k, _)| k.as_str() != COUNTERS_AT)
                        .filter_map(|(k, v)| Some((k.clone(), number(v - s.get(k)?))))
                        .collect();
                    services.insert(
                        name,
                        json!({"start": reading_json(&s), "end": reading_json(&e), "run": run}),
                    );
                }
                (Err(why), _) | (_, Err(why)) => {
                    unreachable.insert(name, Value::String(why));
                }
            }
        }
        json!({
            "start_time": start_time,
            "end_time": end_time,
            "services": services,
            "unreachable": unreachable,
        })
    }
}

/// A root attribute of the file at `path` that holds JSON text (`run_counters`, `run_summary`);
/// the error says what was missing.
pub fn root_json_attr(path: &std::path::Path, name: &str) -> Result<Value, String> {
    let file = hdf5::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let text = file
        .attr(name)
        .and_then(|a| a.read_scalar::<hdf5::types::VarLenUnicode>())
        .map_err(|e| format!("the attribute {name} of {}: {e}", path.display()))?;
    serde_json::from_str(text.as_str()).map_err(|e| format!("{name} is not JSON ({e}): {text}"))
}

/// One line of what `run_counters` says: the receivers' packets, the assembler's images.
pub fn summary(c: &Value) -> String {
    let services = c["services"].as_object();
    let run = |name: &str, key: &str| c["services"][name]["run"][key].as_i64().unwrap_or(0);
    let receivers: Vec<&String> = services
        .map(|s| s.keys().filter(|k| k.starts_with("udp-recv-")).collect())
        .unwrap_or_default();
    let sum = |key: &str| receivers.iter().map(|r| run(r, key)).sum::<i64>();
    let mut line = format!(
        "{} receivers: {} packets ({} malformed, {} missing); assembler: {} images ({} good, {} lost in buffer)",
        receivers.len(),
        sum("packets"),
        sum("malformed_packets"),
        sum("missing_packets"),
        run("assembler", "images"),
        run("assembler", "images_good"),
        run("assembler", "images_lost_in_buffer"),
    );
    if let Some(u) = c["unreachable"].as_object().filter(|u| !u.is_empty()) {
        let names: Vec<&str> = u.keys().map(String::as_str).collect();
        line.push_str(&format!("; not running: {}", names.join(", ")));
    }
    line
}

/// Whole numbers as JSON integers (counters), others as floats (rates).
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

fn reading_json(r: &Reading) -> Value {
    Value::Object(r.iter().map(|(k, v)| (k.clone(), number(*v))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std_daq_common::status::StatusBoard;

    #[test]
    fn parses_counters_and_skips_histograms() {
        let page = "std_daq_packets{service=\"jf.udp-recv-0\"} 128\n\
                    std_daq_gbytes_per_s{service=\"x\"} 1.5\n\
                    std_daq_latency_seconds_bucket{service=\"x\",le=\"0.001\"} 3\n\
                    # HELP something\n\
                    std_daq_bad{service=\"x\"} not-a-number\n";
        let r = parse(page);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r["packets"], 128.0);
        assert_eq!(r["gbytes_per_s"], 1.5);
    }

    #[test]
    fn a_run_keeps_start_end_and_difference_and_names_who_did_not_answer() {
        let board = StatusBoard::default();
        board.set("packets", 100);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std_daq_common::metrics::spawn(listener, "r0", board.clone(), vec![]).unwrap();
        // A port nobody listens on (bound, then closed).
        let gone = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let counters = RunCounters::for_services(vec![
            ("udp-recv-0".into(), addr),
            ("assembler".into(), gone),
        ])
        .unwrap();
        board.set("packets", 612);
        let v = counters.finish();
        assert_eq!(v["services"]["udp-recv-0"]["start"]["packets"], 100);
        assert_eq!(v["services"]["udp-recv-0"]["end"]["packets"], 612);
        assert_eq!(v["services"]["udp-recv-0"]["run"]["packets"], 512);
        let why = v["unreachable"]["assembler"].as_str().unwrap();
        assert!(why.contains(&gone.to_string()), "{why}");
        assert!(v["end_time"].as_f64().unwrap() >= v["start_time"].as_f64().unwrap());
    }
}
