//! Pedestal runs (`std-daq pedestal`): per pixel and gain stage the mean (pedestal) and RMS of
//! dark frames, a mask, and the calibration file the assembler loads (docs/calibration.md).
//!
//! Frames come as raw JUNGFRAU module frames (`gain bits (15..14) | adc (13..0)`). Each frame
//! belongs to the gain stage most of its pixels are in (G0 `00`, G1 `01`, G2 `11`): the stage the
//! detector's control software set. A pixel's value counts for that stage only if its own gain
//! bits are that stage's (so a pixel in the wrong gain never pollutes a stage). A stage takes
//! `frames_per_stage` frames per module; later frames of a full stage are counted as surplus and
//! not used. Sums are exact integers (u64), mean and RMS computed from them in f64:
//! `mean = sum / n`, `rms = sqrt(n * sum2 - sum^2) / n` (population RMS).
//!
//! A pixel's stage `s` is masked (bits of `pedestal_mask[s][px]`) when:
//!
//! | bit | reason |
//! |---|---|
//! | 1 | the pixel was in stage `s` in fewer than `min_fraction` of the stage's frames (never in it, stuck in another gain) |
//! | 2 | its RMS is at most `min_rms` ADU (stuck: a dead pixel) |
//! | 4 | its RMS is above `max_rms_factor` times the median RMS of its module in that stage (noisy) |
//! | 8 | masked in the gain file (its `pixel_mask`), or its gain for the stage is 0 or not finite |
//!
//! `pixel_mask[px]` = 1 if any stage of the pixel is masked. Pedestals of a stage without a
//! single value are 0 (and masked).

use crate::calib::{self, CalibrationError, MODULE_HEIGHT, MODULE_WIDTH, N_STAGES};
use std::path::{Path, PathBuf};

const MODULE_PIXELS: usize = MODULE_WIDTH * MODULE_HEIGHT;
/// Gain bits of G0, G1, G2.
pub const GAIN_BITS: [u16; N_STAGES] = [0b00, 0b01, 0b11];
pub const STAGE_NAMES: [&str; N_STAGES] = ["G0", "G1", "G2"];

pub const MASK_TOO_FEW: u8 = 1;
pub const MASK_RMS_LOW: u8 = 2;
pub const MASK_RMS_HIGH: u8 = 4;
pub const MASK_GAIN_FILE: u8 = 8;

#[derive(Debug, thiserror::Error)]
pub enum PedestalError {
    #[error("gain file: {0}")]
    GainFile(#[from] CalibrationError),
    #[error("writing {file}: {message}")]
    Write { file: PathBuf, message: String },
    #[error("settings: {0}")]
    Settings(String),
}

/// How a pedestal run decides (documented defaults in docs/calibration.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PedestalSettings {
    /// Frames per module and gain stage.
    pub frames_per_stage: u32,
    /// A stage is masked for a pixel in it in fewer than this fraction of the stage's frames.
    pub min_fraction: f64,
    /// RMS at or below this (ADU) is a stuck pixel.
    pub min_rms: f64,
    /// RMS above this many times the module's median RMS (per stage) is a noisy pixel.
    pub max_rms_factor: f64,
}

impl Default for PedestalSettings {
    fn default() -> Self {
        PedestalSettings {
            frames_per_stage: 1000,
            min_fraction: 0.9,
            min_rms: 0.1,
            max_rms_factor: 3.0,
        }
    }
}

impl PedestalSettings {
    pub fn check(&self) -> Result<(), PedestalError> {
        let bad = |m: &str| Err(PedestalError::Settings(m.to_string()));
        if self.frames_per_stage == 0 || self.frames_per_stage > 1_000_000 {
            return bad("frames per stage must be 1..=1000000");
        }
        if !(self.min_fraction > 0.0 && self.min_fraction <= 1.0) {
            return bad("min fraction must be in (0, 1]");
        }
        if !(self.min_rms >= 0.0 && self.min_rms.is_finite()) {
            return bad("min rms must be a non-negative number");
        }
        if !(self.max_rms_factor > 1.0 && self.max_rms_factor.is_finite()) {
            return bad("max rms factor must be a number above 1");
        }
        Ok(())
    }
}

/// What [`PedestalAccumulator::add_frame`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameUse {
    /// Counted for this stage.
    Counted(usize),
    /// Its stage already has its frames.
    Surplus(usize),
    /// Most pixels have the invalid gain code `10`, or the module is out of range.
    Invalid,
}

/// Running sums of one module and stage.
#[derive(Debug, Clone)]
struct Sums {
    frames: u32,
    count: Vec<u32>,
    sum: Vec<u64>,
    sum2: Vec<u64>,
}

