//! The detector config: std_daq's JSON keys, parsed strictly and validated.
//!
//! A config is read once at service start. Every error names the file (or other origin) and the
//! key, so an operator can fix it without reading code. Unknown keys are rejected: a typo must
//! never silently fall back to a default.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The `detector_type` values std_daq uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DetectorType {
    #[serde(rename = "jungfrau-raw")]
    JungfrauRaw,
    #[serde(rename = "jungfrau-converted")]
    JungfrauConverted,
    #[serde(rename = "eiger")]
    Eiger,
    #[serde(rename = "gigafrost")]
    Gigafrost,
}

impl DetectorType {
    /// The std_daq spelling, as written in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectorType::JungfrauRaw => "jungfrau-raw",
            DetectorType::JungfrauConverted => "jungfrau-converted",
            DetectorType::Eiger => "eiger",
            DetectorType::Gigafrost => "gigafrost",
        }
    }

    pub fn is_jungfrau(self) -> bool {
        matches!(
            self,
            DetectorType::JungfrauRaw | DetectorType::JungfrauConverted
        )
    }
}

impl fmt::Display for DetectorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// JUNGFRAU module geometry (pixels) and packet layout.
pub mod jungfrau {
    pub const MODULE_WIDTH: u32 = 1024;
    pub const MODULE_HEIGHT: u32 = 512;
    pub const PACKETS_PER_FRAME: u32 = 128;
    pub const PAYLOAD_BYTES: usize = 8192;
    pub const FRAME_BYTES: usize = PAYLOAD_BYTES * PACKETS_PER_FRAME as usize;
}

/// What the assembler does with the double-size pixels at JUNGFRAU chip borders when
/// `chip_gaps` is on and the data is converted (`jungfrau-converted`). Raw data is never changed:
/// in raw mode the border pixels keep their values and the gap pixels are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DoublePixels {
    /// A double-width (or double-height) pixel's value is shared equally with the gap pixel next
    /// to it (v/2 each; a corner pixel spreads v/4 over 2x2 pixels), so the total is kept.
    #[default]
    Split,
    /// Double pixels and the gap pixels next to them are zero.
    Mask,
}

/// The pixel type of `jungfrau-converted` images: the config key `converted_output`
/// (std-daq extension; docs/calibration.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvertedOutput {
    /// Energy in keV as float32 (the default, std_daq's output).
    #[default]
    Float32,
    /// Photon counts as int16, with `photon_energy_kev` (as Jungfraujoch).
    PhotonsInt16,
    /// Photon counts as int32, with `photon_energy_kev`.
    PhotonsInt32,
}

impl ConvertedOutput {
    /// The spelling in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            ConvertedOutput::Float32 => "float32",
            ConvertedOutput::PhotonsInt16 => "photons_int16",
            ConvertedOutput::PhotonsInt32 => "photons_int32",
        }
    }

    /// Bytes per image pixel.
    pub fn bytes_per_pixel(self) -> usize {
        match self {
            ConvertedOutput::PhotonsInt16 => 2,
            ConvertedOutput::Float32 | ConvertedOutput::PhotonsInt32 => 4,
        }
    }

    pub fn dtype(self) -> crate::Dtype {
        match self {
            ConvertedOutput::Float32 => crate::Dtype::Float32,
            ConvertedOutput::PhotonsInt16 => crate::Dtype::Int16,
            ConvertedOutput::PhotonsInt32 => crate::Dtype::Int32,
        }
    }
}

/// Where a module sits in the assembled image: std_daq's inclusive corners `[x0, y0, x1, y1]`.
/// The corner order gives the orientation: `x1 < x0` mirrors columns, `y1 < y0` mirrors rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModulePosition {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl ModulePosition {
    pub fn left(&self) -> u32 {
        self.x0.min(self.x1)
    }
    pub fn top(&self) -> u32 {
        self.y0.min(self.y1)
    }
    pub fn width(&self) -> u32 {
        self.x0.abs_diff(self.x1) + 1
    }
    pub fn height(&self) -> u32 {
        self.y0.abs_diff(self.y1) + 1
    }
    pub fn flip_x(&self) -> bool {
        self.x1 < self.x0
    }
    pub fn flip_y(&self) -> bool {
        self.y1 < self.y0
    }
}

/// A validated detector config. Field names are std_daq's keys.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorConfig {
    pub detector_name: String,
    pub detector_type: DetectorType,
    pub n_modules: u16,
    pub bit_depth: u8,
    pub image_pixel_height: u32,
    pub image_pixel_width: u32,
    pub start_udp_port: u16,
    /// Indexed by module id (validated to hold exactly ids `0..n_modules`).
    pub module_positions: Vec<ModulePosition>,
    pub log_level: String,
    pub stats_collection_period: f64,
    pub module_sync_queue_size: u32,
    pub ram_buffer_gb: f64,
    /// Slots in each per-module FrameBuffer (std-daq extension; std_daq fixes 1000).
    pub module_buffer_slots: u32,
    /// How long the assembler waits for a module's frame before emitting the image without it.
    pub module_sync_timeout_ms: u32,
    /// std_daq's `number_of_writers`: how many std-h5-writer processes share each run (images
    /// dealt by image id, docs/file-format.md "N writers"); 0 and absent mean 1.
    pub number_of_writers: u32,
    /// Worker threads placing and converting module frames in the assembler (std-daq extension
    /// `assembler_threads`); `None` (absent or 0): chosen from the module count and the cores
    /// ([`DetectorConfig::assembler_threads_or_default`]).
    pub assembler_threads: Option<u32>,
    /// How long a receiver waits for more packets of an open frame before committing it
    /// (default 100). A frame is committed at once when it is complete or a newer frame starts,
    /// so this only bounds how long the last incomplete frame of an acquisition waits, and how
    /// long a pause in the middle of a frame is tolerated before its late packets count as lost.
    pub frame_timeout_ms: u32,
    /// Address receivers bind to (std_daq binds INADDR_ANY).
    pub udp_bind_address: String,
    /// Where ZMQ ipc endpoints live (std_daq: /tmp).
    pub ipc_dir: String,
    /// HDF5 calibration (gains, pedestals, pixel mask) for `jungfrau-converted`; required there,
    /// rejected for every other detector type. Layout: docs/calibration.md.
    pub calibration_file: Option<PathBuf>,
    /// JUNGFRAU and EIGER: 2-pixel gaps between chips, so a JUNGFRAU module spans 1030x514 and
    /// an EIGER half-module 514x256 in the image (std-daq extension, default false; std_daq's
    /// EIGER converter always has them).
    pub chip_gaps: bool,
    /// JUNGFRAU converted with `chip_gaps`: how double pixels at chip borders are handled.
    pub double_pixels: DoublePixels,
    /// JUNGFRAU converted: the image pixel type (std-daq extension `converted_output`, default
    /// float32 keV; the photon types need `photon_energy_kev`).
    pub converted_output: ConvertedOutput,
    /// JUNGFRAU converted to photons: the photon energy in keV (std-daq extension; positive,
    /// finite; refused without a photon `converted_output` and for other detector types).
    pub photon_energy_kev: Option<f64>,
    /// How the writer stores image chunks (std-daq extension `compression`, default `none`);
    /// std-h5-writer's `--compression` overrides it.
    pub compression: ImageCompression,
    /// The first port of the services' Prometheus endpoints (std-daq extension
    /// `metrics_base_address`, default off); each service's port follows by
    /// [`MetricsService::offset`]. A service's `--metrics-addr` overrides it.
    pub metrics_base_address: Option<std::net::SocketAddr>,
    /// std_daq's `live_stream_configs`: the preview streams `std-daq up` runs.
    pub live_streams: Vec<LiveStream>,
    /// The key `nxmx` (std-daq extension, checked): geometry and beam for the file's NXmx
    /// groups; [`DetectorConfig::nxmx`] gives the values.
    pub nxmx_settings: crate::nxmx::NxmxRaw,
    /// std-daq extension `processing_trigger`: the message the writer agent publishes when a
    /// write's file is complete (and optionally when it starts). `None`: no trigger.
    pub processing_trigger: Option<ProcessingTrigger>,
    /// Keys that were accepted but have no effect here, one sentence each naming the key, the
    /// origin and why. A service logs each once at start ([`crate::service::warn_notices`]);
    /// this crate does no I/O itself.
    pub notices: Vec<String>,
    /// The raw JSON, kept so services can publish the config they run with.
    pub raw: serde_json::Value,
}

/// How the writer stores image chunks: the config key `compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageCompression {
    /// Raw chunks (what the writer does without the key).
    #[default]
    None,
    /// The HDF5 bitshuffle filter (32008) with LZ4.
    BitshuffleLz4,
}

impl ImageCompression {
    /// The spelling in config files and on std-h5-writer's command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageCompression::None => "none",
            ImageCompression::BitshuffleLz4 => "bitshuffle-lz4",
        }
    }
}

impl std::str::FromStr for ImageCompression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(ImageCompression::None),
            "bitshuffle-lz4" => Ok(ImageCompression::BitshuffleLz4),
            other => Err(format!(
                "{other:?} is not one of \"none\", \"bitshuffle-lz4\""
            )),
        }
    }
}

/// The services whose Prometheus port follows from `metrics_base_address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsService {
    /// std-assembler: base + 0.
    Assembler,
    /// std-h5-writer: base + 1.
    Writer,
    /// std-writer-agent: base + 2.
    WriterAgent,
    /// std-stream-send: base + 3.
    StreamSend,
    /// std-stream-recv: base + 4.
    StreamRecv,
    /// The `std-daq preview` of `live_stream_configs` entry i (key order): base + 5 + i, i < 5.
    Preview(u16),
    /// std-udp-recv of module m: base + 10 + m.
    Receiver(u16),
    /// std-h5-writer `--writer-index k`, k >= 1 (`number_of_writers` > 1): base + 266 + k - 1,
    /// past the receivers of the largest detector (256 modules).
    OtherWriter(u16),
}

