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
//!
//! **N writers** (`number_of_writers` > 1, docs/file-format.md "N writers"). Every writer follows
//! the whole image stream. A `start` carrying a [`Deal`] gives writer `writer` of `writers` its
//! share of the run: run position `p` is the image with id `first_image_id + p`, and belongs to
//! writer `p % writers` at row `p / writers` of that writer's own file
//! ([`writer_data_file`]). The agent starts every writer with `await_first_image_id`: each
//! creates its file, writes nothing yet and reports the first image it sees
//! (`first_image_after_start`); once all have seen one, the agent sends `set_first_image_id` with
//! the largest (the first image every writer saw, whatever the ids were before: a detector that
//! restarted its frame numbers is fine), and each writer takes the images it passed meanwhile
//! from the ImageBuffer. A position whose image never came is a row with status
//! 0 and zero pixels. When every writer has ended, `make_master` asks one writer to write the
//! master file at the requested `output_file`: virtual datasets over the writers' files, holding
//! run positions `0..images` where `images` is the longest prefix every writer really wrote.
//! ```text
//! {"command":"start","output_file":"/data/run1_writer1.h5","n_images":1000,
//!  "deal":{"writer":1,"writers":2,"first_image_id":0,"await_first_image_id":true}}
//!                                                                    -> {"ok":true,...}
//! {"command":"set_first_image_id","first_image_id":5001}             -> {"ok":true,...}
//! {"command":"make_master","output_file":"/data/run1.h5","writers":2,"first_image_id":5001,
//!  "n_images":1000,"sources":[{"writer":0,"file":"/data/run1_writer0.h5","rows":500},
//!                             {"writer":1,"file":"/data/run1_writer1.h5","rows":500}]}
//!                                                      -> {"ok":true,"master":{"images":1000,...}}
//! ```

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
    /// Write the master file of a run written by several writers (see the module docs).
    MakeMaster(MasterRequest),
    /// The first image id of a dealt run started with `await_first_image_id`.
    SetFirstImageId {
        first_image_id: u64,
    },
}

/// This writer's share of a run written by `writers` writers (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deal {
    /// This writer's index, `0..writers`; a writer refuses a deal meant for another index.
    pub writer: u32,
    pub writers: u32,
    /// Run position `p` is the image with id `first_image_id + p`: the same for every writer.
    pub first_image_id: u64,
    /// `first_image_id` is not known yet: the writer creates its file, writes nothing, reports
    /// the first image it sees (`first_image_after_start`) and waits for `set_first_image_id`
    /// (then takes the images it passed from the ImageBuffer). How the agent starts a run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub await_first_image_id: bool,
}

impl Deal {
    /// How many of the first `n` run positions belong to this writer.
    pub fn rows_of(&self, n: u64) -> u64 {
        let (w, k) = (u64::from(self.writers.max(1)), u64::from(self.writer));
        n.saturating_sub(k).div_ceil(w)
    }
}

/// One writer's file as the master file maps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterSource {
    pub writer: u32,
    /// The writer's data file (absolute; the master refers to it by its name in the same folder).
    pub file: String,
    /// Rows of that file that hold what the writer really wrote (its `images_written` when it
    /// closed the file, its `images_checkpointed` when it died).
    pub rows: u64,
}

/// `make_master`: the run's master file over its writers' files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterRequest {
    /// The requested `output_file`: where the master goes.
    pub output_file: String,
    pub writers: u32,
    pub first_image_id: u64,
    /// Images requested; `null` for an unbounded run.
    #[serde(default)]
    pub n_images: Option<u64>,
    /// One per writer, in writer order.
    pub sources: Vec<MasterSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The run's context, as its writers got it (the master carries the same attributes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nxmx: Option<crate::nxmx::NxmxRaw>,
    /// The writers' run summaries (with the agent's), stored as the master's `run_summary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_summary: Option<serde_json::Value>,
}

impl MasterRequest {
    /// Run positions the master can map: the longest prefix `0..P` every writer really wrote
    /// (position `p` is row `p / writers` of writer `p % writers`), at most `n_images`.
    pub fn images(&self) -> u64 {
        let n = u64::from(self.writers.max(1));
        let mut prefix = u64::MAX;
        for w in 0..self.writers {
            let rows = self
                .sources
                .iter()
                .find(|s| s.writer == w)
                .map_or(0, |s| s.rows);
            prefix = prefix.min(rows.saturating_mul(n).saturating_add(u64::from(w)));
        }
        prefix.min(self.n_images.unwrap_or(u64::MAX))
    }
}

/// What `make_master` wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterSummary {
    pub output_file: String,
    /// Images the master holds (run positions `0..images`).
    pub images: u64,
    /// Images written by the writers but left out because an earlier position is missing.
    pub images_left_out: u64,
}

/// The data file of writer `writer` for a run at `output`: `<stem>_writer<k>.h5` beside it.
pub fn writer_data_file(output: &std::path::Path, writer: u32) -> std::path::PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!("{stem}_writer{writer}.h5"))
}

