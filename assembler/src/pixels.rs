//! Turns one module frame into its pixels in the image: raw placement, or JUNGFRAU conversion
//! row by row (into a reused row buffer) followed by placement, gaps and double pixels.
//!
//! GigaFRoST: each stream (module m) is half of quadrant m/2 (SW, SE, NW, NE), its rows
//! interleaved with the quadrant's other stream (m % 2); 12-bit pairs are unpacked to u16 (3 bytes
//! -> 2 pixels) and north quadrants are mirrored vertically, as PSI's converter places them.
//!
//! Never: allocate or log per image (the row buffer is allocated once), or convert the zeroed
//! rows of a packet that did not arrive (they stay 0, not `(0 - pedestal) * gain`).

use crate::calib::{self, Calibration, CalibrationError};
use crate::place::Geometry;
use std_daq_common::config::{DetectorType, DoublePixels};
use std_daq_common::{DetectorConfig, ModuleFrame};

#[derive(Debug, Clone)]
enum Mode {
    /// Frame pixels are image pixels.
    Raw,
    /// JUNGFRAU raw u16 to f32 keV.
    Converted {
        calibration: Calibration,
        double_pixels: DoublePixels,
        row: Vec<f32>,
    },
    /// GigaFRoST 12-bit packed streams to u16 quadrants.
    Gigafrost {
        stream: GigafrostStream,
        row: Vec<u16>,
    },
}

/// Where GigaFRoST stream rows go in the image (PSI's `std_data_convert_gf` placement).
#[derive(Debug, Clone, Copy)]
pub struct GigafrostStream {
    pub image_width: usize,
    pub image_height: usize,
}

impl GigafrostStream {
    pub fn stream_width(&self) -> usize {
        self.image_width / 2
    }
    pub fn stream_height(&self) -> usize {
        self.image_height / 4
    }
    /// Image (row, first column) of row `r` of stream `m`.
    pub fn target(&self, m: usize, r: usize) -> (usize, usize) {
        let (quadrant, link) = (m % 8 / 2, m % 2);
        let column = if quadrant % 2 == 1 {
            self.image_width / 2
        } else {
            0
        };
        let row = if quadrant < 2 {
            // South: downwards from the middle.
            self.image_height / 2 + link + 2 * r
        } else {
            // North: upwards from the middle (mirrored).
            (self.image_height - 1) / 2 - link - 2 * r
        };
        (row, column)
    }
}

/// Unpacks 12-bit pixel pairs (`b0 = a & 0xff, b1 = a >> 8 | (b & 0xf) << 4, b2 = b >> 4`).
pub fn unpack_12bit(packed: &[u8], out: &mut [u16]) {
    for (pair, px) in packed.chunks_exact(3).zip(out.chunks_exact_mut(2)) {
        px[0] = u16::from(pair[0]) | (u16::from(pair[1] & 0x0f) << 8);
        px[1] = u16::from(pair[1] >> 4) | (u16::from(pair[2]) << 4);
    }
}

/// Geometry plus (for converted JUNGFRAU) calibration: writes module frames into image slots.
#[derive(Debug, Clone)]
pub struct ModulePixels {
    pub geometry: Geometry,
    mode: Mode,
    /// Module rows carried by one packet (JUNGFRAU: 4).
    rows_per_packet: usize,
}

impl ModulePixels {
    /// Loads the calibration file named in the config when the mode needs one.
    pub fn from_config(cfg: &DetectorConfig) -> Result<Self, CalibrationError> {
        let calibration = match (&cfg.calibration_file, cfg.detector_type) {
            (Some(file), DetectorType::JungfrauConverted) => {
                Some(Calibration::load(file, usize::from(cfg.n_modules))?)
            }
            _ => None,
        };
        Ok(Self::with_calibration(cfg, calibration))
    }

