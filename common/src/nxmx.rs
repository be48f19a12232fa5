//! The geometry and beam an NXmx file describes (docs/nxmx.md): the config key `nxmx` (std-daq
//! extension) and what follows from the detector type and `module_positions`. Pure values, no
//! I/O: the writer (`h5-writer/src/nxmx.rs`) turns them into HDF5 groups.
//!
//! Coordinates are NeXus/McStas (what DIALS reads): z along the beam, y up, x completing a
//! right-handed frame. The image's fast axis (columns) runs along -x, its slow axis (rows)
//! along -y, so the pixel at the beam centre lies on the beam; the detector sits at `distance`
//! along z. Never invent a value silently: every default is documented in docs/nxmx.md.

use crate::config::{ConvertedOutput, DetectorConfig, DetectorType};
use serde::{Deserialize, Serialize};

/// The JSON of the config key `nxmx`, and of a write request's `nxmx` field that overrides it
/// for one file (every field optional; defaults in docs/nxmx.md).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NxmxRaw {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detector_distance_m: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beam_center_x_px: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beam_center_y_px: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident_wavelength_angstrom: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensor_material: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensor_thickness_m: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_name: Option<String>,
}

impl NxmxRaw {
    /// These settings with every field `over` gives replaced (a request over the config).
    pub fn overridden_by(&self, over: &NxmxRaw) -> NxmxRaw {
        NxmxRaw {
            detector_distance_m: over.detector_distance_m.or(self.detector_distance_m),
            beam_center_x_px: over.beam_center_x_px.or(self.beam_center_x_px),
            beam_center_y_px: over.beam_center_y_px.or(self.beam_center_y_px),
            incident_wavelength_angstrom: over
                .incident_wavelength_angstrom
                .or(self.incident_wavelength_angstrom),
            sensor_material: over
                .sensor_material
                .clone()
                .or_else(|| self.sensor_material.clone()),
            sensor_thickness_m: over.sensor_thickness_m.or(self.sensor_thickness_m),
            sample_name: over
                .sample_name
                .clone()
                .or_else(|| self.sample_name.clone()),
        }
    }
}

/// The values of the file's NXmx groups.
#[derive(Debug, Clone, PartialEq)]
pub struct Nxmx {
    pub detector_distance_m: f64,
    pub beam_center_x_px: f64,
    pub beam_center_y_px: f64,
    pub incident_wavelength_angstrom: f64,
    pub sensor_material: String,
    pub sensor_thickness_m: f64,
    pub sample_name: String,
    /// Square pixels, metres.
    pub pixel_size_m: f64,
    /// The detector's description (`NXdetector/description`).
    pub description: String,
    pub bit_depth_readout: u8,
    /// Counts at and above which a pixel is saturated; None where it does not apply (converted
    /// JUNGFRAU floats).
    pub saturation_value: Option<i64>,
    /// The value of a pixel that has no value (photon counts: masked, invalid gain, lost
    /// packet; docs/calibration.md); None where there is none.
    pub underload_value: Option<i64>,
    /// One per NXdetector_module.
    pub modules: Vec<ModuleGeometry>,
    /// The image's `pixel_mask` (row-major, NXmx bits) when the writer computed one with the
    /// calibration and the chip geometry (`assembler::mask`); None = [`Self::gap_mask`].
    pub pixel_mask: Option<PixelMask>,
}

/// A computed `pixel_mask` and what it was made from.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelMask {
    /// Row-major, one NXmx bit set per pixel: 1 gap, 2 dead (docs/nxmx.md).
    pub values: std::sync::Arc<[u32]>,
    /// The calibration file whose bad pixels are included, and its content id
    /// (`ImageMetadata.calibration_id` of the images it converts); None without calibration.
    pub calibration: Option<(String, u64)>,
}

/// Where a module's pixels are in the image and in space.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModuleGeometry {
    /// `[slow, fast]` (row, column) of the module's first pixel in the image.
    pub data_origin: [u32; 2],
    /// `[slow, fast]` size in pixels.
    pub data_size: [u32; 2],
    /// The module's first pixel relative to the detector origin (the beam), metres `[x, y, z]`.
    pub offset_m: [f64; 3],
}

/// Default distance when the config gives none: 0.1 m (set it: a placeholder is not a
/// measurement).
pub const DEFAULT_DISTANCE_M: f64 = 0.1;
/// Default wavelength when the config gives none: 1 Å (12.398 keV).
pub const DEFAULT_WAVELENGTH_A: f64 = 1.0;

