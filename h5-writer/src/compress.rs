//! Bitshuffle + LZ4 compression of image chunks, producing exactly the bytes the HDF5 bitshuffle
//! filter (id 32008, <https://github.com/kiyo-masui/bitshuffle>) stores for one chunk, so the writer
//! can compress in its own threads and hand the result to `H5Dwrite_chunk`, while any reader with
//! the filter plugin (h5py, silx, Dectris/PSI tools) decompresses it transparently.
//!
//! # Chunk format (bitshuffle's `bshuf_h5filter.c`, LZ4 variant)
//!
//! ```text
//! u64 BE   uncompressed size of the chunk in bytes
//! u32 BE   block size in BYTES (block elements * element size)
//! blocks   for every full block, then one partial block of the remaining elements rounded down to
//!          a multiple of 8 (if any): u32 BE compressed length, then the LZ4 *block* (raw, no frame)
//!          compression of the bit-shuffled block
//! tail     the last `n_elements % 8` elements, copied unchanged (no length prefix)
//! ```
//!
//! The block size is bitshuffle's default (`bshuf_default_block_size`): 8192 bytes / element size,
//! rounded down to a multiple of 8 elements, at least 128 elements. The filter reads the block size
//! back from the header, so the dataset is created with client values `[0, 2]` (block size "auto",
//! LZ4); the filter's `set_local` turns them into `[major, minor, element size, 0, 2]` in the file.
//!
//! # Bitshuffle
//!
//! Within a block of `n` elements of `s` bytes (`n` a multiple of 8) the output is `8 * s` rows of
//! `n / 8` bytes: row `8 * j + b` holds bit `b` of byte `j` (little-endian byte order) of every
//! element, element `8 * k + m` at bit `m` of the row's byte `k`. It is computed as bitshuffle's
//! reference code does: bytes transposed into `s` byte rows, then each group of 8 bytes transposed
//! as an 8x8 bit matrix in one `u64` (no per-pixel bit loops).
//!
//! # LZ4
//!
//! [`lz4_compress_block`] is a port of liblz4's `LZ4_compress_default` for inputs below 64 KiB (the
//! `byU16` hash table, acceleration 1, no dictionary), so its output is byte-identical to what the
//! C filter writes (tested against Debian's bitshuffle, which links liblz4 1.9.4). Decoding (tests,
//! [`decompress`]) uses `lz4_flex`, an independent implementation.

/// HDF5 filter id of bitshuffle, registered with The HDF Group.
pub const BSHUF_FILTER_ID: i32 = 32008;
/// Bitshuffle filter's compression selector for LZ4 (`BSHUF_H5_COMPRESS_LZ4`).
pub const BSHUF_LZ4: u32 = 2;
/// Client values the dataset is created with: block size 0 (= default), LZ4. Passing more (e.g.
/// the element size) makes `set_local` shift them to the wrong slots and the file unreadable.
pub const BSHUF_CLIENT_VALUES: [u32; 2] = [0, BSHUF_LZ4];
/// Bytes of the chunk header: u64 uncompressed size, u32 block size in bytes.
pub const HEADER_BYTES: usize = 12;

/// `BSHUF_TARGET_BLOCK_SIZE_B`.
const TARGET_BLOCK_BYTES: usize = 8192;
/// `BSHUF_MIN_RECOMMEND_BLOCK`.
const MIN_BLOCK_ELEMS: usize = 128;
/// `BSHUF_BLOCKED_MULT`: block sizes are multiples of this many elements.
const BLOCKED_MULT: usize = 8;

/// Why data could not be compressed or decompressed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressError {
    #[error("bitshuffle: unsupported element size {0} (supported: 1, 2, 4, 8)")]
    UnsupportedElemSize(usize),
    #[error("bitshuffle: {len} bytes is not a whole number of {elem_size}-byte elements")]
    PartialElement { len: usize, elem_size: usize },
    #[error("bitshuffle: corrupt chunk: {0}")]
    Corrupt(String),
}

/// Bitshuffle's default block size in elements for `elem_size`-byte elements
/// (`bshuf_default_block_size`; must never change, readers depend on it only through the header).
pub fn default_block_size(elem_size: usize) -> usize {
    let block = TARGET_BLOCK_BYTES / elem_size.max(1) / BLOCKED_MULT * BLOCKED_MULT;
    block.max(MIN_BLOCK_ELEMS)
}