impl MetricsService {
    /// Receivers start at this offset; 5..9 are the preview streams'.
    pub const RECEIVER_OFFSET: u16 = 10;
    /// Writers 1.. start at this offset (after 256 receivers).
    pub const OTHER_WRITERS_OFFSET: u16 = 266;
    /// Live streams that have a metrics port (base + 5 .. base + 9).
    pub const MAX_PREVIEWS: usize = 5;

    /// The port offset from `metrics_base_address`.
    pub fn offset(self) -> u16 {
        match self {
            MetricsService::Assembler => 0,
            MetricsService::Writer => 1,
            MetricsService::WriterAgent => 2,
            MetricsService::StreamSend => 3,
            MetricsService::StreamRecv => 4,
            MetricsService::Preview(i) => 5 + i,
            MetricsService::Receiver(m) => Self::RECEIVER_OFFSET + m,
            MetricsService::OtherWriter(k) => Self::OTHER_WRITERS_OFFSET + k.saturating_sub(1),
        }
    }
}

/// One entry of `live_stream_configs`: where viewers connect and which images they get.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveStream {
    /// The ZMQ endpoint the preview binds (the entry's key, `tcp://host:port`).
    pub endpoint: String,
    pub mode: LiveStreamMode,
}

/// std_daq's live stream types with their `config` values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LiveStreamMode {
    /// `forward`: every image.
    Forward,
    /// `periodic` `[n, hz]`: n consecutive images, hz times a second.
    Periodic { n: u32, hz: f64 },
    /// `batch` `[n, every]`: the first n of every `every` images.
    Batch { n: u32, every: u32 },
}

impl LiveStreamMode {
    /// The `std-daq preview --mode` spelling.
    pub fn preview_arg(self) -> String {
        match self {
            LiveStreamMode::Forward => "forward".into(),
            LiveStreamMode::Periodic { n, hz } => format!("periodic:{n},{hz}"),
            LiveStreamMode::Batch { n, every } => format!("batch:{n},{every}"),
        }
    }
}

/// The config key `processing_trigger` (std-daq extension, read by the writer agent): what to
/// publish on RabbitMQ when a write's file is complete (event `end`) and, if asked, when the
/// write starts (event `start`). docs/processing.md has the message shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessingTrigger {
    pub mode: TriggerMode,
    /// Publish at `request_start` (`"events": ["start", "end"]`).
    pub on_start: bool,
    /// Publish when the file is complete (the default, `"events": ["end"]`).
    pub on_end: bool,
    /// Publish attempts per event (1..=10, default 3), with a backoff between them.
    pub attempts: u32,
}

/// Where and in which shape a [`ProcessingTrigger`] is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerMode {
    /// zocalo's `zocalo.go` message on `queue` (default `processing_recipe`) through the
    /// default exchange: `{"recipes": [...], "parameters": {...}}`.
    Zocalo { queue: String, recipes: Vec<String> },
    /// The GDA scan message (`{status: STARTED|FINISHED, filePath, ...}`) on the topic
    /// `exchange` (default `amq.topic`) with `routing_key` (default `gda.messages.scan`).
    Topic {
        exchange: String,
        routing_key: String,
    },
}

/// Largest `processing_trigger.attempts`.
pub const MAX_TRIGGER_ATTEMPTS: u32 = 10;
/// The most `number_of_writers` a config may ask for.
pub const MAX_WRITERS: u32 = 64;
/// The most `assembler_threads` a config may ask for.
pub const MAX_ASSEMBLER_THREADS: u32 = 64;

impl ProcessingTrigger {
    /// Checks the value of the `processing_trigger` key; `invalid(key, message)` builds the
    /// error (naming the file), the key being `processing_trigger` or `processing_trigger.<field>`.
    pub fn from_value(
        value: &serde_json::Value,
        invalid: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<Self, ConfigError> {
        const KEY: &str = "processing_trigger";
        let field_key = |f: &str| format!("{KEY}.{f}");
        let fields = value.as_object().ok_or_else(|| {
            invalid(
                KEY,
                format!(
                    "must be an object such as {{\"mode\": \"zocalo\", \"recipes\": \
                     [\"my-recipe\"]}} or {{\"mode\": \"topic\"}}, not {}",
                    short_json(value)
                ),
            )
        })?;
        let text = |f: &str| -> Result<Option<String>, ConfigError> {
            match fields.get(f) {
                None => Ok(None),
                Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= 255 => {
                    Ok(Some(s.clone()))
                }
                Some(v) => Err(invalid(
                    &field_key(f),
                    format!(
                        "must be a non-empty string of at most 255 bytes, not {}",
                        short_json(v)
                    ),
                )),
            }
        };
        let mode = match fields.get("mode").and_then(|m| m.as_str()) {
            Some("zocalo") => "zocalo",
            Some("topic") => "topic",
            _ => {
                return Err(invalid(
                    &field_key("mode"),
                    format!(
                        "must be \"zocalo\" or \"topic\", not {}",
                        fields.get("mode").map_or("nothing".into(), short_json)
                    ),
                ))
            }
        };
        let allowed: &[&str] = match mode {
            "zocalo" => &["mode", "events", "attempts", "recipes", "queue"],
            _ => &["mode", "events", "attempts", "exchange", "routing_key"],
        };
        if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
            let why = match unknown.as_str() {
                "recipes" | "queue" => "it is for mode zocalo only".to_string(),
                "exchange" | "routing_key" => "it is for mode topic only".to_string(),
                _ => format!("expected one of {}", allowed.join(", ")),
            };
            return Err(invalid(
                &field_key(unknown),
                format!("unknown field for mode {mode}: {why}"),
            ));
        }
        let (mut on_start, mut on_end) = (false, true);
        if let Some(events) = fields.get("events") {
            let list = events.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
                invalid(
                    &field_key("events"),
                    format!(
                        "must be a non-empty list of \"start\" and \"end\", not {}",
                        short_json(events)
                    ),
                )
            })?;
            (on_start, on_end) = (false, false);
            for event in list {
                match event.as_str() {
                    Some("start") => on_start = true,
                    Some("end") => on_end = true,
                    _ => {
                        return Err(invalid(
                            &field_key("events"),
                            format!(
                                "{} is not an event: the events are \"start\" (the write \
                                 started) and \"end\" (its file is complete)",
                                short_json(event)
                            ),
                        ))
                    }
                }
            }
        }
        let attempts = match fields.get("attempts") {
            None => 3,
            Some(v) => v
                .as_u64()
                .filter(|n| (1..=u64::from(MAX_TRIGGER_ATTEMPTS)).contains(n))
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    invalid(
                        &field_key("attempts"),
                        format!(
                            "must be a whole number from 1 to {MAX_TRIGGER_ATTEMPTS}, not {}",
                            short_json(v)
                        ),
                    )
                })?,
        };
        let mode = if mode == "zocalo" {
            let recipes = match fields.get("recipes") {
                Some(serde_json::Value::Array(list))
                    if !list.is_empty()
                        && list
                            .iter()
                            .all(|r| r.as_str().is_some_and(|s| !s.is_empty())) =>
                {
                    list.iter()
                        .filter_map(|r| r.as_str().map(String::from))
                        .collect()
                }
                other => {
                    return Err(invalid(
                        &field_key("recipes"),
                        format!(
                            "mode zocalo needs a non-empty list of recipe names (the \
                             Dispatcher loads <recipe_directory>/<name>.json), not {}",
                            other.map_or("nothing".into(), short_json)
                        ),
                    ))
                }
            };
            TriggerMode::Zocalo {
                queue: text("queue")?.unwrap_or_else(|| "processing_recipe".into()),
                recipes,
            }
        } else {
            TriggerMode::Topic {
                exchange: text("exchange")?.unwrap_or_else(|| "amq.topic".into()),
                routing_key: text("routing_key")?.unwrap_or_else(|| "gda.messages.scan".into()),
            }
        };
        Ok(ProcessingTrigger {
            mode,
            on_start,
            on_end,
            attempts,
        })
    }
}

/// A JSON value for an error message, cut at 100 characters.
fn short_json(v: &serde_json::Value) -> String {
    v.to_string().chars().take(100).collect()
}

/// The JSON as written: every std_daq key is known here, so unknown ones can be rejected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    detector_name: String,
    detector_type: DetectorType,
    n_modules: u16,
    bit_depth: u8,
    image_pixel_height: u32,
    image_pixel_width: u32,
    start_udp_port: u16,
    module_positions: BTreeMap<String, [i64; 4]>,
    #[serde(default = "default_log_level")]
    log_level: String,
    #[serde(default = "default_stats_period")]
    stats_collection_period: f64,
    #[serde(default = "default_sync_queue")]
    module_sync_queue_size: u32,
    #[serde(default)]
    ram_buffer_gb: f64,
    #[serde(default = "default_module_slots")]
    module_buffer_slots: u32,
    #[serde(default = "default_sync_timeout")]
    module_sync_timeout_ms: u32,
    #[serde(default = "default_frame_timeout")]
    frame_timeout_ms: u32,
    #[serde(default)]
    assembler_threads: Option<u32>,
    #[serde(default = "default_bind")]
    udp_bind_address: String,
    #[serde(default = "default_ipc_dir")]
    ipc_dir: String,
    #[serde(default)]
    calibration_file: Option<PathBuf>,
    #[serde(default)]
    chip_gaps: bool,
    #[serde(default)]
    double_pixels: Option<String>,
    #[serde(default)]
    converted_output: Option<String>,
    #[serde(default)]
    photon_energy_kev: Option<f64>,
    #[serde(default)]
    compression: Option<String>,
    #[serde(default)]
    metrics_base_address: Option<String>,
    /// std-daq extension: the geometry and beam of the NXmx file (docs/nxmx.md).
    #[serde(default)]
    nxmx: crate::nxmx::NxmxRaw,
    // std_daq keys that are checked in `from_json_str`: each is implemented, refused with the
    // reason, or accepted with a notice saying why it has no effect (docs/configuration.md).
    #[serde(default)]
    max_number_of_forwarders_spawned: Option<u32>,
    #[serde(default)]
    use_all_forwarders: Option<bool>,
    #[serde(default)]
    sender_sends_full_images: Option<bool>,
    #[serde(default)]
    gpfs_block_size: Option<u64>,
    #[serde(default)]
    number_of_writers: Option<u32>,
    #[serde(default)]
    delay_filter_timeout: Option<f64>,
    #[serde(default)]
    switch_user_active: Option<bool>,
    #[serde(default)]
    live_stream_configs: Option<serde_json::Value>,
    #[serde(default)]
    processing_trigger: Option<serde_json::Value>,
    #[serde(default)]
    writer_user_id: Option<serde_json::Value>,
    #[serde(default)]
    submodule_info: Option<serde_json::Value>,
}

