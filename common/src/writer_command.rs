//! The writer's local command protocol, as messages: JSON over a ZMQ REQ/REP socket at
//! `ipc://<ipc_dir>/std-daq-<detector>-writer`, spoken by the writer agent, the CLI and tests.
//! Only the types live here (serde, no socket), so the agent and the CLI speak to the writer
//! without linking libhdf5; the ZMQ client is `std_writer_agent::writer_client`.
//!
//! ```text
//! {"command":"start","output_file":"/data/run1.h5","n_images":1000}  -> {"ok":true,...}
//! {"command":"start","output_file":"/data/run2.h5","n_images":null,"max_images":1000000}
//!                                                                    -> {"ok":true,...}
//! {"command":"stop"}                                                 -> {"ok":true,"run":{...}}
//! {"command":"status"}                                               -> {"ok":true,"status":{...}}
//! {"command":"cancel_if_empty","reason":"no image within 30 s"}      -> {"ok":true,"run":{...}}
//! ```
//! Every reply has `ok` and, when `ok` is false, an `error` that says what was wrong.
//!
//! **Unbounded runs.** A `start` whose `n_images` is absent or `null` writes every image until a
//! `stop` (or until its optional `max_images`, a guard against a run nobody stops); in Rust that
//! is [`Command::StartUnbounded`]. Its summary has `n_images: null`. Old senders, which always
//! send a number, get exactly what they got before. The wire shape is kept by [`WireCommand`].
//!
//! **Run context.** A `start` may carry `metadata` (a JSON object: run id, ISPyB data-collection
//! id, scan id, ...) and `traceparent` (W3C trace context), both optional ([`RunContext`]). The
//! writer stores them as the file's root attributes `metadata` (the object as JSON text) and
//! `traceparent`; without them the file has neither attribute, as before. The writer agent has
//! checked both; the writer takes them as given.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WireCommand", into = "WireCommand")]
pub enum Command {
    /// Write the next `n_images` images published after this command into `output_file`.
    /// `request_id` (optional) is echoed in the run's summary so a caller can match it.
    Start {
        output_file: String,
        n_images: u64,
        request_id: Option<String>,
        /// Written into the file's root attributes.
        context: RunContext,
    },
    /// Write every image published after this command into `output_file` until a
    /// [`Command::Stop`] (the file is then closed holding exactly the images written), or until
    /// `max_images` images were written if given (the run's `end` is then
    /// [`MAX_IMAGES_REACHED`]). On the wire: `start` with `n_images` absent or `null`.
    StartUnbounded {
        output_file: String,
        max_images: Option<u64>,
        request_id: Option<String>,
        /// Written into the file's root attributes.
        context: RunContext,
    },
    /// Close the current file now, keeping what was written. `reason` (e.g. `killed`) becomes
    /// the run's `end`; the default is `stopped`. The normal end of an unbounded run.
    Stop {
        reason: Option<String>,
    },
    Status,
    /// End the current run only if it has written no image yet, removing its partial file, so
    /// nothing is left on disk and the same `output_file` can be requested again; the run's `end`
    /// is `cancelled: <reason>; ...`. Refused (`ok` false, the run goes on) once an image was
    /// written: a run that receives images is never cancelled by this.
    CancelIfEmpty {
        reason: Option<String>,
    },
}

/// What a run carries beyond its images: opaque metadata and the trace context of the request,
/// stored as the file's root attributes `metadata` (JSON text) and `traceparent`. Both optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunContext {
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub traceparent: Option<String>,
    /// The request's NXmx geometry and beam, over the config's `nxmx` for this file only
    /// (docs/nxmx.md); the writer refuses the start if the result is invalid.
    pub nxmx: Option<crate::nxmx::NxmxRaw>,
}

impl Command {
    /// `start` as a caller holds it: `n_images` `None` is an unbounded run (ended by `stop`, or
    /// at `max_images` if given); `max_images` is only for unbounded runs and ignored otherwise.
    pub fn start(
        output_file: impl Into<String>,
        n_images: Option<u64>,
        max_images: Option<u64>,
        request_id: Option<String>,
    ) -> Command {
        Command::start_with(
            output_file,
            n_images,
            max_images,
            request_id,
            RunContext::default(),
        )
    }

