//! Turns one module frame into its pixels in the image: raw placement, or JUNGFRAU conversion
//! row segment by row segment straight into the image (through a reused row buffer and placement
//! when the image is not 4-byte aligned), then gaps and double pixels.
//!
//! GigaFRoST: each stream (module m) is half of quadrant m/2 (SW, SE, NW, NE), its rows
//! interleaved with the quadrant's other stream (m % 2); 12-bit pairs are unpacked to u16 (3 bytes
//! -> 2 pixels) and north quadrants are mirrored vertically, as PSI's converter places them.
//!
//! The tables and geometry ([`ModulePixels`]) are read-only while images are made, so worker
//! threads share them (`Arc`); each thread brings its own row buffers ([`Scratch`]) and writes
//! through an [`ImageTarget`] (its regions of the slot).
//!
//! Never: allocate or log per image (the row buffers are allocated once), or convert the zeroed
//! rows of a packet that did not arrive (they stay 0, not `(0 - pedestal) * gain`).

use crate::calib::{self, Calibration, CalibrationError, ConvertedPixel, ModuleCalibration, Scale};
use crate::place::{Geometry, ImageTarget};
use std::ops::Range;
use std_daq_common::config::{ConvertedOutput, DetectorType, DoublePixels};
use std_daq_common::{DetectorConfig, ModuleFrame};

#[derive(Debug, Clone)]
enum Mode {
    /// Frame pixels are image pixels.
    Raw,
    /// JUNGFRAU raw u16 to f32 keV or to int16/int32 photon counts (`output`).
    Converted {
        calibration: Calibration,
        double_pixels: DoublePixels,
        output: ConvertedOutput,
    },
    /// GigaFRoST 12-bit packed streams to u16 quadrants.
    Gigafrost { stream: GigafrostStream },
}

/// One thread's row buffers for [`ModulePixels::write_into`] ([`ModulePixels::scratch`] sizes
/// them for the geometry, once).
#[derive(Debug, Clone, Default)]
pub struct Scratch {
    /// One module row of converted pixels (4-byte words, so any output type fits aligned), for
    /// image bytes not aligned for the output type.
    row: Vec<u32>,
    /// One GigaFRoST stream row unpacked.
    unpacked: Vec<u16>,
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
    /// Byte offset in the (u16) image of the first pixel of row `r` of stream `m`.
    pub fn row_start(&self, m: usize, r: usize) -> usize {
        let (y, x) = self.target(m, r);
        (y * self.image_width + x) * 2
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
    /// The row buffers [`Self::write`] uses.
    scratch: Scratch,
}

impl ModulePixels {
    /// Loads the calibration file named in the config when the mode needs one.
    pub fn from_config(cfg: &DetectorConfig) -> Result<Self, CalibrationError> {
        let calibration = match (&cfg.calibration_file, cfg.detector_type) {
            (Some(file), DetectorType::JungfrauConverted) => Some(Calibration::load_scaled(
                file,
                usize::from(cfg.n_modules),
                Scale::from_config(cfg),
            )?),
            _ => None,
        };
        Ok(Self::with_calibration(cfg, calibration))
    }

    /// As [`Self::from_config`], with the calibration given (`None` = raw mode). A converted
    /// config without calibration is refused by config validation. The tables must be built for
    /// the config's output ([`Scale::from_config`]).
    pub fn with_calibration(cfg: &DetectorConfig, calibration: Option<Calibration>) -> Self {
        let geometry = Geometry::from_config(cfg);
        let packets = cfg.packets_per_frame().max(1) as usize;
        let rows_per_packet = (geometry.layout.module_height / packets).max(1);
        let mode = match calibration {
            _ if cfg.detector_type == DetectorType::Gigafrost => Mode::Gigafrost {
                stream: GigafrostStream {
                    image_width: cfg.image_pixel_width as usize,
                    image_height: cfg.image_pixel_height as usize,
                },
            },
            Some(calibration) if cfg.detector_type == DetectorType::JungfrauConverted => {
                Mode::Converted {
                    calibration,
                    double_pixels: cfg.double_pixels,
                    output: cfg.converted_output,
                }
            }
            _ => Mode::Raw,
        };
        let mut pixels = ModulePixels {
            geometry,
            mode,
            rows_per_packet,
            scratch: Scratch::default(),
        };
        pixels.scratch = pixels.scratch();
        pixels
    }

