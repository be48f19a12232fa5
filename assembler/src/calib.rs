//! JUNGFRAU conversion (`jungfrau-converted`): raw u16 pixels to float32 energies or to photon
//! counts (int16 / int32, `converted_output`).
//!
//! A raw pixel is `gain bits (15..14) | adc (13..0)`. Gain bits 00 -> G0, 01 -> G1, 11 -> G2;
//! 10 is invalid and gives 0. Output = `(adc - pedestal[g][px]) / gain[g][px]` in keV, where the
//! file's `gains` are in ADU/keV (the JUNGFRAU calibration convention, as in PSI's
//! jungfrau_utils); the reciprocal `1/gain` is computed once at load (in f64, stored as f32), so
//! the loop is `(adc - pedestal) * inv_gain`. A masked pixel (`pixel_mask` nonzero), or a stage
//! whose gain is 0 or whose pedestal/gain is not finite, gives exactly +0.0: masking is folded
//! into the tables (pedestal 0, inv_gain 0), so the hot loop has no mask branch.
//!
//! Photon counts (as Jungfraujoch): the table holds `1/(gain * photon_energy_kev)` instead
//! (computed in f64 at load, stored as f32), so the loop is the same one multiply,
//! `x = (adc - pedestal) * factor`, then `round(x)` (half away from zero), kept negative, clamped
//! to `[MIN + 1, MAX]` of the type (MAX = the saturation value). MIN (-32768 / -2147483648) marks
//! a pixel without a value: masked, bad stage (folded in as factor NaN), gain code 10, and the
//! rows of a lost packet. The rules: [`ConvertedPixel`] impls and docs/calibration.md.
//!
//! Tables are per module, in the receiver's module orientation (row-major 512x1024, before any
//! mirroring), one contiguous array per stage and quantity (6 streams of f32: 24 bytes per pixel),
//! so a row converts as a straight vectorisable loop. File layout: docs/calibration.md.
//!
//! Never: convert a pixel with another stage's parameters, or allocate or log per image.

use std::path::{Path, PathBuf};
use std_daq_common::config::ConvertedOutput;

/// Module frame size (pixels) the tables describe.
pub const MODULE_WIDTH: usize = 1024;
pub const MODULE_HEIGHT: usize = 512;
const MODULE_PIXELS: usize = MODULE_WIDTH * MODULE_HEIGHT;
/// Gain stages in the file (G0, G1, G2).
pub const N_STAGES: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("calibration file {file}: cannot open: {source}")]
    Open { file: PathBuf, source: hdf5::Error },
    #[error("calibration file {file}: dataset `{dataset}`: {message}")]
    Dataset {
        file: PathBuf,
        dataset: &'static str,
        message: String,
    },
    #[error(
        "calibration file {file}: dataset `{dataset}` has shape {found:?}, expected {expected:?} ({what})"
    )]
    Shape {
        file: PathBuf,
        dataset: &'static str,
        expected: Vec<usize>,
        found: Vec<usize>,
        what: &'static str,
    },
}

/// What the tables convert to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    /// keV: factor `1/gain`, masked = factor 0 (output +0.0).
    Energy,
    /// Photons of this energy (keV): factor `1/(gain * energy)`, masked = factor NaN (output
    /// the type's MIN).
    Photons { energy_kev: f64 },
}

impl Scale {
    /// From the config's `converted_output` and `photon_energy_kev`.
    pub fn from_config(cfg: &std_daq_common::DetectorConfig) -> Self {
        match (cfg.converted_output, cfg.photon_energy_kev) {
            (ConvertedOutput::Float32, _) | (_, None) => Scale::Energy,
            (_, Some(energy_kev)) => Scale::Photons { energy_kev },
        }
    }
}

/// Conversion tables for one module.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleCalibration {
    /// `pedestal[s][px]` in ADU, s = G0, G1, G2.
    pub pedestal: [Vec<f32>; N_STAGES],
    /// `inv_gain[s][px]`: the factor after the pedestal, in keV/ADU (`1/gain`, 0 where masked)
    /// or, for [`Scale::Photons`], photons/ADU (`1/(gain * energy)`, NaN where masked).
    pub inv_gain: [Vec<f32>; N_STAGES],
}

/// Pixels masked for a reason, counted at load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaskCounts {
    /// Pixels with a nonzero `pixel_mask` entry.
    pub pixel_mask: usize,
    /// (pixel, stage) pairs with gain 0 or a non-finite pedestal or gain.
    pub bad_stage: usize,
}

impl ModuleCalibration {
    /// Tables from plain per-pixel values (module orientation, `MODULE_PIXELS` each): `gain` in
    /// ADU/keV, `mask[px]` true = bad pixel. Counts what was masked into `counts`.
    pub fn from_values(
        pedestal: [&[f32]; N_STAGES],
        gain: [&[f32]; N_STAGES],
        mask: &[bool],
        counts: &mut MaskCounts,
    ) -> Self {
        Self::from_values_scaled(pedestal, gain, mask, Scale::Energy, counts)
    }

    /// As [`Self::from_values`], converting to `scale`. For photons a stage whose factor
    /// `1/(gain * energy)` is not finite in f32 counts as a bad stage too.
    pub fn from_values_scaled(
        pedestal: [&[f32]; N_STAGES],
        gain: [&[f32]; N_STAGES],
        mask: &[bool],
        scale: Scale,
        counts: &mut MaskCounts,
    ) -> Self {
        counts.pixel_mask += mask.iter().filter(|m| **m).count();
        let (masked, energy) = match scale {
            Scale::Energy => (0.0, 1.0),
            Scale::Photons { energy_kev } => (f32::NAN, energy_kev),
        };
        let mut out = ModuleCalibration {
            pedestal: std::array::from_fn(|_| vec![0.0; mask.len()]),
            inv_gain: std::array::from_fn(|_| vec![masked; mask.len()]),
        };
        for s in 0..N_STAGES {
            for px in 0..mask.len() {
                let (p, g) = (pedestal[s][px], gain[s][px]);
                if mask[px] {
                    continue;
                }
                // Energy: 1/g exactly as before (times 1.0 is exact in f64).
                let factor = (1.0 / (f64::from(g) * energy)) as f32;
                let factor_ok = scale == Scale::Energy || factor.is_finite();
                if !(p.is_finite() && g.is_finite() && g != 0.0 && factor_ok) {
                    counts.bad_stage += 1;
                    continue;
                }
                out.pedestal[s][px] = p;
                out.inv_gain[s][px] = factor;
            }
        }
        out
    }

    pub fn n_pixels(&self) -> usize {
        self.pedestal[0].len()
    }
}

