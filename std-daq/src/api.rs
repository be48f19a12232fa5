//! `std-daq api`: the HTTP control API (std_daq_service's REST front end, without its flaws).
//! It speaks to the writer agent over RabbitMQ like any client, so HTTP and RabbitMQ requests
//! behave the same:
//!
//! | method, path | body | answer |
//! |---|---|---|
//! | POST /write_sync | `{output_file, n_images?, timeout_s?, metadata?, traceparent?, ...}` (no n_images: until killed; an HTTP `traceparent` header is forwarded as the AMQP header) | when the write ended (no time cap): 200 + final status; 400 when the agent refused the request (same message as `request_fail`); 500 when it failed or was killed |
//! | POST /write_async | same | 202 `{request_id}` at once |
//! | POST /write_kill | `{request_id}` | 200 when the kill was sent |
//! | GET /status/{request_id} | | the request's last status (action, message, body) |
//! | GET /service_status | | every `status.*` hash in Redis |
//! | GET /config | | the detector config |
//! | GET /openapi.json, GET /docs | | the OpenAPI document and an interactive page |
//! | GET / | | the operator's status page ([`crate::page`]) |
//! | GET /daq/overview | | what the status page shows, as JSON |
//! | POST /pedestal, GET /pedestal, POST /pedestal/cancel | `{gain_file, frames_per_stage?, output?, ...}` | a JUNGFRAU pedestal run ([`crate::pedestal::PedestalApi`]): 202 when started, then its state and report |
//!
//! Beside them, PSI std_daq's routes for `std-daq-client` ([`crate::compat`], docs/api.md), and
//! the live view `GET /daq/live` (MJPEG), `GET /daq/live/frame` (one JPEG) with
//! `GET /daq/live/stats` ([`crate::live`]).
//!
//! Never: hold a request open against a timer (PSI's 10 s cap reported long writes as failures),
//! or report a killed write as a success.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std_writer_agent::client::{self, BlockingError, ClientError, ClientOptions};
use std_writer_agent::protocol::{action, StatusMessage};
use tiny_http::{Header, Method, Request, Response, Server};

#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub client: ClientOptions,
    pub redis_url: String,
    pub config_json: Option<serde_json::Value>,
    pub live: crate::live::LiveSettings,
    /// The `source` of the agent's statuses (its service name): the status page follows them.
    pub agent_source: String,
}

/// What is known of each request sent through this API: its statuses as they arrive.
#[derive(Debug, Default)]
struct Requests(Mutex<HashMap<String, RequestState>>);

#[derive(Debug, Clone, Default)]
struct RequestState {
    started: bool,
    last: Option<StatusMessage>,
    error: Option<String>,
}

impl Requests {
    fn update(&self, id: &str, f: impl FnOnce(&mut RequestState)) {
        if let Ok(mut map) = self.0.lock() {
            f(map.entry(id.to_string()).or_default());
        }
    }
    fn get(&self, id: &str) -> Option<RequestState> {
        self.0.lock().ok()?.get(id).cloned()
    }
}

fn json_response(code: u16, value: &serde_json::Value) -> Response<std::io::Cursor<Vec<u8>>> {
    let header = Header::from_bytes("Content-Type", "application/json").ok();
    let mut r = Response::from_data(value.to_string().into_bytes()).with_status_code(code);
    if let Some(h) = header {
        r.add_header(h);
    }
    r
}

fn status_json(s: &StatusMessage) -> serde_json::Value {
    serde_json::json!({
        "request_id": s.request_id,
        "action": s.action,
        "source": s.source,
        "message": s.message,
        "body": s.body,
    })
}

/// Serves until the process ends; each request runs on its own thread (a synchronous write may
/// take as long as the write does, and a live view stream as long as its viewer watches).
pub fn serve(server: Server, settings: ApiSettings) -> Result<()> {
    let compat = Arc::new(crate::compat::Compat::new(
        settings.client.clone(),
        settings.redis_url.clone(),
        settings.config_json.clone(),
    ));
    let live = Arc::new(crate::live::Live::new(settings.live.clone()));
    let page = Arc::new(crate::page::Page::new(
        settings.live.detector.clone(),
        settings.redis_url.clone(),
        settings.client.clone(),
        settings.agent_source.clone(),
    ));
    let pedestal = Arc::new(crate::pedestal::PedestalApi::new(
        settings.live.detector.clone(),
    ));
    let settings = Arc::new(settings);
    let requests = Arc::new(Requests::default());
    for request in server.incoming_requests() {
        let (settings, requests) = (Arc::clone(&settings), Arc::clone(&requests));
        let (compat, live, page) = (Arc::clone(&compat), Arc::clone(&live), Arc::clone(&page));
        let pedestal = Arc::clone(&pedestal);
        let parts = Parts {
            compat,
            live,
            page,
            pedestal,
        };
        std::thread::spawn(move || {
            if let Err(e) = handle(request, &settings, &requests, &parts) {
                tracing::warn!("answering an HTTP request: {e:#}");
            }
        });
    }
    Ok(())
}

