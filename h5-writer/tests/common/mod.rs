//! Test data shared by the integration tests.
#![allow(dead_code)]

/// xorshift64: deterministic, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Roughly normal, mean 0, standard deviation `sigma` (sum of 4 uniforms).
    pub fn noise(&mut self, sigma: f64) -> f64 {
        let s: f64 = (0..4)
            .map(|_| (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
            .sum();
        (s - 2.0) * sigma * 3f64.sqrt()
    }
}

/// A raw JUNGFRAU-like u16 frame, `h * w` pixels: gain bits 00, a per-pixel pedestal in
/// 1500..3500 ADU, noise of 4 ADU, and 1 % of pixels hit by 1..10 photons of ~300 ADU.
pub fn jungfrau_raw(h: usize, w: usize, seed: u64) -> Vec<u16> {
    let mut pedestal = Rng::new(12345);
    let mut rng = Rng::new(seed);
    (0..h * w)
        .map(|_| {
            let p = 1500.0 + (pedestal.next_u64() % 2000) as f64;
            let mut v = p + rng.noise(4.0);
            if rng.next_u64().is_multiple_of(100) {
                v += 300.0 * (1 + rng.next_u64() % 10) as f64;
            }
            v.clamp(0.0, 16383.0) as u16
        })
        .collect()
}

/// A pedestal-corrected JUNGFRAU-like u16 frame: noise of 1 ADU around an offset of 10, and 1 %
/// of pixels hit by 1..10 photons of ~50 ADU (what a converted, photon-scaled stream looks like).
pub fn jungfrau_corrected(h: usize, w: usize, seed: u64) -> Vec<u16> {
    let mut rng = Rng::new(seed);
    (0..h * w)
        .map(|_| {
            let mut v = 10.0 + rng.noise(1.0);
            if rng.next_u64().is_multiple_of(100) {
                v += 50.0 * (1 + rng.next_u64() % 10) as f64;
            }
            v.clamp(0.0, 65535.0) as u16
        })
        .collect()
}

pub fn u16_bytes(values: &[u16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