/// Pixel size (m), sensor material and thickness (m) by detector type.
pub fn sensor(detector_type: DetectorType) -> (f64, &'static str, f64) {
    match detector_type {
        DetectorType::JungfrauRaw | DetectorType::JungfrauConverted => (75e-6, "Si", 320e-6),
        DetectorType::Eiger => (75e-6, "Si", 450e-6),
        // The GigaFRoST camera: 11 um pixels of a CMOS sensor (its scintillator is not part of it).
        DetectorType::Gigafrost => (11e-6, "Si", 10e-6),
    }
}

/// The saturation value of raw counts of `bit_depth` bits.
fn saturation(t: DetectorType, bit_depth: u8) -> Option<i64> {
    match t {
        DetectorType::JungfrauConverted => None,
        DetectorType::JungfrauRaw => Some(65535),
        DetectorType::Eiger | DetectorType::Gigafrost => Some((1i64 << u32::from(bit_depth)) - 1),
    }
}

fn positive(key: &str, v: f64) -> Result<f64, String> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!(
            "nxmx.{key} = {v}: must be a positive finite number"
        ))
    }
}

impl Nxmx {
    /// The NXmx values for `cfg` with the `nxmx` key's settings (`raw`); the error names the
    /// sub-key.
    pub fn new(cfg: &DetectorConfig, raw: &NxmxRaw) -> Result<Self, String> {
        let (pixel, material, thickness) = sensor(cfg.detector_type);
        let (w, h) = (
            f64::from(cfg.image_pixel_width),
            f64::from(cfg.image_pixel_height),
        );
        let centre = |key: &str, v: Option<f64>, default: f64| -> Result<f64, String> {
            match v {
                None => Ok(default),
                Some(v) if v.is_finite() => Ok(v),
                Some(v) => Err(format!("nxmx.{key} = {v}: must be a finite number")),
            }
        };
        let bcx = centre("beam_center_x_px", raw.beam_center_x_px, w / 2.0)?;
        let bcy = centre("beam_center_y_px", raw.beam_center_y_px, h / 2.0)?;
        let rects: Vec<[u32; 4]> = match cfg.detector_type {
            // One sensor: the whole image is one module.
            DetectorType::Gigafrost => vec![[0, 0, cfg.image_pixel_width, cfg.image_pixel_height]],
            _ => cfg
                .module_positions
                .iter()
                .map(|p| [p.left(), p.top(), p.width(), p.height()])
                .collect(),
        };
        let modules = rects
            .iter()
            .map(|&[x, y, mw, mh]| ModuleGeometry {
                data_origin: [y, x],
                data_size: [mh, mw],
                offset_m: [
                    (bcx - f64::from(x)) * pixel,
                    (bcy - f64::from(y)) * pixel,
                    0.0,
                ],
            })
            .collect();
        let (saturation_value, underload_value) = match (cfg.detector_type, cfg.converted_output) {
            (DetectorType::JungfrauConverted, ConvertedOutput::Float32) => (None, None),
            (DetectorType::JungfrauConverted, ConvertedOutput::PhotonsInt16) => {
                (Some(i64::from(i16::MAX)), Some(i64::from(i16::MIN)))
            }
            (DetectorType::JungfrauConverted, ConvertedOutput::PhotonsInt32) => {
                (Some(i64::from(i32::MAX)), Some(i64::from(i32::MIN)))
            }
            (t, _) => (saturation(t, cfg.bit_depth), None),
        };
        Ok(Nxmx {
            detector_distance_m: positive(
                "detector_distance_m",
                raw.detector_distance_m.unwrap_or(DEFAULT_DISTANCE_M),
            )?,
            beam_center_x_px: bcx,
            beam_center_y_px: bcy,
            incident_wavelength_angstrom: positive(
                "incident_wavelength_angstrom",
                raw.incident_wavelength_angstrom
                    .unwrap_or(DEFAULT_WAVELENGTH_A),
            )?,
            sensor_material: raw
                .sensor_material
                .clone()
                .unwrap_or_else(|| material.to_string()),
            sensor_thickness_m: positive(
                "sensor_thickness_m",
                raw.sensor_thickness_m.unwrap_or(thickness),
            )?,
            sample_name: raw.sample_name.clone().unwrap_or_default(),
            pixel_size_m: pixel,
            description: format!(
                "{} ({} modules), std-daq",
                cfg.detector_type.as_str(),
                cfg.n_modules
            ),
            bit_depth_readout: cfg.bit_depth,
            saturation_value,
            underload_value,
            modules,
            pixel_mask: None,
        })
    }