/// What answers besides the routes of this module.
struct Parts {
    compat: Arc<crate::compat::Compat>,
    live: Arc<crate::live::Live>,
    page: Arc<crate::page::Page>,
    pedestal: Arc<crate::pedestal::PedestalApi>,
}

fn html(page: &'static str) -> Response<std::io::Cursor<Vec<u8>>> {
    let mut r = Response::from_data(page.as_bytes().to_vec()).with_status_code(200);
    if let Ok(h) = Header::from_bytes("Content-Type", "text/html; charset=utf-8") {
        r.add_header(h);
    }
    r
}

fn handle(
    mut request: Request,
    settings: &ApiSettings,
    requests: &Arc<Requests>,
    parts: &Parts,
) -> Result<()> {
    let Parts {
        compat,
        live,
        page,
        pedestal,
    } = parts;
    let mut body = Vec::new();
    request
        .as_reader()
        .take(1 << 20)
        .read_to_end(&mut body)
        .context("reading the body")?;
    let url = request.url().to_string();
    // A W3C trace context of the caller goes on to the agent as the AMQP header (the agent
    // checks it and refuses a malformed one with request_fail).
    let traceparent = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("traceparent"))
        .map(|h| h.value.as_str().to_string());
    let traceparent = traceparent.as_deref();
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let path = path.to_string();
    // The live view answers itself (a stream writes to the connection for as long as it lasts).
    let Some(request) = live.route(request, &path, query) else {
        return Ok(());
    };
    if let Some((code, value)) =
        compat.route_traced(request.method().as_str(), &path, &body, traceparent)
    {
        request.respond(json_response(code, &value))?;
        return Ok(());
    }
    if let Some((code, value)) = pedestal.route(request.method().as_str(), &path, &body) {
        request.respond(json_response(code, &value))?;
        return Ok(());
    }
    let response = match (request.method(), path.as_str()) {
        (Method::Post, "/write_sync") => write(settings, requests, &body, traceparent, true),
        (Method::Post, "/write_async") => write(settings, requests, &body, traceparent, false),
        (Method::Post, "/write_kill") => kill(settings, &body),
        (Method::Get, p) if p.starts_with("/status/") => {
            let id = &p["/status/".len()..];
            match requests.get(id) {
                Some(RequestState { last: Some(s), .. }) => json_response(200, &status_json(&s)),
                Some(RequestState { error: Some(e), .. }) => {
                    json_response(200, &serde_json::json!({"request_id": id, "error": e}))
                }
                Some(_) => json_response(
                    200,
                    &serde_json::json!({"request_id": id, "action": "sent"}),
                ),
                None => json_response(
                    404,
                    &serde_json::json!({"error": format!("unknown request {id}")}),
                ),
            }
        }
        (Method::Get, "/service_status") => match service_status(&settings.redis_url) {
            Ok(v) => json_response(200, &v),
            Err(e) => json_response(503, &serde_json::json!({"error": format!("{e:#}")})),
        },
        (Method::Get, "/config") => match &settings.config_json {
            Some(c) => json_response(200, c),
            None => json_response(
                404,
                &serde_json::json!({"error": "started without --config"}),
            ),
        },
        (Method::Get, "/openapi.json") => json_response(200, &openapi()),
        (Method::Get, "/docs") => html(DOCS_HTML),
        (Method::Get, "/") => html(crate::page::STATUS_PAGE_HTML),
        (Method::Get, "/daq/overview") => {
            let rates = compat
                .route("GET", "/daq/stats", b"")
                .map_or(serde_json::Value::Null, |(_, v)| v);
            let (code, value) = page.overview(rates, live.stats());
            json_response(code, &value)
        }
        _ => json_response(
            404,
            &serde_json::json!({"error": format!("no such endpoint: {path}")}),
        ),
    };
    request.respond(response)?;
    Ok(())
}