/// Per module and stage: counts, sums and sums of squares of the values in the stage.
#[derive(Debug, Clone)]
pub struct PedestalAccumulator {
    settings: PedestalSettings,
    /// `[module][stage]`.
    sums: Vec<[Sums; N_STAGES]>,
    pub surplus_frames: u64,
    pub invalid_frames: u64,
}

impl PedestalAccumulator {
    pub fn new(n_modules: usize, settings: PedestalSettings) -> Self {
        let sums = (0..n_modules)
            .map(|_| {
                std::array::from_fn(|_| Sums {
                    frames: 0,
                    count: vec![0; MODULE_PIXELS],
                    sum: vec![0; MODULE_PIXELS],
                    sum2: vec![0; MODULE_PIXELS],
                })
            })
            .collect();
        PedestalAccumulator {
            settings,
            sums,
            surplus_frames: 0,
            invalid_frames: 0,
        }
    }

    pub fn n_modules(&self) -> usize {
        self.sums.len()
    }

    /// The stage most pixels of `frame` are in (None: most have the invalid code `10`).
    pub fn frame_stage(frame: &[u16]) -> Option<usize> {
        let mut codes = [0usize; 4];
        for v in frame {
            codes[usize::from(v >> 14)] += 1;
        }
        let (best, n) = [(0, codes[0]), (1, codes[1]), (2, codes[3])]
            .into_iter()
            .max_by_key(|&(s, n)| (n, std::cmp::Reverse(s)))?;
        (n > codes[2]).then_some(best)
    }

    /// Adds one whole module frame (`MODULE_PIXELS` raw values of module `m`).
    pub fn add_frame(&mut self, m: usize, frame: &[u16]) -> FrameUse {
        let Some(stage) = Self::frame_stage(frame) else {
            self.invalid_frames += 1;
            return FrameUse::Invalid;
        };
        let n_frames = self.settings.frames_per_stage;
        let Some(sums) = self.sums.get_mut(m).map(|s| &mut s[stage]) else {
            self.invalid_frames += 1;
            return FrameUse::Invalid;
        };
        if frame.len() != MODULE_PIXELS {
            self.invalid_frames += 1;
            return FrameUse::Invalid;
        }
        if sums.frames >= n_frames {
            self.surplus_frames += 1;
            return FrameUse::Surplus(stage);
        }
        sums.frames += 1;
        let bits = GAIN_BITS[stage];
        // Branch-free (a value not in the stage adds 0), so the loop vectorises.
        let Sums {
            count, sum, sum2, ..
        } = sums;
        for (((&v, c), s), s2) in frame
            .iter()
            .zip(count.iter_mut())
            .zip(sum.iter_mut())
            .zip(sum2.iter_mut())
        {
            let hit = u32::from(v >> 14 == bits);
            let a = u64::from(v & 0x3fff) * u64::from(hit);
            *c += hit;
            *s += a;
            *s2 += a * a;
        }
        FrameUse::Counted(stage)
    }

    /// Frames counted so far, `[module][stage]`.
    pub fn frames(&self) -> Vec<[u32; N_STAGES]> {
        self.sums
            .iter()
            .map(|s| std::array::from_fn(|g| s[g].frames))
            .collect()
    }

    /// Every module has its frames of every stage.
    pub fn is_complete(&self) -> bool {
        self.sums.iter().all(|s| {
            s.iter()
                .all(|st| st.frames >= self.settings.frames_per_stage)
        })
    }