    /// Row buffers sized for this geometry, for one thread's [`Self::write_into`].
    pub fn scratch(&self) -> Scratch {
        match &self.mode {
            Mode::Raw => Scratch::default(),
            Mode::Converted { .. } => Scratch {
                row: vec![0; self.geometry.layout.module_width],
                unpacked: Vec::new(),
            },
            Mode::Gigafrost { stream } => Scratch {
                row: Vec::new(),
                unpacked: vec![0; stream.stream_width()],
            },
        }
    }

    /// The id of the calibration images are converted with; 0 when they are not (raw modes).
    pub fn calibration_id(&self) -> u64 {
        match &self.mode {
            Mode::Converted { calibration, .. } => calibration.id,
            _ => 0,
        }
    }

    /// Replaces the calibration of a converting mode (call between images) and returns the one
    /// it replaced; a raw mode converts nothing and gives `new` back. `new` must be built for
    /// the same module count and [`Scale`] (as [`calib::CalibrationWatcher`] loads it).
    pub fn swap_calibration(&mut self, new: Calibration) -> Calibration {
        match &mut self.mode {
            Mode::Converted { calibration, .. }
                if calibration.modules.len() == new.modules.len() =>
            {
                std::mem::replace(calibration, new)
            }
            _ => new,
        }
    }

    /// The image bytes module `m` writes (its rectangle's rows; GigaFRoST: its stream's rows,
    /// interleaved with its quadrant's other stream). Set-up time (allocates): the regions of
    /// the worker that places module `m`.
    pub fn module_byte_ranges(&self, m: usize) -> Vec<Range<usize>> {
        match &self.mode {
            Mode::Gigafrost { stream } => {
                let w = stream.stream_width();
                (0..stream.stream_height())
                    .map(|r| {
                        let start = stream.row_start(m, r);
                        start..start + 2 * w
                    })
                    .collect()
            }
            _ => self.geometry.rect_byte_ranges(m),
        }
    }

    /// Writes module `m`'s frame (`src`, as in its FrameBuffer slot; `frame` its metadata) into
    /// `image`, every pixel of the module's rectangle included.
    pub fn write(&mut self, m: usize, frame: &ModuleFrame, src: &[u8], image: &mut [u8]) {
        let mut scratch = std::mem::take(&mut self.scratch);
        self.write_into(&mut scratch, m, frame, src, image);
        self.scratch = scratch;
    }

    /// As [`Self::write`], with the caller's row buffers (from [`Self::scratch`]), into any
    /// [`ImageTarget`] holding module `m`'s bytes ([`Self::module_byte_ranges`]).
    pub fn write_into<T: ImageTarget + ?Sized>(
        &self,
        scratch: &mut Scratch,
        m: usize,
        frame: &ModuleFrame,
        src: &[u8],
        image: &mut T,
    ) {
        if let Mode::Raw = self.mode {
            // Keeps the one-copy fast path of a module as wide as the image.
            return self.geometry.place(m, src, image);
        }
        self.write_rows_into(scratch, m, frame, src, 0..self.rows(m), image);
    }

    /// Module `m`'s rows: the rows of its rectangle in the image (gap rows included), or of its
    /// GigaFRoST stream. Workers split images by these ([`Self::image_row`]).
    pub fn rows(&self, m: usize) -> usize {
        match &self.mode {
            Mode::Gigafrost { stream } => stream.stream_height(),
            _ => self.geometry.modules.get(m).map_or(0, |p| p.height),
        }
    }