/// liblz4's `LZ4_compressBound`.
pub const fn lz4_compress_bound(n: usize) -> usize {
    n + n / 255 + 16
}

/// Largest chunk [`Compressor::compress`] can produce for `n_bytes` of input, header included
/// (bitshuffle's `bshuf_compress_lz4_bound` + 12).
pub fn compress_bound(n_bytes: usize, elem_size: usize) -> usize {
    let elem_size = elem_size.max(1);
    let size = n_bytes / elem_size;
    let block = default_block_size(elem_size);
    let mut bound = (lz4_compress_bound(block * elem_size) + 4) * (size / block);
    let leftover = size % block / BLOCKED_MULT * BLOCKED_MULT;
    if leftover > 0 {
        bound += lz4_compress_bound(leftover * elem_size) + 4;
    }
    bound + size % BLOCKED_MULT * elem_size + HEADER_BYTES
}

fn check_elem_size(elem_size: usize) -> Result<(), CompressError> {
    match elem_size {
        1 | 2 | 4 | 8 => Ok(()),
        other => Err(CompressError::UnsupportedElemSize(other)),
    }
}

/// Compresses chunks of one element size into bitshuffle-filter chunks, reusing its buffers: after
/// the first chunk of a given size, compressing allocates nothing.
pub struct Compressor {
    elem_size: usize,
    block_elems: usize,
    /// One block, bytes transposed (`s` rows of `n` bytes).
    byte_rows: Vec<u8>,
    /// One block, bit-shuffled.
    shuffled: Vec<u8>,
    table: Box<Lz4Table>,
    out: Vec<u8>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("elem_size", &self.elem_size)
            .field("block_elems", &self.block_elems)
            .field("out_capacity", &self.out.len())
            .finish_non_exhaustive()
    }
}

impl Compressor {
    /// A compressor for `elem_size`-byte elements (1, 2, 4 or 8) with the default block size.
    pub fn new(elem_size: usize) -> Result<Self, CompressError> {
        check_elem_size(elem_size)?;
        let block_elems = default_block_size(elem_size);
        let block_bytes = block_elems * elem_size;
        Ok(Self {
            elem_size,
            block_elems,
            byte_rows: vec![0; block_bytes],
            shuffled: vec![0; block_bytes],
            table: Box::new(Lz4Table::new()),
            out: Vec::new(),
        })
    }

    pub fn elem_size(&self) -> usize {
        self.elem_size
    }

    /// Block size in elements (written into every chunk's header in bytes).
    pub fn block_elems(&self) -> usize {
        self.block_elems
    }

    /// Compresses `input` (native little-endian elements) into one bitshuffle-filter chunk, header
    /// included. The returned slice borrows an internal buffer, valid until the next call.
    pub fn compress(&mut self, input: &[u8]) -> Result<&[u8], CompressError> {
        let s = self.elem_size;
        if !input.len().is_multiple_of(s) {
            return Err(CompressError::PartialElement {
                len: input.len(),
                elem_size: s,
            });
        }
        let bound = compress_bound(input.len(), s);
        if self.out.len() < bound {
            self.out.resize(bound, 0);
        }
        let out = &mut self.out[..];
        out[..8].copy_from_slice(&(input.len() as u64).to_be_bytes());
        out[8..12].copy_from_slice(&((self.block_elems * s) as u32).to_be_bytes());
        let mut op = HEADER_BYTES;

        let n_elems = input.len() / s;
        let block_bytes = self.block_elems * s;
        let full = n_elems / self.block_elems * block_bytes;
        let last = n_elems % self.block_elems / BLOCKED_MULT * BLOCKED_MULT * s;
        let blocks = input[..full]
            .chunks_exact(block_bytes)
            .chain(std::iter::once(&input[full..full + last]).filter(|b| !b.is_empty()));
        for block in blocks {
            let n = block.len();
            let shuffled = &mut self.shuffled[..n];
            bitshuffle(block, shuffled, &mut self.byte_rows[..n], s);
            let len = lz4_compress_block(shuffled, &mut out[op + 4..], &mut self.table);
            out[op..op + 4].copy_from_slice(&(len as u32).to_be_bytes());
            op += 4 + len;
        }
        let tail = &input[full + last..];
        out[op..op + tail.len()].copy_from_slice(tail);
        op += tail.len();
        Ok(&self.out[..op])
    }
}

