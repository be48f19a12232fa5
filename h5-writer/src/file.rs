//! One HDF5 output file of a write run, in std_daq's layout:
//!
//! ```text
//! /<detector_name>/                  group
//! /<detector_name>/data              [n, H, W] image dtype, chunks (1, H, W), maxshape (unlimited, H, W)
//! /<detector_name>/image_id          [n] u64
//! /<detector_name>/status            [n] u16
//! /<detector_name>/missing_packets   [n] u32
//! /<detector_name>/missing_modules   [n, 4] u64   bit m = module m missing
//! /<detector_name>/n_missing_modules [n] u16
//! /<detector_name>/frame_index, timestamp, bunch_id, module_missing_packets [n, n_modules] u16,
//!                  lost_in_buffer, checksum, checksum_kind, calibration_id: the ledger
//!                  ([`LEDGER`]: every record dataset with its `description` and `units`)
//! /entry/...                         NXmx groups ([`crate::nxmx`], docs/nxmx.md) when created
//!                                    with [`ImageFile::create_with_nxmx`] (the writer always does);
//!                                    /entry/data/data is a hard link to /<detector_name>/data
//! ```
//!
//! Images go into `data` by direct chunk writes (`H5Dwrite_chunk`) straight from the caller's
//! slice, which in production points into shared memory. With [`Compression::BitshuffleLz4`] each
//! image is first compressed by [`crate::compress::Compressor`] (in this thread, into a reused buffer) and
//! `data` carries the bitshuffle filter (id 32008, LZ4), so readers with the filter plugin (h5py
//! with Debian's `bitshuffle` package or `hdf5plugin`) decompress transparently. The per-image records are kept in
//! memory and written out at each checkpoint and by [`ImageFile::close`].
//!
//! **Crash consistency.** Every dataset starts empty and grows: `data` by one row before each
//! image's chunk is written (a direct chunk write must lie inside the extent), the per-image record
//! datasets at each [`ImageFile::checkpoint`], which writes the records of every image written
//! since the last one and flushes the file. The file's metadata cache is created with evictions
//! disabled, so no metadata reaches the disk between checkpoints: if the process dies (SIGKILL,
//! power), the file on disk is the last checkpoint, which any HDF5 reader opens and which holds
//! exactly [`ImageFile::images_checkpointed`] images, every one with its pixels and records. What
//! was written after it is orphaned space at the end of the file. (A death *during* a checkpoint's
//! flush is the one window left; it lasts as long as writing a few kB of metadata.)
//!
//! **Reading while writing (SWMR).** The file uses the latest HDF5 format, and once the run's
//! start attributes are in, [`ImageFile::start_swmr`] switches it to single-writer/multiple-reader
//! mode: a reader that opens the `.part` with `h5py.File(path, "r", swmr=True)` (and calls
//! `refresh()` on a dataset to see it grow) reads every checkpointed image and its ledger rows
//! while the writer goes on. No object or attribute can be created in SWMR mode, so `end_time`
//! and the closing attributes ([`ImageFile::set_closing_attribute`]) are written after the SWMR
//! writer closed the file, by reopening it normally. A file left by a killed SWMR writer still has
//! HDF5's "open for write" flags: SWMR readers open it as it is, and [`clear_status_flags`] (what
//! `h5clear -s` does; the restarted writer does it for its predecessor's file, and
//! [`ImageFile::abandon`] for its own) makes it open everywhere.
//!
//! **Rows without pixels cost no chunk.** Chunks of `data` are allocated only when written (alloc
//! time incremental), and `data` has the defined fill value 0 (fill time "if set": HDF5 fills
//! nothing itself, since every allocated chunk is written whole, but a reader of an unallocated
//! chunk gets the fill value, raw or bitshuffle alike). So a row that holds no pixels (an index
//! skipped, an image lost in the ImageBuffer before it was written out:
//! [`ImageFile::write_zero_image`]) gets only its record and reads back as zeros; only an index
//! whose chunk was already written is overwritten with a zero chunk. Under overload, losing an
//! image costs no write at all. This module must never leave a row whose chunk holds pixels that
//! are not the image of its record.

use std::path::{Path, PathBuf};

use hdf5::dataset::{AllocTime, FillTime};
use hdf5::filters::Filter;
use hdf5::plist::file_access::{
    CacheDecreaseMode, CacheIncreaseMode, FlashIncreaseMode, MetadataCacheConfig,
};
use hdf5::types::{FloatSize, IntSize, TypeDescriptor};
use hdf5::{Dataset, Extent, File, Group, H5Type, SimpleExtents};
use hdf5_sys::h5::hsize_t;
use hdf5_sys::h5d::H5Dwrite_chunk;
use hdf5_sys::h5p::H5P_DEFAULT;
use std_daq_common::messages::MAX_MODULES;
use std_daq_common::{Dtype, ImageMetadata};

use crate::compress::{CompressError, Compressor, BSHUF_CLIENT_VALUES, BSHUF_FILTER_ID};

/// Largest chunk HDF5 can store (chunk sizes are 32-bit in the file format).
const MAX_CHUNK_BYTES: u64 = u32::MAX as u64;

/// Records kept in memory up front; more are added as images come in.
const INITIAL_RECORD_CAPACITY: u64 = 1 << 20;

/// How images are stored in `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Raw chunks, no filter: the image bytes as they are.
    #[default]
    None,
    /// Bitshuffle + LZ4, the HDF5 bitshuffle filter (id 32008) with client values `[0, 2]`, as
    /// written by PSI's std_daq and Dectris detectors. Needs the filter plugin to create the file
    /// (Debian package `bitshuffle`, or `HDF5_PLUGIN_PATH`) and to read it.
    BitshuffleLz4,
}

/// What one file holds: the detector's group name, how many images at most, their geometry, and
/// how they are stored.
#[derive(Debug, Clone)]
pub struct ImageFileSpec {
    /// Name of the group the datasets go into (std_daq: the detector name). No `/`.
    pub detector_name: String,
    /// Most images this file may hold (the highest index + 1 it accepts). `data` starts empty
    /// and grows one row per image whatever this is, so an unbounded run passes a huge number
    /// (at most `i64::MAX`) and its file holds exactly the images written when it is closed.
    pub n_images: u64,
    pub height: u32,
    pub width: u32,
    pub dtype: Dtype,
    pub compression: Compression,
    /// Modules per image: the columns of `module_missing_packets` (1..=256).
    pub n_modules: u16,
}

impl ImageFileSpec {
    /// Bytes of one image, `height * width * dtype.bytes()`.
    pub fn image_bytes(&self) -> u64 {
        u64::from(self.height) * u64::from(self.width) * self.dtype.bytes() as u64
    }
}

/// The ledger row of one image: what is written into the record datasets ([`LEDGER`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageRecord {
    pub image_id: u64,
    /// An [`std_daq_common::ImageStatus`] code; 0 (undefined) for an index never written.
    pub status: u16,
    pub missing_packets: u32,
    /// Bit m set = module m's frame did not arrive (ImageMetadata's mask, modules 0..256).
    pub missing_modules: [u64; 4],
    pub frame_index: u64,
    pub timestamp: u64,
    /// The detector's pulse/bunch id (JUNGFRAU `bunchid`; 0 where the detector sends none).
    pub bunch_id: f64,
    /// The assembler's end-to-end checksum of the image ([`std_daq_common::checksum`]).
    pub checksum: u64,
    /// 0 = no checksum (e.g. an image the writer replaced by zeros), 1 = xxh3 blocks.
    pub checksum_kind: u16,
    pub calibration_id: u64,
    /// Packets missing per module; only the first `n_modules` of the file are stored.
    pub module_missing_packets: [u16; MAX_MODULES],
}

impl Default for ImageRecord {
    fn default() -> Self {
        ImageRecord {
            image_id: 0,
            status: 0,
            missing_packets: 0,
            missing_modules: [0; 4],
            frame_index: 0,
            timestamp: 0,
            bunch_id: 0.0,
            checksum: 0,
            checksum_kind: 0,
            calibration_id: 0,
            module_missing_packets: [0; MAX_MODULES],
        }
    }
}

impl From<&ImageMetadata> for ImageRecord {
    fn from(m: &ImageMetadata) -> Self {
        ImageRecord {
            image_id: m.image_id,
            status: m.status,
            missing_packets: m.missing_packets,
            missing_modules: m.missing_modules,
            frame_index: m.frame_index,
            timestamp: m.timestamp,
            bunch_id: f64::from_bits(m.bunch_id_bits),
            checksum: m.checksum,
            checksum_kind: m.checksum_kind,
            calibration_id: m.calibration_id,
            module_missing_packets: m.module_missing_packets,
        }
    }
}

impl ImageRecord {
    /// The record of an image whose pixels are not the assembler's (replaced by zeros): the
    /// checksum no longer describes them.
    pub fn without_checksum(mut self) -> Self {
        self.checksum = 0;
        self.checksum_kind = 0;
        self
    }
}

/// An [`ImageRecord`] as kept in memory per image (the module column lives in `module_rows`, so
/// a record costs 80 bytes, not 600).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Row {
    image_id: u64,
    status: u16,
    checksum_kind: u16,
    missing_packets: u32,
    missing_modules: [u64; 4],
    frame_index: u64,
    timestamp: u64,
    bunch_id: f64,
    checksum: u64,
    calibration_id: u64,
}

