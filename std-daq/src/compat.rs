//! PSI std_daq REST compatibility (`std-daq-client` 1.3.5 and the scripts and BEC devices built on
//! it): `/daq/config`, `/writer/write_async`, `/writer/write_sync`, `/writer/stop`,
//! `/writer/status`, `/daq/stats`, `/daq/logs/<n>`, `/daq/deployment`, with PSI's envelope
//! `{"status": "ok"|"error", "message", <key>}`. A refused request is HTTP 200 with status
//! `error` and our message (the client raises `StdDaqAdminException(message)`); only a request
//! this server cannot parse as HTTP gets another code. Writes go to the writer agent over
//! RabbitMQ like any client's; the writer and acquisition states are derived from the agent's
//! statuses (docs/api.md has the mapping).
//!
//! Never: report a write as finished before the agent's final status, hold a lock across a
//! network call, or panic on what a client sends.

use crate::deploy;
use serde_json::{json, Map, Value};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use std_daq_common::DetectorConfig;
use std_writer_agent::client::{self, BlockingError, ClientError};
use std_writer_agent::protocol::{action, unix_now, StatusMessage};

/// The message of a request no status came back for yet.
const SENT: &str = "Request sent to the writer agent.";

/// How many acquisitions `/daq/logs` keeps in Redis.
pub const MAX_LOGS: isize = 1000;

/// The acquisition the compat routes started last (PSI's writer driver has one at a time).
#[derive(Debug, Clone)]
struct Acquisition {
    request_id: String,
    /// PSI's `info`: {n_images, output_file, run_id}.
    info: Value,
    n_images: Option<u64>,
    state: &'static str,
    message: String,
    images_written: u64,
    start_time: Option<f64>,
    stop_time: Option<f64>,
    /// The agent's final status arrived (or the API lost track of the request).
    done: bool,
    /// Lost track (broker gone, timeout): the writer state is UNKNOWN until `/writer/stop`.
    lost: bool,
}

impl Acquisition {
    fn json(&self) -> Value {
        json!({
            "state": self.state,
            "message": self.message,
            "info": self.info,
            "stats": {
                "n_write_completed": self.images_written,
                "n_write_requested": self.images_written,
                "start_time": self.start_time,
                "stop_time": self.stop_time,
            },
        })
    }

