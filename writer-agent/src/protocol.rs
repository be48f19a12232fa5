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

/// The durable queues of one agent and the dead-letter exchange they use (std-daq extension: the
/// std_daq services consumed from private, exclusive queues). Named after the agent's service
/// name, so an operator finds them with `rabbitmqctl list_queues name messages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentQueues {
    /// `std-daq.<service>.requests`: quorum queue bound to `request` with the agent's tag;
    /// `x-delivery-limit` and dead-lettering to [`DEAD_LETTER_EXCHANGE`].
    pub requests: String,
    /// `std-daq.<service>.dead-letter`: where the broker puts a request it gave up on; kept for
    /// the operator (the agent never consumes it).
    pub dead_letter: String,
    /// `std-daq.<service>.dead-letter-notices`: a copy of every dead letter, consumed by the agent
    /// to tell the client (`request_fail`) that its request was given up.
    pub notices: String,
}

/// Durable direct exchange every agent dead-letters to; the routing key is the agent's
/// [`AgentQueues::dead_letter`] queue name, bound to both its dead-letter and notices queues.
pub const DEAD_LETTER_EXCHANGE: &str = "std-daq.dead-letter";

impl AgentQueues {
    pub fn for_service(service_name: &str) -> Self {
        AgentQueues {
            requests: format!("std-daq.{service_name}.requests"),
            dead_letter: format!("std-daq.{service_name}.dead-letter"),
            notices: format!("std-daq.{service_name}.dead-letter-notices"),
        }
    }
}

/// Values of the `action` header of a status message.
pub mod action {
    /// The request passed validation and the writer accepted it.
    pub const REQUEST_START: &str = "request_start";
    /// std-daq extension: the request waits for the running write (body `queue_position`,
    /// 1-based, and `waiting_for`, the running request's id). Comes before its `request_start`.
    pub const REQUEST_QUEUED: &str = "request_queued";
    /// std-daq extension: images written so far (body `images_written`, `n_images`); while no
    /// image came, that the run waits for the first one (images_written 0, body `waiting_s`).
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

    /// AMQP properties: correlation_id, JSON content type, the three headers, and `traceparent`
    /// when the body carries a valid one (the request's trace context).
    pub fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        for (k, v) in [
            ("action", &self.action),
            ("source", &self.source),
            ("message", &self.message),
        ] {
            headers.insert(k.into(), AMQPValue::LongString(v.as_str().into()));
        }
        if let Some(t) = self.traceparent() {
            headers.insert("traceparent".into(), AMQPValue::LongString(t.into()));
        }
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers);
        match ShortString::try_new(self.request_id.clone()) {
            Ok(id) if !id.as_str().is_empty() => props.with_correlation_id(id),
            _ => props,
        }
    }

    /// The request's trace context: the body's `traceparent` if it is a valid W3C one.
    pub fn traceparent(&self) -> Option<&str> {
        self.body
            .get("traceparent")
            .and_then(serde_json::Value::as_str)
            .filter(|t| crate::request::check_traceparent(t).is_ok())
    }

    /// Adds a field to the body (a body that is not an object is left alone).
    pub fn insert(&mut self, key: &str, value: serde_json::Value) {
        if let serde_json::Value::Object(map) = &mut self.body {
            map.insert(key.into(), value);
        }
    }

    pub fn payload(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// Reads a message from the `status` exchange; anything missing becomes empty/null.
    pub fn from_amqp(props: &BasicProperties, data: &[u8]) -> Self {
        let header = |name: &str| header_text(props, name).unwrap_or_default();
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

/// A header as text (strings as they are, anything else in its debug form), if present.
pub fn header_text(props: &BasicProperties, name: &str) -> Option<String> {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
        .map(|v| match v {
            AMQPValue::LongString(s) => s.to_string(),
            AMQPValue::ShortString(s) => s.to_string(),
            other => format!("{other:?}"),
        })
}

/// The `x-delivery-count` header a quorum queue sets: how many times the message was delivered
/// before this delivery and not settled (0 on the first delivery). `None` when absent or not a
/// non-negative integer.
pub fn delivery_count(props: &BasicProperties) -> Option<u64> {
    let value = props.headers().as_ref()?.inner().get("x-delivery-count")?;
    match *value {
        AMQPValue::ShortShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(n)),
        AMQPValue::ShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(n)),
        AMQPValue::LongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(n)),
        AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
        AMQPValue::Timestamp(n) => Some(n),
        _ => None,
    }
}

