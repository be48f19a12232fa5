//! Prometheus metrics: every service can serve its live counters (the same ones it keeps in its
//! Redis status hash) as Prometheus text on `GET /metrics`, from a thread of its own.
//!
//! Never: block the data path (the handler only reads the status board's snapshot) or panic on a
//! client's request (anything else than `GET /metrics` gets a 404, a broken client is dropped).

use crate::status::StatusBoard;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Serves `board` on `listener` until the process ends. Returns the address it listens on.
pub fn spawn(
    listener: TcpListener,
    service: &str,
    board: StatusBoard,
) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let service = sanitize_label(service);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = handle(stream, &service, &board);
            }
        })?;
    Ok(addr)
}

fn handle(stream: TcpStream, service: &str, board: &StatusBoard) -> std::io::Result<()> {
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
    let body = render(service, board);
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
        let addr = spawn(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            "jf.udp-recv-0",
            board,
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
        assert!(get("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("garbage\r\n\r\n").starts_with("HTTP/1.1 404"));
    }
}