/// Decompresses one bitshuffle-filter LZ4 chunk (header included) of `elem_size`-byte elements
/// into `out` (resized to the uncompressed size). The inverse of [`Compressor::compress`], for any
/// block size the header names.
pub fn decompress(chunk: &[u8], elem_size: usize, out: &mut Vec<u8>) -> Result<(), CompressError> {
    check_elem_size(elem_size)?;
    let corrupt = |what: String| CompressError::Corrupt(what);
    let header = chunk
        .get(..HEADER_BYTES)
        .ok_or_else(|| corrupt(format!("{} bytes, shorter than the header", chunk.len())))?;
    let mut size8 = [0u8; 8];
    size8.copy_from_slice(&header[..8]);
    let mut size4 = [0u8; 4];
    size4.copy_from_slice(&header[8..12]);
    let n_bytes = usize::try_from(u64::from_be_bytes(size8))
        .map_err(|_| corrupt("uncompressed size does not fit in memory".into()))?;
    let block_bytes = u32::from_be_bytes(size4) as usize;
    if !n_bytes.is_multiple_of(elem_size) {
        return Err(CompressError::PartialElement {
            len: n_bytes,
            elem_size,
        });
    }
    if block_bytes == 0 || !block_bytes.is_multiple_of(elem_size * BLOCKED_MULT) {
        return Err(corrupt(format!("block size {block_bytes} bytes")));
    }
    out.clear();
    out.resize(n_bytes, 0);
    let n_elems = n_bytes / elem_size;
    let block_elems = block_bytes / elem_size;
    let full = n_elems / block_elems * block_bytes;
    let last = n_elems % block_elems / BLOCKED_MULT * BLOCKED_MULT * elem_size;
    let mut shuffled = vec![0u8; block_bytes];
    let mut byte_rows = vec![0u8; block_bytes];
    let mut ip = HEADER_BYTES;
    let mut start = 0;
    while start < full + last {
        let n = block_bytes.min(full + last - start);
        let len_bytes = chunk
            .get(ip..ip + 4)
            .ok_or_else(|| corrupt(format!("truncated at block starting at byte {start}")))?;
        let mut len4 = [0u8; 4];
        len4.copy_from_slice(len_bytes);
        let len = u32::from_be_bytes(len4) as usize;
        let lz4 = chunk
            .get(ip + 4..ip + 4 + len)
            .ok_or_else(|| corrupt(format!("block at byte {start} runs past the end")))?;
        let got = lz4_flex::block::decompress_into(lz4, &mut shuffled[..n])
            .map_err(|e| corrupt(format!("LZ4 block at byte {start}: {e}")))?;
        if got != n {
            return Err(corrupt(format!(
                "LZ4 block at byte {start} has {got} bytes, expected {n}"
            )));
        }
        bitunshuffle(
            &shuffled[..n],
            &mut out[start..start + n],
            &mut byte_rows[..n],
            elem_size,
        );
        ip += 4 + len;
        start += n;
    }
    let tail = n_bytes - start;
    let rest = &chunk[ip..];
    if rest.len() != tail {
        return Err(corrupt(format!(
            "{} bytes after the blocks, expected {tail}",
            rest.len()
        )));
    }
    out[start..].copy_from_slice(rest);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bitshuffle.

/// Transposes the 8x8 bit matrix in `x` (byte `r`, bit `c` <-> byte `c`, bit `r`): bitshuffle's
/// `TRANS_BIT_8X8` for little-endian hosts. Its own inverse.
#[inline(always)]
fn transpose_bits_8x8(mut x: u64) -> u64 {
    let t = (x ^ (x >> 7)) & 0x00AA_00AA_00AA_00AA;
    x = x ^ t ^ (t << 7);
    let t = (x ^ (x >> 14)) & 0x0000_CCCC_0000_CCCC;
    x = x ^ t ^ (t << 14);
    let t = (x ^ (x >> 28)) & 0x0000_0000_F0F0_F0F0;
    x ^ t ^ (t << 28)
}

/// Transposes the 8x8 byte matrix held in 8 words (word `r`, byte `c` <-> word `c`, byte `r`).
#[inline(always)]
fn transpose_bytes_8x8(x: &mut [u64; 8]) {
    #[inline(always)]
    fn swap(x: &mut [u64; 8], a: usize, b: usize, shift: u32, mask: u64) {
        let t = ((x[a] >> shift) ^ x[b]) & mask;
        x[b] ^= t;
        x[a] ^= t << shift;
    }
    for g in 0..4 {
        swap(x, g, g + 4, 32, 0x0000_0000_FFFF_FFFF);
    }
    for g in [0, 1, 4, 5] {
        swap(x, g, g + 2, 16, 0x0000_FFFF_0000_FFFF);
    }
    for g in [0, 2, 4, 6] {
        swap(x, g, g + 1, 8, 0x00FF_00FF_00FF_00FF);
    }
}

#[inline(always)]
fn read_u64(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(w)
}

/// Byte rows: `rows[j * n + i] = input[i * s + j]` (bitshuffle's `trans_byte_elem`).
fn transpose_bytes_to_rows(input: &[u8], rows: &mut [u8], s: usize) {
    let n = input.len() / s;
    match s {
        2 => {
            let (lo, hi) = rows.split_at_mut(n);
            for ((e, l), h) in input.chunks_exact(2).zip(lo).zip(hi) {
                *l = e[0];
                *h = e[1];
            }
        }
        4 => {
            let (r01, r23) = rows.split_at_mut(2 * n);
            let (r0, r1) = r01.split_at_mut(n);
            let (r2, r3) = r23.split_at_mut(n);
            for (i, e) in input.chunks_exact(4).enumerate() {
                r0[i] = e[0];
                r1[i] = e[1];
                r2[i] = e[2];
                r3[i] = e[3];
            }
        }
        _ => {
            for (i, e) in input.chunks_exact(s).enumerate() {
                for (j, &byte) in e.iter().enumerate() {
                    rows[j * n + i] = byte;
                }
            }
        }
    }
}

/// Inverse of [`transpose_bytes_to_rows`].
fn transpose_rows_to_bytes(rows: &[u8], out: &mut [u8], s: usize) {
    let n = out.len() / s;
    for (i, e) in out.chunks_exact_mut(s).enumerate() {
        for (j, byte) in e.iter_mut().enumerate() {
            *byte = rows[j * n + i];
        }
    }
}

/// Bit-transposes one byte row of `n` bytes into 8 bit rows of `n / 8` bytes:
/// `dst[b * n/8 + k]` = bit `b` of bytes `src[8k..8k+8]`.
fn transpose_row_bits(src: &[u8], dst: &mut [u8]) {
    let row = src.len() / 8;
    let fast = row / 8 * 8;
    // 64 bytes at a time: 8 bit transposes, then a byte transpose gives one u64 per bit row.
    for (c, chunk) in src[..8 * fast].chunks_exact(64).enumerate() {
        let mut x = [0u64; 8];
        for (w, bytes) in x.iter_mut().zip(chunk.chunks_exact(8)) {
            *w = read_u64(bytes);
        }
        store_bit_rows(x, dst, row, 8 * c);
    }
    for k in fast..row {
        let x = transpose_bits_8x8(read_u64(&src[8 * k..]));
        for (b, byte) in x.to_le_bytes().into_iter().enumerate() {
            dst[b * row + k] = byte;
        }
    }
}

/// Inverse of [`transpose_row_bits`].
fn untranspose_row_bits(src: &[u8], dst: &mut [u8]) {
    let row = src.len() / 8;
    for (k, out) in dst.chunks_exact_mut(8).enumerate() {
        let mut w = [0u8; 8];
        for (b, byte) in w.iter_mut().enumerate() {
            *byte = src[b * row + k];
        }
        out.copy_from_slice(&transpose_bits_8x8(u64::from_le_bytes(w)).to_le_bytes());
    }
}

/// The even bytes of `x` (bytes 0, 2, 4, 6) packed into the low 32 bits.
#[inline(always)]
fn even_bytes(x: u64) -> u64 {
    let x = x & 0x00FF_00FF_00FF_00FF;
    let x = (x | (x >> 8)) & 0x0000_FFFF_0000_FFFF;
    (x | (x >> 16)) & 0x0000_0000_FFFF_FFFF
}

/// Transposes 8 words bit-wise and then byte-wise and stores word `b` at `dst[b * row + k..+8]`.
#[inline(always)]
fn store_bit_rows(mut x: [u64; 8], dst: &mut [u8], row: usize, k: usize) {
    for w in x.iter_mut() {
        *w = transpose_bits_8x8(*w);
    }
    transpose_bytes_8x8(&mut x);
    for (b, w) in x.iter().enumerate() {
        dst[b * row + k..b * row + k + 8].copy_from_slice(&w.to_le_bytes());
    }
}

/// [`bitshuffle`] for 2-byte elements when `n / 64` is whole: bytes split and bits transposed in
/// registers, 64 elements at a time, without the byte-row pass.
fn bitshuffle_u16(input: &[u8], out: &mut [u8]) {
    let n = input.len() / 2;
    let row = n / 8;
    let (lo_rows, hi_rows) = out.split_at_mut(n);
    for (c, chunk) in input.chunks_exact(128).enumerate() {
        let mut lo = [0u64; 8];
        let mut hi = [0u64; 8];
        for (g, pair) in chunk.chunks_exact(16).enumerate() {
            let a = read_u64(pair);
            let b = read_u64(&pair[8..]);
            lo[g] = even_bytes(a) | (even_bytes(b) << 32);
            hi[g] = even_bytes(a >> 8) | (even_bytes(b >> 8) << 32);
        }
        store_bit_rows(lo, lo_rows, row, 8 * c);
        store_bit_rows(hi, hi_rows, row, 8 * c);
    }
}

/// Bitshuffles one block (`input.len() / s` a multiple of 8) into `out`; `scratch` is as long.
fn bitshuffle(input: &[u8], out: &mut [u8], scratch: &mut [u8], s: usize) {
    debug_assert_eq!(input.len() % (8 * s), 0);
    let n = input.len() / s;
    if s == 2 && n.is_multiple_of(64) {
        bitshuffle_u16(input, out);
        return;
    }
    let rows: &[u8] = if s == 1 {
        input
    } else {
        transpose_bytes_to_rows(input, scratch, s);
        scratch
    };
    for (src, dst) in rows.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        transpose_row_bits(src, dst);
    }
}

