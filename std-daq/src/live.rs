//! `GET /daq/live`: the latest image as an MJPEG stream (`multipart/x-mixed-replace`), as PSI's
//! std_daq server serves it; `GET /daq/live/frame`: the latest image as one JPEG (what the status
//! page polls, holding no viewer slot); and `GET /daq/live/stats`: what the viewers were sent and
//! skipped.
//!
//! One thread of the API follows the image stream (SUB on the assembler's image endpoint) and
//! keeps only the newest announced [`ImageMetadata`]; each viewer (its own HTTP thread) waits for
//! a newer one, no more often than its rate bound, copies that image out of the ImageBuffer with
//! the seqlock read into its own buffer (no lock is held across the copy; an image overwritten or
//! changed meanwhile is skipped and counted, never shown torn), scales it to 8-bit grey and sends
//! it as one JPEG part. A viewer that goes away ends its stream at the next write.
//!
//! The scaling rule (docs/api.md "Live view"), for each pixel value `v` (after binning):
//! `grey = clamp(round((v - min) * 255 / (max - min)), 0, 255)` computed in f64 (`round` = half
//! away from zero), NaN -> 0. Defaults by dtype: [`default_range`]. Binning by an integer factor
//! `b` (default: the smallest that brings the longer side to at most [`MAX_SIDE`]) averages the
//! raw values of each b x b block (edge blocks: the pixels that exist) before scaling.
//!
//! Never: hold a lock across a copy or an encode, block the assembler (SUB drops at its HWM), or
//! panic on what a client sends.

use image_buffer::{ReadError, RingReader};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use std_daq_common::{names, DetectorConfig, Dtype, ImageMetadata};

/// Frames per second of a stream without `?max_fps=` (and of `std-daq api --live-fps`).
pub const DEFAULT_FPS: f64 = 5.0;
/// The highest `max_fps` a viewer gets: a larger request is capped to it.
pub const MAX_FPS: f64 = 25.0;
/// JPEG quality without `?quality=`: high enough that a test can recompute the pixels.
pub const DEFAULT_QUALITY: u8 = 90;
/// Images with a longer side are binned (averaged) by default until it is at most this.
pub const MAX_SIDE: u32 = 2048;
/// The largest `?bin=` accepted.
pub const MAX_BIN: u32 = 64;
/// With no newer image for this long, a stream sends its last frame again (or the placeholder):
/// a viewer that went away is noticed, and a browser keeps its picture.
pub const KEEPALIVE: Duration = Duration::from_secs(2);
/// Viewers at once without `std-daq api --live-max-viewers`.
pub const DEFAULT_MAX_VIEWERS: usize = 8;
/// The multipart boundary.
pub const BOUNDARY: &str = "stddaqlive";
/// Side of the grey (level 128) placeholder sent before the first image, with `X-Image-Id: none`.
pub const PLACEHOLDER_SIDE: u16 = 16;

/// What `std-daq api` is started with for the live view.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    /// The detector (from `--config`); without it `/daq/live` answers 503.
    pub detector: Option<DetectorConfig>,
    /// Frames per second of a stream without `?max_fps=` (capped at [`MAX_FPS`]).
    pub fps: f64,
    pub max_viewers: usize,
}

impl Default for LiveSettings {
    fn default() -> Self {
        LiveSettings {
            detector: None,
            fps: DEFAULT_FPS,
            max_viewers: DEFAULT_MAX_VIEWERS,
        }
    }
}

/// The default `(min, max)` of the scaling, by image dtype:
/// uint8 `[0, 255]`, uint16 `[0, 65535]` (the full range); uint32 and uint64 (EIGER 32-bit)
/// `[0, 65535]` as uint16 (counts above show white: pass `max=` for more); float32 (JUNGFRAU
/// converted, keV-like) `[0, 100]`; int16 and int32 (JUNGFRAU photon counts) `[0, 10]` photons
/// (negative counts and the -32768 / -2147483648 "no value" marker show black).
pub fn default_range(dtype: Dtype) -> (f64, f64) {
    match dtype {
        Dtype::Uint8 => (0.0, 255.0),
        Dtype::Float32 => (0.0, 100.0),
        Dtype::Int16 | Dtype::Int32 => (0.0, 10.0),
        _ => (0.0, 65535.0),
    }
}

/// The scaling rule: `clamp(round((v - min) * 255 / (max - min)), 0, 255)`, NaN -> 0.
/// `max > min` (checked where the range is chosen).
pub fn to_grey(v: f64, min: f64, max: f64) -> u8 {
    if v.is_nan() {
        return 0;
    }
    // `as u8` saturates; the clamp documents it.
    ((v - min) * 255.0 / (max - min)).round().clamp(0.0, 255.0) as u8
}

/// The binning factor: `requested`, else the smallest `b` with `ceil(max(w, h) / b) <= MAX_SIDE`.
pub fn bin_factor(width: u32, height: u32, requested: Option<u32>) -> u32 {
    requested
        .unwrap_or_else(|| width.max(height).div_ceil(MAX_SIDE))
        .max(1)
}