    /// The NXmx pixel mask of an image `width` x `height`: bit 0 (gap) for every pixel no module
    /// covers, 0 elsewhere. Row-major.
    pub fn gap_mask(&self, width: u32, height: u32) -> Vec<u32> {
        let (w, h) = (width as usize, height as usize);
        let mut mask = vec![1u32; w * h];
        for m in &self.modules {
            let [y0, x0] = m.data_origin.map(|v| v as usize);
            let [mh, mw] = m.data_size.map(|v| v as usize);
            for row in mask.chunks_mut(w).skip(y0).take(mh) {
                for px in row.iter_mut().skip(x0).take(mw) {
                    *px = 0;
                }
            }
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> DetectorConfig {
        let mut j = serde_json::json!({
            "detector_name": "jf", "detector_type": "jungfrau-raw", "n_modules": 2,
            "bit_depth": 16, "image_pixel_height": 1100, "image_pixel_width": 1024,
            "start_udp_port": 50000,
            "module_positions": {"0": [0, 0, 1023, 511], "1": [0, 1099, 1023, 588]},
        });
        if let (Some(o), Some(e)) = (j.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        DetectorConfig::from_json_str(&j.to_string(), "t.json").expect("valid")
    }

    #[test]
    fn modules_sit_where_the_image_has_them_relative_to_the_beam() {
        let cfg = config(serde_json::json!({}));
        let raw = NxmxRaw {
            beam_center_x_px: Some(512.0),
            beam_center_y_px: Some(550.0),
            detector_distance_m: Some(0.25),
            ..NxmxRaw::default()
        };
        let n = Nxmx::new(&cfg, &raw).expect("valid");
        assert_eq!(n.modules.len(), 2);
        assert_eq!(n.modules[0].data_origin, [0, 0]);
        assert_eq!(n.modules[0].data_size, [512, 1024]);
        // The second module is mirrored in rows (y1 < y0): its rectangle starts at row 588.
        assert_eq!(n.modules[1].data_origin, [588, 0]);
        let [x, y, z] = n.modules[1].offset_m;
        assert!((x - 512.0 * 75e-6).abs() < 1e-12 && (y - (550.0 - 588.0) * 75e-6).abs() < 1e-12);
        assert_eq!(z, 0.0);
        assert_eq!(n.detector_distance_m, 0.25);
        assert_eq!(
            (n.sensor_material.as_str(), n.sensor_thickness_m),
            ("Si", 320e-6)
        );
        assert_eq!(n.saturation_value, Some(65535));
        // The 76 rows between the modules are gaps.
        let mask = n.gap_mask(1024, 1100);
        assert_eq!(mask.iter().filter(|&&b| b == 1).count(), 76 * 1024);
        assert_eq!(mask[512 * 1024], 1);
        assert_eq!(mask[511 * 1024 + 5], 0);
    }

    #[test]
    fn photon_counts_have_the_types_limits_as_saturation_and_underload() {
        let converted = |output: &str| {
            config(serde_json::json!({
                "detector_type": "jungfrau-converted", "calibration_file": "/cal.h5",
                "converted_output": output, "photon_energy_kev": 8.0,
            }))
        };
        let n = Nxmx::new(&converted("photons_int16"), &NxmxRaw::default()).expect("valid");
        assert_eq!(
            (n.saturation_value, n.underload_value),
            (Some(32767), Some(-32768))
        );
        let n = Nxmx::new(&converted("photons_int32"), &NxmxRaw::default()).expect("valid");
        assert_eq!(
            (n.saturation_value, n.underload_value),
            (Some(i64::from(i32::MAX)), Some(i64::from(i32::MIN)))
        );
    }

    #[test]
    fn defaults_and_refusals() {
        let cfg = config(serde_json::json!({}));
        let n = Nxmx::new(&cfg, &NxmxRaw::default()).expect("valid");
        assert_eq!(
            (n.beam_center_x_px, n.beam_center_y_px),
            (512.0, 550.0),
            "the image centre"
        );
        assert_eq!(n.incident_wavelength_angstrom, DEFAULT_WAVELENGTH_A);
        for (raw, key) in [
            (
                NxmxRaw {
                    detector_distance_m: Some(0.0),
                    ..NxmxRaw::default()
                },
                "nxmx.detector_distance_m",
            ),
            (
                NxmxRaw {
                    incident_wavelength_angstrom: Some(f64::NAN),
                    ..NxmxRaw::default()
                },
                "nxmx.incident_wavelength_angstrom",
            ),
            (
                NxmxRaw {
                    beam_center_x_px: Some(f64::INFINITY),
                    ..NxmxRaw::default()
                },
                "nxmx.beam_center_x_px",
            ),
        ] {
            let e = Nxmx::new(&cfg, &raw).expect_err("refused");
            assert!(e.starts_with(key), "{e}");
        }
    }
}
