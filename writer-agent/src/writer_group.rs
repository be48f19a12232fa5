//! The run's writers behind one command interface: with `number_of_writers` = 1 every command
//! goes to the one writer unchanged; with N > 1 the group speaks the N-writer protocol of
//! `std_daq_common::writer_command` (module docs there) and answers the agent as one writer would.
//!
//! - `start`: asks every writer for its status (all must answer, be idle and be the writer of
//!   its index), then starts writer k on `<stem>_writer<k>.h5` with its [`Deal`], awaiting the
//!   first image id. A writer that refuses cancels the ones already started (nothing stays on
//!   disk) and the start is refused naming it. Once every writer has seen an image since its
//!   start, the next `status` sets the run's first image id to the largest of those (the first
//!   image all of them saw) on every writer.
//! - `status`: the writers' runs summed into one. When every writer has ended, one of them writes
//!   the master file at the requested `output_file` (`make_master`) and the run's summary says
//!   what the master holds. A writer that no longer knows the run (restarted) or stops answering
//!   for `lost_after` ends the run: the others are stopped, the master maps the prefix of images
//!   every writer really wrote (the lost writer's last checkpoint), and the run ends
//!   `failed: writer k ...` naming the writer and what is safe.
//! - `stop` and `cancel_if_empty` go to every writer; the run ends as above.
//!
//! Must never: report a run complete unless every writer completed and the master holds every
//! image, or leave a started writer running after the group gave up on a run.

use crate::writer_client::{ClientError, WriterClient};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use std_daq_common::writer_command::{
    master_file_of, partial_path, writer_data_file, Command, Deal, MasterRequest, MasterSource,
    MasterSummary, Reply, RunContext, RunSummary, WriterStatus, MAX_IMAGES_REACHED,
};

/// One writer or several, as the agent drives them.
#[derive(Debug)]
pub struct WriterGroup {
    clients: Arc<Vec<WriterClient>>,
    endpoints: Vec<String>,
    lost_after: Duration,
    state: Mutex<GroupState>,
}

#[derive(Debug, Default)]
struct GroupState {
    run: Option<GroupRun>,
    last_run: Option<RunSummary>,
    runs_completed: u64,
}

#[derive(Debug)]
struct GroupRun {
    output_file: String,
    n_images: Option<u64>,
    max_images: Option<u64>,
    request_id: Option<String>,
    context: RunContext,
    /// Set once every writer has seen an image since the start.
    first_image_id: Option<u64>,
    /// What each writer last said about its part of the run.
    seen: Vec<Seen>,
    /// What the thread that sets the run's first image id found ([`set_first_image_id`]).
    anchor: Arc<AnchorState>,
    last_answer: Vec<Instant>,
}

impl GroupRun {
    /// Writer k is lost for the run, for `why`; what it last said stays (its checkpoint).
    fn lose(&mut self, k: usize, why: String) {
        let last = match &self.seen[k] {
            Seen::Running(s) | Seen::Ended(s) => Some(s.clone()),
            Seen::Lost { last, .. } => last.clone(),
        };
        self.seen[k] = Seen::Lost { why, last };
    }
}

#[derive(Debug, Clone)]
enum Seen {
    Running(RunSummary),
    Ended(RunSummary),
    Lost {
        why: String,
        last: Option<RunSummary>,
    },
}

impl WriterGroup {
    /// `endpoints[k]` is writer k's command socket (`names::writer_command_endpoint_of`).
    pub fn new(
        ctx: &zmq::Context,
        endpoints: &[String],
        timeout: Duration,
        lost_after: Duration,
    ) -> Self {
        WriterGroup {
            clients: Arc::new(
                endpoints
                    .iter()
                    .map(|e| WriterClient::new(ctx, e, timeout))
                    .collect(),
            ),
            endpoints: endpoints.to_vec(),
            lost_after,
            state: Mutex::new(GroupState::default()),
        }
    }

    pub fn writers(&self) -> usize {
        self.clients.len()
    }

    /// One command, as to a single writer.
    pub fn request(&self, cmd: &Command) -> Result<Reply, ClientError> {
        if self.clients.len() <= 1 {
            return match self.clients.first() {
                Some(c) => c.request(cmd),
                None => Ok(Reply::error("no writer is configured")),
            };
        }
        // A poisoned lock only means an earlier call panicked: the state is still consistent.
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(match cmd {
            Command::Start {
                output_file,
                n_images,
                request_id,
                context,
            } => self.start(
                &mut st,
                output_file,
                Some(*n_images),
                None,
                request_id,
                context,
            ),
            Command::StartUnbounded {
                output_file,
                max_images,
                request_id,
                context,
            } => self.start(&mut st, output_file, None, *max_images, request_id, context),
            Command::Status => return self.status(&mut st),
            Command::Stop { reason } => self.stop(&mut st, reason.as_deref()),
            Command::CancelIfEmpty { reason } => self.cancel_if_empty(&mut st, reason.as_deref()),
            Command::MakeMaster(_) | Command::SetFirstImageId { .. } => Reply::error(
                "make_master and set_first_image_id are for one writer, not for the writer \
                 agent's group",
            ),
        })
    }