/// The record datasets of the detector group: name, meaning, units (`description` and `units`
/// attributes in the file; docs/file-format.md repeats them).
pub const LEDGER: &[(&str, &str, &str)] = &[
    ("image_id", "the image's id (JUNGFRAU: the frame number), in file order", ""),
    ("status", "image status: 0 undefined (never written), 1 good, 2 missing packets (their pixels are zero), 3 modules disagreed on the frame, 4 lost in buffer (pixels zero)", ""),
    ("missing_packets", "UDP packets missing over all modules (a missing module counts all its packets)", "packets"),
    ("missing_modules", "bit m of the 256-bit mask (4 x u64, little-endian words) set = module m's frame did not arrive", ""),
    ("n_missing_modules", "modules whose frame did not arrive", "modules"),
    ("module_missing_packets", "UDP packets missing per module [image, module]", "packets"),
    ("frame_index", "the detector's frame counter of the image", ""),
    ("timestamp", "the detector's timestamp field (JUNGFRAU: 10 MHz clock ticks)", "counts"),
    ("bunch_id", "the detector's pulse/bunch id (JUNGFRAU bunchid; EIGER det_spec1; GigaFRoST scan id), 0 where none", ""),
    ("lost_in_buffer", "1 = the image was overwritten in shared memory before it was written: its pixels are zero", ""),
    ("checksum", "the assembler's end-to-end checksum of the image's uncompressed bytes (xxh3-64 over 256 KiB block digests); std-daq verify recomputes it", ""),
    ("checksum_kind", "0 = no checksum (the pixels are not the assembler's, e.g. zeros), 1 = xxh3-64 over 256 KiB block digests", ""),
    ("calibration_id", "which calibration converted the image (xxh3-64 of its content), 0 = raw", ""),
];

/// Why a file could not be created, written or closed. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}: already exists; refusing to overwrite it")]
    AlreadyExists(PathBuf),
    #[error("{path}: image {index} has {got} bytes, expected {expected}")]
    WrongSize {
        path: PathBuf,
        index: u64,
        expected: usize,
        got: usize,
    },
    #[error("{path}: image index {index} out of range (file holds {n_images} images)")]
    IndexOutOfRange {
        path: PathBuf,
        index: u64,
        n_images: u64,
    },
    #[error("{path}: unsupported image dtype {dtype:?}")]
    UnsupportedDtype { path: PathBuf, dtype: Dtype },
    #[error("{path}: invalid file spec: {reason}")]
    InvalidSpec { path: PathBuf, reason: String },
    #[error(
        "{path}: bitshuffle compression needs the HDF5 bitshuffle filter (id 32008), which libhdf5 \
         cannot load: install the Debian package `bitshuffle` (plugin \
         /usr/lib/x86_64-linux-gnu/hdf5/serial/plugins/libh5bshuf.so) or set HDF5_PLUGIN_PATH to \
         the folder holding libh5bshuf.so"
    )]
    FilterUnavailable { path: PathBuf },
    #[error("{path}: compressing image {index}: {source}")]
    Compress {
        path: PathBuf,
        index: u64,
        #[source]
        source: CompressError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: HDF5 error while {op}: {source}")]
    Hdf5 {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: hdf5::Error,
    },
    #[error(
        "{path}: cannot add {what} while readers may be reading the file (SWMR mode): set it \
         before start_swmr, or as a closing attribute"
    )]
    SwmrStarted { path: PathBuf, what: String },
}

/// The open HDF5 objects; dropped (datasets before the file) when the file is finished.
#[derive(Debug)]
struct Open {
    file: File,
    group: Group,
    data: Dataset,
    /// Current extent of `data` (rows); grows by one before each new image.
    data_rows: u64,
    /// (height, width) of one image: the fixed dimensions of `data`.
    image_shape: (usize, usize),
    records: RecordSets,
}

/// The per-image record datasets, created empty and grown at each checkpoint.
#[derive(Debug)]
struct RecordSets {
    image_id: Dataset,
    status: Dataset,
    missing_packets: Dataset,
    missing_modules: Dataset,
    n_missing_modules: Dataset,
    module_missing_packets: Dataset,
    frame_index: Dataset,
    timestamp: Dataset,
    bunch_id: Dataset,
    lost_in_buffer: Dataset,
    checksum: Dataset,
    checksum_kind: Dataset,
    calibration_id: Dataset,
}

/// Rows per chunk of the record datasets.
const RECORD_CHUNK: usize = 4096;

/// One output file being written: create, write images by index, close.
///
/// Dropping an `ImageFile` without [`close`](Self::close) still finishes the file (trims it and
/// writes the records), logging any error, so an aborted run leaves a readable file.
pub struct ImageFile {
    path: PathBuf,
    spec: ImageFileSpec,
    image_bytes: usize,
    /// `None` once finished.
    open: Option<Open>,
    /// Indexed by image index; `written[i]` says whether image `i` has been written.
    records: Vec<Row>,
    /// `n_modules` missing-packet counts per image index.
    module_rows: Vec<u16>,
    written: Vec<bool>,
    /// `has_chunk[i]`: a chunk was written at index `i` (pixels, or zeros over pixels).
    has_chunk: Vec<bool>,
    images_written: u64,
    /// Images whose data and records are in the file on disk (the last checkpoint).
    images_checkpointed: u64,
    /// Attributes were set since the last checkpoint.
    attributes_dirty: bool,
    /// One zero image, allocated the first time it is needed.
    zeros: Vec<u8>,
    /// Set when `spec.compression` is not `None`; holds the reused compression buffers.
    compressor: Option<Compressor>,
    /// [`ImageFile::start_swmr`] was called: no new objects or attributes until closed.
    swmr: bool,
    /// Root attributes written when the file is closed.
    closing_attributes: Vec<(String, String)>,
}

// Not derived: `records` and `zeros` can be megabytes.
impl std::fmt::Debug for ImageFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageFile")
            .field("path", &self.path)
            .field("spec", &self.spec)
            .field("open", &self.open.is_some())
            .field("images_written", &self.images_written)
            .finish_non_exhaustive()
    }
}

// The writer moves files between threads and wraps errors in anyhow.
const _: () = {
    const fn assert_send<T: Send>() {}
    const fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}
    assert_send::<ImageFile>();
    assert_error::<FileError>();
};

impl ImageFile {
    /// Creates the file; fails with [`FileError::AlreadyExists`] if anything is at `path` (never
    /// truncates existing data).
    pub fn create(path: &Path, spec: &ImageFileSpec) -> Result<Self, FileError> {
        Self::create_with_nxmx(path, spec, None)
    }