/// Inverse of [`bitshuffle`].
fn bitunshuffle(input: &[u8], out: &mut [u8], scratch: &mut [u8], s: usize) {
    let n = input.len() / s;
    if s == 1 {
        untranspose_row_bits(input, out);
        return;
    }
    for (src, dst) in input.chunks_exact(n).zip(scratch.chunks_exact_mut(n)) {
        untranspose_row_bits(src, dst);
    }
    transpose_rows_to_bytes(scratch, out, s);
}

// ---------------------------------------------------------------------------------------------
// LZ4 block compression: liblz4 1.9.x `LZ4_compress_generic` specialised for `LZ4_compress_default`
// on inputs < 64 KiB (tableType byU16, noDict, notLimited, acceleration 1).

const MINMATCH: usize = 4;
const MFLIMIT: usize = 12;
const LASTLITERALS: usize = 5;
const LZ4_MIN_LENGTH: usize = MFLIMIT + 1;
/// `LZ4_64Klimit`: below this the byU16 table is used.
const LZ4_64K_LIMIT: usize = 65536 + MFLIMIT - 1;
/// `LZ4_HASHLOG + 1` with the default `LZ4_MEMORY_USAGE` of 14.
const HASH_LOG_U16: u32 = 13;
const SKIP_TRIGGER: u32 = 6;
const RUN_MASK: usize = 15;
const ML_MASK: usize = 15;