    /// As [`Self::from_config`], with the calibration given (`None` = raw mode). A converted
    /// config without calibration is refused by config validation.
    pub fn with_calibration(cfg: &DetectorConfig, calibration: Option<Calibration>) -> Self {
        let geometry = Geometry::from_config(cfg);
        let packets = cfg.packets_per_frame().max(1) as usize;
        let rows_per_packet = (geometry.layout.module_height / packets).max(1);
        let mode = match calibration {
            _ if cfg.detector_type == DetectorType::Gigafrost => {
                let stream = GigafrostStream {
                    image_width: cfg.image_pixel_width as usize,
                    image_height: cfg.image_pixel_height as usize,
                };
                Mode::Gigafrost {
                    stream,
                    row: vec![0; stream.stream_width()],
                }
            }
            Some(calibration) if cfg.detector_type == DetectorType::JungfrauConverted => {
                Mode::Converted {
                    calibration,
                    double_pixels: cfg.double_pixels,
                    row: vec![0.0; geometry.layout.module_width],
                }
            }
            _ => Mode::Raw,
        };
        ModulePixels {
            geometry,
            mode,
            rows_per_packet,
        }
    }

    /// Writes module `m`'s frame (`src`, as in its FrameBuffer slot; `frame` its metadata) into
    /// `image`, every pixel of the module's rectangle included.
    pub fn write(&mut self, m: usize, frame: &ModuleFrame, src: &[u8], image: &mut [u8]) {
        match &mut self.mode {
            Mode::Raw => self.geometry.place(m, src, image),
            Mode::Gigafrost { stream, row } => {
                // Missing packets' rows were zero-filled by the receiver and unpack to zeros.
                let w = stream.stream_width();
                for (r, packed) in src
                    .chunks_exact(w * 3 / 2)
                    .take(stream.stream_height())
                    .enumerate()
                {
                    unpack_12bit(packed, row);
                    let (y, x) = stream.target(m, r);
                    let start = (y * stream.image_width + x) * 2;
                    image[start..start + 2 * w].copy_from_slice(bytemuck::cast_slice(row));
                }
            }
            Mode::Converted {
                calibration,
                double_pixels,
                row,
            } => {
                let g = &self.geometry;
                let w = g.layout.module_width;
                let cal = &calibration.modules[m];
                for (r, raw_row) in src
                    .chunks_exact(2 * w)
                    .take(g.layout.module_height)
                    .enumerate()
                {
                    if frame.packet_received(r / self.rows_per_packet) {
                        calib::convert_row(cal, r * w, raw_row, row);
                    } else {
                        row.fill(0.0);
                    }
                    g.place_row(m, r, bytemuck::cast_slice(row.as_slice()), image);
                }
                if g.layout.gap > 0 {
                    g.finish_double_pixels(m, *double_pixels, image);
                }
            }
        }
    }

    /// Zeroes module `m`'s rectangle (the module is missing).
    pub fn zero(&self, m: usize, image: &mut [u8]) {
        match &self.mode {
            Mode::Gigafrost { stream, .. } => {
                let w = stream.stream_width();
                for r in 0..stream.stream_height() {
                    let (y, x) = stream.target(m, r);
                    let start = (y * stream.image_width + x) * 2;
                    image[start..start + 2 * w].fill(0);
                }
            }
            _ => self.geometry.zero(m, image),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacks_12bit_pairs() {
        // a = 0xABC, b = 0x123: b0 = 0xBC, b1 = 0x0A | 0x3 << 4 = 0x3A, b2 = 0x12.
        let mut out = [0u16; 4];
        unpack_12bit(&[0xBC, 0x3A, 0x12, 0xFF, 0xFF, 0xFF], &mut out);
        assert_eq!(out, [0xABC, 0x123, 0xFFF, 0xFFF]);
    }

    #[test]
    fn gigafrost_streams_tile_the_image_once() {
        // 8 streams of a 48x16 image: every image row is written by exactly one stream row.
        let s = GigafrostStream {
            image_width: 48,
            image_height: 16,
        };
        let mut hits = vec![0u8; 16 * 2];
        for m in 0..8 {
            for r in 0..s.stream_height() {
                let (y, x) = s.target(m, r);
                hits[y * 2 + x / 24] += 1;
            }
        }
        assert!(hits.iter().all(|h| *h == 1), "{hits:?}");
        // SW link 0 starts at the middle going down; NW link 0 just above it going up.
        assert_eq!(s.target(0, 0), (8, 0));
        assert_eq!(s.target(1, 0), (9, 0));
        assert_eq!(s.target(3, 1), (11, 24));
        assert_eq!(s.target(4, 0), (7, 0));
        assert_eq!(s.target(5, 0), (6, 0));
        assert_eq!(s.target(7, 3), (0, 24));
    }
}