    /// [`ImageFile::create`], with the NXmx groups of [`crate::nxmx`] when `nxmx` is given
    /// (the root's `default` is then `entry`).
    pub fn create_with_nxmx(
        path: &Path,
        spec: &ImageFileSpec,
        nxmx: Option<&std_daq_common::nxmx::Nxmx>,
    ) -> Result<Self, FileError> {
        let image_bytes = validate_spec(path, spec)?;
        let compressor = match spec.compression {
            Compression::None => None,
            Compression::BitshuffleLz4 => {
                // Checked before creating anything; the dataset could not be created anyway.
                if !bitshuffle_filter().is_available() {
                    return Err(FileError::FilterUnavailable {
                        path: path.to_owned(),
                    });
                }
                let compressor =
                    Compressor::new(spec.dtype.bytes()).map_err(|e| FileError::InvalidSpec {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    })?;
                Some(compressor)
            }
        };
        match path.symlink_metadata() {
            Ok(_) => return Err(FileError::AlreadyExists(path.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(FileError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        // H5F_ACC_EXCL: O_EXCL underneath, so a file that appeared since the check above is not
        // touched either.
        let file = match File::with_options()
            // The latest format: what SWMR needs (superblock v3, extensible-array chunk index).
            .with_fapl(|fapl| fapl.mdc_config(&no_evictions()).libver_latest())
            .create_excl(path)
        {
            Ok(file) => file,
            Err(_) if path.symlink_metadata().is_ok() => {
                return Err(FileError::AlreadyExists(path.to_owned()))
            }
            Err(source) => {
                return Err(FileError::Hdf5 {
                    path: path.to_owned(),
                    op: "creating the file",
                    source,
                })
            }
        };
        let (group, data, records) = match create_layout(&file, path, spec, nxmx) {
            Ok(objects) => objects,
            Err(e) => {
                // The file is ours (created exclusively just now) and useless half-made; leaving it
                // would only make a retry fail with AlreadyExists.
                drop(file);
                if let Err(rm) = std::fs::remove_file(path) {
                    tracing::warn!(path = %path.display(), "removing a half-created file: {rm}");
                }
                return Err(e);
            }
        };

        // The empty file is the first checkpoint: from here on the file on disk always opens.
        if let Err(source) = file.flush() {
            drop((group, data, records, file));
            let _ = std::fs::remove_file(path);
            return Err(FileError::Hdf5 {
                path: path.to_owned(),
                op: "flushing the new file",
                source,
            });
        }
        let capacity = spec.n_images.min(INITIAL_RECORD_CAPACITY) as usize;
        Ok(Self {
            path: path.to_owned(),
            spec: spec.clone(),
            image_bytes,
            open: Some(Open {
                file,
                group,
                data,
                data_rows: 0,
                image_shape: (spec.height as usize, spec.width as usize),
                records,
            }),
            records: Vec::with_capacity(capacity),
            module_rows: Vec::with_capacity(capacity * usize::from(spec.n_modules)),
            written: Vec::with_capacity(capacity),
            has_chunk: Vec::with_capacity(capacity),
            images_written: 0,
            images_checkpointed: 0,
            attributes_dirty: false,
            zeros: Vec::new(),
            compressor,
            swmr: false,
            closing_attributes: Vec::new(),
        })
    }

    /// Switches the file to SWMR mode after a checkpoint: from now on SWMR readers can open it
    /// and see each checkpoint's images and rows. No attribute can be added afterwards
    /// ([`FileError::SwmrStarted`]); closing attributes still can.
    pub fn start_swmr(&mut self) -> Result<(), FileError> {
        if self.swmr {
            return Ok(());
        }
        self.checkpoint()?;
        let open = self.open.as_ref().ok_or_else(|| self.closed_error())?;
        let id = open.file.id();
        hdf5::sync::sync(|| {
            // SAFETY: we hold hdf5's global library lock (hdf5::sync::sync), required for every
            // call into the non-threadsafe libhdf5. `id` is the live file id owned by
            // `open.file`, which outlives the call; the file was created read-write with the
            // latest format, as H5Fstart_swmr_write requires.
            let ret = unsafe { hdf5_sys::h5f::H5Fstart_swmr_write(id) };
            if ret < 0 {
                Err(hdf5::Error::query().unwrap_or_else(|e| e))
            } else {
                Ok(())
            }
        })
        .map_err(|source| FileError::Hdf5 {
            path: self.path.clone(),
            op: "starting SWMR mode",
            source,
        })?;
        self.swmr = true;
        Ok(())
    }

    /// Whether [`start_swmr`](Self::start_swmr) was called.
    pub fn is_swmr(&self) -> bool {
        self.swmr
    }

    /// A root string attribute written when the file is closed (by [`close`](Self::close) or a
    /// drop; not by [`abandon`](Self::abandon)), e.g. the run summary.
    pub fn set_closing_attribute(&mut self, name: &str, value: &str) {
        self.closing_attributes
            .push((name.to_owned(), value.to_owned()));
    }

    /// Sets a string attribute on the file's root (config, software version, times).
    /// On disk at the next checkpoint.
    pub fn set_file_attribute(&mut self, name: &str, value: &str) -> Result<(), FileError> {
        let open = self.open.as_ref().ok_or_else(|| self.closed_error())?;
        if self.swmr {
            return Err(FileError::SwmrStarted {
                path: self.path.clone(),
                what: format!("the attribute {name}"),
            });
        }
        set_str_attr(&open.file, name, value).map_err(|source| FileError::Hdf5 {
            path: self.path.clone(),
            op: "writing a file attribute",
            source,
        })?;
        self.attributes_dirty = true;
        Ok(())
    }

    pub fn spec(&self) -> &ImageFileSpec {
        &self.spec
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes one image must have: `height * width * dtype.bytes()`.
    pub fn image_bytes(&self) -> usize {
        self.image_bytes
    }

    /// Direct chunk write of one image at `index` (< `n_images`); `data.len()` must equal
    /// [`image_bytes`](Self::image_bytes). On error nothing is written and no record changes.
    pub fn write_image(
        &mut self,
        index: u64,
        data: &[u8],
        record: ImageRecord,
    ) -> Result<(), FileError> {
        self.check_index(index)?;
        if data.len() != self.image_bytes {
            return Err(FileError::WrongSize {
                path: self.path.clone(),
                index,
                expected: self.image_bytes,
                got: data.len(),
            });
        }
        put_chunk(
            self.open.as_mut(),
            &self.path,
            self.compressor.as_mut(),
            index,
            data,
        )?;
        self.mark_chunk(index);
        self.set_record(index, record);
        Ok(())
    }

    /// Image `index` holds zeros, with `record` (an image lost in the ImageBuffer, a position
    /// whose image never came). Costs no chunk write unless a chunk was already written at
    /// `index` (the source was overwritten while it was being written out), which is then
    /// overwritten with zeros; otherwise the chunk stays unallocated and reads as the fill
    /// value 0 (see the module docs).
    pub fn write_zero_image(&mut self, index: u64, record: ImageRecord) -> Result<(), FileError> {
        self.check_index(index)?;
        if self.has_chunk.get(index as usize).copied().unwrap_or(false) {
            self.ensure_zeros();
            put_chunk(
                self.open.as_mut(),
                &self.path,
                self.compressor.as_mut(),
                index,
                &self.zeros,
            )?;
        } else if self.open.is_none() {
            return Err(self.closed_error());
        }
        self.set_record(index, record);
        Ok(())
    }

    /// Whether a chunk was written at `index` (for tests and benchmarks of the zero-cost rows).
    pub fn has_chunk(&self, index: u64) -> bool {
        self.has_chunk.get(index as usize).copied().unwrap_or(false)
    }

    fn mark_chunk(&mut self, index: u64) {
        let i = index as usize;
        if i >= self.has_chunk.len() {
            self.has_chunk.resize(i + 1, false);
        }
        self.has_chunk[i] = true;
    }

    /// Number of images written so far = highest index written + 1.
    pub fn images_written(&self) -> u64 {
        self.images_written
    }

    /// Images that are in the file on disk with their records: what a reader finds if the
    /// process dies now (see the module docs).
    pub fn images_checkpointed(&self) -> u64 {
        self.images_checkpointed
    }

    /// Makes every image written so far durable against a crash of this process: `data` grown
    /// over every row (skipped rows read as zeros), the records of the new images, then a flush. Cheap when nothing is new.
    /// Returns [`images_checkpointed`](Self::images_checkpointed).
    pub fn checkpoint(&mut self) -> Result<u64, FileError> {
        let count = self.images_written;
        if count == self.images_checkpointed && !self.attributes_dirty {
            return Ok(count);
        }
        self.fill_gaps(count)?;
        self.write_records(count)?;
        let open = self.open.as_ref().ok_or_else(|| self.closed_error())?;
        open.file.flush().map_err(|source| FileError::Hdf5 {
            path: self.path.clone(),
            op: "flushing a checkpoint",
            source,
        })?;
        self.images_checkpointed = count;
        self.attributes_dirty = false;
        Ok(count)
    }

    /// Gives the file up after a failed write (disk full, I/O error), leaving on disk exactly
    /// the last checkpoint: nothing more is written. (Closing normally would flush metadata of
    /// images after the checkpoint, and a flush that fails half-way, as on a full disk, leaves
    /// a file no reader opens.) Returns [`images_checkpointed`](Self::images_checkpointed).
    pub fn abandon(mut self) -> u64 {
        if let Some(open) = self.open.take() {
            if let Err(e) = redirect_to_dev_null(&open.file) {
                tracing::error!(
                    path = %self.path.display(),
                    "cannot detach the file from HDF5 before giving it up ({e}); closing it \
                     normally may leave it unreadable"
                );
            }
            let Open {
                file,
                group,
                data,
                records,
                ..
            } = open;
            drop((records, data, group));
            // Every write of the close goes to /dev/null; its errors do not matter.
            let _ = file.close();
            if self.swmr {
                // The superblock is rewritten in place: no space needed even on a full disk.
                if let Err(e) = clear_status_flags(&self.path) {
                    tracing::error!(
                        "{e}; SWMR readers (h5py swmr=True) still open the file, `h5clear -s` \
                         makes it open everywhere"
                    );
                }
            }
        }
        self.images_checkpointed
    }

    /// Writes the data and the records of every image, flushes and closes. Returns the count.
    ///
    /// Indexes below the count that were never written get zero pixels and a default record
    /// (status 0 = undefined).
    pub fn close(mut self) -> Result<u64, FileError> {
        self.finish()
    }

    fn check_index(&self, index: u64) -> Result<(), FileError> {
        if index < self.spec.n_images {
            Ok(())
        } else {
            Err(FileError::IndexOutOfRange {
                path: self.path.clone(),
                index,
                n_images: self.spec.n_images,
            })
        }
    }

    fn ensure_zeros(&mut self) {
        if self.zeros.len() != self.image_bytes {
            self.zeros = vec![0; self.image_bytes];
        }
    }

    fn set_record(&mut self, index: u64, record: ImageRecord) {
        // `index < n_images`, which was checked to fit a usize-sized dataspace at create.
        let i = index as usize;
        let n_modules = usize::from(self.spec.n_modules);
        if i >= self.records.len() {
            // Amortised growth; within the initial capacity this does not allocate.
            self.records.resize(i + 1, Row::default());
            self.module_rows.resize((i + 1) * n_modules, 0);
            self.written.resize(i + 1, false);
        }
        self.records[i] = Row {
            image_id: record.image_id,
            status: record.status,
            checksum_kind: record.checksum_kind,
            missing_packets: record.missing_packets,
            missing_modules: record.missing_modules,
            frame_index: record.frame_index,
            timestamp: record.timestamp,
            bunch_id: record.bunch_id,
            checksum: record.checksum,
            calibration_id: record.calibration_id,
        };
        // n_modules <= MAX_MODULES (validate_spec).
        self.module_rows[i * n_modules..(i + 1) * n_modules]
            .copy_from_slice(&record.module_missing_packets[..n_modules]);
        self.written[i] = true;
        self.images_written = self.images_written.max(index + 1);
    }

    fn closed_error(&self) -> FileError {
        closed_error(&self.path)
    }

    /// Fills gaps, trims, writes the records, flushes and closes. Idempotent: later calls find
    /// nothing open and return the count.
    fn finish(&mut self) -> Result<u64, FileError> {
        let count = self.images_written;
        if self.open.is_none() {
            return Ok(count);
        }
        let result = self.finish_open(count);
        // Close whatever happened: datasets and group before the file, so the file really closes
        // (the default close degree is weak and waits for every open object).
        if let Some(Open {
            file,
            group,
            data,
            records,
            ..
        }) = self.open.take()
        {
            drop(records);
            drop(data);
            drop(group);
            let closed = file.close();
            if result.is_ok() {
                closed.map_err(|source| FileError::Hdf5 {
                    path: self.path.clone(),
                    op: "closing the file",
                    source,
                })?;
            }
        }
        result?;
        if self.swmr {
            self.write_last_words()?;
        }
        Ok(count)
    }

    /// After the SWMR writer closed the file (which clears its flags): reopens it normally for
    /// what SWMR mode cannot add, `end_time` and the closing attributes. Without HDF5's file
    /// lock: a SWMR reader still holding the file (online processing) keeps a shared lock that
    /// would make the run fail at its very end; it only reads, and latest-format metadata is
    /// checksummed, so such a reader retries a read that raced with these few writes.
    fn write_last_words(&mut self) -> Result<(), FileError> {
        let hdf5_err = |op| {
            let path = self.path.clone();
            move |source| FileError::Hdf5 { path, op, source }
        };
        let file = File::with_options()
            .with_fapl(|fapl| fapl.file_locking(false))
            .open_rw(&self.path)
            .map_err(hdf5_err("reopening for end_time"))?;
        write_end(&file, &self.closing_attributes).map_err(hdf5_err("writing end_time"))?;
        file.close().map_err(hdf5_err("closing the file"))
    }

    fn finish_open(&mut self, count: u64) -> Result<(), FileError> {
        self.fill_gaps(count)?;
        self.write_records(count)?;
        let open = self.open.as_ref().ok_or_else(|| self.closed_error())?;
        let hdf5_err = |op| {
            let path = self.path.clone();
            move |source| FileError::Hdf5 { path, op, source }
        };
        if !self.swmr {
            write_end(&open.file, &self.closing_attributes)
                .map_err(hdf5_err("writing end_time"))?;
        }
        open.file.flush().map_err(hdf5_err("flushing the file"))?;
        self.images_checkpointed = count;
        Ok(())
    }

    /// Every index below `count` gets a record (default, status 0, if never written) and lies
    /// inside `data`'s extent: rows without a chunk read as the fill value 0, so nothing is
    /// written for them.
    fn fill_gaps(&mut self, count: u64) -> Result<(), FileError> {
        let n = count as usize;
        self.records.resize(n, Row::default());
        self.module_rows
            .resize(n * usize::from(self.spec.n_modules), 0);
        self.written.resize(n, false);
        let open = self.open.as_mut().ok_or_else(|| closed_error(&self.path))?;
        grow_data(open, &self.path, count)
    }

    /// Grows the record datasets to `count` rows and writes the rows since the last checkpoint.
    fn write_records(&mut self, count: u64) -> Result<(), FileError> {
        let open = self.open.as_ref().ok_or_else(|| self.closed_error())?;
        let (from, to) = (self.images_checkpointed as usize, count as usize);
        let new = &self.records[from.min(to)..to];
        let hdf5_err = |op| {
            let path = self.path.clone();
            move |source| FileError::Hdf5 { path, op, source }
        };
        let r = &open.records;
        append(&r.image_id, from, to, &column(new, |r| r.image_id))
            .map_err(hdf5_err("writing image_id"))?;
        append(&r.status, from, to, &column(new, |r| r.status))
            .map_err(hdf5_err("writing status"))?;
        append(
            &r.missing_packets,
            from,
            to,
            &column(new, |r| r.missing_packets),
        )
        .map_err(hdf5_err("writing missing_packets"))?;
        let n_missing = column(new, |r| {
            r.missing_modules
                .iter()
                .map(|w| w.count_ones() as u16)
                .sum::<u16>()
        });
        append(&r.n_missing_modules, from, to, &n_missing)
            .map_err(hdf5_err("writing n_missing_modules"))?;
        let modules: Vec<u64> = new.iter().flat_map(|r| r.missing_modules).collect();
        append_rows(&r.missing_modules, from, to, 4, &modules)
            .map_err(hdf5_err("writing missing_modules"))?;
        let n_modules = usize::from(self.spec.n_modules);
        let module_rows = &self.module_rows[from.min(to) * n_modules..to * n_modules];
        append_rows(&r.module_missing_packets, from, to, n_modules, module_rows)
            .map_err(hdf5_err("writing module_missing_packets"))?;
        append(&r.frame_index, from, to, &column(new, |r| r.frame_index))
            .map_err(hdf5_err("writing frame_index"))?;
        append(&r.timestamp, from, to, &column(new, |r| r.timestamp))
            .map_err(hdf5_err("writing timestamp"))?;
        append(&r.bunch_id, from, to, &column(new, |r| r.bunch_id))
            .map_err(hdf5_err("writing bunch_id"))?;
        let lost = column(new, |r| {
            u8::from(r.status == std_daq_common::ImageStatus::LostInBuffer as u16)
        });
        append(&r.lost_in_buffer, from, to, &lost).map_err(hdf5_err("writing lost_in_buffer"))?;
        append(&r.checksum, from, to, &column(new, |r| r.checksum))
            .map_err(hdf5_err("writing checksum"))?;
        append(
            &r.checksum_kind,
            from,
            to,
            &column(new, |r| r.checksum_kind),
        )
        .map_err(hdf5_err("writing checksum_kind"))?;
        append(
            &r.calibration_id,
            from,
            to,
            &column(new, |r| r.calibration_id),
        )
        .map_err(hdf5_err("writing calibration_id"))
    }
}

/// `end_time` (root and /entry) and the closing attributes.
fn write_end(file: &File, closing: &[(String, String)]) -> hdf5::Result<()> {
    let end_time = now_iso8601();
    set_str_attr(file, "end_time", &end_time)?;
    if file.link_exists("entry") {
        crate::nxmx::write_end_time(file, &end_time)?;
    }
    for (name, value) in closing {
        set_str_attr(file, name, value)?;
    }
    Ok(())
}

/// Clears HDF5's "open for write" flags of a file a SWMR writer left without closing it (killed,
/// or given up by [`ImageFile::abandon`]), as `h5clear -s` does, so that every reader opens it.
/// The file's content is not touched. Fails if a writer still has it open.
pub fn clear_status_flags(path: &Path) -> Result<(), FileError> {
    let hdf5_err = |op| {
        let path = path.to_owned();
        move |source| FileError::Hdf5 { path, op, source }
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        FileError::InvalidSpec {
            path: path.to_owned(),
            reason: "the path contains a NUL byte".into(),
        }
    })?;
    // Without the lock, as write_last_words: a SWMR reader may hold the file.
    let fapl = hdf5::plist::FileAccess::build()
        .file_locking(false)
        .finish()
        .map_err(hdf5_err("making a file access list"))?;
    let fapl_id = fapl.id();
    hdf5::sync::sync(|| {
        // SAFETY: we hold hdf5's global library lock, required for every libhdf5 call.
        // `fapl_id` is a live file access list owned by `fapl` for the whole closure. The
        // property "clear_status_flags" (libhdf5's H5F_ACS_CLEAR_STATUS_FLAGS_NAME, what h5clear
        // sets) is an hbool_t: libhdf5 copies its registered size (1 or 4 bytes) from `clear`,
        // a 4-byte 1 whose first byte is 1 on this little-endian target, valid during the call.
        // `c_path` is a NUL-terminated string valid for the call. The file id H5Fopen returns
        // is closed before the closure ends.
        unsafe {
            let mut clear: u32 = 1;
            let name = c"clear_status_flags";
            if hdf5_sys::h5p::H5Pset(fapl_id, name.as_ptr(), (&raw mut clear).cast()) < 0 {
                return Err(hdf5::Error::query().unwrap_or_else(|e| e));
            }
            let id = hdf5_sys::h5f::H5Fopen(c_path.as_ptr(), hdf5_sys::h5f::H5F_ACC_RDWR, fapl_id);
            if id < 0 {
                return Err(hdf5::Error::query().unwrap_or_else(|e| e));
            }
            if hdf5_sys::h5f::H5Fclose(id) < 0 {
                return Err(hdf5::Error::query().unwrap_or_else(|e| e));
            }
        }
        Ok(())
    })
    .map_err(hdf5_err("clearing the SWMR writer's flags"))
}

fn column<T>(records: &[Row], f: impl Fn(&Row) -> T) -> Vec<T> {
    records.iter().map(f).collect()
}

/// Grows a 2-D record dataset to `to` rows and writes `values` (row-major) into rows `from..to`.
fn append_rows<T: H5Type>(
    ds: &Dataset,
    from: usize,
    to: usize,
    columns: usize,
    values: &[T],
) -> hdf5::Result<()> {
    ds.resize((to, columns))?;
    if to > from {
        let view = ndarray::ArrayView2::from_shape((to - from, columns), values)
            .map_err(|e| hdf5::Error::from(e.to_string()))?;
        ds.write_slice(view, (from..to, ..))?;
    }
    Ok(())
}

/// Grows a 1-D record dataset to `to` rows and writes `values` into rows `from..to`.
fn append<T: H5Type>(ds: &Dataset, from: usize, to: usize, values: &[T]) -> hdf5::Result<()> {
    ds.resize(to)?;
    if to > from {
        ds.write_slice(values, from..to)?;
    }
    Ok(())
}

/// Points the file descriptor under `file` (HDF5's default sec2 driver) at /dev/null, so that
/// whatever HDF5 writes from now on never reaches the file.
fn redirect_to_dev_null(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let dev_null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let mut handle: *mut std::ffi::c_void = std::ptr::null_mut();
    let id = file.id();
    let ret = hdf5::sync::sync(|| {
        // SAFETY: we hold hdf5's global lock (hdf5::sync::sync); `id` is a live file id owned by
        // `file`; H5P_DEFAULT is a valid fapl; `handle` is a valid out-pointer that HDF5 sets to
        // the driver's handle, which for sec2 (the only driver this module opens files with)
        // points to the driver's `int` file descriptor, alive while the file is open.
        unsafe { hdf5_sys::h5f::H5Fget_vfd_handle(id, H5P_DEFAULT, &mut handle) }
    });
    if ret < 0 || handle.is_null() {
        return Err(std::io::Error::other("H5Fget_vfd_handle failed"));
    }
    // SAFETY: see above: `handle` points to the sec2 driver's `int` descriptor of an open file.
    let fd = unsafe { *handle.cast::<libc::c_int>() };
    // SAFETY: dup2 on two open descriptors: `fd` now refers to /dev/null (the old description,
    // the output file, is closed); HDF5 keeps using the number and closes it at H5Fclose.
    // `dev_null`'s own descriptor is closed when it drops.
    if unsafe { libc::dup2(dev_null.as_raw_fd(), fd) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A metadata cache that never writes anything on its own: dirty metadata reaches the disk only
/// at a flush (checkpoint or close), so the file on disk is always the last checkpoint. Sizes
/// adapt off; between checkpoints the cache grows as needed (a few kB per thousand images).
fn no_evictions() -> MetadataCacheConfig {
    MetadataCacheConfig {
        evictions_enabled: false,
        incr_mode: CacheIncreaseMode::Off,
        flash_incr_mode: FlashIncreaseMode::Off,
        decr_mode: CacheDecreaseMode::Off,
        ..MetadataCacheConfig::default()
    }
}

impl Drop for ImageFile {
    fn drop(&mut self) {
        if self.open.is_some() {
            match self.finish() {
                Ok(n) => tracing::warn!(
                    path = %self.path.display(),
                    images = n,
                    "HDF5 file dropped without close; finished it"
                ),
                Err(e) => tracing::error!("HDF5 file dropped without close, finishing failed: {e}"),
            }
        }
    }
}

fn closed_error(path: &Path) -> FileError {
    FileError::Hdf5 {
        path: path.to_owned(),
        op: "writing",
        source: hdf5::Error::Internal("the file is already closed".into()),
    }
}

/// The filter `data` carries with [`Compression::BitshuffleLz4`].
fn bitshuffle_filter() -> Filter {
    Filter::user(BSHUF_FILTER_ID, &BSHUF_CLIENT_VALUES)
}

/// Stores one whole image as the chunk at `[index, 0, 0]`: compressed first if the file has a
/// compressor, then `H5Dwrite_chunk`.
fn put_chunk(
    open: Option<&mut Open>,
    path: &Path,
    compressor: Option<&mut Compressor>,
    index: u64,
    image: &[u8],
) -> Result<(), FileError> {
    let open = open.ok_or_else(|| closed_error(path))?;
    let chunk = match compressor {
        Some(c) => c.compress(image).map_err(|source| FileError::Compress {
            path: path.to_owned(),
            index,
            source,
        })?,
        None => image,
    };
    // A direct chunk write must lie inside the extent.
    grow_data(open, path, index + 1)?;
    write_raw_chunk(&open.data, path, index, chunk)
}

/// Grows `data` to at least `rows` rows. Only in memory until the next checkpoint (evictions are
/// off), so a crash never leaves rows without records.
fn grow_data(open: &mut Open, path: &Path, rows: u64) -> Result<(), FileError> {
    if rows > open.data_rows {
        open.data
            .resize((rows as usize, open.image_shape.0, open.image_shape.1))
            .map_err(|source| FileError::Hdf5 {
                path: path.to_owned(),
                op: "growing the data dataset",
                source,
            })?;
        open.data_rows = rows;
    }
    Ok(())
}

/// `H5Dwrite_chunk` of `chunk`, the stored bytes of the chunk at `[index, 0, 0]`, with filter mask
/// 0 (every filter of the dataset applied: none, or bitshuffle).
fn write_raw_chunk(data: &Dataset, path: &Path, index: u64, chunk: &[u8]) -> Result<(), FileError> {
    let offset: [hsize_t; 3] = [index, 0, 0];
    let id = data.id();
    hdf5::sync::sync(|| {
        // SAFETY: we hold hdf5's global library lock (hdf5::sync::sync), which the non-
        // threadsafe libhdf5 requires for every call. `id` is a live dataset id owned by `data`,
        // borrowed for the whole call. `offset` has one element per dataset dimension (rank 3) and
        // names a chunk inside the current extent (index < n_images, the extent until close).
        // `chunk` is valid for `chunk.len()` bytes for the duration of the call and only read.
        // Its content is the chunk as stored: the raw image (1 x H x W x dtype bytes) on a dataset
        // without filters, or one bitshuffle-filter chunk on a dataset with that filter, matching
        // filter mask 0.
        let ret = unsafe {
            H5Dwrite_chunk(
                id,
                H5P_DEFAULT,
                0,
                offset.as_ptr(),
                chunk.len(),
                chunk.as_ptr().cast(),
            )
        };
        if ret < 0 {
            Err(hdf5::Error::query().unwrap_or_else(|e| e))
        } else {
            Ok(())
        }
    })
    .map_err(|source| FileError::Hdf5 {
        path: path.to_owned(),
        op: "writing an image chunk",
        source,
    })
}

/// The group and the `data` dataset of a new file.
fn create_layout(
    file: &File,
    path: &Path,
    spec: &ImageFileSpec,
    nxmx: Option<&std_daq_common::nxmx::Nxmx>,
) -> Result<(Group, Dataset, RecordSets), FileError> {
    let hdf5_err = |op| {
        let path = path.to_owned();
        move |source| FileError::Hdf5 { path, op, source }
    };
    let group = file
        .create_group(&spec.detector_name)
        .map_err(hdf5_err("creating the detector group"))?;
    let extents = SimpleExtents::from_vec(vec![
        Extent::resizable(0),
        Extent::fixed(spec.height as usize),
        Extent::fixed(spec.width as usize),
    ]);
    let data = group
        .new_dataset_builder()
        .empty_as(&type_descriptor(path, spec.dtype)?)
        // One image per chunk, so every image is one direct chunk write.
        .chunk((1, spec.height as usize, spec.width as usize))
        // Chunks are allocated when written; an unallocated one reads as the fill value 0
        // (rows without pixels cost no write, see the module docs).
        .alloc_time(Some(AllocTime::Incr))
        .fill_value(zero_of(spec.dtype))
        .fill_time(FillTime::IfSet)
        // Direct chunk writes bypass the chunk cache; do not reserve memory for one.
        .chunk_cache(0, 0, 1.0)
        .set_filters(&match spec.compression {
            Compression::None => vec![],
            Compression::BitshuffleLz4 => vec![bitshuffle_filter()],
        })
        .shape(extents)
        .create("data")
        .map_err(hdf5_err("creating the data dataset"))?;
    // NeXus: viewers (silx, NeXpy) open the detector group as plottable data.
    set_str_attr(file, "NX_class", "NXroot").map_err(hdf5_err("writing NeXus attributes"))?;
    let default = if nxmx.is_some() {
        "entry"
    } else {
        &spec.detector_name
    };
    set_str_attr(file, "default", default).map_err(hdf5_err("writing NeXus attributes"))?;
    set_str_attr(&group, "NX_class", "NXdata").map_err(hdf5_err("writing NeXus attributes"))?;
    set_str_attr(&group, "signal", "data").map_err(hdf5_err("writing NeXus attributes"))?;
    let start_time = now_iso8601();
    set_str_attr(file, "start_time", &start_time).map_err(hdf5_err("writing start_time"))?;
    if let Some(n) = nxmx {
        let data_path = format!("/{}/data", spec.detector_name);
        crate::nxmx::write_entry(file, n, &data_path, spec.width, spec.height, &start_time)
            .map_err(hdf5_err("writing the NXmx groups"))?;
    }
    set_str_attr(
        file,
        "software",
        concat!("std-daq ", env!("CARGO_PKG_VERSION")),
    )
    .map_err(hdf5_err("writing the software version"))?;
    let records = (|| -> hdf5::Result<RecordSets> {
        let n_modules = usize::from(spec.n_modules);
        Ok(RecordSets {
            image_id: record_set::<u64>(&group, "image_id", None)?,
            status: record_set::<u16>(&group, "status", None)?,
            missing_packets: record_set::<u32>(&group, "missing_packets", None)?,
            missing_modules: record_set::<u64>(&group, "missing_modules", Some(4))?,
            n_missing_modules: record_set::<u16>(&group, "n_missing_modules", None)?,
            module_missing_packets: record_set::<u16>(
                &group,
                "module_missing_packets",
                Some(n_modules),
            )?,
            frame_index: record_set::<u64>(&group, "frame_index", None)?,
            timestamp: record_set::<u64>(&group, "timestamp", None)?,
            bunch_id: record_set::<f64>(&group, "bunch_id", None)?,
            lost_in_buffer: record_set::<u8>(&group, "lost_in_buffer", None)?,
            checksum: record_set::<u64>(&group, "checksum", None)?,
            checksum_kind: record_set::<u16>(&group, "checksum_kind", None)?,
            calibration_id: record_set::<u64>(&group, "calibration_id", None)?,
        })
    })()
    .map_err(hdf5_err("creating the record datasets"))?;
    Ok((group, data, records))
}

/// An empty, growable record dataset: `[0]`, or `[0, columns]`, chunked by [`RECORD_CHUNK`] rows.
fn record_set<T: H5Type>(
    group: &Group,
    name: &str,
    columns: Option<usize>,
) -> hdf5::Result<Dataset> {
    let builder = group.new_dataset::<T>();
    let ds = match columns {
        None => builder
            .chunk(RECORD_CHUNK)
            .shape(SimpleExtents::from_vec(vec![Extent::resizable(0)]))
            .create(name)?,
        Some(c) => builder
            .chunk((RECORD_CHUNK, c))
            .shape(SimpleExtents::from_vec(vec![
                Extent::resizable(0),
                Extent::fixed(c),
            ]))
            .create(name)?,
    };
    if let Some((_, description, units)) = LEDGER.iter().find(|(n, ..)| *n == name) {
        set_str_attr(&ds, "description", description)?;
        if !units.is_empty() {
            set_str_attr(&ds, "units", units)?;
        }
    }
    Ok(ds)
}

/// Checks what HDF5 would reject later, or worse accept; returns the bytes of one image.
pub(crate) fn validate_spec(path: &Path, spec: &ImageFileSpec) -> Result<usize, FileError> {
    let invalid = |reason: String| FileError::InvalidSpec {
        path: path.to_owned(),
        reason,
    };
    let name = &spec.detector_name;
    if name.is_empty() || name == "." || name.contains('/') || name.contains('\0') {
        return Err(invalid(format!(
            "detector name {name:?} is not a valid HDF5 group name"
        )));
    }
    if spec.height == 0 || spec.width == 0 {
        return Err(invalid(format!(
            "image size {}x{} has no pixels",
            spec.height, spec.width
        )));
    }
    type_descriptor(path, spec.dtype)?;
    if spec.n_modules == 0 || usize::from(spec.n_modules) > MAX_MODULES {
        return Err(invalid(format!(
            "n_modules {} is not in 1..={MAX_MODULES}",
            spec.n_modules
        )));
    }
    let image_bytes = spec.image_bytes();
    // A compressed chunk can be slightly larger than the image (incompressible data).
    let chunk_bytes = match spec.compression {
        Compression::None => image_bytes,
        Compression::BitshuffleLz4 => {
            let n = usize::try_from(image_bytes).unwrap_or(usize::MAX);
            crate::compress::compress_bound(n, spec.dtype.bytes()) as u64
        }
    };
    if chunk_bytes > MAX_CHUNK_BYTES {
        return Err(invalid(format!(
            "one image is {chunk_bytes} bytes as stored, more than an HDF5 chunk can hold \
             ({MAX_CHUNK_BYTES})"
        )));
    }
    if usize::try_from(spec.n_images).is_err() || spec.n_images > i64::MAX as u64 {
        return Err(invalid(format!("n_images {} is too large", spec.n_images)));
    }
    Ok(image_bytes as usize)
}

/// The fill value of `data`: a 0 of the image type.
fn zero_of(dtype: Dtype) -> hdf5::types::OwnedDynValue {
    match dtype {
        Dtype::Uint8 => 0u8.into(),
        Dtype::Uint16 => 0u16.into(),
        Dtype::Uint32 => 0u32.into(),
        Dtype::Uint64 => 0u64.into(),
        Dtype::Int16 => 0i16.into(),
        Dtype::Int32 => 0i32.into(),
        // Unknown is refused by validate_spec before any dataset exists.
        Dtype::Float32 | Dtype::Unknown => 0f32.into(),
    }
}

/// The in-file type of the images: native (little-endian here) integers or float.
pub(crate) fn type_descriptor(path: &Path, dtype: Dtype) -> Result<TypeDescriptor, FileError> {
    Ok(match dtype {
        Dtype::Uint8 => TypeDescriptor::Unsigned(IntSize::U1),
        Dtype::Uint16 => TypeDescriptor::Unsigned(IntSize::U2),
        Dtype::Uint32 => TypeDescriptor::Unsigned(IntSize::U4),
        Dtype::Uint64 => TypeDescriptor::Unsigned(IntSize::U8),
        Dtype::Int16 => TypeDescriptor::Integer(IntSize::U2),
        Dtype::Int32 => TypeDescriptor::Integer(IntSize::U4),
        Dtype::Float32 => TypeDescriptor::Float(FloatSize::U4),
        Dtype::Unknown => {
            return Err(FileError::UnsupportedDtype {
                path: path.to_owned(),
                dtype,
            })
        }
    })
}

/// A scalar variable-length UTF-8 string attribute.
pub(crate) fn set_str_attr(location: &hdf5::Location, name: &str, value: &str) -> hdf5::Result<()> {
    let value: hdf5::types::VarLenUnicode = value
        .parse()
        .map_err(|e| hdf5::Error::from(format!("attribute {name}: {e}")))?;
    location
        .new_attr::<hdf5::types::VarLenUnicode>()
        .create(name)?
        .write_scalar(&value)
}

/// Now as UTC `YYYY-MM-DDTHH:MM:SS.mmmZ` (NeXus's ISO 8601), without a date crate.
pub fn now_iso8601() -> String {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec(dtype: Dtype, n_images: u64) -> ImageFileSpec {
        ImageFileSpec {
            detector_name: "jf-test".into(),
            n_images,
            height: 6,
            width: 8,
            dtype,
            compression: Compression::None,
            n_modules: 2,
        }
    }

    /// Pixel value of image `i` at `(y, x)`: distinct over images and pixels.
    fn pixel(i: u64, y: usize, x: usize) -> u16 {
        (i as u16) * 1000 + (y as u16) * 10 + x as u16 + 1
    }

    fn u16_image(i: u64, h: usize, w: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(h * w * 2);
        for y in 0..h {
            for x in 0..w {
                out.extend_from_slice(&pixel(i, y, x).to_le_bytes());
            }
        }
        out
    }

    fn record(i: u64) -> ImageRecord {
        ImageRecord {
            image_id: 5000 + i,
            status: 1 + (i % 2) as u16,
            missing_packets: (i * 7) as u32,
            ..ImageRecord::default()
        }
    }

    /// The rows of `data` that have a chunk in the file.
    fn allocated_rows(data: &Dataset) -> Vec<u64> {
        (0..data.num_chunks().unwrap())
            .map(|i| data.chunk_info(i).unwrap().offset[0])
            .collect()
    }

    /// A lost image (no chunk yet) costs no write, in raw and compressed files; written pixels
    /// replaced by zeros get a zero chunk; the file reads zeros for both and the chunk of the
    /// lost row is not allocated (the chunk query lists only the rows with pixels).
    #[test]
    fn rows_without_pixels_cost_no_chunk_and_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let mut kinds = vec![Compression::None];
        if bitshuffle_filter().is_available() {
            kinds.push(Compression::BitshuffleLz4);
        }
        for compression in kinds {
            let path = dir.path().join(format!("{compression:?}.h5"));
            let spec = ImageFileSpec {
                compression,
                ..spec(Dtype::Uint16, 10)
            };
            let mut f = ImageFile::create(&path, &spec).unwrap();
            f.start_swmr().unwrap();
            let lost = |i| ImageRecord {
                status: 4,
                ..record(i)
            };
            f.write_image(0, &u16_image(0, 6, 8), record(0)).unwrap();
            f.write_zero_image(1, lost(1)).unwrap();
            assert!(!f.has_chunk(1));
            f.write_image(2, &u16_image(2, 6, 8), record(2)).unwrap();
            f.write_zero_image(2, lost(2)).unwrap();
            assert!(f.has_chunk(2));
            assert_eq!(f.checkpoint().unwrap(), 3);
            // The last row has no chunk: the extent still covers it.
            f.write_zero_image(3, lost(3)).unwrap();
            assert_eq!(f.close().unwrap(), 4);

            let file = File::open(&path).unwrap();
            let data = file.dataset("jf-test/data").unwrap();
            assert_eq!(data.shape(), [4, 6, 8], "{compression:?}");
            assert_eq!(allocated_rows(&data), [0, 2], "{compression:?}");
            let values = data.read_raw::<u16>().unwrap();
            assert_eq!(&values[..48], &u16_bytes_as_u16(&u16_image(0, 6, 8))[..]);
            assert!(values[48..].iter().all(|&v| v == 0), "{compression:?}");
            let one: Vec<u16> = data.read_slice_1d((1, 0, ..)).unwrap().to_vec();
            assert_eq!(one, vec![0; 8]);
            let status = file.dataset("jf-test/status").unwrap();
            assert_eq!(status.read_raw::<u16>().unwrap(), [1, 4, 4, 4]);
        }
    }

    fn u16_bytes_as_u16(bytes: &[u8]) -> Vec<u16> {
        bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect()
    }

    fn read_u16(path: &Path) -> (Vec<usize>, Vec<u16>) {
        let f = File::open(path).unwrap();
        let ds = f.dataset("jf-test/data").unwrap();
        let shape = ds.shape();
        let values = ds.read_raw::<u16>().unwrap();
        (shape, values)
    }

    /// What is on disk between checkpoints is the last checkpoint: a copy of the SWMR file taken
    /// while it is open (= the file a killed writer leaves) opens as it is for a SWMR reader,
    /// and for any reader once its flags are cleared (as the restarted writer does), and holds
    /// exactly the checkpointed images, pixels and records.
    #[test]
    fn the_file_on_disk_is_always_the_last_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("live.h5");
        let mut file = ImageFile::create(&path, &spec(Dtype::Uint16, 100)).unwrap();
        file.start_swmr().unwrap();
        let snapshot = |name: &str| {
            let copy = dir.path().join(name);
            std::fs::copy(&path, &copy).unwrap();
            copy
        };
        for i in 0..10 {
            file.write_image(i, &u16_image(i, 6, 8), record(i)).unwrap();
        }
        assert_eq!(file.images_checkpointed(), 0);
        assert_eq!(file.checkpoint().unwrap(), 10);
        for i in 10..15 {
            file.write_image(i, &u16_image(i, 6, 8), record(i)).unwrap();
        }
        let at_10 = snapshot("at-10.h5");
        assert_eq!(file.checkpoint().unwrap(), 15);
        let at_15 = snapshot("at-15.h5");
        file.close().unwrap();

        for (copy, n) in [(at_10, 10u64), (at_15, 15)] {
            let swmr = File::open_as(&copy, hdf5::file::OpenMode::ReadSWMR).unwrap();
            let data = swmr.dataset("jf-test/data").unwrap();
            assert_eq!(data.shape(), [n as usize, 6, 8]);
            assert_eq!(data.read_raw::<u16>().unwrap()[8 + 3], pixel(0, 1, 3));
            drop((data, swmr));
            assert!(File::open(&copy).is_err(), "flags of an open writer");
            clear_status_flags(&copy).unwrap();
            let (shape, values) = read_u16(&copy);
            assert_eq!(shape, [n as usize, 6, 8], "{}", copy.display());
            let want: Vec<u16> = (0..n)
                .flat_map(|i| (0..6).flat_map(move |y| (0..8).map(move |x| pixel(i, y, x))))
                .collect();
            assert_eq!(values, want);
            let f = File::open(&copy).unwrap();
            let ids = f
                .dataset("jf-test/image_id")
                .unwrap()
                .read_raw::<u64>()
                .unwrap();
            assert_eq!(ids, (0..n).map(|i| 5000 + i).collect::<Vec<_>>());
            let status = f
                .dataset("jf-test/status")
                .unwrap()
                .read_raw::<u16>()
                .unwrap();
            assert_eq!(status, (0..n).map(|i| record(i).status).collect::<Vec<_>>());
            let modules = f.dataset("jf-test/missing_modules").unwrap();
            assert_eq!(modules.shape(), [n as usize, 4]);
        }
    }

    #[test]
    fn u16_round_trip_trimmed_to_images_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.h5");
        let mut f = ImageFile::create(&path, &spec(Dtype::Uint16, 4)).unwrap();
        assert_eq!(f.image_bytes(), 8 * 6 * 2);
        assert_eq!(f.path(), path);
        assert_eq!(f.spec().n_images, 4);
        // Out of order on purpose.
        for i in [1, 0, 2] {
            f.write_image(i, &u16_image(i, 6, 8), record(i)).unwrap();
        }
        assert_eq!(f.images_written(), 3);
        assert_eq!(f.close().unwrap(), 3);

        let (shape, values) = read_u16(&path);
        assert_eq!(shape, vec![3, 6, 8]);
        for i in 0..3u64 {
            for y in 0..6 {
                for x in 0..8 {
                    assert_eq!(values[(i as usize * 6 + y) * 8 + x], pixel(i, y, x));
                }
            }
        }
        let file = File::open(&path).unwrap();
        let g = file.group("jf-test").unwrap();
        let ids = g.dataset("image_id").unwrap();
        assert_eq!(ids.shape(), vec![3]);
        assert_eq!(ids.read_raw::<u64>().unwrap(), vec![5000, 5001, 5002]);
        assert_eq!(
            g.dataset("status").unwrap().read_raw::<u16>().unwrap(),
            vec![1, 2, 1]
        );
        assert_eq!(
            g.dataset("missing_packets")
                .unwrap()
                .read_raw::<u32>()
                .unwrap(),
            vec![0, 7, 14]
        );
        // Layout details readers rely on.
        let data = g.dataset("data").unwrap();
        assert_eq!(data.chunk(), Some(vec![1, 6, 8]));
        assert!(data.filters().is_empty());
        assert!(data.is_resizable());
        assert_eq!(data.dtype().unwrap().size(), 2);
        let dcpl = data.dcpl().unwrap();
        // Unallocated chunks (rows without pixels) read as a defined 0.
        assert_eq!(dcpl.fill_time(), FillTime::IfSet);
        assert_eq!(
            dcpl.fill_value_defined(),
            hdf5::plist::dataset_create::FillValue::UserDefined
        );
        assert_eq!(dcpl.fill_value_as::<u16>(), Some(0));
        assert_eq!(dcpl.alloc_time(), AllocTime::Incr);
    }

    #[test]
    fn float32_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f32.h5");
        let mut f = ImageFile::create(&path, &spec(Dtype::Float32, 2)).unwrap();
        let image = |i: u64| -> Vec<f32> {
            (0..48)
                .map(|p| i as f32 * 100.0 + p as f32 * 0.25 - 3.5)
                .collect()
        };
        for i in 0..2 {
            let bytes: Vec<u8> = image(i).iter().flat_map(|v| v.to_le_bytes()).collect();
            f.write_image(i, &bytes, record(i)).unwrap();
        }
        assert_eq!(f.close().unwrap(), 2);

        let file = File::open(&path).unwrap();
        let ds = file.dataset("jf-test/data").unwrap();
        assert_eq!(ds.shape(), vec![2, 6, 8]);
        let mut expected = image(0);
        expected.extend(image(1));
        assert_eq!(ds.read_raw::<f32>().unwrap(), expected);
    }

    #[test]
    fn every_dtype_has_its_element_size() {
        for (dtype, size) in [
            (Dtype::Uint8, 1),
            (Dtype::Uint16, 2),
            (Dtype::Uint32, 4),
            (Dtype::Uint64, 8),
            (Dtype::Int16, 2),
            (Dtype::Int32, 4),
            (Dtype::Float32, 4),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t.h5");
            let mut f = ImageFile::create(&path, &spec(dtype, 1)).unwrap();
            f.write_image(0, &vec![1u8; 48 * size], ImageRecord::default())
                .unwrap();
            f.close().unwrap();
            let file = File::open(&path).unwrap();
            let ds = file.dataset("jf-test/data").unwrap();
            assert_eq!(ds.dtype().unwrap().size(), size, "{dtype:?}");
            let signed = matches!(
                ds.dtype().unwrap().to_descriptor().unwrap(),
                TypeDescriptor::Integer(_)
            );
            assert_eq!(
                signed,
                matches!(dtype, Dtype::Int16 | Dtype::Int32),
                "{dtype:?}"
            );
        }
    }

    #[test]
    fn unknown_dtype_is_rejected_before_creating_anything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.h5");
        let err = ImageFile::create(&path, &spec(Dtype::Unknown, 1)).unwrap_err();
        assert!(matches!(err, FileError::UnsupportedDtype { .. }), "{err:?}");
        assert!(!path.exists());
    }

    #[test]
    fn already_exists_leaves_the_file_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exists.h5");
        let content = b"precious data, not HDF5".to_vec();
        std::fs::write(&path, &content).unwrap();
        let err = ImageFile::create(&path, &spec(Dtype::Uint16, 4)).unwrap_err();
        assert!(matches!(err, FileError::AlreadyExists(ref p) if p == &path));
        assert!(err.to_string().contains("exists.h5"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), content);

        // A real HDF5 file too, and a dangling symlink.
        let h5 = dir.path().join("real.h5");
        let mut f = ImageFile::create(&h5, &spec(Dtype::Uint16, 4)).unwrap();
        f.write_image(0, &u16_image(0, 6, 8), record(0)).unwrap();
        f.close().unwrap();
        let before = std::fs::read(&h5).unwrap();
        assert!(matches!(
            ImageFile::create(&h5, &spec(Dtype::Uint16, 4)),
            Err(FileError::AlreadyExists(_))
        ));
        assert_eq!(std::fs::read(&h5).unwrap(), before);

        let link = dir.path().join("dangling.h5");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        assert!(matches!(
            ImageFile::create(&link, &spec(Dtype::Uint16, 4)),
            Err(FileError::AlreadyExists(_))
        ));
        assert!(!dir.path().join("nowhere").exists());
    }