/// liblz4's hash table for the byU16 mode (16 KiB).
struct Lz4Table([u16; 1 << HASH_LOG_U16]);

impl Lz4Table {
    fn new() -> Self {
        Self([0; 1 << HASH_LOG_U16])
    }
}

#[inline(always)]
fn read_u32(src: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&src[i..i + 4]);
    u32::from_le_bytes(w)
}

#[inline(always)]
fn hash(sequence: u32) -> usize {
    (sequence.wrapping_mul(2_654_435_761) >> (32 - HASH_LOG_U16)) as usize
}

/// `LZ4_count`: how many bytes from `a` equal those from `b` (`b < a`), stopping at `limit`.
#[inline(always)]
fn count_common(src: &[u8], mut a: usize, mut b: usize, limit: usize) -> usize {
    let start = a;
    while a + 8 <= limit {
        let diff = read_u64(&src[a..]) ^ read_u64(&src[b..]);
        if diff != 0 {
            return a - start + (diff.trailing_zeros() / 8) as usize;
        }
        a += 8;
        b += 8;
    }
    while a < limit && src[a] == src[b] {
        a += 1;
        b += 1;
    }
    a - start
}

/// Writes a literal or match length continuation (`len` already reduced by 15).
#[inline(always)]
fn write_length(dst: &mut [u8], op: &mut usize, mut len: usize) {
    while len >= 255 {
        dst[*op] = 255;
        *op += 1;
        len -= 255;
    }
    dst[*op] = len as u8;
    *op += 1;
}