fn write(
    settings: &ApiSettings,
    requests: &Arc<Requests>,
    body: &[u8],
    traceparent: Option<&str>,
    wait: bool,
) -> Response<std::io::Cursor<Vec<u8>>> {
    let id = client::new_request_id();
    requests.update(&id, |_| {});
    let run = {
        let (opts, id, body) = (settings.client.clone(), id.clone(), body.to_vec());
        let traceparent = traceparent.map(String::from);
        let requests = Arc::clone(requests);
        move || {
            let tp = traceparent.as_deref();
            let result = client::send_raw_traced_blocking(&opts, &id, &body, tp, |s| {
                requests.update(&id, |r| {
                    r.started |= s.action == action::REQUEST_START;
                    r.last = Some(s.clone());
                });
            });
            match &result {
                Ok(done) => requests.update(&id, |r| r.last = Some(done.clone())),
                Err(BlockingError::Client(ClientError::Failed(s))) => {
                    requests.update(&id, |r| r.last = Some((**s).clone()))
                }
                Err(e) => requests.update(&id, |r| r.error = Some(e.to_string())),
            }
            result
        }
    };
    if !wait {
        std::thread::spawn(move || {
            let _ = run();
        });
        return json_response(202, &serde_json::json!({"request_id": id}));
    }
    match run() {
        Ok(done) => json_response(200, &status_json(&done)),
        Err(BlockingError::Client(ClientError::Failed(s))) => {
            let started = requests.get(&id).is_some_and(|r| r.started);
            // Refused before it started: the request was bad (same words as request_fail). A
            // request killed while queued never started either, but was not bad.
            let code = if started || s.body["killed"] == true {
                500
            } else {
                400
            };
            json_response(
                code,
                &serde_json::json!({"request_id": id, "error": s.message, "status": status_json(&s)}),
            )
        }
        Err(e) => json_response(
            502,
            &serde_json::json!({"request_id": id, "error": e.to_string()}),
        ),
    }
}

fn kill(settings: &ApiSettings, body: &[u8]) -> Response<std::io::Cursor<Vec<u8>>> {
    let id = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["request_id"].as_str().map(String::from));
    let Some(id) = id else {
        return json_response(
            400,
            &serde_json::json!({"error": "the body must be {\"request_id\": \"...\"}"}),
        );
    };
    match client::kill_blocking(&settings.client, &id) {
        Ok(()) => json_response(200, &serde_json::json!({"request_id": id, "kill": "sent"})),
        Err(e) => json_response(
            502,
            &serde_json::json!({"request_id": id, "error": e.to_string()}),
        ),
    }
}

fn service_status(redis_url: &str) -> Result<serde_json::Value> {
    let mut con =
        redis::Client::open(redis_url)?.get_connection_with_timeout(Duration::from_secs(2))?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("status.*").query(&mut con)?;
    let mut out = serde_json::Map::new();
    for key in keys {
        let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query(&mut con)?;
        out.insert(
            key.trim_start_matches("status.").to_string(),
            serde_json::json!(fields),
        );
    }
    Ok(serde_json::Value::Object(out))
}

