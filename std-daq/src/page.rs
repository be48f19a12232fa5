//! The operator's status page: `GET /` serves `status_page.html` (plain HTML and one script, no
//! external resources, nothing fetched from a CDN) and `GET /daq/overview` the one JSON document
//! it polls: every service's counters from its Redis status hash (per module and stage), the
//! rates of `/daq/stats`, the running writes with their progress and the last finished ones, and
//! the live view's latest image. The page shows the image from `/daq/live/frame` and starts and
//! stops writes through `POST /write_async` and `POST /write_kill`.
//!
//! The writes come from a watcher of the `status` exchange (one private queue, like any client),
//! so writes started by any client (the CLI, RabbitMQ, PSI's client, the page) show, not only
//! this API's. Only statuses of this detector's agent count (its `source`, `--agent-service-name`).
//!
//! Never: touch a data path (the page reads only Redis, the status exchange and the live view's
//! own copy), keep more than [`RECENT`] finished writes, or hide a service that is down (its
//! hash is gone: shown as down, not as zeros).

use serde_json::{json, Map, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use std_daq_common::DetectorConfig;
use std_writer_agent::client::{self, ClientOptions};
use std_writer_agent::protocol::{action, unix_now, StatusMessage};

/// The page itself (docs/api.md "Status page").
pub const STATUS_PAGE_HTML: &str = include_str!("status_page.html");
/// Finished writes kept for the page.
pub const RECENT: usize = 20;
/// Wait before the watcher connects again after losing the broker.
const RECONNECT: Duration = Duration::from_secs(1);

/// One write as the page shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteRow {
    pub request_id: String,
    pub output_file: Value,
    /// None: until stopped (an unbounded write).
    pub n_images: Option<u64>,
    /// `queued`, `waiting` (for the first image), `writing`, `succeeded` or `failed`.
    pub state: &'static str,
    pub images_written: u64,
    /// The agent's last message.
    pub message: String,
    pub first_seen: f64,
    pub ended: Option<f64>,
}

impl WriteRow {
    fn json(&self) -> Value {
        json!({
            "request_id": self.request_id,
            "output_file": self.output_file,
            "n_images": self.n_images,
            "state": self.state,
            "images_written": self.images_written,
            "message": self.message,
            "first_seen": self.first_seen,
            "ended": self.ended,
        })
    }
}

/// The running and the last finished writes of one agent, from its statuses.
#[derive(Debug, Default)]
pub struct Writes {
    /// In the order they were first seen.
    running: Vec<WriteRow>,
    /// Newest first, at most [`RECENT`].
    recent: VecDeque<WriteRow>,
    statuses: u64,
}

impl Writes {
    /// Follows one status of the agent (statuses of other agents must not be passed).
    pub fn follow(&mut self, s: &StatusMessage, now: f64) {
        let state = match s.action.as_str() {
            action::REQUEST_QUEUED => "queued",
            action::REQUEST_START => "waiting",
            action::REQUEST_PROGRESS => "writing",
            action::REQUEST_SUCCESS => "succeeded",
            action::REQUEST_FAIL => "failed",
            _ => return,
        };
        self.statuses += 1;
        let at = self
            .running
            .iter()
            .position(|r| r.request_id == s.request_id);
        let mut row = match at {
            Some(i) => self.running.remove(i),
            None => WriteRow {
                request_id: s.request_id.clone(),
                output_file: Value::Null,
                n_images: None,
                state,
                images_written: 0,
                message: String::new(),
                first_seen: now,
                ended: None,
            },
        };
        let body = &s.body;
        if !body["output_file"].is_null() {
            row.output_file = body["output_file"].clone();
        }
        if let Some(n) = body["n_images"].as_u64() {
            row.n_images = Some(n);
        }
        if let Some(k) = body["images_written"].as_u64() {
            row.images_written = k;
        }
        // A progress status with nothing written yet is the "waiting for the first image" one.
        row.state = if state == "writing" && row.images_written == 0 {
            "waiting"
        } else {
            state
        };
        row.message = s.message.clone();
        if matches!(state, "succeeded" | "failed") {
            row.ended = Some(now);
            // A final status for a write already finished (a repeat) replaces it.
            self.recent.retain(|r| r.request_id != row.request_id);
            self.recent.push_front(row);
            self.recent.truncate(RECENT);
        } else {
            match at {
                Some(i) => self.running.insert(i, row),
                None => self.running.push(row),
            }
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "statuses": self.statuses,
            "running": self.running.iter().map(WriteRow::json).collect::<Vec<_>>(),
            "recent": self.recent.iter().map(WriteRow::json).collect::<Vec<_>>(),
        })
    }
}