/// LZ4 block (raw format) compression of `src` into `dst`, byte-identical to liblz4's
/// `LZ4_compress_default`. `src` must be shorter than 64 KiB + 11 bytes and `dst` at least
/// [`lz4_compress_bound`]`(src.len())` long. Returns the compressed length.
fn lz4_compress_block(src: &[u8], dst: &mut [u8], table: &mut Lz4Table) -> usize {
    assert!(
        src.len() < LZ4_64K_LIMIT,
        "LZ4 block of {} bytes",
        src.len()
    );
    assert!(dst.len() >= lz4_compress_bound(src.len()));
    let n = src.len();
    let mut op = 0;
    let mut anchor = 0;
    if n >= LZ4_MIN_LENGTH {
        let table = &mut table.0;
        table.fill(0);
        let mflimit_plus_one = n - MFLIMIT + 1;
        let matchlimit = n - LASTLITERALS;

        table[hash(read_u32(src, 0))] = 0;
        let mut ip = 1;
        let mut forward_h = hash(read_u32(src, ip));
        'main: loop {
            // Find a match, skipping faster the longer none is found.
            let mut m;
            {
                let mut forward_ip = ip;
                let mut step = 1;
                let mut search_match_nb = 1usize << SKIP_TRIGGER;
                loop {
                    let h = forward_h;
                    let current = forward_ip;
                    m = usize::from(table[h]);
                    ip = forward_ip;
                    forward_ip += step;
                    step = search_match_nb >> SKIP_TRIGGER;
                    search_match_nb += 1;
                    if forward_ip > mflimit_plus_one {
                        break 'main;
                    }
                    forward_h = hash(read_u32(src, forward_ip));
                    table[h] = current as u16;
                    if read_u32(src, m) == read_u32(src, ip) {
                        break;
                    }
                }
            }
            // Catch up backwards.
            while ip > anchor && m > 0 && src[ip - 1] == src[m - 1] {
                ip -= 1;
                m -= 1;
            }
            // Literals.
            let lit_len = ip - anchor;
            let mut token = op;
            op += 1;
            if lit_len >= RUN_MASK {
                dst[token] = (RUN_MASK << 4) as u8;
                write_length(dst, &mut op, lit_len - RUN_MASK);
            } else {
                dst[token] = (lit_len << 4) as u8;
            }
            dst[op..op + lit_len].copy_from_slice(&src[anchor..ip]);
            op += lit_len;

            loop {
                // Offset and match length.
                dst[op..op + 2].copy_from_slice(&((ip - m) as u16).to_le_bytes());
                op += 2;
                let match_code = count_common(src, ip + MINMATCH, m + MINMATCH, matchlimit);
                ip += match_code + MINMATCH;
                if match_code >= ML_MASK {
                    dst[token] += ML_MASK as u8;
                    write_length(dst, &mut op, match_code - ML_MASK);
                } else {
                    dst[token] += match_code as u8;
                }
                anchor = ip;
                if ip >= mflimit_plus_one {
                    break 'main;
                }
                table[hash(read_u32(src, ip - 2))] = (ip - 2) as u16;
                // An immediate next match needs no literals.
                let h = hash(read_u32(src, ip));
                let next = usize::from(table[h]);
                table[h] = ip as u16;
                if read_u32(src, next) == read_u32(src, ip) {
                    m = next;
                    token = op;
                    dst[token] = 0;
                    op += 1;
                    continue;
                }
                break;
            }
            ip += 1;
            forward_h = hash(read_u32(src, ip));
        }
    }
    // Last literals.
    let last_run = n - anchor;
    if last_run >= RUN_MASK {
        dst[op] = (RUN_MASK << 4) as u8;
        op += 1;
        write_length(dst, &mut op, last_run - RUN_MASK);
    } else {
        dst[op] = (last_run << 4) as u8;
        op += 1;
    }
    dst[op..op + last_run].copy_from_slice(&src[anchor..]);
    op + last_run
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Bit `8j + b` of element `8k + m` lands at bit `m` of byte `k` of row `8j + b`: the
    /// definition, computed bit by bit.
    fn naive_bitshuffle(input: &[u8], s: usize) -> Vec<u8> {
        let n = input.len() / s;
        let mut out = vec![0u8; input.len()];
        for e in 0..n {
            for j in 0..s {
                for b in 0..8 {
                    let bit = (input[e * s + j] >> b) & 1;
                    let row = 8 * j + b;
                    out[row * (n / 8) + e / 8] |= bit << (e % 8);
                }
            }
        }
        out
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn default_block_sizes_match_bitshuffle() {
        assert_eq!(default_block_size(1), 8192);
        assert_eq!(default_block_size(2), 4096);
        assert_eq!(default_block_size(4), 2048);
        assert_eq!(default_block_size(8), 1024);
        assert_eq!(default_block_size(24), 336);
        assert_eq!(default_block_size(128), 128);
    }

    #[test]
    fn bitshuffle_matches_the_definition() {
        for s in [1, 2, 4, 8] {
            // Rows of 64+ bytes take the fast path; others the per-group one.
            for n in [8, 16, 56, 64, 72, 512, 520, 4096] {
                let input = pseudo_random(n * s, (n * s) as u64);
                let mut out = vec![0; n * s];
                let mut scratch = vec![0; n * s];
                bitshuffle(&input, &mut out, &mut scratch, s);
                assert_eq!(out, naive_bitshuffle(&input, s), "s={s} n={n}");
                let mut back = vec![0; n * s];
                bitunshuffle(&out, &mut back, &mut scratch, s);
                assert_eq!(back, input, "s={s} n={n}");
            }
        }
    }

    #[test]
    fn lz4_blocks_decode_with_lz4_flex() {
        let mut table = Lz4Table::new();
        let mut inputs = vec![
            vec![],
            vec![7; 5],
            vec![0; 13],
            vec![0; 8192],
            pseudo_random(8192, 3),
            (0..8192u32).map(|i| (i / 100) as u8).collect(),
        ];
        // Runs with noise, like bit-shuffled detector data.
        let mut mixed = vec![0u8; 4096];
        mixed.extend(pseudo_random(2048, 9));
        mixed.extend(vec![0xFF; 2048]);
        inputs.push(mixed);
        for n in 0..40 {
            inputs.push(pseudo_random(n, n as u64).iter().map(|b| b & 3).collect());
        }
        for input in inputs {
            let mut dst = vec![0; lz4_compress_bound(input.len())];
            let len = lz4_compress_block(&input, &mut dst, &mut table);
            let back = lz4_flex::block::decompress(&dst[..len], input.len()).unwrap();
            assert_eq!(back, input, "len {}", input.len());
        }
    }

    #[test]
    fn compress_round_trip_all_sizes() {
        for s in [1, 2, 4, 8] {
            let mut c = Compressor::new(s).unwrap();
            for n_elems in [0, 1, 7, 8, 9, 15, 1000, 4095, 4096, 4097, 8192 + 13, 40_000] {
                let input = pseudo_random(n_elems * s, 77 + n_elems as u64);
                let chunk = c.compress(&input).unwrap().to_vec();
                assert!(chunk.len() <= compress_bound(input.len(), s));
                assert_eq!(&chunk[..8], &(input.len() as u64).to_be_bytes());
                assert_eq!(&chunk[8..12], &(8192u32.max(128 * s as u32)).to_be_bytes());
                let mut back = Vec::new();
                decompress(&chunk, s, &mut back).unwrap();
                assert_eq!(back, input, "s={s} n={n_elems}");
            }
        }
    }

    #[test]
    fn errors() {
        assert_eq!(
            Compressor::new(3).unwrap_err(),
            CompressError::UnsupportedElemSize(3)
        );
        let mut c = Compressor::new(2).unwrap();
        assert!(matches!(
            c.compress(&[1, 2, 3]),
            Err(CompressError::PartialElement { len: 3, .. })
        ));
        let chunk = c.compress(&[5u8; 4000]).unwrap().to_vec();
        let mut out = Vec::new();
        for bad in [
            &chunk[..5],
            &chunk[..chunk.len() - 1],
            &chunk[..HEADER_BYTES + 2],
        ] {
            assert!(matches!(
                decompress(bad, 2, &mut out),
                Err(CompressError::Corrupt(_))
            ));
        }
        let mut longer = chunk.clone();
        longer.push(0);
        assert!(decompress(&longer, 2, &mut out).is_err());
    }
}