    /// Pedestals, RMS and masks, the stacked layout of docs/calibration.md. `gains` and
    /// `gain_mask` (from the gain file) only add mask bit 8.
    pub fn finish(&self, gains: &[f32], gain_mask: &[bool]) -> PedestalResult {
        let n = self.sums.len();
        let h = n * MODULE_HEIGHT;
        let plane = h * MODULE_WIDTH;
        let mut r = PedestalResult {
            n_modules: n,
            pedestals: vec![0.0; N_STAGES * plane],
            rms: vec![0.0; N_STAGES * plane],
            counts: vec![0; N_STAGES * plane],
            stage_mask: vec![0; N_STAGES * plane],
            pixel_mask: vec![0; plane],
            frames: self.frames(),
            masked: [[0; 4]; N_STAGES],
            median_rms: vec![[0.0; N_STAGES]; n],
        };
        let st = self.settings;
        for (m, stages) in self.sums.iter().enumerate() {
            for (s, sums) in stages.iter().enumerate() {
                let base = s * plane + m * MODULE_PIXELS;
                let need = (st.min_fraction * f64::from(sums.frames)).ceil().max(1.0) as u32;
                let mut enough = Vec::with_capacity(MODULE_PIXELS);
                let mut rms64 = vec![0.0f64; MODULE_PIXELS];
                for (i, rms64) in rms64.iter_mut().enumerate() {
                    let c = sums.count[i];
                    let (mean, rms) = mean_rms(c, sums.sum[i], sums.sum2[i]);
                    r.pedestals[base + i] = mean as f32;
                    r.rms[base + i] = rms as f32;
                    r.counts[base + i] = c;
                    *rms64 = rms;
                    if c < need {
                        r.stage_mask[base + i] |= MASK_TOO_FEW;
                    } else {
                        enough.push(rms);
                    }
                }
                let median = median(&mut enough);
                r.median_rms[m][s] = median;
                for (i, rms) in rms64.iter().enumerate() {
                    let k = base + i;
                    if r.stage_mask[k] & MASK_TOO_FEW != 0 {
                        continue;
                    }
                    if *rms <= st.min_rms {
                        r.stage_mask[k] |= MASK_RMS_LOW;
                    } else if *rms > st.max_rms_factor * median {
                        r.stage_mask[k] |= MASK_RMS_HIGH;
                    }
                }
            }
        }
        for s in 0..N_STAGES {
            for px in 0..plane {
                let k = s * plane + px;
                let g = gains.get(k).copied().unwrap_or(f32::NAN);
                if gain_mask.get(px).copied().unwrap_or(false) || g == 0.0 || !g.is_finite() {
                    r.stage_mask[k] |= MASK_GAIN_FILE;
                }
                let bits = r.stage_mask[k];
                for (b, reason) in [MASK_TOO_FEW, MASK_RMS_LOW, MASK_RMS_HIGH, MASK_GAIN_FILE]
                    .iter()
                    .enumerate()
                {
                    if bits & reason != 0 {
                        r.masked[s][b] += 1;
                    }
                }
                if bits != 0 {
                    r.pixel_mask[px] = 1;
                }
            }
        }
        r
    }
}

/// Mean and population RMS from exact integer sums (0, 0 for no values).
pub fn mean_rms(count: u32, sum: u64, sum2: u64) -> (f64, f64) {
    if count == 0 {
        return (0.0, 0.0);
    }
    let n = u128::from(count);
    let var_n2 = (n * u128::from(sum2)).saturating_sub(u128::from(sum) * u128::from(sum));
    let nf = f64::from(count);
    (sum as f64 / nf, (var_n2 as f64).sqrt() / nf)
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
    *m
}

/// The outcome of a pedestal run, stacked as in the calibration file.
#[derive(Debug, Clone)]
pub struct PedestalResult {
    pub n_modules: usize,
    /// `[3, n*512, 1024]` ADU.
    pub pedestals: Vec<f32>,
    /// `[3, n*512, 1024]` ADU.
    pub rms: Vec<f32>,
    /// `[3, n*512, 1024]`: values that counted for the stage.
    pub counts: Vec<u32>,
    /// `[3, n*512, 1024]`: mask bits (module docs).
    pub stage_mask: Vec<u8>,
    /// `[n*512, 1024]`: 1 = masked in any stage.
    pub pixel_mask: Vec<u8>,
    /// Frames used, `[module][stage]`.
    pub frames: Vec<[u32; N_STAGES]>,
    /// Pixels per stage with each mask bit (1, 2, 4, 8).
    pub masked: [[u64; 4]; N_STAGES],
    /// Median RMS per `[module][stage]` (the noisy threshold is `max_rms_factor` times it).
    pub median_rms: Vec<[f64; N_STAGES]>,
}

/// The gains of a gain file: dataset `gains` `[3, n*512, 1024]` (ADU/keV, any float type) and,
/// if present, `pixel_mask` `[n*512, 1024]` (nonzero = bad). A calibration file is a gain file.
#[derive(Debug, Clone)]
pub struct GainFile {
    pub gains: Vec<f32>,
    pub mask: Vec<bool>,
}

impl GainFile {
    pub fn load(file: &Path, n_modules: usize) -> Result<Self, PedestalError> {
        let f = hdf5::File::open(file).map_err(|source| CalibrationError::Open {
            file: file.to_path_buf(),
            source,
        })?;
        let h = n_modules * MODULE_HEIGHT;
        let gains = calib::read_f32(&f, file, "gains", &[N_STAGES, h, MODULE_WIDTH])?;
        let mask = if f.link_exists("pixel_mask") {
            calib::read_mask(&f, file, &[h, MODULE_WIDTH])?
        } else {
            vec![false; h * MODULE_WIDTH]
        };
        Ok(GainFile { gains, mask })
    }
}

