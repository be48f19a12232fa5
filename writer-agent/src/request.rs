//! Write requests: parsing the JSON body of a message on the `request` exchange and checking it
//! against the agent's [`Policy`] before anything touches the disk.
//!
//! Every refusal is a [`RequestError`] whose text says exactly what is wrong; it becomes the
//! `message` header of the `request_fail` status. This module must never create, change or remove
//! anything on disk except in [`Policy::prepare`] (folders for a request that passed every check)
//! and [`CreatedDirs::remove`] (exactly those folders again), and must never follow a path out of
//! the output root.

use serde::{Deserialize, Serialize};
use std::path::{Component, Path, PathBuf};

/// The JSON body of a write request. Unknown fields are refused (a misspelt field must not be
/// silently ignored); the fields std_daq's REST front end and clients sent are accepted and echoed
/// back in every status, but have no effect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteRequest {
    /// Absolute path of the HDF5 file to create, ending in `.h5`, inside the agent's output root.
    pub output_file: String,
    /// How many images to write (1..=the agent's `--max-images`): the next `n_images` images the
    /// assembler publishes after the writer accepted the request. Absent or `null`: an
    /// **unbounded** write, which writes every image until it is killed (the `kill` exchange),
    /// and at most `--max-images` images (it then ends by itself).
    #[serde(default)]
    pub n_images: Option<u64>,
    /// Legacy (std_daq REST): the user the data belongs to. Any JSON value; echoed only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<serde_json::Value>,
    /// Legacy (std_daq writer_agent): a run counter. Any JSON value; echoed only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<serde_json::Value>,
    /// Legacy (std_daq REST): which data sources to record. Any JSON value; echoed only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<serde_json::Value>,
    /// Legacy (std_daq REST): when the request was made. Any JSON value; echoed only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<serde_json::Value>,
    /// std-daq extension: give up when no image arrived within this many seconds of
    /// `request_start` (`0 < timeout_s <=` [`MAX_TIMEOUT_S`]; `null` or absent: wait forever).
    /// A write that received an image is never ended by it. Checked by [`parse`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// std-daq extension: opaque metadata of the run (run id, ISPyB data-collection id, scan id,
    /// ...): a JSON object of at most [`MAX_METADATA_BYTES`] as JSON text. Echoed in every
    /// status, stored in the file's root attribute `metadata`, and its keys are added to the
    /// processing trigger's parameters. Checked by [`parse`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// std-daq extension: W3C trace context `00-<32 hex trace id>-<16 hex parent id>-<2 hex
    /// flags>` (also accepted as the AMQP header `traceparent`, see [`merge_traceparent`]).
    /// Echoed in every status (body and header), logged, stored in the file's root attribute
    /// `traceparent` and sent with the processing trigger. Checked by [`parse`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// std-daq extension: the NXmx geometry and beam of this file (`detector_distance_m`,
    /// `beam_center_x_px`, `beam_center_y_px`, `incident_wavelength_angstrom`, `sensor_material`,
    /// `sensor_thickness_m`, `sample_name`; each optional, unknown ones refused), over the
    /// config key `nxmx` (docs/nxmx.md). The writer checks the values and refuses the start
    /// naming the bad one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nxmx: Option<std_daq_common::nxmx::NxmxRaw>,
}

impl WriteRequest {
    /// Whether the request writes until it is stopped (no `n_images`).
    pub fn is_unbounded(&self) -> bool {
        self.n_images.is_none()
    }

    /// [`WriteRequest::timeout_s`] as a duration (`None` for a value [`parse`] would refuse).
    pub fn timeout(&self) -> Option<std::time::Duration> {
        self.timeout_s
            .filter(|t| *t > 0.0 && *t <= MAX_TIMEOUT_S)
            .and_then(|t| std::time::Duration::try_from_secs_f64(t).ok())
    }
}

/// Largest `timeout_s` accepted (about 11.5 days): a longer wait is no timeout.
pub const MAX_TIMEOUT_S: f64 = 1_000_000.0;