    /// [`Command::start`] with the run's [`RunContext`] (metadata, traceparent).
    pub fn start_with(
        output_file: impl Into<String>,
        n_images: Option<u64>,
        max_images: Option<u64>,
        request_id: Option<String>,
        context: RunContext,
    ) -> Command {
        let output_file = output_file.into();
        match n_images {
            Some(n_images) => Command::Start {
                output_file,
                n_images,
                request_id,
                context,
            },
            None => Command::StartUnbounded {
                output_file,
                max_images,
                request_id,
                context,
            },
        }
    }
}

/// The `end` of an unbounded run that stopped because it wrote its `max_images`.
pub const MAX_IMAGES_REACHED: &str = "max_images reached";

/// [`Command`] as it travels: one `start` whose `n_images` may be absent or `null` (unbounded).
/// Kept apart so that the Rust variants stay what existing callers build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
#[allow(clippy::large_enum_variant)] // built or parsed once per command, never stored
pub enum WireCommand {
    Start {
        output_file: String,
        /// Absent or `null`: unbounded.
        #[serde(default)]
        n_images: Option<u64>,
        /// Unbounded runs only: stop after this many images.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_images: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        /// Opaque JSON object, stored as the file attribute `metadata` (JSON text).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<serde_json::Map<String, serde_json::Value>>,
        /// W3C trace context, stored as the file attribute `traceparent`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
        /// NXmx geometry and beam for this file, over the config's (docs/nxmx.md).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nxmx: Option<crate::nxmx::NxmxRaw>,
    },
    Stop {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Status,
    CancelIfEmpty {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl TryFrom<WireCommand> for Command {
    type Error = String;

    fn try_from(wire: WireCommand) -> Result<Self, Self::Error> {
        Ok(match wire {
            WireCommand::Start {
                n_images: Some(_),
                max_images: Some(_),
                ..
            } => {
                // Two limits would leave the reader guessing which one applies.
                return Err(
                    "max_images is for unbounded starts only (n_images absent or null)".to_string(),
                );
            }
            WireCommand::Start {
                output_file,
                n_images,
                max_images,
                request_id,
                metadata,
                traceparent,
                nxmx,
            } => Command::start_with(
                output_file,
                n_images,
                max_images,
                request_id,
                RunContext {
                    metadata,
                    traceparent,
                    nxmx,
                },
            ),
            WireCommand::Stop { reason } => Command::Stop { reason },
            WireCommand::Status => Command::Status,
            WireCommand::CancelIfEmpty { reason } => Command::CancelIfEmpty { reason },
        })
    }
}

impl From<Command> for WireCommand {
    fn from(cmd: Command) -> Self {
        match cmd {
            Command::Start {
                output_file,
                n_images,
                request_id,
                context,
            } => WireCommand::Start {
                output_file,
                n_images: Some(n_images),
                max_images: None,
                request_id,
                metadata: context.metadata,
                traceparent: context.traceparent,
                nxmx: context.nxmx,
            },
            Command::StartUnbounded {
                output_file,
                max_images,
                request_id,
                context,
            } => WireCommand::Start {
                output_file,
                n_images: None,
                max_images,
                request_id,
                metadata: context.metadata,
                traceparent: context.traceparent,
                nxmx: context.nxmx,
            },
            Command::Stop { reason } => WireCommand::Stop { reason },
            Command::Status => WireCommand::Status,
            Command::CancelIfEmpty { reason } => WireCommand::CancelIfEmpty { reason },
        }
    }
}

/// The outcome of one write run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The `request_id` given with `start`, if any.
    pub request_id: Option<String>,
    pub output_file: String,
    /// The file being written: `<output_file>.part` until the run ends, readable meanwhile by
    /// SWMR readers (`h5py.File(path, "r", swmr=True)`, `refresh()` to see it grow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_file: Option<String>,
    /// Images requested; `null` for an unbounded run (written until stopped).
    #[serde(default)]
    pub n_images: Option<u64>,
    /// An unbounded run's limit (`max_images` of its start), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_images: Option<u64>,
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
    /// `completed`, `stopped` (or the stop command's reason, e.g. `killed`), `failed: <why>`,
    /// `cancelled: <reason>; ...` (ended by `cancel_if_empty`: no image, no file), or for an
    /// unbounded run that wrote its `max_images`, [`MAX_IMAGES_REACHED`].
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

/// Where a run's file is written until it closes: `<output_file>.part`.
pub fn partial_path(output: &std::path::Path) -> std::path::PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".part");
    name.into()
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
            context: RunContext::default(),
        };
        assert_eq!(
            serde_json::to_string(&start).unwrap(),
            r#"{"command":"start","output_file":"/data/a.h5","n_images":5}"#
        );
        // The run context travels as two optional fields.
        let text = r#"{"command":"start","output_file":"/data/a.h5","n_images":5,"metadata":{"dcid":7},"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#;
        let with_context = serde_json::from_str::<Command>(text).unwrap();
        let Command::Start { context, .. } = &with_context else {
            panic!("{with_context:?}")
        };
        assert_eq!(
            context.metadata.as_ref().unwrap()["dcid"],
            serde_json::json!(7)
        );
        assert_eq!(
            context.traceparent.as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(serde_json::to_string(&with_context).unwrap(), text);
        assert!(serde_json::from_str::<Command>(
            r#"{"command":"start","output_file":"/a.h5","metadata":[1]}"#
        )
        .is_err());
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

    /// `start` without `n_images` (absent or null) is an unbounded run; a number is what it always
    /// was; other shapes are refused with serde's reason.
    #[test]
    fn start_without_n_images_is_unbounded_and_old_senders_are_unchanged() {
        let unbounded = |max_images| Command::StartUnbounded {
            output_file: "/data/u.h5".into(),
            max_images,
            request_id: None,
            context: RunContext::default(),
        };
        for text in [
            r#"{"command":"start","output_file":"/data/u.h5"}"#,
            r#"{"command":"start","output_file":"/data/u.h5","n_images":null}"#,
        ] {
            assert_eq!(
                serde_json::from_str::<Command>(text).unwrap(),
                unbounded(None)
            );
        }
        let capped =
            r#"{"command":"start","output_file":"/data/u.h5","n_images":null,"max_images":9}"#;
        assert_eq!(
            serde_json::from_str::<Command>(capped).unwrap(),
            unbounded(Some(9))
        );
        // Serialised with an explicit null, so a reader of the wire sees that it is unbounded.
        assert_eq!(serde_json::to_string(&unbounded(Some(9))).unwrap(), capped);
        assert_eq!(
            serde_json::to_string(&unbounded(None)).unwrap(),
            r#"{"command":"start","output_file":"/data/u.h5","n_images":null}"#
        );
        assert_eq!(
            Command::start("/data/u.h5", None, Some(9), None),
            unbounded(Some(9))
        );
        assert_eq!(
            Command::start("/data/a.h5", Some(5), Some(9), Some("r".into())),
            Command::Start {
                output_file: "/data/a.h5".into(),
                n_images: 5,
                request_id: Some("r".into()),
                context: RunContext::default(),
            }
        );
        let err = |text: &str| {
            serde_json::from_str::<Command>(text)
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(r#"{"command":"start","output_file":"/a.h5","n_images":5,"max_images":9}"#)
                .starts_with("max_images is for unbounded starts only (n_images absent or null)"),
        );
        assert!(
            err(r#"{"command":"start","output_file":"/a.h5","n_images":-1}"#)
                .starts_with("invalid value: integer `-1`, expected u64"),
        );
        assert!(
            err(r#"{"command":"start","output_file":"/a.h5","n_images":"5"}"#)
                .starts_with("invalid type: string \"5\", expected u64"),
        );
        assert!(
            err(r#"{"command":"start","output_file":"/a.h5","n_image":5}"#)
                .starts_with("unknown field `n_image`"),
        );
    }

    /// A run summary of an unbounded run says `n_images: null`; old summaries (a number) read
    /// as before.
    #[test]
    fn run_summaries_show_unbounded_runs_as_null() {
        let run = RunSummary {
            output_file: "/d/u.h5".into(),
            n_images: None,
            images_written: 3,
            ..RunSummary::default()
        };
        let v = serde_json::to_value(&run).unwrap();
        assert_eq!(v["n_images"], serde_json::Value::Null);
        assert!(v.get("max_images").is_none());
        let old = r#"{"request_id":null,"output_file":"/d/a.h5","n_images":4,"images_written":4,
            "images_good":4,"images_flagged":0,"missing_packets":0,"images_lost_in_buffer":0,
            "first_image_id":1,"last_image_id":4,"seconds":0.5,"bytes_written":8,"end":"completed"}"#;
        let back: RunSummary = serde_json::from_str(old).unwrap();
        assert_eq!((back.n_images, back.max_images), (Some(4), None));
    }
}