fn openapi() -> serde_json::Value {
    let write_body = serde_json::json!({
        "required": true,
        "content": {"application/json": {"schema": {
            "type": "object",
            "required": ["output_file"],
            "properties": {
                "output_file": {"type": "string", "description": "absolute .h5 path inside the agent's output root; must not exist"},
                "n_images": {"type": ["integer", "null"], "minimum": 1, "description": "absent or null: write until killed (/write_kill), at most the agent's --max-images"},
                "timeout_s": {"type": ["number", "null"], "exclusiveMinimum": 0, "description": "end the write with request_fail, leaving nothing on disk, if no image arrived within this many seconds"},
                "metadata": {"type": ["object", "null"], "description": "opaque metadata of the run (run id, ISPyB dcid, scan number, ...), at most 16384 bytes as JSON: echoed in statuses, stored in the file's attribute metadata, added to the processing trigger"},
                "traceparent": {"type": ["string", "null"], "description": "W3C trace context 00-<32 hex>-<16 hex>-<2 hex>; the HTTP header traceparent does the same (it is forwarded to the agent as the AMQP header)"},
                "user_id": {}, "run_id": {}, "sources": {}, "timestamp": {}
            }
        }}}
    });
    let mut doc = serde_json::json!({
        "openapi": "3.0.3",
        "info": {"title": "std-daq control API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Write requests go to std-writer-agent over RabbitMQ (docs/protocol.md)."},
        "paths": {
            "/write_sync": {"post": {"summary": "Write the next n_images images; answer when done (no time cap)",
                "requestBody": write_body,
                "responses": {"200": {"description": "request_success"}, "400": {"description": "refused: the request_fail message"}, "500": {"description": "failed or killed"}}}},
            "/write_async": {"post": {"summary": "Start a write; answer with its request_id",
                "requestBody": write_body, "responses": {"202": {"description": "{request_id}"}}}},
            "/write_kill": {"post": {"summary": "Stop a running write (its file keeps what was written)",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["request_id"], "properties": {"request_id": {"type": "string"}}}}}},
                "responses": {"200": {"description": "kill sent"}}}},
            "/status/{request_id}": {"get": {"summary": "Last status of a request sent through this API",
                "parameters": [{"name": "request_id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the status"}, "404": {"description": "unknown request"}}}},
            "/service_status": {"get": {"summary": "Every service's status hash from Redis", "responses": {"200": {"description": "by service"}}}},
            "/config": {"get": {"summary": "The detector config", "responses": {"200": {"description": "config JSON"}}}},
            "/pedestal": {
                "post": {"summary": "Start a JUNGFRAU pedestal run (as std-daq pedestal): frames_per_stage dark frames per module of G0, G1, G2 from the running pipeline, then the calibration file (docs/calibration.md); needs --config",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["gain_file"],
                        "properties": {
                            "gain_file": {"type": "string", "description": "HDF5 file with gains [3, n*512, 1024] ADU/keV (and optionally pixel_mask)"},
                            "frames_per_stage": {"type": "integer", "minimum": 1, "default": 1000},
                            "output": {"type": "string", "description": "default: the config's calibration_file (the running assembler takes it); must be an absolute .h5 path in that file's folder"},
                            "min_fraction": {"type": "number", "default": 0.9}, "min_rms": {"type": "number", "default": 0.1},
                            "max_rms_factor": {"type": "number", "default": 3.0}, "timeout_s": {"type": "number", "default": 600}}}}}},
                    "responses": {"202": {"description": "{pedestal_id, state: starting}"}, "400": {"description": "a bad body, with the reason"}, "409": {"description": "a run is in progress"}, "503": {"description": "no --config"}}},
                "get": {"summary": "The current or last pedestal run: state idle|starting|running|succeeded|failed, progress (frames per module and stage), report or error",
                    "responses": {"200": {"description": "JSON"}}}},
            "/pedestal/cancel": {"post": {"summary": "Cancel the running pedestal run (nothing is written)", "responses": {"200": {"description": "cancel sent"}}}}
        }
    });
    // PSI std_daq compatibility (std-daq-client 1.3.5): always HTTP 200 with the envelope.
    let envelope = |key: &str, what: &str| {
        serde_json::json!({"200": {"description": format!(
        "{{\"status\": \"ok\"|\"error\", \"message\": str, \"{key}\": {what}}} (a refused request is status error with the reason)")}})
    };
    let psi_write = serde_json::json!({"required": true, "content": {"application/json": {"schema": {
        "type": "object", "required": ["output_file"],
        "properties": {"output_file": {"type": "string"},
                       "n_images": {"type": "integer", "minimum": 1, "description": "absent: write until /writer/stop"},
                       "run_id": {"description": "default: the request time in ns"}}}}}});
    let compat = serde_json::json!({
        "/daq/config": {
            "get": {"summary": "PSI: the detector config", "responses": envelope("config", "the config")},
            "post": {"summary": "PSI: set config keys (a partial change; null removes a key); validated like a config file, stored in Redis, applied by std-daq up --watch-config",
                     "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object"}}}},
                     "responses": envelope("config", "the config now stored")}},
        "/writer/write_async": {"post": {"summary": "PSI: start a write; answers once the agent took it", "requestBody": psi_write, "responses": envelope("writer", "writer status")}},
        "/writer/write_sync": {"post": {"summary": "PSI: write; answers when the write ended", "requestBody": psi_write, "responses": envelope("writer", "writer status")}},
        "/writer/stop": {"post": {"summary": "PSI: stop the running write (a kill of its request)", "responses": envelope("writer", "writer status")}},
        "/writer/status": {"get": {"summary": "PSI: writer state READY|WRITING|UNKNOWN and the acquisition", "responses": envelope("writer", "writer status")}},
        "/daq/stats": {"get": {"summary": "PSI: detector and writer rates from the services' Redis status", "responses": envelope("stats", "{detector, writer: {bytes_per_second, images_per_second}}")}},
        "/daq/logs/{n}": {"get": {"summary": "PSI: the last n acquisitions, oldest first",
            "parameters": [{"name": "n", "in": "path", "required": true, "schema": {"type": "integer"}}],
            "responses": envelope("logs", "list of acquisitions")}},
        "/daq/deployment": {"get": {"summary": "PSI: progress of the last config change", "responses": envelope("deployment", "{config_id, status, message, servers, stats}")}},
        "/daq/live": {"get": {"summary": "Live view: the newest image as MJPEG (multipart/x-mixed-replace), scaled to 8-bit grey (docs/api.md)",
            "parameters": [
                {"name": "max_fps", "in": "query", "schema": {"type": "number", "default": crate::live::DEFAULT_FPS, "maximum": crate::live::MAX_FPS}, "description": "frames per second at most (larger is capped)"},
                {"name": "min", "in": "query", "schema": {"type": "number"}, "description": "value shown black (default by dtype)"},
                {"name": "max", "in": "query", "schema": {"type": "number"}, "description": "value shown white (default by dtype)"},
                {"name": "bin", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": crate::live::MAX_BIN}, "description": "average bin x bin blocks (default: longer side <= 2048)"},
                {"name": "quality", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": crate::live::DEFAULT_QUALITY}}],
            "responses": {"200": {"description": "the stream; each part image/jpeg with X-Image-Id"}, "400": {"description": "a bad parameter"}, "503": {"description": "no --config, or too many viewers"}}}},
        "/daq/live/frame": {"get": {"summary": "Live view: the newest image as one JPEG (same X-* headers and parameters as /daq/live; max_fps has no effect)",
            "responses": {"200": {"description": "image/jpeg"}, "400": {"description": "a bad parameter"}, "503": {"description": "no --config, or the image was overwritten while copied (ask again)"}}}},
        "/daq/live/stats": {"get": {"summary": "Live view counters: viewers, frames sent, images skipped (rate bound, overwritten)", "responses": {"200": {"description": "JSON"}}}},
        "/": {"get": {"summary": "The operator's status page (HTML): live image, rates, counters per module and stage, writes, start/stop", "responses": {"200": {"description": "text/html"}}}},
        "/daq/overview": {"get": {"summary": "What the status page shows: services' status hashes, rates, running and last writes, live view (docs/api.md)", "responses": {"200": {"description": "JSON"}, "503": {"description": "started without --config"}}}}
    });
    if let (Some(paths), serde_json::Value::Object(more)) = (doc["paths"].as_object_mut(), compat) {
        paths.extend(more);
    }
    doc
}

