//! The operator's status page (`GET /` of `std-daq api`) in Debian's Chromium, headless, driven
//! over WebDriver by Debian's chromedriver (both installed by scripts/setup.sh), against the real
//! services (`std-daq up` with the writer agent), `std-daq api` and the simulator:
//! - the live image element updates while the detector runs, and its pixels (read back from the
//!   browser through a canvas) follow the simulator's pattern after the documented scaling;
//! - the rates show frames arriving; every compared counter of every module and stage on the
//!   page equals the service's Redis status hash, losses shown as losses;
//! - a write started from the page (n images) completes and shows in the last writes; an
//!   unbounded one started from the page is stopped from the page; both files are pixel-exact.
//!
//! On failure the test saves a screenshot (its path is printed) under target/tmp. Synchronised
//! on what the page shows; timeouts are watchdogs.

#![allow(clippy::unwrap_used)]

use base64::Engine;
use serde_json::{json, Value};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std_daq_tests::stack::{free_run, Proc, SetOnDrop, Stack, WATCHDOG};
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The image: 2 JUNGFRAU modules stacked.
const SIDE: u64 = 1024;
const MODULE_PIXELS: u64 = 1024 * 512;

fn wait_for<T>(what: &str, done: impl FnMut() -> Option<T>) -> T {
    std_daq_tests::stack::poll_until(what, WATCHDOG, done).unwrap()
}

/// One HTTP/1.1 exchange on 127.0.0.1:`port`: (code, body).
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Vec<u8>) {
    std_daq_tests::stack::http(port, method, path, body).unwrap()
}

/// A headless Chromium session through chromedriver's WebDriver endpoint. Saves a screenshot
/// when dropped during a panic.
struct Browser {
    port: u16,
    session: String,
    shot: PathBuf,
    _driver: Proc,
}

impl Browser {
    fn start(work: &Path) -> Browser {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: run `bash scripts/setup.sh` (it installs Debian's chromium and \
                 chromium-driver)"
            );
        }
        let port = std_daq_tests::free_port().unwrap();
        let driver = Proc(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(work.join("chromedriver.log")).unwrap())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_for("chromedriver", || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let profile = work.join("chromium-profile");
        // The flags that keep Chromium off the network and quiet on this machine.
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,1600",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let (code, body) = http(port, "POST", "/session", Some(&caps));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(code, 200, "starting Chromium: {v}");
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        Browser {
            port,
            session,
            shot: Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("status_page-failure-{}.png", std::process::id())),
            _driver: driver,
        }
    }

    /// A WebDriver command of the session; its `value`.
    fn call(&self, method: &str, cmd: &str, body: Value) -> Value {
        let path = format!("/session/{}{cmd}", self.session);
        let (code, body) = http(self.port, method, &path, Some(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(code, 200, "WebDriver {method} {cmd}: {v}");
        v["value"].clone()
    }

    fn go(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url }));
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/click"), json!({}));
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/clear"), json!({}));
        if !text.is_empty() {
            self.call(
                "POST",
                &format!("/element/{e}/value"),
                json!({ "text": text }),
            );
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let path = format!("/session/{}/screenshot", self.session);
            let (code, body) = http(self.port, "GET", &path, None);
            let png = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["value"].as_str().map(String::from))
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
            match png {
                Some(png) if code == 200 && std::fs::write(&self.shot, &png).is_ok() => {
                    eprintln!("status page at the failure: {}", self.shot.display())
                }
                _ => eprintln!("no screenshot of the failure (WebDriver answered {code})"),
            }
        }
        let _ = http(
            self.port,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}

/// The documented live-view scaling for uint16 (0..65535), recomputed.
fn grey(v: f64) -> f64 {
    (v * 255.0 / 65535.0).round().clamp(0.0, 255.0)
}

/// The counters compared between the page and Redis, per stage.
const RECEIVER_FIELDS: [&str; 6] = [
    "packets",
    "bytes",
    "frames_complete",
    "frames_incomplete",
    "missing_packets",
    "malformed_packets",
];
const ASSEMBLER_FIELDS: [&str; 4] = [
    "images",
    "images_good",
    "images_missing_packets",
    "images_lost_in_buffer",
];

/// What the page shows for a counter: (its text, its row's class).
fn page_counter(b: &Browser, service: &str, field: &str) -> Option<(String, String)> {
    let v = b.js(&format!(
        "const tr = document.querySelector('[data-service=\"{service}\"] tr[data-field=\"{field}\"]');\
         return tr ? [tr.querySelector('td').textContent, tr.className] : null;"
    ));
    Some((v[0].as_str()?.to_string(), v[1].as_str()?.to_string()))
}