    #[test]
    fn wrong_size_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.h5");
        let mut f = ImageFile::create(&path, &spec(Dtype::Uint16, 4)).unwrap();
        let err = f
            .write_image(0, &[0u8; 95], ImageRecord::default())
            .unwrap_err();
        match &err {
            FileError::WrongSize {
                expected: 96,
                got: 95,
                index: 0,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("t.h5"), "{err}");
        assert!(f
            .write_image(1, &[0u8; 97], ImageRecord::default())
            .is_err());
        assert_eq!(f.images_written(), 0);
        assert_eq!(f.close().unwrap(), 0);

        let (shape, _) = read_u16(&path);
        assert_eq!(shape, vec![0, 6, 8]);
        let file = File::open(&path).unwrap();
        assert_eq!(file.dataset("jf-test/image_id").unwrap().shape(), vec![0]);
        assert_eq!(file.dataset("jf-test/data").unwrap().num_chunks(), Some(0));
    }

    #[test]
    fn index_out_of_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.h5");
        let mut f = ImageFile::create(&path, &spec(Dtype::Uint16, 2)).unwrap();
        let err = f
            .write_image(2, &u16_image(2, 6, 8), record(2))
            .unwrap_err();
        assert!(
            matches!(
                err,
                FileError::IndexOutOfRange {
                    index: 2,
                    n_images: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(matches!(
            f.write_zero_image(u64::MAX, record(0)),
            Err(FileError::IndexOutOfRange { .. })
        ));
        assert_eq!(f.images_written(), 0);
        f.write_image(1, &u16_image(1, 6, 8), record(1)).unwrap();
        assert_eq!(f.close().unwrap(), 2);
    }

    #[test]
    fn write_zero_image_replaces_a_written_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.h5");
        let mut f = ImageFile::create(&path, &spec(Dtype::Uint16, 3)).unwrap();
        for i in 0..3 {
            f.write_image(i, &u16_image(i, 6, 8), record(i)).unwrap();
        }
        let lost = ImageRecord {
            image_id: 5001,
            status: 4,
            missing_packets: 0,
            ..ImageRecord::default()
        };
        f.write_zero_image(1, lost).unwrap();
        f.write_zero_image(1, lost).unwrap(); // the zero buffer is reused
        assert_eq!(f.close().unwrap(), 3);

        let (shape, values) = read_u16(&path);
        assert_eq!(shape, vec![3, 6, 8]);
        assert!(values[48..96].iter().all(|&v| v == 0));
        assert_eq!(values[0], pixel(0, 0, 0));
        assert_eq!(values[96], pixel(2, 0, 0));
        let file = File::open(&path).unwrap();
        let status = file.dataset("jf-test/status").unwrap();
        assert_eq!(status.read_raw::<u16>().unwrap(), vec![1, 4, 1]);
    }

    #[test]
    fn skipped_indexes_read_back_as_zero_with_undefined_status() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.h5");
        let mut f = ImageFile::create(&path, &spec(Dtype::Uint16, 10)).unwrap();
        f.write_image(0, &u16_image(0, 6, 8), record(0)).unwrap();
        f.write_image(3, &u16_image(3, 6, 8), record(3)).unwrap();
        assert_eq!(f.images_written(), 4);
        assert_eq!(f.close().unwrap(), 4);

        let file = File::open(&path).unwrap();
        let data = file.dataset("jf-test/data").unwrap();
        // Skipped rows cost no chunk: they read as the fill value.
        assert_eq!(allocated_rows(&data), [0, 3]);
        let (shape, values) = read_u16(&path);
        assert_eq!(shape, vec![4, 6, 8]);
        assert!(values[48..144].iter().all(|&v| v == 0));
        assert_eq!(values[144], pixel(3, 0, 0));
        let ids = file.dataset("jf-test/image_id").unwrap();
        assert_eq!(ids.read_raw::<u64>().unwrap(), vec![5000, 0, 0, 5003]);
        let status = file.dataset("jf-test/status").unwrap();
        assert_eq!(status.read_raw::<u16>().unwrap(), vec![1, 0, 0, 2]);
    }