const DOCS_HTML: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>std-daq API</title>
<style>body{font-family:sans-serif;max-width:60em;margin:2em auto} textarea{width:100%;height:5em} pre{background:#eee;padding:1em;white-space:pre-wrap}</style>
</head><body>
<h1>std-daq control API</h1>
<p>The OpenAPI document is at <a href="/openapi.json">/openapi.json</a>. Try the endpoints:</p>
<h2>POST /write_async, /write_sync</h2>
<textarea id="w">{"output_file": "/data/run1.h5", "n_images": 100}</textarea>
<button onclick="call('POST','/write_async',w.value)">write_async</button>
<button onclick="call('POST','/write_sync',w.value)">write_sync</button>
<h2>POST /write_kill</h2>
<textarea id="k">{"request_id": ""}</textarea>
<button onclick="call('POST','/write_kill',k.value)">write_kill</button>
<h2>GET /status/{request_id}, /service_status, /config</h2>
<input id="s" size="40" placeholder="request_id">
<button onclick="call('GET','/status/'+s.value)">status</button>
<button onclick="call('GET','/service_status')">service_status</button>
<button onclick="call('GET','/config')">config</button>
<pre id="out"></pre>
<script>
async function call(m, p, b) {
  const r = await fetch(p, {method: m, body: m === 'GET' ? undefined : b, headers: {'Content-Type': 'application/json'}});
  document.getElementById('out').textContent = r.status + '\n' + await r.text();
}
</script></body></html>"#;
