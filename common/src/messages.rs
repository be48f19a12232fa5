//! Messages between stages: `ModuleFrame` (receiver -> assembler, and the FrameBuffer slot
//! metadata) and `ImageMetadata` (assembler -> writer/streamer, and the ImageBuffer slot metadata).
//!
//! Both are `#[repr(C)]` Pod structs with explicit padding-free layouts, sent as their raw
//! little-endian bytes over ZMQ and stored as-is in shared memory. Their sizes are asserted at
//! compile time and their bytes are pinned by golden tests: changing a field is a wire break and
//! must bump the `version` field.
//!
//! Decoding never trusts the sender: a message of the wrong size or version is an error, never a
//! panic.

use bytemuck::{Pod, Zeroable};

/// Packets per frame that a `ModuleFrame` bitmap can describe.
pub const MAX_PACKETS_PER_FRAME: usize = 256;
/// Modules an `ImageMetadata` missing-module mask can describe.
pub const MAX_MODULES: usize = 256;

pub const MODULE_FRAME_VERSION: u16 = 1;
/// 2: adds `calibration_id` (96 bytes). 3: adds `checksum`, `bunch_id_bits`, `checksum_kind` and
/// `module_missing_packets` (632 bytes).
pub const IMAGE_METADATA_VERSION: u16 = 3;
/// Bytes of an `ImageMetadata` on the wire.
pub const IMAGE_METADATA_BYTES: usize = 632;
/// A receive buffer for any one message a stage subscribes to (ImageMetadata, ModuleFrame,
/// heartbeats) with room to spare: a message that does not fit is reported as too long
/// (`recv_into` returns its full length), never read truncated.
pub const RECV_BUFFER_BYTES: usize = 1024;

/// One module's frame, as committed by its receiver.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct ModuleFrame {
    /// The id the stages synchronise on (JUNGFRAU: the frame number).
    pub image_id: u64,
    /// The detector's frame counter.
    pub frame_index: u64,
    /// The detector's timestamp field.
    pub timestamp: u64,
    /// JUNGFRAU `bunchid` as raw f64 bits.
    pub bunch_id_bits: u64,
    /// JUNGFRAU `debug` (std_daq's daq_rec).
    pub debug: u32,
    pub exptime: u32,
    pub module_id: u16,
    pub n_packets_expected: u16,
    pub n_missing_packets: u16,
    pub version: u16,
    /// Bit p set = packet p arrived. Packets that did not arrive are zero in the slot.
    pub received: [u64; MAX_PACKETS_PER_FRAME / 64],
}

const _: () = assert!(std::mem::size_of::<ModuleFrame>() == 80);

/// std_daq's image status values, plus one of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ImageStatus {
    Undefined = 0,
    Good = 1,
    /// Some packets (or whole modules) did not arrive; their pixels are zero.
    MissingPackets = 2,
    /// Modules disagreed about which frame this is.
    IdMismatch = 3,
    /// std-daq extension: the shared-memory slot was overwritten before this stage could read it;
    /// the pixels are zero, never another image's.
    LostInBuffer = 4,
}

impl ImageStatus {
    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => ImageStatus::Good,
            2 => ImageStatus::MissingPackets,
            3 => ImageStatus::IdMismatch,
            4 => ImageStatus::LostInBuffer,
            _ => ImageStatus::Undefined,
        }
    }
}

/// std_daq's dtype codes: byte count, +10 for signed, +20 for float.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Dtype {
    Unknown = 0,
    Uint8 = 1,
    Uint16 = 2,
    Uint32 = 4,
    Uint64 = 8,
    /// JUNGFRAU photon counts (`converted_output: "photons_int16"`).
    Int16 = 12,
    /// JUNGFRAU photon counts (`converted_output: "photons_int32"`).
    Int32 = 14,
    Float32 = 24,
}

impl Dtype {
    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => Dtype::Uint8,
            2 => Dtype::Uint16,
            4 => Dtype::Uint32,
            8 => Dtype::Uint64,
            12 => Dtype::Int16,
            14 => Dtype::Int32,
            24 => Dtype::Float32,
            _ => Dtype::Unknown,
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            Dtype::Unknown => 0,
            Dtype::Uint8 => 1,
            Dtype::Uint16 | Dtype::Int16 => 2,
            Dtype::Uint32 | Dtype::Int32 | Dtype::Float32 => 4,
            Dtype::Uint64 => 8,
        }
    }
}