/// What the watcher of the status exchange knows.
#[derive(Debug, Default)]
struct Watch {
    writes: Writes,
    connected: bool,
    error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The status page of one `std-daq api`.
#[derive(Debug)]
pub struct Page {
    detector: Option<DetectorConfig>,
    redis_url: String,
    agent_source: String,
    watch: Arc<Mutex<Watch>>,
}

/// The service names (after `status.std-daq.<detector>.`) the page shows, in stage order; the
/// optional ones only when their hash exists.
fn stages(cfg: &DetectorConfig) -> (Vec<String>, Vec<String>) {
    let mut core: Vec<String> = (0..cfg.n_modules)
        .map(|m| format!("udp-recv-{m}"))
        .collect();
    core.extend(["assembler", "h5-writer", "writer-agent"].map(String::from));
    let optional = ["stream-send", "stream-recv", "up"]
        .map(String::from)
        .to_vec();
    (core, optional)
}

/// A status hash as JSON: numbers as numbers, the config blob left out (it is at `/config`).
fn hash_json(fields: HashMap<String, String>) -> Value {
    let mut out = Map::new();
    let mut keys: Vec<_> = fields.into_iter().filter(|(k, _)| k != "config").collect();
    keys.sort();
    for (k, v) in keys {
        let value = if let Ok(n) = v.parse::<u64>() {
            Value::from(n)
        } else if let Ok(x) = v.parse::<f64>() {
            if x.is_finite() {
                Value::from(x)
            } else {
                Value::from(v)
            }
        } else {
            Value::from(v)
        };
        out.insert(k, value);
    }
    Value::Object(out)
}

impl Page {
    /// Starts the watcher of the status exchange (reconnecting whenever the broker goes away).
    pub fn new(
        detector: Option<DetectorConfig>,
        redis_url: String,
        client: ClientOptions,
        agent_source: String,
    ) -> Self {
        let watch = Arc::new(Mutex::new(Watch::default()));
        let (w, source) = (Arc::clone(&watch), agent_source.clone());
        std::thread::Builder::new()
            .name("page-watch".into())
            .spawn(move || loop {
                let ended = client::watch_statuses_blocking(
                    &client,
                    || {
                        let mut w = lock(&w);
                        w.connected = true;
                        w.error = None;
                    },
                    |s| {
                        if s.source == source {
                            lock(&w).writes.follow(&s, unix_now());
                        }
                    },
                );
                {
                    let mut w = lock(&w);
                    w.connected = false;
                    w.error = Some(ended.to_string());
                }
                tracing::warn!("status page: watching the status exchange: {ended}");
                std::thread::sleep(RECONNECT);
            })
            .map_err(|e| tracing::error!("status page: cannot start its watcher: {e}"))
            .ok();
        Page {
            detector,
            redis_url,
            agent_source,
            watch,
        }
    }