/// An 8-bit grey image, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreyImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// One row of raw pixel bytes as f64 values.
fn row_values(bytes: &[u8], dtype: Dtype, out: &mut [f64]) {
    match dtype {
        Dtype::Uint8 => {
            for (o, b) in out.iter_mut().zip(bytes) {
                *o = f64::from(*b);
            }
        }
        Dtype::Uint16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f64::from(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        Dtype::Uint32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        Dtype::Float32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        Dtype::Int16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f64::from(i16::from_le_bytes([b[0], b[1]]));
            }
        }
        Dtype::Int32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        Dtype::Uint64 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                *o = u64::from_le_bytes(a) as f64;
            }
        }
        Dtype::Unknown => out.fill(f64::NAN),
    }
}

/// Scales (and bins by `bin`) raw little-endian pixels of `dtype` to 8-bit grey by the rule of
/// the module docs. Output size: `ceil(width / bin) x ceil(height / bin)`.
pub fn render(
    pixels: &[u8],
    dtype: Dtype,
    width: u32,
    height: u32,
    (min, max): (f64, f64),
    bin: u32,
) -> Result<GreyImage, String> {
    let bpp = dtype.bytes();
    if bpp == 0 {
        return Err("unknown pixel type".into());
    }
    if !min.is_finite() || !max.is_finite() || min >= max {
        return Err(format!("min {min} must be below max {max}"));
    }
    let (w, h, bin) = (width as usize, height as usize, bin.max(1) as usize);
    let row_bytes = w * bpp;
    if w == 0 || h == 0 || pixels.len() < row_bytes * h {
        return Err(format!(
            "{} bytes do not hold a {width}x{height} image of {bpp}-byte pixels",
            pixels.len()
        ));
    }
    let (ow, oh) = (w.div_ceil(bin), h.div_ceil(bin));
    let mut out = Vec::with_capacity(ow * oh);
    let mut values = vec![0.0; w];
    if bin == 1 {
        for row in pixels.chunks_exact(row_bytes).take(h) {
            row_values(row, dtype, &mut values);
            out.extend(values.iter().map(|&v| to_grey(v, min, max)));
        }
    } else {
        let mut sums = vec![0.0; ow];
        for band in 0..oh {
            sums.fill(0.0);
            let rows = (band * bin)..((band + 1) * bin).min(h);
            let n_rows = rows.len();
            for y in rows {
                row_values(
                    &pixels[y * row_bytes..(y + 1) * row_bytes],
                    dtype,
                    &mut values,
                );
                for (x, v) in values.iter().enumerate() {
                    sums[x / bin] += v;
                }
            }
            for (ox, sum) in sums.iter().enumerate() {
                let n_cols = bin.min(w - ox * bin);
                out.push(to_grey(sum / (n_rows * n_cols) as f64, min, max));
            }
        }
    }
    Ok(GreyImage {
        width: ow as u32,
        height: oh as u32,
        pixels: out,
    })
}

/// Encodes a grey image as a baseline JPEG.
pub fn encode_jpeg(img: &GreyImage, quality: u8) -> Result<Vec<u8>, String> {
    let (Ok(w), Ok(h)) = (u16::try_from(img.width), u16::try_from(img.height)) else {
        return Err(format!(
            "{}x{} is too large for JPEG",
            img.width, img.height
        ));
    };
    let mut out = Vec::with_capacity(img.pixels.len() / 4 + 1024);
    jpeg_encoder::Encoder::new(&mut out, quality.clamp(1, 100))
        .encode(&img.pixels, w, h, jpeg_encoder::ColorType::Luma)
        .map_err(|e| format!("encoding JPEG: {e}"))?;
    Ok(out)
}

/// The rate bound of one stream: consecutive frames go out at least `1 / fps` apart.
#[derive(Debug, Clone)]
pub struct RateBound {
    interval: Duration,
    next: Option<Instant>,
}

impl RateBound {
    /// `fps` is capped to `(0, MAX_FPS]` (a non-positive or NaN one is taken as MAX_FPS: callers
    /// validate first).
    pub fn new(fps: f64) -> Self {
        let fps = if fps > 0.0 { fps.min(MAX_FPS) } else { MAX_FPS };
        RateBound {
            interval: Duration::from_secs_f64(1.0 / fps),
            next: None,
        }
    }

    /// How long after `now` the next frame may go out (zero: now).
    pub fn wait(&self, now: Instant) -> Duration {
        self.next
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
    }

    /// A frame went out at `now`.
    pub fn sent(&mut self, now: Instant) {
        self.next = Some(now + self.interval);
    }
}

/// Images announced after the one numbered `last` and before the one numbered `now` (announce
/// counters): not shown because a newer one came first (the rate bound).
pub fn skipped_between(last: u64, now: u64) -> u64 {
    now.saturating_sub(last).saturating_sub(1)
}

/// A viewer's choices, from the query string.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewParams {
    /// Capped at [`MAX_FPS`].
    pub max_fps: f64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub bin: Option<u32>,
    pub quality: u8,
}

