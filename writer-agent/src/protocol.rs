//! The names and message shapes of the RabbitMQ protocol (std_daq_service conventions), shared by
//! the agent and the client. `docs/protocol.md` is the user-facing description; keep them in step.
//!
//! This module only builds and reads messages; it must never talk to the broker or the writer,
//! and reading a message from the network must never panic (missing or odd headers give empty
//! strings).

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;

/// Exchange names and kinds (declared non-durable, not auto-deleted: pika's defaults, so that a
/// std_daq Python service declaring the same exchanges does not clash).
pub mod exchange {
    /// Topic exchange; routing key = the agent's tag.
    pub const REQUEST: &str = "request";
    /// Fanout exchange; every status of every service. Filter by `correlation_id`.
    pub const STATUS: &str = "status";
    /// Topic exchange; routing key = the agent's tag; `correlation_id` = the request to kill.
    pub const KILL: &str = "kill";
}

/// Values of the `action` header of a status message.
pub mod action {
    /// The request passed validation and the writer accepted it.
    pub const REQUEST_START: &str = "request_start";
    /// std-daq extension: images written so far (body `images_written`, `n_images`).
    pub const REQUEST_PROGRESS: &str = "request_progress";
    /// The file is complete and closed. Final.
    pub const REQUEST_SUCCESS: &str = "request_success";
    /// Refused, killed, or the write failed; `message` says which. Final.
    pub const REQUEST_FAIL: &str = "request_fail";
    /// std-daq extension: a kill for a request this agent is not running; nothing was changed.
    pub const KILL_IGNORED: &str = "kill_ignored";
}

/// One status message as it travels on the `status` exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusMessage {
    /// The AMQP `correlation_id`: the request id (empty if the message had none).
    pub request_id: String,
    /// Header `action` (see [`action`]).
    pub action: String,
    /// Header `source`: the service name of the agent.
    pub source: String,
    /// Header `message`: human-readable, says exactly what happened.
    pub message: String,
    /// The JSON body: the request's fields echoed, plus what happened.
    pub body: serde_json::Value,
}

impl StatusMessage {
    pub fn is_final(&self) -> bool {
        self.action == action::REQUEST_SUCCESS || self.action == action::REQUEST_FAIL
    }

    /// AMQP properties: correlation_id, JSON content type, the three headers.
    pub fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        for (k, v) in [
            ("action", &self.action),
            ("source", &self.source),
            ("message", &self.message),
        ] {
            headers.insert(k.into(), AMQPValue::LongString(v.as_str().into()));
        }
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers);
        match ShortString::try_new(self.request_id.clone()) {
            Ok(id) if !id.as_str().is_empty() => props.with_correlation_id(id),
            _ => props,
        }
    }

    pub fn payload(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// Reads a message from the `status` exchange; anything missing becomes empty/null.
    pub fn from_amqp(props: &BasicProperties, data: &[u8]) -> Self {
        let header = |name: &str| -> String {
            props
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(name))
                .map(|v| match v {
                    AMQPValue::LongString(s) => s.to_string(),
                    AMQPValue::ShortString(s) => s.to_string(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default()
        };
        StatusMessage {
            request_id: props
                .correlation_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            action: header("action"),
            source: header("source"),
            message: header("message"),
            body: serde_json::from_slice(data).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// The correlation id of a delivery, if it has one.
pub fn correlation_id(props: &BasicProperties) -> Option<String> {
    props
        .correlation_id()
        .as_ref()
        .map(|s| s.to_string())
        .filter(|s| !s.is_empty())
}

/// Seconds since the Unix epoch (Python's `time.time()`).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The echo of a request body in status bodies: the JSON object as received, or, for a body that
/// is not a JSON object, `{"raw_request": <up to 1000 characters of it>}`.
pub fn echo(body: &[u8]) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => {
            let text: String = String::from_utf8_lossy(body).chars().take(1000).collect();
            let mut map = serde_json::Map::new();
            map.insert("raw_request".into(), text.into());
            map
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn status_round_trips_through_amqp_properties() {
        let msg = StatusMessage {
            request_id: "abc".into(),
            action: action::REQUEST_FAIL.into(),
            source: "x.writer_agent".into(),
            message: "n_images must be between 1 and 10, got 0".into(),
            body: serde_json::json!({"output_file": "/a.h5", "n_images": 0}),
        };
        let back = StatusMessage::from_amqp(&msg.properties(), &msg.payload());
        assert_eq!(back, msg);
        assert!(back.is_final());
    }

    #[test]
    fn odd_messages_do_not_panic() {
        let back = StatusMessage::from_amqp(&BasicProperties::default(), b"\xff not json");
        assert_eq!(back.action, "");
        assert_eq!(back.body, serde_json::Value::Null);
        assert_eq!(echo(b"\xffx")["raw_request"], "\u{fffd}x");
        assert_eq!(echo(br#"{"a":1}"#)["a"], 1);
        assert_eq!(echo(b"[1]")["raw_request"], "[1]");
    }
}
