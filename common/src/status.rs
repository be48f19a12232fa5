//! Redis integration every service shares (std_daq_service's conventions):
//! - the config comes from a file, or, when no file is given, from Redis key `config.<SERVICE_NAME>`;
//! - a hash `status.<SERVICE_NAME>` (service_name, config, start_timestamp, updated_timestamp
//!   (the time of this refresh, so a reader knows how old the counters are), live counters) is
//!   refreshed every few seconds with a 15 s TTL, so it disappears when a service dies; a clean
//!   stop deletes it at once. `REDIS_SKIP` turns status reporting off.
//!
//! Environment: `SERVICE_NAME`, `REDIS_HOST` (127.0.0.1), `REDIS_PORT` (6379), `REDIS_SKIP`.
//! Never blocks a data path: reporting runs on its own thread; a Redis outage is a logged
//! warning, not an error, unless the config itself must come from Redis.

use crate::config::{ConfigError, DetectorConfig};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds a status hash lives without a refresh (std_daq: 15).
pub const STATUS_TTL_SECS: i64 = 15;
/// How often the hash is refreshed (std_daq: 10 s; ours is well inside the TTL).
pub const STATUS_REFRESH: Duration = Duration::from_secs(5);

/// Where Redis is and what this service is called there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisEnv {
    pub service_name: Option<String>,
    pub host: String,
    pub port: u16,
    pub skip: bool,
}

impl RedisEnv {
    /// Reads SERVICE_NAME, REDIS_HOST, REDIS_PORT and REDIS_SKIP.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        RedisEnv {
            service_name: var("SERVICE_NAME"),
            host: var("REDIS_HOST").unwrap_or_else(|| "127.0.0.1".into()),
            port: var("REDIS_PORT")
                .and_then(|p| p.parse().ok())
                .unwrap_or(6379),
            skip: var("REDIS_SKIP").is_some_and(|v| v != "0" && v.to_lowercase() != "false"),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}/", self.host, self.port)
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        client.get_connection_with_timeout(Duration::from_secs(2))
    }
}

/// Loads the config from `path`, or from Redis key `config.<SERVICE_NAME>` when there is none.
pub fn load_config(path: Option<&Path>, env: &RedisEnv) -> Result<DetectorConfig, ConfigError> {
    if let Some(path) = path {
        return DetectorConfig::from_file(path);
    }
    let Some(service) = &env.service_name else {
        return Err(ConfigError::Parse {
            origin: "Redis".into(),
            message: "no --config file given and SERVICE_NAME is not set, so there is no \
                      config.<SERVICE_NAME> key to read"
                .into(),
        });
    };
    let key = format!("config.{service}");
    let origin = format!("Redis key {key} at {}:{}", env.host, env.port);
    let fail = |message: String| ConfigError::Parse {
        origin: origin.clone(),
        message,
    };
    let mut con = env
        .connect()
        .map_err(|e| fail(format!("cannot reach Redis: {e}")))?;
    let text: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query(&mut con)
        .map_err(|e| fail(format!("GET failed: {e}")))?;
    let text = text.ok_or_else(|| fail("the key does not exist".into()))?;
    DetectorConfig::from_json_str(&text, &origin)
}

/// How often the receivers and the assembler refresh their board's counters (what their metrics
/// endpoint serves), whatever their log period (`stats_collection_period`).
pub const BOARD_PERIOD: Duration = Duration::from_millis(100);
/// The board field saying when its counters were last set ([`StatusBoard::stamp_counters`]).
pub const COUNTERS_AT: &str = "counters_at";

/// Live counters a service shows in its status hash and metrics endpoint; refreshed every
/// [`BOARD_PERIOD`] by the receivers and the assembler, at their stats period by others.
#[derive(Debug, Clone, Default)]
pub struct StatusBoard(Arc<Mutex<BTreeMap<String, String>>>);

impl StatusBoard {
    pub fn set(&self, key: &str, value: impl ToString) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(key.to_string(), value.to_string());
        }
    }

    /// Sets `counters_at` (UNIX seconds, the board's [`COUNTERS_AT`]) to now: the counters just
    /// set are as of this moment, so a reader (a writer's run counters) can wait for a fresh
    /// reading.
    pub fn stamp_counters(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.set(COUNTERS_AT, format!("{now:.6}"));
    }

    /// Every field and its value, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        self.0
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}