/// An image pixel type of converted JUNGFRAU data: what the loop writes for a scaled value
/// `x = (adc - pedestal) * factor` and for a pixel without a value.
pub trait ConvertedPixel:
    bytemuck::Pod + Default + PartialEq + std::fmt::Debug + Send + Sync + 'static
{
    /// A pixel without a value: gain code 10, the rows of a lost packet, a missing module.
    /// (Masked pixels and bad stages come out of the tables: +0.0 as f32, `INVALID` as
    /// photons.)
    const INVALID: Self;
    /// The output for `x` (NaN only from a masked table entry).
    fn from_scaled(x: f32) -> Self;
    /// The value a double pixel keeps when split in two (`mask`: see [`Self::MASKED_DOUBLE`]).
    fn half(self) -> Self;
    /// What `double_pixels: "mask"` writes over double and gap pixels.
    const MASKED_DOUBLE: Self;
}

/// keV, exactly as before photon output existed.
impl ConvertedPixel for f32 {
    const INVALID: Self = 0.0;
    const MASKED_DOUBLE: Self = 0.0;
    #[inline(always)]
    fn from_scaled(x: f32) -> Self {
        x
    }
    fn half(self) -> Self {
        self * 0.5
    }
}

/// Photon counts, int16: `round(x)` half away from zero (as `f32::round`), negatives kept,
/// clamped to `[-32767, 32767]` (32767 = saturation); NaN (masked) -> -32768.
impl ConvertedPixel for i16 {
    const INVALID: Self = i16::MIN;
    const MASKED_DOUBLE: Self = i16::MIN;
    #[inline(always)]
    fn from_scaled(x: f32) -> Self {
        // Written so that it vectorises (a saturating `as i32` per lane does not, on x86):
        // round half away from zero as `trunc(x + copysign(0.49999997, x))` (exact for every
        // f32: the largest f32 below 0.5 never carries a value below x.5 over the next integer;
        // LLVM lowers `f32::round` the same way), clamp in f32 (a NaN stays NaN and is replaced
        // below), then the whole number |v| <= 32767 is read out of the
        // mantissa of `v + 1.5 * 2^23` (a bit cast, exact for |v| < 2^22).
        let r = (x + 0.499_999_97f32.copysign(x)).trunc();
        let c = r.clamp(-32767.0, 32767.0);
        let v = ((c + 12_582_912.0).to_bits() as i32 - 0x4b40_0000) as i16;
        if x.is_nan() {
            i16::MIN
        } else {
            v
        }
    }
    /// Integer division truncating toward zero (as Jungfraujoch); MIN and MAX stay as they are.
    fn half(self) -> Self {
        if self == i16::MIN || self == i16::MAX {
            self
        } else {
            self / 2
        }
    }
}

/// Photon counts, int32: as int16 with `[-2147483647, 2147483647]`; NaN (masked) ->
/// -2147483648.
impl ConvertedPixel for i32 {
    const INVALID: Self = i32::MIN;
    const MASKED_DOUBLE: Self = i32::MIN;
    #[inline(always)]
    fn from_scaled(x: f32) -> Self {
        let v = (x.round() as i32).max(i32::MIN + 1);
        if x.is_nan() {
            i32::MIN
        } else {
            v
        }
    }
    fn half(self) -> Self {
        if self == i32::MIN || self == i32::MAX {
            self
        } else {
            self / 2
        }
    }
}

/// Pixels per block in [`convert_row`]: a block whose pixels are all in one gain stage reads
/// only that stage's tables (8 bytes per pixel instead of 24), which is what most real frames
/// are (G0 background); one with two stages reads those two (16 bytes). 64 pixels = 4 cache
/// lines of each f32 table. (16 and 32 make fewer mixed blocks around Bragg spots but measured
/// no faster: the conversion is memory-bound.)
const BLOCK: usize = 64;

/// Converts one row: `raw` holds `out.len()` little-endian u16 pixels starting at module pixel
/// `start`. Branch-free per pixel (selects), so it vectorises; per block of [`BLOCK`] pixels,
/// only the tables of the gain stages that occur in it are read.
pub fn convert_row<P: ConvertedPixel>(
    cal: &ModuleCalibration,
    start: usize,
    raw: &[u8],
    out: &mut [P],
) {
    convert::<P, false>(cal, start, raw, out);
}

/// As [`convert_row`], with the pixels in reverse order: `out[n - 1 - i]` is pixel `start + i`
/// (a row segment of a module mirrored in x, written straight into the image).
pub fn convert_row_reversed<P: ConvertedPixel>(
    cal: &ModuleCalibration,
    start: usize,
    raw: &[u8],
    out: &mut [P],
) {
    convert::<P, true>(cal, start, raw, out);
}

/// [`convert_row`] (`REV` false) or [`convert_row_reversed`] (`REV` true).
fn convert<P: ConvertedPixel, const REV: bool>(
    cal: &ModuleCalibration,
    start: usize,
    raw: &[u8],
    out: &mut [P],
) {
    let n = out.len();
    let raw = &raw[..2 * n];
    // FrameBuffer slots are page aligned: the bytes are read as u16 in place. Otherwise (or on a
    // big-endian host) each block is decoded into a stack buffer first.
    match bytemuck::try_cast_slice::<u8, u16>(raw) {
        Ok(px) if cfg!(target_endian = "little") => convert_u16::<P, REV>(cal, start, px, out),
        _ => {
            let mut buf = [0u16; BLOCK];
            for (k, bytes) in raw.chunks(2 * BLOCK).enumerate() {
                let (i, len) = (k * BLOCK, bytes.len() / 2);
                for (v, b) in buf.iter_mut().zip(bytes.chunks_exact(2)) {
                    *v = u16::from_le_bytes([b[0], b[1]]);
                }
                let o = if REV {
                    &mut out[n - i - len..n - i]
                } else {
                    &mut out[i..i + len]
                };
                convert_u16::<P, REV>(cal, start + i, &buf[..len], o);
            }
        }
    }
}

/// `out` (reversed when `REV`) = pixels `raw` from module pixel `start` on: whole blocks with
/// fixed-size arrays (no bounds checks in the loops), then the remaining `n % BLOCK` pixels.
fn convert_u16<P: ConvertedPixel, const REV: bool>(
    cal: &ModuleCalibration,
    start: usize,
    raw: &[u16],
    out: &mut [P],
) {
    let n = out.len();
    let full = n - n % BLOCK;
    let (raw_full, raw_tail) = raw[..n].split_at(full);
    let tail_start = start + full;
    if REV {
        let (out_tail, out_full) = out.split_at_mut(n - full);
        for ((r, o), px) in raw_full
            .chunks_exact(BLOCK)
            .zip(out_full.rchunks_exact_mut(BLOCK))
            .zip((start..).step_by(BLOCK))
        {
            convert_block::<P, REV>(cal, px, r, o);
        }
        convert_mixed::<P, REV>(cal, tail_start, raw_tail, out_tail);
    } else {
        let (out_full, out_tail) = out.split_at_mut(full);
        for ((r, o), px) in raw_full
            .chunks_exact(BLOCK)
            .zip(out_full.chunks_exact_mut(BLOCK))
            .zip((start..).step_by(BLOCK))
        {
            convert_block::<P, REV>(cal, px, r, o);
        }
        convert_mixed::<P, REV>(cal, tail_start, raw_tail, out_tail);
    }
}