/// Provenance written as attributes of the file's root.
#[derive(Debug, Clone)]
pub struct Provenance {
    pub gain_file: PathBuf,
    pub detector_name: String,
    pub settings: PedestalSettings,
}

/// Writes the calibration file atomically: `<output>.tmp-<pid>` in the same folder, closed and
/// fsynced, renamed over `output`, the folder fsynced. Returns the calibration id the assembler
/// will compute for it ([`calib::calibration_id`]).
pub fn write_calibration(
    output: &Path,
    gains: &GainFile,
    result: &PedestalResult,
    provenance: &Provenance,
) -> Result<u64, PedestalError> {
    let err = |message: String| PedestalError::Write {
        file: output.to_path_buf(),
        message,
    };
    let h = result.n_modules * MODULE_HEIGHT;
    if gains.gains.len() != N_STAGES * h * MODULE_WIDTH {
        return Err(err("gains do not match the module count".into()));
    }
    let mask_bool: Vec<bool> = result.pixel_mask.iter().map(|m| *m != 0).collect();
    let id = calib::calibration_id(&gains.gains, &result.pedestals, &mask_bool);
    let file_name = output
        .file_name()
        .ok_or_else(|| err("the output is not a file name".into()))?;
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let written = write_file(&tmp, h, gains, result, provenance, id)
        .map_err(|e| err(format!("{}: {e}", tmp.display())));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let synced = std::fs::File::open(&tmp).and_then(|f| f.sync_all());
    if let Err(e) = synced.and_then(|()| std::fs::rename(&tmp, output)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(format!("renaming {} into place: {e}", tmp.display())));
    }
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(id)
}

