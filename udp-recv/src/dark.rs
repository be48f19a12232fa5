//! JUNGFRAU dark frames and photon hits for the simulator (`std-det-sim --jungfrau-dark G0|G1|G2`,
//! `--jungfrau-hits`), so a pedestal run can be checked against the values the simulator used.
//!
//! Everything follows from a seed (`--pixel-seed`, default 1) by formulas a test recomputes
//! ([`pedestal`], [`noise_rms`], [`pixel_class`], [`raw_value`] are public for that). A raw pixel is
//! `gain bits (15..14) | adc (13..0)`, gain bits `00` = G0, `01` = G1, `11` = G2.
//!
//! ```text
//! splitmix64(x)          the standard splitmix64 finaliser of x + 0x9E3779B97F4A7C15
//! key(kind, m, i, px)    = splitmix64(seed ^ splitmix64(kind << 56 | m << 44 | i << 24 | px))
//!                          (m = module < 4096, i < 2^20, px = row * 1024 + column < 2^20)
//! pedestal(m, s, px)     = PEDESTAL_BASE[s] + (key(1, m, s, px) mod 16000) / 16   ADU
//!                          (a multiple of 1/16 in [base, base + 1000), exact in f32)
//! PEDESTAL_BASE          = [2000, 10000, 12000]        (G0, G1, G2)
//! class(m, px)           = key(2, m, 0, px) mod 65536:
//!                          0, 1  dead:       raw 0 in every frame of every mode
//!                          2, 3  wrong gain: reports the next stage (G0->G1->G2->G0) instead
//!                          4, 5  noisy:      noise RMS x NOISY_FACTOR (10)
//!                          else  normal      (so about 16 of each per module)
//! noise_rms(m, s, px)    = NOISE_RMS[s] (x 10 for a noisy pixel),  NOISE_RMS = [8, 5, 4] ADU
//! z(m, s, k, px)         = sqrt(-2 ln u1) * cos(2 pi u2)     (Box-Muller), with
//!                          u1 = ((key(3 + 2s, m, k, px) >> 11) + 1) / 2^53,
//!                          u2 =  (key(4 + 2s, m, k, px) >> 11) / 2^53
//! k(frame)               = frame mod n_distinct          (`--noise-frames`, default 32)
//! dark value, stage s    = bits(s') << 14 | clamp(round(pedestal(m, s', px)
//!                                               + noise_rms(m, s', px) * z(m, s', k, px)), 0, 16383)
//!                          with s' = s, or (s + 1) mod 3 for a wrong-gain pixel;
//!                          round = half away from zero (f64::round)
//! photons(frame, m, px)  = 1 + (px / 101) mod 4   if (px + 31 k + 17 m) mod 101 == 0, else 0
//! hit value              = bits(G0) << 14 | clamp(round(pedestal(m, G0, px)) + photons * hit_adu,
//!                                              0, 16383)       (no noise)
//!                          dead pixels 0, wrong-gain pixels bits(G1) << 14 | round(pedestal G1)
//! ```
//!
//! So the noise of a pixel repeats every `n_distinct` frames: only `n_distinct` different frames
//! per module and mode are computed (before sending; sending costs nothing per pixel), and a pedestal
//! run over N frames has `min(N, n_distinct)` independent noise samples per pixel: its mean is within
//! `6 * noise_rms / sqrt(min(N, n_distinct))` (plus 1/2 ADU of rounding bias at most) of
//! `pedestal` for every normal pixel (6 sigma: about 2 in a billion per pixel), and exactly the
//! mean of the values sent.

use crate::jungfrau::{MODULE_HEIGHT, MODULE_WIDTH, PACKETS_PER_FRAME, PAYLOAD_BYTES};

/// Module pixels.
pub const MODULE_PIXELS: usize = MODULE_WIDTH as usize * MODULE_HEIGHT as usize;
/// Gain bits of G0, G1, G2 (bits 15..14 of a raw pixel).
pub const GAIN_BITS: [u16; 3] = [0b00, 0b01, 0b11];
pub const ADC_MAX: u16 = 0x3fff;
pub const PEDESTAL_BASE: [f64; 3] = [2000.0, 10000.0, 12000.0];
pub const NOISE_RMS: [f64; 3] = [8.0, 5.0, 4.0];
pub const NOISY_FACTOR: f64 = 10.0;
/// Default distinct noise frames per module and mode.
pub const DEFAULT_DISTINCT_FRAMES: usize = 32;
/// At most this many distinct frames (the key's index field has 20 bits; memory is the limit).
pub const MAX_DISTINCT_FRAMES: usize = 1024;

/// What a pixel of the simulated module is (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelClass {
    Normal,
    /// Raw 0 in every frame.
    Dead,
    /// Reports the next gain stage's bits and pedestal.
    WrongGain,
    /// Noise RMS times [`NOISY_FACTOR`].
    Noisy,
}

