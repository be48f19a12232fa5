//! The end-to-end image checksum: computed once by the assembler while it makes the image, kept
//! beside the image in the ImageBuffer (`ImageMetadata.checksum`), checked by the replication
//! receiver, stored per image in the file and recomputed by `std-daq verify`.
//!
//! Algorithm ([`CHECKSUM_XXH3_BLOCKS`]): the image bytes (exactly `data_bytes` of them, as the
//! ImageBuffer slot holds them, uncompressed) are cut into blocks of [`BLOCK_BYTES`] (the last one
//! may be shorter); each block's xxh3-64 digest is taken; the checksum is the xxh3-64 of those
//! digests written one after the other as little-endian u64s. Blocks make the checksum
//! computable in pieces: replication parts that start on the block grid are hashed as they arrive,
//! in any order, and combined at the end ([`combine`]).
//!
//! Pure arithmetic: no I/O here.

/// Block size of [`CHECKSUM_XXH3_BLOCKS`]: 256 KiB.
pub const BLOCK_BYTES: usize = 256 * 1024;

/// `ImageMetadata.checksum_kind`: no checksum was computed (`checksum` is 0 and means nothing).
pub const CHECKSUM_NONE: u16 = 0;
/// `ImageMetadata.checksum_kind`: the block-wise xxh3-64 described in the module docs.
pub const CHECKSUM_XXH3_BLOCKS: u16 = 1;

/// Blocks an image of `bytes` bytes is cut into (0 for an empty image).
pub fn block_count(bytes: usize) -> usize {
    bytes.div_ceil(BLOCK_BYTES)
}

/// The digest of one block (any length up to [`BLOCK_BYTES`]).
pub fn block_digest(block: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(block)
}

/// The checksum from the block digests in block order.
pub fn combine(digests: &[u64]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for d in digests {
        h.update(&d.to_le_bytes());
    }
    h.digest()
}

/// The checksum of a whole image.
pub fn image_checksum(image: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for block in image.chunks(BLOCK_BYTES) {
        h.update(&block_digest(block).to_le_bytes());
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// The values are part of the file format (`/entry/ledger/checksum`): they never change.
    #[test]
    fn golden_values() {
        assert_eq!(image_checksum(&[]), 0x2d06_8005_38d3_94c2);
        assert_eq!(
            image_checksum(&bytes(BLOCK_BYTES + 1)),
            GOLDEN_BLOCK_PLUS_ONE
        );
    }
    const GOLDEN_BLOCK_PLUS_ONE: u64 = 0xf0df_e93c_9762_8b1e;

    #[test]
    fn pieces_combine_to_the_whole() {
        for n in [0, 1, BLOCK_BYTES - 1, BLOCK_BYTES, 3 * BLOCK_BYTES + 17] {
            let data = bytes(n);
            let digests: Vec<u64> = data.chunks(BLOCK_BYTES).map(block_digest).collect();
            assert_eq!(digests.len(), block_count(n));
            assert_eq!(combine(&digests), image_checksum(&data), "{n} bytes");
        }
    }

    #[test]
    fn one_flipped_bit_changes_the_checksum() {
        let mut data = bytes(2 * BLOCK_BYTES + 5);
        let before = image_checksum(&data);
        data[BLOCK_BYTES + 3] ^= 0x10;
        assert_ne!(image_checksum(&data), before);
    }
}