/// One assembled image, as published by the assembler.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct ImageMetadata {
    pub image_id: u64,
    pub frame_index: u64,
    pub timestamp: u64,
    /// Bytes of image data in the slot.
    pub data_bytes: u64,
    pub height: u32,
    pub width: u32,
    /// Packets missing over all modules (a missing module counts all its packets).
    pub missing_packets: u32,
    pub n_modules: u16,
    /// A [`Dtype`] code.
    pub dtype: u16,
    /// An [`ImageStatus`] code.
    pub status: u16,
    /// std_daq compression code: 0 = none.
    pub compression: u16,
    pub n_missing_modules: u16,
    pub version: u16,
    /// Bit m set = module m's frame did not arrive (its pixels are zero).
    pub missing_modules: [u64; MAX_MODULES / 64],
    /// Which calibration converted the image (its id as the assembler loaded it; 0 = raw, none).
    pub calibration_id: u64,
    /// The end-to-end checksum of the slot's `data_bytes` bytes (`crate::checksum`), computed
    /// by the assembler when it made the image; meaningful only when `checksum_kind` is not 0.
    pub checksum: u64,
    /// The detector's pulse/bunch id of the image (JUNGFRAU `bunchid`, an f64, as raw bits;
    /// EIGER `det_spec1`, GigaFRoST scan id), from the last module that arrived.
    pub bunch_id_bits: u64,
    /// `crate::checksum::CHECKSUM_NONE` or `CHECKSUM_XXH3_BLOCKS`.
    pub checksum_kind: u16,
    pub reserved: [u16; 3],
    /// Packets missing per module (a module that did not arrive counts all its packets).
    pub module_missing_packets: [u16; MAX_MODULES],
}

const _: () = assert!(std::mem::size_of::<ImageMetadata>() == IMAGE_METADATA_BYTES);
const _: () = assert!(IMAGE_METADATA_BYTES <= RECV_BUFFER_BYTES);

/// A message that is not a valid `ModuleFrame` or `ImageMetadata`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("{kind}: expected {expected} bytes, got {got}")]
    WrongSize {
        kind: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{kind}: unsupported version {got} (this build speaks {expected})")]
    WrongVersion {
        kind: &'static str,
        expected: u16,
        got: u16,
    },
}

fn decode<T: Pod>(bytes: &[u8], kind: &'static str) -> Result<T, MessageError> {
    bytemuck::try_pod_read_unaligned(bytes).map_err(|_| MessageError::WrongSize {
        kind,
        expected: std::mem::size_of::<T>(),
        got: bytes.len(),
    })
}

impl ModuleFrame {
    pub fn new(image_id: u64, module_id: u16, n_packets_expected: u16) -> Self {
        ModuleFrame {
            image_id,
            module_id,
            n_packets_expected,
            n_missing_packets: n_packets_expected,
            version: MODULE_FRAME_VERSION,
            ..Zeroable::zeroed()
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MessageError> {
        let f: Self = decode(bytes, "ModuleFrame")?;
        if f.version != MODULE_FRAME_VERSION {
            return Err(MessageError::WrongVersion {
                kind: "ModuleFrame",
                expected: MODULE_FRAME_VERSION,
                got: f.version,
            });
        }
        Ok(f)
    }

    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }

    /// Whether packet `p` arrived. Out-of-range packet numbers never arrived.
    pub fn packet_received(&self, p: usize) -> bool {
        p < MAX_PACKETS_PER_FRAME && self.received[p / 64] & (1 << (p % 64)) != 0
    }

    /// Marks packet `p` as received; returns false if it already was (a duplicate).
    /// `p` must be below `MAX_PACKETS_PER_FRAME` (callers check wire fields first).
    pub fn mark_received(&mut self, p: usize) -> bool {
        let (word, bit) = (p / 64, 1u64 << (p % 64));
        let fresh = self.received[word] & bit == 0;
        self.received[word] |= bit;
        fresh
    }
}

impl ImageMetadata {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MessageError> {
        let m: Self = decode(bytes, "ImageMetadata")?;
        if m.version != IMAGE_METADATA_VERSION {
            return Err(MessageError::WrongVersion {
                kind: "ImageMetadata",
                expected: IMAGE_METADATA_VERSION,
                got: m.version,
            });
        }
        Ok(m)
    }

    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }

    pub fn status(&self) -> ImageStatus {
        ImageStatus::from_u16(self.status)
    }

    pub fn dtype(&self) -> Dtype {
        Dtype::from_u16(self.dtype)
    }

    pub fn module_missing(&self, m: usize) -> bool {
        m < MAX_MODULES && self.missing_modules[m / 64] & (1 << (m % 64)) != 0
    }