    /// The same command to every writer at once.
    fn all(&self, cmd: &Command) -> Vec<Result<Reply, ClientError>> {
        self.each(|_| cmd.clone())
    }

    fn each(&self, cmd: impl Fn(u32) -> Command + Sync) -> Vec<Result<Reply, ClientError>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .clients
                .iter()
                .zip(0u32..)
                .map(|(c, k)| {
                    let cmd = &cmd;
                    s.spawn(move || c.request(&cmd(k)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ClientError::BadReply("writer call panicked".into()))
                    })
                })
                .collect()
        })
    }

    fn name(&self, k: usize) -> String {
        format!(
            "writer {k} ({})",
            self.endpoints.get(k).map_or("?", |e| e.as_str())
        )
    }

    fn start(
        &self,
        st: &mut GroupState,
        output_file: &str,
        n_images: Option<u64>,
        max_images: Option<u64>,
        request_id: &Option<String>,
        context: &RunContext,
    ) -> Reply {
        if let Some(run) = &st.run {
            return Reply::error(format!("a run is in progress: {}", run.output_file));
        }
        let output = Path::new(output_file);
        if output.exists() || partial_path(output).exists() {
            return Reply::error(format!("output_file {output_file:?} already exists"));
        }
        for (k, r) in self.all(&Command::Status).into_iter().enumerate() {
            match r {
                Ok(Reply {
                    ok: true,
                    status: Some(s),
                    ..
                }) => {
                    if s.current.is_some() {
                        return Reply::error(format!(
                            "{} is busy with another run; nothing was started",
                            self.name(k)
                        ));
                    }
                    if s.writer_index as usize != k || s.writers as usize != self.clients.len() {
                        return Reply::error(format!(
                            "{} says it is writer {} of {}, not {k} of {}: check \
                             number_of_writers and --writer-index; nothing was started",
                            self.name(k),
                            s.writer_index,
                            s.writers,
                            self.clients.len()
                        ));
                    }
                }
                Ok(r) => {
                    return Reply::error(format!(
                        "{} refused its status: {}; nothing was started",
                        self.name(k),
                        r.error.unwrap_or_default()
                    ))
                }
                Err(e) => {
                    return Reply::error(format!(
                        "{} does not answer: {e}; nothing was started",
                        self.name(k)
                    ))
                }
            }
        }
        let writers = self.clients.len() as u32;
        let start_of = |k: u32| {
            let context = RunContext {
                deal: Some(Deal {
                    writer: k,
                    writers,
                    first_image_id: 0,
                    await_first_image_id: true,
                }),
                ..context.clone()
            };
            Command::start_with(
                writer_data_file(output, k).display().to_string(),
                n_images,
                max_images,
                request_id.clone(),
                context,
            )
        };
        let replies = self.each(start_of);
        let refused: Vec<String> = replies
            .iter()
            .enumerate()
            .filter_map(|(k, r)| match r {
                Ok(Reply { ok: true, .. }) => None,
                Ok(r) => Some(format!(
                    "{}: {}",
                    self.name(k),
                    r.error.clone().unwrap_or_default()
                )),
                Err(e) => Some(format!("{}: {e}", self.name(k))),
            })
            .collect();
        if !refused.is_empty() {
            // Nothing of a run that did not start stays on disk.
            let reason = Some("another writer refused the start".to_string());
            for (k, r) in replies.iter().enumerate() {
                if matches!(r, Ok(Reply { ok: true, .. })) {
                    if let Err(e) = self.clients[k].request(&Command::CancelIfEmpty {
                        reason: reason.clone(),
                    }) {
                        tracing::warn!("cancelling {}: {e}", self.name(k));
                    }
                }
            }
            return Reply::error(format!(
                "the start was refused: {}; the run was not started",
                refused.join("; ")
            ));
        }
        tracing::info!(output_file, writers, "run started on every writer");
        let anchor = self.spawn_anchor(output, request_id);
        st.run = Some(GroupRun {
            output_file: output_file.to_string(),
            n_images,
            max_images,
            request_id: request_id.clone(),
            context: context.clone(),
            first_image_id: None,
            anchor,
            seen: vec![Seen::Running(RunSummary::default()); self.clients.len()],
            last_answer: vec![Instant::now(); self.clients.len()],
        });
        Reply {
            ok: true,
            ..Reply::default()
        }
    }

    /// Starts the thread that sets the first image id of the run at `output`.
    fn spawn_anchor(&self, output: &Path, request_id: &Option<String>) -> Arc<AnchorState> {
        let anchor = Arc::new(AnchorState::default());
        let (clients, state) = (Arc::clone(&self.clients), Arc::clone(&anchor));
        let files: Vec<String> = (0..self.clients.len() as u32)
            .map(|k| writer_data_file(output, k).display().to_string())
            .collect();
        let request_id = request_id.clone();
        std::thread::Builder::new()
            .name("first-image-id".into())
            .spawn(move || set_first_image_id(&clients, &files, &request_id, &state))
            .map_err(|e| tracing::error!("cannot start the first-image-id thread: {e}"))
            .ok();
        anchor
    }

    /// Takes up a run every writer is running for one request without the group knowing it
    /// (the agent restarted mid-run): following it again ends it with its master file. The
    /// run's metadata and traceparent are not known any more; the master goes without them.
    fn adopt(&self, replies: &[Result<Reply, ClientError>]) -> Option<GroupRun> {
        let n = self.clients.len();
        let mut parts = Vec::with_capacity(n);
        for (k, r) in replies.iter().enumerate() {
            let Ok(Reply {
                ok: true,
                status: Some(s),
                ..
            }) = r
            else {
                return None;
            };
            let cur = s.current.clone()?;
            let deal = cur.deal?;
            if deal.writer as usize != k || deal.writers as usize != n || cur.request_id.is_none() {
                return None;
            }
            parts.push(cur);
        }
        let first = parts.first()?;
        let master = master_file_of(Path::new(&first.output_file), 0)?;
        let same_run = parts.iter().enumerate().all(|(k, p)| {
            p.request_id == first.request_id
                && p.output_file == writer_data_file(&master, k as u32).display().to_string()
        });
        if !same_run {
            return None;
        }
        let deal = first.deal?;
        tracing::info!(
            output_file = %master.display(),
            request_id = first.request_id,
            "taking up the run every writer is running"
        );
        let anchored = !deal.await_first_image_id;
        Some(GroupRun {
            output_file: master.display().to_string(),
            n_images: first.n_images,
            max_images: first.max_images,
            request_id: first.request_id.clone(),
            context: RunContext::default(),
            first_image_id: anchored.then_some(deal.first_image_id),
            anchor: if anchored {
                Arc::default()
            } else {
                self.spawn_anchor(&master, &first.request_id)
            },
            last_answer: vec![Instant::now(); n],
            seen: parts.into_iter().map(Seen::Running).collect(),
        })
    }

    /// Whether `r` is writer k's part of `run`.
    fn is_part(run: &GroupRun, k: usize, r: &RunSummary) -> bool {
        r.request_id == run.request_id
            && r.deal.is_some_and(|d| d.writer as usize == k)
            && r.output_file
                == writer_data_file(Path::new(&run.output_file), k as u32)
                    .display()
                    .to_string()
    }

    /// Takes in what each writer says now.
    fn observe(&self, run: &mut GroupRun, replies: Vec<Result<Reply, ClientError>>) {
        for (k, r) in replies.into_iter().enumerate() {
            self.observe_one(run, k, r);
        }
    }

    /// Takes in what writer k says now (only while it is running the run).
    fn observe_one(&self, run: &mut GroupRun, k: usize, r: Result<Reply, ClientError>) {
        if !matches!(run.seen[k], Seen::Running(_)) {
            return;
        }
        match r {
            Ok(Reply {
                ok: true,
                status: Some(s),
                ..
            }) => {
                run.last_answer[k] = Instant::now();
                if let Some(cur) = s.current.filter(|c| Self::is_part(run, k, c)) {
                    run.seen[k] = Seen::Running(cur);
                } else if let Some(done) = s.last_run.filter(|c| Self::is_part(run, k, c)) {
                    run.seen[k] = Seen::Ended(done);
                } else {
                    let why = format!(
                        "{} no longer knows the run (was it restarted?)",
                        self.name(k)
                    );
                    run.lose(k, why);
                }
            }
            Ok(r) => {
                let why = format!(
                    "{} gave an unusable status: {}",
                    self.name(k),
                    r.error.unwrap_or_default()
                );
                run.lose(k, why);
            }
            Err(e) if run.last_answer[k].elapsed() > self.lost_after => {
                let why = format!(
                    "{} stopped answering for {} s: {e}",
                    self.name(k),
                    self.lost_after.as_secs()
                );
                run.lose(k, why);
            }
            Err(e) => tracing::warn!("{}: {e}", self.name(k)),
        }
    }

    fn status(&self, st: &mut GroupState) -> Result<Reply, ClientError> {
        let replies = self.all(&Command::Status);
        if st.run.is_none() {
            st.run = self.adopt(&replies);
        }
        let Some(mut run) = st.run.take() else {
            return self.idle_status(st, replies);
        };
        self.observe(&mut run, replies);
        self.take_anchor(&mut run);
        let lost = run.seen.iter().any(|s| matches!(s, Seen::Lost { .. }));
        // A writer that failed (disk full, ...) bounds the master where its file ends: the
        // others stop too rather than write what the master cannot map.
        let failed = run
            .seen
            .iter()
            .any(|s| matches!(s, Seen::Ended(r) if r.end.starts_with("failed")));
        let all_ended = run.seen.iter().all(|s| matches!(s, Seen::Ended(_)));
        if lost {
            self.stop_running(&mut run, "stopped: another writer of the run was lost");
        } else if failed && !all_ended {
            self.stop_running(&mut run, "stopped: another writer of the run failed");
        }
        let lost = lost || failed;
        if lost || all_ended {
            self.end_run(st, run);
            return Ok(self.reply_status(st, None));
        }
        let current = combined(&run);
        st.run = Some(run);
        Ok(self.reply_status(st, Some(current)))
    }

    fn reply_status(&self, st: &GroupState, current: Option<RunSummary>) -> Reply {
        Reply {
            ok: true,
            status: Some(WriterStatus {
                state: if current.is_some() { "writing" } else { "idle" }.into(),
                connected: true,
                current,
                last_run: st.last_run.clone(),
                runs_completed: st.runs_completed,
                latest_image_id: None,
                writer_index: 0,
                writers: self.clients.len() as u32,
            }),
            ..Reply::default()
        }
    }

    /// No run of the group: the writers' own state, combined.
    fn idle_status(
        &self,
        st: &GroupState,
        replies: Vec<Result<Reply, ClientError>>,
    ) -> Result<Reply, ClientError> {
        let mut connected = true;
        let mut writing = false;
        let mut latest = None;
        let mut last_error = None;
        for (k, r) in replies.into_iter().enumerate() {
            match r {
                Ok(Reply {
                    ok: true,
                    status: Some(s),
                    ..
                }) => {
                    connected &= s.connected;
                    writing |= s.current.is_some();
                    latest = latest.max(s.latest_image_id);
                }
                Ok(r) => {
                    last_error = Some(ClientError::BadReply(format!(
                        "{}: {}",
                        self.name(k),
                        r.error.unwrap_or_default()
                    )))
                }
                Err(e) => last_error = Some(e),
            }
        }
        if let Some(e) = last_error {
            return Err(e);
        }
        let mut reply = self.reply_status(st, None);
        if let Some(s) = reply.status.as_mut() {
            s.connected = connected;
            s.latest_image_id = latest;
            if writing {
                s.state = "writing".into();
            }
        }
        Ok(reply)
    }

    /// Takes the first image id the anchoring thread set, if it has; a writer that refused it
    /// is lost.
    fn take_anchor(&self, run: &mut GroupRun) {
        if run.first_image_id.is_some() {
            return;
        }
        let taken = run
            .anchor
            .result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some((first, refusals)) = taken else {
            return;
        };
        for (k, why) in refusals {
            run.lose(k, format!("{}: {why}", self.name(k)));
        }
        run.first_image_id = Some(first);
    }

    /// Stops every writer still running the run (they close their files with what they wrote).
    fn stop_running(&self, run: &mut GroupRun, reason: &str) {
        let running: Vec<usize> = (0..run.seen.len())
            .filter(|k| matches!(run.seen[*k], Seen::Running(_)))
            .collect();
        let stop = Command::Stop {
            reason: Some(reason.to_string()),
        };
        let replies = self.each(|k| {
            if running.contains(&(k as usize)) {
                stop.clone()
            } else {
                Command::Status
            }
        });
        for k in running {
            match &replies[k] {
                Ok(Reply {
                    ok: true,
                    run: Some(done),
                    ..
                }) if Self::is_part(run, k, done) => run.seen[k] = Seen::Ended(done.clone()),
                // It ended by itself just before the stop: its status says how.
                _ => {
                    let status = self.clients[k].request(&Command::Status);
                    self.observe_one(run, k, status);
                    if matches!(run.seen[k], Seen::Running(_)) {
                        run.lose(k, format!("{} did not stop", self.name(k)));
                    }
                }
            }
        }
    }

    fn stop(&self, st: &mut GroupState, reason: Option<&str>) -> Reply {
        let Some(mut run) = st.run.take() else {
            return Reply::error("no run is in progress");
        };
        let replies = self.all(&Command::Status);
        self.observe(&mut run, replies);
        self.stop_running(&mut run, reason.unwrap_or("stopped"));
        self.end_run(st, run);
        Reply {
            ok: true,
            run: st.last_run.clone(),
            ..Reply::default()
        }
    }

    fn cancel_if_empty(&self, st: &mut GroupState, reason: Option<&str>) -> Reply {
        let Some(mut run) = st.run.take() else {
            return Reply::error("no run is in progress");
        };
        let replies = self.all(&Command::Status);
        self.observe(&mut run, replies);
        let written: u64 = run
            .seen
            .iter()
            .map(|s| match s {
                Seen::Running(r) | Seen::Ended(r) => r.images_written,
                Seen::Lost { .. } => 0,
            })
            .sum();
        if written > 0 || !run.seen.iter().all(|s| matches!(s, Seen::Running(_))) {
            st.run = Some(run);
            return Reply::error(format!(
                "the run has written {written} images already (or a writer ended it): it goes on"
            ));
        }
        let cancel = Command::CancelIfEmpty {
            reason: reason.map(str::to_string),
        };
        let replies = self.all(&cancel);
        let mut ends = Vec::new();
        for (k, r) in replies.into_iter().enumerate() {
            // A writer that refused got an image meanwhile: it is stopped below, the run failed.
            if let Ok(Reply {
                ok: true,
                run: Some(done),
                ..
            }) = r
            {
                ends.push(done.end.clone());
                run.seen[k] = Seen::Ended(done);
            }
        }
        if run.seen.iter().all(|s| matches!(s, Seen::Ended(_))) {
            let mut summary = combined(&run);
            summary.end = ends.first().cloned().unwrap_or_default();
            summary.images_written = 0;
            st.last_run = Some(summary.clone());
            st.runs_completed += 1;
            return Reply {
                ok: true,
                run: Some(summary),
                ..Reply::default()
            };
        }
        self.stop_running(&mut run, "stopped: the run was being cancelled");
        self.end_run(st, run);
        Reply {
            ok: true,
            run: st.last_run.clone(),
            ..Reply::default()
        }
    }

    /// Every writer has ended (or was lost): writes the master and sets the run's summary.
    fn end_run(&self, st: &mut GroupState, mut run: GroupRun) {
        run.anchor.cancel.store(true, Ordering::Relaxed);
        self.take_anchor(&mut run);
        let writers = self.clients.len();
        let sources: Vec<MasterSource> = run
            .seen
            .iter()
            .enumerate()
            .map(|(k, s)| source_of(&run, k, s))
            .collect();
        let mut summary = combined(&run);
        let request = MasterRequest {
            output_file: run.output_file.clone(),
            writers: writers as u32,
            first_image_id: run.first_image_id.unwrap_or(0),
            n_images: run.n_images,
            sources: sources.clone(),
            request_id: run.request_id.clone(),
            metadata: run.context.metadata.clone(),
            traceparent: run.context.traceparent.clone(),
            nxmx: run.context.nxmx.clone(),
            run_summary: serde_json::to_value(PerWriter {
                writers: run
                    .seen
                    .iter()
                    .map(|s| match s {
                        Seen::Running(r) | Seen::Ended(r) => Some(r.clone()),
                        Seen::Lost { last, .. } => last.clone(),
                    })
                    .collect(),
            })
            .ok(),
        };
        let mut master = self.make_master(&run, &request);
        let mut sources = sources;
        // A lost writer's file may not open yet (still flagged open for writing until its
        // restarted writer clears it): a master without its rows is still honest.
        let lost: Vec<usize> = (0..writers)
            .filter(|k| matches!(run.seen[*k], Seen::Lost { .. }) && sources[*k].rows > 0)
            .collect();
        if master.is_err() && !lost.is_empty() {
            let mut without = request.clone();
            for k in &lost {
                without.sources[*k].rows = 0;
                sources[*k].rows = 0;
            }
            tracing::warn!(
                "the master over the lost writers' files failed ({}); writing it without them",
                master.as_ref().err().map_or("", |e| e.as_str())
            );
            master = self.make_master(&run, &without);
        }
        let files: Vec<String> = sources.iter().map(|s| s.file.clone()).collect();
        summary.end = combined_end(&run, &master, &files);
        if let Ok(m) = &master {
            summary.images_written = m.images;
            summary.images_checkpointed = m.images;
        } else {
            summary.images_checkpointed = 0;
        }
        tracing::info!(
            output_file = summary.output_file,
            images = summary.images_written,
            end = summary.end,
            "run of {writers} writers finished"
        );
        st.runs_completed += 1;
        st.last_run = Some(summary);
    }
}