/// Largest `metadata` accepted, as compact JSON text.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Checks a W3C trace context (<https://www.w3.org/TR/trace-context/#traceparent-header>),
/// version `00`: `00-<32 lowercase hex trace id>-<16 lowercase hex parent id>-<2 lowercase hex
/// flags>`, neither id all zeros. `Err` says what is wrong.
pub fn check_traceparent(value: &str) -> Result<(), String> {
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let parts: Vec<&str> = value.split('-').collect();
    let [version, trace_id, parent_id, flags] = parts.as_slice() else {
        return Err("it needs 4 fields separated by '-'".into());
    };
    if *version != "00" {
        return Err(format!(
            "version {:?} is not supported (only 00)",
            version.chars().take(8).collect::<String>()
        ));
    }
    if trace_id.len() != 32 || !hex(trace_id) {
        return Err("the trace id must be 32 lowercase hex digits".into());
    }
    if trace_id.bytes().all(|b| b == b'0') {
        return Err("the trace id must not be all zeros".into());
    }
    if parent_id.len() != 16 || !hex(parent_id) {
        return Err("the parent id must be 16 lowercase hex digits".into());
    }
    if parent_id.bytes().all(|b| b == b'0') {
        return Err("the parent id must not be all zeros".into());
    }
    if flags.len() != 2 || !hex(flags) {
        return Err("the flags must be 2 lowercase hex digits".into());
    }
    Ok(())
}

/// A value as shown in an error message: JSON, at most 100 characters.
fn shown(value: &serde_json::Value) -> String {
    value.to_string().chars().take(100).collect()
}

/// Takes the trace context of the AMQP header `traceparent` (`header`, if the message had one)
/// into the request. The header alone: it becomes the request's `traceparent`. Both: they must
/// be the same, otherwise the request is refused (a client that sends two trace contexts has a
/// bug, and picking one would file the run under the wrong trace).
pub fn merge_traceparent(
    request: &mut WriteRequest,
    header: Option<&str>,
) -> Result<(), RequestError> {
    let Some(header) = header else {
        return Ok(());
    };
    check_traceparent(header).map_err(|why| RequestError::TraceparentHeader {
        value: shown(&header.into()),
        why,
    })?;
    match &request.traceparent {
        None => {
            request.traceparent = Some(header.to_string());
            Ok(())
        }
        Some(body) if body == header => Ok(()),
        Some(body) => Err(RequestError::TraceparentsDiffer {
            header: header.to_string(),
            body: body.clone(),
        }),
    }
}

/// Largest request body accepted (a write request is a few hundred bytes); a larger one is refused
/// unparsed, and status messages echo only its first 1000 characters.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why a request was refused. The `Display` text is what the client sees.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the request body is {0} bytes; a write request is at most {MAX_BODY_BYTES} bytes")]
    TooLarge(usize),
    #[error("the request body is not UTF-8 text: {0}")]
    NotUtf8(String),
    #[error("the request body is not JSON: {0}")]
    NotJson(String),
    #[error("the request body is not a valid write request: {0}")]
    BadFields(String),
    #[error("output_file must not contain a NUL character")]
    NulInPath,
    #[error("output_file {0:?} must be an absolute path")]
    NotAbsolute(String),
    #[error("output_file {0:?} must end in .h5")]
    NotH5(String),
    #[error("output_file {0:?} must not contain '..'")]
    ParentDir(String),
    #[error("output_file {file:?} is outside the output root {root}")]
    OutsideRoot { file: String, root: String },
    #[error(
        "timeout_s must be a number of seconds above 0 and at most {MAX_TIMEOUT_S} (or null for \
         no timeout), got {0}"
    )]
    TimeoutS(String),
    #[error(
        "metadata must be a JSON object (e.g. {{\"dcid\": 12345, \"scan_id\": \"s-42\"}}) or \
         null, got {0}"
    )]
    MetadataNotObject(String),
    #[error("metadata is {0} bytes as JSON; at most {MAX_METADATA_BYTES} bytes are accepted")]
    MetadataTooLarge(usize),
    #[error(
        "traceparent must be a W3C trace context 00-<32 hex trace id>-<16 hex parent id>-<2 hex \
         flags> (lowercase, ids not all zero): {why}; got {value}"
    )]
    Traceparent { value: String, why: String },
    #[error(
        "the AMQP header traceparent must be a W3C trace context 00-<32 hex trace id>-<16 hex \
         parent id>-<2 hex flags> (lowercase, ids not all zero): {why}; got {value}"
    )]
    TraceparentHeader { value: String, why: String },
    #[error(
        "the AMQP header traceparent ({header}) and the request's traceparent field ({body}) \
         differ: send one of them, or the same in both"
    )]
    TraceparentsDiffer { header: String, body: String },
    #[error("n_images must be between 1 and {max}, got {got}")]
    NImages { got: u64, max: u64 },
    #[error(
        "output_file {file:?} leaves the output root {root} through the symbolic link {link} \
         (-> {target})"
    )]
    SymlinkEscape {
        file: String,
        root: String,
        link: String,
        target: String,
    },
    #[error("output_file {file:?} cannot be created: {path} exists and is not a folder")]
    NotAFolder { file: String, path: String },
    #[error("output_file {0:?} already exists (std-daq never overwrites data)")]
    Exists(String),
    #[error("the folder {0} does not exist and this agent does not create folders (--create-dirs is off)")]
    MissingFolder(String),
    #[error("cannot check {path}: {error}")]
    Io { path: String, error: String },
}