/// Which frames the simulator plays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum JungfrauPixels {
    /// Dark frames with the detector in stage 0 (G0), 1 (G1) or 2 (G2).
    Dark { stage: usize },
    /// G0 frames: the pedestal (rounded, no noise) plus `photons * hit_adu` at hit pixels.
    Hits { hit_adu: u16 },
}

/// The dark/hit frame settings of one simulator run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DarkSettings {
    pub pixels: JungfrauPixels,
    pub seed: u64,
    /// Distinct frames per module (noise and hit patterns repeat with this period).
    pub n_distinct: usize,
}

pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn key(seed: u64, kind: u64, module: u16, index: u64, px: usize) -> u64 {
    let x = kind << 56
        | (u64::from(module) & 0xfff) << 44
        | (index & 0xf_ffff) << 24
        | (px as u64 & 0xf_ffff);
    splitmix64(seed ^ splitmix64(x))
}

/// The pedestal (ADU) of pixel `px` of `module` in `stage`.
pub fn pedestal(seed: u64, module: u16, stage: usize, px: usize) -> f64 {
    PEDESTAL_BASE[stage % 3] + (key(seed, 1, module, stage as u64, px) % 16000) as f64 / 16.0
}

pub fn pixel_class(seed: u64, module: u16, px: usize) -> PixelClass {
    match key(seed, 2, module, 0, px) % 65536 {
        0 | 1 => PixelClass::Dead,
        2 | 3 => PixelClass::WrongGain,
        4 | 5 => PixelClass::Noisy,
        _ => PixelClass::Normal,
    }
}

/// The noise RMS (ADU) of pixel `px` in `stage`.
pub fn noise_rms(seed: u64, module: u16, stage: usize, px: usize) -> f64 {
    let base = NOISE_RMS[stage % 3];
    if pixel_class(seed, module, px) == PixelClass::Noisy {
        base * NOISY_FACTOR
    } else {
        base
    }
}