impl WriterGroup {
    /// Asks a live writer (writer 0 first) to write the master.
    fn make_master(
        &self,
        run: &GroupRun,
        request: &MasterRequest,
    ) -> Result<MasterSummary, String> {
        let mut errors = Vec::new();
        for k in 0..self.clients.len() {
            if matches!(run.seen[k], Seen::Lost { .. }) {
                continue;
            }
            match self.clients[k].request(&Command::MakeMaster(request.clone())) {
                Ok(Reply {
                    ok: true,
                    master: Some(m),
                    ..
                }) => return Ok(m),
                Ok(r) => errors.push(format!("{}: {}", self.name(k), r.error.unwrap_or_default())),
                Err(e) => errors.push(format!("{}: {e}", self.name(k))),
            }
        }
        if errors.is_empty() {
            errors.push("no writer is left to write it".into());
        }
        Err(errors.join("; "))
    }
}

/// The run's first image id and the writers (index, why) that refused it.
type Anchored = (u64, Vec<(usize, String)>);

/// What the anchoring thread found.
#[derive(Debug, Default)]
struct AnchorState {
    result: Mutex<Option<Anchored>>,
    /// The run ended: stop looking.
    cancel: AtomicBool,
}

/// How often the anchoring thread asks the writers whether they have seen an image: often in
/// the first second (a detector usually starts right after the request), then less (a run
/// started long before its detector should not keep the writers answering 500 times a second).
/// Either way the images that go by meanwhile are a few of the ImageBuffer's slots.
const ANCHOR_POLL: Duration = Duration::from_millis(2);
const ANCHOR_POLL_LATER: Duration = Duration::from_millis(10);
const ANCHOR_FAST_POLLS: u32 = 500;

