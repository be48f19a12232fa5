//! `std-daq verify`: recomputes every image's end-to-end checksum ([`std_daq_common::checksum`])
//! from a written file and reports each image whose pixels no longer match the checksum the
//! assembler computed when it made the image (stored per image in `/<detector>/checksum`).
//!
//! Images are read through libhdf5 as any reader gets them (a compressed file is decompressed by
//! its filter), so the check covers the whole path: assembler, ImageBuffer, replication, writer,
//! compression, disk. It only reads: it never modifies the file.

use std::path::{Path, PathBuf};

use hdf5::types::{FloatSize, IntSize, TypeDescriptor};
use hdf5::{Dataset, File, H5Type};
use std_daq_common::checksum::{image_checksum, CHECKSUM_NONE, CHECKSUM_XXH3_BLOCKS};

/// One image whose pixels do not give the stored checksum.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    /// Its position in the file's `data`.
    pub index: u64,
    pub image_id: u64,
    pub stored: u64,
    pub computed: u64,
}

/// What [`verify_file`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub file: PathBuf,
    /// The group holding `data` and the ledger.
    pub detector_group: String,
    pub images: u64,
    /// Images whose checksum was recomputed (the others carry none, e.g. zeros for an image
    /// lost in the buffer or an index never written).
    pub checked: u64,
    pub without_checksum: u64,
    /// Images with a checksum kind this build does not know (not checked).
    pub unknown_checksum_kind: u64,
    pub mismatches: Vec<Mismatch>,
    /// Images libhdf5 could not read (e.g. a compressed chunk too damaged to decompress).
    pub unreadable: Vec<Unreadable>,
}

/// One image that could not be read at all.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unreadable {
    pub index: u64,
    pub image_id: u64,
    pub error: String,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty() && self.unreadable.is_empty() && self.unknown_checksum_kind == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: HDF5 error while {op}: {source}")]
    Hdf5 {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: hdf5::Error,
    },
    #[error(
        "{0}: no group with `data` and a `checksum` ledger (a file written before std-daq kept \
         checksums, or not a std-daq file)"
    )]
    NoLedger(PathBuf),
    #[error("{path}: {what}")]
    Layout { path: PathBuf, what: String },
}

/// Checks every image of the file at `path`.
pub fn verify_file(path: &Path) -> Result<VerifyReport, VerifyError> {
    let hdf5_err = |op| {
        let path = path.to_owned();
        move |source| VerifyError::Hdf5 { path, op, source }
    };
    let layout = |what: String| VerifyError::Layout {
        path: path.to_owned(),
        what,
    };
    let file = File::open(path).map_err(hdf5_err("opening the file"))?;
    let names = file
        .member_names()
        .map_err(hdf5_err("listing the groups"))?;
    let group_name = names
        .into_iter()
        .filter(|n| n != "entry")
        .find(|n| {
            file.group(n)
                .is_ok_and(|g| g.link_exists("data") && g.link_exists("checksum"))
        })
        .ok_or_else(|| VerifyError::NoLedger(path.to_owned()))?;
    let group = file
        .group(&group_name)
        .map_err(hdf5_err("opening the detector group"))?;
    let data = group.dataset("data").map_err(hdf5_err("opening data"))?;
    let read_u64 = |name: &str| -> Result<Vec<u64>, VerifyError> {
        group
            .dataset(name)
            .and_then(|d| d.read_raw::<u64>())
            .map_err(hdf5_err("reading the ledger"))
    };
    let checksums = read_u64("checksum")?;
    let image_ids = read_u64("image_id")?;
    let kinds: Vec<u16> = group
        .dataset("checksum_kind")
        .and_then(|d| d.read_raw::<u16>())
        .map_err(hdf5_err("reading checksum_kind"))?;
    let shape = data.shape();
    let [n, _, _] = shape[..] else {
        return Err(layout(format!(
            "data has shape {shape:?}, not [n, height, width]"
        )));
    };
    if checksums.len() != n || kinds.len() != n || image_ids.len() != n {
        return Err(layout(format!(
            "data holds {n} images but the ledger has {} checksums, {} kinds, {} image ids",
            checksums.len(),
            kinds.len(),
            image_ids.len()
        )));
    }
    let descriptor = data
        .dtype()
        .and_then(|t| t.to_descriptor())
        .map_err(hdf5_err("reading the image type"))?;
    let mut report = VerifyReport {
        file: path.to_owned(),
        detector_group: group_name,
        images: n as u64,
        ..VerifyReport::default()
    };
    let mut bytes = Vec::new();
    for index in 0..n {
        match kinds[index] {
            CHECKSUM_NONE => {
                report.without_checksum += 1;
                continue;
            }
            CHECKSUM_XXH3_BLOCKS => {}
            _ => {
                report.unknown_checksum_kind += 1;
                continue;
            }
        }
        match read_image_bytes(&data, &descriptor, index, &mut bytes) {
            Ok(Some(())) => {}
            Ok(None) => {
                return Err(layout(format!(
                    "images of type {descriptor:?} are not supported"
                )))
            }
            Err(e) => {
                report.unreadable.push(Unreadable {
                    index: index as u64,
                    image_id: image_ids[index],
                    error: e.to_string(),
                });
                continue;
            }
        }
        report.checked += 1;
        let computed = image_checksum(&bytes);
        if computed != checksums[index] {
            report.mismatches.push(Mismatch {
                index: index as u64,
                image_id: image_ids[index],
                stored: checksums[index],
                computed,
            });
        }
    }
    Ok(report)
}