/// The row of the last-writes table for `file`: (request id, state, images written, message).
fn recent_row(b: &Browser, table: &str, file: &str) -> Option<(String, String, u64, String)> {
    let v = b.js(&format!(
        "for (const tr of document.querySelectorAll('#{table} tbody tr')) {{\
           if (tr.children[{col}].textContent === {file:?}) return [tr.dataset.requestId, \
             tr.dataset.state, Number(tr.dataset.imagesWritten), tr.lastChild.textContent];\
         }} return null;",
        col = if table == "recent" { 1 } else { 0 },
    ));
    Some((
        v[0].as_str()?.to_string(),
        v[1].as_str()?.to_string(),
        v[2].as_u64()?,
        v[3].as_str()?.to_string(),
    ))
}

#[test]
fn the_status_page_shows_the_run_and_starts_and_stops_writes() {
    let mut stack = Stack::start("page", &[]).unwrap();
    let (work, root, port) = (stack.work.clone(), stack.root.clone(), stack.port);
    let (cfg, config_path) = (stack.cfg.clone(), stack.config_path.clone());
    let det = cfg.detector_name.clone();

    let b = Browser::start(&work);
    b.go(&format!("http://127.0.0.1:{port}/"));
    wait_for("the page's first overview", || {
        let v = b.js(
            "return [document.getElementById('detector-name').textContent, \
                      document.getElementById('watch').textContent];",
        );
        (v[0] == det.as_str() && v[1].as_str()?.starts_with("following")).then_some(())
    });
    wait_for("the placeholder before any image", || {
        (b.js("return document.getElementById('live').dataset.imageId;") == "none").then_some(())
    });

    let sim = stack.simulator().unwrap();
    let next_frame = AtomicU64::new(1);
    let stop = AtomicBool::new(false);

    // 1. While the detector runs: the image updates with the right pixels, the rates move.
    let sent = std::thread::scope(|scope| {
        let feeder = scope.spawn(|| free_run(&sim, &config_path, &stop, &next_frame).unwrap());
        let _stop = SetOnDrop(&stop);
        // Pixels sampled all over the image (both modules), read back through a canvas.
        let samples: Vec<u64> = (0..512u64)
            .map(|i| (i * 2053 + 17) % (SIDE * SIDE))
            .collect();
        let script = format!(
            "const img = document.getElementById('live'); const id = img.dataset.imageId;\
             if (!id || id === 'none' || !img.complete) return null;\
             const c = document.createElement('canvas'); c.width = img.naturalWidth; \
             c.height = img.naturalHeight; const g = c.getContext('2d'); g.drawImage(img, 0, 0);\
             const d = g.getImageData(0, 0, c.width, c.height).data;\
             return [id, c.width, c.height, {samples:?}.map((i) => d[4 * i])];"
        );
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let v = wait_for("a new image on the page", || {
                let v = b.js(&script);
                let id: u64 = v[0].as_str()?.parse().ok()?;
                (!seen.contains(&id)).then_some(v)
            });
            let id: u64 = v[0].as_str().unwrap().parse().unwrap();
            assert_eq!(
                (v[1].as_u64(), v[2].as_u64()),
                (Some(SIDE), Some(SIDE)),
                "{v}"
            );
            let (mut sum, mut worst) = (0.0, 0.0f64);
            for (k, &i) in samples.iter().enumerate() {
                let (module, px) = ((i / MODULE_PIXELS) as u16, (i % MODULE_PIXELS) as usize);
                let want = grey(f64::from(udp_recv::sim::pixel_value(id, module, px)));
                let got = v[3][k].as_f64().unwrap();
                sum += (got - want).abs();
                worst = worst.max((got - want).abs());
            }
            let mean = sum / samples.len() as f64;
            eprintln!("page image {id}: JPEG error over 512 pixels mean {mean:.2}, max {worst}");
            // JPEG at quality 90 on smooth ramps: about 0.2 levels on average; a wrong image or
            // a wrong scaling is tens of levels off.
            assert!(
                mean < 1.5 && worst <= 10.0,
                "image {id}: mean {mean}, max {worst}"
            );
            seen.push(id);
        }
        let shown = b.js("return Number(document.getElementById('live').dataset.framesShown);");
        assert!(
            shown.as_u64().unwrap() >= 4,
            "placeholder + 3 images: {shown}"
        );
        wait_for("a frame rate on the page", || {
            let r = b.js("return document.getElementById('rate-frames').textContent;");
            (r.as_str()?.parse::<f64>().ok()? > 0.0).then_some(())
        });
        drop(_stop);
        feeder.join().unwrap()
    });

    // 2. The detector is quiet: the page's counters equal the services' status hashes.
    wait_for("every frame counted in Redis", || {
        let all = (0..cfg.n_modules)
            .all(|m| stack.number(&format!("udp-recv-{m}"), "frames_complete") == Some(sent));
        (all && stack.number("assembler", "images") == Some(sent)).then_some(())
    });
    let mut compared: Vec<(String, &str)> = Vec::new();
    for m in 0..cfg.n_modules {
        compared.extend(
            RECEIVER_FIELDS
                .iter()
                .map(|f| (format!("udp-recv-{m}"), *f)),
        );
    }
    compared.extend(
        ASSEMBLER_FIELDS
            .iter()
            .map(|f| ("assembler".to_string(), *f)),
    );
    for (service, field) in &compared {
        let want = stack.number(service, field).unwrap();
        let (shown, class) = wait_for(&format!("{service}.{field} = {want} on the page"), || {
            page_counter(&b, service, field).filter(|(t, _)| *t == want.to_string())
        });
        assert_eq!(shown, want.to_string());
        let loss = field.contains("missing")
            || field.contains("incomplete")
            || field.contains("malformed")
            || field.contains("lost");
        if loss {
            assert_eq!(
                want, 0,
                "{service}.{field}: nothing is lost on loopback at 50 Hz"
            );
            assert_eq!(class, "loss zero", "{service}.{field}");
        } else {
            assert_eq!(class, "", "{service}.{field}");
        }
    }
    assert_eq!(
        stack.number("udp-recv-0", "packets"),
        Some(sent * u64::from(cfg.packets_per_frame()))
    );

    // 3. Writes started and stopped from the page, while the detector runs again.
    let bounded = root.join("page-bounded.h5");
    let unbounded = root.join("page-unbounded.h5");
    stop.store(false, Ordering::Relaxed);
    let stopped_at = std::thread::scope(|scope| {
        let feeder = scope.spawn(|| free_run(&sim, &config_path, &stop, &next_frame).unwrap());
        let _stop = SetOnDrop(&stop);
        let file = bounded.display().to_string();
        b.type_into("#output-file", &file);
        b.type_into("#n-images", "10");
        b.click("#start");
        let sent_id = wait_for("the page to send the request", || {
            let v = b.js("return document.getElementById('control-message').dataset.requestId;");
            v.as_str().map(String::from)
        });
        let (id, state, written, message) =
            wait_for("the bounded write in the last writes", || {
                recent_row(&b, "recent", &file)
            });
        assert_eq!(id, sent_id);
        assert_eq!((state.as_str(), written), ("succeeded", 10), "{message}");

        let file = unbounded.display().to_string();
        b.type_into("#output-file", &file);
        b.type_into("#n-images", "");
        b.click("#start");
        wait_for("the unbounded write writing", || {
            recent_row(&b, "running", &file).filter(|(_, s, k, _)| s == "writing" && *k >= 5)
        });
        b.click("#stop");
        let (_, state, written, message) = wait_for("the stopped write in the last writes", || {
            recent_row(&b, "recent", &file)
        });
        assert_eq!(state, "succeeded", "{message}");
        assert!(message.contains("stopped"), "{message}");
        assert!(written >= 5, "{written}");
        drop(_stop);
        feeder.join().unwrap();
        written
    });
    let running = b.js("return document.querySelectorAll('#running tbody tr').length;");
    assert_eq!(running, 0, "nothing runs any more");

    let report = std_daq_tests::verify_h5(&bounded, &det, "").unwrap();
    assert_eq!(
        (report["images"].as_u64(), report["exact_images"].as_u64()),
        (Some(10), Some(10)),
        "{report}"
    );
    let report = std_daq_tests::verify_h5(&unbounded, &det, "").unwrap();
    assert_eq!(
        (report["images"].as_u64(), report["exact_images"].as_u64()),
        (Some(stopped_at), Some(stopped_at)),
        "{report}"
    );

    // The overview the page polls, as JSON, says the same.
    let (code, body) = http(port, "GET", "/daq/overview", None);
    let o: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(code, 200, "{o}");
    assert_eq!(
        o["writes"]["recent"][0]["output_file"],
        unbounded.display().to_string()
    );
    assert_eq!(o["writes"]["recent"][1]["images_written"], 10);
    assert_eq!(o["services"]["assembler"]["images_lost_in_buffer"], 0);

    drop(b);
    stack.finish().unwrap();
}