/// Keeps `status.<service_name>` fresh until dropped; dropping deletes the hash.
#[derive(Debug)]
pub struct StatusReporter {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl StatusReporter {
    /// Starts reporting unless REDIS_SKIP is set. `service_name` is SERVICE_NAME when set, else
    /// the caller's default (e.g. `std-daq.<detector>.udp-recv-0`).
    pub fn start(
        env: &RedisEnv,
        default_name: &str,
        config: &DetectorConfig,
        board: StatusBoard,
    ) -> Self {
        if env.skip {
            tracing::info!("REDIS_SKIP is set: no status in Redis");
            return StatusReporter {
                stop: None,
                thread: None,
            };
        }
        let name = env
            .service_name
            .clone()
            .unwrap_or_else(|| default_name.to_string());
        let key = format!("status.{name}");
        let start_timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let fixed = vec![
            ("service_name".to_string(), name.clone()),
            ("config".to_string(), config.raw.to_string()),
            (
                "start_timestamp".to_string(),
                format!("{start_timestamp:.3}"),
            ),
        ];
        let env = env.clone();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("redis-status".into())
            .spawn(move || report_loop(&env, &key, &fixed, &board, &stopped))
            .ok();
        StatusReporter {
            stop: Some(stop),
            thread,
        }
    }
}

fn report_loop(
    env: &RedisEnv,
    key: &str,
    fixed: &[(String, String)],
    board: &StatusBoard,
    stopped: &mpsc::Receiver<()>,
) {
    let mut con: Option<redis::Connection> = None;
    let mut warned = false;
    loop {
        let result = (|| -> redis::RedisResult<()> {
            if con.is_none() {
                con = Some(env.connect()?);
            }
            let Some(c) = con.as_mut() else { return Ok(()) };
            let mut fields = fixed.to_vec();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            fields.push(("updated_timestamp".to_string(), format!("{now:.3}")));
            fields.extend(board.snapshot());
            redis::pipe()
                .atomic()
                .hset_multiple(key, &fields)
                .ignore()
                .expire(key, STATUS_TTL_SECS)
                .ignore()
                .query::<()>(c)
        })();
        match result {
            Ok(()) => {
                if warned {
                    tracing::info!(
                        "Redis at {} is reachable again: status {key} published",
                        env.url()
                    );
                }
                warned = false;
            }
            Err(e) => {
                con = None;
                if !warned {
                    tracing::warn!(
                        "cannot publish status {key} to Redis at {}: {e} (the service keeps \
                         running on its config; retrying every {}s)",
                        env.url(),
                        STATUS_REFRESH.as_secs()
                    );
                    warned = true;
                }
            }
        }
        match stopped.recv_timeout(STATUS_REFRESH) {
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            // Stopped cleanly (or the reporter was dropped): remove the status at once.
            _ => {
                if let Some(c) = con.as_mut() {
                    let _ = redis::cmd("DEL").arg(key).query::<()>(c);
                }
                return;
            }
        }
    }
}

impl Drop for StatusReporter {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const CONFIG: &str = r#"{"detector_name":"redis-test","detector_type":"jungfrau-raw",
        "n_modules":1,"bit_depth":16,"image_pixel_height":512,"image_pixel_width":1024,
        "start_udp_port":50000,"module_positions":{"0":[0,0,1023,511]}}"#;

    fn env(service: &str) -> RedisEnv {
        RedisEnv {
            service_name: Some(service.into()),
            host: "127.0.0.1".into(),
            port: 6379,
            skip: false,
        }
    }

    fn redis() -> redis::Connection {
        env("x")
            .connect()
            .expect("Redis must run on 127.0.0.1:6379 (scripts/setup.sh starts it)")
    }

    #[test]
    fn config_comes_from_redis_when_no_file_is_given() {
        let service = format!("test.cfg.{}", std::process::id());
        let mut con = redis();
        let _: () = redis::cmd("SET")
            .arg(format!("config.{service}"))
            .arg(CONFIG)
            .query(&mut con)
            .unwrap();
        let cfg = load_config(None, &env(&service)).unwrap();
        assert_eq!(cfg.detector_name, "redis-test");

        let bad = CONFIG.replace("\"n_modules\"", "\"n_moduls\"");
        let _: () = redis::cmd("SET")
            .arg(format!("config.{service}"))
            .arg(bad)
            .query(&mut con)
            .unwrap();
        let err = load_config(None, &env(&service)).unwrap_err().to_string();
        assert!(
            err.contains(&format!("Redis key config.{service}")) && err.contains("n_moduls"),
            "{err}"
        );
        let _: () = redis::cmd("DEL")
            .arg(format!("config.{service}"))
            .query(&mut con)
            .unwrap();

        let err = load_config(None, &env(&service)).unwrap_err().to_string();
        assert!(err.contains("the key does not exist"), "{err}");
        let mut nobody = env(&service);
        nobody.service_name = None;
        let err = load_config(None, &nobody).unwrap_err().to_string();
        assert!(err.contains("SERVICE_NAME is not set"), "{err}");
        let mut down = env(&service);
        down.port = 1;
        let err = load_config(None, &down).unwrap_err().to_string();
        assert!(err.contains("cannot reach Redis"), "{err}");
    }

    #[test]
    fn status_hash_appears_with_a_ttl_and_goes_when_the_service_stops() {
        let service = format!("test.status.{}", std::process::id());
        let key = format!("status.{service}");
        let cfg = DetectorConfig::from_json_str(CONFIG, "test").unwrap();
        let board = StatusBoard::default();
        board.set("images", 42);
        let reporter = StatusReporter::start(&env(&service), "unused", &cfg, board);
        let mut con = redis();
        let deadline = Instant::now() + Duration::from_secs(10);
        let fields: BTreeMap<String, String> = loop {
            let f: BTreeMap<String, String> =
                redis::cmd("HGETALL").arg(&key).query(&mut con).unwrap();
            if !f.is_empty() || Instant::now() > deadline {
                break f;
            }
            std::thread::yield_now();
        };
        assert_eq!(
            fields.get("service_name").map(String::as_str),
            Some(service.as_str())
        );
        assert_eq!(fields.get("images").map(String::as_str), Some("42"));
        assert!(fields["config"].contains("redis-test"));
        assert!(fields["start_timestamp"].parse::<f64>().unwrap() > 1.7e9);
        assert!(
            fields["updated_timestamp"].parse::<f64>().unwrap()
                >= fields["start_timestamp"].parse::<f64>().unwrap()
        );
        let ttl: i64 = redis::cmd("TTL").arg(&key).query(&mut con).unwrap();
        assert!((1..=STATUS_TTL_SECS).contains(&ttl), "ttl {ttl}");
        drop(reporter);
        let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut con).unwrap();
        assert_eq!(exists, 0);
    }

    #[test]
    fn redis_skip_reports_nothing() {
        let service = format!("test.skip.{}", std::process::id());
        let cfg = DetectorConfig::from_json_str(CONFIG, "test").unwrap();
        let mut e = env(&service);
        e.skip = true;
        let reporter = StatusReporter::start(&e, "unused", &cfg, StatusBoard::default());
        assert!(reporter.thread.is_none());
    }
}