fn default_log_level() -> String {
    "info".into()
}
fn default_stats_period() -> f64 {
    10.0
}
fn default_sync_queue() -> u32 {
    50
}
fn default_module_slots() -> u32 {
    1000
}
fn default_sync_timeout() -> u32 {
    200
}
fn default_frame_timeout() -> u32 {
    100
}
fn default_bind() -> String {
    "0.0.0.0".into()
}
fn default_ipc_dir() -> String {
    "/tmp".into()
}

/// The (width, height) a module occupies in the image, gaps included; None when not fixed
/// (GigaFRoST).
pub fn module_rect_size(detector_type: DetectorType, chip_gaps: bool) -> Option<(u32, u32)> {
    let gap = if chip_gaps { 2 } else { 0 };
    match detector_type {
        // 4x2 chips of 256x256.
        DetectorType::JungfrauRaw | DetectorType::JungfrauConverted => Some((
            jungfrau::MODULE_WIDTH + 3 * gap,
            jungfrau::MODULE_HEIGHT + gap,
        )),
        // 2x1 chips of 256x256.
        DetectorType::Eiger => Some((512 + gap, 256)),
        DetectorType::Gigafrost => None,
    }
}

/// A config that could not be read or is invalid. Always names where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("config {origin}: key `{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

impl DetectorConfig {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses and validates config JSON; `origin` names the source in errors (a path or a Redis key).
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw_value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ConfigError::Parse {
                origin: origin.to_string(),
                message: e.to_string(),
            })?;
        let raw: RawConfig = serde_json::from_value(raw_value.clone()).map_err(|e| {
            let message = e.to_string();
            match culprit(&raw_value, &message) {
                Some(key) => ConfigError::Invalid {
                    origin: origin.to_string(),
                    key,
                    message,
                },
                None => ConfigError::Parse {
                    origin: origin.to_string(),
                    message,
                },
            }
        })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            key: key.to_string(),
            message,
        };

        if raw.detector_name.is_empty()
            || !raw
                .detector_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                "detector_name",
                format!(
                    "{:?} must be non-empty and use only letters, digits, '_' and '-' (it names files and sockets)",
                    raw.detector_name
                ),
            ));
        }
        if raw.n_modules == 0 {
            return Err(invalid("n_modules", "must be at least 1".into()));
        }
        if usize::from(raw.n_modules) > crate::messages::MAX_MODULES {
            return Err(invalid(
                "n_modules",
                format!(
                    "is {}, at most {} are supported (ImageMetadata's per-module fields)",
                    raw.n_modules,
                    crate::messages::MAX_MODULES
                ),
            ));
        }
        let expected_bit_depth: &[u8] = match raw.detector_type {
            DetectorType::JungfrauRaw | DetectorType::JungfrauConverted => &[16],
            DetectorType::Eiger => &[8, 16, 32],
            DetectorType::Gigafrost => &[12, 16],
        };
        if !expected_bit_depth.contains(&raw.bit_depth) {
            return Err(invalid(
                "bit_depth",
                format!(
                    "{} is not valid for {} (allowed: {:?})",
                    raw.bit_depth, raw.detector_type, expected_bit_depth
                ),
            ));
        }
        if raw.image_pixel_height == 0 || raw.image_pixel_width == 0 {
            return Err(invalid(
                "image_pixel_height",
                "image height and width must be positive".into(),
            ));
        }
        if raw.start_udp_port == 0
            || u32::from(raw.start_udp_port) + u32::from(raw.n_modules) > 65536
        {
            return Err(invalid(
                "start_udp_port",
                format!(
                    "{} + {} modules does not fit in the UDP port range",
                    raw.start_udp_port, raw.n_modules
                ),
            ));
        }
        if raw.detector_type == DetectorType::Gigafrost {
            match crate::gigafrost::Gigafrost::new(raw.image_pixel_width, raw.image_pixel_height) {
                Err(e) => return Err(invalid("image_pixel_width", e.to_string())),
                // Found by the `config` fuzz target: a frame must fit the ModuleFrame bitmap.
                Ok(g) if g.packets_per_frame > crate::messages::MAX_PACKETS_PER_FRAME => {
                    return Err(invalid(
                        "image_pixel_height",
                        format!(
                            "a {}x{} GigaFRoST frame is {} packets per module, more than the {} \
                             a module frame can track",
                            raw.image_pixel_width,
                            raw.image_pixel_height,
                            g.packets_per_frame,
                            crate::messages::MAX_PACKETS_PER_FRAME
                        ),
                    ))
                }
                Ok(_) => {}
            }
        }
        let converted = raw.detector_type == DetectorType::JungfrauConverted;
        let converted_output = match raw.converted_output.as_deref() {
            None => ConvertedOutput::default(),
            Some(_) if !converted => {
                return Err(invalid(
                    "converted_output",
                    format!(
                        "only applies to jungfrau-converted, not {}",
                        raw.detector_type
                    ),
                ))
            }
            Some("float32") => ConvertedOutput::Float32,
            Some("photons_int16") => ConvertedOutput::PhotonsInt16,
            Some("photons_int32") => ConvertedOutput::PhotonsInt32,
            Some(other) => {
                return Err(invalid(
                    "converted_output",
                    format!(
                        "{other:?} is not one of \"float32\", \"photons_int16\", \"photons_int32\""
                    ),
                ))
            }
        };
        let photons = converted_output != ConvertedOutput::Float32;
        match raw.photon_energy_kev {
            Some(_) if !converted => {
                return Err(invalid(
                    "photon_energy_kev",
                    format!(
                        "only applies to jungfrau-converted, not {}",
                        raw.detector_type
                    ),
                ))
            }
            Some(e) if !(e.is_finite() && e > 0.0) => {
                return Err(invalid(
                    "photon_energy_kev",
                    format!("{e} must be a positive number of keV"),
                ))
            }
            // Accepted without effect would be a silent drop: float32 output is in keV.
            Some(_) if !photons => {
                return Err(invalid(
                    "photon_energy_kev",
                    "has no effect with converted_output \"float32\" (energies in keV): set \
                     converted_output to \"photons_int16\" or \"photons_int32\", or remove the key"
                        .into(),
                ))
            }
            None if photons => {
                return Err(invalid(
                    "photon_energy_kev",
                    format!(
                        "is required for converted_output {:?} (the photon energy in keV)",
                        converted_output.as_str()
                    ),
                ))
            }
            _ => {}
        }
        // Found by the `config` fuzz target: the image size was only checked against the
        // modules, so height x width x bytes per pixel could overflow. One image must fit one
        // HDF5 chunk (4 GiB), the writer's unit of storage.
        let bytes_per_pixel: u64 = match raw.detector_type {
            DetectorType::JungfrauConverted => converted_output.bytes_per_pixel() as u64,
            DetectorType::Gigafrost => 2,
            _ => u64::from(raw.bit_depth).div_ceil(8),
        };
        let image_bytes = u64::from(raw.image_pixel_height)
            .checked_mul(u64::from(raw.image_pixel_width))
            .and_then(|p| p.checked_mul(bytes_per_pixel));
        if image_bytes.is_none_or(|b| b > u64::from(u32::MAX)) {
            return Err(invalid(
                "image_pixel_height",
                format!(
                    "an image of {} x {} pixels of {bytes_per_pixel} bytes is larger than 4 GiB, \
                     the most one HDF5 chunk (one image in the file) can hold",
                    raw.image_pixel_height, raw.image_pixel_width
                ),
            ));
        }
        if raw.module_buffer_slots < 2 {
            return Err(invalid("module_buffer_slots", "must be at least 2".into()));
        }
        if !raw.stats_collection_period.is_finite() || raw.stats_collection_period <= 0.0 {
            return Err(invalid(
                "stats_collection_period",
                "must be positive".into(),
            ));
        }
        if !raw.ram_buffer_gb.is_finite() || raw.ram_buffer_gb < 0.0 {
            return Err(invalid("ram_buffer_gb", "must be zero or positive".into()));
        }
        if raw.udp_bind_address.parse::<std::net::IpAddr>().is_err() {
            return Err(invalid(
                "udp_bind_address",
                format!("{:?} is not an IP address", raw.udp_bind_address),
            ));
        }

        match (&raw.calibration_file, raw.detector_type) {
            (None, DetectorType::JungfrauConverted) => {
                return Err(invalid(
                    "calibration_file",
                    "is required for jungfrau-converted (an HDF5 file with gains, pedestals and pixel_mask; see docs/calibration.md)".into(),
                ))
            }
            (Some(p), DetectorType::JungfrauConverted) if p.as_os_str().is_empty() => {
                return Err(invalid("calibration_file", "must not be empty".into()))
            }
            (Some(_), t) if t != DetectorType::JungfrauConverted => {
                return Err(invalid(
                    "calibration_file",
                    format!("is only used by jungfrau-converted, not {t}"),
                ))
            }
            _ => {}
        }
        if raw.chip_gaps && raw.detector_type == DetectorType::Gigafrost {
            return Err(invalid(
                "chip_gaps",
                "applies to JUNGFRAU and EIGER only, not gigafrost".into(),
            ));
        }
        let double_pixels = match raw.double_pixels.as_deref() {
            None => DoublePixels::default(),
            Some(_) if !(raw.chip_gaps && raw.detector_type == DetectorType::JungfrauConverted) => {
                return Err(invalid(
                    "double_pixels",
                    "only applies to jungfrau-converted with chip_gaps: true".into(),
                ))
            }
            Some("split") => DoublePixels::Split,
            Some("mask") => DoublePixels::Mask,
            Some(other) => {
                return Err(invalid(
                    "double_pixels",
                    format!("{other:?} is not one of \"split\", \"mask\""),
                ))
            }
        };

        let n = usize::from(raw.n_modules);
        if raw.module_positions.len() != n {
            return Err(invalid(
                "module_positions",
                format!(
                    "has {} entries but n_modules is {}",
                    raw.module_positions.len(),
                    n
                ),
            ));
        }
        let mut positions: Vec<Option<ModulePosition>> = vec![None; n];
        for (key, corners) in &raw.module_positions {
            let module: usize = key.parse().ok().filter(|m| *m < n).ok_or_else(|| {
                invalid(
                    "module_positions",
                    format!("key {key:?} is not a module id in 0..{n}"),
                )
            })?;
            let key_path = format!("module_positions.{key}");
            let mut c = [0u32; 4];
            for (i, v) in corners.iter().enumerate() {
                let limit = if i % 2 == 0 {
                    raw.image_pixel_width
                } else {
                    raw.image_pixel_height
                };
                c[i] = u32::try_from(*v)
                    .ok()
                    .filter(|v| *v < limit)
                    .ok_or_else(|| {
                        invalid(
                            &key_path,
                            format!(
                                "corner {corners:?} lies outside the {}x{} image",
                                raw.image_pixel_width, raw.image_pixel_height
                            ),
                        )
                    })?;
            }
            let pos = ModulePosition {
                x0: c[0],
                y0: c[1],
                x1: c[2],
                y1: c[3],
            };
            if let Some((w, h)) = module_rect_size(raw.detector_type, raw.chip_gaps) {
                if pos.width() != w || pos.height() != h {
                    let what = if raw.detector_type == DetectorType::Eiger {
                        "EIGER half-module"
                    } else {
                        "JUNGFRAU module"
                    };
                    let gaps = if raw.chip_gaps {
                        "with chip_gaps: true"
                    } else {
                        "without chip gaps"
                    };
                    return Err(invalid(
                        &key_path,
                        format!(
                            "a {what} {gaps} is {w}x{h} pixels, but {corners:?} spans {}x{}",
                            pos.width(),
                            pos.height()
                        ),
                    ));
                }
            }
            positions[module] = Some(pos);
        }
        let module_positions: Vec<ModulePosition> = positions.into_iter().flatten().collect();
        if module_positions.len() != n {
            return Err(invalid(
                "module_positions",
                format!("must name every module id in 0..{n} exactly once"),
            ));
        }
        // GigaFRoST's streams have a fixed place (quadrant = module / 2, rows interleaved by
        // module % 2, north quadrants mirrored): it needs 8 modules; its module_positions are
        // accepted as std_daq configs carry them, but not used.
        if raw.detector_type == DetectorType::Gigafrost && raw.n_modules != 8 {
            return Err(invalid(
                "n_modules",
                format!(
                    "GigaFRoST images come from 8 streams, not {}",
                    raw.n_modules
                ),
            ));
        }
        // Overlapping modules would silently overwrite each other's pixels.
        let placed = if raw.detector_type == DetectorType::Gigafrost {
            &module_positions[..0]
        } else {
            &module_positions[..]
        };
        for (a, pa) in placed.iter().enumerate() {
            for (b, pb) in placed.iter().enumerate().skip(a + 1) {
                let overlap_x =
                    pa.left() < pb.left() + pb.width() && pb.left() < pa.left() + pa.width();
                let overlap_y =
                    pa.top() < pb.top() + pb.height() && pb.top() < pa.top() + pa.height();
                if overlap_x && overlap_y {
                    return Err(invalid(
                        "module_positions",
                        format!("modules {a} and {b} overlap"),
                    ));
                }
            }
        }

        let log_level = match raw.log_level.to_ascii_lowercase().as_str() {
            l @ ("trace" | "debug" | "info" | "warn" | "error" | "off") => l.to_string(),
            // spdlog's spellings, as std_daq configs write them.
            "warning" => "warn".into(),
            "err" | "critical" => "error".into(),
            _ => {
                return Err(invalid(
                    "log_level",
                    format!(
                        "{:?} is not a log level (trace, debug, info, warning, error, critical, \
                         off)",
                        raw.log_level
                    ),
                ))
            }
        };
        let compression = match raw.compression.as_deref() {
            None => ImageCompression::default(),
            Some(c) => c.parse().map_err(|e| invalid("compression", e))?,
        };
        let metrics_base_address = match raw.metrics_base_address.as_deref() {
            None => None,
            Some(text) => {
                let addr: std::net::SocketAddr = text.parse().map_err(|_| {
                    invalid(
                        "metrics_base_address",
                        format!("{text:?} is not an address ip:port (e.g. \"127.0.0.1:9100\")"),
                    )
                })?;
                let receivers =
                    u32::from(MetricsService::Receiver(0).offset()) + u32::from(raw.n_modules) - 1;
                // Writers 1.. (number_of_writers > 1) come after the largest detector's receivers.
                let writers = match raw.number_of_writers.unwrap_or(1).min(MAX_WRITERS) {
                    0 | 1 => 0,
                    n => u32::from(MetricsService::OTHER_WRITERS_OFFSET) + n - 2,
                };
                let last = receivers.max(writers);
                if addr.port() == 0 || u32::from(addr.port()) + last > 65535 {
                    return Err(invalid(
                        "metrics_base_address",
                        format!(
                            "port {} does not leave room for every service's port (base + 0 \
                             .. base + {last} for {} modules; see docs/configuration.md)",
                            addr.port(),
                            raw.n_modules
                        ),
                    ));
                }
                Some(addr)
            }
        };
        let mut notices = Vec::new();
        let mut no_effect = |key: &str, why: &str| {
            notices.push(format!(
                "config {origin}: key `{key}` has no effect here: {why}"
            ));
        };
        if raw.max_number_of_forwarders_spawned.is_some() {
            no_effect(
                "max_number_of_forwarders_spawned",
                "std_daq's forwarders are replaced by std-stream-send, which splits images with \
                 its --parts and --connections options",
            );
        }
        if raw.use_all_forwarders.is_some() {
            no_effect(
                "use_all_forwarders",
                "std_daq's forwarders are replaced by std-stream-send, which always splits the \
                 actual image size (--parts)",
            );
        }
        if raw.sender_sends_full_images.is_some() {
            no_effect(
                "sender_sends_full_images",
                "std_daq's forwarders are replaced by std-stream-send: whole images spread over \
                 the connections is its --parts 1 (the default) with --connections N",
            );
        }
        if raw.gpfs_block_size.is_some() {
            no_effect(
                "gpfs_block_size",
                "std_daq used it as the HDF5 chunk size (several images per chunk) and file \
                 alignment; std-daq writes one chunk per image by direct chunk writes, which an \
                 alignment to the block size would pad to a whole block each",
            );
        }
        let number_of_writers = match raw.number_of_writers {
            None | Some(0) => 1,
            Some(n) if n <= MAX_WRITERS => n,
            Some(n) => {
                return Err(invalid(
                    "number_of_writers",
                    format!("{n} writers: at most {MAX_WRITERS} (one file per writer and run)"),
                ))
            }
        };
        let assembler_threads = match raw.assembler_threads {
            None | Some(0) => None,
            Some(n) if n <= MAX_ASSEMBLER_THREADS => Some(n),
            Some(n) => {
                return Err(invalid(
                    "assembler_threads",
                    format!(
                        "{n} threads: at most {MAX_ASSEMBLER_THREADS} (0 or absent: automatic)"
                    ),
                ))
            }
        };
        if raw.delay_filter_timeout.is_some() {
            no_effect(
                "delay_filter_timeout",
                "it is the timeout of std_daq's GigaFRoST filter service (std_gf_filter), which \
                 std-daq does not have: every assembled image goes to the image stream",
            );
        }
        if raw.switch_user_active == Some(true) {
            return Err(invalid(
                "switch_user_active",
                "true is not supported: std-h5-writer writes files as the user it runs as (set \
                 User= of its systemd unit); remove the key or set it to false"
                    .into(),
            ));
        }
        if raw.writer_user_id.is_some() {
            no_effect(
                "writer_user_id",
                "files are written as the user std-h5-writer runs as (switch_user_active is not \
                 supported; std_daq's services ignore the key too)",
            );
        }
        if raw.submodule_info.is_some() {
            no_effect(
                "submodule_info",
                "it describes EIGER detector control (hostnames, ports, activation), which is \
                 not std-daq's job; module placement comes from module_positions",
            );
        }
        let live_streams = match &raw.live_stream_configs {
            None => Vec::new(),
            Some(v) => live_streams(v, origin, &invalid, &mut notices)?,
        };

        let processing_trigger = match &raw.processing_trigger {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(ProcessingTrigger::from_value(v, &invalid)?),
        };

        if metrics_base_address.is_some() && live_streams.len() > MetricsService::MAX_PREVIEWS {
            return Err(invalid(
                "live_stream_configs",
                format!(
                    "{} live streams, but with metrics_base_address at most {} have a metrics \
                     port (base + 5 .. base + 9; docs/configuration.md)",
                    live_streams.len(),
                    MetricsService::MAX_PREVIEWS
                ),
            ));
        }

        let cfg = DetectorConfig {
            detector_name: raw.detector_name,
            detector_type: raw.detector_type,
            n_modules: raw.n_modules,
            bit_depth: raw.bit_depth,
            image_pixel_height: raw.image_pixel_height,
            image_pixel_width: raw.image_pixel_width,
            start_udp_port: raw.start_udp_port,
            module_positions,
            log_level,
            stats_collection_period: raw.stats_collection_period,
            module_sync_queue_size: raw.module_sync_queue_size,
            ram_buffer_gb: raw.ram_buffer_gb,
            module_buffer_slots: raw.module_buffer_slots,
            module_sync_timeout_ms: raw.module_sync_timeout_ms,
            number_of_writers,
            assembler_threads,
            frame_timeout_ms: raw.frame_timeout_ms,
            udp_bind_address: raw.udp_bind_address,
            ipc_dir: raw.ipc_dir,
            calibration_file: raw.calibration_file,
            chip_gaps: raw.chip_gaps,
            double_pixels,
            converted_output,
            photon_energy_kev: raw.photon_energy_kev,
            compression,
            metrics_base_address,
            live_streams,
            nxmx_settings: raw.nxmx,
            processing_trigger,
            notices,
            raw: raw_value,
        };
        crate::nxmx::Nxmx::new(&cfg, &cfg.nxmx_settings).map_err(|e| invalid("nxmx", e))?;
        Ok(cfg)
    }

    /// Assembler worker threads: the config's `assembler_threads`, else one per module up to
    /// the cores this process may use (at least 1).
    pub fn assembler_threads_or_default(&self) -> u32 {
        self.assembler_threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let cores = u32::try_from(cores).unwrap_or(u32::MAX);
            u32::from(self.n_modules)
                .min(cores)
                .clamp(1, MAX_ASSEMBLER_THREADS)
        })
    }

    /// The NXmx values of this detector (checked when the config was loaded, so an error here
    /// means the config was changed in memory since).
    pub fn nxmx(&self) -> Result<crate::nxmx::Nxmx, String> {
        crate::nxmx::Nxmx::new(self, &self.nxmx_settings)
    }

    /// The NXmx values with a write request's `nxmx` over the config's; the error names the
    /// sub-key (`nxmx.<key> = ...: ...`).
    pub fn nxmx_with(&self, over: &crate::nxmx::NxmxRaw) -> Result<crate::nxmx::Nxmx, String> {
        crate::nxmx::Nxmx::new(self, &self.nxmx_settings.overridden_by(over))
    }

    /// Bytes of one module frame as the receiver stores it in its FrameBuffer slot.
    pub fn module_frame_bytes(&self) -> usize {
        match self.detector_type {
            DetectorType::JungfrauRaw | DetectorType::JungfrauConverted => jungfrau::FRAME_BYTES,
            // Later issues: EIGER half-module and GigaFRoST stream sizes.
            DetectorType::Eiger => 512 * 256 * usize::from(self.bit_depth) / 8,
            // 12-bit packed stream frames, one packet position per rows_per_packet rows (the
            // config checked that the layout exists).
            DetectorType::Gigafrost => {
                crate::gigafrost::Gigafrost::new(self.image_pixel_width, self.image_pixel_height)
                    .map_or(0, |g| g.slot_bytes())
            }
        }
    }

    /// Bytes per pixel of the assembled image.
    pub fn image_bytes_per_pixel(&self) -> usize {
        match self.detector_type {
            DetectorType::JungfrauConverted => self.converted_output.bytes_per_pixel(),
            DetectorType::Gigafrost => 2,
            _ => usize::from(self.bit_depth).div_ceil(8),
        }
    }

    /// The image dtype written into ImageMetadata and the file.
    pub fn image_dtype(&self) -> crate::Dtype {
        match (self.detector_type, self.image_bytes_per_pixel()) {
            (DetectorType::JungfrauConverted, _) => self.converted_output.dtype(),
            (_, 1) => crate::Dtype::Uint8,
            (_, 4) => crate::Dtype::Uint32,
            _ => crate::Dtype::Uint16,
        }
    }

    pub fn image_bytes(&self) -> usize {
        self.image_pixel_height as usize
            * self.image_pixel_width as usize
            * self.image_bytes_per_pixel()
    }

    /// Packets that make up one module frame.
    pub fn packets_per_frame(&self) -> u32 {
        match self.detector_type {
            DetectorType::JungfrauRaw | DetectorType::JungfrauConverted => {
                jungfrau::PACKETS_PER_FRAME
            }
            DetectorType::Eiger => (512 * 256 * u32::from(self.bit_depth) / 8 / 4096).max(1),
            DetectorType::Gigafrost => {
                crate::gigafrost::Gigafrost::new(self.image_pixel_width, self.image_pixel_height)
                    .map_or(0, |g| g.packets_per_frame as u32)
            }
        }
    }

    /// Slots of the ImageBuffer: from `ram_buffer_gb` as std_daq does, at least 1000 when unset.
    pub fn image_buffer_slots(&self) -> u64 {
        if self.ram_buffer_gb > 0.0 {
            let bytes = self.ram_buffer_gb * f64::from(1u32 << 30);
            ((bytes / self.image_bytes() as f64) as u64).max(2)
        } else {
            1000
        }
    }

    pub fn udp_port(&self, module: u16) -> u16 {
        self.start_udp_port + module
    }

    /// Where `service` serves its metrics by `metrics_base_address` (None: the key is not set).
    pub fn metrics_addr(&self, service: MetricsService) -> Option<std::net::SocketAddr> {
        let mut addr = self.metrics_base_address?;
        // Validated at load: base + every offset of this detector fits.
        addr.set_port(addr.port().saturating_add(service.offset()));
        Some(addr)
    }
}

