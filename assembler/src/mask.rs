//! The image's NXmx `pixel_mask` (docs/nxmx.md): which image pixels have no value because of the
//! geometry (bit 0, gap: no module covers them, a chip gap left empty, or a double pixel masked
//! by `double_pixels: "mask"`) and which the calibration cannot convert (bit 1, dead: the
//! calibration file's `pixel_mask`, or a gain stage with gain 0 or a non-finite pedestal or gain).
//!
//! Computed with the placement code that makes the images ([`Geometry::place`] and
//! [`Geometry::finish_double_pixels`]): a module frame of ones shows where the module's pixels
//! land, a frame of the calibration's bad pixels shows where they land (a split double pixel
//! spreads into the gap pixel next to it, so both are dead), so the mask and the pixels cannot
//! disagree about mirroring, gaps or double pixels.
//!
//! Never: run per image (it allocates whole images; the writer computes it once per calibration).

use crate::calib::Calibration;
use crate::place::Geometry;
use std_daq_common::config::DetectorType;
use std_daq_common::DetectorConfig;

/// NXmx bit 0: a gap, no pixel here.
pub const GAP: u32 = 1;
/// NXmx bit 1: dead, the calibration gives this pixel no value.
pub const DEAD: u32 = 2;

/// The `pixel_mask` of the config's images, row-major `image_pixel_height x image_pixel_width`,
/// with `calibration`'s bad pixels (converted JUNGFRAU) marked [`DEAD`].
pub fn image_pixel_mask(cfg: &DetectorConfig, calibration: Option<&Calibration>) -> Vec<u32> {
    let (w, h) = (
        cfg.image_pixel_width as usize,
        cfg.image_pixel_height as usize,
    );
    if !matches!(cfg.detector_type, t if t.is_jungfrau() || t == DetectorType::Eiger) {
        // GigaFRoST streams tile their quadrants row by row: no chip gaps, no double pixels.
        return match cfg.nxmx() {
            Ok(n) => n.gap_mask(cfg.image_pixel_width, cfg.image_pixel_height),
            Err(_) => vec![0; w * h],
        };
    }
    // One f32 per pixel whatever the image's pixel type: only zero / nonzero matters here.
    let mut geometry = Geometry::from_config(cfg);
    geometry.bytes_per_pixel = 4;
    let converted = cfg.detector_type == DetectorType::JungfrauConverted;
    let layout = geometry.layout;
    let module_pixels = layout.module_width * layout.module_height;

    let placed = |frame_of: &dyn Fn(usize) -> Vec<f32>| -> Vec<f32> {
        let mut image = vec![0f32; w * h];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut image);
        for m in 0..geometry.modules.len() {
            let frame = frame_of(m);
            geometry.place(m, bytemuck::cast_slice(&frame), bytes);
            if converted {
                geometry.finish_double_pixels(m, cfg.double_pixels, bytes);
            }
        }
        image
    };

    let covered = placed(&|_| vec![1.0; module_pixels]);
    let mut mask: Vec<u32> = covered
        .iter()
        .map(|v| if *v == 0.0 { GAP } else { 0 })
        .collect();
    if let (true, Some(cal)) = (converted, calibration) {
        let dead = placed(&|m| match cal.modules.get(m) {
            Some(module) => (0..module_pixels)
                .map(|px| {
                    let bad = module
                        .inv_gain
                        .iter()
                        .any(|stage| stage.get(px).is_none_or(|f| !f.is_finite() || *f == 0.0));
                    if bad {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect(),
            None => vec![1.0; module_pixels],
        });
        for (m, d) in mask.iter_mut().zip(dead) {
            if d != 0.0 && *m & GAP == 0 {
                *m |= DEAD;
            }
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::{MaskCounts, ModuleCalibration, MODULE_HEIGHT, MODULE_WIDTH, N_STAGES};

    const MODULE_PIXELS: usize = MODULE_WIDTH * MODULE_HEIGHT;

    fn config(extra: serde_json::Value) -> DetectorConfig {
        let mut j = serde_json::json!({
            "detector_name": "jf", "detector_type": "jungfrau-converted", "n_modules": 1,
            "bit_depth": 16, "image_pixel_height": 514, "image_pixel_width": 1030,
            "start_udp_port": 50000, "chip_gaps": true, "calibration_file": "/unused.h5",
            // Mirrored in x and y: the module's first pixel is the image's last.
            "module_positions": {"0": [1029, 513, 0, 0]},
        });
        if let (Some(o), Some(e)) = (j.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
            o.retain(|_, v| !v.is_null());
        }
        DetectorConfig::from_json_str(&j.to_string(), "test.json").unwrap()
    }

    /// One module whose only bad pixels are `bad` (module orientation).
    fn calibration(bad: &[usize]) -> Calibration {
        let ones = vec![1.0f32; MODULE_PIXELS];
        let mut mask = vec![false; MODULE_PIXELS];
        for &px in bad {
            mask[px] = true;
        }
        let mut counts = MaskCounts::default();
        let stages = [&ones[..]; N_STAGES];
        let module = ModuleCalibration::from_values(stages, stages, &mask, &mut counts);
        Calibration {
            modules: vec![module],
            masked: counts,
            id: 1,
        }
    }

    #[test]
    fn dead_pixels_follow_mirroring_and_split_double_pixels() {
        let cfg = config(serde_json::json!({}));
        // Module pixel (row 0, column 0) and (row 0, column 255): the latter is a double pixel
        // at the first chip border, so it also covers the gap column next to it.
        let mask = image_pixel_mask(&cfg, Some(&calibration(&[0, 255])));
        let at = |x: usize, y: usize| mask[y * 1030 + x];
        // Mirrored in both: module (x, y) lands at image (1029 - x', 513 - y).
        assert_eq!(at(1029, 513), DEAD);
        assert_eq!(at(1029 - 255, 513), DEAD, "the double pixel");
        assert_eq!(at(1029 - 256, 513), DEAD, "its gap pixel shares its value");
        assert_eq!(
            at(1029 - 257, 513),
            0,
            "the other gap pixel belongs to column 256"
        );
        assert_eq!(mask.iter().filter(|m| **m != 0).count(), 3);
    }

    #[test]
    fn masked_double_pixels_and_uncovered_pixels_are_gaps() {
        let cfg = config(serde_json::json!({
            "double_pixels": "mask", "image_pixel_width": 1031,
            "module_positions": {"0": [0, 0, 1029, 513]},
        }));
        let mask = image_pixel_mask(&cfg, Some(&calibration(&[255, 1000])));
        let at = |x: usize, y: usize| mask[y * 1031 + x];
        assert_eq!(at(1030, 0), GAP, "no module covers the last column");
        for x in 255..259 {
            assert_eq!(at(x, 100), GAP, "masked double pixel / gap column {x}");
        }
        assert_eq!(at(254, 100), 0);
        assert_eq!(
            at(1000 + 2 * 3, 0),
            DEAD,
            "module column 1000 is in the fourth chip"
        );
        // 3 chip borders x 4 columns x 514 rows, 1 border row band x 4 rows x 1030 columns,
        // minus their 3 x 4 x 4 crossings, plus the uncovered column; 1 dead pixel.
        let gaps = 3 * 4 * 514 + 4 * 1030 - 3 * 4 * 4 + 514;
        assert_eq!(mask.iter().filter(|m| **m == GAP).count(), gaps);
        assert_eq!(mask.iter().filter(|m| **m == DEAD).count(), 1);
    }

    #[test]
    fn raw_images_mark_their_empty_chip_gaps() {
        let cfg = config(serde_json::json!({
            "detector_type": "jungfrau-raw", "calibration_file": null,
        }));
        let mask = image_pixel_mask(&cfg, None);
        let gaps = 3 * 2 * 514 + 2 * 1030 - 3 * 2 * 2;
        assert_eq!(mask.iter().filter(|m| **m == GAP).count(), gaps);
    }
}
