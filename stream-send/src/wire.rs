//! The replication wire format: plain TCP, every message a fixed-size little-endian `#[repr(C)]`
//! Pod struct, image bytes following a frame header.
//!
//! ```text
//! sender -> receiver, once per connection:  Hello (48 B)
//! receiver -> sender, on connection 0:      Reply kind=Welcome (32 B) with the resume sequence
//! sender -> receiver, repeatedly:           FrameHeader (680 B) [payload (payload_len B) Trailer (16 B)]
//!                                            kind Image: payload + trailer follow
//!                                            kind Lost / Heartbeat: nothing follows
//! receiver -> sender, on connection 0:      Reply kind=Ack (32 B) every ACK_PERIOD
//! ```
//!
//! Image parts lie on the 256 KiB block grid of the end-to-end image checksum
//! ([`std_daq_common::checksum`], see [`part_range`]), so the receiver can digest every block of a
//! part as it arrives and check the assembler's checksum (`meta.checksum`) once all parts are in.
//! Only for images without one (`meta.checksum_kind` not [`CHECKSUM_XXH3_BLOCKS`]) does the
//! sender hash each part's payload itself into the [`Trailer`].
//!
//! This module only encodes and validates; it never trusts a field from the wire: every decode
//! checks magic, version, kind and lengths and returns a [`WireError`], never panics.

use bytemuck::{Pod, Zeroable};
use std_daq_common::checksum::BLOCK_BYTES;
pub use std_daq_common::checksum::CHECKSUM_XXH3_BLOCKS;
use std_daq_common::ImageMetadata;

/// 2: the FrameHeader carries ImageMetadata version 3 (680 B). 3: parts lie on the checksum block
/// grid ([`part_range`]); the receiver verifies the assembler's image checksum and
/// [`Trailer::checksum`] is only set for images without one.
pub const PROTOCOL_VERSION: u16 = 3;
pub const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"SDRH");
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"SDRF");
pub const TRAILER_MAGIC: u32 = u32::from_le_bytes(*b"SDRT");
pub const REPLY_MAGIC: u32 = u32::from_le_bytes(*b"SDRA");

/// Most parallel connections (and parts per image) one stream may use.
pub const MAX_CONNECTIONS: u16 = 64;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// One part of an image: `payload_len` bytes and a [`Trailer`] follow.
    Image = 1,
    /// The sender could not read this image from its ring (overwritten before it was sent).
    Lost = 2,
    /// Keeps an idle connection alive; carries no image.
    Heartbeat = 3,
}

/// Trailer verdicts.
pub const VERDICT_INTACT: u32 = 1;
/// The slot was overwritten while it was being sent: the bytes must not be used.
pub const VERDICT_OVERWRITTEN: u32 = 2;

/// Reply kinds.
pub const REPLY_WELCOME: u16 = 1;
pub const REPLY_ACK: u16 = 2;

/// First message on every connection.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct Hello {
    pub magic: u32,
    pub version: u16,
    /// This connection's index in `0..n_connections`.
    pub conn_index: u16,
    pub n_connections: u16,
    /// Parts every image is split into.
    pub parts: u16,
    pub height: u32,
    /// Random per sender process: the receiver resumes a stream it knows.
    pub stream_id: u64,
    /// Random per connection attempt: all connections of one session share it.
    pub session_id: u64,
    /// The sender's oldest unacknowledged sequence number.
    pub first_seq: u64,
    pub image_bytes: u64,
    pub width: u32,
    pub dtype: u16,
    pub reserved: u16,
}
const _: () = assert!(std::mem::size_of::<Hello>() == 56);

/// Header of every frame on the data connections.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct FrameHeader {
    pub magic: u32,
    pub version: u16,
    /// A [`Kind`].
    pub kind: u16,
    /// Position in the sender's stream (consecutive from the stream's start). Part `k` of `seq`
    /// travels on connection `(seq * parts + k) % n_connections`.
    pub seq: u64,
    pub image_id: u64,
    /// Byte offset of this part in the image.
    pub payload_offset: u64,
    /// Bytes of image data that follow this header (0 unless kind is Image).
    pub payload_len: u64,
    pub part_index: u16,
    pub part_count: u16,
    pub reserved: u32,
    /// The ImageMetadata exactly as the sender's assembler published it.
    pub meta: ImageMetadata,
}
/// Bytes of a [`FrameHeader`] on the wire.
pub const FRAME_HEADER_BYTES: usize = 680;
const _: () = assert!(std::mem::size_of::<FrameHeader>() == FRAME_HEADER_BYTES);

