//! The processing trigger: the message the agent publishes when a write's file is complete
//! (event `end`) and, if configured, when the write starts (event `start`), so that processing
//! (a zocalo recipe, a GDA/heliotrapi topic consumer) starts without polling. Configured by the
//! detector config key `processing_trigger` ([`std_daq_common::config::ProcessingTrigger`]);
//! `docs/processing.md` describes the messages.
//!
//! - zocalo mode: the message `zocalo.go` sends, to the queue `processing_recipe` through the
//!   default exchange (routing key = queue name), persistent (delivery_mode 2), headers
//!   `zocalo.go.user` and `zocalo.go.host`; body `{"recipes": [...], "parameters": {...}}`.
//! - topic mode: the GDA scan message (`status`, `filePath`, ...) on a topic exchange.
//!
//! Every publish is `mandatory` with publisher confirms on a channel of its own (a publish to a
//! missing exchange closes its channel, never the agent's others), at most `attempts` times with
//! a doubling backoff. The outcome is returned, never raised: a trigger never fails a write.
//! This module must never decide whether a trigger is due (the agent does) and never panic on
//! what the broker answers.

use crate::broker;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::time::Duration;
use std_daq_common::config::{ProcessingTrigger, TriggerMode};

/// The trigger as the agent runs it.
#[derive(Debug, Clone)]
pub struct TriggerSettings {
    pub config: ProcessingTrigger,
    /// The detector's name (`detectors` of the topic message).
    pub detector_name: String,
    /// `zocalo.go.user` header.
    pub user: String,
    /// `zocalo.go.host` header.
    pub host: String,
    /// Wait before the second attempt; doubled before each further one.
    pub first_backoff: Duration,
    /// Longest wait for one attempt (channel, publish, confirm).
    pub attempt_timeout: Duration,
}

impl TriggerSettings {
    /// With the user and host this process runs as, a 200 ms first backoff and a 5 s attempt
    /// timeout.
    pub fn new(config: ProcessingTrigger, detector_name: &str) -> Self {
        TriggerSettings {
            config,
            detector_name: detector_name.into(),
            user: std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .unwrap_or_else(|_| "std-writer-agent".into()),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into()),
            first_backoff: Duration::from_millis(200),
            attempt_timeout: Duration::from_secs(5),
        }
    }
}

/// Which moment of a write a trigger announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The writer accepted the request (after `request_start`).
    Start,
    /// The file is complete under its name (before the final status).
    End,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Start => "start",
            Event::End => "end",
        }
    }
}

/// What a trigger message says about the write.
#[derive(Debug, Clone)]
pub struct WriteFacts<'a> {
    pub request_id: &'a str,
    /// The file's path (at `start` it is still written as `<file>.part`).
    pub output_file: &'a str,
    /// `start`: the images requested (`None`: unbounded); `end`: the images in the file.
    pub number_of_frames: Option<u64>,
    pub metadata: Option<&'a Map<String, Value>>,
    pub traceparent: Option<&'a str>,
}

/// How one trigger went; [`Outcome::to_json`] is what the final status reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub event: Event,
    pub attempts: u32,
    /// `None`: published (the broker confirmed it and routed it to at least one queue).
    pub error: Option<String>,
}

impl Outcome {
    pub fn published(&self) -> bool {
        self.error.is_none()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "published": self.published(),
            "attempts": self.attempts,
            "error": self.error,
        })
    }
}

/// Where a trigger goes: (exchange, routing key).
pub fn destination(config: &ProcessingTrigger) -> (&str, &str) {
    match &config.mode {
        TriggerMode::Zocalo { queue, .. } => ("", queue.as_str()),
        TriggerMode::Topic {
            exchange,
            routing_key,
        } => (exchange.as_str(), routing_key.as_str()),
    }
}

/// The message body of `event` for `facts`.
pub fn body(settings: &TriggerSettings, event: Event, facts: &WriteFacts<'_>) -> Value {
    match &settings.config.mode {
        TriggerMode::Zocalo { recipes, .. } => zocalo_body(recipes, event, facts),
        TriggerMode::Topic { .. } => gda_scan_body(&settings.detector_name, event, facts),
    }
}

/// `zocalo.go`'s message: `{"recipes": [...], "parameters": {filename, number_of_frames,
/// start_frame_index: 0, event, request_id, traceparent?, <metadata keys>}}`. A metadata key
/// never replaces one of the agent's own parameters. `number_of_frames` is left out of the start
/// of an unbounded write (nobody knows it yet).
pub fn zocalo_body(recipes: &[String], event: Event, facts: &WriteFacts<'_>) -> Value {
    let mut parameters = Map::new();
    parameters.insert("filename".into(), facts.output_file.into());
    if let Some(n) = facts.number_of_frames {
        parameters.insert("number_of_frames".into(), n.into());
    }
    parameters.insert("start_frame_index".into(), 0.into());
    parameters.insert("event".into(), event.as_str().into());
    parameters.insert("request_id".into(), facts.request_id.into());
    if let Some(t) = facts.traceparent {
        parameters.insert("traceparent".into(), t.into());
    }
    for (k, v) in facts.metadata.into_iter().flatten() {
        parameters.entry(k.clone()).or_insert_with(|| v.clone());
    }
    json!({"recipes": recipes, "parameters": parameters})
}

