//! `GET /daq/live` as a plain HTTP client (a TcpStream, no browser) reads it, against a real
//! pipeline, the simulator and `std-daq api` as a process: the MJPEG stream parses, each part is
//! a JPEG that decodes to the image's size, whose pixels follow the simulator's pattern after
//! the documented scaling (docs/api.md "Live view"); two viewers at once with different
//! scalings; bad parameters refused; a viewer that leaves ends its stream; `/daq/live/stats`
//! answers while streams run. Synchronised on data (frames arriving); timeouts are watchdogs.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};
use std_daq::pipeline::{default_bin_dir, Pipeline};
use std_daq_tests::stack::{free_run, SetOnDrop};

const WATCHDOG: Duration = Duration::from_secs(90);
const SIDE: usize = 1024;
const MODULE_PIXELS: usize = 1024 * 512;

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WATCHDOG;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills (SIGTERM, then waits) on drop.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// GET `path`: (status code, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WATCHDOG)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

fn stats(port: u16) -> serde_json::Value {
    let (code, body) = http_get(port, "/daq/live/stats");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// One multipart part: its headers (lower-case names) and body.
struct Part {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Part {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.headers))
    }
    fn image_id(&self) -> Option<u64> {
        match self.header("x-image-id") {
            "none" => None,
            id => Some(id.parse().unwrap()),
        }
    }
}

/// A viewer of /daq/live reading the multipart stream by hand.
struct Viewer {
    reader: BufReader<TcpStream>,
    boundary: String,
}