/// Follows the payload of an Image frame.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct Trailer {
    /// Images whose `meta.checksum_kind` is [`CHECKSUM_XXH3_BLOCKS`]: 0, unused (the receiver
    /// checks the assembler's `meta.checksum`). Any other image (no assembler checksum): xxh3-64
    /// ([`checksum`]) of the payload bytes as read from the sender's slot.
    pub checksum: u64,
    /// [`VERDICT_INTACT`] or [`VERDICT_OVERWRITTEN`].
    pub verdict: u32,
    pub magic: u32,
}
const _: () = assert!(std::mem::size_of::<Trailer>() == 16);

/// Receiver to sender: Welcome (after Hello) and periodic Acks.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct Reply {
    pub magic: u32,
    pub version: u16,
    pub kind: u16,
    pub stream_id: u64,
    /// Welcome: the sequence the sender must send next. Ack: every seq below this is committed.
    pub next_seq: u64,
    /// Cumulative checksum failures the receiver saw on this stream.
    pub checksum_errors: u64,
}
const _: () = assert!(std::mem::size_of::<Reply>() == 32);

/// A message from the wire that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{what}: bad magic {found:#010x}")]
    BadMagic { what: &'static str, found: u32 },
    #[error("{what}: unsupported protocol version {found} (this build speaks {PROTOCOL_VERSION})")]
    BadVersion { what: &'static str, found: u16 },
    #[error("{what}: invalid field {field} = {value}")]
    BadField {
        what: &'static str,
        field: &'static str,
        value: u64,
    },
}

fn check(what: &'static str, magic: u32, want: u32, version: u16) -> Result<(), WireError> {
    if magic != want {
        return Err(WireError::BadMagic { what, found: magic });
    }
    if version != PROTOCOL_VERSION {
        return Err(WireError::BadVersion {
            what,
            found: version,
        });
    }
    Ok(())
}

fn bad(what: &'static str, field: &'static str, value: impl Into<u64>) -> WireError {
    WireError::BadField {
        what,
        field,
        value: value.into(),
    }
}

/// Where part `k` of `parts` lies in an image of `image_bytes`: (offset, len).
///
/// Parts lie on the checksum block grid: the image's `B = ceil(image_bytes / BLOCK_BYTES)` blocks
/// are dealt out as evenly as possible, part `k` taking blocks `floor(k * B / parts)` up to
/// `floor((k + 1) * B / parts)`. So every part starts at a multiple of [`BLOCK_BYTES`], only the
/// last part (`k = parts - 1`) reaches the image's end (it holds the short last block, if any),
/// and with more parts than blocks some parts are empty (len 0; they are still sent, as a header
/// and a trailer, so the part count and the part-to-connection assignment never depend on the
/// image size). Total for every input: a part past the end (`k >= parts`) is `(image_bytes, 0)`,
/// and nothing overflows. `parts` 0 counts as 1.
pub fn part_range(image_bytes: u64, parts: u16, k: u16) -> (u64, u64) {
    let parts = u128::from(parts.max(1));
    let blocks = u128::from(image_bytes.div_ceil(BLOCK_BYTES as u64));
    let at = |k: u128| -> u64 {
        // k <= 2^16 and blocks < 2^47: no overflow in u128; the result is <= image_bytes.
        let block = (k * blocks / parts).min(blocks);
        (block * BLOCK_BYTES as u128).min(u128::from(image_bytes)) as u64
    };
    let k = u128::from(k);
    if k >= parts {
        return (image_bytes, 0);
    }
    let (start, end) = (at(k), at(k + 1));
    (start, end - start)
}

/// The connection that carries part `k` of stream position `seq`.
pub fn connection_of(seq: u64, parts: u16, k: u16, n_connections: u16) -> usize {
    let n = u64::from(n_connections.max(1));
    ((seq
        .wrapping_mul(u64::from(parts))
        .wrapping_add(u64::from(k)))
        % n) as usize
}

impl Hello {
    pub fn decode(bytes: &[u8; 56]) -> Result<Self, WireError> {
        let h: Hello = bytemuck::pod_read_unaligned(bytes);
        check("Hello", h.magic, HELLO_MAGIC, h.version)?;
        if h.n_connections == 0 || h.n_connections > MAX_CONNECTIONS {
            return Err(bad("Hello", "n_connections", h.n_connections));
        }
        if h.conn_index >= h.n_connections {
            return Err(bad("Hello", "conn_index", h.conn_index));
        }
        if h.parts == 0 || h.parts > MAX_CONNECTIONS {
            return Err(bad("Hello", "parts", h.parts));
        }
        Ok(h)
    }
}

impl FrameHeader {
    /// Checks everything that can be checked without the stream's state; `image_bytes` is the
    /// receiver's image size (payloads longer than that are refused before any allocation/read).
    pub fn decode(bytes: &[u8; FRAME_HEADER_BYTES], image_bytes: u64) -> Result<Self, WireError> {
        let h: FrameHeader = bytemuck::pod_read_unaligned(bytes);
        check("FrameHeader", h.magic, FRAME_MAGIC, h.version)?;
        match h.kind {
            k if k == Kind::Heartbeat as u16 => return Ok(h),
            k if k == Kind::Image as u16 || k == Kind::Lost as u16 => {}
            k => return Err(bad("FrameHeader", "kind", k)),
        }
        if h.part_count == 0 || h.part_count > MAX_CONNECTIONS {
            return Err(bad("FrameHeader", "part_count", h.part_count));
        }
        if h.part_index >= h.part_count {
            return Err(bad("FrameHeader", "part_index", h.part_index));
        }
        if h.image_id > image_buffer::MAX_IMAGE_ID {
            return Err(bad("FrameHeader", "image_id", h.image_id));
        }
        if h.meta.image_id != h.image_id {
            return Err(bad("FrameHeader", "meta.image_id", h.meta.image_id));
        }
        if h.kind == Kind::Image as u16 {
            let (offset, len) = part_range(image_bytes, h.part_count, h.part_index);
            if h.payload_offset != offset {
                return Err(bad("FrameHeader", "payload_offset", h.payload_offset));
            }
            if h.payload_len != len {
                return Err(bad("FrameHeader", "payload_len", h.payload_len));
            }
            if h.meta.data_bytes != image_bytes {
                return Err(bad("FrameHeader", "meta.data_bytes", h.meta.data_bytes));
            }
        } else if h.payload_len != 0 {
            return Err(bad("FrameHeader", "payload_len", h.payload_len));
        }
        Ok(h)
    }

    pub fn kind(&self) -> Option<Kind> {
        match self.kind {
            1 => Some(Kind::Image),
            2 => Some(Kind::Lost),
            3 => Some(Kind::Heartbeat),
            _ => None,
        }
    }
}

impl Trailer {
    pub fn decode(bytes: &[u8; 16]) -> Result<Self, WireError> {
        let t: Trailer = bytemuck::pod_read_unaligned(bytes);
        if t.magic != TRAILER_MAGIC {
            return Err(WireError::BadMagic {
                what: "Trailer",
                found: t.magic,
            });
        }
        if t.verdict != VERDICT_INTACT && t.verdict != VERDICT_OVERWRITTEN {
            return Err(bad("Trailer", "verdict", t.verdict));
        }
        Ok(t)
    }
}

impl Reply {
    pub fn decode(bytes: &[u8; 32]) -> Result<Self, WireError> {
        let r: Reply = bytemuck::pod_read_unaligned(bytes);
        check("Reply", r.magic, REPLY_MAGIC, r.version)?;
        if r.kind != REPLY_WELCOME && r.kind != REPLY_ACK {
            return Err(bad("Reply", "kind", r.kind));
        }
        Ok(r)
    }
}

/// The checksum of a payload: xxh3-64 (tens of GB/s, far above the link rate).
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// [`checksum`] computed over chunks as they arrive (`update` each, then `digest`): same value.
pub type ChecksumState = xxhash_rust::xxh3::Xxh3;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn meta(id: u64, bytes: u64) -> ImageMetadata {
        ImageMetadata {
            image_id: id,
            data_bytes: bytes,
            version: std_daq_common::messages::IMAGE_METADATA_VERSION,
            ..Zeroable::zeroed()
        }
    }

    #[test]
    fn frame_header_golden_bytes() {
        let h = FrameHeader {
            magic: FRAME_MAGIC,
            version: PROTOCOL_VERSION,
            kind: Kind::Image as u16,
            seq: 0x0102_0304_0506_0708,
            image_id: 42,
            // Part 1 of 2 of a 3-block + 100-byte image: blocks 2 and 3.
            payload_offset: 0x80000,
            payload_len: 0x40064,
            part_index: 1,
            part_count: 2,
            reserved: 0,
            meta: meta(42, 0xC0064),
        };
        let mut golden = Vec::new();
        golden.extend_from_slice(b"SDRF");
        golden.extend_from_slice(&[3, 0, 1, 0]);
        golden.extend_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]);
        golden.extend_from_slice(&42u64.to_le_bytes());
        golden.extend_from_slice(&[0, 0, 8, 0, 0, 0, 0, 0]);
        golden.extend_from_slice(&[0x64, 0, 4, 0, 0, 0, 0, 0]);
        golden.extend_from_slice(&[1, 0, 2, 0, 0, 0, 0, 0]);
        golden.extend_from_slice(meta(42, 0xC0064).as_bytes());
        assert_eq!(bytemuck::bytes_of(&h), &golden[..]);
        let arr: [u8; FRAME_HEADER_BYTES] = golden.try_into().unwrap();
        assert_eq!(FrameHeader::decode(&arr, 0xC0064).unwrap(), h);
        // Another receiver image size, another layout: refused.
        assert!(FrameHeader::decode(&arr, 0xC0063).is_err());
        assert!(FrameHeader::decode(&arr, 0xC0065).is_err());
    }

    #[test]
    fn hello_trailer_reply_golden_bytes() {
        let h = Hello {
            magic: HELLO_MAGIC,
            version: PROTOCOL_VERSION,
            conn_index: 1,
            n_connections: 2,
            parts: 2,
            height: 1024,
            stream_id: 7,
            session_id: 8,
            first_seq: 9,
            image_bytes: 10,
            width: 512,
            dtype: 2,
            reserved: 0,
        };
        let mut g = Vec::new();
        g.extend_from_slice(b"SDRH");
        g.extend_from_slice(&[3, 0, 1, 0, 2, 0, 2, 0, 0, 4, 0, 0]);
        for v in [7u64, 8, 9, 10] {
            g.extend_from_slice(&v.to_le_bytes());
        }
        g.extend_from_slice(&[0, 2, 0, 0, 2, 0, 0, 0]);
        assert_eq!(bytemuck::bytes_of(&h), &g[..]);
        assert_eq!(Hello::decode(&g.try_into().unwrap()).unwrap(), h);

        let t = Trailer {
            checksum: 0x1122_3344_5566_7788,
            verdict: VERDICT_INTACT,
            magic: TRAILER_MAGIC,
        };
        let mut g = Vec::new();
        g.extend_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        g.extend_from_slice(&[1, 0, 0, 0]);
        g.extend_from_slice(b"SDRT");
        assert_eq!(bytemuck::bytes_of(&t), &g[..]);
        assert_eq!(Trailer::decode(&g.try_into().unwrap()).unwrap(), t);

        let r = Reply {
            magic: REPLY_MAGIC,
            version: PROTOCOL_VERSION,
            kind: REPLY_ACK,
            stream_id: 3,
            next_seq: 4,
            checksum_errors: 5,
        };
        let mut g = Vec::new();
        g.extend_from_slice(b"SDRA");
        g.extend_from_slice(&[3, 0, 2, 0]);
        for v in [3u64, 4, 5] {
            g.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(bytemuck::bytes_of(&r), &g[..]);
        assert_eq!(Reply::decode(&g.try_into().unwrap()).unwrap(), r);
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let good = FrameHeader {
            magic: FRAME_MAGIC,
            version: PROTOCOL_VERSION,
            kind: Kind::Image as u16,
            seq: 0,
            image_id: 1,
            payload_offset: 0,
            payload_len: 100,
            part_index: 0,
            part_count: 1,
            reserved: 0,
            meta: meta(1, 100),
        };
        let enc = |h: FrameHeader| -> [u8; FRAME_HEADER_BYTES] {
            bytemuck::bytes_of(&h).try_into().unwrap()
        };
        assert!(FrameHeader::decode(&enc(good), 100).is_ok());
        let cases: [fn(&mut FrameHeader); 9] = [
            |h| h.magic = 0,
            |h| h.version = 9,
            |h| h.kind = 7,
            |h| h.part_count = 0,
            |h| h.part_index = 1,
            |h| h.payload_len = u64::MAX,
            |h| h.payload_offset = 1,
            |h| h.meta.image_id = 2,
            |h| {
                h.image_id = u64::MAX;
                h.meta.image_id = u64::MAX
            },
        ];
        for (i, f) in cases.iter().enumerate() {
            let mut h = good;
            f(&mut h);
            assert!(FrameHeader::decode(&enc(h), 100).is_err(), "case {i}");
        }
        // A payload longer than the receiver's image is refused even if self-consistent.
        assert!(FrameHeader::decode(&enc(good), 50).is_err());
        assert!(Hello::decode(&[0; 56]).is_err());
        assert!(Trailer::decode(&[0; 16]).is_err());
        assert!(Reply::decode(&[0; 32]).is_err());
        // Random bytes never panic.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            let mut b = [0u8; FRAME_HEADER_BYTES];
            for chunk in b.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            b[..4].copy_from_slice(b"SDRF");
            b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            let _ = FrameHeader::decode(&b, 1 << 20);
        }
    }

    #[test]
    fn chunked_checksum_equals_the_one_shot_checksum() {
        let bytes: Vec<u8> = (0..1_000_003u32)
            .map(|i| i.wrapping_mul(2_654_435_761) as u8)
            .collect();
        let mut state = ChecksumState::new();
        for chunk in [1usize, 7, 4096, 256 << 10] {
            state.reset();
            for c in bytes.chunks(chunk) {
                state.update(c);
            }
            assert_eq!(state.digest(), checksum(&bytes), "chunks of {chunk}");
        }
    }

    /// Every part starts on the checksum block grid, only the last part reaches the image's end,
    /// the parts tile the image in order and are as even as the blocks allow.
    fn check_grid(bytes: u64, parts: u16) {
        let block = BLOCK_BYTES as u64;
        let blocks = bytes.div_ceil(block);
        let most = u128::from(blocks.div_ceil(u64::from(parts))) * u128::from(block);
        let mut next = 0;
        for k in 0..parts {
            let (o, l) = part_range(bytes, parts, k);
            assert_eq!(
                o, next,
                "{bytes} B / {parts}: part {k} starts where {k}-1 ended"
            );
            assert_eq!(
                o % block,
                0,
                "{bytes} B / {parts}: part {k} is off the grid"
            );
            assert!(
                u128::from(l) <= most,
                "{bytes} B / {parts}: part {k} too long"
            );
            if k + 1 < parts {
                assert_eq!(
                    (o + l) % block,
                    0,
                    "{bytes} B / {parts}: part {k} ends off the grid"
                );
            }
            if parts as u64 <= blocks {
                assert!(
                    l > 0,
                    "{bytes} B / {parts}: part {k} empty with enough blocks"
                );
            }
            next += l;
        }
        assert_eq!(
            next, bytes,
            "{bytes} B / {parts}: the parts cover the image"
        );
        assert_eq!(part_range(bytes, parts, parts), (bytes, 0));
    }

    #[test]
    fn parts_lie_on_the_block_grid_and_cover_the_image_exactly() {
        let b = BLOCK_BYTES as u64;
        let mut sizes = vec![
            0u64,
            1,
            7,
            100,
            66_200,
            b - 1,
            b,
            b + 1,
            2 << 20,
            (2 << 20) + 1,
        ];
        sizes.extend([
            3 * b + 100,
            8 * b - 1,
            17 * b + 5,
            64 * b,
            65 * b + 3,
            1_048_576 * 9,
        ]);
        // JUNGFRAU-like sizes: n modules of 512x1024 u16 (+ gaps for some).
        sizes.extend((1..=32).map(|n| n * 1_048_576));
        sizes.extend((1..=8).map(|n| n * 1030 * 514 * 2));
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            sizes.push(x % (200 << 20));
        }
        for &bytes in &sizes {
            for parts in 1..=MAX_CONNECTIONS {
                check_grid(bytes, parts);
            }
        }
        // The split is as even as the blocks allow: 8 blocks in 3 parts are 2, 3, 3.
        assert_eq!(part_range(8 * b, 3, 0), (0, 2 * b));
        assert_eq!(part_range(8 * b, 3, 1), (2 * b, 3 * b));
        assert_eq!(part_range(8 * b, 3, 2), (5 * b, 3 * b));
        // More parts than blocks: empty parts, the last one holds the (short) last block.
        assert_eq!(part_range(100, 4, 0), (0, 0));
        assert_eq!(part_range(100, 4, 3), (0, 100));
        assert_eq!(part_range(b + 1, 4, 1), (0, b));
        assert_eq!(part_range(b + 1, 4, 3), (b, 1));
        assert_eq!(part_range(0, 2, 0), (0, 0));
        assert_eq!(part_range(100, 0, 0), (0, 100));
        // Sizes no layout has: no overflow, the parts still cover the image.
        let huge = u64::MAX - 1;
        for parts in [1, 2, 3, 63, 64, u16::MAX] {
            check_grid(huge, parts);
        }
        assert_eq!(part_range(huge, 2, u16::MAX), (huge, 0));
        assert_eq!(connection_of(5, 1, 0, 4), 1);
        assert_eq!(connection_of(5, 4, 3, 4), 3);
        assert_eq!(connection_of(5, 2, 1, 4), 3);
    }
}