impl RequestError {
    /// The body itself is unusable (too large, not UTF-8, not JSON, not a write request), as
    /// opposed to a well-formed request the policy refuses.
    pub fn is_malformed(&self) -> bool {
        matches!(
            self,
            RequestError::TooLarge(_)
                | RequestError::NotUtf8(_)
                | RequestError::NotJson(_)
                | RequestError::BadFields(_)
        )
    }
}

/// Parses a request body: size, UTF-8, JSON, then as a [`WriteRequest`], so that each kind of
/// junk gets its own message.
pub fn parse(body: &[u8]) -> Result<WriteRequest, RequestError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(RequestError::TooLarge(body.len()));
    }
    let text = std::str::from_utf8(body).map_err(|e| RequestError::NotUtf8(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| RequestError::NotJson(e.to_string()))?;
    // serde would take an array positionally (["/d/a.h5", 5]): only an object is a request.
    let kind = match &value {
        serde_json::Value::Object(_) => None,
        serde_json::Value::Null => Some("null"),
        serde_json::Value::Bool(_) => Some("a boolean"),
        serde_json::Value::Number(_) => Some("a number"),
        serde_json::Value::String(_) => Some("a string"),
        serde_json::Value::Array(_) => Some("an array"),
    };
    if let Some(kind) = kind {
        return Err(RequestError::BadFields(format!(
            "expected a JSON object, got {kind}"
        )));
    }
    // Checked before serde sees it, so that a wrong timeout_s gets its own message.
    if let Some(t) = value.get("timeout_s") {
        let ok = t.is_null()
            || t.as_f64()
                .is_some_and(|secs| secs > 0.0 && secs <= MAX_TIMEOUT_S);
        if !ok {
            let text: String = t.to_string().chars().take(100).collect();
            return Err(RequestError::TimeoutS(text));
        }
    }
    if let Some(m) = value.get("metadata") {
        match m {
            serde_json::Value::Null => {}
            serde_json::Value::Object(_) => {
                let len = m.to_string().len();
                if len > MAX_METADATA_BYTES {
                    return Err(RequestError::MetadataTooLarge(len));
                }
            }
            other => return Err(RequestError::MetadataNotObject(shown(other))),
        }
    }
    if let Some(t) = value.get("traceparent") {
        match t.as_str() {
            _ if t.is_null() => {}
            Some(text) => check_traceparent(text).map_err(|why| RequestError::Traceparent {
                value: shown(t),
                why,
            })?,
            None => {
                return Err(RequestError::Traceparent {
                    value: shown(t),
                    why: "it must be a string".into(),
                })
            }
        }
    }
    serde_json::from_value(value).map_err(|e| RequestError::BadFields(e.to_string()))
}

/// What the agent allows: where files may go, how many images, whether folders are created.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The output root as configured (lexical form users may write paths in).
    root_given: PathBuf,
    /// The output root with every symbolic link resolved.
    root: PathBuf,
    max_images: u64,
    create_dirs: bool,
}