/// One block of exactly [`BLOCK`] pixels from module pixel `px`.
#[inline(always)]
fn convert_block<P: ConvertedPixel, const REV: bool>(
    cal: &ModuleCalibration,
    px: usize,
    raw: &[u16],
    out: &mut [P],
) {
    let raw: &[u16; BLOCK] = raw.try_into().expect("a whole block");
    let out: &mut [P; BLOCK] = out.try_into().expect("a whole block");
    let (mut all, mut any) = (0xffffu16, 0u16);
    for v in raw {
        all &= v;
        any |= v;
    }
    // Same gain bits in every pixel of the block iff AND and OR agree on bits 15..14.
    if (all ^ any) >> 14 != 0 {
        return convert_several::<P, REV>(cal, px, raw, out);
    }
    let code = any >> 14;
    if code == 2 {
        return out.fill(P::INVALID);
    }
    let (p, g) = stage_block(cal, stage_of(code), px);
    if REV && std::mem::size_of::<P>() != 4 {
        // Forward into a stack block, then one reversing copy: a reversed store inside the
        // conversion loop kept it from vectorising for 2-byte pixels. (4-byte pixels keep the
        // reversed store, the float32 kernel as before.)
        let mut tmp = [P::default(); BLOCK];
        for i in 0..BLOCK {
            let adc = f32::from(raw[i] & 0x3fff);
            tmp[i] = P::from_scaled((adc - p[i]) * g[i]);
        }
        for (o, t) in out.iter_mut().zip(tmp.iter().rev()) {
            *o = *t;
        }
    } else {
        for i in 0..BLOCK {
            let adc = f32::from(raw[i] & 0x3fff);
            out[if REV { BLOCK - 1 - i } else { i }] = P::from_scaled((adc - p[i]) * g[i]);
        }
    }
}

/// A block with several gain codes: if only two stages occur (and perhaps invalid pixels), only
/// their tables are read ([`convert_two`]), else all three ([`convert_mixed`]). A G0 background
/// with scattered G1 pixels makes most mixed blocks G0 + G1, few with G2 as well.
#[inline(always)]
fn convert_several<P: ConvertedPixel, const REV: bool>(
    cal: &ModuleCalibration,
    px: usize,
    raw: &[u16; BLOCK],
    out: &mut [P; BLOCK],
) {
    // Bit 15 of each: some pixel has gain code 00 (G0), 01 (G1), 11 (G2).
    let (mut g0, mut g1, mut g2) = (0u16, 0u16, 0u16);
    for v in raw {
        let low = v << 1;
        g0 |= !(v | low);
        g1 |= !v & low;
        g2 |= v & low;
    }
    match (g0 >> 15 != 0, g1 >> 15 != 0, g2 >> 15 != 0) {
        (true, true, true) => convert_mixed::<P, REV>(cal, px, raw, out),
        (_, _, false) => convert_two::<P, REV>(cal, px, raw, out, 0, 1),
        (_, false, _) => convert_two::<P, REV>(cal, px, raw, out, 0, 3),
        (false, _, _) => convert_two::<P, REV>(cal, px, raw, out, 1, 3),
    }
}

/// Stage `s`'s pedestal and factor tables for the block from module pixel `px`.
#[inline(always)]
fn stage_block(cal: &ModuleCalibration, s: usize, px: usize) -> (&[f32; BLOCK], &[f32; BLOCK]) {
    let p = cal.pedestal[s][px..px + BLOCK].try_into().expect("block");
    let g = cal.inv_gain[s][px..px + BLOCK].try_into().expect("block");
    (p, g)
}

/// The stage of gain code 0, 1 or 3.
const fn stage_of(code: u16) -> usize {
    (code as usize).div_ceil(2)
}

/// A block whose pixels have gain codes `a`, `b` (G0 = 0, G1 = 1, G2 = 3) or the invalid code:
/// both stages computed, the pixel's own selected, as [`convert_mixed`] does with three (the
/// same bits), reading 16 bytes of tables per pixel instead of 24.
#[inline(always)]
fn convert_two<P: ConvertedPixel, const REV: bool>(
    cal: &ModuleCalibration,
    px: usize,
    raw: &[u16; BLOCK],
    out: &mut [P; BLOCK],
    a: u16,
    b: u16,
) {
    let ((pa, ga), (pb, gb)) = (
        stage_block(cal, stage_of(a), px),
        stage_block(cal, stage_of(b), px),
    );
    for i in 0..BLOCK {
        let v = raw[i];
        let adc = f32::from(v & 0x3fff);
        let gain_bits = v >> 14;
        let ea = (adc - pa[i]) * ga[i];
        let eb = (adc - pb[i]) * gb[i];
        let e = if gain_bits == b { eb } else { ea };
        out[if REV { BLOCK - 1 - i } else { i }] = if gain_bits == 2 {
            P::INVALID
        } else {
            P::from_scaled(e)
        };
    }
}

/// Any pixels (a block with several gain stages, or a row's last `n % BLOCK` pixels): all three
/// stages computed, the pixel's own selected. Gives the same bits as the single-stage path.
fn convert_mixed<P: ConvertedPixel, const REV: bool>(
    cal: &ModuleCalibration,
    px: usize,
    raw: &[u16],
    out: &mut [P],
) {
    let n = out.len();
    let (p0, p1, p2) = (
        &cal.pedestal[0][px..px + n],
        &cal.pedestal[1][px..px + n],
        &cal.pedestal[2][px..px + n],
    );
    let (g0, g1, g2) = (
        &cal.inv_gain[0][px..px + n],
        &cal.inv_gain[1][px..px + n],
        &cal.inv_gain[2][px..px + n],
    );
    let raw = &raw[..n];
    for i in 0..n {
        let v = raw[i];
        let adc = f32::from(v & 0x3fff);
        let gain_bits = v >> 14;
        let e0 = (adc - p0[i]) * g0[i];
        let e1 = (adc - p1[i]) * g1[i];
        let e2 = (adc - p2[i]) * g2[i];
        let e = if gain_bits == 0 { e0 } else { e1 };
        let e = if gain_bits == 3 { e2 } else { e };
        out[if REV { n - 1 - i } else { i }] = if gain_bits == 2 {
            P::INVALID
        } else {
            P::from_scaled(e)
        };
    }
}

/// Calibration of a whole detector: one table set per module.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub modules: Vec<ModuleCalibration>,
    pub masked: MaskCounts,
    /// Which calibration this is ([`calibration_id`] of the file's content; never 0, which
    /// `ImageMetadata.calibration_id` uses for "raw, no calibration").
    pub id: u64,
}