    pub fn set_module_missing(&mut self, m: usize) {
        if m < MAX_MODULES && !self.module_missing(m) {
            self.missing_modules[m / 64] |= 1 << (m % 64);
            self.n_missing_modules += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_frame_golden_bytes() {
        let mut f = ModuleFrame::new(0x0102_0304_0506_0708, 0x0a0b, 128);
        f.frame_index = 0x1112_1314_1516_1718;
        f.timestamp = 0x2122_2324_2526_2728;
        f.bunch_id_bits = 1.5f64.to_bits();
        f.debug = 0x3132_3334;
        f.exptime = 0x4142_4344;
        f.n_missing_packets = 3;
        f.received = [0x8000_0000_0000_0001, 0xff, 0, 0];
        let mut golden = Vec::new();
        golden.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        golden.extend_from_slice(&0x1112_1314_1516_1718u64.to_le_bytes());
        golden.extend_from_slice(&0x2122_2324_2526_2728u64.to_le_bytes());
        golden.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0xf8, 0x3f]);
        golden.extend_from_slice(&[0x34, 0x33, 0x32, 0x31, 0x44, 0x43, 0x42, 0x41]);
        golden.extend_from_slice(&[0x0b, 0x0a, 128, 0, 3, 0, 1, 0]);
        golden.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0x80]);
        golden.extend_from_slice(&[0xff, 0, 0, 0, 0, 0, 0, 0]);
        golden.extend_from_slice(&[0; 16]);
        assert_eq!(f.as_bytes(), &golden[..]);
        assert_eq!(ModuleFrame::from_bytes(&golden).unwrap(), f);
    }

    #[test]
    fn image_metadata_golden_bytes() {
        let mut m = ImageMetadata {
            image_id: 7,
            frame_index: 8,
            timestamp: 9,
            data_bytes: 2 * 1024 * 1024,
            height: 1024,
            width: 1024,
            missing_packets: 128,
            n_modules: 2,
            dtype: Dtype::Uint16 as u16,
            status: ImageStatus::MissingPackets as u16,
            compression: 0,
            n_missing_modules: 0,
            version: IMAGE_METADATA_VERSION,
            missing_modules: [0; 4],
            calibration_id: 0x6162_6364_6566_6768,
            checksum: 0x7172_7374_7576_7778,
            bunch_id_bits: 2.5f64.to_bits(),
            checksum_kind: crate::checksum::CHECKSUM_XXH3_BLOCKS,
            reserved: [0; 3],
            module_missing_packets: [0; MAX_MODULES],
        };
        m.module_missing_packets[1] = 128;
        m.module_missing_packets[255] = 0x0102;
        m.set_module_missing(1);
        m.set_module_missing(1);
        let mut golden = Vec::new();
        for v in [7u64, 8, 9, 2 * 1024 * 1024] {
            golden.extend_from_slice(&v.to_le_bytes());
        }
        golden.extend_from_slice(&[0, 4, 0, 0, 0, 4, 0, 0]);
        golden.extend_from_slice(&[128, 0, 0, 0, 2, 0, 2, 0]);
        golden.extend_from_slice(&[2, 0, 0, 0, 1, 0, 3, 0]);
        golden.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
        golden.extend_from_slice(&[0; 24]);
        golden.extend_from_slice(&[0x68, 0x67, 0x66, 0x65, 0x64, 0x63, 0x62, 0x61]);
        golden.extend_from_slice(&[0x78, 0x77, 0x76, 0x75, 0x74, 0x73, 0x72, 0x71]);
        golden.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x04, 0x40]);
        golden.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        golden.extend_from_slice(&[0, 0, 128, 0]);
        golden.extend_from_slice(&[0; 2 * 253]);
        golden.extend_from_slice(&[0x02, 0x01]);
        assert_eq!(golden.len(), IMAGE_METADATA_BYTES);
        assert_eq!(m.as_bytes(), &golden[..]);
        assert_eq!(ImageMetadata::from_bytes(&golden).unwrap(), m);
        assert!(m.module_missing(1) && !m.module_missing(0) && !m.module_missing(999));
    }

    /// The codes on the wire (ImageMetadata.dtype, the replication header): std_daq's rule,
    /// byte count + 10 for signed + 20 for float. Existing codes never change.
    #[test]
    fn dtype_codes_are_fixed() {
        for (dtype, code, bytes) in [
            (Dtype::Unknown, 0u16, 0usize),
            (Dtype::Uint8, 1, 1),
            (Dtype::Uint16, 2, 2),
            (Dtype::Uint32, 4, 4),
            (Dtype::Uint64, 8, 8),
            (Dtype::Int16, 12, 2),
            (Dtype::Int32, 14, 4),
            (Dtype::Float32, 24, 4),
        ] {
            assert_eq!(dtype as u16, code, "{dtype:?}");
            assert_eq!(Dtype::from_u16(code), dtype);
            assert_eq!(dtype.bytes(), bytes, "{dtype:?}");
        }
        assert_eq!(Dtype::from_u16(11), Dtype::Unknown);
        let m = ImageMetadata {
            dtype: Dtype::Int16 as u16,
            ..Zeroable::zeroed()
        };
        assert_eq!(&m.as_bytes()[46..48], &[12, 0]);
    }

    #[test]
    fn bad_messages_are_errors_not_panics() {
        assert!(matches!(
            ModuleFrame::from_bytes(&[0; 79]),
            Err(MessageError::WrongSize { got: 79, .. })
        ));
        assert!(matches!(
            ImageMetadata::from_bytes(&[]),
            Err(MessageError::WrongSize { got: 0, .. })
        ));
        assert!(matches!(
            ModuleFrame::from_bytes(&[0; 80]),
            Err(MessageError::WrongVersion { got: 0, .. })
        ));
    }

    #[test]
    fn bitmap_marks_and_detects_duplicates() {
        let mut f = ModuleFrame::new(1, 0, 128);
        assert!(f.mark_received(127));
        assert!(!f.mark_received(127));
        assert!(f.packet_received(127) && !f.packet_received(0) && !f.packet_received(10_000));
    }
}