    /// In SWMR mode attributes are refused (named), images still go in, and the closed file has
    /// end_time and the closing attributes (written after reopening it normally).
    #[test]
    fn a_swmr_file_closes_with_end_time_and_closing_attributes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swmr.h5");
        let mut f = ImageFile::create(&path, &spec(Dtype::Uint16, 10)).unwrap();
        f.set_file_attribute("before", "yes").unwrap();
        f.start_swmr().unwrap();
        let e = f.set_file_attribute("after", "no").unwrap_err();
        assert!(matches!(e, FileError::SwmrStarted { .. }), "{e}");
        for i in 0..3 {
            f.write_image(i, &u16_image(i, 6, 8), record(i)).unwrap();
        }
        f.set_closing_attribute("run_summary", r#"{"images_written":3}"#);
        assert_eq!(f.close().unwrap(), 3);
        let (shape, pixels) = read_u16(&path);
        assert_eq!(shape, [3, 6, 8]);
        assert_eq!(pixels[6 * 8 * 2 + 7], pixel(2, 0, 7));
        let file = File::open(&path).unwrap();
        let attr = |n: &str| -> String {
            file.attr(n)
                .unwrap()
                .read_scalar::<hdf5::types::VarLenUnicode>()
                .unwrap()
                .to_string()
        };
        assert_eq!(attr("before"), "yes");
        assert_eq!(attr("run_summary"), r#"{"images_written":3}"#);
        assert!(attr("end_time").ends_with('Z'));
        assert!(!file.attr_names().unwrap().contains(&"after".to_string()));
    }

    /// A SWMR file given up after a failed write opens in any reader (flags cleared) and holds
    /// its last checkpoint.
    #[test]
    fn an_abandoned_swmr_file_opens_normally_at_its_last_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abandoned.h5");
        let mut f = ImageFile::create(&path, &spec(Dtype::Uint16, 10)).unwrap();
        f.start_swmr().unwrap();
        for i in 0..2 {
            f.write_image(i, &u16_image(i, 6, 8), record(i)).unwrap();
        }
        assert_eq!(f.checkpoint().unwrap(), 2);
        f.write_image(2, &u16_image(2, 6, 8), record(2)).unwrap();
        assert_eq!(f.abandon(), 2);
        let (shape, pixels) = read_u16(&path);
        assert_eq!(shape, [2, 6, 8]);
        assert_eq!(pixels[6 * 8 + 1], pixel(1, 0, 1));
        // Clearing again is harmless.
        clear_status_flags(&path).unwrap();
    }

