//! The `pixel_mask` a run's files carry (docs/nxmx.md): gaps and chip gaps from the geometry,
//! and for converted JUNGFRAU the calibration file's dead pixels, computed by the assembler's own
//! placement code (`assembler::mask`) so the mask marks exactly the pixels the images lack.
//!
//! The calibration is read when a run starts and only when the file changed since (length and
//! modification time), so a new pedestal reaches the next run's mask, as it reaches the
//! assembler's conversion (hot swap).
//!
//! Never: fail a run for it. A calibration the writer cannot read gives the geometry mask and an
//! error in the log (the assembler, which converts with it, reports the same file).

use assembler::calib::{Calibration, Scale};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;
use std_daq_common::config::DetectorType;
use std_daq_common::nxmx::PixelMask;
use std_daq_common::DetectorConfig;

/// What the cached mask was made from: the calibration file's length and modification time.
type Stamp = Option<(u64, SystemTime)>;

#[derive(Debug, Default)]
pub struct PixelMasks {
    cached: Option<(Stamp, PixelMask)>,
}

impl PixelMasks {
    /// The mask for a run starting now.
    pub fn current(&mut self, cfg: &DetectorConfig) -> PixelMask {
        let calibration = match (&cfg.calibration_file, cfg.detector_type) {
            (Some(file), DetectorType::JungfrauConverted) => Some(file.clone()),
            _ => None,
        };
        let stamp = calibration.as_ref().and_then(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((m.len(), m.modified().ok()?))
        });
        if let Some((cached_stamp, mask)) = &self.cached {
            // A calibration that could not be read is tried again at the next run.
            if *cached_stamp == stamp && (calibration.is_none() || mask.calibration.is_some()) {
                return mask.clone();
            }
        }
        let mask = compute(cfg, calibration);
        self.cached = Some((stamp, mask.clone()));
        mask
    }
}

fn compute(cfg: &DetectorConfig, calibration: Option<PathBuf>) -> PixelMask {
    let loaded = calibration.and_then(|file| {
        match Calibration::load_scaled(&file, usize::from(cfg.n_modules), Scale::from_config(cfg)) {
            Ok(cal) => Some((file, cal)),
            Err(e) => {
                tracing::error!("pixel_mask without the calibration's dead pixels: {e}");
                None
            }
        }
    });
    let values = assembler::mask::image_pixel_mask(cfg, loaded.as_ref().map(|(_, c)| c));
    if let Some((file, cal)) = &loaded {
        tracing::info!(
            "pixel_mask: {} dead pixels from {} (calibration id {:#x})",
            values
                .iter()
                .filter(|v| **v & assembler::mask::DEAD != 0)
                .count(),
            file.display(),
            cal.id
        );
    }
    PixelMask {
        values: Arc::from(values),
        calibration: loaded.map(|(file, cal)| (file.display().to_string(), cal.id)),
    }
}
