//! `std-daq preview`: the live preview stream. Follows the image stream, picks images by mode and
//! publishes each on a ZMQ PUB socket in std_daq's array-1.0 format: a JSON header
//! `{"htype":"array-1.0","shape":[h,w],"type":"uint16","frame":id,"status":s}` and the pixels.
//!
//! Modes (std_daq's): `forward` (every image), `periodic:N,HZ` (N consecutive images, HZ times a
//! second), `batch:N,M` (the first N of every M images).
//!
//! Never slows the data path: it is its own process reading shared memory, it copies an image out
//! and checks it was intact before sending (an image overwritten meanwhile is skipped and
//! counted), and PUB never blocks (a viewer slower than its high-water mark loses frames, which
//! ZMQ does not report to the sender).

use anyhow::{bail, Context, Result};
use image_buffer::RingReader;
use std::str::FromStr;
use std::time::{Duration, Instant};
use std_daq_common::service::Shutdown;
use std_daq_common::status::StatusBoard;
use std_daq_common::{Dtype, ImageMetadata};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Forward,
    Periodic { n: u32, hz: f64 },
    Batch { n: u32, every: u32 },
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("mode {s:?}: use forward, periodic:N,HZ or batch:N,M");
        if s == "forward" {
            return Ok(Mode::Forward);
        }
        let (kind, args) = s.split_once(':').ok_or_else(bad)?;
        let (a, b) = args.split_once(',').ok_or_else(bad)?;
        let n: u32 = a.trim().parse().map_err(|_| bad())?;
        match kind {
            "periodic" => {
                let hz: f64 = b.trim().parse().map_err(|_| bad())?;
                // Bounded so that the period (1/HZ) is a valid Duration.
                if n == 0 || !(0.001..=1e6).contains(&hz) {
                    return Err(bad());
                }
                Ok(Mode::Periodic { n, hz })
            }
            "batch" => {
                let every: u32 = b.trim().parse().map_err(|_| bad())?;
                if n == 0 || every < n {
                    return Err(bad());
                }
                Ok(Mode::Batch { n, every })
            }
            _ => Err(bad()),
        }
    }
}

/// Decides image by image whether the mode sends it.
#[derive(Debug)]
pub struct Picker {
    mode: Mode,
    seen: u64,
    period_start: Option<Instant>,
    sent_in_period: u32,
}

impl Picker {
    pub fn new(mode: Mode) -> Self {
        Picker {
            mode,
            seen: 0,
            period_start: None,
            sent_in_period: 0,
        }
    }