fn read_headers(reader: &mut impl BufRead) -> HashMap<String, String> {
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended");
        let line = line.trim_end();
        if line.is_empty() {
            return headers;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
}

impl Viewer {
    fn open(port: u16, path: &str) -> Viewer {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(WATCHDOG)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut reader = BufReader::new(s);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let headers = read_headers(&mut reader);
        let ct = &headers["content-type"];
        let boundary = ct
            .strip_prefix("multipart/x-mixed-replace; boundary=")
            .unwrap_or_else(|| panic!("content type {ct}"))
            .to_string();
        Viewer { reader, boundary }
    }

    fn next_part(&mut self) -> Part {
        let mut line = String::new();
        // The CRLF that ends the previous part's body belongs to the delimiter.
        while line.trim_end().is_empty() {
            line.clear();
            assert!(
                self.reader.read_line(&mut line).unwrap() > 0,
                "stream ended"
            );
        }
        assert_eq!(line.trim_end(), format!("--{}", self.boundary));
        let headers = read_headers(&mut self.reader);
        assert_eq!(headers["content-type"], "image/jpeg");
        let n: usize = headers["content-length"].parse().unwrap();
        let mut body = vec![0; n];
        self.reader.read_exact(&mut body).unwrap();
        Part { headers, body }
    }

    /// The next part that shows an image (placeholders and keep-alive repeats skipped).
    fn next_image(&mut self, after: Option<u64>) -> (u64, Part) {
        loop {
            let part = self.next_part();
            match part.image_id() {
                Some(id) if after.is_none_or(|a| id > a) => return (id, part),
                _ => {}
            }
        }
    }
}

fn decode(jpeg: &[u8]) -> (usize, usize, Vec<u8>) {
    let mut d = jpeg_decoder::Decoder::new(jpeg);
    let pixels = d.decode().unwrap();
    let info = d.info().unwrap();
    assert_eq!(info.pixel_format, jpeg_decoder::PixelFormat::L8);
    (usize::from(info.width), usize::from(info.height), pixels)
}

/// The documented rule, recomputed: clamp(round((v - min) * 255 / (max - min)), 0, 255).
fn grey(v: f64, min: f64, max: f64) -> u8 {
    ((v - min) * 255.0 / (max - min)).round().clamp(0.0, 255.0) as u8
}

/// The JPEG tolerance: encoded at quality 90 (A) and 95 (B) the error is about 0.2 levels on
/// average and 1 at the 99th percentile (the pattern is smooth ramps with an edge every 64 rows);
/// the bounds (mean < 1, p99 <= 4) leave room for that and still fail a wrong scaling, a wrong
/// image or a shifted module (those give errors of tens of levels).
///
/// Mean and 99th percentile of |decoded - expected| for image `id`, from the simulator's
/// formula (2 JUNGFRAU modules stacked, as the preview test places them).
fn errors(id: u64, part: &Part, min: f64, max: f64) -> (f64, u8) {
    assert_eq!(part.header("x-scale-min").parse::<f64>().unwrap(), min);
    assert_eq!(part.header("x-scale-max").parse::<f64>().unwrap(), max);
    assert_eq!(part.header("x-bin"), "1");
    assert_eq!(part.header("x-image-width"), "1024");
    let (w, h, pixels) = decode(&part.body);
    assert_eq!((w, h), (SIDE, SIDE), "image {id}");
    let mut diffs: Vec<u8> = pixels
        .iter()
        .enumerate()
        .map(|(i, &got)| {
            let (module, px) = ((i / MODULE_PIXELS) as u16, i % MODULE_PIXELS);
            let v = f64::from(udp_recv::sim::pixel_value(id, module, px));
            got.abs_diff(grey(v, min, max))
        })
        .collect();
    let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
    diffs.sort_unstable();
    (mean, diffs[diffs.len() * 99 / 100])
}

#[test]
fn a_plain_http_client_reads_the_live_view_as_mjpeg() {
    let opts = std_daq_tests::options("live").unwrap();
    let work = opts.work_dir.clone();
    let p = Pipeline::start(opts, Duration::from_secs(60)).unwrap();
    let port = std_daq_tests::free_port().unwrap();
    let _api = Proc(
        Command::new(default_bin_dir().unwrap().join("std-daq"))
            .args(["api", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--tag", "live-test-no-agent"])
            .arg("--config")
            .arg(&p.config_path)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(work.join("api.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("the API", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    // Refused with the reason, before any stream starts.
    for bad in [
        "/daq/live?max_fps=abc",
        "/daq/live?fps=3",
        "/daq/live?min=9&max=1",
    ] {
        let (code, body) = http_get(port, bad);
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body.contains("error"), "{body}");
    }
    // A client that is not HTTP, and one that leaves at once: no harm done.
    {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(WATCHDOG)).unwrap();
        s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
        let _ = s.read_to_end(&mut Vec::new());
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /daq/live HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
    }

    // Viewer A (defaults but a faster rate) sees the placeholder before any image exists.
    let mut a = Viewer::open(port, "/daq/live?max_fps=10");
    let first = a.next_part();
    assert_eq!(first.image_id(), None, "no image yet: the placeholder");
    let (w, h, _) = decode(&first.body);
    assert_eq!((w, h), (16, 16));
    // Viewer B at the same time, with its own range (clipping on real data).
    let mut b = Viewer::open(port, "/daq/live?min=10000&max=50000&quality=95");

    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // The detector runs in batches until the viewers have what they need (watchdog: 200
        // batches = 5000 frames); frame numbers continue from batch to batch.
        let (sim, config, stop) = (
            default_bin_dir().unwrap().join("std-det-sim"),
            &p.config_path,
            &stop,
        );
        let next_frame = AtomicU64::new(1);
        let feeder = scope.spawn(move || free_run(&sim, config, stop, &next_frame).unwrap());
        let _stop = SetOnDrop(stop);
        let mut last = None;
        for _ in 0..3 {
            let (id, part) = a.next_image(last);
            let (mean, p99) = errors(id, &part, 0.0, 65535.0);
            eprintln!("viewer A: image {id}: JPEG error mean {mean:.3}, p99 {p99}");
            assert!(
                mean < 1.0 && p99 <= 4,
                "A image {id}: mean {mean}, p99 {p99}"
            );
            last = Some(id);
        }
        let mut last = None;
        for _ in 0..2 {
            let (id, part) = b.next_image(last);
            let (mean, p99) = errors(id, &part, 10000.0, 50000.0);
            eprintln!("viewer B: image {id}: JPEG error mean {mean:.3}, p99 {p99}");
            assert!(
                mean < 1.0 && p99 <= 4,
                "B image {id}: mean {mean}, p99 {p99}"
            );
            last = Some(id);
        }
        // The API answers while both streams run.
        let s = stats(port);
        assert!(s["frames_sent"].as_u64().unwrap() >= 5, "{s}");
        assert!(s["images_announced"].as_u64().unwrap() >= 3, "{s}");
        assert_eq!(s["buffer_attached"], true, "{s}");
        assert!(s["viewers_total"].as_u64().unwrap() >= 2, "{s}");
        wait_for("the viewer that left at once to be noticed", || {
            stats(port)["viewers_active"] == 2
        });
        drop(_stop);
        feeder.join().unwrap();
    });

    // Viewers leaving end their streams (noticed at the next frame or keep-alive).
    drop(a);
    wait_for("viewer A's stream to end", || {
        stats(port)["viewers_active"] == 1
    });
    drop(b);
    wait_for("viewer B's stream to end", || {
        stats(port)["viewers_active"] == 0
    });
    let s = stats(port);
    for key in [
        "frames_repeated",
        "skipped_rate",
        "skipped_overwritten",
        "skipped_unreadable",
    ] {
        assert!(s[key].is_u64(), "{key}: {s}");
    }
    assert_eq!(s["viewers"], serde_json::json!([]));
    eprintln!("/daq/live/stats at the end: {s}");

    drop(_api);
    let stop = p.stop().unwrap();
    assert!(
        stop.failed.is_empty() && stop.leftovers.is_empty(),
        "{stop:?}"
    );
    std::fs::remove_dir_all(work).unwrap();
}