/// The GDA scan message heliotrapi and other DLS consumers read from `gda.messages.scan`:
/// `status` STARTED/FINISHED, `filePath`, `visitDirectory` (metadata `visit_directory`, else the
/// file's folder), `swmrStatus` `INACTIVE` (std-daq does not write SWMR files), `scanNumber`
/// (metadata `scan_number` if a whole number, else 0), `scanDimensions` (`[frames]`; `[]` at the
/// start of an unbounded write), `scannables` `[]`, `detectors` `[<detector name>]`,
/// `percentageComplete` 0 / 100, `processingRequest` (metadata `processing_request` if an
/// object, else `{}`).
pub fn gda_scan_body(detector_name: &str, event: Event, facts: &WriteFacts<'_>) -> Value {
    let meta = |k: &str| facts.metadata.and_then(|m| m.get(k));
    let visit = meta("visit_directory")
        .and_then(Value::as_str)
        .map(String::from)
        .unwrap_or_else(|| {
            Path::new(facts.output_file)
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        });
    let (status, percentage) = match event {
        Event::Start => ("STARTED", 0.0),
        Event::End => ("FINISHED", 100.0),
    };
    json!({
        "status": status,
        "filePath": facts.output_file,
        "visitDirectory": visit,
        "swmrStatus": "INACTIVE",
        "scanNumber": meta("scan_number").and_then(Value::as_i64).unwrap_or(0),
        "scanDimensions": facts.number_of_frames.map_or(vec![], |n| vec![n]),
        "scannables": [],
        "detectors": [detector_name],
        "percentageComplete": percentage,
        "processingRequest": meta("processing_request")
            .filter(|v| v.is_object())
            .cloned()
            .unwrap_or_else(|| json!({})),
    })
}

/// The AMQP properties: JSON, persistent, the zocalo headers (zocalo mode) and `traceparent`.
pub fn properties(settings: &TriggerSettings, facts: &WriteFacts<'_>) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let TriggerMode::Zocalo { .. } = settings.config.mode {
        headers.insert(
            "zocalo.go.user".into(),
            AMQPValue::LongString(settings.user.as_str().into()),
        );
        headers.insert(
            "zocalo.go.host".into(),
            AMQPValue::LongString(settings.host.as_str().into()),
        );
    }
    if let Some(t) = facts.traceparent {
        headers.insert("traceparent".into(), AMQPValue::LongString(t.into()));
    }
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// Publishes the trigger of `event`, retrying up to the configured attempts; never fails.
pub async fn publish(
    conn: &Connection,
    settings: &TriggerSettings,
    event: Event,
    facts: &WriteFacts<'_>,
) -> Outcome {
    let payload = serde_json::to_vec(&body(settings, event, facts)).unwrap_or_default();
    let props = properties(settings, facts);
    let attempts = settings.config.attempts.max(1);
    let mut backoff = settings.first_backoff;
    let mut error = None;
    for attempt in 1..=attempts {
        let once = publish_once(conn, settings, &payload, props.clone());
        let result = match tokio::time::timeout(settings.attempt_timeout, once).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no confirm from RabbitMQ within {:?}",
                settings.attempt_timeout
            )),
        };
        match result {
            Ok(()) => {
                return Outcome {
                    event,
                    attempts: attempt,
                    error: None,
                }
            }
            Err(e) => {
                tracing::warn!(
                    request_id = facts.request_id,
                    event = event.as_str(),
                    attempt,
                    attempts,
                    "processing trigger not published: {e}"
                );
                error = Some(e);
            }
        }
        if attempt < attempts {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    Outcome {
        event,
        attempts,
        error,
    }
}