/// Parses `max_fps`, `min`, `max`, `bin`, `quality` (any other key is refused, naming them).
pub fn parse_query(query: &str, default_fps: f64) -> Result<ViewParams, String> {
    let mut p = ViewParams {
        max_fps: default_fps.min(MAX_FPS),
        min: None,
        max: None,
        bin: None,
        quality: DEFAULT_QUALITY,
    };
    for pair in query.split('&').filter(|s| !s.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = || -> Result<f64, String> {
            value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("{key}={value:?}: not a finite number"))
        };
        match key {
            "max_fps" => {
                let fps = number()?;
                if fps <= 0.0 {
                    return Err(format!("max_fps={value}: must be above 0"));
                }
                p.max_fps = fps.min(MAX_FPS);
            }
            "min" => p.min = Some(number()?),
            "max" => p.max = Some(number()?),
            "bin" => match value.parse::<u32>() {
                Ok(b) if (1..=MAX_BIN).contains(&b) => p.bin = Some(b),
                _ => return Err(format!("bin={value:?}: use an integer 1..={MAX_BIN}")),
            },
            "quality" => match value.parse::<u8>() {
                Ok(q) if (1..=100).contains(&q) => p.quality = q,
                _ => return Err(format!("quality={value:?}: use an integer 1..=100")),
            },
            _ => {
                return Err(format!(
                    "unknown parameter {key:?} (use max_fps, min, max, bin, quality)"
                ))
            }
        }
    }
    if let (Some(min), Some(max)) = (p.min, p.max) {
        if min >= max {
            return Err(format!("min={min} must be below max={max}"));
        }
    }
    Ok(p)
}

/// The scaling range for an image of `dtype` with the viewer's overrides.
fn range(dtype: Dtype, p: &ViewParams) -> Result<(f64, f64), String> {
    let (dmin, dmax) = default_range(dtype);
    let (min, max) = (p.min.unwrap_or(dmin), p.max.unwrap_or(dmax));
    if min >= max {
        return Err(format!(
            "min {min} must be below max {max} (the defaults for this image are {dmin}, {dmax})"
        ));
    }
    Ok((min, max))
}

/// Counters of a stream (and, summed, of all streams).
#[derive(Debug, Default)]
pub struct Counts {
    /// Frames of new images sent.
    pub frames_sent: AtomicU64,
    /// Keep-alive parts: the last frame (or the placeholder) sent again.
    pub frames_repeated: AtomicU64,
    /// Announced images not shown because a newer one came first (the rate bound).
    pub skipped_rate: AtomicU64,
    /// Reads that found the image's slot overwritten or changed while copying.
    pub skipped_overwritten: AtomicU64,
    /// Images not shown for another reason (no ImageBuffer attached, not present, compressed,
    /// unknown pixel type, inconsistent size, a range that is empty for its dtype).
    pub skipped_unreadable: AtomicU64,
}

impl Counts {
    fn json(&self) -> Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "frames_sent": g(&self.frames_sent),
            "frames_repeated": g(&self.frames_repeated),
            "skipped_rate": g(&self.skipped_rate),
            "skipped_overwritten": g(&self.skipped_overwritten),
            "skipped_unreadable": g(&self.skipped_unreadable),
        })
    }
}

#[derive(Debug)]
struct Viewer {
    id: u64,
    peer: String,
    since: f64,
    params: ViewParams,
    counts: Counts,
}

/// The newest announced image.
#[derive(Debug, Default, Clone, Copy)]
struct Latest {
    /// Images announced since the API started following the stream.
    seq: u64,
    meta: Option<ImageMetadata>,
}

/// Follows the image stream: the newest image and the attached ImageBuffer.
#[derive(Debug, Default)]
struct Source {
    latest: Mutex<Latest>,
    changed: Condvar,
    ring: Mutex<Option<Arc<RingReader<ImageMetadata>>>>,
    error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Source {
    fn current(&self) -> Latest {
        *lock(&self.latest)
    }

    /// The newest image once one newer than announce number `seq` is there, or None after
    /// `timeout`.
    fn wait_newer(&self, seq: u64, timeout: Duration) -> Option<Latest> {
        let guard = lock(&self.latest);
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |l| l.seq <= seq)
            .unwrap_or_else(|e| e.into_inner());
        (guard.seq > seq).then_some(*guard)
    }

    fn ring(&self) -> Option<Arc<RingReader<ImageMetadata>>> {
        lock(&self.ring).clone()
    }