/// Whether `routing_key` matches the binding key `pattern` of a topic exchange (words split on
/// `.`; `*` = exactly one word, `#` = zero or more words).
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = routing_key.split('.').collect();
    // matched[j]: the pattern words so far match the first j key words (dynamic programming,
    // O(pattern words x key words), whatever the number of '#').
    let mut matched = vec![false; k.len() + 1];
    matched[0] = true;
    for word in &p {
        let mut next = vec![false; k.len() + 1];
        for j in 0..=k.len() {
            next[j] = match *word {
                "#" => matched[j] || (j > 0 && next[j - 1]),
                "*" => j > 0 && matched[j - 1],
                w => j > 0 && matched[j - 1] && k[j - 1] == w,
            };
        }
        matched = next;
    }
    matched[k.len()]
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
/// A body larger than `max_len` bytes is not parsed (only its beginning is echoed).
pub fn echo(body: &[u8], max_len: usize) -> serde_json::Map<String, serde_json::Value> {
    let parsed = if body.len() <= max_len {
        serde_json::from_slice::<serde_json::Value>(body).ok()
    } else {
        None
    };
    match parsed {
        Some(serde_json::Value::Object(map)) => map,
        _ => {
            // 1000 characters are at most 4000 bytes of UTF-8.
            let head = &body[..body.len().min(4000)];
            let text: String = String::from_utf8_lossy(head).chars().take(1000).collect();
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
        assert_eq!(header_text(&msg.properties(), "traceparent"), None);
        // A valid trace context in the body travels as a header too; a malformed one does not.
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut traced = msg.clone();
        traced.insert("traceparent", tp.into());
        assert_eq!(
            header_text(&traced.properties(), "traceparent").as_deref(),
            Some(tp)
        );
        traced.insert("traceparent", "00-bad".into());
        assert_eq!(header_text(&traced.properties(), "traceparent"), None);
    }

    #[test]
    fn odd_messages_do_not_panic() {
        let back = StatusMessage::from_amqp(&BasicProperties::default(), b"\xff not json");
        assert_eq!(back.action, "");
        assert_eq!(back.body, serde_json::Value::Null);
        assert_eq!(echo(b"\xffx", 100)["raw_request"], "\u{fffd}x");
        assert_eq!(echo(br#"{"a":1}"#, 100)["a"], 1);
        assert_eq!(echo(b"[1]", 100)["raw_request"], "[1]");
        // Too large: not parsed, its beginning echoed as text.
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(5000));
        let e = echo(big.as_bytes(), 100);
        assert_eq!(e["raw_request"].as_str().unwrap().len(), 1000);
        assert!(e["raw_request"]
            .as_str()
            .unwrap()
            .starts_with(r#"{"a":"xxx"#));
    }

    #[test]
    fn delivery_count_reads_any_integer_and_ignores_the_rest() {
        let with = |v: AMQPValue| {
            let mut h = FieldTable::default();
            h.insert("x-delivery-count".into(), v);
            BasicProperties::default().with_headers(h)
        };
        assert_eq!(delivery_count(&BasicProperties::default()), None);
        assert_eq!(delivery_count(&with(AMQPValue::LongLongInt(3))), Some(3));
        assert_eq!(delivery_count(&with(AMQPValue::LongInt(0))), Some(0));
        assert_eq!(delivery_count(&with(AMQPValue::LongLongInt(-1))), None);
        assert_eq!(
            delivery_count(&with(AMQPValue::LongString("2".into()))),
            None
        );
    }

    #[test]
    fn topic_matching_follows_rabbitmq() {
        assert!(topic_matches("jf", "jf"));
        assert!(!topic_matches("jf", "jf2"));
        assert!(!topic_matches("jf", "jf.x"));
        assert!(topic_matches("#", "anything.at.all"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("jf.*", "jf.a"));
        assert!(!topic_matches("jf.*", "jf"));
        assert!(!topic_matches("jf.*", "jf.a.b"));
        assert!(topic_matches("jf.#", "jf"));
        assert!(topic_matches("jf.#", "jf.a.b"));
        assert!(topic_matches("*.b.#", "a.b"));
        assert!(!topic_matches("*.b.#", "a.c"));
        // Many '#' stay cheap enough on short keys.
        assert!(!topic_matches("#.#.#.#.#.#.x", "a.b.c.d.e.f.g.h"));
    }

    #[test]
    fn agent_queue_names() {
        let q = AgentQueues::for_service("jf.writer_agent");
        assert_eq!(q.requests, "std-daq.jf.writer_agent.requests");
        assert_eq!(q.dead_letter, "std-daq.jf.writer_agent.dead-letter");
        assert_eq!(q.notices, "std-daq.jf.writer_agent.dead-letter-notices");
    }
}