impl Policy {
    /// `output_root` must be an existing folder; it is resolved once, here.
    pub fn new(output_root: &Path, max_images: u64, create_dirs: bool) -> std::io::Result<Self> {
        let root = std::fs::canonicalize(output_root)?;
        if !root.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!("{} is not a folder", root.display()),
            ));
        }
        Ok(Policy {
            root_given: output_root.to_path_buf(),
            root,
            max_images,
            create_dirs,
        })
    }

    pub fn output_root(&self) -> &Path {
        &self.root
    }

    /// The most images one request writes: the bound of `n_images`, and where an unbounded
    /// write ends if nobody stops it before.
    pub fn max_images(&self) -> u64 {
        self.max_images
    }

    /// Every check that needs no change on disk. Returns the path to write, expressed under the
    /// resolved root.
    pub fn check(&self, request: &WriteRequest) -> Result<PathBuf, RequestError> {
        let file = &request.output_file;
        if file.contains('\0') {
            return Err(RequestError::NulInPath);
        }
        let path = Path::new(file);
        if !path.is_absolute() {
            return Err(RequestError::NotAbsolute(file.clone()));
        }
        if path.extension().and_then(|e| e.to_str()) != Some("h5") || file.ends_with('/') {
            return Err(RequestError::NotH5(file.clone()));
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(RequestError::ParentDir(file.clone()));
        }
        let outside = || RequestError::OutsideRoot {
            file: file.clone(),
            root: self.root.display().to_string(),
        };
        let relative = path
            .strip_prefix(&self.root)
            .or_else(|_| path.strip_prefix(&self.root_given))
            .map_err(|_| outside())?;
        let parts: Vec<Component<'_>> = relative.components().collect();
        if parts.is_empty() {
            return Err(outside());
        }
        // An unbounded request has no count to judge; the writer stops it at max_images.
        if let Some(n) = request.n_images.filter(|n| *n == 0 || *n > self.max_images) {
            return Err(RequestError::NImages {
                got: n,
                max: self.max_images,
            });
        }
        // Walk down from the root: every existing folder on the way must still resolve inside the
        // root, and the file itself must not exist (not even as a dangling link).
        let mut at = self.root.clone();
        for (i, part) in parts.iter().enumerate() {
            at.push(part);
            let last = i + 1 == parts.len();
            let meta = match at.symlink_metadata() {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => {
                    return Err(RequestError::Io {
                        path: at.display().to_string(),
                        error: e.to_string(),
                    })
                }
            };
            if last {
                return Err(RequestError::Exists(file.clone()));
            }
            if meta.file_type().is_symlink() {
                let escape = |target: String| RequestError::SymlinkEscape {
                    file: file.clone(),
                    root: self.root.display().to_string(),
                    link: at.display().to_string(),
                    target,
                };
                match std::fs::canonicalize(&at) {
                    Ok(target) if target.starts_with(&self.root) => {}
                    Ok(target) => return Err(escape(target.display().to_string())),
                    Err(_) => {
                        let target = std::fs::read_link(&at)
                            .map(|t| format!("{}, missing", t.display()))
                            .unwrap_or_else(|_| "unreadable".into());
                        return Err(escape(target));
                    }
                }
            }
            if !at.is_dir() {
                return Err(RequestError::NotAFolder {
                    file: file.clone(),
                    path: at.display().to_string(),
                });
            }
        }
        Ok(self.root.join(relative))
    }

    /// [`Policy::check`], then creates the missing folders if allowed. The returned
    /// [`CreatedDirs`] lists them so that a run the writer refuses leaves nothing behind.
    pub fn prepare(&self, request: &WriteRequest) -> Result<(PathBuf, CreatedDirs), RequestError> {
        let path = self.check(request)?;
        let mut created = CreatedDirs::default();
        let Some(parent) = path.parent() else {
            return Ok((path, created));
        };
        if parent.is_dir() {
            return Ok((path, created));
        }
        if !self.create_dirs {
            return Err(RequestError::MissingFolder(parent.display().to_string()));
        }
        let missing: Vec<&Path> = parent
            .ancestors()
            .take_while(|p| p.symlink_metadata().is_err())
            .collect();
        for dir in missing.into_iter().rev() {
            if let Err(e) = std::fs::create_dir(dir) {
                created.remove();
                return Err(RequestError::Io {
                    path: dir.display().to_string(),
                    error: e.to_string(),
                });
            }
            created.0.push(dir.to_path_buf());
        }
        Ok((path, created))
    }
}

/// Folders [`Policy::prepare`] created, outermost first.
#[derive(Debug, Default)]
pub struct CreatedDirs(Vec<PathBuf>);

impl CreatedDirs {
    /// Removes the folders again, innermost first; a folder that is no longer empty stays.
    pub fn remove(&mut self) {
        while let Some(dir) = self.0.pop() {
            let _ = std::fs::remove_dir(&dir);
        }
    }

