//! Data files of a run written by N writers, with known values per run position, for the master
//! file tests (`master_file.rs`, `master_h5py.rs`).
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

use h5_writer::file::{Compression, ImageFile, ImageFileSpec, ImageRecord};
use std_daq_common::checksum::image_checksum;
use std_daq_common::nxmx::Nxmx;
use std_daq_common::writer_command::{writer_data_file, MasterRequest, MasterSource};
use std_daq_common::Dtype;

pub const HEIGHT: usize = 4;
pub const WIDTH: usize = 6;
pub const FIRST_IMAGE_ID: u64 = 5001;
pub const DETECTOR: &str = "jf-test";

/// Pixel of run position `p` at `(y, x)`: distinct over positions, rows and columns (modulo
/// 2^16 for the benchmark's long runs).
pub fn pixel(p: u64, y: usize, x: usize) -> u16 {
    ((p + 1) * 100 + y as u64 * 10 + x as u64) as u16
}

pub fn image(p: u64, height: usize, width: usize) -> Vec<u8> {
    (0..height)
        .flat_map(|y| (0..width).map(move |x| (y, x)))
        .flat_map(|(y, x)| pixel(p, y, x).to_le_bytes())
        .collect()
}

/// The ledger row of run position `p`: every column a function of `p`.
pub fn record(p: u64, pixels: &[u8]) -> ImageRecord {
    let mut r = ImageRecord {
        image_id: FIRST_IMAGE_ID + p,
        status: if p % 3 == 2 { 2 } else { 1 },
        missing_packets: p as u32 * 3,
        missing_modules: [p, 0, 0, 1 << 63],
        frame_index: 70_000 + p,
        timestamp: 1_000_000 + 10 * p,
        bunch_id: p as f64 + 0.25,
        checksum: image_checksum(pixels),
        checksum_kind: 1,
        calibration_id: 900 + p,
        ..ImageRecord::default()
    };
    r.module_missing_packets[0] = (p * 10) as u16;
    r.module_missing_packets[1] = (p * 10 + 1) as u16;
    r
}

pub fn spec(compression: Compression) -> ImageFileSpec {
    ImageFileSpec {
        detector_name: DETECTOR.into(),
        n_images: 1_000_000,
        height: HEIGHT as u32,
        width: WIDTH as u32,
        dtype: Dtype::Uint16,
        compression,
        n_modules: 2,
    }
}

/// Writes the data files of a run at `<dir>/<stem>.h5` dealt over `rows.len()` writers, writer
/// `k` writing rows `0..rows[k]` (position `k + N * row`), except the positions in `missing`:
/// those rows stay unwritten (zero pixels, status 0, like an image that never came). Returns
/// the `make_master` request for it.
pub fn write_run(
    dir: &Path,
    stem: &str,
    spec: &ImageFileSpec,
    nxmx: Option<&Nxmx>,
    rows: &[u64],
    missing: &[u64],
) -> MasterRequest {
    let output = dir.join(format!("{stem}.h5"));
    let n = rows.len() as u64;
    let (h, w) = (spec.height as usize, spec.width as usize);
    let mut sources = Vec::new();
    for (k, &count) in rows.iter().enumerate() {
        let path = writer_data_file(&output, k as u32);
        let mut file = ImageFile::create_with_nxmx(&path, spec, nxmx).unwrap();
        for row in 0..count {
            let p = k as u64 + n * row;
            if missing.contains(&p) && row + 1 < count {
                continue;
            }
            let pixels = image(p, h, w);
            file.write_image(row, &pixels, record(p, &pixels)).unwrap();
        }
        assert_eq!(file.close().unwrap(), count);
        sources.push(MasterSource {
            writer: k as u32,
            file: path.display().to_string(),
            rows: count,
        });
    }
    MasterRequest {
        output_file: output.display().to_string(),
        writers: n as u32,
        first_image_id: FIRST_IMAGE_ID,
        n_images: Some(1000),
        sources,
        request_id: Some("req-42".into()),
        metadata: Some(
            serde_json::json!({"scan_id": 7})
                .as_object()
                .unwrap()
                .clone(),
        ),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        nxmx: None,
        run_summary: Some(serde_json::json!({"writers": [{"images_written": rows[0]}]})),
    }
}