/// The master file of a run whose writer `writer` writes `data_file` (the inverse of
/// [`writer_data_file`]); `None` if `data_file` is not such a name.
pub fn master_file_of(data_file: &std::path::Path, writer: u32) -> Option<std::path::PathBuf> {
    let name = data_file.file_name()?.to_str()?;
    let stem = name.strip_suffix(&format!("_writer{writer}.h5"))?;
    Some(data_file.with_file_name(format!("{stem}.h5")))
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
    /// This writer's share when several writers write the run; `None`: it writes every image.
    pub deal: Option<Deal>,
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
        /// This writer's share of a run of several writers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deal: Option<Deal>,
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
    MakeMaster(MasterRequest),
    SetFirstImageId {
        first_image_id: u64,
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
                deal,
            } => Command::start_with(
                output_file,
                n_images,
                max_images,
                request_id,
                RunContext {
                    metadata,
                    traceparent,
                    nxmx,
                    deal,
                },
            ),
            WireCommand::Stop { reason } => Command::Stop { reason },
            WireCommand::Status => Command::Status,
            WireCommand::CancelIfEmpty { reason } => Command::CancelIfEmpty { reason },
            WireCommand::MakeMaster(request) => Command::MakeMaster(request),
            WireCommand::SetFirstImageId { first_image_id } => {
                Command::SetFirstImageId { first_image_id }
            }
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
                deal: context.deal,
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
                deal: context.deal,
            },
            Command::Stop { reason } => WireCommand::Stop { reason },
            Command::Status => WireCommand::Status,
            Command::CancelIfEmpty { reason } => WireCommand::CancelIfEmpty { reason },
            Command::MakeMaster(request) => WireCommand::MakeMaster(request),
            Command::SetFirstImageId { first_image_id } => {
                WireCommand::SetFirstImageId { first_image_id }
            }
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
    /// This writer's share of a run of several writers (its `start`'s deal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deal: Option<Deal>,
    /// A dealt run waiting for its `first_image_id`: the first image id seen since the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_image_after_start: Option<u64>,
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
    /// The newest image id seen on the image stream, running or idle (picks a run's
    /// `first_image_id` when several writers share it).
    #[serde(default)]
    pub latest_image_id: Option<u64>,
    /// This writer's index and how many writers there are (`--writer-index`, the config's
    /// `number_of_writers`).
    #[serde(default)]
    pub writer_index: u32,
    #[serde(default = "one")]
    pub writers: u32,
}

fn one() -> u32 {
    1
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<MasterSummary>,
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

    /// The dealing rule and the master's prefix: what each writer holds, what the master maps.
    #[test]
    fn deals_and_master_prefix() {
        let deal = |writer| Deal {
            writer,
            writers: 3,
            first_image_id: 100,
            await_first_image_id: false,
        };
        // 10 positions over 3 writers: 0,3,6,9 | 1,4,7 | 2,5,8
        assert_eq!(
            (
                deal(0).rows_of(10),
                deal(1).rows_of(10),
                deal(2).rows_of(10)
            ),
            (4, 3, 3)
        );
        assert_eq!(deal(2).rows_of(2), 0);
        let master = |rows: [u64; 3], n_images| MasterRequest {
            output_file: "/d/run.h5".into(),
            writers: 3,
            first_image_id: 100,
            n_images,
            sources: (0..3)
                .map(|w| MasterSource {
                    writer: w,
                    file: format!("/d/run_writer{w}.h5"),
                    rows: rows[w as usize],
                })
                .collect(),
            request_id: None,
            metadata: None,
            traceparent: None,
            nxmx: None,
            run_summary: None,
        };
        assert_eq!(master([4, 3, 3], Some(10)).images(), 10);
        // Writer 1 stopped after 1 row: positions 0..4 exist (0 1 2 3), position 4 does not.
        assert_eq!(master([4, 1, 3], Some(10)).images(), 4);
        assert_eq!(master([0, 3, 3], None).images(), 0);
        assert_eq!(master([2, 2, 1], None).images(), 5);
        let mut missing = master([4, 3, 3], Some(10));
        missing.sources.remove(2);
        assert_eq!(
            missing.images(),
            2,
            "a writer without a source holds nothing"
        );
    }

    #[test]
    fn writer_data_files_sit_beside_the_master() {
        let out = std::path::Path::new("/data/p1/run1.h5");
        assert_eq!(
            writer_data_file(out, 3),
            std::path::PathBuf::from("/data/p1/run1_writer3.h5")
        );
        assert_eq!(
            master_file_of(&writer_data_file(out, 3), 3).as_deref(),
            Some(out)
        );
        assert_eq!(master_file_of(&writer_data_file(out, 3), 2), None);
        assert_eq!(master_file_of(out, 0), None);
    }

    #[test]
    fn deal_and_make_master_travel_as_json() {
        let start: Command = serde_json::from_str(
            r#"{"command":"start","output_file":"/d/r_writer1.h5","n_images":10,
                "deal":{"writer":1,"writers":2,"first_image_id":7}}"#,
        )
        .unwrap();
        let Command::Start { context, .. } = &start else {
            panic!("{start:?}")
        };
        assert_eq!(
            context.deal,
            Some(Deal {
                writer: 1,
                writers: 2,
                first_image_id: 7,
                await_first_image_id: false,
            })
        );
        let back: Command = serde_json::from_str(&serde_json::to_string(&start).unwrap()).unwrap();
        assert_eq!(back, start);
        let text = r#"{"command":"make_master","output_file":"/d/r.h5","writers":2,
            "first_image_id":7,"n_images":10,
            "sources":[{"writer":0,"file":"/d/r_writer0.h5","rows":5}]}"#;
        let Command::MakeMaster(m) = serde_json::from_str(text).unwrap() else {
            panic!()
        };
        assert_eq!((m.writers, m.sources.len(), m.images()), (2, 1, 1));
        let bad = r#"{"command":"make_master","output_file":"/d/r.h5","writers":2,
            "first_image_id":7,"sources":[],"extra":1}"#;
        assert!(
            serde_json::from_str::<Command>(bad).is_err(),
            "unknown fields refused"
        );
        let bad_deal = r#"{"command":"start","output_file":"/d/r.h5","n_images":1,
            "deal":{"writer":0,"writers":2,"first_image_id":1,"x":0}}"#;
        assert!(serde_json::from_str::<Command>(bad_deal).is_err());
    }

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
