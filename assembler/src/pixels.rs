//! Turns one module frame into its pixels in the image: raw placement, or JUNGFRAU conversion
//! row by row (into a reused row buffer) followed by placement, gaps and double pixels.
//!
//! Extension point for GigaFRoST: add a `Mode` variant whose row converter unpacks 12-bit pairs
//! into u16 (3 bytes -> 2 pixels) into the row buffer, then place the rows as here; north
//! quadrants are mirrored by their `module_positions` corner order.
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
        self.geometry.zero(m, image);
    }
}