/// The standard normal deviate of pixel `px` in noise frame `k` of `stage`.
pub fn gaussian(seed: u64, module: u16, stage: usize, k: usize, px: usize) -> f64 {
    let s = stage as u64 % 3;
    let scale = 1.0 / (1u64 << 53) as f64;
    let u1 = ((key(seed, 3 + 2 * s, module, k as u64, px) >> 11) + 1) as f64 * scale;
    let u2 = (key(seed, 4 + 2 * s, module, k as u64, px) >> 11) as f64 * scale;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Photons hitting pixel `px` of `module` in a hit frame with noise/pattern index `k`.
pub fn photons(k: usize, module: u16, px: usize) -> u16 {
    if (px + 31 * k + 17 * usize::from(module)).is_multiple_of(101) {
        1 + ((px / 101) % 4) as u16
    } else {
        0
    }
}

fn adc(v: f64) -> u16 {
    v.round().clamp(0.0, f64::from(ADC_MAX)) as u16
}

/// The raw value the simulator sends for pixel `px` of `module` in `frame`.
pub fn raw_value(settings: &DarkSettings, frame: u64, module: u16, px: usize) -> u16 {
    let seed = settings.seed;
    let k = (frame % settings.n_distinct.max(1) as u64) as usize;
    let class = pixel_class(seed, module, px);
    if class == PixelClass::Dead {
        return 0;
    }
    match settings.pixels {
        JungfrauPixels::Dark { stage } => {
            let s = if class == PixelClass::WrongGain {
                (stage + 1) % 3
            } else {
                stage % 3
            };
            let v = pedestal(seed, module, s, px)
                + noise_rms(seed, module, s, px) * gaussian(seed, module, s, k, px);
            GAIN_BITS[s] << 14 | adc(v)
        }
        JungfrauPixels::Hits { hit_adu } => {
            if class == PixelClass::WrongGain {
                return GAIN_BITS[1] << 14 | adc(pedestal(seed, module, 1, px));
            }
            let base = pedestal(seed, module, 0, px).round();
            let n = photons(k, module, px);
            GAIN_BITS[0] << 14 | adc(base + f64::from(n) * f64::from(hit_adu))
        }
    }
}

/// The `n_distinct` frames of every module, computed once; payloads are slices of them.
#[derive(Debug)]
pub struct FrameSet {
    n_distinct: usize,
    /// Module-major: module m, frame k at `(m * n_distinct + k) * MODULE_PIXELS * 2`.
    bytes: Vec<u8>,
}

impl FrameSet {
    pub fn new(settings: &DarkSettings, n_modules: u16) -> Self {
        let n_distinct = settings.n_distinct.clamp(1, MAX_DISTINCT_FRAMES);
        let settings = DarkSettings {
            n_distinct,
            ..*settings
        };
        let frame_bytes = MODULE_PIXELS * 2;
        let mut bytes = vec![0u8; usize::from(n_modules) * n_distinct * frame_bytes];
        for (i, frame) in bytes.chunks_exact_mut(frame_bytes).enumerate() {
            let (m, k) = ((i / n_distinct) as u16, i % n_distinct);
            for (px, out) in frame.chunks_exact_mut(2).enumerate() {
                out.copy_from_slice(&raw_value(&settings, k as u64, m, px).to_le_bytes());
            }
        }
        FrameSet { n_distinct, bytes }
    }

    /// The pixel bytes of packet `p` of `module`'s `frame`.
    pub fn payload(&self, frame: u64, module: u16, p: u32) -> &[u8] {
        let k = (frame % self.n_distinct as u64) as usize;
        let start = (usize::from(module) * self.n_distinct + k) * MODULE_PIXELS * 2
            + (p % PACKETS_PER_FRAME) as usize * PAYLOAD_BYTES;
        self.bytes.get(start..start + PAYLOAD_BYTES).unwrap_or(&[])
    }
}

/// Parses a gain stage name: `G0`, `G1`, `G2` (or 0, 1, 2; any case).
pub fn parse_stage(s: &str) -> Result<usize, String> {
    match s.trim().to_ascii_uppercase().as_str() {
        "G0" | "0" => Ok(0),
        "G1" | "1" => Ok(1),
        "G2" | "2" => Ok(2),
        other => Err(format!("gain stage {other:?} is not G0, G1 or G2")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dark(stage: usize) -> DarkSettings {
        DarkSettings {
            pixels: JungfrauPixels::Dark { stage },
            seed: 7,
            n_distinct: 8,
        }
    }

    #[test]
    fn splitmix64_matches_the_reference() {
        // splitmix64 with state 0: the first outputs of the reference generator.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn frames_follow_the_formulas_with_every_class_present() {
        let s = dark(1);
        let set = FrameSet::new(&s, 2);
        for (frame, m, p) in [(0u64, 0u16, 0u32), (9, 1, 127), (15, 0, 64)] {
            let got: Vec<u16> = set
                .payload(frame, m, p)
                .chunks(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect();
            assert_eq!(got.len(), 4096);
            for (i, v) in got.iter().enumerate() {
                assert_eq!(*v, raw_value(&s, frame, m, p as usize * 4096 + i));
            }
        }
        let mut counts = [0usize; 4];
        for px in 0..MODULE_PIXELS {
            let c = pixel_class(7, 0, px);
            counts[c as usize] += 1;
            let v = raw_value(&s, 3, 0, px);
            match c {
                PixelClass::Dead => assert_eq!(v, 0),
                PixelClass::WrongGain => assert_eq!(v >> 14, GAIN_BITS[2]),
                _ => assert_eq!(v >> 14, GAIN_BITS[1]),
            }
        }
        // About 16 of each (2 in 65536 of 524288 pixels).
        for c in &counts[1..] {
            assert!((4..40).contains(c), "{counts:?}");
        }
    }

    #[test]
    fn noise_has_the_documented_mean_and_rms() {
        let s = dark(0);
        let (mut sum, mut sum2, mut n) = (0.0, 0.0, 0.0);
        for px in 0..20_000 {
            if pixel_class(7, 0, px) != PixelClass::Normal {
                continue;
            }
            for k in 0..8 {
                let v = f64::from(raw_value(&s, k, 0, px) & ADC_MAX) - pedestal(7, 0, 0, px);
                sum += v;
                sum2 += v * v;
                n += 1.0;
            }
        }
        let (mean, rms) = (sum / n, (sum2 / n).sqrt());
        assert!(mean.abs() < 0.1, "{mean}");
        // sqrt(8^2 + 1/12) with rounding; 160000 samples: 1% is many standard errors.
        assert!((rms - 8.005).abs() < 0.08, "{rms}");
    }

    #[test]
    fn hits_are_pedestal_plus_photons() {
        let s = DarkSettings {
            pixels: JungfrauPixels::Hits { hit_adu: 64 },
            seed: 7,
            n_distinct: 4,
        };
        let mut hits = 0;
        for px in 0..MODULE_PIXELS {
            if pixel_class(7, 1, px) != PixelClass::Normal {
                continue;
            }
            let v = raw_value(&s, 6, 1, px);
            let n = photons(2, 1, px);
            hits += usize::from(n > 0);
            assert_eq!(
                f64::from(v),
                pedestal(7, 1, 0, px).round() + f64::from(n) * 64.0
            );
        }
        assert!(hits > 5000, "{hits}");
        assert_eq!(parse_stage("g2"), Ok(2));
        assert!(parse_stage("G3").is_err());
    }
}