    pub fn take(&mut self, now: Instant) -> bool {
        let index = self.seen;
        self.seen += 1;
        match self.mode {
            Mode::Forward => true,
            Mode::Batch { n, every } => index % u64::from(every) < u64::from(n),
            Mode::Periodic { n, hz } => {
                let period = Duration::from_secs_f64(1.0 / hz);
                if self
                    .period_start
                    .is_none_or(|t| now.duration_since(t) >= period)
                {
                    self.period_start = Some(now);
                    self.sent_in_period = 0;
                }
                let take = self.sent_in_period < n;
                self.sent_in_period += u32::from(take);
                take
            }
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct PreviewStats {
    pub images_seen: u64,
    pub images_sent: u64,
    /// Overwritten in the ImageBuffer before the preview could copy them.
    pub images_lost: u64,
}

fn type_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Uint8 => "uint8",
        Dtype::Uint16 => "uint16",
        Dtype::Uint32 => "uint32",
        Dtype::Uint64 => "uint64",
        Dtype::Int16 => "int16",
        Dtype::Int32 => "int32",
        Dtype::Float32 => "float32",
        Dtype::Unknown => "unknown",
    }
}

/// Follows `images` (SUB on the image stream) until shutdown; publishes picked images on
/// `publisher`. `publisher` may be an XPUB: viewers' subscriptions are then logged.
/// The counters are shown on `board` (status hash, metrics) about once a second.
pub fn run(
    ring: &RingReader<ImageMetadata>,
    images: &zmq::Socket,
    publisher: &zmq::Socket,
    mode: Mode,
    board: &StatusBoard,
    shutdown: &Shutdown,
) -> Result<PreviewStats> {
    let mut picker = Picker::new(mode);
    let mut stats = PreviewStats::default();
    let mut shown = Instant::now();
    stats.show(board);
    let mut msg = [0u8; std_daq_common::messages::RECV_BUFFER_BYTES];
    let mut data = vec![0u8; ring.slot_bytes() as usize];
    while !shutdown.is_triggered() {
        if shown.elapsed() >= Duration::from_secs(1) {
            stats.show(board);
            shown = Instant::now();
        }
        let (image_ready, subscription) = {
            let mut items = [
                images.as_poll_item(zmq::POLLIN),
                publisher.as_poll_item(zmq::POLLIN),
            ];
            match zmq::poll(&mut items, 100) {
                Ok(_) | Err(zmq::Error::EINTR) => {}
                Err(e) => return Err(e).context("polling"),
            }
            (items[0].is_readable(), items[1].is_readable())
        };
        if subscription {
            if let Ok(sub) = publisher.recv_bytes(zmq::DONTWAIT) {
                if sub.first() == Some(&1) {
                    tracing::info!("a viewer subscribed");
                }
            }
        }
        if !image_ready {
            continue;
        }
        let n = match images.recv_into(&mut msg, zmq::DONTWAIT) {
            Ok(n) => n,
            Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => continue,
            Err(e) => return Err(e).context("receiving image metadata"),
        };
        let Ok(meta) = ImageMetadata::from_bytes(&msg[..n.min(msg.len())]) else {
            continue; // heartbeat or not ours
        };
        stats.images_seen += 1;
        if !picker.take(Instant::now()) {
            continue;
        }
        let bytes = (meta.data_bytes as usize).min(data.len());
        if ring.copy_out(meta.image_id, &mut data[..bytes]).is_err() {
            stats.images_lost += 1;
            continue;
        }
        let header = serde_json::json!({
            "htype": "array-1.0",
            "shape": [meta.height, meta.width],
            "type": type_name(meta.dtype()),
            "frame": meta.image_id,
            "status": meta.status,
        })
        .to_string();
        publisher.send(header.as_bytes(), zmq::SNDMORE | zmq::DONTWAIT)?;
        publisher.send(&data[..bytes], zmq::DONTWAIT)?;
        stats.images_sent += 1;
    }
    stats.show(board);
    Ok(stats)
}

impl PreviewStats {
    fn show(&self, board: &StatusBoard) {
        board.set("images_seen", self.images_seen);
        board.set("images_sent", self.images_sent);
        board.set("images_lost", self.images_lost);
    }
}

/// Checks the bind address early with a clear message.
pub fn check_endpoint(endpoint: &str) -> Result<()> {
    if !endpoint.starts_with("tcp://") && !endpoint.starts_with("ipc://") {
        bail!("--bind {endpoint:?}: use tcp://host:port or ipc:///path");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_pick() {
        assert_eq!("forward".parse::<Mode>(), Ok(Mode::Forward));
        assert_eq!(
            "batch:2,5".parse::<Mode>(),
            Ok(Mode::Batch { n: 2, every: 5 })
        );
        assert_eq!(
            "periodic:3,1.5".parse::<Mode>(),
            Ok(Mode::Periodic { n: 3, hz: 1.5 })
        );
        for bad in [
            "",
            "batch:5,2",
            "batch:0,3",
            "periodic:1,0",
            "periodic:1,1e-300",
            "every:1,2",
            "batch:1",
        ] {
            assert!(bad.parse::<Mode>().is_err(), "{bad}");
        }
        let t = Instant::now();
        let mut batch = Picker::new(Mode::Batch { n: 2, every: 5 });
        let picked: Vec<bool> = (0..10).map(|_| batch.take(t)).collect();
        assert_eq!(
            picked,
            [true, true, false, false, false, true, true, false, false, false]
        );
        let mut periodic = Picker::new(Mode::Periodic { n: 2, hz: 1.0 });
        let first: Vec<bool> = (0..4).map(|_| periodic.take(t)).collect();
        assert_eq!(first, [true, true, false, false]);
        assert!(
            periodic.take(t + Duration::from_secs(1)),
            "a new period starts"
        );
    }
}