    /// `GET /daq/overview`: (HTTP code, JSON). `rates` is `/daq/stats`'s envelope, `live` the
    /// live view's counters.
    pub fn overview(&self, rates: Value, live: Value) -> (u16, Value) {
        let Some(cfg) = &self.detector else {
            return (
                503,
                json!({"error": "std-daq api was started without --config: no status page"}),
            );
        };
        let (core, optional) = stages(cfg);
        let prefix = format!("status.std-daq.{}.", cfg.detector_name);
        let mut services = Map::new();
        let mut redis_error = None;
        match redis::Client::open(self.redis_url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        {
            Ok(mut con) => {
                for (name, required) in core
                    .iter()
                    .map(|n| (n, true))
                    .chain(optional.iter().map(|n| (n, false)))
                {
                    let fields: HashMap<String, String> = redis::cmd("HGETALL")
                        .arg(format!("{prefix}{name}"))
                        .query(&mut con)
                        .unwrap_or_default();
                    if fields.is_empty() && !required {
                        continue;
                    }
                    let value = if fields.is_empty() {
                        Value::Null
                    } else {
                        hash_json(fields)
                    };
                    services.insert(name.clone(), value);
                }
            }
            Err(e) => redis_error = Some(format!("Redis {}: {e}", self.redis_url)),
        }
        let order: Vec<&String> = core
            .iter()
            .chain(optional.iter())
            .filter(|n| services.contains_key(n.as_str()))
            .collect();
        let watch = lock(&self.watch);
        (
            200,
            json!({
                "time": unix_now(),
                "detector": {
                    "name": cfg.detector_name,
                    "type": cfg.detector_type.as_str(),
                    "n_modules": cfg.n_modules,
                    "image_width": cfg.image_pixel_width,
                    "image_height": cfg.image_pixel_height,
                    "dtype": format!("{:?}", cfg.image_dtype()).to_lowercase(),
                },
                "stages": order,
                "services": services,
                "redis_error": redis_error,
                "rates": rates,
                "writes": {
                    "agent": self.agent_source,
                    "watching": watch.connected,
                    "watch_error": watch.error,
                    "running": watch.writes.json()["running"],
                    "recent": watch.writes.json()["recent"],
                    "statuses": watch.writes.statuses,
                },
                "live": {
                    "latest_image_id": live["latest_image_id"],
                    "images_announced": live["images_announced"],
                    "buffer_attached": live["buffer_attached"],
                    "source_error": live["source_error"],
                },
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: &str, act: &str, body: Value) -> StatusMessage {
        StatusMessage {
            request_id: id.into(),
            action: act.into(),
            source: "d.writer_agent".into(),
            message: format!("{act} of {id}"),
            body,
        }
    }

    #[test]
    fn writes_follow_the_agent_statuses_from_queued_to_finished() {
        let mut w = Writes::default();
        let file = json!({"output_file": "/data/a.h5", "n_images": 10});
        w.follow(&status("a", action::REQUEST_START, file.clone()), 1.0);
        w.follow(&status("b", action::REQUEST_QUEUED, json!({})), 2.0);
        let mut progress = file.clone();
        progress["images_written"] = 0.into();
        w.follow(
            &status("a", action::REQUEST_PROGRESS, progress.clone()),
            3.0,
        );
        assert_eq!(w.running[0].state, "waiting", "nothing written yet");
        progress["images_written"] = 4.into();
        w.follow(&status("a", action::REQUEST_PROGRESS, progress), 4.0);
        let j = w.json();
        assert_eq!(j["running"][0]["request_id"], "a", "first seen stays first");
        assert_eq!(j["running"][0]["state"], "writing");
        assert_eq!(j["running"][0]["images_written"], 4);
        assert_eq!(j["running"][0]["n_images"], 10);
        assert_eq!(j["running"][0]["output_file"], "/data/a.h5");
        assert_eq!(j["running"][1]["state"], "queued");
        w.follow(&status("x", "kill_ignored", json!({})), 5.0);
        assert_eq!(w.statuses, 4, "kill_ignored is not a write");
        let mut done = file;
        done["images_written"] = 10.into();
        w.follow(&status("a", action::REQUEST_SUCCESS, done), 6.0);
        w.follow(&status("b", action::REQUEST_FAIL, json!({})), 7.0);
        let j = w.json();
        assert_eq!(j["running"], json!([]));
        assert_eq!(j["recent"][0]["request_id"], "b", "newest first");
        assert_eq!(j["recent"][0]["state"], "failed");
        assert_eq!(j["recent"][1]["state"], "succeeded");
        assert_eq!(j["recent"][1]["images_written"], 10);
        assert_eq!(j["recent"][1]["first_seen"], 1.0);
        assert_eq!(j["recent"][1]["ended"], 6.0);
        assert_eq!(j["recent"][1]["message"], "request_success of a");
    }

    #[test]
    fn only_the_last_writes_are_kept() {
        let mut w = Writes::default();
        for i in 0..RECENT + 5 {
            w.follow(
                &status(&i.to_string(), action::REQUEST_SUCCESS, json!({})),
                0.0,
            );
        }
        assert_eq!(w.recent.len(), RECENT);
        assert_eq!(w.recent[0].request_id, (RECENT + 4).to_string());
    }

    #[test]
    fn status_hashes_become_numbers_without_the_config() {
        let h: HashMap<String, String> = [
            ("packets", "12"),
            ("rate", "1.5"),
            ("service_name", "std-daq.d.assembler"),
            ("config", "{}"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            hash_json(h),
            json!({"packets": 12, "rate": 1.5, "service_name": "std-daq.d.assembler"})
        );
    }
}