    /// Keeps the folders (the run happened).
    pub fn keep(mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(output_file: &str, n_images: u64) -> WriteRequest {
        WriteRequest {
            output_file: output_file.into(),
            n_images: Some(n_images),
            user_id: None,
            run_id: None,
            sources: None,
            timestamp: None,
            timeout_s: None,
            metadata: None,
            traceparent: None,
            nxmx: None,
        }
    }

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn metadata_must_be_a_bounded_object() {
        let with = |m: &str| {
            parse(format!(r#"{{"output_file":"/a.h5","n_images":3,"metadata":{m}}}"#).as_bytes())
        };
        let r = with(r#"{"dcid": 12345, "scan_id": "s-42", "nested": {"a": [1, 2]}}"#).unwrap();
        let m = r.metadata.as_ref().unwrap();
        assert_eq!(m["dcid"], 12345);
        assert_eq!(m["nested"]["a"][1], 2);
        assert_eq!(
            serde_json::to_value(&r).unwrap()["metadata"]["scan_id"],
            "s-42"
        );
        assert_eq!(with("null").unwrap().metadata, None);
        for (bad, got) in [("[1]", "[1]"), (r#""run 5""#, r#""run 5""#), ("7", "7")] {
            let e = with(bad).unwrap_err();
            assert_eq!(e, RequestError::MetadataNotObject(got.into()));
            assert!(!e.is_malformed());
            assert!(
                e.to_string().starts_with("metadata must be a JSON object"),
                "{e}"
            );
        }
        let big = format!(r#"{{"x": "{}"}}"#, "y".repeat(MAX_METADATA_BYTES));
        let e = with(&big).unwrap_err();
        assert_eq!(e, RequestError::MetadataTooLarge(MAX_METADATA_BYTES + 8));
        assert_eq!(
            e.to_string(),
            format!(
                "metadata is {} bytes as JSON; at most 16384 bytes are accepted",
                MAX_METADATA_BYTES + 8
            )
        );
        let fits = format!(r#"{{"x": "{}"}}"#, "y".repeat(MAX_METADATA_BYTES - 8));
        assert!(with(&fits).is_ok());
    }

    #[test]
    fn traceparent_is_checked_in_the_body_and_the_header() {
        let with = |t: &str| {
            parse(format!(r#"{{"output_file":"/a.h5","n_images":3,"traceparent":{t}}}"#).as_bytes())
        };
        assert_eq!(
            with(&format!("{TP:?}")).unwrap().traceparent.as_deref(),
            Some(TP)
        );
        assert_eq!(with("null").unwrap().traceparent, None);
        for (bad, why) in [
            (
                "\"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331\"",
                "4 fields",
            ),
            (
                "\"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\"",
                "version \"01\"",
            ),
            (
                "\"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01\"",
                "trace id must be 32",
            ),
            (
                "\"00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01\"",
                "trace id must be 32",
            ),
            (
                "\"00-00000000000000000000000000000000-b7ad6b7169203331-01\"",
                "trace id must not be all zeros",
            ),
            (
                "\"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01\"",
                "parent id must not be all zeros",
            ),
            (
                "\"00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333x-01\"",
                "parent id must be 16",
            ),
            (
                "\"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1\"",
                "flags must be 2",
            ),
            ("17", "must be a string"),
        ] {
            let e = with(bad).unwrap_err();
            let text = e.to_string();
            assert!(!e.is_malformed());
            assert!(
                text.starts_with("traceparent must be a W3C trace context 00-<32 hex trace id>")
                    && text.contains(why)
                    && text.ends_with(&format!("; got {bad}")),
                "{bad}: {text}"
            );
        }
        // The AMQP header: taken when the body has none, refused when malformed or different.
        let mut r = with("null").unwrap();
        merge_traceparent(&mut r, None).unwrap();
        assert_eq!(r.traceparent, None);
        merge_traceparent(&mut r, Some(TP)).unwrap();
        assert_eq!(r.traceparent.as_deref(), Some(TP));
        merge_traceparent(&mut r, Some(TP)).unwrap();
        let other = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01";
        let e = merge_traceparent(&mut r, Some(other)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the AMQP header traceparent ({other}) and the request's traceparent field \
                 ({TP}) differ: send one of them, or the same in both"
            )
        );
        let e = merge_traceparent(&mut r, Some("nope")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the AMQP header traceparent must be a W3C trace context")
                && e.to_string()
                    .ends_with("it needs 4 fields separated by '-'; got \"nope\""),
            "{e}"
        );
    }

    #[test]
    fn timeout_s_is_optional_positive_and_bounded_and_misspellings_are_refused() {
        let with = |t: &str| {
            parse(format!(r#"{{"output_file":"/a.h5","n_images":3,"timeout_s":{t}}}"#).as_bytes())
        };
        assert_eq!(
            parse(br#"{"output_file":"/a.h5","n_images":3}"#)
                .unwrap()
                .timeout(),
            None
        );
        assert_eq!(with("null").unwrap().timeout(), None);
        assert_eq!(with("30").unwrap().timeout_s, Some(30.0));
        assert_eq!(
            with("30").unwrap().timeout(),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(
            with("0.25").unwrap().timeout(),
            Some(std::time::Duration::from_millis(250))
        );
        assert_eq!(
            with("1000000").unwrap().timeout(),
            Some(std::time::Duration::from_secs(1_000_000))
        );
        for (bad, shown) in [
            ("0", "0"),
            ("-5", "-5"),
            ("1000000.5", "1000000.5"),
            ("1e300", "1e+300"),
            (r#""ten""#, r#""ten""#),
            ("true", "true"),
            ("[30]", "[30]"),
            (r#"{"s":30}"#, r#"{"s":30}"#),
        ] {
            let e = with(bad).unwrap_err();
            assert_eq!(e, RequestError::TimeoutS(shown.into()), "{bad}");
            assert!(!e.is_malformed());
            assert_eq!(
                e.to_string(),
                format!(
                    "timeout_s must be a number of seconds above 0 and at most 1000000 (or null \
                     for no timeout), got {shown}"
                )
            );
        }
        // A long value is shown cut.
        let long = format!(r#""{}""#, "x".repeat(500));
        let RequestError::TimeoutS(shown) = with(&long).unwrap_err() else {
            panic!()
        };
        assert_eq!(shown.chars().count(), 100);
        // Still no unknown field: a misspelt timeout is refused, naming the field.
        let e = parse(br#"{"output_file":"/a.h5","n_images":3,"timeout":30}"#).unwrap_err();
        assert!(e.is_malformed());
        assert!(
            e.to_string().contains(
                "unknown field `timeout`, expected one of `output_file`, `n_images`, `user_id`, \
                 `run_id`, `sources`, `timestamp`, `timeout_s`, `metadata`, `traceparent`"
            ),
            "{e}"
        );
        // The echo in statuses carries it as sent; serialising a request keeps it.
        let r = with("2.5").unwrap();
        assert_eq!(serde_json::to_value(&r).unwrap()["timeout_s"], 2.5);
    }

    #[test]
    fn parse_distinguishes_not_json_from_bad_fields_and_accepts_legacy_fields() {
        assert!(matches!(parse(b"{nope"), Err(RequestError::NotJson(_))));
        assert_eq!(
            parse(b"{\"output_file\":\"/a\xff.h5\",\"n_images\":1}")
                .unwrap_err()
                .to_string(),
            "the request body is not UTF-8 text: invalid utf-8 sequence of 1 bytes from index 18"
        );
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(
            parse(&big).unwrap_err().to_string(),
            "the request body is 65537 bytes; a write request is at most 65536 bytes"
        );
        assert!(parse(&big).unwrap_err().is_malformed());
        assert!(matches!(parse(b""), Err(RequestError::NotJson(_))));
        assert_eq!(
            parse(br#"["/a.h5", 3]"#).unwrap_err().to_string(),
            "the request body is not a valid write request: expected a JSON object, got an array"
        );
        let e = parse(br#"{"output_file":"/a.h5","n_images":"ten"}"#).unwrap_err();
        assert!(
            matches!(e, RequestError::BadFields(ref m) if m.starts_with("invalid type: string \"ten\", expected u64")),
            "{e}"
        );
        let r = parse(
            br#"{"output_file":"/a.h5","n_images":3,"user_id":17,"run_id":"r1","sources":["jf"],"timestamp":1.5}"#,
        )
        .unwrap();
        assert_eq!(r.n_images, Some(3));
        assert_eq!(r.user_id, Some(serde_json::json!(17)));
        let e = parse(br#"{"output_file":"/a.h5","n_image":3}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `n_image`"), "{e}");
    }

    /// `n_images` absent or null is an unbounded write, within any --max-images; a number must
    /// still be 1..=max; other types are refused with serde's reason.
    #[test]
    fn n_images_absent_or_null_is_unbounded_and_a_number_is_checked_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let policy = Policy::new(&root, 10, false).unwrap();
        let r = root.display();
        let body = |n: &str| format!(r#"{{"output_file":"{r}/u.h5"{n}}}"#);
        for shape in ["", r#","n_images":null"#] {
            let request = parse(body(shape).as_bytes()).unwrap();
            assert_eq!(request.n_images, None, "{shape}");
            assert!(request.is_unbounded());
            assert_eq!(policy.check(&request).unwrap(), root.join("u.h5"));
        }
        let bounded = parse(body(r#","n_images":10"#).as_bytes()).unwrap();
        assert!(!bounded.is_unbounded());
        assert!(policy.check(&bounded).is_ok());
        for (n, message) in [
            ("0", "n_images must be between 1 and 10, got 0"),
            ("11", "n_images must be between 1 and 10, got 11"),
        ] {
            let request = parse(body(&format!(r#","n_images":{n}"#)).as_bytes()).unwrap();
            assert_eq!(policy.check(&request).unwrap_err().to_string(), message);
        }
        for (n, message) in [
            ("-3", "invalid value: integer `-3`, expected u64"),
            (r#""ten""#, "invalid type: string \"ten\", expected u64"),
            ("2.5", "invalid type: floating point `2.5`, expected u64"),
            ("true", "invalid type: boolean `true`, expected u64"),
        ] {
            let e = parse(body(&format!(r#","n_images":{n}"#)).as_bytes()).unwrap_err();
            assert!(e.is_malformed());
            assert!(
                e.to_string().starts_with(&format!(
                    "the request body is not a valid write request: {message}"
                )),
                "{n}: {e}"
            );
        }
        // Nothing was created by any of it.
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    }

    #[test]
    fn check_refuses_each_bad_path_with_its_reason_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
        std::fs::create_dir(root.join("in")).unwrap();
        std::os::unix::fs::symlink(root.join("in"), root.join("inner-link")).unwrap();
        std::fs::write(root.join("taken.h5"), b"x").unwrap();
        std::fs::write(root.join("plain"), b"x").unwrap();
        let policy = Policy::new(&root, 100, false).unwrap();
        let r = root.display();
        let cases = [
            (req("rel.h5", 1), "output_file \"rel.h5\" must be an absolute path".to_string()),
            (req(&format!("{r}/a.txt"), 1), format!("output_file \"{r}/a.txt\" must end in .h5")),
            (req(&format!("{r}/../x.h5"), 1), format!("output_file \"{r}/../x.h5\" must not contain '..'")),
            (req("/elsewhere/x.h5", 1), format!("output_file \"/elsewhere/x.h5\" is outside the output root {r}")),
            (req(&format!("{r}/a.h5"), 0), "n_images must be between 1 and 100, got 0".into()),
            (req(&format!("{r}/a.h5"), 101), "n_images must be between 1 and 100, got 101".into()),
            (req(&format!("{r}/taken.h5"), 1), format!("output_file \"{r}/taken.h5\" already exists (std-daq never overwrites data)")),
            (req(&format!("{r}/plain/a.h5"), 1), format!("output_file \"{r}/plain/a.h5\" cannot be created: {r}/plain exists and is not a folder")),
            (req(&format!("{r}/new/a.h5"), 1), format!("the folder {r}/new does not exist and this agent does not create folders (--create-dirs is off)")),
        ];
        for (request, message) in cases {
            let e = policy.prepare(&request).unwrap_err();
            assert_eq!(e.to_string(), message);
        }
        let e = policy
            .prepare(&req(&format!("{r}/escape/a.h5"), 1))
            .unwrap_err();
        assert!(matches!(e, RequestError::SymlinkEscape { .. }), "{e}");
        assert!(e.to_string().contains("through the symbolic link"), "{e}");
        // A link that stays inside the root is fine.
        let (path, _) = policy
            .prepare(&req(&format!("{r}/inner-link/a.h5"), 1))
            .unwrap();
        assert_eq!(path, root.join("inner-link/a.h5"));
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        assert!(!root.join("new").exists());
    }

    #[test]
    fn prepare_creates_missing_folders_when_allowed_and_remove_undoes_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let policy = Policy::new(&root, 10, true).unwrap();
        let file = root.join("a/b/run.h5");
        let (path, mut created) = policy
            .prepare(&req(&file.display().to_string(), 1))
            .unwrap();
        assert_eq!(path, file);
        assert!(root.join("a/b").is_dir());
        created.remove();
        assert!(!root.join("a").exists());
    }
}