fn write_file(
    path: &Path,
    h: usize,
    gains: &GainFile,
    r: &PedestalResult,
    p: &Provenance,
    id: u64,
) -> hdf5::Result<()> {
    let f = hdf5::File::create(path)?;
    let stack = [N_STAGES, h, MODULE_WIDTH];
    let plane = [h, MODULE_WIDTH];
    f.new_dataset::<f32>()
        .shape(stack)
        .create("gains")?
        .write_raw(&gains.gains)?;
    f.new_dataset::<f32>()
        .shape(stack)
        .create("pedestals")?
        .write_raw(&r.pedestals)?;
    f.new_dataset::<u8>()
        .shape(plane)
        .create("pixel_mask")?
        .write_raw(&r.pixel_mask)?;
    f.new_dataset::<f32>()
        .shape(stack)
        .create("pedestal_rms")?
        .write_raw(&r.rms)?;
    f.new_dataset::<u8>()
        .shape(stack)
        .create("pedestal_mask")?
        .write_raw(&r.stage_mask)?;
    f.new_dataset::<u32>()
        .shape(stack)
        .create("pedestal_counts")?
        .write_raw(&r.counts)?;
    let frames: Vec<u32> = r.frames.iter().flatten().copied().collect();
    f.new_dataset::<u32>()
        .shape([r.n_modules, N_STAGES])
        .create("pedestal_frames")?
        .write_raw(&frames)?;
    let text = |s: &str| -> hdf5::Result<hdf5::types::VarLenUnicode> {
        s.parse()
            .map_err(|e| hdf5::Error::from(format!("text {s:?}: {e}")))
    };
    for (name, value) in [
        ("gain_file", p.gain_file.display().to_string()),
        ("detector_name", p.detector_name.clone()),
        (
            "software",
            format!("std-daq pedestal {}", env!("CARGO_PKG_VERSION")),
        ),
        ("calibration_id", id.to_string()),
    ] {
        f.new_attr::<hdf5::types::VarLenUnicode>()
            .create(name)?
            .write_scalar(&text(&value)?)?;
    }
    let s = p.settings;
    f.new_attr::<u32>()
        .create("frames_per_stage")?
        .write_scalar(&s.frames_per_stage)?;
    for (name, v) in [
        ("min_fraction", s.min_fraction),
        ("min_rms", s.min_rms),
        ("max_rms_factor", s.max_rms_factor),
    ] {
        f.new_attr::<f64>().create(name)?.write_scalar(&v)?;
    }
    f.flush()?;
    f.close()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn settings(n: u32) -> PedestalSettings {
        PedestalSettings {
            frames_per_stage: n,
            ..PedestalSettings::default()
        }
    }

    /// A frame of stage `s`: pixel i has adc `base + (i + k) % 5` (RMS ~1.41), pixel 0 stuck
    /// at adc 7, pixel 1 in G2 always, pixel 2 noisy (+-40).
    fn frame(s: usize, k: usize) -> Vec<u16> {
        (0..MODULE_PIXELS)
            .map(|i| {
                let bits = GAIN_BITS[s] << 14;
                match i {
                    0 => bits | 7,
                    1 => GAIN_BITS[(s + 1) % 3] << 14 | 100,
                    2 => bits | if k.is_multiple_of(2) { 960 } else { 1040 },
                    _ => bits | (1000 + ((i + k) % 5) as u16),
                }
            })
            .collect()
    }

    #[test]
    fn means_rms_and_masks_per_stage() {
        let mut acc = PedestalAccumulator::new(1, settings(10));
        for s in [2usize, 0, 1] {
            for k in 0..10 {
                assert_eq!(acc.add_frame(0, &frame(s, k)), FrameUse::Counted(s));
            }
            assert!(!acc.is_complete() || s == 1);
        }
        assert_eq!(acc.add_frame(0, &frame(0, 3)), FrameUse::Surplus(0));
        assert_eq!(
            acc.add_frame(0, &vec![0x8000; MODULE_PIXELS]),
            FrameUse::Invalid
        );
        assert!(acc.is_complete());
        let gains = vec![1.0f32; 3 * MODULE_PIXELS];
        let mut gain_mask = vec![false; MODULE_PIXELS];
        gain_mask[9] = true;
        let r = acc.finish(&gains, &gain_mask);
        for s in 0..3 {
            let b = s * MODULE_PIXELS;
            // (i + k) % 5 over k = 0..9: each residue twice: mean 1002, rms sqrt(2).
            assert_eq!(r.pedestals[b + 5], 1002.0);
            assert!((f64::from(r.rms[b + 5]) - 2f64.sqrt()).abs() < 1e-6);
            assert_eq!(r.counts[b + 5], 10);
            assert_eq!(r.stage_mask[b], MASK_RMS_LOW);
            assert_eq!(r.pedestals[b], 7.0);
            assert_eq!(r.stage_mask[b + 1], MASK_TOO_FEW);
            assert_eq!(r.counts[b + 1], 0);
            assert_eq!(r.stage_mask[b + 2], MASK_RMS_HIGH);
            assert_eq!(r.pedestals[b + 2], 1000.0);
            assert_eq!(r.stage_mask[b + 9], MASK_GAIN_FILE);
            assert_eq!(r.masked[s], [1, 1, 1, 1]);
            assert!((r.median_rms[0][s] - 2f64.sqrt()).abs() < 1e-9);
        }
        assert_eq!(&r.pixel_mask[..4], &[1, 1, 1, 0]);
        assert_eq!(r.pixel_mask.iter().map(|m| u64::from(*m)).sum::<u64>(), 4);
        assert_eq!(r.frames, vec![[10, 10, 10]]);
    }

    #[test]
    fn mean_rms_is_exact_for_large_sums() {
        assert_eq!(mean_rms(0, 0, 0), (0.0, 0.0));
        let (m, r) = mean_rms(4, 4 * 16383, 4 * 16383 * 16383);
        assert_eq!((m, r), (16383.0, 0.0));
        let (m, r) = mean_rms(2, 1 + 3, 1 + 9);
        assert_eq!((m, r), (2.0, 1.0));
    }

    #[test]
    fn the_written_file_loads_in_the_assembler_with_the_same_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut acc = PedestalAccumulator::new(1, settings(2));
        for s in 0..3 {
            for k in 0..2 {
                acc.add_frame(0, &frame(s, k));
            }
        }
        let gains = GainFile {
            gains: vec![2.0; 3 * MODULE_PIXELS],
            mask: vec![false; MODULE_PIXELS],
        };
        let r = acc.finish(&gains.gains, &gains.mask);
        let out = dir.path().join("cal.h5");
        let prov = Provenance {
            gain_file: "/g.h5".into(),
            detector_name: "d".into(),
            settings: settings(2),
        };
        let id = write_calibration(&out, &gains, &r, &prov).unwrap();
        let c = calib::Calibration::load(&out, 1).unwrap();
        assert_eq!(c.id, id);
        // Rewritten with the same content: same id; the temp file is gone.
        assert_eq!(write_calibration(&out, &gains, &r, &prov).unwrap(), id);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let g = GainFile::load(&out, 1).unwrap();
        assert_eq!(g.gains, gains.gains);
        assert_eq!(&g.mask[..3], &[true; 3]);
        assert_eq!(
            g.mask,
            r.pixel_mask.iter().map(|m| *m != 0).collect::<Vec<_>>()
        );
        assert!(GainFile::load(&out, 2).is_err());
    }
}
