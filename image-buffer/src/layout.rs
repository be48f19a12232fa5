//! The on-disk header, the offsets derived from it, and the seqlock word's encoding.
//! Pure arithmetic: no I/O and no unsafe here. Sizes use checked arithmetic so that absurd
//! geometries (or garbage headers) become errors, never panics or overflows.

use bytemuck::{Pod, Zeroable};

use crate::{HEADER_BYTES, LAYOUT_VERSION, MAGIC};

pub(crate) const PAGE_BYTES: u64 = 4096;
const CACHE_LINE_BYTES: u64 = 64;
/// The seq word at the start of each control entry; the meta record follows it, 8-byte aligned.
pub(crate) const SEQ_BYTES: u64 = 8;

/// The first bytes of a segment. Field order and sizes are the wire format: never reorder.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub(crate) struct Header {
    pub magic: u64,
    pub layout_version: u32,
    pub header_bytes: u32,
    pub n_slots: u64,
    pub slot_bytes: u64,
    pub meta_bytes: u64,
    pub control_offset: u64,
    pub control_stride: u64,
    pub data_offset: u64,
    pub data_stride: u64,
    pub owner_pid: u32,
    pub reserved_u32: u32,
    pub reserved: [u64; 6],
}

pub(crate) const HEADER_STRUCT_BYTES: usize = 128;
const _: () = assert!(size_of::<Header>() == HEADER_STRUCT_BYTES);
const _: () = assert!(HEADER_STRUCT_BYTES as u64 <= HEADER_BYTES);
const _: () = assert!(HEADER_BYTES.is_multiple_of(PAGE_BYTES) && HEADER_BYTES <= u32::MAX as u64);

/// Where everything lives in a segment. Every offset is below `total_bytes <= isize::MAX`,
/// so the `as usize` conversions below are lossless on the 64-bit targets we build for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub n_slots: u64,
    pub slot_bytes: u64,
    pub meta_bytes: u64,
    pub control_stride: u64,
    pub data_offset: u64,
    pub data_stride: u64,
    pub total_bytes: u64,
}

impl Layout {
    /// `None` if a count is zero or the segment would not fit in the address space.
    pub fn compute(n_slots: u64, slot_bytes: u64, meta_bytes: u64) -> Option<Layout> {
        if n_slots == 0 || slot_bytes == 0 {
            return None;
        }
        let control_stride = round_up(SEQ_BYTES.checked_add(meta_bytes)?, CACHE_LINE_BYTES)?;
        let control_end = n_slots
            .checked_mul(control_stride)?
            .checked_add(HEADER_BYTES)?;
        let data_offset = round_up(control_end, PAGE_BYTES)?;
        let data_stride = round_up(slot_bytes, PAGE_BYTES)?;
        let total_bytes = n_slots.checked_mul(data_stride)?.checked_add(data_offset)?;
        (total_bytes <= isize::MAX as u64).then_some(Layout {
            n_slots,
            slot_bytes,
            meta_bytes,
            control_stride,
            data_offset,
            data_stride,
            total_bytes,
        })
    }

    pub fn header(&self, owner_pid: u32) -> Header {
        Header {
            magic: MAGIC,
            layout_version: LAYOUT_VERSION,
            header_bytes: HEADER_BYTES as u32,
            n_slots: self.n_slots,
            slot_bytes: self.slot_bytes,
            meta_bytes: self.meta_bytes,
            control_offset: HEADER_BYTES,
            control_stride: self.control_stride,
            data_offset: self.data_offset,
            data_stride: self.data_stride,
            owner_pid,
            ..Zeroable::zeroed()
        }
    }

    pub fn slot_of(&self, image_id: u64) -> u64 {
        image_id % self.n_slots
    }

    /// Offset of `slot`'s seq word: 8-byte aligned (4096 + k * multiple of 64).
    pub fn seq_offset(&self, slot: u64) -> usize {
        (HEADER_BYTES + slot * self.control_stride) as usize
    }

    /// Offset of `slot`'s meta record: 8-byte aligned, right after the seq word.
    pub fn meta_offset(&self, slot: u64) -> usize {
        self.seq_offset(slot) + SEQ_BYTES as usize
    }

    /// Offset of `slot`'s data: 4096-byte aligned.
    pub fn data_offset(&self, slot: u64) -> usize {
        (self.data_offset + slot * self.data_stride) as usize
    }

    pub fn slot_len(&self) -> usize {
        self.slot_bytes as usize
    }
}

fn round_up(value: u64, multiple: u64) -> Option<u64> {
    value.checked_next_multiple_of(multiple)
}