    /// Follows one agent status (the mapping of docs/api.md).
    fn update(&mut self, s: &StatusMessage) {
        let written = s.body["images_written"].as_u64();
        if let Some(k) = written {
            self.images_written = k;
        }
        match s.action.as_str() {
            action::REQUEST_QUEUED => {
                self.state = "WAITING_IMAGES";
                self.message = format!("Queued: {}", s.message);
            }
            action::REQUEST_START => {
                self.state = "WAITING_IMAGES";
                self.message = "Waiting for the first image.".into();
                self.start_time.get_or_insert_with(unix_now);
            }
            action::REQUEST_PROGRESS => {
                self.start_time.get_or_insert_with(unix_now);
                if self.images_written == 0 {
                    self.state = "WAITING_IMAGES";
                    self.message = s.message.clone();
                } else if self.n_images.is_some_and(|n| self.images_written >= n) {
                    self.state = "FLUSHING_IMAGES";
                    self.message = "All images received; closing the file.".into();
                } else {
                    self.state = "WRITING";
                    self.message = s.message.clone();
                }
            }
            action::REQUEST_SUCCESS => {
                let ended = s.body["run"]["end"].as_str().unwrap_or("completed");
                self.state = "FINISHED";
                self.message = if ended == "completed" {
                    "Completed.".into()
                } else {
                    "Interrupted.".into()
                };
                self.finish();
            }
            action::REQUEST_FAIL => {
                let killed = s.body["killed"] == true || s.body["run"]["end"] == "killed";
                if killed && self.images_written > 0 {
                    // Stopped on request: the file holds what was written (PSI: FINISHED,
                    // "Interrupted."), with the agent's words.
                    self.state = "FINISHED";
                    self.message = format!("Interrupted. {}", s.message);
                } else {
                    self.state = "FAILED";
                    self.message = format!("ERROR: {}", s.message);
                }
                self.finish();
            }
            _ => {}
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.stop_time = Some(unix_now());
    }
}

/// Rates from the services' Redis status: counter values as first seen, per counter.
#[derive(Debug, Default)]
struct Rates {
    samples: std::collections::HashMap<String, [(f64, f64); 2]>,
}

impl Rates {
    /// Records `value` of `counter` seen at `now` and returns its rate per second: the change
    /// between the last two distinct values over the time between them, 0 when the counter has
    /// not changed for 15 s (the status hashes refresh every 5 s) or is seen for the first time.
    fn rate(&mut self, counter: &str, value: f64, now: f64) -> f64 {
        let entry = self
            .samples
            .entry(counter.to_string())
            .or_insert([(now, value), (now, value)]);
        if value != entry[1].1 {
            if value < entry[1].1 {
                // Restarted: start again from here.
                *entry = [(now, value), (now, value)];
            } else {
                *entry = [entry[1], (now, value)];
            }
        }
        let [(t0, v0), (t1, v1)] = *entry;
        if now - t1 > 15.0 || t1 <= t0 {
            0.0
        } else {
            (v1 - v0) / (t1 - t0)
        }
    }
}

#[derive(Debug)]
pub struct Compat {
    client: client::ClientOptions,
    redis_url: String,
    /// The config `std-daq api --config` was given (used until one is set at run time).
    file_config: Option<Value>,
    current: Mutex<Option<Acquisition>>,
    rates: Mutex<Rates>,
}

type Reply = (u16, Value);

fn ok(message: impl Into<String>, key: &str, value: Value) -> Reply {
    let mut m = Map::new();
    m.insert("status".into(), "ok".into());
    m.insert("message".into(), message.into().into());
    m.insert(key.into(), value);
    (200, Value::Object(m))
}

fn error(message: impl Into<String>) -> Reply {
    (200, json!({"status": "error", "message": message.into()}))
}

fn idle_writer() -> Value {
    json!({
        "state": "READY",
        "acquisition": {
            "state": "FINISHED", "message": "No acquisition yet.",
            "info": {"n_images": null, "output_file": null, "run_id": null},
            "stats": {"n_write_completed": 0, "n_write_requested": 0,
                      "start_time": null, "stop_time": null},
        }
    })
}

impl Compat {
    pub fn new(
        client: client::ClientOptions,
        redis_url: String,
        file_config: Option<Value>,
    ) -> Self {
        Compat {
            client,
            redis_url,
            file_config,
            current: Mutex::new(None),
            rates: Mutex::new(Rates::default()),
        }
    }

    /// The route for `method path`, or None when it is not one of PSI's.
    pub fn route(self: &Arc<Self>, method: &str, path: &str, body: &[u8]) -> Option<Reply> {
        self.route_traced(method, path, body, None)
    }

    /// [`Compat::route`] with the HTTP request's `traceparent` header, which a write forwards
    /// to the agent as the AMQP header.
    pub fn route_traced(
        self: &Arc<Self>,
        method: &str,
        path: &str,
        body: &[u8],
        traceparent: Option<&str>,
    ) -> Option<Reply> {
        Some(match (method, path) {
            ("GET", "/daq/config") => self.get_config(),
            ("POST", "/daq/config") => self.set_config(body),
            ("POST", "/writer/write_async") => self.write(body, traceparent, false),
            ("POST", "/writer/write_sync") => self.write(body, traceparent, true),
            ("POST", "/writer/stop") => self.stop(),
            ("GET", "/writer/status") => {
                let w = self.writer_status();
                let message = format!("Writer is {}", w["state"].as_str().unwrap_or("UNKNOWN"));
                ok(message, "writer", w)
            }
            ("GET", "/daq/stats") => self.stats(),
            ("GET", p) if p.starts_with("/daq/logs/") => self.logs(&p["/daq/logs/".len()..]),
            ("GET", "/daq/deployment") => self.deployment(),
            _ => return None,
        })
    }