/// Runs beside the run until every writer running it has seen an image since its start, then
/// sets the largest of those ids (the first image all of them saw) on each: images that went by
/// meanwhile stay in the ImageBuffer for a few ms at most (`ANCHOR_POLL`), whoever polls the
/// group and how often. A writer that does not answer is waited for (the group's status decides when it is
/// lost).
fn set_first_image_id(
    clients: &[WriterClient],
    files: &[String],
    request_id: &Option<String>,
    state: &AnchorState,
) {
    let mut polls: u32 = 0;
    while !state.cancel.load(Ordering::Relaxed) {
        let mut first: Option<u64> = None;
        let mut running = vec![false; clients.len()];
        let mut ready = true;
        for (k, client) in clients.iter().enumerate() {
            let mine = |r: &RunSummary| &r.request_id == request_id && r.output_file == files[k];
            match client.request(&Command::Status) {
                Ok(Reply {
                    ok: true,
                    status: Some(s),
                    ..
                }) => {
                    if let Some(cur) = s.current.filter(|c| mine(c)) {
                        running[k] = true;
                        match cur.first_image_after_start {
                            Some(id) => first = first.max(Some(id)),
                            None => ready = false,
                        }
                    }
                }
                _ => ready = false,
            }
        }
        if let (true, Some(first)) = (ready, first) {
            let mut refusals = Vec::new();
            for (k, client) in clients.iter().enumerate().filter(|(k, _)| running[*k]) {
                match client.request(&Command::SetFirstImageId {
                    first_image_id: first,
                }) {
                    Ok(Reply { ok: true, .. }) => {}
                    Ok(r) => refusals.push((
                        k,
                        format!(
                            "refused first_image_id {first}: {}",
                            r.error.unwrap_or_default()
                        ),
                    )),
                    Err(e) => {
                        refusals.push((k, format!("did not take first_image_id {first}: {e}")))
                    }
                }
            }
            tracing::info!(
                first_image_id = first,
                "the run's first image id is set on its writers"
            );
            *state.result.lock().unwrap_or_else(|e| e.into_inner()) = Some((first, refusals));
            return;
        }
        polls = polls.saturating_add(1);
        std::thread::sleep(if polls < ANCHOR_FAST_POLLS {
            ANCHOR_POLL
        } else {
            ANCHOR_POLL_LATER
        });
    }
}

