//! The replication wire format (`stream_send::wire`): the four fixed-size decoders on any bytes,
//! and `part_range` / `connection_of` on any stream layout. Nothing panics or overflows (overflow
//! checks are on), and what a decoder accepts satisfies what its docs promise:
//!
//! - every decoded message re-encodes to exactly its input bytes;
//! - `Hello`: 1 <= n_connections <= MAX_CONNECTIONS, conn_index < n_connections,
//!   1 <= parts <= MAX_CONNECTIONS;
//! - `FrameHeader` (Image or Lost): 1 <= part_count <= MAX_CONNECTIONS, part_index < part_count,
//!   image_id <= MAX_IMAGE_ID and equal to meta.image_id; Image: the payload is exactly its part
//!   of the receiver's image (so it can be read into the slot without a bounds check) and
//!   meta.data_bytes is the image size; Lost: no payload; Heartbeat: magic and version only;
//! - `Trailer`: a known verdict; `Reply`: Welcome or Ack;
//! - the parts of an image tile it exactly, in order, on the checksum block grid: every part
//!   starts at a multiple of `BLOCK_BYTES`, every part but the last also ends on one, no part is
//!   longer than `ceil(blocks / parts)` blocks, and no part is empty unless there are more parts
//!   than blocks; `connection_of` < n_connections.
//!
//! Input: 8 bytes of image size (receiver side), 2 parts, 2 connections, 8 seq, then the message
//! bytes (each decoder reads the first 56/680/16/32 of them).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std_daq_common::checksum::BLOCK_BYTES;
use stream_send::wire::{
    connection_of, part_range, FrameHeader, Hello, Kind, Reply, Trailer, FRAME_HEADER_BYTES,
    MAX_CONNECTIONS,
    REPLY_ACK, REPLY_WELCOME, VERDICT_INTACT, VERDICT_OVERWRITTEN,
};

/// Largest image size fed to `part_range`/`FrameHeader::decode`: the receiver's image size is a
/// shared-memory slot, far below this (see docs/fuzzing.md for what happens above it).
const MAX_IMAGE_BYTES: u64 = 1 << 48;

fn take<const N: usize>(bytes: &[u8]) -> Option<&[u8; N]> {
    bytes.get(..N)?.try_into().ok()
}

fn check_layout(image_bytes: u64, parts: u16, seq: u64, n_connections: u16) {
    let mut next = 0u64;
    let block = BLOCK_BYTES as u64;
    let blocks = image_bytes.div_ceil(block);
    let n = parts.max(1);
    let most = blocks.div_ceil(u64::from(n)) * block;
    for k in 0..n {
        let (offset, len) = part_range(image_bytes, parts, k);
        assert_eq!(
            offset,
            next,
            "part {k} of {parts} starts where {} ended",
            k.wrapping_sub(1)
        );
        assert_eq!(offset % block, 0, "part {k} of {parts} starts off the block grid");
        assert!(len <= most, "part {k} of {parts} is longer than its share of blocks");
        if k + 1 < n {
            assert_eq!((offset + len) % block, 0, "part {k} of {parts} ends off the grid");
        }
        if u64::from(n) <= blocks {
            assert!(len > 0, "part {k} of {parts} is empty though there are {blocks} blocks");
        }
        next = offset + len;
        let c = connection_of(seq, parts, k, n_connections);
        assert!(c < usize::from(n_connections.max(1)));
    }
    assert_eq!(
        next, image_bytes,
        "the {parts} parts cover the image exactly"
    );
    // Parts past the end are empty and lie at the end.
    assert_eq!(
        part_range(image_bytes, parts, parts.max(1)),
        (image_bytes, 0)
    );
}

fuzz_target!(|data: &[u8]| {
    let Some(head) = take::<20>(data) else { return };
    let image_bytes =
        u64::from_le_bytes(head[..8].try_into().unwrap_or_default()) % (MAX_IMAGE_BYTES + 1);
    let parts = u16::from_le_bytes([head[8], head[9]]);
    let n_connections = u16::from_le_bytes([head[10], head[11]]);
    let seq = u64::from_le_bytes(head[12..20].try_into().unwrap_or_default());
    let msg = &data[20..];

    // connection_of takes any values (it wraps on purpose); part_range any k for any layout the
    // sender can be configured with.
    let _ = connection_of(seq, parts, parts, n_connections);
    assert!(
        connection_of(seq, parts, seq as u16, n_connections) < usize::from(n_connections.max(1))
    );
    if parts <= MAX_CONNECTIONS * 4 {
        check_layout(image_bytes, parts, seq, n_connections);
    }

    if let Some(b) = take::<56>(msg) {
        if let Ok(h) = Hello::decode(b) {
            assert_eq!(bytemuck::bytes_of(&h), b);
            assert!((1..=MAX_CONNECTIONS).contains(&h.n_connections));
            assert!(h.conn_index < h.n_connections);
            assert!((1..=MAX_CONNECTIONS).contains(&h.parts));
            check_layout(image_bytes, h.parts, seq, h.n_connections);
        }
    }
    if let Some(b) = take::<FRAME_HEADER_BYTES>(msg) {
        if let Ok(h) = FrameHeader::decode(b, image_bytes) {
            assert_eq!(bytemuck::bytes_of(&h), b);
            let kind = h.kind().expect("a decoded frame has a known kind");
            if kind != Kind::Heartbeat {
                assert!((1..=MAX_CONNECTIONS).contains(&h.part_count));
                assert!(h.part_index < h.part_count);
                assert!(h.image_id <= image_buffer::MAX_IMAGE_ID);
                assert_eq!(h.meta.image_id, h.image_id);
            }
            match kind {
                Kind::Image => {
                    let end = h
                        .payload_offset
                        .checked_add(h.payload_len)
                        .expect("no overflow");
                    assert!(end <= image_bytes, "the payload lies inside the image");
                    assert_eq!(
                        (h.payload_offset, h.payload_len),
                        part_range(image_bytes, h.part_count, h.part_index)
                    );
                    assert_eq!(h.meta.data_bytes, image_bytes);
                }
                Kind::Lost => assert_eq!(h.payload_len, 0),
                Kind::Heartbeat => {}
            }
        }
    }
    if let Some(b) = take::<16>(msg) {
        if let Ok(t) = Trailer::decode(b) {
            assert_eq!(bytemuck::bytes_of(&t), b);
            assert!(t.verdict == VERDICT_INTACT || t.verdict == VERDICT_OVERWRITTEN);
        }
    }
    if let Some(b) = take::<32>(msg) {
        if let Ok(r) = Reply::decode(b) {
            assert_eq!(bytemuck::bytes_of(&r), b);
            assert!(r.kind == REPLY_WELCOME || r.kind == REPLY_ACK);
        }
    }
});