    fn redis(&self) -> Result<redis::Connection, String> {
        redis::Client::open(self.redis_url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .map_err(|e| format!("cannot reach Redis at {}: {e}", self.redis_url))
    }

    /// The detector's config: the newest one set at run time, else the one of `--config`.
    fn config(&self) -> Result<(Value, Option<String>), String> {
        let Some(file) = &self.file_config else {
            return Err(
                "std-daq api was started without --config: it does not know the \
                        detector"
                    .into(),
            );
        };
        let det = file["detector_name"].as_str().unwrap_or_default();
        let mut con = self.redis()?;
        let newest: redis::Value = redis::cmd("XREVRANGE")
            .arg(deploy::configs_key(det))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(&mut con)
            .map_err(|e| format!("reading {}: {e}", deploy::configs_key(det)))?;
        Ok(match newest_entry(&newest) {
            Some((id, json)) => match serde_json::from_str(&json) {
                Ok(v) => (v, Some(id)),
                Err(_) => (file.clone(), None),
            },
            None => (file.clone(), None),
        })
    }

    fn get_config(&self) -> Reply {
        match self.config() {
            Ok((c, _)) => {
                let bits = c["bit_depth"].clone();
                ok(format!("DAQ configured for bit_depth={bits}."), "config", c)
            }
            Err(e) => error(e),
        }
    }

    fn set_config(&self, body: &[u8]) -> Reply {
        let origin = "HTTP POST /daq/config";
        let change: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return error(format!("config {origin}: the body is not JSON: {e}")),
        };
        let (current, _) = match self.config() {
            Ok(c) => c,
            Err(e) => return error(e),
        };
        let old = match DetectorConfig::from_json_str(&current.to_string(), "the current config") {
            Ok(c) => c,
            Err(e) => return error(e.to_string()),
        };
        let merged = match deploy::merge(&current, &change) {
            Ok(m) => m,
            Err(e) => return error(format!("config {origin}: {e}")),
        };
        let new = match deploy::validate_change(&old, &merged, origin) {
            Ok(c) => c,
            Err(e) => return error(e),
        };
        if let Some(a) = self.active() {
            return error(format!(
                "a write is running (request {}, {}): stop it or wait for it to end before \
                 changing the config (applying it restarts the writer)",
                a.request_id, a.info["output_file"]
            ));
        }
        let keys = deploy::changed_keys(&current, &merged);
        let restart = deploy::restart_summary(&keys);
        match self.store(&new, &merged, &keys, &restart) {
            Ok(message) => ok(message, "config", merged),
            Err(e) => error(e),
        }
    }

    /// Stores a validated config and starts its deployment record; returns the message.
    fn store(
        &self,
        cfg: &DetectorConfig,
        json: &Value,
        keys: &[String],
        restart: &[&str],
    ) -> Result<String, String> {
        let det = &cfg.detector_name;
        let mut con = self.redis()?;
        let text = json.to_string();
        let supervised: bool = redis::cmd("EXISTS")
            .arg(format!("status.{}", deploy::supervisor_status_name(det)))
            .query(&mut con)
            .map_err(|e| format!("Redis: {e}"))?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for service in deploy::service_names(cfg) {
            pipe.cmd("SET")
                .arg(format!("config.{service}"))
                .arg(&text)
                .ignore();
        }
        pipe.add_command(deploy::add_config(det, &text, "HTTP POST /daq/config"));
        let (id,): (String,) = pipe
            .query(&mut con)
            .map_err(|e| format!("storing the config in Redis: {e}"))?;
        let what = if keys.is_empty() {
            "nothing changed".to_string()
        } else {
            format!("changed {}", keys.join(", "))
        };
        let (status, message) = if restart.is_empty() {
            (
                "SUCCESS",
                format!("Config {id} stored ({what}); no service needs a restart."),
            )
        } else if supervised {
            (
                "RUNNING",
                format!(
                    "Config {id} stored ({what}); std-daq up restarts {}.",
                    restart.join(", ")
                ),
            )
        } else {
            (
                "RESTART_NEEDED",
                format!(
                    "Config {id} stored ({what}) in Redis (config.std-daq.{det}.<service>); no \
                     std-daq up --watch-config supervises {det}, so restart {} yourself to \
                     apply it.",
                    restart.join(", ")
                ),
            )
        };
        let now = unix_now();
        let services: Map<String, Value> = restart
            .iter()
            .map(|s| {
                let state = match status {
                    "RUNNING" => "Deploying",
                    _ => "Restart needed",
                };
                (s.to_string(), Value::from(state))
            })
            .collect();
        let stop = (status != "RUNNING").then_some(now);
        let record = deploy::deployment(&id, status, &message, &services, now, stop);
        // The supervisor may have applied it already: never overwrite its record of this config.
        let _: i64 = redis::cmd("EVAL")
            .arg(
                r"local cur = redis.call('GET', KEYS[1])
              if cur then
                local ok, rec = pcall(cjson.decode, cur)
                if ok and type(rec) == 'table' and rec.config_id == ARGV[1] then return 0 end
              end
              redis.call('SET', KEYS[1], ARGV[2])
              return 1",
            )
            .arg(1)
            .arg(deploy::deployment_key(det))
            .arg(&id)
            .arg(record.to_string())
            .query(&mut con)
            .map_err(|e| format!("storing the deployment record: {e}"))?;
        Ok(message)
    }

