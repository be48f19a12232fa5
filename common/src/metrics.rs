//! Prometheus metrics: every service can serve its live counters (the same ones it keeps in its
//! Redis status hash) as Prometheus text on `GET /metrics`, from a thread of its own.
//!
//! Never: block the data path (the handler only reads the status board's snapshot) or panic on a
//! client's request (anything else than `GET /metrics` gets a 404, a broken client is dropped).

use crate::status::StatusBoard;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 1.0,
];

/// A latency histogram: lock-free, nothing allocated per observation.
#[derive(Debug)]
pub struct Histogram {
    name: String,
    help: String,
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn new(name: &str, help: &str) -> Arc<Self> {
        Arc::new(Histogram {
            name: name.to_string(),
            help: help.to_string(),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        })
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn render(&self, service: &str, out: &mut String) {
        let name = format!("std_daq_{}", self.name);
        out.push_str(&format!(
            "# HELP {name} {}\n# TYPE {name} histogram\n",
            self.help
        ));
        let mut cumulative = 0;
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            out.push_str(&format!(
                "{name}_bucket{{service=\"{service}\",le=\"{bound}\"}} {cumulative}\n"
            ));
        }
        let count = self.count.load(Ordering::Relaxed);
        out.push_str(&format!(
            "{name}_bucket{{service=\"{service}\",le=\"+Inf\"}} {count}\n"
        ));
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        out.push_str(&format!("{name}_sum{{service=\"{service}\"}} {sum}\n"));
        out.push_str(&format!("{name}_count{{service=\"{service}\"}} {count}\n"));
    }
}

/// For the services' `--metrics-addr` (or the config's `metrics_base_address`): binds `addr`
/// (when given) and serves `board` and `histograms` there, logging where and showing it as
/// `metrics_address` on the board.
pub fn serve_if(
    addr: Option<SocketAddr>,
    service: &str,
    board: &StatusBoard,
    histograms: Vec<Arc<Histogram>>,
) -> std::io::Result<()> {
    let Some(addr) = addr else { return Ok(()) };
    let listener = TcpListener::bind(addr).map_err(|e| {
        std::io::Error::new(e.kind(), format!("binding the metrics address {addr}: {e}"))
    })?;
    let bound = spawn(listener, service, board.clone(), histograms)?;
    // In the status hash (Redis), where `std-daq status` shows it.
    board.set("metrics_address", bound);
    tracing::info!(%bound, "serving Prometheus metrics on /metrics");
    Ok(())
}

/// Serves `board` (and `histograms`) on `listener` until the process ends. Returns the address.
pub fn spawn(
    listener: TcpListener,
    service: &str,
    board: StatusBoard,
    histograms: Vec<Arc<Histogram>>,
) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let service = sanitize_label(service);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = handle(stream, &service, &board, &histograms);
            }
        })?;
    Ok(addr)
}

fn handle(
    stream: TcpStream,
    service: &str,
    board: &StatusBoard,
    histograms: &[Arc<Histogram>],
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers (bounded) so the client sees a clean response.
    let mut line = String::new();
    for _ in 0..100 {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut out = &stream;
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    if !request_line.starts_with("GET ") || path != "/metrics" {
        return out.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    let mut body = render(service, board);
    for h in histograms {
        h.render(service, &mut body);
    }
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The board's numeric fields as Prometheus samples `std_daq_<field>{service="..."} <value>`.
pub fn render(service: &str, board: &StatusBoard) -> String {
    let mut body = String::new();
    for (key, value) in board.snapshot() {
        if value.parse::<f64>().is_err() {
            continue;
        }
        let name: String = key
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        body.push_str(&format!(
            "std_daq_{name}{{service=\"{service}\"}} {value}\n"
        ));
    }
    body
}

fn sanitize_label(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '"' && *c != '\\' && *c != '\n')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn serves_numeric_fields_and_404s_the_rest() {
        let board = StatusBoard::default();
        board.set("packets", 42);
        board.set("gbytes_per_s", 1.5);
        board.set("output_file", "/data/x.h5");
        let latency = Histogram::new("latency_seconds", "test latency");
        latency.observe(Duration::from_micros(70));
        latency.observe(Duration::from_millis(3));
        let addr = spawn(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            "jf.udp-recv-0",
            board,
            vec![latency],
        )
        .unwrap();
        let get = |req: &str| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(
            ok.contains("std_daq_packets{service=\"jf.udp-recv-0\"} 42\n"),
            "{ok}"
        );
        assert!(
            ok.contains("std_daq_gbytes_per_s{service=\"jf.udp-recv-0\"} 1.5\n"),
            "{ok}"
        );
        assert!(!ok.contains("output_file"), "{ok}");
        let bucket = |le: &str| {
            format!("std_daq_latency_seconds_bucket{{service=\"jf.udp-recv-0\",le=\"{le}\"}}")
        };
        assert!(ok.contains(&format!("{} 0\n", bucket("0.00005"))), "{ok}");
        assert!(ok.contains(&format!("{} 1\n", bucket("0.0001"))), "{ok}");
        assert!(ok.contains(&format!("{} 2\n", bucket("0.005"))), "{ok}");
        assert!(ok.contains(&format!("{} 2\n", bucket("+Inf"))), "{ok}");
        assert!(ok.contains("std_daq_latency_seconds_count{service=\"jf.udp-recv-0\"} 2\n"));
        assert!(get("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("garbage\r\n\r\n").starts_with("HTTP/1.1 404"));
    }
}