/// What a slot's seq word says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotState {
    Empty,
    Writing(u64),
    Committed(u64),
}

impl SlotState {
    pub fn decode(seq: u64) -> SlotState {
        match seq {
            0 => SlotState::Empty,
            _ if seq & 1 == 1 => SlotState::Writing((seq >> 1) - 1),
            _ => SlotState::Committed((seq >> 1) - 1),
        }
    }

    /// The image id this state is about, if any.
    pub fn image_id(self) -> Option<u64> {
        match self {
            SlotState::Empty => None,
            SlotState::Writing(id) | SlotState::Committed(id) => Some(id),
        }
    }
}

/// Callers guarantee `image_id <= MAX_IMAGE_ID`, so neither encoding overflows.
pub(crate) const fn committed_seq(image_id: u64) -> u64 {
    (image_id + 1) << 1
}

pub(crate) const fn writing_seq(image_id: u64) -> u64 {
    committed_seq(image_id) | 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_IMAGE_ID;

    #[test]
    fn offsets_of_a_small_ring() {
        // 4 slots of 1000 bytes with a u64 meta record.
        let layout = Layout::compute(4, 1000, 8).unwrap();
        assert_eq!(layout.control_stride, 64);
        assert_eq!(layout.data_offset, 8192);
        assert_eq!(layout.data_stride, 4096);
        assert_eq!(layout.total_bytes, 8192 + 4 * 4096);
        assert_eq!(layout.seq_offset(0), 4096);
        assert_eq!(layout.seq_offset(3), 4096 + 3 * 64);
        assert_eq!(layout.meta_offset(1), 4096 + 64 + 8);
        assert_eq!(layout.data_offset(2), 8192 + 2 * 4096);

        // A 60-byte meta record needs two cache lines; 100 of those spill past one page.
        let layout = Layout::compute(100, 4096, 60).unwrap();
        assert_eq!(layout.control_stride, 128);
        assert_eq!(layout.data_offset, 4096 + 4 * 4096);
        assert_eq!(layout.total_bytes, layout.data_offset + 100 * 4096);
    }

    #[test]
    fn absurd_geometries_are_rejected() {
        assert_eq!(Layout::compute(0, 4096, 8), None);
        assert_eq!(Layout::compute(4, 0, 8), None);
        assert_eq!(Layout::compute(u64::MAX, 4096, 8), None);
        assert_eq!(Layout::compute(4, u64::MAX, 8), None);
        assert_eq!(Layout::compute(4, 4096, u64::MAX), None);
        assert_eq!(Layout::compute(1 << 40, 1 << 30, 8), None);
    }

    #[test]
    fn header_golden_bytes() {
        let header = Layout::compute(4, 1000, 8).unwrap().header(1234);
        let bytes = bytemuck::bytes_of(&header);
        #[rustfmt::skip]
        let expected: [u8; 64] = [
            b'S', b'T', b'D', b'D', b'A', b'Q', b'R', b'B', // magic
            1, 0, 0, 0,                                     // layout_version
            0x00, 0x10, 0, 0,                               // header_bytes = 4096
            4, 0, 0, 0, 0, 0, 0, 0,                         // n_slots
            0xe8, 0x03, 0, 0, 0, 0, 0, 0,                   // slot_bytes = 1000
            8, 0, 0, 0, 0, 0, 0, 0,                         // meta_bytes
            0x00, 0x10, 0, 0, 0, 0, 0, 0,                   // control_offset = 4096
            64, 0, 0, 0, 0, 0, 0, 0,                        // control_stride
            0x00, 0x20, 0, 0, 0, 0, 0, 0,                   // data_offset = 8192
        ];
        assert_eq!(bytes[..64], expected);
        assert_eq!(bytes[64..72], 4096u64.to_le_bytes()); // data_stride
        assert_eq!(bytes[72..76], 1234u32.to_le_bytes()); // owner_pid
        assert!(bytes[76..].iter().all(|&b| b == 0));
    }

    #[test]
    fn seq_encoding_round_trips() {
        assert_eq!(SlotState::decode(0), SlotState::Empty);
        for id in [0, 1, 7, MAX_IMAGE_ID] {
            assert_eq!(
                SlotState::decode(committed_seq(id)),
                SlotState::Committed(id)
            );
            assert_eq!(SlotState::decode(writing_seq(id)), SlotState::Writing(id));
        }
        assert_eq!(committed_seq(0), 2);
        assert_eq!(writing_seq(0), 3);
    }
}