    /// The image row that row `row` of module `m` ([`Self::rows`]) lands in.
    pub fn image_row(&self, m: usize, row: usize) -> usize {
        match &self.mode {
            Mode::Gigafrost { stream } => stream.target(m, row).0,
            _ => self.geometry.image_row(m, row),
        }
    }

    /// Whether rows `row - 1` and `row` of module `m` must be written by the same call of
    /// [`Self::write_rows_into`] (a gap row and the double pixel its value comes from).
    pub fn rows_coupled(&self, row: usize) -> bool {
        matches!(self.mode, Mode::Converted { .. }) && self.geometry.layout.rows_coupled(row)
    }

    /// As [`Self::write_into`], rows `rows` of module `m` only (every pixel of those rows, gaps
    /// included); `rows` must not split a [`Self::rows_coupled`] pair.
    pub fn write_rows_into<T: ImageTarget + ?Sized>(
        &self,
        scratch: &mut Scratch,
        m: usize,
        frame: &ModuleFrame,
        src: &[u8],
        rows: Range<usize>,
        image: &mut T,
    ) {
        match &self.mode {
            Mode::Raw => self.geometry.place_rows(m, src, rows, image),
            Mode::Gigafrost { stream } => {
                // Missing packets' rows were zero-filled by the receiver and unpack to zeros.
                let w = stream.stream_width();
                let row = &mut scratch.unpacked[..w];
                for (r, packed) in src
                    .chunks_exact(w * 3 / 2)
                    .take(stream.stream_height())
                    .enumerate()
                    .skip(rows.start)
                    .take(rows.len())
                {
                    unpack_12bit(packed, row);
                    image
                        .bytes_mut(stream.row_start(m, r), 2 * w)
                        .copy_from_slice(bytemuck::cast_slice(row));
                }
            }
            Mode::Converted {
                calibration,
                double_pixels,
                output,
            } => {
                let g = &self.geometry;
                let cal = &calibration.modules[m];
                let rows_per_packet = self.rows_per_packet;
                let received = |r: usize| frame.packet_received(r / rows_per_packet);
                let row = &mut scratch.row;
                let dp = *double_pixels;
                match output {
                    ConvertedOutput::Float32 => {
                        convert_rows::<f32, T>(g, m, cal, src, received, dp, rows, row, image)
                    }
                    ConvertedOutput::PhotonsInt16 => {
                        convert_rows::<i16, T>(g, m, cal, src, received, dp, rows, row, image)
                    }
                    ConvertedOutput::PhotonsInt32 => {
                        convert_rows::<i32, T>(g, m, cal, src, received, dp, rows, row, image)
                    }
                }
            }
        }
    }

    /// Zeroes module `m`'s rectangle (the module is missing); photon counts: fills it with the
    /// "no value" pixel (MIN of the type).
    pub fn zero<T: ImageTarget + ?Sized>(&self, m: usize, image: &mut T) {
        self.zero_rows(m, 0..self.rows(m), image);
    }