    fn deployment(&self) -> Reply {
        let det = match self.config() {
            Ok((c, _)) => c["detector_name"].as_str().unwrap_or_default().to_string(),
            Err(e) => return error(e),
        };
        let record: Option<String> = match self.redis().and_then(|mut con| {
            redis::cmd("GET")
                .arg(deploy::deployment_key(&det))
                .query(&mut con)
                .map_err(|e| format!("Redis: {e}"))
        }) {
            Ok(r) => r,
            Err(e) => return error(e),
        };
        let value = record
            .and_then(|r| serde_json::from_str(&r).ok())
            .unwrap_or_else(|| {
                deploy::deployment(
                    "",
                    "SUCCESS",
                    "No config was set at run time: the services run with their config files.",
                    &Map::new(),
                    0.0,
                    Some(0.0),
                )
            });
        ok(format!("Deployment status for {det}."), "deployment", value)
    }

    /// The running acquisition, if any.
    fn active(&self) -> Option<Acquisition> {
        self.current
            .lock()
            .ok()?
            .as_ref()
            .filter(|a| !a.done)
            .cloned()
    }

    fn writer_status(&self) -> Value {
        let current = self.current.lock().ok().and_then(|c| c.clone());
        match current {
            None => idle_writer(),
            Some(a) => {
                let state = if a.lost {
                    "UNKNOWN"
                } else if a.done {
                    "READY"
                } else {
                    "WRITING"
                };
                json!({"state": state, "acquisition": a.json()})
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut Acquisition)) {
        if let Ok(mut c) = self.current.lock() {
            if let Some(a) = c.as_mut() {
                f(a);
            }
        }
    }

    fn write(self: &Arc<Self>, body: &[u8], traceparent: Option<&str>, sync: bool) -> Reply {
        let request: Value = match serde_json::from_slice(body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return error("the write request must be a JSON object"),
            Err(e) => return error(format!("the write request is not JSON: {e}")),
        };
        // PSI's run_id: the request's, or the request time in ns.
        let run_id = request.get("run_id").cloned().unwrap_or_else(|| {
            let ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            Value::from(ns)
        });
        let mut sent = request.clone();
        sent["run_id"] = run_id.clone();
        let n_images = request["n_images"].as_u64();
        let id = client::new_request_id();
        let previous;
        {
            let Ok(mut current) = self.current.lock() else {
                return error("internal error: the writer state is unavailable");
            };
            if let Some(a) = current.as_ref().filter(|a| !a.done) {
                return error(format!(
                    "Cannot start a new acquisition while the previous one is running (request \
                     {}, {}); stop it first",
                    a.request_id, a.info["output_file"]
                ));
            }
            previous = current.take();
            *current = Some(Acquisition {
                request_id: id.clone(),
                info: json!({"n_images": request.get("n_images"), "output_file": request.get("output_file"), "run_id": run_id}),
                n_images,
                state: "WAITING_IMAGES",
                message: SENT.into(),
                images_written: 0,
                start_time: None,
                stop_time: None,
                done: false,
                lost: false,
            });
        }
        let (first_tx, first_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<Option<String>>();
        let this = Arc::clone(self);
        let body = serde_json::to_vec(&sent).unwrap_or_default();
        let opts = self.client.clone();
        let thread_id = id.clone();
        let traceparent = traceparent.map(String::from);
        std::thread::spawn(move || {
            let mut refusal = None;
            let tp = traceparent.as_deref();
            let result = client::send_raw_traced_blocking(&opts, &thread_id, &body, tp, |s| {
                this.update(|a| a.update(s));
                let _ = first_tx.send(());
            });
            let fin = match result {
                Ok(s) => Ok(s),
                Err(BlockingError::Client(ClientError::Failed(s))) => Ok(*s),
                Err(e) => Err(e.to_string()),
            };
            match fin {
                // Refused before it started: not an acquisition (PSI's driver refuses before
                // starting one); the last one stays what get_status shows.
                Ok(s)
                    if s.action == action::REQUEST_FAIL
                        && s.body["killed"] != true
                        && this.active().is_some_and(|a| a.start_time.is_none()) =>
                {
                    if let Ok(mut c) = this.current.lock() {
                        *c = previous;
                    }
                    refusal = Some(s.message);
                }
                // Logged before it shows as done, so whoever sees it done finds it in the logs.
                Ok(s) => {
                    let fin = this
                        .current
                        .lock()
                        .ok()
                        .and_then(|c| c.clone())
                        .map(|mut a| {
                            a.update(&s);
                            a
                        });
                    if let Some(fin) = fin {
                        this.log_acquisition(&fin);
                        this.update(|a| *a = fin);
                    }
                }
                // Nothing came back (no agent, broker unreachable): nothing started.
                Err(e)
                    if this.active().is_some_and(|a| {
                        a.start_time.is_none() && a.state == "WAITING_IMAGES" && a.message == SENT
                    }) =>
                {
                    if let Ok(mut c) = this.current.lock() {
                        *c = previous;
                    }
                    refusal = Some(e);
                }
                Err(e) => this.update(|a| {
                    a.state = "FAILED";
                    a.message = format!("ERROR: lost track of the request: {e}");
                    a.lost = true;
                    a.finish();
                }),
            }
            // The end first: an async caller woken by `first` then sees a refusal.
            let _ = done_tx.send(refusal);
            let _ = first_tx.send(());
        });
        // Answer once the agent took (or refused) the request; sync: once it ended.
        if sync {
            if let Ok(Some(refused)) = done_rx.recv() {
                return error(refused);
            }
        } else {
            let _ = first_rx.recv();
            // A refusal comes alone: then the thread is done at once.
            if let Ok(Some(refused)) = done_rx.try_recv() {
                return error(refused);
            }
        }
        let acq = self.current.lock().ok().and_then(|c| c.clone());
        if acq.as_ref().is_none_or(|a| a.request_id != id) {
            return error("the request was refused");
        }
        let acq = self.current.lock().ok().and_then(|c| c.clone());
        match acq {
            Some(a) if a.state == "FAILED" => error(a.message.trim_start_matches("ERROR: ")),
            Some(_) => {
                let message = if sync {
                    "Writing finished."
                } else {
                    "Writing started."
                };
                ok(message, "writer", self.writer_status())
            }
            None => error("internal error: the acquisition vanished"),
        }
    }

    fn stop(&self) -> Reply {
        let Some(a) = self.active() else {
            // PSI: also resets a writer in state UNKNOWN.
            self.update(|a| a.lost = false);
            return ok(
                "No acquisition was running.",
                "writer",
                self.writer_status(),
            );
        };
        if let Err(e) = client::kill_blocking(&self.client, &a.request_id) {
            return error(format!("cannot stop request {}: {e}", a.request_id));
        }
        // The kill is sent; the agent answers with the request's final status.
        let deadline = Instant::now() + self.client.idle_timeout;
        while self.active().is_some() {
            if Instant::now() > deadline {
                return error(format!(
                    "the kill for request {} was sent, but its final status did not come within \
                     {:?}",
                    a.request_id, self.client.idle_timeout
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ok("Writing stopped.", "writer", self.writer_status())
    }

    /// Appends the finished acquisition to `/daq/logs` (in Redis, so an API restart keeps it).
    fn log_acquisition(&self, a: &Acquisition) {
        let Some(det) = self
            .file_config
            .as_ref()
            .and_then(|c| c["detector_name"].as_str().map(String::from))
        else {
            return;
        };
        let result = self.redis().and_then(|mut con| {
            redis::pipe()
                .atomic()
                .cmd("LPUSH")
                .arg(deploy::logs_key(&det))
                .arg(a.json().to_string())
                .ignore()
                .cmd("LTRIM")
                .arg(deploy::logs_key(&det))
                .arg(0)
                .arg(MAX_LOGS - 1)
                .ignore()
                .query::<()>(&mut con)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = result {
            tracing::warn!("cannot log acquisition {} in Redis: {e}", a.request_id);
        }
    }

    fn logs(&self, n: &str) -> Reply {
        let Ok(n) = n.parse::<isize>() else {
            return error(format!("/daq/logs/<n>: {n:?} is not a number of records"));
        };
        let (c, _) = match self.config() {
            Ok(c) => c,
            Err(e) => return error(e),
        };
        let det = c["detector_name"].as_str().unwrap_or_default().to_string();
        if n <= 0 {
            return ok(format!("DAQ logs for {det}."), "logs", json!([]));
        }
        let entries: Result<Vec<String>, String> = self.redis().and_then(|mut con| {
            redis::cmd("LRANGE")
                .arg(deploy::logs_key(&det))
                .arg(0)
                .arg(n.min(MAX_LOGS) - 1)
                .query(&mut con)
                .map_err(|e| format!("Redis: {e}"))
        });
        match entries {
            // Oldest first, as PSI's list.
            Ok(entries) => {
                let logs: Vec<Value> = entries
                    .iter()
                    .rev()
                    .filter_map(|e| serde_json::from_str(e).ok())
                    .collect();
                ok(format!("DAQ logs for {det}."), "logs", Value::Array(logs))
            }
            Err(e) => error(e),
        }
    }

    fn stats(&self) -> Reply {
        let (c, _) = match self.config() {
            Ok(c) => c,
            Err(e) => return error(e),
        };
        let cfg = match DetectorConfig::from_json_str(&c.to_string(), "the current config") {
            Ok(c) => c,
            Err(e) => return error(e.to_string()),
        };
        let det = cfg.detector_name.clone();
        let field = |con: &mut redis::Connection, key: &str, f: &str| -> f64 {
            redis::cmd("HGET")
                .arg(format!("status.std-daq.{det}.{key}"))
                .arg(f)
                .query::<Option<String>>(con)
                .ok()
                .flatten()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        let mut con = match self.redis() {
            Ok(c) => c,
            Err(e) => return error(e),
        };
        let bytes: f64 = (0..cfg.n_modules)
            .map(|m| field(&mut con, &format!("udp-recv-{m}"), "bytes"))
            .sum();
        let images = field(&mut con, "assembler", "images");
        // The writer counts per run; its runs_completed and images_written make a total.
        let written = field(&mut con, "h5-writer", "images_written");
        let runs = field(&mut con, "h5-writer", "runs_completed");
        let now = unix_now();
        let Ok(mut rates) = self.rates.lock() else {
            return error("internal error: the rates are unavailable");
        };
        let det_bytes = rates.rate("detector_bytes", bytes, now);
        let det_images = rates.rate("detector_images", images, now);
        let run_key = format!("writer_images.{runs}");
        let w_images = rates.rate(&run_key, written, now);
        let image_bytes = cfg.image_bytes() as f64;
        ok(
            format!("DAQ statistics for {det}."),
            "stats",
            json!({
                "detector": {"bytes_per_second": det_bytes, "images_per_second": det_images},
                "writer": {"bytes_per_second": w_images * image_bytes, "images_per_second": w_images},
            }),
        )
    }
}

/// The id and `json` field of the one entry of an XREVRANGE ... COUNT 1 reply.
pub fn newest_entry(reply: &redis::Value) -> Option<(String, String)> {
    let redis::Value::Array(entries) = reply else {
        return None;
    };
    let redis::Value::Array(entry) = entries.first()? else {
        return None;
    };
    let id = text(entry.first()?)?;
    let redis::Value::Array(fields) = entry.get(1)? else {
        return None;
    };
    let mut it = fields.iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if text(k).as_deref() == Some("json") {
            return Some((id, text(v)?));
        }
    }
    None
}

fn text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn status(action: &str, body: Value) -> StatusMessage {
        StatusMessage {
            request_id: "r".into(),
            action: action.into(),
            source: "s".into(),
            message: "m".into(),
            body,
        }
    }

    fn acq(n: Option<u64>) -> Acquisition {
        Acquisition {
            request_id: "r".into(),
            info: json!({}),
            n_images: n,
            state: "WAITING_IMAGES",
            message: String::new(),
            images_written: 0,
            start_time: None,
            stop_time: None,
            done: false,
            lost: false,
        }
    }

    #[test]
    fn agent_statuses_map_onto_psi_states() {
        let mut a = acq(Some(10));
        a.update(&status("request_start", json!({})));
        assert_eq!(a.state, "WAITING_IMAGES");
        a.update(&status("request_progress", json!({"images_written": 0})));
        assert_eq!((a.state, a.message.as_str()), ("WAITING_IMAGES", "m"));
        a.update(&status("request_progress", json!({"images_written": 4})));
        assert_eq!((a.state, a.images_written), ("WRITING", 4));
        a.update(&status("request_progress", json!({"images_written": 10})));
        assert_eq!(a.state, "FLUSHING_IMAGES");
        a.update(&status(
            "request_success",
            json!({"images_written": 10, "run": {"end": "completed"}}),
        ));
        assert_eq!(
            (a.state, a.message.as_str(), a.done),
            ("FINISHED", "Completed.", true)
        );

        let mut k = acq(Some(10));
        k.update(&status(
            "request_fail",
            json!({"images_written": 3, "run": {"end": "killed"}}),
        ));
        assert_eq!(
            (k.state, k.message.as_str()),
            ("FINISHED", "Interrupted. m")
        );
        let mut u = acq(None);
        u.update(&status(
            "request_success",
            json!({"images_written": 7, "run": {"end": "killed"}}),
        ));
        assert_eq!((u.state, u.message.as_str()), ("FINISHED", "Interrupted."));
        let mut f = acq(Some(10));
        f.update(&status("request_fail", json!({"images_written": 0})));
        assert_eq!((f.state, f.message.as_str()), ("FAILED", "ERROR: m"));
    }

    #[test]
    fn rates_use_the_last_two_values_seen() {
        let mut r = Rates::default();
        assert_eq!(r.rate("c", 100.0, 0.0), 0.0);
        assert_eq!(r.rate("c", 100.0, 1.0), 0.0);
        assert_eq!(r.rate("c", 600.0, 5.0), 100.0);
        assert_eq!(r.rate("c", 600.0, 10.0), 100.0);
        assert_eq!(r.rate("c", 600.0, 21.0), 0.0, "stale after 15 s");
        assert_eq!(r.rate("c", 10.0, 22.0), 0.0, "a restart starts again");
    }

    #[test]
    fn newest_entry_reads_an_xrevrange_reply() {
        use redis::Value as R;
        let b = |s: &str| R::BulkString(s.as_bytes().to_vec());
        let reply = R::Array(vec![R::Array(vec![
            b("1-0"),
            R::Array(vec![b("origin"), b("x"), b("json"), b("{}")]),
        ])]);
        assert_eq!(newest_entry(&reply), Some(("1-0".into(), "{}".into())));
        assert_eq!(newest_entry(&R::Array(vec![])), None);
        assert_eq!(newest_entry(&R::Nil), None);
    }
}