/// The key a serde error is about, when the message does not say (a value of the wrong type or
/// variant): the one key whose removal changes the error.
fn culprit(value: &serde_json::Value, message: &str) -> Option<String> {
    if message.starts_with("missing field") || message.starts_with("unknown field") {
        return None;
    }
    let object = value.as_object()?;
    // Each try parses the whole object again: bounded, for a config of thousands of keys (which
    // has unknown ones anyway).
    if object.len() > 64 {
        return None;
    }
    object.keys().find_map(|key| {
        let mut without = object.clone();
        without.remove(key);
        match serde_json::from_value::<RawConfig>(serde_json::Value::Object(without)) {
            Err(e) if e.to_string() == message => None,
            _ => Some(key.clone()),
        }
    })
}

/// Checks `live_stream_configs`: `{"tcp://host:port": {"type": "forward" | "periodic" |
/// "batch", "config": [a, b]}}`.
fn live_streams(
    value: &serde_json::Value,
    origin: &str,
    invalid: &dyn Fn(&str, String) -> ConfigError,
    notices: &mut Vec<String>,
) -> Result<Vec<LiveStream>, ConfigError> {
    const KEY: &str = "live_stream_configs";
    let entries = value.as_object().ok_or_else(|| {
        invalid(
            KEY,
            "must be an object {\"tcp://host:port\": {\"type\": ..., \"config\": [a, b]}}".into(),
        )
    })?;
    let mut streams = Vec::new();
    for (endpoint, entry) in entries {
        let key = format!("{KEY}.{endpoint}");
        let port = endpoint
            .strip_prefix("tcp://")
            .and_then(|rest| rest.rsplit_once(':'))
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .filter(|p| *p != 0);
        if port.is_none() {
            return Err(invalid(
                &key,
                "the entry's key must be a ZMQ endpoint tcp://host:port for viewers to connect to"
                    .into(),
            ));
        }
        let Some(fields) = entry.as_object() else {
            return Err(invalid(
                &key,
                "must be an object {\"type\": ..., \"config\": [a, b]}".into(),
            ));
        };
        if let Some(unknown) = fields.keys().find(|k| *k != "type" && *k != "config") {
            return Err(invalid(
                &key,
                format!("unknown field {unknown:?} (expected \"type\" and \"config\")"),
            ));
        }
        let kind = fields.get("type").and_then(|t| t.as_str()).ok_or_else(|| {
            invalid(
                &key,
                "needs \"type\": \"forward\", \"periodic\" or \"batch\"".into(),
            )
        })?;
        let config = fields.get("config");
        let pair = || -> Option<(f64, f64)> {
            let c = config?.as_array()?;
            match c.as_slice() {
                [a, b] => Some((a.as_f64()?, b.as_f64()?)),
                _ => None,
            }
        };
        let count =
            |x: f64| (x >= 1.0 && x.fract() == 0.0 && x <= f64::from(u32::MAX)).then_some(x as u32);
        let mode = match kind {
            "forward" => {
                if config.is_some_and(|c| c.as_array().is_none_or(|a| !a.is_empty())) {
                    notices.push(format!(
                        "config {origin}: key `{key}`: \"config\" has no effect for type forward (every \
                         image is sent)"
                    ));
                }
                LiveStreamMode::Forward
            }
            "periodic" => match pair() {
                Some((n, hz)) if count(n).is_some() && (0.001..=1e6).contains(&hz) => {
                    LiveStreamMode::Periodic {
                        n: count(n).unwrap_or(1),
                        hz,
                    }
                }
                _ => {
                    return Err(invalid(
                        &key,
                        format!(
                            "type periodic needs \"config\": [N images, F Hz] with N a whole \
                             number >= 1 and 0.001 <= F <= 1000000, not {}",
                            config.map_or("nothing".into(), |c| c.to_string())
                        ),
                    ))
                }
            },
            "batch" => match pair() {
                Some((n, every))
                    if count(n).is_some()
                        && count(every).is_some_and(|m| m >= count(n).unwrap_or(0)) =>
                {
                    LiveStreamMode::Batch {
                        n: count(n).unwrap_or(1),
                        every: count(every).unwrap_or(1),
                    }
                }
                _ => {
                    return Err(invalid(
                        &key,
                        format!(
                            "type batch needs \"config\": [N, M] (the first N of every M \
                             images) with whole numbers 1 <= N <= M, not {}",
                            config.map_or("nothing".into(), |c| c.to_string())
                        ),
                    ))
                }
            },
            other => {
                return Err(invalid(
                    &key,
                    format!(
                        "type {other:?} is not supported: std-daq preview streams are forward, \
                         periodic or batch (array-1.0 messages)"
                    ),
                ))
            }
        };
        streams.push(LiveStream {
            endpoint: endpoint.clone(),
            mode,
        });
    }
    Ok(streams)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const TWO_MODULE_JF: &str = r#"{
        "detector_name": "jf-test",
        "detector_type": "jungfrau-raw",
        "n_modules": 2,
        "bit_depth": 16,
        "image_pixel_height": 1024,
        "image_pixel_width": 1024,
        "start_udp_port": 50020,
        "module_positions": {"0": [0, 0, 1023, 511], "1": [0, 512, 1023, 1023]}
    }"#;

    fn with(key: &str, value: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(TWO_MODULE_JF).unwrap();
        v[key] = value;
        v.to_string()
    }

    fn without(key: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(TWO_MODULE_JF).unwrap();
        v.as_object_mut().unwrap().remove(key);
        v.to_string()
    }

    #[test]
    fn parses_std_daq_example() {
        let c = DetectorConfig::from_json_str(TWO_MODULE_JF, "t.json").unwrap();
        assert_eq!(c.n_modules, 2);
        assert_eq!(c.module_positions[1].top(), 512);
        assert_eq!(c.image_bytes(), 2 * 1024 * 1024);
        assert_eq!(c.module_frame_bytes(), 1024 * 1024);
        assert_eq!(c.udp_port(1), 50021);
        assert_eq!(c.log_level, "info");
        assert_eq!(c.image_buffer_slots(), 1000);
    }

    /// Found by the `config` fuzz target: a GigaFRoST image so tall that a module frame has more
    /// packets than the ModuleFrame bitmap tracks was accepted.
    #[test]
    fn a_gigafrost_frame_with_more_packets_than_a_module_frame_tracks_is_refused() {
        let mut v: serde_json::Value = serde_json::from_str(TWO_MODULE_JF).unwrap();
        v["detector_type"] = "gigafrost".into();
        v["bit_depth"] = 12.into();
        v["n_modules"] = 8.into();
        v["image_pixel_width"] = 2040.into();
        v["image_pixel_height"] = 524_280.into();
        v["module_positions"] = serde_json::json!({});
        let err = DetectorConfig::from_json_str(&v.to_string(), "gf.json").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("gf.json")
                && msg.contains("image_pixel_height")
                && msg.contains("32768 packets per module"),
            "{msg}"
        );
    }

    /// Found by the `config` fuzz target: an image size whose byte count overflowed.
    #[test]
    fn an_image_larger_than_one_hdf5_chunk_is_refused() {
        let mut v: serde_json::Value = serde_json::from_str(TWO_MODULE_JF).unwrap();
        v["image_pixel_height"] = 4_294_967_295u32.into();
        v["image_pixel_width"] = 4_294_967_295u32.into();
        let err = DetectorConfig::from_json_str(&v.to_string(), "big.json").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("big.json") && msg.contains("image_pixel_height") && msg.contains("4 GiB"),
            "{msg}"
        );
    }

    #[test]
    fn missing_key_is_named_with_the_file() {
        let err =
            DetectorConfig::from_json_str(&without("n_modules"), "/etc/det.json").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/etc/det.json") && msg.contains("n_modules"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_key_is_rejected() {
        let err = DetectorConfig::from_json_str(&with("n_module", 2.into()), "d.json").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `n_module`"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err =
            DetectorConfig::from_json_str(&with("detector_type", "jungfrau".into()), "d.json")
                .unwrap_err();
        assert!(err.to_string().contains("jungfrau"), "{err}");
    }

    #[test]
    fn bad_module_positions_are_named() {
        let bad = with(
            "module_positions",
            serde_json::json!({"0": [0, 0, 1023, 511], "1": [0, 512, 1023, 1024]}),
        );
        let err = DetectorConfig::from_json_str(&bad, "d.json").unwrap_err();
        assert!(err.to_string().contains("module_positions.1"), "{err}");

        let overlap = with(
            "module_positions",
            serde_json::json!({"0": [0, 0, 1023, 511], "1": [0, 100, 1023, 611]}),
        );
        let err = DetectorConfig::from_json_str(&overlap, "d.json").unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");

        let missing = with(
            "module_positions",
            serde_json::json!({"0": [0, 0, 1023, 511]}),
        );
        let err = DetectorConfig::from_json_str(&missing, "d.json").unwrap_err();
        assert!(err.to_string().contains("n_modules is 2"), "{err}");
    }

    #[test]
    fn flips_follow_corner_order() {
        let flipped = with(
            "module_positions",
            serde_json::json!({"0": [1023, 511, 0, 0], "1": [0, 512, 1023, 1023]}),
        );
        let c = DetectorConfig::from_json_str(&flipped, "d.json").unwrap();
        assert!(c.module_positions[0].flip_x() && c.module_positions[0].flip_y());
        assert_eq!(c.module_positions[0].left(), 0);
        assert!(!c.module_positions[1].flip_x());
    }

    #[test]
    fn detector_name_must_be_safe_for_file_names() {
        let err = DetectorConfig::from_json_str(&with("detector_name", "../x".into()), "d.json")
            .unwrap_err();
        assert!(err.to_string().contains("detector_name"), "{err}");
    }

    fn converted(extra: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(TWO_MODULE_JF).unwrap();
        v["detector_type"] = "jungfrau-converted".into();
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v.to_string()
    }

    #[test]
    fn converted_needs_a_calibration_file_and_others_refuse_it() {
        let err = DetectorConfig::from_json_str(&converted(serde_json::json!({})), "/c/jf.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/c/jf.json")
                && err.contains("`calibration_file`")
                && err.contains("required"),
            "{err}"
        );
        let c = DetectorConfig::from_json_str(
            &converted(serde_json::json!({"calibration_file": "/cal/jf.h5"})),
            "c.json",
        )
        .unwrap();
        assert_eq!(c.calibration_file, Some(PathBuf::from("/cal/jf.h5")));
        assert!(!c.chip_gaps);
        assert_eq!(c.image_bytes_per_pixel(), 4);
        assert_eq!(c.image_dtype() as u16, 24);

        let err =
            DetectorConfig::from_json_str(&with("calibration_file", "/x.h5".into()), "r.json")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("`calibration_file`") && err.contains("jungfrau-raw"),
            "{err}"
        );
    }

    #[test]
    fn chip_gaps_change_the_module_size() {
        // Without gaps a 1030x514 rectangle is refused, naming the key and the gapped size.
        let gapped = serde_json::json!({"0": [0, 0, 1029, 513], "1": [0, 514, 1029, 1027]});
        let mut v: serde_json::Value = serde_json::from_str(TWO_MODULE_JF).unwrap();
        v["image_pixel_height"] = 1028.into();
        v["image_pixel_width"] = 1030.into();
        v["module_positions"] = gapped;
        let err = DetectorConfig::from_json_str(&v.to_string(), "g.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("module_positions.0")
                && err.contains("1024x512")
                && err.contains("1030x514"),
            "{err}"
        );
        v["chip_gaps"] = true.into();
        let c = DetectorConfig::from_json_str(&v.to_string(), "g.json").unwrap();
        assert!(c.chip_gaps);
        assert_eq!(c.module_positions[1].height(), 514);
        // ... and a plain 1024x512 module is then refused.
        v["module_positions"] =
            serde_json::json!({"0": [0, 0, 1023, 511], "1": [0, 514, 1029, 1027]});
        let err = DetectorConfig::from_json_str(&v.to_string(), "g.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("module_positions.0") && err.contains("chip_gaps: true"),
            "{err}"
        );

        assert_eq!(
            module_rect_size(DetectorType::Eiger, true),
            Some((514, 256))
        );
        assert_eq!(
            module_rect_size(DetectorType::Eiger, false),
            Some((512, 256))
        );
        assert_eq!(module_rect_size(DetectorType::Gigafrost, false), None);
    }

    #[test]
    fn double_pixels_is_checked() {
        let gapped = serde_json::json!({
            "calibration_file": "/c.h5", "chip_gaps": true, "image_pixel_height": 1028,
            "image_pixel_width": 1030,
            "module_positions": {"0": [0, 0, 1029, 513], "1": [0, 514, 1029, 1027]}});
        let mut v: serde_json::Value = serde_json::from_str(&converted(gapped)).unwrap();
        assert_eq!(
            DetectorConfig::from_json_str(&v.to_string(), "d.json")
                .unwrap()
                .double_pixels,
            DoublePixels::Split
        );
        v["double_pixels"] = "mask".into();
        assert_eq!(
            DetectorConfig::from_json_str(&v.to_string(), "d.json")
                .unwrap()
                .double_pixels,
            DoublePixels::Mask
        );
        v["double_pixels"] = "spilt".into();
        let err = DetectorConfig::from_json_str(&v.to_string(), "d.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`double_pixels`") && err.contains("spilt"),
            "{err}"
        );
        let err = DetectorConfig::from_json_str(&with("double_pixels", "mask".into()), "d.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`double_pixels`") && err.contains("chip_gaps"),
            "{err}"
        );
    }

    /// `converted_output` and `photon_energy_kev`: photon types need the energy, both keys are
    /// refused for other detector types, the energy must be a positive number, and the energy
    /// without a photon type is refused (it would have no effect). Errors name key and file.
    #[test]
    fn converted_output_and_photon_energy_are_checked() {
        use serde_json::json;
        let load = |extra: serde_json::Value| {
            let mut extra = extra;
            extra["calibration_file"] = "/c.h5".into();
            DetectorConfig::from_json_str(&converted(extra), "/etc/std-daq/p.json")
        };
        let refused = |r: Result<DetectorConfig, ConfigError>, key: &str, text: &str| {
            let err = r.unwrap_err().to_string();
            assert!(
                err.contains("/etc/std-daq/p.json")
                    && err.contains(&format!("`{key}`"))
                    && err.contains(text),
                "{err}"
            );
        };
        // Default: float32 keV, exactly as before.
        let c = load(json!({})).unwrap();
        assert_eq!(c.converted_output, ConvertedOutput::Float32);
        assert_eq!(c.photon_energy_kev, None);
        assert_eq!((c.image_bytes_per_pixel(), c.image_dtype() as u16), (4, 24));
        let c = load(json!({"converted_output": "float32"})).unwrap();
        assert_eq!(c.image_dtype(), crate::Dtype::Float32);
        // Photon types: int16 (code 12, 2 bytes), int32 (code 14, 4 bytes).
        let c =
            load(json!({"converted_output": "photons_int16", "photon_energy_kev": 12.4})).unwrap();
        assert_eq!(c.converted_output, ConvertedOutput::PhotonsInt16);
        assert_eq!(c.photon_energy_kev, Some(12.4));
        assert_eq!((c.image_bytes_per_pixel(), c.image_dtype() as u16), (2, 12));
        assert_eq!(c.image_bytes(), 1024 * 1024 * 2);
        assert!(c.notices.is_empty(), "{:?}", c.notices);
        let c = load(json!({"converted_output": "photons_int32", "photon_energy_kev": 8})).unwrap();
        assert_eq!((c.image_bytes_per_pixel(), c.image_dtype() as u16), (4, 14));

        refused(
            load(json!({"converted_output": "photons_int16"})),
            "photon_energy_kev",
            "required",
        );
        refused(
            load(json!({"converted_output": "photons"})),
            "converted_output",
            "\"photons\" is not one of",
        );
        refused(
            load(json!({"converted_output": 16})),
            "converted_output",
            "",
        );
        for bad in [json!(0), json!(-12.4)] {
            refused(
                load(json!({"converted_output": "photons_int32", "photon_energy_kev": bad})),
                "photon_energy_kev",
                "positive",
            );
        }
        refused(
            load(json!({"converted_output": "photons_int32", "photon_energy_kev": "12"})),
            "photon_energy_kev",
            "",
        );
        refused(
            load(json!({"photon_energy_kev": 12.4})),
            "photon_energy_kev",
            "no effect",
        );
        // Other detector types refuse both keys.
        for (key, value) in [
            ("converted_output", json!("photons_int16")),
            ("converted_output", json!("float32")),
            ("photon_energy_kev", json!(12.4)),
        ] {
            refused(
                DetectorConfig::from_json_str(&with(key, value), "/etc/std-daq/p.json"),
                key,
                "only applies to jungfrau-converted, not jungfrau-raw",
            );
        }
    }

    /// What a config with one key set does.
    #[derive(Debug)]
    enum Want {
        /// Loads, no notice mentions the key.
        Accept,
        /// Loads with exactly one notice, naming the key and the file, containing this text.
        Warn(&'static str),
        /// Refused, naming the key and the file, with this text in the message.
        Refuse(&'static str),
    }

    /// Loads TWO_MODULE_JF with `key` set (or removed when `value` is None) from "/etc/std-daq/jf.json"
    /// and checks the outcome. Returns the config when it loaded.
    fn check(key: &str, value: Option<serde_json::Value>, want: &Want) -> Option<DetectorConfig> {
        const ORIGIN: &str = "/etc/std-daq/jf.json";
        let text = match &value {
            Some(v) => with(key, v.clone()),
            None => without(key),
        };
        let result = DetectorConfig::from_json_str(&text, ORIGIN);
        let case = format!("{key} = {value:?}: {want:?}");
        match (want, result) {
            (Want::Accept, Ok(c)) => {
                let about: Vec<&String> = c
                    .notices
                    .iter()
                    .filter(|n| n.contains(&format!("`{key}")))
                    .collect();
                assert!(about.is_empty(), "{case}: unexpected notices {about:?}");
                Some(c)
            }
            (Want::Warn(text), Ok(c)) => {
                let about: Vec<&String> = c
                    .notices
                    .iter()
                    .filter(|n| n.contains(&format!("`{key}")))
                    .collect();
                assert_eq!(about.len(), 1, "{case}: notices {:?}", c.notices);
                let n = about[0];
                assert!(
                    n.contains(ORIGIN) && n.contains("has no effect") && n.contains(text),
                    "{case}: {n}"
                );
                Some(c)
            }
            (Want::Refuse(text), Err(e)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(ORIGIN) && msg.contains(&format!("`{key}")) && msg.contains(text),
                    "{case}: {msg}"
                );
                None
            }
            (_, Ok(c)) => panic!("{case}: loaded, notices {:?}", c.notices),
            (_, Err(e)) => panic!("{case}: refused: {e}"),
        }
    }

    /// Every key of std_daq's config (std_daq-facts.md 8.1: the required keys, the optional
    /// table, `writer_user_id`, `submodule_info`) is implemented, refused with the reason, or
    /// accepted with exactly one notice that it has no effect; every error and notice names the
    /// key and the file.
    #[test]
    fn every_std_daq_key_is_implemented_refused_or_warned() {
        use serde_json::json;
        use Want::*;
        // Required: missing or of the wrong type is refused naming the key.
        for (key, bad) in [
            ("detector_name", json!("../x")),
            ("detector_type", json!("jungfrau")),
            ("n_modules", json!(0)),
            ("bit_depth", json!(12)),
            ("image_pixel_height", json!(0)),
            ("image_pixel_width", json!("1024")),
            ("start_udp_port", json!(65535)),
            ("module_positions", json!({"0": [0, 0, 1023, 511]})),
        ] {
            check(key, None, &Refuse("missing field"));
            check(key, Some(bad), &Refuse(""));
        }
        let cases: Vec<(&str, serde_json::Value, Want)> = vec![
            ("log_level", json!("warning"), Accept),
            ("log_level", json!("critical"), Accept),
            ("log_level", json!("verbose"), Refuse("not a log level")),
            ("stats_collection_period", json!(2.5), Accept),
            (
                "stats_collection_period",
                json!(0),
                Refuse("must be positive"),
            ),
            (
                "max_number_of_forwarders_spawned",
                json!(8),
                Warn("std-stream-send"),
            ),
            ("use_all_forwarders", json!(true), Warn("std-stream-send")),
            (
                "use_all_forwarders",
                json!("yes"),
                Refuse("expected a boolean"),
            ),
            (
                "sender_sends_full_images",
                json!(true),
                Warn("--connections"),
            ),
            (
                "gpfs_block_size",
                json!(16_777_216),
                Warn("one chunk per image"),
            ),
            ("module_sync_queue_size", json!(4096), Accept),
            ("number_of_writers", json!(0), Accept),
            ("number_of_writers", json!(1), Accept),
            ("number_of_writers", json!(14), Accept),
            ("number_of_writers", json!(65), Refuse("at most 64")),
            ("assembler_threads", json!(0), Accept),
            ("assembler_threads", json!(4), Accept),
            ("assembler_threads", json!(65), Refuse("at most 64")),
            ("ram_buffer_gb", json!(2), Accept),
            ("ram_buffer_gb", json!(-1), Refuse("zero or positive")),
            ("delay_filter_timeout", json!(10), Warn("std_gf_filter")),
            ("switch_user_active", json!(false), Accept),
            (
                "switch_user_active",
                json!(true),
                Refuse("writes files as the user it runs as"),
            ),
            (
                "live_stream_configs",
                json!({"tcp://0.0.0.0:9999": {"type": "periodic", "config": [1, 10]},
                       "tcp://0.0.0.0:9998": {"type": "batch", "config": [2, 100]},
                       "tcp://0.0.0.0:9997": {"type": "forward", "config": []}}),
                Accept,
            ),
            (
                "writer_user_id",
                json!(12345),
                Warn("the user std-h5-writer runs as"),
            ),
            (
                "submodule_info",
                json!({"0": {"hostname": "beb031", "submodule": 0, "port": 50020, "row": 0,
                             "column": 0, "activate": true}}),
                Warn("module_positions"),
            ),
            // std-daq extensions configured by the same rules.
            ("compression", json!("bitshuffle-lz4"), Accept),
            (
                "compression",
                json!("zstd"),
                Refuse("\"zstd\" is not one of"),
            ),
            ("metrics_base_address", json!("127.0.0.1:9100"), Accept),
            (
                "metrics_base_address",
                json!("localhost"),
                Refuse("not an address"),
            ),
            (
                "metrics_base_address",
                json!("127.0.0.1:65530"),
                Refuse("does not leave room"),
            ),
        ];
        for (key, value, want) in &cases {
            check(key, Some(value.clone()), want);
        }
        // What the accepted keys do.
        let c = check("log_level", Some(json!("warning")), &Accept).unwrap();
        assert_eq!(c.log_level, "warn");
        let c = check("log_level", Some(json!("critical")), &Accept).unwrap();
        assert_eq!(c.log_level, "error");
        let c = check("module_sync_queue_size", Some(json!(4096)), &Accept).unwrap();
        assert_eq!(c.module_sync_queue_size, 4096);
        let c = check("stats_collection_period", Some(json!(2.5)), &Accept).unwrap();
        assert_eq!(c.stats_collection_period, 2.5);
        let c = check("compression", Some(json!("bitshuffle-lz4")), &Accept).unwrap();
        assert_eq!(c.compression, ImageCompression::BitshuffleLz4);
        let c = DetectorConfig::from_json_str(TWO_MODULE_JF, "t.json").unwrap();
        assert_eq!(c.compression, ImageCompression::None);
        assert!(c.notices.is_empty() && c.live_streams.is_empty());
        assert_eq!(c.metrics_addr(MetricsService::Assembler), None);
    }

    /// `processing_trigger`: both modes with their defaults, and each kind of mistake refused
    /// naming the field and the file.
    #[test]
    fn processing_trigger_is_checked_and_names_the_field() {
        use serde_json::json;
        use Want::*;
        let c = check(
            "processing_trigger",
            Some(json!({"mode": "zocalo", "recipes": ["stddaq-test"]})),
            &Accept,
        )
        .unwrap();
        assert_eq!(
            c.processing_trigger,
            Some(ProcessingTrigger {
                mode: TriggerMode::Zocalo {
                    queue: "processing_recipe".into(),
                    recipes: vec!["stddaq-test".into()],
                },
                on_start: false,
                on_end: true,
                attempts: 3,
            })
        );
        let c = check(
            "processing_trigger",
            Some(json!({"mode": "topic", "events": ["start", "end"], "attempts": 1})),
            &Accept,
        )
        .unwrap();
        assert_eq!(
            c.processing_trigger,
            Some(ProcessingTrigger {
                mode: TriggerMode::Topic {
                    exchange: "amq.topic".into(),
                    routing_key: "gda.messages.scan".into(),
                },
                on_start: true,
                on_end: true,
                attempts: 1,
            })
        );
        let c = check("processing_trigger", Some(json!(null)), &Accept).unwrap();
        assert_eq!(c.processing_trigger, None);
        for (value, text) in [
            (json!("zocalo"), "`processing_trigger`: must be an object"),
            (
                json!({"recipes": ["r"]}),
                "`processing_trigger.mode`: must be",
            ),
            (json!({"mode": "kafka"}), "not \"kafka\""),
            (
                json!({"mode": "zocalo"}),
                "`processing_trigger.recipes`: mode zocalo needs a non-empty list",
            ),
            (json!({"mode": "zocalo", "recipes": []}), "non-empty list"),
            (json!({"mode": "zocalo", "recipes": [3]}), "not [3]"),
            (
                json!({"mode": "topic", "recipes": ["r"]}),
                "`processing_trigger.recipes`: unknown field for mode topic: it is for mode zocalo",
            ),
            (
                json!({"mode": "zocalo", "recipes": ["r"], "routing_key": "x"}),
                "it is for mode topic only",
            ),
            (
                json!({"mode": "topic", "event": ["end"]}),
                "`processing_trigger.event`: unknown field",
            ),
            (
                json!({"mode": "topic", "events": ["finish"]}),
                "\"finish\" is not an event",
            ),
            (json!({"mode": "topic", "events": []}), "non-empty list"),
            (json!({"mode": "topic", "attempts": 0}), "from 1 to 10"),
            (json!({"mode": "topic", "attempts": 11}), "from 1 to 10"),
            (json!({"mode": "topic", "exchange": ""}), "non-empty string"),
        ] {
            check("processing_trigger", Some(value), &Refuse(text));
        }
    }

    #[test]
    fn live_stream_configs_become_preview_streams_and_bad_entries_are_named() {
        use serde_json::json;
        use Want::*;
        let c = check(
            "live_stream_configs",
            Some(
                json!({"tcp://0.0.0.0:9999": {"type": "periodic", "config": [1, 10]},
                        "tcp://127.0.0.1:9998": {"type": "batch", "config": [2, 100]},
                        "tcp://0.0.0.0:9997": {"type": "forward"}}),
            ),
            &Accept,
        )
        .unwrap();
        let modes: Vec<(&str, String)> = c
            .live_streams
            .iter()
            .map(|s| (s.endpoint.as_str(), s.mode.preview_arg()))
            .collect();
        assert_eq!(
            modes,
            [
                ("tcp://0.0.0.0:9997", "forward".to_string()),
                ("tcp://0.0.0.0:9999", "periodic:1,10".to_string()),
                ("tcp://127.0.0.1:9998", "batch:2,100".to_string()),
            ]
        );
        // A forward stream's values are not used: said once.
        check(
            "live_stream_configs",
            Some(json!({"tcp://0.0.0.0:9997": {"type": "forward", "config": [1, 1]}})),
            &Warn("for type forward"),
        );
        for (entries, text) in [
            (json!([]), "must be an object"),
            (
                json!({"0.0.0.0:9999": {"type": "forward"}}),
                "tcp://host:port",
            ),
            (
                json!({"tcp://0.0.0.0:x": {"type": "forward"}}),
                "tcp://host:port",
            ),
            (
                json!({"tcp://h:1": {"type": "bsread", "config": [1, 1]}}),
                "\"bsread\" is not supported",
            ),
            (json!({"tcp://h:1": {"config": [1, 1]}}), "needs \"type\""),
            (
                json!({"tcp://h:1": {"type": "periodic", "config": [0, 10]}}),
                "[N images, F Hz]",
            ),
            (
                json!({"tcp://h:1": {"type": "periodic", "config": [1, 0]}}),
                "[N images, F Hz]",
            ),
            (
                json!({"tcp://h:1": {"type": "periodic", "config": [1, 1e-300]}}),
                "0.001 <= F",
            ),
            (json!({"tcp://h:1": {"type": "periodic"}}), "not nothing"),
            (
                json!({"tcp://h:1": {"type": "batch", "config": [5, 2]}}),
                "1 <= N <= M",
            ),
            (
                json!({"tcp://h:1": {"type": "batch", "config": [1.5, 2]}}),
                "whole numbers",
            ),
            (
                json!({"tcp://h:1": {"type": "batch", "config": [1, 2], "hwm": 3}}),
                "unknown field \"hwm\"",
            ),
        ] {
            let err = DetectorConfig::from_json_str(
                &with("live_stream_configs", entries.clone()),
                "/etc/std-daq/jf.json",
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("/etc/std-daq/jf.json")
                    && err.contains("`live_stream_configs")
                    && err.contains(text),
                "{entries}: {err}"
            );
        }
        let err = DetectorConfig::from_json_str(
            &with(
                "live_stream_configs",
                json!({"tcp://h:7": {"type": "bsread", "config": [1, 1]}}),
            ),
            "x.json",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`live_stream_configs.tcp://h:7`"), "{err}");
    }

    #[test]
    fn metrics_ports_follow_the_base_address() {
        let c = DetectorConfig::from_json_str(
            &with("metrics_base_address", "127.0.0.1:9100".into()),
            "m.json",
        )
        .unwrap();
        let port = |s| c.metrics_addr(s).unwrap().to_string();
        assert_eq!(port(MetricsService::Assembler), "127.0.0.1:9100");
        assert_eq!(port(MetricsService::Writer), "127.0.0.1:9101");
        assert_eq!(port(MetricsService::WriterAgent), "127.0.0.1:9102");
        assert_eq!(port(MetricsService::StreamSend), "127.0.0.1:9103");
        assert_eq!(port(MetricsService::StreamRecv), "127.0.0.1:9104");
        assert_eq!(port(MetricsService::Preview(0)), "127.0.0.1:9105");
        assert_eq!(port(MetricsService::Preview(4)), "127.0.0.1:9109");
        assert_eq!(port(MetricsService::Receiver(0)), "127.0.0.1:9110");
        assert_eq!(port(MetricsService::Receiver(1)), "127.0.0.1:9111");
        assert_eq!(port(MetricsService::OtherWriter(1)), "127.0.0.1:9366");
        assert_eq!(port(MetricsService::OtherWriter(3)), "127.0.0.1:9368");
        // The last receiver's port must fit: 65524 + 10 + 1 is the highest base for 2 modules.
        DetectorConfig::from_json_str(
            &with("metrics_base_address", "127.0.0.1:65524".into()),
            "m.json",
        )
        .unwrap();
        let err = DetectorConfig::from_json_str(
            &with("metrics_base_address", "127.0.0.1:65525".into()),
            "m.json",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`metrics_base_address`"), "{err}");
        // Five live streams have a metrics port each; a sixth has none and is refused.
        let streams = |n: u16| {
            let entries: serde_json::Map<String, serde_json::Value> = (0..n)
                .map(|i| {
                    (
                        format!("tcp://0.0.0.0:{}", 9990 + i),
                        serde_json::json!({"type": "forward"}),
                    )
                })
                .collect();
            let mut v: serde_json::Value =
                serde_json::from_str(&with("metrics_base_address", "127.0.0.1:9100".into()))
                    .unwrap();
            v["live_stream_configs"] = entries.into();
            v.to_string()
        };
        assert_eq!(
            DetectorConfig::from_json_str(&streams(5), "m.json")
                .unwrap()
                .live_streams
                .len(),
            5
        );
        let err = DetectorConfig::from_json_str(&streams(6), "m.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.json")
                && err.contains("`live_stream_configs`")
                && err.contains("at most 5"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_still_refused() {
        // A typo, std_daq's legacy (2022) names, and a key of another program.
        for key in [
            "n_module",
            "image_height",
            "image_width",
            "number_of_writer",
            "live_stream",
        ] {
            let err = DetectorConfig::from_json_str(&with(key, 1.into()), "/etc/std-daq/jf.json")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("/etc/std-daq/jf.json")
                    && err.contains(&format!("unknown field `{key}`")),
                "{err}"
            );
        }
    }

    #[test]
    fn file_errors_name_the_path() {
        let err = DetectorConfig::from_file(Path::new("/nonexistent/det.json")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/det.json"), "{err}");
    }
}
