//! The writer's local command protocol: JSON over a ZMQ REQ/REP socket at
//! `ipc://<ipc_dir>/std-daq-<detector>-writer`. The writer agent (RabbitMQ) will drive the writer
//! through the same commands; operators and tests can use it directly.
//!
//! ```text
//! {"command":"start","output_file":"/data/run1.h5","n_images":1000}  -> {"ok":true,...}
//! {"command":"stop"}                                                 -> {"ok":true,"run":{...}}
//! {"command":"status"}                                               -> {"ok":true,"status":{...}}
//! {"command":"cancel_if_empty","reason":"no image within 30 s"}      -> {"ok":true,"run":{...}}
//! ```
//! Every reply has `ok` and, when `ok` is false, an `error` that says what was wrong.

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Write the next `n_images` images published after this command into `output_file`.
    /// `request_id` (optional) is echoed in the run's summary so a caller can match it.
    Start {
        output_file: String,
        n_images: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
    /// Close the current file now, keeping what was written. `reason` (e.g. `killed`) becomes
    /// the run's `end`; the default is `stopped`.
    Stop {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Status,
    /// End the current run only if it has written no image yet, removing its partial file, so
    /// nothing is left on disk and the same `output_file` can be requested again; the run's `end`
    /// is `cancelled: <reason>; ...`. Refused (`ok` false, the run goes on) once an image was
    /// written: a run that receives images is never cancelled by this.
    CancelIfEmpty {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

/// The outcome of one write run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The `request_id` given with `start`, if any.
    pub request_id: Option<String>,
    pub output_file: String,
    pub n_images: u64,
    pub images_written: u64,
    /// Images in the file on disk with their records (the last checkpoint): what the partial
    /// file holds if the writer dies now. Equals `images_written` once the file is closed.
    #[serde(default)]
    pub images_checkpointed: u64,
    pub images_good: u64,
    /// Images written with a status other than good.
    pub images_flagged: u64,
    /// Sum of missing_packets over the images written.
    pub missing_packets: u64,
    /// Images zeroed because their ImageBuffer slot was overwritten while being written out.
    pub images_lost_in_buffer: u64,
    pub first_image_id: Option<u64>,
    pub last_image_id: Option<u64>,
    /// Image ids passed over between consecutive images of the run, so the file has no row for
    /// them: frames no module received (see the receivers' `frames_skipped`), or the detector
    /// stopped and started again further on within the run. A jump back counts none.
    #[serde(default)]
    pub image_ids_skipped: u64,
    /// From the first image received to the file closed.
    pub seconds: f64,
    pub bytes_written: u64,
    /// `completed`, `stopped` (or the stop command's reason, e.g. `killed`), `failed: <why>`, or
    /// `cancelled: <reason>; ...` (ended by `cancel_if_empty`: no image, no file).
    pub end: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WriterStatus {
    /// `idle` or `writing`.
    pub state: String,
    /// True once the assembler's stream has been seen (so a run can start without losing images).
    pub connected: bool,
    pub current: Option<RunSummary>,
    pub last_run: Option<RunSummary>,
    pub runs_completed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<WriterStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<RunSummary>,
}

impl Reply {
    pub fn error(message: impl Into<String>) -> Self {
        Reply {
            ok: false,
            error: Some(message.into()),
            ..Reply::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("ZMQ: {0}")]
    Zmq(#[from] zmq::Error),
    #[error("the writer did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the writer's reply is not valid: {0}")]
    BadReply(String),
}

/// A client for the command socket. Each request uses a fresh REQ socket, so a lost reply never
/// wedges the REQ state machine.
pub struct WriterClient {
    ctx: zmq::Context,
    endpoint: String,
    timeout: Duration,
}

impl std::fmt::Debug for WriterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterClient")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl WriterClient {
    pub fn new(ctx: &zmq::Context, endpoint: &str, timeout: Duration) -> Self {
        WriterClient {
            ctx: ctx.clone(),
            endpoint: endpoint.to_string(),
            timeout,
        }
    }

    pub fn request(&self, command: &Command) -> Result<Reply, ClientError> {
        let socket = self.ctx.socket(zmq::REQ)?;
        socket.set_linger(0)?;
        let ms = i32::try_from(self.timeout.as_millis()).unwrap_or(i32::MAX);
        socket.set_rcvtimeo(ms)?;
        socket.set_sndtimeo(ms)?;
        socket.connect(&self.endpoint)?;
        let body = serde_json::to_vec(command).map_err(|e| ClientError::BadReply(e.to_string()))?;
        socket.send(body, 0).map_err(|e| match e {
            zmq::Error::EAGAIN => ClientError::Timeout(self.timeout),
            e => e.into(),
        })?;
        let reply = socket.recv_bytes(0).map_err(|e| match e {
            zmq::Error::EAGAIN => ClientError::Timeout(self.timeout),
            e => e.into(),
        })?;
        serde_json::from_slice(&reply).map_err(|e| ClientError::BadReply(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn command_json_is_stable() {
        let start = Command::Start {
            output_file: "/data/a.h5".into(),
            n_images: 5,
            request_id: None,
        };
        assert_eq!(
            serde_json::to_string(&start).unwrap(),
            r#"{"command":"start","output_file":"/data/a.h5","n_images":5}"#
        );
        assert_eq!(
            serde_json::from_str::<Command>(r#"{"command":"stop"}"#).unwrap(),
            Command::Stop { reason: None }
        );
        assert_eq!(
            serde_json::from_str::<Command>(r#"{"command":"stop","reason":"killed"}"#).unwrap(),
            Command::Stop {
                reason: Some("killed".into())
            }
        );
        assert!(serde_json::from_str::<Command>(r#"{"command":"start","n_images":5}"#).is_err());
        assert!(serde_json::from_str::<Command>(r#"{"command":"explode"}"#).is_err());
        let cancel = Command::CancelIfEmpty {
            reason: Some("no image within 2 s".into()),
        };
        let text = r#"{"command":"cancel_if_empty","reason":"no image within 2 s"}"#;
        assert_eq!(serde_json::to_string(&cancel).unwrap(), text);
        assert_eq!(serde_json::from_str::<Command>(text).unwrap(), cancel);
        assert_eq!(
            serde_json::from_str::<Command>(r#"{"command":"cancel_if_empty"}"#).unwrap(),
            Command::CancelIfEmpty { reason: None }
        );
    }
}