    /// Runs forever on its own thread.
    fn follow(&self, cfg: &DetectorConfig) {
        loop {
            if let Err(e) = self.follow_once(cfg) {
                tracing::warn!("live view: following the image stream: {e:#}");
                *lock(&self.error) = Some(format!("{e:#}"));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn follow_once(&self, cfg: &DetectorConfig) -> anyhow::Result<()> {
        let ctx = zmq::Context::new();
        let sub = ctx.socket(zmq::SUB)?;
        sub.set_subscribe(b"")?;
        sub.set_rcvtimeo(250)?;
        sub.set_linger(0)?;
        sub.connect(&names::image_endpoint(cfg))?;
        *lock(&self.error) = None;
        let ring_name = names::image_buffer_name(&cfg.detector_name);
        let mut checked: Option<Instant> = None;
        let mut msg = [0u8; std_daq_common::messages::RECV_BUFFER_BYTES];
        loop {
            if checked.is_none_or(|t| t.elapsed() >= Duration::from_millis(500)) {
                checked = Some(Instant::now());
                self.keep_ring_attached(&ring_name);
            }
            let n = match sub.recv_into(&mut msg, 0) {
                Ok(n) => n,
                Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let Ok(meta) = ImageMetadata::from_bytes(&msg[..n.min(msg.len())]) else {
                continue; // heartbeat
            };
            {
                let mut latest = lock(&self.latest);
                latest.seq += 1;
                latest.meta = Some(meta);
            }
            self.changed.notify_all();
        }
    }

    /// Attaches the ImageBuffer when it is not (yet) or its owner replaced it.
    fn keep_ring_attached(&self, name: &str) {
        let current = self.ring();
        if current.as_ref().is_some_and(|r| !r.is_replaced()) {
            return;
        }
        let fresh = RingReader::attach(name, image_buffer::Expect::default()).ok();
        if fresh.is_some() {
            tracing::info!(buffer = name, "live view: attached the ImageBuffer");
        }
        *lock(&self.ring) = fresh.map(Arc::new);
    }
}

/// Why an image was not shown.
enum Skip {
    Overwritten,
    Unreadable(String),
}

type CacheKey = (u64, u64, u64, u32, u8);

/// The live view of one `std-daq api`.
#[derive(Debug)]
pub struct Live {
    settings: LiveSettings,
    source: OnceLock<Arc<Source>>,
    viewers: Mutex<Vec<Arc<Viewer>>>,
    next_viewer: AtomicU64,
    active: AtomicUsize,
    totals: Counts,
    frames_encoded: AtomicU64,
    /// Single JPEGs answered by `/daq/live/frame` (the placeholder included).
    snapshots_sent: AtomicU64,
    /// `/daq/live/frame` requests whose image was overwritten while copied (answered 503).
    snapshots_overwritten: AtomicU64,
    /// The last few encoded parts, so viewers with the same parameters share one encode.
    cache: Mutex<VecDeque<(CacheKey, Arc<Vec<u8>>)>>,
}

/// Removes a viewer from the list when its stream ends, however it ends.
struct Registered<'a> {
    live: &'a Live,
    viewer: Arc<Viewer>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(&self.live.viewers).retain(|v| v.id != self.viewer.id);
        self.live.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn part(image_id: Option<u64>, status: u16, scale: &str, jpeg: &[u8]) -> Vec<u8> {
    let id = image_id.map_or("none".to_string(), |i| i.to_string());
    let mut p = format!(
        "--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nX-Image-Id: {id}\r\n\
         X-Image-Status: {status}\r\n{scale}\r\n",
        jpeg.len()
    )
    .into_bytes();
    p.extend_from_slice(jpeg);
    p.extend_from_slice(b"\r\n");
    p
}

/// A part's `X-*` headers and its JPEG (the inverse of [`part`]).
fn split_part(part: &[u8]) -> (Vec<(&str, &str)>, &[u8]) {
    let Some(end) = part.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (Vec::new(), &[]);
    };
    let head = std::str::from_utf8(&part[..end]).unwrap_or_default();
    let headers = head
        .split("\r\n")
        .filter_map(|line| line.split_once(": "))
        .filter(|(k, _)| k.starts_with("X-"))
        .collect();
    let body = &part[end + 4..part.len().saturating_sub(2).max(end + 4)];
    (headers, body)
}

fn placeholder() -> Arc<Vec<u8>> {
    static P: OnceLock<Arc<Vec<u8>>> = OnceLock::new();
    P.get_or_init(|| {
        let side = u32::from(PLACEHOLDER_SIDE);
        let img = GreyImage {
            width: side,
            height: side,
            pixels: vec![128; (side * side) as usize],
        };
        Arc::new(part(
            None,
            0,
            "",
            &encode_jpeg(&img, 75).unwrap_or_default(),
        ))
    })
    .clone()
}

fn json_reply(code: u16, v: &Value) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let mut r = tiny_http::Response::from_data(v.to_string().into_bytes()).with_status_code(code);
    if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", "application/json") {
        r.add_header(h);
    }
    r
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Live {
    pub fn new(settings: LiveSettings) -> Self {
        Live {
            settings,
            source: OnceLock::new(),
            viewers: Mutex::new(Vec::new()),
            next_viewer: AtomicU64::new(1),
            active: AtomicUsize::new(0),
            totals: Counts::default(),
            frames_encoded: AtomicU64::new(0),
            snapshots_sent: AtomicU64::new(0),
            snapshots_overwritten: AtomicU64::new(0),
            cache: Mutex::new(VecDeque::new()),
        }
    }

    /// Answers `GET /daq/live`, `GET /daq/live/frame` and `GET /daq/live/stats`; None for any
    /// other request (the request is handed back).
    pub fn route(
        &self,
        request: tiny_http::Request,
        path: &str,
        query: &str,
    ) -> Option<tiny_http::Request> {
        if *request.method() != tiny_http::Method::Get {
            return Some(request);
        }
        let result = match path {
            "/daq/live" => self.stream(request, query),
            "/daq/live/frame" => self.snapshot(request, query),
            "/daq/live/stats" => request.respond(json_reply(200, &self.stats())),
            _ => return Some(request),
        };
        if let Err(e) = result {
            tracing::debug!("live view: a viewer's connection ended: {e}");
        }
        None
    }

    /// Everything `/daq/live/stats` shows.
    pub fn stats(&self) -> Value {
        let latest = self.source.get().map(|s| s.current()).unwrap_or_default();
        let source = self.source.get();
        let mut v = self.totals.json();
        let viewers: Vec<Value> = lock(&self.viewers)
            .iter()
            .map(|w| {
                let mut j = w.counts.json();
                j["id"] = json!(w.id);
                j["peer"] = json!(w.peer);
                j["since"] = json!(w.since);
                j["max_fps"] = json!(w.params.max_fps);
                j["min"] = json!(w.params.min);
                j["max"] = json!(w.params.max);
                j["bin"] = json!(w.params.bin);
                j["quality"] = json!(w.params.quality);
                j
            })
            .collect();
        v["frames_encoded"] = json!(self.frames_encoded.load(Ordering::Relaxed));
        v["snapshots_sent"] = json!(self.snapshots_sent.load(Ordering::Relaxed));
        v["snapshots_overwritten"] = json!(self.snapshots_overwritten.load(Ordering::Relaxed));
        v["viewers_active"] = json!(self.active.load(Ordering::Relaxed));
        v["viewers_total"] = json!(self.next_viewer.load(Ordering::Relaxed) - 1);
        v["max_viewers"] = json!(self.settings.max_viewers);
        v["following"] = json!(source.is_some());
        v["images_announced"] = json!(latest.seq);
        v["latest_image_id"] = json!(latest.meta.map(|m| m.image_id));
        v["buffer_attached"] = json!(source.is_some_and(|s| s.ring().is_some()));
        v["source_error"] = json!(source.and_then(|s| lock(&s.error).clone()));
        v["defaults"] = json!({
            "max_fps": self.settings.fps.min(MAX_FPS), "max_fps_cap": MAX_FPS,
            "quality": DEFAULT_QUALITY, "max_side": MAX_SIDE,
            "keepalive_seconds": KEEPALIVE.as_secs_f64(),
        });
        v["viewers"] = json!(viewers);
        v
    }

    fn source(&self, cfg: &DetectorConfig) -> Arc<Source> {
        self.source
            .get_or_init(|| {
                let source = Arc::new(Source::default());
                let (s, cfg) = (Arc::clone(&source), cfg.clone());
                std::thread::Builder::new()
                    .name("live-source".into())
                    .spawn(move || s.follow(&cfg))
                    .map_err(|e| tracing::error!("live view: cannot start its thread: {e}"))
                    .ok();
                source
            })
            .clone()
    }

    /// The detector and the viewer's parameters, or the refusal (HTTP code, reason).
    fn view(&self, query: &str) -> Result<(&DetectorConfig, ViewParams), (u16, String)> {
        let cfg = self.settings.detector.as_ref().ok_or((
            503,
            "std-daq api was started without --config: no live view".to_string(),
        ))?;
        let params = parse_query(query, self.settings.fps).map_err(|e| (400, e))?;
        Ok((cfg, params))
    }

    fn stream(&self, request: tiny_http::Request, query: &str) -> std::io::Result<()> {
        let (cfg, params) = match self.view(query) {
            Ok(v) => v,
            Err((code, e)) => return request.respond(json_reply(code, &json!({ "error": e }))),
        };
        if self.active.fetch_add(1, Ordering::Relaxed) >= self.settings.max_viewers {
            self.active.fetch_sub(1, Ordering::Relaxed);
            return request.respond(json_reply(
                503,
                &json!({"error": format!("{} viewers already (--live-max-viewers)", self.settings.max_viewers)}),
            ));
        }
        let viewer = Arc::new(Viewer {
            id: self.next_viewer.fetch_add(1, Ordering::Relaxed),
            peer: request
                .remote_addr()
                .map_or(String::new(), |a| a.to_string()),
            since: unix_now(),
            params,
            counts: Counts::default(),
        });
        lock(&self.viewers).push(Arc::clone(&viewer));
        let _registered = Registered {
            live: self,
            viewer: Arc::clone(&viewer),
        };
        let source = self.source(cfg);
        let mut out = request.into_writer();
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary={BOUNDARY}\r\n\
             Cache-Control: no-cache, no-store\r\nPragma: no-cache\r\nConnection: close\r\n\
             X-Max-Fps: {}\r\n\r\n",
            params.max_fps
        )?;
        out.flush()?;
        self.frames(&source, &viewer, &mut out)
    }

    /// `GET /daq/live/frame`: the newest image as one JPEG with the part's `X-*` headers (the
    /// placeholder, `X-Image-Id: none`, before the first image). Takes the stream's parameters
    /// (`max_fps` has no effect); an image overwritten while copied is answered 503 (ask again).
    fn snapshot(&self, request: tiny_http::Request, query: &str) -> std::io::Result<()> {
        let (cfg, params) = match self.view(query) {
            Ok(v) => v,
            Err((code, e)) => return request.respond(json_reply(code, &json!({ "error": e }))),
        };
        let source = self.source(cfg);
        let part = match source.current().meta {
            None => placeholder(),
            Some(meta) => match self.frame(&source, &meta, &params, &mut Vec::new()) {
                Ok(p) => p,
                Err(Skip::Overwritten) => {
                    self.snapshots_overwritten.fetch_add(1, Ordering::Relaxed);
                    return request.respond(json_reply(
                        503,
                        &json!({"error": format!("image {} was overwritten while it was copied; ask again", meta.image_id)}),
                    ));
                }
                Err(Skip::Unreadable(why)) => return request.respond(json_reply(
                    503,
                    &json!({"error": format!("image {} cannot be shown: {why}", meta.image_id)}),
                )),
            },
        };
        let (headers, jpeg) = split_part(&part);
        let mut r = tiny_http::Response::from_data(jpeg.to_vec());
        for (k, v) in headers.iter().copied().chain([
            ("Content-Type", "image/jpeg"),
            ("Cache-Control", "no-store"),
        ]) {
            if let Ok(h) = tiny_http::Header::from_bytes(k, v) {
                r.add_header(h);
            }
        }
        self.snapshots_sent.fetch_add(1, Ordering::Relaxed);
        request.respond(r)
    }

    fn add(&self, viewer: &Viewer, f: impl Fn(&Counts) -> &AtomicU64, n: u64) {
        f(&viewer.counts).fetch_add(n, Ordering::Relaxed);
        f(&self.totals).fetch_add(n, Ordering::Relaxed);
    }

    /// Sends frames until a write fails (the viewer went away).
    fn frames(&self, source: &Source, viewer: &Viewer, out: &mut dyn Write) -> std::io::Result<()> {
        let params = viewer.params;
        let mut bound = RateBound::new(params.max_fps);
        let now = source.current();
        // The newest image so far is shown at once.
        let mut last_seq = if now.meta.is_some() {
            now.seq - 1
        } else {
            out.write_all(&placeholder())?;
            out.flush()?;
            now.seq
        };
        let mut last_part: Option<Arc<Vec<u8>>> = None;
        let mut buffer = Vec::new();
        loop {
            let wait = bound.wait(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            let Some(latest) = source.wait_newer(last_seq, KEEPALIVE) else {
                let again = last_part.clone().unwrap_or_else(placeholder);
                out.write_all(&again)?;
                out.flush()?;
                self.add(viewer, |c| &c.frames_repeated, 1);
                continue;
            };
            self.add(
                viewer,
                |c| &c.skipped_rate,
                skipped_between(last_seq, latest.seq),
            );
            last_seq = latest.seq;
            let Some(meta) = latest.meta else { continue };
            match self.frame(source, &meta, &params, &mut buffer) {
                Ok(p) => {
                    out.write_all(&p)?;
                    out.flush()?;
                    bound.sent(Instant::now());
                    self.add(viewer, |c| &c.frames_sent, 1);
                    last_part = Some(p);
                }
                Err(Skip::Overwritten) => self.add(viewer, |c| &c.skipped_overwritten, 1),
                Err(Skip::Unreadable(why)) => {
                    tracing::debug!(image_id = meta.image_id, "live view: not shown: {why}");
                    self.add(viewer, |c| &c.skipped_unreadable, 1);
                }
            }
        }
    }

    /// The part showing image `meta` (from the cache, or copied, scaled and encoded).
    fn frame(
        &self,
        source: &Source,
        meta: &ImageMetadata,
        p: &ViewParams,
        buffer: &mut Vec<u8>,
    ) -> Result<Arc<Vec<u8>>, Skip> {
        let dtype = meta.dtype();
        let (min, max) = range(dtype, p).map_err(Skip::Unreadable)?;
        let bin = bin_factor(meta.width, meta.height, p.bin);
        let key = (meta.image_id, min.to_bits(), max.to_bits(), bin, p.quality);
        if let Some((_, hit)) = lock(&self.cache).iter().find(|(k, _)| *k == key) {
            return Ok(Arc::clone(hit));
        }
        if meta.compression != 0 {
            return Err(Skip::Unreadable("compressed in the ImageBuffer".into()));
        }
        let ring = source
            .ring()
            .ok_or_else(|| Skip::Unreadable("the ImageBuffer is not attached".into()))?;
        let bytes = meta.width as usize * meta.height as usize * dtype.bytes();
        if bytes == 0 || bytes as u64 > ring.slot_bytes() || bytes as u64 > meta.data_bytes {
            return Err(Skip::Unreadable(format!(
                "{}x{} {dtype:?} does not fit its slot",
                meta.width, meta.height
            )));
        }
        buffer.resize(bytes, 0);
        // The seqlock read into this viewer's own buffer: no lock, and a torn copy is an error.
        match ring.copy_out(meta.image_id, buffer) {
            Ok(_) => {}
            Err(ReadError::Overwritten { .. } | ReadError::Torn) => return Err(Skip::Overwritten),
            Err(e) => return Err(Skip::Unreadable(e.to_string())),
        }
        let img = render(buffer, dtype, meta.width, meta.height, (min, max), bin)
            .map_err(Skip::Unreadable)?;
        let jpeg = encode_jpeg(&img, p.quality).map_err(Skip::Unreadable)?;
        self.frames_encoded.fetch_add(1, Ordering::Relaxed);
        let scale = format!(
            "X-Scale-Min: {min}\r\nX-Scale-Max: {max}\r\nX-Bin: {bin}\r\nX-Image-Width: {}\r\n\
             X-Image-Height: {}\r\n",
            meta.width, meta.height
        );
        let part = Arc::new(part(Some(meta.image_id), meta.status, &scale, &jpeg));
        let mut cache = lock(&self.cache);
        if cache.len() >= 4 {
            cache.pop_front();
        }
        cache.push_back((key, Arc::clone(&part)));
        Ok(part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scaling_rule_clips_and_rounds() {
        assert_eq!(to_grey(0.0, 0.0, 65535.0), 0);
        assert_eq!(to_grey(65535.0, 0.0, 65535.0), 255);
        // 128.4 rounds down, 128.6 up (v = 257 * level exactly maps to level).
        assert_eq!(to_grey(257.0 * 128.0, 0.0, 65535.0), 128);
        assert_eq!(to_grey(100.0, 100.0, 200.0), 0);
        assert_eq!(to_grey(150.0, 100.0, 200.0), 128); // 127.5 rounds away from zero
        assert_eq!(to_grey(149.0, 100.0, 200.0), 125); // 124.95
                                                       // Clipping on both sides.
        assert_eq!(to_grey(50.0, 100.0, 200.0), 0);
        assert_eq!(to_grey(1e9, 100.0, 200.0), 255);
        assert_eq!(to_grey(-3.0, 0.0, 100.0), 0);
        // float32: NaN black, infinities clip.
        assert_eq!(to_grey(f64::NAN, 0.0, 100.0), 0);
        assert_eq!(to_grey(f64::INFINITY, 0.0, 100.0), 255);
        assert_eq!(to_grey(f64::NEG_INFINITY, 0.0, 100.0), 0);
        assert_eq!(default_range(Dtype::Uint8), (0.0, 255.0));
        assert_eq!(default_range(Dtype::Uint16), (0.0, 65535.0));
        assert_eq!(default_range(Dtype::Uint32), (0.0, 65535.0));
        assert_eq!(default_range(Dtype::Float32), (0.0, 100.0));
        assert_eq!(default_range(Dtype::Int16), (0.0, 10.0));
        assert_eq!(default_range(Dtype::Int32), (0.0, 10.0));
    }

    #[test]
    fn render_scales_each_dtype_and_bins() {
        let u16s: Vec<u8> = [0u16, 257, 65535, 30000]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let img = render(&u16s, Dtype::Uint16, 2, 2, (0.0, 65535.0), 1).unwrap();
        assert_eq!((img.width, img.height), (2, 2));
        assert_eq!(img.pixels, [0, 1, 255, 117]); // 30000/257 = 116.7
                                                  // float32 converted images: [0, 100] by default, NaN black, negatives clipped.
        let f32s: Vec<u8> = [50.0f32, f32::NAN, -7.0, 250.0, 10.0, 99.9]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let img = render(
            &f32s,
            Dtype::Float32,
            3,
            2,
            default_range(Dtype::Float32),
            1,
        )
        .unwrap();
        assert_eq!(img.pixels, [128, 0, 0, 255, 26, 255]);
        // Photon counts: [0, 10] photons by default; negatives and the -32768 marker black.
        let i16s: Vec<u8> = [5i16, i16::MIN, 10, 3, -2, 32767]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let img = render(&i16s, Dtype::Int16, 3, 2, default_range(Dtype::Int16), 1).unwrap();
        assert_eq!(img.pixels, [128, 0, 255, 77, 0, 255]);
        let i32s: Vec<u8> = [1i32, i32::MIN, 100_000]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let img = render(&i32s, Dtype::Int32, 3, 1, default_range(Dtype::Int32), 1).unwrap();
        assert_eq!(img.pixels, [26, 0, 255]);
        // EIGER 32-bit: above 65535 white by default; a wider max shows them.
        let u32s: Vec<u8> = [70000u32, 1000]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let img = render(&u32s, Dtype::Uint32, 2, 1, default_range(Dtype::Uint32), 1).unwrap();
        assert_eq!(img.pixels, [255, 4]);
        let img = render(&u32s, Dtype::Uint32, 2, 1, (0.0, 140000.0), 1).unwrap();
        assert_eq!(img.pixels, [128, 2]);
        // Binning by 2 of a 3x3 uint8 image: blocks 2x2, 1x2, 2x1, 1x1, averaged then scaled.
        let u8s = [10u8, 20, 30, 40, 50, 60, 70, 80, 90];
        let img = render(&u8s, Dtype::Uint8, 3, 3, (0.0, 255.0), 2).unwrap();
        assert_eq!((img.width, img.height), (2, 2));
        assert_eq!(img.pixels, [30, 45, 75, 90]);
        // Refused: empty range, too few bytes, unknown dtype.
        assert!(render(&u8s, Dtype::Uint8, 3, 3, (5.0, 5.0), 1).is_err());
        assert!(render(&u8s, Dtype::Uint8, 4, 3, (0.0, 255.0), 1).is_err());
        assert!(render(&u8s, Dtype::Unknown, 3, 3, (0.0, 255.0), 1).is_err());
        assert_eq!(bin_factor(1024, 1024, None), 1);
        assert_eq!(bin_factor(2048, 100, None), 1);
        assert_eq!(bin_factor(4150, 4371, None), 3);
        assert_eq!(bin_factor(4150, 4371, Some(1)), 1);
    }

    #[test]
    fn the_rate_bound_spaces_frames_by_an_injected_clock() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut bound = RateBound::new(5.0);
        assert_eq!(
            bound.wait(t0),
            Duration::ZERO,
            "the first frame goes at once"
        );
        bound.sent(t0);
        assert_eq!(bound.wait(t0), ms(200));
        assert_eq!(bound.wait(t0 + ms(150)), ms(50));
        assert_eq!(bound.wait(t0 + ms(200)), Duration::ZERO);
        // Late: the next interval counts from when the frame went, no catching up in a burst.
        bound.sent(t0 + ms(500));
        assert_eq!(bound.wait(t0 + ms(500)), ms(200));
        // Capped at MAX_FPS.
        let mut fast = RateBound::new(1000.0);
        fast.sent(t0);
        assert_eq!(fast.wait(t0), ms(40));
        // Skips: images announced between two shown ones.
        assert_eq!(skipped_between(3, 4), 0);
        assert_eq!(skipped_between(3, 10), 6);
        assert_eq!(skipped_between(5, 5), 0);
    }

    #[test]
    fn queries_parse_with_caps_and_clear_refusals() {
        let p = parse_query("", DEFAULT_FPS).unwrap();
        assert_eq!(p.max_fps, DEFAULT_FPS);
        assert_eq!(p.quality, DEFAULT_QUALITY);
        let p = parse_query("max_fps=100&min=-5&max=1e3&bin=2&quality=95", DEFAULT_FPS).unwrap();
        assert_eq!(
            (p.max_fps, p.min, p.max, p.bin, p.quality),
            (MAX_FPS, Some(-5.0), Some(1000.0), Some(2), 95)
        );
        for bad in [
            "max_fps=0",
            "max_fps=-1",
            "max_fps=x",
            "min=nan",
            "max=inf",
            "min=5&max=5",
            "bin=0",
            "bin=1000",
            "quality=0",
            "quality=101",
            "fps=3",
        ] {
            assert!(parse_query(bad, DEFAULT_FPS).is_err(), "{bad}");
        }
        // A max below the dtype's default min (or a min above its default max) is refused per
        // image, with the defaults in the message.
        let p = parse_query("max=-1", DEFAULT_FPS).unwrap();
        assert!(range(Dtype::Uint16, &p).unwrap_err().contains("defaults"));
    }

    #[test]
    fn a_jpeg_is_encoded_and_the_placeholder_is_a_part() {
        let img = GreyImage {
            width: 64,
            height: 32,
            pixels: (0..64 * 32).map(|i| (i % 256) as u8).collect(),
        };
        let jpeg = encode_jpeg(&img, 90).unwrap();
        assert_eq!(&jpeg[..2], [0xFF, 0xD8]);
        let p = placeholder();
        let text = String::from_utf8_lossy(&p);
        assert!(text.starts_with(&format!("--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n")));
        assert!(text.contains("X-Image-Id: none\r\n"));
    }

    #[test]
    fn a_part_splits_back_into_its_headers_and_jpeg() {
        // A body holding CRLF CRLF itself: only the first one ends the headers.
        let body = b"\xFF\xD8\r\n\r\nxyz\xFF\xD9";
        let p = part(Some(7), 2, "X-Bin: 1\r\n", body);
        let (headers, jpeg) = split_part(&p);
        assert_eq!(jpeg, body);
        assert_eq!(
            headers,
            [("X-Image-Id", "7"), ("X-Image-Status", "2"), ("X-Bin", "1")]
        );
        assert_eq!(split_part(b"no headers"), (Vec::new(), &b""[..]));
    }
}