    #[test]
    fn drop_without_close_still_finishes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.h5");
        {
            let mut f = ImageFile::create(&path, &spec(Dtype::Uint16, 5)).unwrap();
            f.write_image(0, &u16_image(0, 6, 8), record(0)).unwrap();
        }
        let (shape, values) = read_u16(&path);
        assert_eq!(shape, vec![1, 6, 8]);
        assert_eq!(values[47], pixel(0, 5, 7));
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.h5");
        for bad in [
            ImageFileSpec {
                detector_name: "a/b".into(),
                ..spec(Dtype::Uint16, 1)
            },
            ImageFileSpec {
                detector_name: String::new(),
                ..spec(Dtype::Uint16, 1)
            },
            ImageFileSpec {
                height: 0,
                ..spec(Dtype::Uint16, 1)
            },
            ImageFileSpec {
                height: 65536,
                width: 65536,
                ..spec(Dtype::Uint16, 1)
            },
        ] {
            let err = ImageFile::create(&path, &bad).unwrap_err();
            assert!(matches!(err, FileError::InvalidSpec { .. }), "{err:?}");
            assert!(!path.exists());
        }
    }

    #[test]
    fn bitshuffle_lz4_round_trip_every_dtype() {
        let dir = tempfile::tempdir().unwrap();
        if !bitshuffle_filter().is_available() {
            // Without the plugin: a clear error, nothing created.
            let path = dir.path().join("t.h5");
            let compressed = ImageFileSpec {
                compression: Compression::BitshuffleLz4,
                ..spec(Dtype::Uint16, 2)
            };
            let err = ImageFile::create(&path, &compressed).unwrap_err();
            assert!(
                matches!(err, FileError::FilterUnavailable { .. }),
                "{err:?}"
            );
            assert!(err.to_string().contains("bitshuffle"), "{err}");
            assert!(!path.exists());
            eprintln!("SKIPPED compressed round trip: bitshuffle filter plugin not installed");
            return;
        }
        for dtype in [
            Dtype::Uint8,
            Dtype::Uint16,
            Dtype::Uint32,
            Dtype::Uint64,
            Dtype::Float32,
        ] {
            let path = dir.path().join(format!("{dtype:?}.h5"));
            let spec = ImageFileSpec {
                compression: Compression::BitshuffleLz4,
                ..spec(dtype, 5)
            };
            let size = dtype.bytes();
            let image = |i: u64| -> Vec<u8> {
                (0..48 * size)
                    .map(|b| {
                        if b % size == 0 {
                            (i * 3 + b as u64 / 7) as u8
                        } else {
                            0
                        }
                    })
                    .collect()
            };
            let mut f = ImageFile::create(&path, &spec).unwrap();
            f.write_image(0, &image(0), record(0)).unwrap();
            f.write_image(2, &image(2), record(2)).unwrap();
            f.write_image(3, &image(3), record(3)).unwrap();
            f.write_zero_image(3, record(3)).unwrap();
            f.write_zero_image(4, record(4)).unwrap();
            assert_eq!(f.close().unwrap(), 5);

            let file = File::open(&path).unwrap();
            let data = file.dataset("jf-test/data").unwrap();
            assert_eq!(data.shape(), vec![5, 6, 8]);
            // Index 3 was overwritten with a zero chunk; 1 and 4 never had one.
            assert_eq!(allocated_rows(&data), [0, 2, 3], "{dtype:?}");
            let filters = data.filters();
            assert_eq!(filters.len(), 1, "{dtype:?}");
            assert_eq!(filters[0].id(), 32008);
            let mut expected = image(0);
            expected.extend(vec![0; 48 * size]);
            expected.extend(image(2));
            expected.extend(vec![0; 2 * 48 * size]);
            let got: Vec<u8> = match dtype {
                Dtype::Uint8 => data.read_raw::<u8>().unwrap(),
                Dtype::Uint16 => bytemuck::cast_slice(&data.read_raw::<u16>().unwrap()).to_vec(),
                Dtype::Uint32 => bytemuck::cast_slice(&data.read_raw::<u32>().unwrap()).to_vec(),
                Dtype::Uint64 => bytemuck::cast_slice(&data.read_raw::<u64>().unwrap()).to_vec(),
                _ => bytemuck::cast_slice(&data.read_raw::<f32>().unwrap()).to_vec(),
            };
            assert_eq!(got, expected, "{dtype:?}");
        }
    }

    /// `cargo test -p std-h5-writer --release -- --ignored --nocapture bench_direct_chunk_throughput`
    /// Per-image bookkeeping cost (extent growth, records, checkpoints) with tiny images, so
    /// the pixel bytes do not hide it: `cargo test -p std-h5-writer --lib
    /// bench_per_image_overhead -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark: run with --nocapture"]
    fn bench_per_image_overhead() {
        const N: u64 = 50_000;
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let path = dir.path().join("overhead.h5");
        let spec = ImageFileSpec {
            n_images: N,
            height: 4,
            width: 4,
            ..spec(Dtype::Uint16, N)
        };
        let image = vec![7u8; 32];
        let start = std::time::Instant::now();
        let mut f = ImageFile::create(&path, &spec).unwrap();
        for i in 0..N {
            f.write_image(i, &image, record(i)).unwrap();
            if i % 1000 == 999 {
                f.checkpoint().unwrap();
            }
        }
        f.close().unwrap();
        let us = start.elapsed().as_secs_f64() * 1e6 / N as f64;
        println!("bench_per_image_overhead: {N} images of 4x4 u16, checkpoint every 1000: {us:.2} us per image");
    }

    #[test]
    #[ignore = "benchmark: writes 1 GB to /tmp"]
    fn bench_direct_chunk_throughput() {
        const N: u64 = 500;
        let (h, w) = (1024u32, 1024u32);
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let path = dir.path().join("bench.h5");
        let spec = ImageFileSpec {
            detector_name: "bench".into(),
            n_images: N,
            height: h,
            width: w,
            dtype: Dtype::Uint16,
            compression: Compression::None,
            n_modules: 1,
        };
        // A few distinct source images, as if from different shared-memory slots.
        let images: Vec<Vec<u8>> = (0..4)
            .map(|k| {
                (0..(h * w) as usize)
                    .flat_map(|p| ((p as u16).wrapping_mul(k + 1)).to_le_bytes())
                    .collect()
            })
            .collect();
        let start = std::time::Instant::now();
        let mut f = ImageFile::create(&path, &spec).unwrap();
        for i in 0..N {
            let rec = ImageRecord {
                image_id: i,
                status: 1,
                missing_packets: 0,
                ..ImageRecord::default()
            };
            f.write_image(i, &images[i as usize % images.len()], rec)
                .unwrap();
        }
        let written = f.close().unwrap();
        let secs = start.elapsed().as_secs_f64();
        let mb = (written * spec.image_bytes()) as f64 / 1e6;
        println!(
            "bench_direct_chunk_throughput: {written} images of {h}x{w} u16 ({mb:.0} MB) \
             in {secs:.3} s = {:.0} MB/s ({:.0} images/s), page cache, no fsync",
            mb / secs,
            written as f64 / secs
        );
    }
}