/// Image `index` as its little-endian bytes (the ImageBuffer's form); `None` for a type std-daq
/// never writes.
fn read_image_bytes(
    data: &Dataset,
    descriptor: &TypeDescriptor,
    index: usize,
    out: &mut Vec<u8>,
) -> hdf5::Result<Option<()>> {
    fn read<T: H5Type + bytemuck::Pod>(
        data: &Dataset,
        index: usize,
        out: &mut Vec<u8>,
    ) -> hdf5::Result<Option<()>> {
        let image = data.read_slice::<T, _, ndarray::Ix3>(ndarray::s![index..index + 1, .., ..])?;
        out.clear();
        for v in image.iter() {
            out.extend_from_slice(bytemuck::bytes_of(v));
        }
        Ok(Some(()))
    }
    match descriptor {
        TypeDescriptor::Unsigned(IntSize::U1) => read::<u8>(data, index, out),
        TypeDescriptor::Unsigned(IntSize::U2) => read::<u16>(data, index, out),
        TypeDescriptor::Unsigned(IntSize::U4) => read::<u32>(data, index, out),
        TypeDescriptor::Unsigned(IntSize::U8) => read::<u64>(data, index, out),
        TypeDescriptor::Integer(IntSize::U2) => read::<i16>(data, index, out),
        TypeDescriptor::Integer(IntSize::U4) => read::<i32>(data, index, out),
        TypeDescriptor::Float(FloatSize::U4) => read::<f32>(data, index, out),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::file::{Compression, ImageFile, ImageFileSpec, ImageRecord};
    use std_daq_common::Dtype;

    fn image(i: u64) -> Vec<u8> {
        (0..6 * 8u64)
            .flat_map(|p| ((i * 100 + p) as u16).to_le_bytes())
            .collect()
    }

    fn write(path: &Path, compression: Compression) {
        let spec = ImageFileSpec {
            detector_name: "jf".into(),
            n_images: 4,
            height: 6,
            width: 8,
            dtype: Dtype::Uint16,
            compression,
            n_modules: 1,
        };
        let mut f = ImageFile::create(path, &spec).unwrap();
        for i in 0..3 {
            let record = ImageRecord {
                image_id: 10 + i,
                status: 1,
                checksum: image_checksum(&image(i)),
                checksum_kind: CHECKSUM_XXH3_BLOCKS,
                ..ImageRecord::default()
            };
            f.write_image(i, &image(i), record).unwrap();
        }
        f.write_zero_image(3, ImageRecord::default()).unwrap();
        f.close().unwrap();
    }

    #[test]
    fn an_intact_file_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ok.h5");
        write(&path, Compression::None);
        let r = verify_file(&path).unwrap();
        assert_eq!(
            (r.images, r.checked, r.without_checksum, r.ok()),
            (4, 3, 1, true)
        );
        assert_eq!(r.detector_group, "jf");
    }

    #[test]
    fn a_file_without_a_ledger_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.h5");
        File::create(&path).unwrap().create_group("jf").unwrap();
        let e = verify_file(&path).unwrap_err();
        assert!(matches!(e, VerifyError::NoLedger(_)), "{e}");
    }
}