/// One attempt: a channel of its own in confirm mode, a mandatory publish, the confirm.
async fn publish_once(
    conn: &Connection,
    settings: &TriggerSettings,
    payload: &[u8],
    props: BasicProperties,
) -> Result<(), String> {
    let (exchange, routing_key) = destination(&settings.config);
    let where_to = if exchange.is_empty() {
        format!("queue {routing_key} (default exchange)")
    } else {
        format!("exchange {exchange} with routing key {routing_key}")
    };
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| format!("opening a channel: {e}"))?;
    let result = async {
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| format!("enabling publisher confirms: {e}"))?;
        let key = broker::short(routing_key).map_err(|e| e.to_string())?;
        let confirm = ch
            .basic_publish(
                exchange.into(),
                key,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                payload,
                props,
            )
            .await
            .map_err(|e| format!("publishing to {where_to}: {e}"))?
            .await
            .map_err(|e| format!("publishing to {where_to}: {e}"))?;
        match confirm {
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => Err(format!(
                "RabbitMQ returned the message sent to {where_to}: {} {} (no queue is bound \
                 there: declare it first, see docs/processing.md)",
                returned.reply_code, returned.reply_text
            )),
            Confirmation::Nack(None) => Err(format!("RabbitMQ refused (nack) it for {where_to}")),
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        }
    }
    .await;
    // A channel a failed publish closed is gone already; closing it again only errors.
    let _ = ch.close(200, "trigger sent".into()).await;
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn facts<'a>(meta: Option<&'a Map<String, Value>>) -> WriteFacts<'a> {
        WriteFacts {
            request_id: "r1",
            output_file: "/data/p1/run.h5",
            number_of_frames: Some(10),
            metadata: meta,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        }
    }

    #[test]
    fn zocalo_message_is_what_zocalo_go_sends_and_metadata_never_overrides() {
        let meta = json!({"ispyb_dcid": 12345, "filename": "/elsewhere.h5"});
        let body = zocalo_body(&["r".into()], Event::End, &facts(meta.as_object()));
        assert_eq!(
            body,
            json!({"recipes": ["r"], "parameters": {
                "filename": "/data/p1/run.h5", "number_of_frames": 10, "start_frame_index": 0,
                "event": "end", "request_id": "r1", "ispyb_dcid": 12345,
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}})
        );
        let unbounded = WriteFacts {
            number_of_frames: None,
            ..facts(None)
        };
        let start = zocalo_body(&["r".into()], Event::Start, &unbounded);
        assert!(start["parameters"].get("number_of_frames").is_none());
        assert_eq!(start["parameters"]["event"], "start");
    }

    /// zocalo mode sends zocalo.go's headers; both modes are persistent JSON with the trace
    /// context; the destination follows the mode.
    #[test]
    fn properties_and_destination_follow_the_mode() {
        let header = |p: &BasicProperties, k: &str| crate::protocol::header_text(p, k);
        let mut zocalo = TriggerSettings::new(
            ProcessingTrigger {
                mode: TriggerMode::Zocalo {
                    queue: "processing_recipe".into(),
                    recipes: vec!["r".into()],
                },
                on_start: false,
                on_end: true,
                attempts: 3,
            },
            "jf",
        );
        zocalo.user = "e1".into();
        zocalo.host = "bl-ws1".into();
        let p = properties(&zocalo, &facts(None));
        assert_eq!(header(&p, "zocalo.go.user").as_deref(), Some("e1"));
        assert_eq!(header(&p, "zocalo.go.host").as_deref(), Some("bl-ws1"));
        assert_eq!(
            header(&p, "traceparent").as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(destination(&zocalo.config), ("", "processing_recipe"));
        let topic = TriggerSettings::new(
            ProcessingTrigger {
                mode: TriggerMode::Topic {
                    exchange: "amq.topic".into(),
                    routing_key: "gda.messages.scan".into(),
                },
                ..zocalo.config.clone()
            },
            "jf",
        );
        let untraced = WriteFacts {
            traceparent: None,
            ..facts(None)
        };
        let p = properties(&topic, &untraced);
        assert_eq!(header(&p, "zocalo.go.user"), None);
        assert_eq!(header(&p, "traceparent"), None);
        assert_eq!(
            destination(&topic.config),
            ("amq.topic", "gda.messages.scan")
        );
    }

    #[test]
    fn gda_scan_message_has_every_field_heliotrapi_requires() {
        let meta = json!({"scan_number": 42, "visit_directory": "/dls/i03/data/2026/cm1-1"});
        let end = gda_scan_body("jf", Event::End, &facts(meta.as_object()));
        assert_eq!(
            end,
            json!({"status": "FINISHED", "filePath": "/data/p1/run.h5",
                   "visitDirectory": "/dls/i03/data/2026/cm1-1", "swmrStatus": "INACTIVE",
                   "scanNumber": 42, "scanDimensions": [10], "scannables": [],
                   "detectors": ["jf"], "percentageComplete": 100.0, "processingRequest": {}})
        );
        let start = gda_scan_body("jf", Event::Start, &facts(None));
        assert_eq!(start["status"], "STARTED");
        assert_eq!(start["visitDirectory"], "/data/p1");
        assert_eq!(start["scanNumber"], 0);
        assert_eq!(start["percentageComplete"], 0.0);
    }
}