/// The id of a calibration: xxh3-64 of its content as the assembler reads it, i.e. the bytes of
/// `gains` then `pedestals` as little-endian f32 (whatever float type the file stores), then
/// `pixel_mask` as one byte per pixel (1 = masked, 0 = not), all in the file's stacked row-major
/// order; 0 becomes 1. The same content gives the same id whatever the file's HDF5 layout or
/// timestamps; any changed value gives another id.
pub fn calibration_id(gains: &[f32], pedestals: &[f32], mask: &[bool]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for values in [gains, pedestals] {
        for chunk in values.chunks(4096) {
            let mut buf = [0u8; 4 * 4096];
            for (b, v) in buf.chunks_exact_mut(4).zip(chunk) {
                b.copy_from_slice(&v.to_le_bytes());
            }
            h.update(&buf[..4 * chunk.len()]);
        }
    }
    for chunk in mask.chunks(4096) {
        let mut buf = [0u8; 4096];
        for (b, m) in buf.iter_mut().zip(chunk) {
            *b = u8::from(*m);
        }
        h.update(&buf[..chunk.len()]);
    }
    h.digest().max(1)
}

impl Calibration {
    /// Loads `file` for `n_modules` modules. Datasets (module m = rows m*512..m*512+511 of the
    /// stacked axis, in module orientation):
    /// `gains` [3, n*512, 1024] float (ADU/keV), `pedestals` [3, n*512, 1024] float (ADU),
    /// `pixel_mask` [n*512, 1024] integer (nonzero = bad).
    pub fn load(file: &Path, n_modules: usize) -> Result<Self, CalibrationError> {
        Self::load_scaled(file, n_modules, Scale::Energy)
    }

    /// As [`Self::load`], with tables for `scale` (photons: `1/(gain * energy)` folded in).
    pub fn load_scaled(
        file: &Path,
        n_modules: usize,
        scale: Scale,
    ) -> Result<Self, CalibrationError> {
        let f = hdf5::File::open(file).map_err(|source| CalibrationError::Open {
            file: file.to_path_buf(),
            source,
        })?;
        let h = n_modules * MODULE_HEIGHT;
        let gains = read_f32(&f, file, "gains", &[N_STAGES, h, MODULE_WIDTH])?;
        let pedestals = read_f32(&f, file, "pedestals", &[N_STAGES, h, MODULE_WIDTH])?;
        let mask = read_mask(&f, file, &[h, MODULE_WIDTH])?;
        let id = calibration_id(&gains, &pedestals, &mask);
        let stage = |data: &[f32], s: usize, m: usize| {
            let base = s * h * MODULE_WIDTH + m * MODULE_PIXELS;
            data[base..base + MODULE_PIXELS].to_vec()
        };
        let mut masked = MaskCounts::default();
        let modules = (0..n_modules)
            .map(|m| {
                let g: [Vec<f32>; N_STAGES] = std::array::from_fn(|s| stage(&gains, s, m));
                let p: [Vec<f32>; N_STAGES] = std::array::from_fn(|s| stage(&pedestals, s, m));
                let mk = &mask[m * MODULE_PIXELS..(m + 1) * MODULE_PIXELS];
                ModuleCalibration::from_values_scaled(
                    [&p[0], &p[1], &p[2]],
                    [&g[0], &g[1], &g[2]],
                    mk,
                    scale,
                    &mut masked,
                )
            })
            .collect();
        Ok(Calibration {
            modules,
            masked,
            id,
        })
    }
}

/// What `stat` says about the calibration file; a change of any field is a new file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(file: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(file).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// Hot swap of the calibration: a thread stats `calibration_file` every `period` (a few times a
/// second, never per image); when the file changed (another inode after a rename, size, mtime or
/// ctime) it loads it there, off the assembler's hot path, and, if its [`Calibration::id`]
/// differs from the one in use, hands it over. The assembler takes it with [`Self::take`] between
/// images (a non-blocking channel receive) and gives the old tables back with
/// [`Self::recycle`], so even freeing them happens on the watcher's thread. A file that does not
/// load (being written in place, wrong shape) is logged once per change and ignored: the
/// assembler keeps converting with the calibration it has.
#[derive(Debug)]
pub struct CalibrationWatcher {
    new: std::sync::mpsc::Receiver<Calibration>,
    old: std::sync::mpsc::SyncSender<Calibration>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CalibrationWatcher {
    /// Watches `file`; `current_id` is the id of the calibration in use.
    pub fn start(
        file: PathBuf,
        n_modules: usize,
        scale: Scale,
        current_id: u64,
        period: std::time::Duration,
    ) -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (new_tx, new) = std::sync::mpsc::sync_channel::<Calibration>(1);
        let (old, old_rx) = std::sync::mpsc::sync_channel::<Calibration>(2);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        // Not stamped yet: the first check loads the file once and compares ids, so a file
        // replaced between the assembler's first load and this start is not missed.
        let mut seen: Option<FileStamp> = None;
        let thread = std::thread::Builder::new()
            .name("calibration-watch".into())
            .spawn(move || {
                let mut current = current_id;
                while !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(period);
                    while old_rx.try_recv().is_ok() {}
                    let stamp = FileStamp::of(&file);
                    if stamp == seen || stamp.is_none() {
                        continue;
                    }
                    seen = stamp;
                    match Calibration::load_scaled(&file, n_modules, scale) {
                        Ok(c) if c.id == current => {
                            tracing::debug!(
                                calibration_id = c.id,
                                "calibration file checked: same content"
                            );
                        }
                        Ok(c) => {
                            tracing::info!(
                                calibration = %file.display(),
                                calibration_id = c.id,
                                previous_id = current,
                                masked = ?c.masked,
                                "new calibration loaded; taken at the next image"
                            );
                            current = c.id;
                            if new_tx.send(c).is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!(
                            "calibration file changed but does not load, keeping id {current}: {e}"
                        ),
                    }
                }
            })?;
        Ok(CalibrationWatcher {
            new,
            old,
            stop,
            thread: Some(thread),
        })
    }

    /// The newest calibration loaded since the last call, if any (never blocks).
    pub fn take(&self) -> Option<Calibration> {
        self.new.try_recv().ok()
    }

    /// Hands a replaced calibration to the watcher thread to be freed there.
    pub fn recycle(&self, old: Calibration) {
        let _ = self.old.try_send(old);
    }
}

impl Drop for CalibrationWatcher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Unblocks a thread waiting to hand over a calibration.
        while self.new.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(crate) fn dataset(
    f: &hdf5::File,
    file: &Path,
    name: &'static str,
    expected: &[usize],
    what: &'static str,
) -> Result<hdf5::Dataset, CalibrationError> {
    let ds = f.dataset(name).map_err(|e| CalibrationError::Dataset {
        file: file.to_path_buf(),
        dataset: name,
        message: format!("missing or unreadable: {e}"),
    })?;
    let found = ds.shape();
    if found != expected {
        return Err(CalibrationError::Shape {
            file: file.to_path_buf(),
            dataset: name,
            expected: expected.to_vec(),
            found,
            what,
        });
    }
    Ok(ds)
}

