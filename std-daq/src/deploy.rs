//! Configs set at run time (`POST /daq/config` of `std-daq api`) and how they are applied: where
//! they are stored in Redis, which services a change must restart, and the deployment record
//! `GET /daq/deployment` returns. Shared by the API (which validates and stores) and
//! `std-daq up --watch-config` (which validates again and restarts what must restart).
//!
//! Redis keys of detector `<det>` (docs/api.md):
//! - `std-daq.<det>.configs`: a stream, one entry `{json: <config>, origin}` per config set; the
//!   newest entry is the detector's config, its id the `config_id`;
//! - `config.std-daq.<det>.<service>`: the same JSON for each service (its default
//!   `SERVICE_NAME`), where a service started without `--config` reads it;
//! - `std-daq.<det>.deployment`: the JSON of the last deployment's progress;
//! - `std-daq.<det>.logs`: a list of the last acquisitions (newest first) of `/daq/logs`.
//!
//! Never: store or apply a config that [`DetectorConfig::from_json_str`] refuses.

use serde_json::{json, Map, Value};
use std_daq_common::DetectorConfig;

/// How many configs the stream keeps.
pub const CONFIG_HISTORY: usize = 100;

pub fn configs_key(detector: &str) -> String {
    format!("std-daq.{detector}.configs")
}

/// The command that appends a config (JSON `text`, and where it came from) to the detector's
/// config stream; its reply is the new entry's id (the `config_id`).
pub fn add_config(detector: &str, text: &str, origin: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(configs_key(detector))
        .arg("MAXLEN")
        .arg("~")
        .arg(CONFIG_HISTORY)
        .arg("*")
        .arg("json")
        .arg(text)
        .arg("origin")
        .arg(origin);
    cmd
}

pub fn deployment_key(detector: &str) -> String {
    format!("std-daq.{detector}.deployment")
}

pub fn logs_key(detector: &str) -> String {
    format!("std-daq.{detector}.logs")
}

/// The status hash `std-daq up --watch-config` keeps (its presence says a supervisor applies
/// configs of this detector).
pub fn supervisor_status_name(detector: &str) -> String {
    format!("std-daq.{detector}.up")
}

/// The default SERVICE_NAMEs (status hash names) of a detector's services, for the
/// `config.<service>` keys.
pub fn service_names(cfg: &DetectorConfig) -> Vec<String> {
    let det = &cfg.detector_name;
    let mut v: Vec<String> = (0..cfg.n_modules)
        .map(|m| format!("std-daq.{det}.udp-recv-{m}"))
        .collect();
    for s in ["assembler", "h5-writer", "writer-agent"] {
        v.push(format!("std-daq.{det}.{s}"));
    }
    v
}