#[derive(serde::Serialize)]
struct PerWriter {
    /// Each writer's own summary of its part (the last known one for a lost writer).
    writers: Vec<Option<RunSummary>>,
}

/// What of writer k's file the master may map.
fn source_of(run: &GroupRun, k: usize, seen: &Seen) -> MasterSource {
    let data = writer_data_file(Path::new(&run.output_file), k as u32);
    let (file, rows) = match seen {
        // A closed file holds every row it wrote; a failed one stays `.part` at its checkpoint.
        Seen::Ended(r) if !r.end.starts_with("failed") => (data, r.images_written),
        Seen::Ended(r) => (partial_path(&data), r.images_checkpointed),
        Seen::Running(r) => (partial_path(&data), r.images_checkpointed),
        Seen::Lost { last, .. } => (
            partial_path(&data),
            last.as_ref().map_or(0, |r| r.images_checkpointed),
        ),
    };
    MasterSource {
        writer: k as u32,
        file: file.display().to_string(),
        rows,
    }
}

/// The writers' summaries summed (the counts of a run in progress).
fn combined(run: &GroupRun) -> RunSummary {
    let mut s = RunSummary {
        request_id: run.request_id.clone(),
        output_file: run.output_file.clone(),
        n_images: run.n_images,
        max_images: run.max_images,
        first_image_id: run.first_image_id,
        ..RunSummary::default()
    };
    for seen in &run.seen {
        let r = match seen {
            Seen::Running(r) | Seen::Ended(r) => r,
            Seen::Lost { last: Some(r), .. } => r,
            Seen::Lost { last: None, .. } => continue,
        };
        s.images_written += r.images_written;
        s.images_checkpointed += r.images_checkpointed;
        s.images_good += r.images_good;
        s.images_flagged += r.images_flagged;
        s.missing_packets += r.missing_packets;
        s.images_lost_in_buffer += r.images_lost_in_buffer;
        s.image_ids_skipped += r.image_ids_skipped;
        s.bytes_written += r.bytes_written;
        s.last_image_id = s.last_image_id.max(r.last_image_id);
        s.seconds = s.seconds.max(r.seconds);
    }
    s
}