    /// As [`Self::zero`], rows `rows` of module `m` only.
    pub fn zero_rows<T: ImageTarget + ?Sized>(&self, m: usize, rows: Range<usize>, image: &mut T) {
        match &self.mode {
            Mode::Converted {
                output: ConvertedOutput::PhotonsInt16,
                ..
            } => self.geometry.fill_rows(m, i16::INVALID, rows, image),
            Mode::Converted {
                output: ConvertedOutput::PhotonsInt32,
                ..
            } => self.geometry.fill_rows(m, i32::INVALID, rows, image),
            Mode::Gigafrost { stream } => {
                let w = stream.stream_width();
                for r in rows.start..rows.end.min(stream.stream_height()) {
                    image.bytes_mut(stream.row_start(m, r), 2 * w).fill(0);
                }
            }
            _ => self.geometry.zero_rows(m, rows, image),
        }
    }
}

/// Converts rectangle rows `rect` of module `m`'s frame into `image` as pixels `P`, then handles
/// their double pixels.
///
/// Row segment by row segment straight into the image's pixels (ImageBuffer slots are page
/// aligned: no row buffer, no second copy), mirrored segments in reverse order; a segment whose
/// bytes are not aligned for `P` goes through `row`. Rows `r` with `!received(r)` (their packet
/// did not arrive) are `P::INVALID` (+0.0 as f32).
#[allow(clippy::too_many_arguments)]
fn convert_rows<P: ConvertedPixel, T: ImageTarget + ?Sized>(
    g: &Geometry,
    m: usize,
    cal: &ModuleCalibration,
    src: &[u8],
    received: impl Fn(usize) -> bool,
    double_pixels: DoublePixels,
    rect: Range<usize>,
    row: &mut [u32],
    image: &mut T,
) {
    let w = g.layout.module_width;
    let size = std::mem::size_of::<P>();
    // u32 words hold 1 (f32, i32) or 2 (i16) pixels, aligned for either.
    let row: &mut [P] = bytemuck::cast_slice_mut(row);
    let module_rows = g.layout.module_rows_in(&rect);
    // Module rows in frame order (for a module mirrored in y the image rows then go upwards:
    // measured faster than walking the frame and its tables backwards).
    for (r, raw_row) in src
        .chunks_exact(2 * w)
        .take(g.layout.module_height)
        .enumerate()
        .skip(module_rows.start)
        .take(module_rows.len())
    {
        let received = received(r);
        for s in g.row_segments(m, r) {
            let bytes = image.bytes_mut(s.image_pixel * size, s.len * size);
            let raw = &raw_row[2 * s.column..2 * (s.column + s.len)];
            let convert = |out: &mut [P]| match (received, s.reversed) {
                (false, _) => out.fill(P::INVALID),
                (true, false) => calib::convert_row(cal, r * w + s.column, raw, out),
                (true, true) => calib::convert_row_reversed(cal, r * w + s.column, raw, out),
            };
            match bytemuck::try_cast_slice_mut::<u8, P>(bytes) {
                Ok(out) => convert(out),
                Err(_) => {
                    let out = &mut row[..s.len];
                    convert(out);
                    bytes.copy_from_slice(bytemuck::cast_slice(out));
                }
            }
        }
    }
    if g.layout.gap > 0 {
        g.finish_double_pixels_rows::<P, T>(m, double_pixels, rect, image);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::calib::{MaskCounts, MODULE_HEIGHT, MODULE_WIDTH};

    /// Two converted JUNGFRAU modules stacked; module 1 mirrored in x and y when `flip`.
    fn converted_config(gaps: bool, flip: bool, double_pixels: &str) -> DetectorConfig {
        let (w, h) = if gaps { (1030, 514) } else { (1024, 512) };
        let m1 = if flip {
            serde_json::json!([w - 1, 2 * h - 1, 0, h])
        } else {
            serde_json::json!([0, h, w - 1, 2 * h - 1])
        };
        let mut json = serde_json::json!({
            "detector_name": "t", "detector_type": "jungfrau-converted", "n_modules": 2,
            "bit_depth": 16, "image_pixel_height": 2 * h, "image_pixel_width": w,
            "start_udp_port": 50000, "chip_gaps": gaps, "calibration_file": "/unused.h5",
            "module_positions": {"0": [0, 0, w - 1, h - 1], "1": m1},
        });
        if gaps {
            json["double_pixels"] = double_pixels.into();
        }
        DetectorConfig::from_json_str(&json.to_string(), "t").unwrap()
    }

    fn calibration() -> Calibration {
        let n = MODULE_WIDTH * MODULE_HEIGHT;
        let module = |m: usize| {
            let p: [Vec<f32>; 3] =
                std::array::from_fn(|s| (0..n).map(|i| ((i * 13 + s + m) % 700) as f32).collect());
            let g: [Vec<f32>; 3] = std::array::from_fn(|s| {
                (0..n)
                    .map(|i| [37.0, -1.1, -0.07][s] * (1.0 + (i % 53) as f32 * 1e-3))
                    .collect()
            });
            let mask: Vec<bool> = (0..n).map(|i| i % 101 == m).collect();
            calib::ModuleCalibration::from_values(
                [&p[0], &p[1], &p[2]],
                [&g[0], &g[1], &g[2]],
                &mask,
                &mut MaskCounts::default(),
            )
        };
        Calibration {
            modules: vec![module(0), module(1)],
            masked: MaskCounts::default(),
            id: 1,
        }
    }

    /// `len` bytes starting at an address that is (`aligned`) or is not a multiple of 4.
    fn buffer(store: &mut Vec<u8>, len: usize, aligned: bool) -> &mut [u8] {
        store.clear();
        store.resize(len + 4, 0x41); // stale bytes everywhere
        let misalignment = store.as_ptr() as usize % 4;
        // Start at an address = 0 (aligned) or 1 (not) modulo 4.
        let skip = (4 + usize::from(!aligned) - misalignment) % 4;
        &mut store[skip..skip + len]
    }

    /// A swapped calibration converts the next frame and names it; raw modes have id 0 and
    /// give a calibration back untouched.
    #[test]
    fn a_swapped_calibration_converts_the_next_frame() {
        let cfg = converted_config(false, false, "split");
        let mut pixels = ModulePixels::with_calibration(&cfg, Some(calibration()));
        assert_eq!(pixels.calibration_id(), 1);
        let n = MODULE_WIDTH * MODULE_HEIGHT;
        let raw: Vec<u16> = (0..n).map(|i| 800 + (i % 300) as u16).collect();
        let frame = ModuleFrame {
            n_packets_expected: 128,
            received: [u64::MAX; 4],
            ..bytemuck::Zeroable::zeroed()
        };
        let convert = |p: &mut ModulePixels| {
            let mut image = vec![0u8; cfg.image_bytes()];
            p.write(0, &frame, bytemuck::cast_slice(&raw), &mut image);
            bytemuck::cast_slice::<u8, f32>(&image)[..n].to_vec()
        };
        let before = convert(&mut pixels);
        let mut other = calibration();
        other.id = 2;
        for m in &mut other.modules {
            for p in &mut m.pedestal {
                p.iter_mut().for_each(|v| *v += 10.0);
            }
        }
        let old = pixels.swap_calibration(other);
        assert_eq!((old.id, pixels.calibration_id()), (1, 2));
        let after = convert(&mut pixels);
        let changed = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        // Every pixel but the masked ones (1 in 101) moved by 10 ADU.
        assert!(changed > n * 98 / 100, "{changed}");
        let raw_cfg = DetectorConfig::from_json_str(
            &serde_json::json!({
                "detector_name": "t", "detector_type": "jungfrau-raw", "n_modules": 1,
                "bit_depth": 16, "image_pixel_height": 512, "image_pixel_width": 1024,
                "start_udp_port": 50000, "module_positions": {"0": [0, 0, 1023, 511]},
            })
            .to_string(),
            "t",
        )
        .unwrap();
        let mut raw_pixels = ModulePixels::with_calibration(&raw_cfg, None);
        assert_eq!(raw_pixels.calibration_id(), 0);
        assert_eq!(raw_pixels.swap_calibration(old).id, 1);
    }

    #[test]
    fn direct_and_row_buffer_conversion_write_the_same_bytes() {
        let n = MODULE_WIDTH * MODULE_HEIGHT;
        // All gain codes, in runs (single-stage blocks) and mixed, frame k shifted.
        let frame_bytes = |k: usize| -> Vec<u8> {
            (0..n)
                .flat_map(|i| {
                    let code = if i / 2048 % 3 == 0 {
                        i * 5 / 3
                    } else {
                        i / 700 + k
                    };
                    (((code % 4) as u16) << 14 | ((i * 7919 + k) % 16384) as u16).to_le_bytes()
                })
                .collect()
        };
        let sources = [frame_bytes(0), frame_bytes(1)];
        // Packets 3 and 100 lost: their rows (4 per packet) must be 0, not converted zeros.
        let mut frame = ModuleFrame::new(1, 1, 128);
        for p in (0..128).filter(|p| *p != 3 && *p != 100) {
            frame.mark_received(p);
        }
        let mut stores = (Vec::new(), Vec::new(), Vec::new());
        for (gaps, flip, double_pixels) in [
            (false, false, "split"),
            (false, true, "split"),
            (true, false, "split"),
            (true, true, "split"),
            (true, true, "mask"),
        ] {
            let cfg = converted_config(gaps, flip, double_pixels);
            let mut pixels = ModulePixels::with_calibration(&cfg, Some(calibration()));
            let len = cfg.image_bytes();
            let direct = buffer(&mut stores.0, len, true);
            let via_row = buffer(&mut stores.1, len, false);
            assert!(bytemuck::try_cast_slice_mut::<u8, f32>(via_row).is_err());
            for (m, source) in sources.iter().enumerate() {
                pixels.write(m, &frame, source, direct);
                pixels.write(m, &frame, source, via_row);
            }
            let case = format!("gaps {gaps} flip {flip} {double_pixels}");
            assert!(direct == via_row, "{case}");
            // Raw input at an odd address (byte-decoding path) gives the same image too.
            let odd = buffer(&mut stores.2, len, true);
            let mut src = vec![0u8; 2 * n + 1];
            let off = usize::from((src.as_ptr() as usize).is_multiple_of(2));
            for (m, source) in sources.iter().enumerate() {
                src[off..off + 2 * n].copy_from_slice(source);
                pixels.write(m, &frame, &src[off..off + 2 * n], odd);
            }
            assert!(odd == direct, "{case}, unaligned input");

            // Not trivially equal: most pixels converted, the lost packets' rows zero.
            let px: Vec<f32> = direct
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let nonzero = px.iter().filter(|v| **v != 0.0).count();
            assert!(nonzero > px.len() / 2, "{case}: {nonzero}");
            let w = cfg.image_pixel_width as usize;
            let rect_row = |r: usize| r + if gaps { 2 * (r / 256) } else { 0 };
            let h = if gaps { 514 } else { 512 };
            for r in [12, 15, 400, 403] {
                // Module 0 is not mirrored: image row = rectangle row; its data columns are 0.
                let row = &px[rect_row(r) * w..(rect_row(r) + 1) * w];
                assert!(row.iter().all(|v| *v == 0.0), "{case}: module 0 row {r}");
                // Module 1 (second half), mirrored in y when `flip`.
                let y = h + if flip {
                    h - 1 - rect_row(r)
                } else {
                    rect_row(r)
                };
                let row = &px[y * w..(y + 1) * w];
                assert!(row.iter().all(|v| *v == 0.0), "{case}: module 1 row {r}");
            }
        }
    }

    /// Photon counts (int16, 1 keV): G0 pedestal 100, gain 10 ADU/keV everywhere (0.1 photons
    /// per ADU); raw G0 | 170 -> 7 photons. Two modules with gaps, module 1 rotated by 180
    /// degrees; packet 3 of module 0 lost; then module 1 missing.
    #[test]
    fn photon_images_split_double_pixels_and_mark_lost_rows() {
        let n = MODULE_WIDTH * MODULE_HEIGHT;
        let module = || {
            let p: [Vec<f32>; 3] = std::array::from_fn(|s| vec![[100.0, 0.0, 0.0][s]; n]);
            let g: [Vec<f32>; 3] = std::array::from_fn(|s| vec![[10.0, -1.0, -0.1][s]; n]);
            let mut mask = vec![false; n];
            mask[20 * 1024 + 30] = true;
            calib::ModuleCalibration::from_values_scaled(
                [&p[0], &p[1], &p[2]],
                [&g[0], &g[1], &g[2]],
                &mask,
                Scale::Photons { energy_kev: 1.0 },
                &mut MaskCounts::default(),
            )
        };
        let raw: Vec<u8> = (0..n).flat_map(|_| 170u16.to_le_bytes()).collect();
        let mut lost = ModuleFrame::new(1, 0, 128);
        let mut whole = ModuleFrame::new(1, 1, 128);
        for p in 0..128 {
            whole.mark_received(p);
            if p != 3 {
                lost.mark_received(p);
            }
        }
        let mut stores = (Vec::new(), Vec::new());
        for double_pixels in ["split", "mask"] {
            let mut json: serde_json::Value =
                converted_config(true, true, double_pixels).raw.clone();
            json["converted_output"] = "photons_int16".into();
            json["photon_energy_kev"] = 1.0.into();
            let cfg = DetectorConfig::from_json_str(&json.to_string(), "t").unwrap();
            assert_eq!(cfg.image_bytes(), 1030 * 1028 * 2);
            let calibration = Calibration {
                modules: vec![module(), module()],
                masked: MaskCounts::default(),
                id: 1,
            };
            let mut pixels = ModulePixels::with_calibration(&cfg, Some(calibration));
            let len = cfg.image_bytes();
            let direct = buffer(&mut stores.0, len, true);
            let via_row = buffer(&mut stores.1, len, false);
            assert!(bytemuck::try_cast_slice_mut::<u8, i16>(via_row).is_err());
            for image in [&mut *direct, &mut *via_row] {
                pixels.write(0, &lost, &raw, image);
                pixels.write(1, &whole, &raw, image);
            }
            assert!(direct == via_row, "{double_pixels}");
            let px: Vec<i16> = direct
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]))
                .collect();
            let at = |x: usize, y: usize| px[y * 1030 + x];
            // Module 0 (not mirrored): ordinary pixels 7; the masked one MIN; rows 12..15
            // (packet 3) MIN, gaps included.
            assert_eq!((at(0, 0), at(100, 300), at(30, 20)), (7, 7, i16::MIN));
            assert!((0..1030).all(|x| (12..16).all(|y| at(x, y) == i16::MIN)));
            // Module 1 rotated: module pixel (c, r) at (1029 - c', 1027 - r').
            assert_eq!(at(1029, 1027), 7);
            assert_eq!(at(1029 - 30, 1027 - 20), i16::MIN);
            match double_pixels {
                // 7 / 2 = 3 (toward zero) in the double pixel and its gap pixel; the corner
                // pixel double both ways 7 / 2 / 2 = 1 over 2x2.
                "split" => {
                    assert_eq!(
                        (at(255, 10), at(256, 10), at(257, 10), at(258, 10)),
                        (3, 3, 3, 3)
                    );
                    assert_eq!((at(255, 255), at(256, 256), at(257, 257)), (1, 1, 1));
                    assert_eq!(at(254, 10), 7);
                }
                _ => {
                    assert_eq!(
                        (
                            at(255, 10),
                            at(256, 10),
                            at(257, 10),
                            at(258, 10),
                            at(254, 10)
                        ),
                        (i16::MIN, i16::MIN, i16::MIN, i16::MIN, 7)
                    );
                }
            }
            // A missing module: its whole rectangle MIN, the other module untouched.
            pixels.zero(1, direct);
            let px: Vec<i16> = direct
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]))
                .collect();
            assert!(px[514 * 1030..].iter().all(|v| *v == i16::MIN));
            assert_eq!(px[100 * 1030 + 100], 7);
        }
    }

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