pub(crate) fn read_f32(
    f: &hdf5::File,
    file: &Path,
    name: &'static str,
    expected: &[usize],
) -> Result<Vec<f32>, CalibrationError> {
    let ds = dataset(
        f,
        file,
        name,
        expected,
        "[3 gain stages G0,G1,G2, n_modules*512 rows, 1024 columns]",
    )?;
    ds.read_raw::<f32>().map_err(|e| CalibrationError::Dataset {
        file: file.to_path_buf(),
        dataset: name,
        message: format!("cannot read as floating point: {e}"),
    })
}

pub(crate) fn read_mask(
    f: &hdf5::File,
    file: &Path,
    expected: &[usize],
) -> Result<Vec<bool>, CalibrationError> {
    let name = "pixel_mask";
    let ds = dataset(
        f,
        file,
        name,
        expected,
        "[n_modules*512 rows, 1024 columns]",
    )?;
    let values = ds
        .read_raw::<i64>()
        .map_err(|e| CalibrationError::Dataset {
            file: file.to_path_buf(),
            dataset: name,
            message: format!("cannot read as integers: {e}"),
        })?;
    Ok(values.iter().map(|v| *v != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One 4-pixel "module" with hand-chosen parameters (G0 / G1 / G2):
    /// px 0: pedestals 100 / 200 / 300, gains 2 / -0.5 / -0.25 ADU/keV (inv 0.5 / -2 / -4)
    /// px 1: same, but masked
    /// px 2: pedestals 10 / 20 / 30, gains 4 / 0 (bad) / 8
    /// px 3: pedestals 0 / 0 / 0, gains 1 / 1 / NaN (bad)
    fn tiny() -> (ModuleCalibration, MaskCounts) {
        let p = [
            vec![100.0, 100.0, 10.0, 0.0],
            vec![200.0, 200.0, 20.0, 0.0],
            vec![300.0, 300.0, 30.0, 0.0],
        ];
        let g = [
            vec![2.0, 2.0, 4.0, 1.0],
            vec![-0.5, -0.5, 0.0, 1.0],
            vec![-0.25, -0.25, 8.0, f32::NAN],
        ];
        let mut counts = MaskCounts::default();
        let c = ModuleCalibration::from_values(
            [&p[0], &p[1], &p[2]],
            [&g[0], &g[1], &g[2]],
            &[false, true, false, false],
            &mut counts,
        );
        (c, counts)
    }

    fn convert(c: &ModuleCalibration, raw: [u16; 4]) -> [f32; 4] {
        let bytes: Vec<u8> = raw.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = [f32::NAN; 4];
        convert_row(c, 0, &bytes, &mut out);
        out
    }

    const G0: u16 = 0b00 << 14;
    const G1: u16 = 0b01 << 14;
    const INVALID: u16 = 0b10 << 14;
    const G2: u16 = 0b11 << 14;

    #[test]
    fn every_gain_stage_uses_its_own_parameters() {
        let (c, counts) = tiny();
        assert_eq!(
            counts,
            MaskCounts {
                pixel_mask: 1,
                bad_stage: 2
            }
        );
        // px0 G0: (150-100)*0.5 = 25; px2 G0: (10-10)*0.25 = 0; px3 G0: 7*1 = 7.
        assert_eq!(
            convert(&c, [G0 | 150, G0 | 150, G0 | 10, G0 | 7]),
            [25.0, 0.0, 0.0, 7.0]
        );
        // G1: px0 (180-200)*-2 = 40; px2 has gain 0 in G1 -> 0; px3 (5-0)*1 = 5.
        assert_eq!(
            convert(&c, [G1 | 180, G1 | 180, G1 | 50, G1 | 5]),
            [40.0, 0.0, 0.0, 5.0]
        );
        // G2 (bits 11, not G0!): px0 (260-300)*-4 = 160; px2 (46-30)*0.125 = 2; px3 NaN gain -> 0.
        assert_eq!(
            convert(&c, [G2 | 260, G2 | 260, G2 | 46, G2 | 9]),
            [160.0, 0.0, 2.0, 0.0]
        );
        // Max adc in G2: (16383-300)*-4 = -64332.
        assert_eq!(convert(&c, [G2 | 0x3fff, 0, 0, 0])[0], -64332.0);
    }

    #[test]
    fn invalid_gain_code_and_masked_pixels_are_exactly_zero() {
        let (c, _) = tiny();
        let out = convert(&c, [INVALID | 150, INVALID, INVALID | 0x3fff, G0 | 0x3fff]);
        assert_eq!(out[..3], [0.0, 0.0, 0.0]);
        assert_eq!(out[3], 16383.0);
        // Masked pixel: +0.0 in every stage (not -0.0).
        for raw in [G0 | 5, G1 | 0x3fff, G2 | 1] {
            let v = convert(&c, [0, raw, 0, 0])[1];
            assert_eq!(v.to_bits(), 0, "{raw:#x}");
        }
    }

    #[test]
    fn rows_use_the_tables_at_their_offset() {
        // Module-sized tables: pedestal[s][px] = px % 1000 + s, gains 1 / 2 / 4 (inv 1, .5, .25).
        let p: [Vec<f32>; 3] =
            std::array::from_fn(|s| (0..MODULE_PIXELS).map(|i| (i % 1000 + s) as f32).collect());
        let g: [Vec<f32>; 3] = std::array::from_fn(|s| vec![[1.0, 2.0, 4.0][s]; MODULE_PIXELS]);
        let mut counts = MaskCounts::default();
        let c = ModuleCalibration::from_values(
            [&p[0], &p[1], &p[2]],
            [&g[0], &g[1], &g[2]],
            &vec![false; MODULE_PIXELS],
            &mut counts,
        );
        // Row 300: pixel px = 300*1024 + col; raw = G1 | 5000 everywhere.
        let raw: Vec<u8> = (0..1024).flat_map(|_| (G1 | 5000).to_le_bytes()).collect();
        let mut out = vec![0.0f32; 1024];
        convert_row(&c, 300 * 1024, &raw, &mut out);
        for col in [0usize, 1, 511, 1023] {
            let px = 300 * 1024 + col;
            let want = (5000.0 - (px % 1000 + 1) as f32) * 0.5;
            assert_eq!(out[col], want, "col {col}");
        }
    }

    /// Module-sized tables with a different pedestal and gain per pixel and stage, every 37th
    /// pixel masked.
    fn varied() -> ModuleCalibration {
        let p: [Vec<f32>; 3] = std::array::from_fn(|s| {
            (0..MODULE_PIXELS)
                .map(|i| 900.0 + ((i * 31 + s * 7) % 613) as f32 * 0.37)
                .collect()
        });
        let g: [Vec<f32>; 3] = std::array::from_fn(|s| {
            (0..MODULE_PIXELS)
                .map(|i| [41.3, -1.37, -0.113][s] * (1.0 + (i % 89) as f32 * 1e-3))
                .collect()
        });
        let mask: Vec<bool> = (0..MODULE_PIXELS).map(|i| i % 37 == 0).collect();
        let mut counts = MaskCounts::default();
        ModuleCalibration::from_values(
            [&p[0], &p[1], &p[2]],
            [&g[0], &g[1], &g[2]],
            &mask,
            &mut counts,
        )
    }

    /// The conversion of one pixel, written out without blocks or selects.
    fn reference(c: &ModuleCalibration, px: usize, raw: u16) -> f32 {
        let s = match raw >> 14 {
            0 => 0,
            1 => 1,
            3 => 2,
            _ => return 0.0,
        };
        (f32::from(raw & 0x3fff) - c.pedestal[s][px]) * c.inv_gain[s][px]
    }

    /// Three module rows of raw pixels in stretches of 256: runs of one gain code
    /// (single-stage blocks of every code, invalid included), stretches where the code changes
    /// every few pixels (blocks with every code), and a background code with another code every
    /// 29 pixels (two-stage blocks: G0 + G1, G0 + G2, G1 + G2, G0 + invalid).
    fn gain_code_patterns() -> Vec<u16> {
        (0..3 * MODULE_WIDTH)
            .map(|i| {
                let stretch = i / 256;
                let code = match stretch % 3 {
                    0 => stretch / 3 % 4,
                    1 => i * 7 / 5 % 4,
                    _ => {
                        let (background, other) = [(0, 1), (0, 3), (1, 3), (0, 2)][stretch / 3];
                        if i % 29 == 0 {
                            other
                        } else {
                            background
                        }
                    }
                };
                ((code as u16) << 14) | ((i * 2654435761) % 16384) as u16
            })
            .collect()
    }

    #[test]
    fn blocks_tails_mirrored_rows_and_unaligned_input_give_the_reference_bits() {
        let c = varied();
        let raw = gain_code_patterns();
        let aligned: &[u8] = bytemuck::cast_slice(&raw);
        // The same bytes at an odd address: the byte-decoding path.
        let mut store = vec![0u8; aligned.len() + 1];
        let odd = usize::from((store.as_ptr() as usize).is_multiple_of(2));
        store[odd..odd + aligned.len()].copy_from_slice(aligned);
        let unaligned = &store[odd..odd + aligned.len()];
        assert!(bytemuck::try_cast_slice::<u8, u16>(unaligned).is_err());

        // (first raw pixel, module pixel, pixels): whole rows, tails, a start inside a block.
        for (first, start, n) in [
            (0, 0, 1024),
            (0, 300 * 1024, 3 * 1024),
            (5, 300 * 1024 + 5, 1000),
            (64, 7, 63),
            (1, MODULE_PIXELS - 130, 130),
            (0, 0, 64),
            (0, 0, 0),
        ] {
            let want: Vec<u32> = (0..n)
                .map(|i| reference(&c, start + i, raw[first + i]).to_bits())
                .collect();
            let want_reversed: Vec<u32> = want.iter().rev().copied().collect();
            for bytes in [aligned, unaligned] {
                let input = &bytes[2 * first..];
                let mut out = vec![f32::NAN; n];
                convert_row(&c, start, input, &mut out);
                let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "start {start} n {n}");
                convert_row_reversed(&c, start, input, &mut out);
                let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want_reversed, "reversed, start {start} n {n}");
            }
        }
    }

    /// `tiny()`'s pixels as photon tables for 2 keV photons: factors 1/(gain*2) =
    /// px0 0.25 / -1 / -2; px1 masked; px2 0.125 / bad / 0.0625; px3 0.5 / 0.5 / bad.
    fn tiny_photons() -> ModuleCalibration {
        let p = [
            vec![100.0, 100.0, 10.0, 0.0],
            vec![200.0, 200.0, 20.0, 0.0],
            vec![300.0, 300.0, 30.0, 0.0],
        ];
        let g = [
            vec![2.0, 2.0, 4.0, 1.0],
            vec![-0.5, -0.5, 0.0, 1.0],
            vec![-0.25, -0.25, 8.0, f32::NAN],
        ];
        let mut counts = MaskCounts::default();
        let c = ModuleCalibration::from_values_scaled(
            [&p[0], &p[1], &p[2]],
            [&g[0], &g[1], &g[2]],
            &[false, true, false, false],
            Scale::Photons { energy_kev: 2.0 },
            &mut counts,
        );
        assert_eq!(
            counts,
            MaskCounts {
                pixel_mask: 1,
                bad_stage: 2
            }
        );
        c
    }

    fn photons<P: ConvertedPixel>(c: &ModuleCalibration, raw: [u16; 4]) -> [P; 4] {
        let bytes: Vec<u8> = raw.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = [P::default(); 4];
        convert_row(c, 0, &bytes, &mut out);
        out
    }

    #[test]
    fn photon_tables_fold_one_over_gain_times_energy() {
        let c = tiny_photons();
        assert_eq!(
            [c.inv_gain[0][0], c.inv_gain[1][0], c.inv_gain[2][0]],
            [0.25, -1.0, -2.0]
        );
        assert_eq!((c.inv_gain[0][2], c.inv_gain[2][2]), (0.125, 0.0625));
        // Masked pixel and bad stages: NaN factor (pedestal 0), so the loop gives MIN.
        assert!(c.inv_gain.iter().all(|g| g[1].is_nan()));
        assert!(c.inv_gain[1][2].is_nan() && c.inv_gain[2][3].is_nan());
        // A factor that overflows f32 (gain 1e-30 ADU/keV, 1e-10 keV) is a bad stage too.
        let mut counts = MaskCounts::default();
        let t = ModuleCalibration::from_values_scaled(
            [&[0.0], &[0.0], &[0.0]],
            [&[1e-30], &[1.0], &[1.0]],
            &[false],
            Scale::Photons { energy_kev: 1e-10 },
            &mut counts,
        );
        assert!(t.inv_gain[0][0].is_nan() && t.inv_gain[1][0] == 1e10);
        assert_eq!(counts.bad_stage, 1);
    }

    #[test]
    fn photons_in_every_gain_stage_round_half_away_from_zero() {
        let c = tiny_photons();
        // G0 px0: (150-100)*0.25 = 12.5 -> 13; px2 (30-10)*0.125 = 2.5 -> 3;
        // px3 (7-0)*0.5 = 3.5 -> 4. px1 masked -> MIN.
        assert_eq!(
            photons::<i16>(&c, [G0 | 150, G0 | 150, G0 | 30, G0 | 7]),
            [13, i16::MIN, 3, 4]
        );
        assert_eq!(
            photons::<i32>(&c, [G0 | 150, G0 | 150, G0 | 30, G0 | 7]),
            [13, i32::MIN, 3, 4]
        );
        // px0 around zero: adc 98 -> -0.5 -> -1, 99 -> -0.25 -> 0, 101 -> 0.25 -> 0,
        // 102 -> 0.5 -> 1; 146 -> 11.5 -> 12; 94 -> -1.5 -> -2. In each call px2 adc 13 ->
        // 0.375 -> 0 and px3 adc 1 -> 0.5 -> 1.
        for (adc, want) in [(98, -1), (99, 0), (101, 0), (102, 1), (146, 12), (94, -2)] {
            let got = photons::<i16>(&c, [G0 | adc, 0, G0 | 13, G0 | 1]);
            assert_eq!(got, [want, i16::MIN, 0, 1], "adc {adc}");
        }
        // G1: px0 (180-200)*-1 = 20, (201-200)*-1 = -1 kept negative; px2 gain 0 -> MIN;
        // px3 (5-0)*0.5 = 2.5 -> 3.
        assert_eq!(
            photons::<i16>(&c, [G1 | 180, G1 | 180, G1 | 50, G1 | 5]),
            [20, i16::MIN, i16::MIN, 3]
        );
        assert_eq!(photons::<i16>(&c, [G1 | 201, 0, 0, 0])[0], -1);
        // G2 (bits 11): px0 (260-300)*-2 = 80; px2 (46-30)*0.0625 = 1; px3 NaN gain -> MIN.
        assert_eq!(
            photons::<i16>(&c, [G2 | 260, G2 | 260, G2 | 46, G2 | 9]),
            [80, i16::MIN, 1, i16::MIN]
        );
        // Max adc in G2: (16383-300)*-2 = -32166, in range.
        assert_eq!(photons::<i16>(&c, [G2 | 0x3fff, 0, 0, 0])[0], -32166);
        // Gain code 10 -> MIN whatever the pixel.
        assert_eq!(
            photons::<i16>(&c, [INVALID | 150, INVALID, INVALID | 0x3fff, INVALID | 7]),
            [i16::MIN; 4]
        );
        assert_eq!(photons::<i32>(&c, [INVALID | 150, 0, 0, 0])[0], i32::MIN);
    }

    #[test]
    fn photons_saturate_at_max_and_clamp_at_min_plus_one() {
        // Gain 0.01 ADU/keV, 1 keV: 100 photons per ADU. G0 pedestal 0; G1 pedestal 16000.
        let mut counts = MaskCounts::default();
        let c = ModuleCalibration::from_values_scaled(
            [&[0.0; 4], &[16000.0; 4], &[0.0; 4]],
            [&[0.01; 4], &[0.01; 4], &[1.0; 4]],
            &[false; 4],
            Scale::Photons { energy_kev: 1.0 },
            &mut counts,
        );
        // G0 adc 16383 -> 1638300: int16 saturates at 32767, int32 exact. adc 327 -> 32700
        // fits. G1 adc 0 -> -1600000: int16 -32767 (MIN stays the "no value" marker).
        let raw = [G0 | 0x3fff, G0 | 327, G1, G1 | 15999];
        assert_eq!(photons::<i16>(&c, raw), [32767, 32700, -32767, -100]);
        assert_eq!(photons::<i32>(&c, raw), [1638300, 32700, -1600000, -100]);
        // The rule itself, at the edges of f32 and of the types.
        for (x, want16, want32) in [
            (0.0f32, 0i16, 0i32),
            (-0.0, 0, 0),
            (0.49999997, 0, 0), // floor(x + 0.5) in f32 would give 1
            (0.5, 1, 1),
            (-0.5, -1, -1),
            (1.5, 2, 2),
            (2.5, 3, 3),
            (-2.5, -3, -3),
            (-0.49999997, 0, 0),
            (32766.5, 32767, 32767),
            (32767.49, 32767, 32767),
            (32767.5, 32767, 32768),
            (-32767.4, -32767, -32767),
            (-32768.0, -32767, -32768),
            (1e9, 32767, 1_000_000_000),
            (2147483520.0, 32767, 2147483520),
            (3e9, 32767, i32::MAX),
            (-3e9, -32767, i32::MIN + 1),
            (f32::INFINITY, 32767, i32::MAX),
            (f32::NEG_INFINITY, -32767, i32::MIN + 1),
            (f32::NAN, i16::MIN, i32::MIN),
        ] {
            assert_eq!(i16::from_scaled(x), want16, "{x}");
            assert_eq!(i32::from_scaled(x), want32, "{x}");
        }
        // Double-pixel halves: toward zero, markers kept.
        assert_eq!(
            (7i16.half(), (-7i16).half(), i16::MIN.half()),
            (3, -3, i16::MIN)
        );
        assert_eq!(
            (i16::MAX.half(), i32::MAX.half(), 5i32.half()),
            (i16::MAX, i32::MAX, 2)
        );
    }

    #[test]
    fn photon_blocks_tails_mirrored_rows_and_unaligned_input_match_the_reference() {
        // `varied()`'s parameters as photon tables (12.4 keV); every 37th pixel masked.
        let p: [Vec<f32>; 3] = std::array::from_fn(|s| {
            (0..MODULE_PIXELS)
                .map(|i| 900.0 + ((i * 31 + s * 7) % 613) as f32 * 0.37)
                .collect()
        });
        let g: [Vec<f32>; 3] = std::array::from_fn(|s| {
            (0..MODULE_PIXELS)
                .map(|i| [41.3, -1.37, -0.113][s] * (1.0 + (i % 89) as f32 * 1e-3))
                .collect()
        });
        let mask: Vec<bool> = (0..MODULE_PIXELS).map(|i| i % 37 == 0).collect();
        let c = ModuleCalibration::from_values_scaled(
            [&p[0], &p[1], &p[2]],
            [&g[0], &g[1], &g[2]],
            &mask,
            Scale::Photons { energy_kev: 12.4 },
            &mut MaskCounts::default(),
        );
        let raw = gain_code_patterns();
        let aligned: &[u8] = bytemuck::cast_slice(&raw);
        let mut store = vec![0u8; aligned.len() + 1];
        let odd = usize::from((store.as_ptr() as usize).is_multiple_of(2));
        store[odd..odd + aligned.len()].copy_from_slice(aligned);
        let unaligned = &store[odd..odd + aligned.len()];
        // The reference, pixel by pixel without blocks or selects: the same f32 expression,
        // f32::round (half away from zero), clamped.
        let reference = |px: usize, v: u16| -> i16 {
            let s = match v >> 14 {
                0 => 0,
                1 => 1,
                3 => 2,
                _ => return i16::MIN,
            };
            let f = c.inv_gain[s][px];
            if f.is_nan() {
                return i16::MIN;
            }
            let x = (f32::from(v & 0x3fff) - c.pedestal[s][px]) * f;
            x.round().clamp(-32767.0, 32767.0) as i16
        };
        let mut saw = [false; 3]; // a negative count, a positive count, a MIN marker
        for (first, start, n) in [
            (0, 0, 1024),
            (0, 300 * 1024, 3 * 1024),
            (5, 300 * 1024 + 5, 1000),
            (64, 7, 63),
            (1, MODULE_PIXELS - 130, 130),
        ] {
            let want: Vec<i16> = (0..n)
                .map(|i| reference(start + i, raw[first + i]))
                .collect();
            for v in &want {
                saw[0] |= *v < 0 && *v != i16::MIN;
                saw[1] |= *v > 0;
                saw[2] |= *v == i16::MIN;
            }
            let want_reversed: Vec<i16> = want.iter().rev().copied().collect();
            for bytes in [aligned, unaligned] {
                let input = &bytes[2 * first..];
                let mut out = vec![0i16; n];
                convert_row(&c, start, input, &mut out);
                assert_eq!(out, want, "start {start} n {n}");
                convert_row_reversed(&c, start, input, &mut out);
                assert_eq!(out, want_reversed, "reversed, start {start} n {n}");
            }
        }
        assert_eq!(saw, [true, true, true]);
    }

    /// Writes a one-module calibration file, without dataset `skip`, with a 4-d `gains` when
    /// `bad_gains_shape`.
    fn write_file(path: &Path, skip: Option<&str>, bad_gains_shape: bool) {
        let f = hdf5::File::create(path).unwrap();
        let h = MODULE_HEIGHT;
        // gains[s][px] = 2^s ADU/keV except px 7 of G1 = 0; pedestals[s][px] = 100*(s+1) (f64).
        let mut gains: Vec<f32> = (0..3 * MODULE_PIXELS)
            .map(|i| (1u32 << (i / MODULE_PIXELS)) as f32)
            .collect();
        gains[MODULE_PIXELS + 7] = 0.0;
        let peds: Vec<f64> = (0..3 * MODULE_PIXELS)
            .map(|i| 100.0 * (i / MODULE_PIXELS + 1) as f64)
            .collect();
        let mut mask = vec![0u8; MODULE_PIXELS];
        mask[3] = 1;
        let gains_shape = if bad_gains_shape {
            vec![3, h, MODULE_WIDTH / 2, 2]
        } else {
            vec![3, h, MODULE_WIDTH]
        };
        if skip != Some("gains") {
            let ds = f
                .new_dataset::<f32>()
                .shape(gains_shape)
                .create("gains")
                .unwrap();
            ds.write_raw(&gains).unwrap();
        }
        if skip != Some("pedestals") {
            let ds = f
                .new_dataset::<f64>()
                .shape([3, h, MODULE_WIDTH])
                .create("pedestals")
                .unwrap();
            ds.write_raw(&peds).unwrap();
        }
        if skip != Some("pixel_mask") {
            let ds = f
                .new_dataset::<u8>()
                .shape([h, MODULE_WIDTH])
                .create("pixel_mask")
                .unwrap();
            ds.write_raw(&mask).unwrap();
        }
    }

    /// The watcher notices a file renamed over the calibration file, loads it on its thread and
    /// hands it over once; the id is the content's.
    #[test]
    fn the_watcher_hands_over_a_replaced_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cal.h5");
        write_file(&path, None, false);
        let first = Calibration::load(&path, 1).unwrap();
        assert_ne!(first.id, 0);
        // The same content written again has the same id.
        let again = dir.path().join("again.h5");
        write_file(&again, None, false);
        assert_eq!(Calibration::load(&again, 1).unwrap().id, first.id);
        let watcher = CalibrationWatcher::start(
            path.clone(),
            1,
            Scale::Energy,
            first.id,
            std::time::Duration::from_millis(5),
        )
        .unwrap();
        // Another content (pedestals 5), made aside and renamed into place.
        let next = dir.path().join("next.h5");
        {
            let f = hdf5::File::create(&next).unwrap();
            let stack = [3, MODULE_HEIGHT, MODULE_WIDTH];
            let ones = vec![1.0f32; 3 * MODULE_PIXELS];
            let fives = vec![5.0f32; 3 * MODULE_PIXELS];
            let ds = f.new_dataset::<f32>().shape(stack).create("gains").unwrap();
            ds.write_raw(&ones).unwrap();
            let ds = f
                .new_dataset::<f32>()
                .shape(stack)
                .create("pedestals")
                .unwrap();
            ds.write_raw(&fives).unwrap();
            let ds = f
                .new_dataset::<u8>()
                .shape([MODULE_HEIGHT, MODULE_WIDTH])
                .create("pixel_mask")
                .unwrap();
            ds.write_raw(&vec![0u8; MODULE_PIXELS]).unwrap();
        }
        let want = Calibration::load(&next, 1).unwrap();
        assert_ne!(want.id, first.id);
        std::fs::rename(&next, &path).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let got = loop {
            if let Some(c) = watcher.take() {
                break c;
            }
            assert!(std::time::Instant::now() < deadline, "no new calibration");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(got, want);
        assert_eq!(got.modules[0].pedestal[1][17], 5.0);
        watcher.recycle(first);
        drop(watcher);
    }

    #[test]
    fn loads_a_file_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("cal.h5");
        write_file(&good, None, false);
        let cal = Calibration::load(&good, 1).unwrap();
        assert_eq!(
            cal.masked,
            MaskCounts {
                pixel_mask: 1,
                bad_stage: 1
            }
        );
        let m = &cal.modules[0];
        assert_eq!((m.pedestal[2][9], m.inv_gain[2][9]), (300.0, 0.25));
        assert_eq!((m.pedestal[1][7], m.inv_gain[1][7]), (0.0, 0.0));
        assert_eq!((m.pedestal[0][3], m.inv_gain[0][3]), (0.0, 0.0));
        assert_eq!((m.pedestal[0][4], m.inv_gain[0][4]), (100.0, 1.0));

        // Two modules expected, one in the file: expected vs found shape, file and dataset named.
        let err = Calibration::load(&good, 2).unwrap_err().to_string();
        assert!(
            err.contains(&good.display().to_string())
                && err.contains("`gains`")
                && err.contains("expected [3, 1024, 1024]")
                && err.contains("[3, 512, 1024]"),
            "{err}"
        );
        let missing = dir.path().join("nomask.h5");
        write_file(&missing, Some("pixel_mask"), false);
        let err = Calibration::load(&missing, 1).unwrap_err().to_string();
        assert!(
            err.contains("nomask.h5") && err.contains("`pixel_mask`"),
            "{err}"
        );
        let shaped = dir.path().join("shaped.h5");
        write_file(&shaped, None, true);
        let err = Calibration::load(&shaped, 1).unwrap_err().to_string();
        assert!(
            err.contains("found [3, 512, 512, 2]") || err.contains("shape [3, 512, 512, 2]"),
            "{err}"
        );
        let err = Calibration::load(&dir.path().join("none.h5"), 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("none.h5") && err.contains("cannot open"),
            "{err}"
        );
    }
}