/// The run's `end`: a writer's own end when every writer ended the same normal way and the
/// master holds what they wrote, else `failed: ...` naming each writer that did not.
fn combined_end(
    run: &GroupRun,
    master: &Result<MasterSummary, String>,
    files: &[String],
) -> String {
    let normal = |e: &str| {
        e == "completed"
            || e == "killed"
            || e == "stopped"
            || e == MAX_IMAGES_REACHED
            || e.starts_with("stopped:")
    };
    let ends: Vec<Option<&str>> = run
        .seen
        .iter()
        .map(|s| match s {
            Seen::Ended(r) => Some(r.end.as_str()),
            _ => None,
        })
        .collect();
    let mut problems: Vec<String> = run
        .seen
        .iter()
        .enumerate()
        .filter_map(|(k, s)| match s {
            Seen::Lost { why, last } => Some(format!(
                "{why}; its file {} holds at least the {} images of its last checkpoint",
                files.get(k).map_or("?", |f| f.as_str()),
                last.as_ref().map_or(0, |r| r.images_checkpointed)
            )),
            Seen::Ended(r) if !normal(&r.end) => Some(format!("writer {k}: {}", r.end)),
            Seen::Running(_) => Some(format!("writer {k} did not end")),
            _ => None,
        })
        .collect();
    // The writers stopped because of a lost one: their ends say so, the lost one is the cause.
    let lost = run.seen.iter().any(|s| matches!(s, Seen::Lost { .. }));
    match master {
        Err(e) => problems.push(format!(
            "the master file {} could not be written ({e}); the images are in {}",
            run.output_file,
            files.join(", ")
        )),
        Ok(m) => {
            let expected = run.n_images;
            let short = expected.is_some_and(|n| m.images < n);
            if !problems.is_empty() || lost {
                problems.push(format!(
                    "the master file {} holds images 0..{} of the run (every writer wrote \
                     those){}",
                    run.output_file,
                    m.images,
                    if m.images_left_out > 0 {
                        format!(
                            "; {} later images are only in the writers' files",
                            m.images_left_out
                        )
                    } else {
                        String::new()
                    }
                ));
            } else if short && ends.iter().all(|e| *e == Some("completed")) {
                problems.push(format!(
                    "every writer completed but the master file holds {} of {} images",
                    m.images,
                    expected.unwrap_or(0)
                ));
            }
        }
    }
    if problems.is_empty() {
        let first = ends.first().copied().flatten().unwrap_or("stopped");
        if ends.iter().all(|e| *e == Some(first)) {
            return first.to_string();
        }
        return format!(
            "failed: the writers ended differently: {}",
            ends.iter()
                .enumerate()
                .map(|(k, e)| format!("writer {k} {}", e.unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    format!("failed: {}", problems.join("; "))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run_of(seen: Vec<Seen>) -> GroupRun {
        GroupRun {
            output_file: "/d/run.h5".into(),
            n_images: Some(10),
            max_images: None,
            request_id: Some("r1".into()),
            context: RunContext::default(),
            first_image_id: Some(100),
            anchor: Arc::default(),
            last_answer: vec![Instant::now(); seen.len()],
            seen,
        }
    }

    fn part(k: u32, written: u64, checkpointed: u64, end: &str) -> RunSummary {
        RunSummary {
            request_id: Some("r1".into()),
            output_file: format!("/d/run_writer{k}.h5"),
            n_images: Some(10),
            images_written: written,
            images_checkpointed: checkpointed,
            images_good: written,
            end: end.into(),
            deal: Some(Deal {
                writer: k,
                writers: 2,
                first_image_id: 100,
                await_first_image_id: false,
            }),
            ..RunSummary::default()
        }
    }

    #[test]
    fn every_writer_completing_with_a_full_master_is_completed() {
        let run = run_of(vec![
            Seen::Ended(part(0, 5, 5, "completed")),
            Seen::Ended(part(1, 5, 5, "completed")),
        ]);
        let master = Ok(MasterSummary {
            output_file: "/d/run.h5".into(),
            images: 10,
            images_left_out: 0,
        });
        let files = vec!["a".into(), "b".into()];
        assert_eq!(combined_end(&run, &master, &files), "completed");
        let s = combined(&run);
        assert_eq!((s.images_written, s.images_good), (10, 10));
        assert!(WriterGroup::is_part(&run, 1, &part(1, 5, 5, "completed")));
        assert!(!WriterGroup::is_part(&run, 0, &part(1, 5, 5, "completed")));
    }

    /// A lost writer: the run fails naming it and what is safe; the master's share is said.
    #[test]
    fn a_lost_writer_fails_the_run_and_names_what_is_safe() {
        let run = run_of(vec![
            Seen::Ended(part(0, 5, 5, "stopped: another writer of the run was lost")),
            Seen::Lost {
                why: "writer 1 (ipc://x) no longer knows the run (was it restarted?)".into(),
                last: Some(part(1, 3, 2, "")),
            },
        ]);
        let sources: Vec<MasterSource> = run
            .seen
            .iter()
            .enumerate()
            .map(|(k, s)| source_of(&run, k, s))
            .collect();
        assert_eq!(sources[0].rows, 5);
        assert_eq!(
            (sources[1].file.as_str(), sources[1].rows),
            ("/d/run_writer1.h5.part", 2)
        );
        let master = Ok(MasterSummary {
            output_file: "/d/run.h5".into(),
            images: 5,
            images_left_out: 1,
        });
        let files: Vec<String> = sources.iter().map(|s| s.file.clone()).collect();
        let end = combined_end(&run, &master, &files);
        assert!(
            end.starts_with("failed: writer 1 (ipc://x) no longer knows"),
            "{end}"
        );
        assert!(
            end.contains("/d/run_writer1.h5.part holds at least the 2 images"),
            "{end}"
        );
        assert!(end.contains("holds images 0..5 of the run"), "{end}");
        assert!(
            end.contains("1 later images are only in the writers' files"),
            "{end}"
        );
    }

    /// A writer that failed (disk full): its `.part` holds its checkpoint, the master maps the
    /// prefix, the run fails naming the writer and its reason.
    #[test]
    fn a_failed_writer_bounds_the_master_and_fails_the_run() {
        let mut failed = part(1, 4, 2, "failed: writing: No space left on device");
        failed.partial_file = Some("/d/run_writer1.h5.part".into());
        let run = run_of(vec![
            Seen::Ended(part(0, 5, 5, "stopped: another writer of the run failed")),
            Seen::Ended(failed),
        ]);
        let sources: Vec<MasterSource> = run
            .seen
            .iter()
            .enumerate()
            .map(|(k, s)| source_of(&run, k, s))
            .collect();
        assert_eq!(
            (sources[1].file.as_str(), sources[1].rows),
            ("/d/run_writer1.h5.part", 2),
            "a failed writer's file stays .part at its last checkpoint"
        );
        let master = Ok(MasterSummary {
            output_file: "/d/run.h5".into(),
            images: 5,
            images_left_out: 2,
        });
        let end = combined_end(&run, &master, &[]);
        assert!(
            end.starts_with("failed: writer 1: failed: writing: No space left on device"),
            "{end}"
        );
        assert!(end.contains("holds images 0..5 of the run"), "{end}");
    }

    #[test]
    fn a_master_that_could_not_be_written_fails_the_run() {
        let run = run_of(vec![
            Seen::Ended(part(0, 5, 5, "completed")),
            Seen::Ended(part(1, 5, 5, "completed")),
        ]);
        let end = combined_end(&run, &Err("disk full".into()), &["a".into(), "b".into()]);
        assert_eq!(
            end,
            "failed: the master file /d/run.h5 could not be written (disk full); the images \
             are in a, b"
        );
        let killed = run_of(vec![
            Seen::Ended(part(0, 2, 2, "killed")),
            Seen::Ended(part(1, 2, 2, "killed")),
        ]);
        let m = Ok(MasterSummary {
            images: 4,
            ..MasterSummary::default()
        });
        assert_eq!(combined_end(&killed, &m, &[]), "killed");
    }
}
