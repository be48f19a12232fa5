//! Replication of a detector's ImageBuffer and ImageMetadata stream from the acquisition host to
//! another host, so that services there (a writer, a streamer) cannot tell the difference.
//!
//! - [`sender`]: `std-stream-send` follows the local ImageMetadata stream and sends metadata plus
//!   image bytes straight from the shm slot over one or more TCP connections.
//! - [`receiver`]: `std-stream-recv` verifies, writes the images into its own ImageBuffer (same
//!   layout) in stream order and republishes identical ImageMetadata on its own PUB.
//! - [`wire`]: the framed TCP protocol (see docs/replication.md).
//!
//! Never silent: every image ends delivered exact, or counted and published as lost
//! (`LostInBuffer`, zero pixels) on both hosts. No unsafe code; no panics on network input.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod receiver;
pub mod sender;
pub mod wire;