/// `current` with the keys of `change` set over it (PSI's partial `set_config`): a key's value is
/// replaced as a whole (`module_positions` too), a key set to `null` is removed (back to its
/// default). `change` must be a JSON object.
pub fn merge(current: &Value, change: &Value) -> Result<Value, String> {
    let Value::Object(change) = change else {
        return Err(format!(
            "the config change must be a JSON object of keys to set, got {}",
            kind(change)
        ));
    };
    let mut out: Map<String, Value> = current.as_object().cloned().unwrap_or_default();
    for (k, v) in change {
        if v.is_null() {
            out.remove(k);
        } else {
            out.insert(k.clone(), v.clone());
        }
    }
    Ok(Value::Object(out))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Validates a new config exactly as a config file is, plus what only a change can break: the
/// detector name names every key, segment and socket of the running detector.
pub fn validate_change(
    old: &DetectorConfig,
    new: &Value,
    origin: &str,
) -> Result<DetectorConfig, String> {
    let cfg = DetectorConfig::from_json_str(&new.to_string(), origin).map_err(|e| e.to_string())?;
    if cfg.detector_name != old.detector_name {
        return Err(format!(
            "config {origin}: key `detector_name`: cannot change from {:?} to {:?} at run time \
             (it names the detector's services, shared memory, sockets and Redis keys); start \
             the other detector with its own config",
            old.detector_name, cfg.detector_name
        ));
    }
    Ok(cfg)
}

/// The top-level keys whose value differs (absent = default, so a key set to its default
/// still counts as changed: the restart is harmless).
pub fn changed_keys(old: &Value, new: &Value) -> Vec<String> {
    let (empty, empty2) = (Map::new(), Map::new());
    let o = old.as_object().unwrap_or(&empty);
    let n = new.as_object().unwrap_or(&empty2);
    let mut keys: Vec<String> = o
        .keys()
        .chain(n.keys())
        .filter(|k| o.get(*k) != n.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Keys accepted with no effect (docs/configuration.md): changing them restarts nothing.
const NO_EFFECT: &[&str] = &[
    "writer_user_id",
    "submodule_info",
    "max_number_of_forwarders_spawned",
    "use_all_forwarders",
    "sender_sends_full_images",
    "gpfs_block_size",
    "delay_filter_timeout",
    "switch_user_active",
];

/// Keys every service reads.
const EVERYONE: &[&str] = &["log_level", "ipc_dir", "metrics_base_address"];

/// The image: everything that shapes module frames, images or the ImageBuffer.
const GEOMETRY: &[&str] = &[
    "detector_type",
    "n_modules",
    "bit_depth",
    "image_pixel_height",
    "image_pixel_width",
    "module_buffer_slots",
];

/// Which kind of service a supervised child is (by the binary it runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    Receiver,
    Assembler,
    Writer,
    Agent,
    Preview,
    StreamSend,
    /// `std-daq pedestal-agent` (docs/protocol.md, "Pedestal requests").
    PedestalAgent,
}

impl ServiceKind {
    /// From a [`crate::supervisor::ServiceSpec`]'s binary and arguments (the `std-daq`
    /// subcommand tells a preview from the pedestal service).
    pub fn of(binary: &str, args: &[String]) -> Option<Self> {
        if binary == "std-daq" && args.first().is_some_and(|a| a == "pedestal-agent") {
            return Some(ServiceKind::PedestalAgent);
        }
        Some(match binary {
            "std-udp-recv" => ServiceKind::Receiver,
            "std-assembler" => ServiceKind::Assembler,
            "std-h5-writer" => ServiceKind::Writer,
            "std-writer-agent" => ServiceKind::Agent,
            "std-daq" => ServiceKind::Preview,
            "std-stream-send" => ServiceKind::StreamSend,
            _ => return None,
        })
    }

    /// Whether a change of `key` changes what this service does (so it must restart).
    pub fn depends_on(self, key: &str) -> bool {
        if NO_EFFECT.contains(&key) {
            return false;
        }
        if EVERYONE.contains(&key) || GEOMETRY.contains(&key) {
            return true;
        }
        match self {
            ServiceKind::Receiver => matches!(
                key,
                "start_udp_port"
                    | "udp_bind_address"
                    | "frame_timeout_ms"
                    | "stats_collection_period"
            ),
            ServiceKind::Assembler => matches!(
                key,
                "module_positions"
                    | "chip_gaps"
                    | "double_pixels"
                    | "calibration_file"
                    | "module_sync_timeout_ms"
                    | "module_sync_queue_size"
                    | "assembler_threads"
                    | "ram_buffer_gb"
                    | "stats_collection_period"
            ),
            // The writer records the whole config in every file (`detector_config`): any key
            // with an effect.
            ServiceKind::Writer => true,
            // It reads the processing trigger at start (docs/processing.md) and drives
            // number_of_writers writers.
            ServiceKind::Agent => key == "processing_trigger" || key == "number_of_writers",
            ServiceKind::Preview => matches!(key, "ram_buffer_gb" | "live_stream_configs"),
            ServiceKind::StreamSend => {
                matches!(key, "ram_buffer_gb" | "stats_collection_period")
            }
            // Where it may write. A restart cancels a run in progress (request_fail).
            ServiceKind::PedestalAgent => key == "calibration_file",
        }
    }
}

/// The services (by kind) a change of `keys` must restart, in words for messages.
pub fn restart_summary(keys: &[String]) -> Vec<&'static str> {
    let kinds = [
        (ServiceKind::Receiver, "std-udp-recv (every module)"),
        (ServiceKind::Assembler, "std-assembler"),
        (ServiceKind::Writer, "std-h5-writer"),
        (ServiceKind::Agent, "std-writer-agent"),
        (ServiceKind::Preview, "std-daq preview"),
        (ServiceKind::StreamSend, "std-stream-send"),
        (ServiceKind::PedestalAgent, "std-daq pedestal-agent"),
    ];
    kinds
        .iter()
        .filter(|(k, _)| keys.iter().any(|key| k.depends_on(key)))
        .map(|(_, name)| *name)
        .collect()
}

/// A deployment record as `/daq/deployment` returns it (PSI's shape: config_id, message,
/// servers = per service, stats, status).
pub fn deployment(
    config_id: &str,
    status: &str,
    message: &str,
    services: &Map<String, Value>,
    start_time: f64,
    stop_time: Option<f64>,
) -> Value {
    json!({
        "config_id": config_id,
        "status": status,
        "message": message,
        "servers": services,
        "stats": {"start_time": start_time, "stop_time": stop_time},
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn merge_replaces_whole_keys_and_null_removes() {
        let cur = json!({"a": 1, "m": {"0": [0, 0, 1, 1], "1": [2, 2, 3, 3]}, "c": "x"});
        let new = merge(&cur, &json!({"a": 2, "m": {"0": [5, 5, 6, 6]}, "c": null})).unwrap();
        assert_eq!(new, json!({"a": 2, "m": {"0": [5, 5, 6, 6]}}));
        assert!(merge(&cur, &json!([1])).unwrap_err().contains("an array"));
        assert_eq!(changed_keys(&cur, &new), vec!["a", "c", "m"]);
    }

    #[test]
    fn restarts_follow_the_keys_each_service_reads() {
        let k = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(restart_summary(&k(&["writer_user_id"])).is_empty());
        assert_eq!(
            restart_summary(&k(&["number_of_writers"])),
            vec!["std-h5-writer", "std-writer-agent"]
        );
        assert_eq!(
            restart_summary(&k(&["assembler_threads"])),
            vec!["std-assembler", "std-h5-writer"]
        );
        assert_eq!(restart_summary(&k(&["compression"])), vec!["std-h5-writer"]);
        assert_eq!(
            restart_summary(&k(&["start_udp_port"])),
            vec!["std-udp-recv (every module)", "std-h5-writer"]
        );
        assert_eq!(restart_summary(&k(&["log_level"])).len(), 7);
        assert_eq!(
            restart_summary(&k(&["calibration_file"])),
            vec!["std-assembler", "std-h5-writer", "std-daq pedestal-agent"]
        );
        let agent = ["pedestal-agent".to_string(), "--config".into(), "c".into()];
        assert_eq!(
            ServiceKind::of("std-daq", &agent),
            Some(ServiceKind::PedestalAgent)
        );
        assert_eq!(
            ServiceKind::of("std-daq", &["preview".into()]),
            Some(ServiceKind::Preview)
        );
        assert_eq!(
            restart_summary(&k(&["processing_trigger"])),
            vec!["std-h5-writer", "std-writer-agent"]
        );
        assert!(ServiceKind::Preview.depends_on("live_stream_configs"));
        assert!(!ServiceKind::Receiver.depends_on("live_stream_configs"));
    }
}
