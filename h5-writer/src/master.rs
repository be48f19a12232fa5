//! The master file of a run written by N writers (docs/file-format.md, "N writers"): one HDF5
//! file at the requested `output_file` that reads like a data file of the whole run, while every
//! pixel and ledger row stays in the writers' own data files.
//!
//! Run position `p` (image id `first_image_id + p`) was written by writer `p % N` at row `p / N`
//! of its data file. The master holds the same objects as a data file ([`crate::file`]): the NXmx
//! groups, `/<detector>/data` (= `/entry/data/data`, a hard link) and every per-image ledger
//! dataset, each an HDF5 **virtual dataset** of exactly [`MasterRequest::images`] rows (the
//! prefix every writer really wrote) with one strided mapping per writer: virtual rows
//! `k, k + N, k + 2N, ...` are rows `0..count` of writer `k`'s dataset of the same path. Sources
//! are named by file name only, so HDF5 finds them in the master's own folder wherever that
//! folder is moved (libhdf5 resolves a relative source name against the virtual dataset's file).
//!
//! Never: copy pixels or ledger rows (the master only maps them), map a row a writer did not
//! write (a virtual dataset would read fill values there, indistinguishable from data), map a
//! data file without checking its geometry and row count, or overwrite an existing file.

use std::path::{Path, PathBuf};

use hdf5::types::{FloatSize, IntSize, TypeDescriptor, VarLenUnicode};
use hdf5::{File, Group, Hyperslab, Selection, SliceOrIndex};
use std_daq_common::nxmx::Nxmx;
use std_daq_common::writer_command::{partial_path, MasterRequest, MasterSummary};

use crate::file::{
    now_iso8601, set_str_attr, type_descriptor, validate_spec, FileError, ImageFileSpec, LEDGER,
};

/// The columns of a per-image dataset beyond its row axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Columns {
    /// `[n]`.
    None,
    /// `[n, c]`.
    Fixed(usize),
    /// `[n, n_modules]`.
    Modules,
}

/// Every per-image dataset of a data file's detector group besides `data`, with its in-file type,
/// as [`crate::file`] creates them (a test checks this against a real data file).
#[rustfmt::skip]
const PER_IMAGE: &[(&str, TypeDescriptor, Columns)] = &[
    ("image_id", TypeDescriptor::Unsigned(IntSize::U8), Columns::None),
    ("status", TypeDescriptor::Unsigned(IntSize::U2), Columns::None),
    ("missing_packets", TypeDescriptor::Unsigned(IntSize::U4), Columns::None),
    ("missing_modules", TypeDescriptor::Unsigned(IntSize::U8), Columns::Fixed(4)),
    ("n_missing_modules", TypeDescriptor::Unsigned(IntSize::U2), Columns::None),
    ("module_missing_packets", TypeDescriptor::Unsigned(IntSize::U2), Columns::Modules),
    ("frame_index", TypeDescriptor::Unsigned(IntSize::U8), Columns::None),
    ("timestamp", TypeDescriptor::Unsigned(IntSize::U8), Columns::None),
    ("bunch_id", TypeDescriptor::Float(FloatSize::U8), Columns::None),
    ("lost_in_buffer", TypeDescriptor::Unsigned(IntSize::U1), Columns::None),
    ("checksum", TypeDescriptor::Unsigned(IntSize::U8), Columns::None),
    ("checksum_kind", TypeDescriptor::Unsigned(IntSize::U2), Columns::None),
    ("calibration_id", TypeDescriptor::Unsigned(IntSize::U8), Columns::None),
];

/// Why a master file could not be written. Every message names the master file.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("{master}: invalid master request: {reason}")]
    InvalidRequest { master: PathBuf, reason: String },
    #[error("{master}: cannot map writer {writer}'s data file {data_file}: {reason}")]
    UnusableDataFile {
        master: PathBuf,
        writer: u32,
        data_file: PathBuf,
        reason: String,
    },
    /// Creating, writing or publishing the master itself (exists already, HDF5, I/O).
    #[error(transparent)]
    File(#[from] FileError),
}

/// One writer's share of the master: its data file and how many of its rows are mapped.
#[derive(Debug)]
struct Share {
    writer: u32,
    /// Absolute, as the request gives it (to check it).
    path: PathBuf,
    /// What the master stores: the file name, resolved against the master's folder.
    name: String,
    /// Rows `0..count` are mapped (positions `writer, writer + N, ...` below `images`).
    count: u64,
    /// Rows each dataset of the data file has (`>= count`), by name; filled when checked.
    rows_in_file: Vec<(&'static str, usize)>,
    /// The data file's root `start_time` and `end_time`, if it has them; read when checked.
    times: (Option<String>, Option<String>),
    /// The data file's `run_counters` (every service's counters for the run), if it has them.
    run_counters: Option<String>,
}

/// Rows of writer `k` of `n` holding positions `0..images`.
fn rows_for(images: u64, n: u64, k: u64) -> u64 {
    images.saturating_sub(k).div_ceil(n)
}

/// Writes the master file of `req` at `req.output_file` (through `<output_file>.part`, renamed
/// when complete; refuses if either exists). `spec` is the writers' file spec (detector name,
/// geometry, dtype, modules; `n_images` and `compression` do not matter), `nxmx` the run's
/// NXmx description, `config_json` the detector config stored as `detector_config`.
pub fn write_master(
    req: &MasterRequest,
    spec: &ImageFileSpec,
    nxmx: Option<&Nxmx>,
    config_json: &str,
) -> Result<MasterSummary, MasterError> {
    let output = PathBuf::from(&req.output_file);
    validate_spec(&output, spec)?;
    let mut shares = shares(req, &output)?;
    // Only now: `images()` walks every writer, and the request is checked to have few enough.
    let images = req.images();
    let n = u64::from(req.writers);
    for share in &mut shares {
        share.count = rows_for(images, n, u64::from(share.writer));
    }
    for share in shares.iter_mut().filter(|s| s.count > 0) {
        check_data_file(&output, spec, share)?;
    }
    let (start_time, end_time) = run_times(&shares);

    if output.symlink_metadata().is_ok() {
        return Err(FileError::AlreadyExists(output).into());
    }
    let part = partial_path(&output);
    // The latest format, as the data files: libhdf5 then stores each strided mapping as one
    // regular hyperslab (start, stride, count); the 1.8 encoding lists every row (a 14 MB master
    // for 100 000 images) and makes every read through it crawl.
    let file = match File::with_options()
        .with_fapl(|fapl| fapl.libver_latest())
        .create_excl(&part)
    {
        Ok(file) => file,
        Err(_) if part.symlink_metadata().is_ok() => {
            return Err(FileError::AlreadyExists(part).into())
        }
        Err(source) => return Err(hdf5_error(&part, "creating the master file")(source).into()),
    };
    let layout = Master {
        req,
        spec,
        nxmx,
        config_json,
        images,
        shares: &shares,
        start_time: &start_time,
        end_time: &end_time,
    };
    let written = write_layout(&file, &part, &layout).and_then(|()| {
        file.close()
            .map_err(hdf5_error(&part, "closing the master file"))
    });
    if let Err(e) = written {
        // Ours (created exclusively just now) and useless half-made.
        if let Err(rm) = std::fs::remove_file(&part) {
            tracing::warn!(path = %part.display(), "removing a half-written master: {rm}");
        }
        return Err(e.into());
    }
    publish(&part, &output)?;

    let capped_rows: u64 = req
        .sources
        .iter()
        .map(|s| match req.n_images {
            Some(n) => s
                .rows
                .min(rows_for(n, u64::from(req.writers), u64::from(s.writer))),
            None => s.rows,
        })
        .sum();
    Ok(MasterSummary {
        output_file: req.output_file.clone(),
        images,
        images_left_out: capped_rows.saturating_sub(images),
    })
}

/// Checks the request's writers and sources; one share per writer, in writer order (`count`
/// still 0).
fn shares(req: &MasterRequest, output: &Path) -> Result<Vec<Share>, MasterError> {
    let invalid = |reason: String| MasterError::InvalidRequest {
        master: output.to_owned(),
        reason,
    };
    if req.writers == 0 {
        return Err(invalid("writers is 0".into()));
    }
    if req.sources.len() != req.writers as usize {
        return Err(invalid(format!(
            "{} sources for {} writers (one per writer)",
            req.sources.len(),
            req.writers
        )));
    }
    if !output.is_absolute() || output.file_name().is_none() {
        return Err(invalid("output_file must be an absolute file path".into()));
    }
    let folder = output.parent().unwrap_or(Path::new("/"));
    if let Some(s) = req.sources.iter().find(|s| s.writer >= req.writers) {
        return Err(invalid(format!(
            "a source names writer {} of {}",
            s.writer, req.writers
        )));
    }
    (0..req.writers)
        .map(|writer| {
            let mut of_writer = req.sources.iter().filter(|s| s.writer == writer);
            let source = of_writer
                .next()
                .ok_or_else(|| invalid(format!("no source for writer {writer}")))?;
            if of_writer.next().is_some() {
                return Err(invalid(format!("more than one source for writer {writer}")));
            }
            let path = PathBuf::from(&source.file);
            // The master names its sources by file name: they must sit beside it.
            let name = match (path.parent(), path.file_name()) {
                (Some(parent), Some(name)) if parent == folder => {
                    name.to_string_lossy().into_owned()
                }
                _ => {
                    return Err(invalid(format!(
                        "writer {writer}'s file {} is not in the master's folder {}",
                        path.display(),
                        folder.display()
                    )))
                }
            };
            if path == output {
                return Err(invalid(format!(
                    "writer {writer}'s file is the master itself"
                )));
            }
            Ok(Share {
                writer,
                path,
                name,
                count: 0,
                rows_in_file: Vec::new(),
                times: (None, None),
                run_counters: None,
            })
        })
        .collect()
}

/// Opens a data file and checks that what the master maps is there: `data` of the master's
/// geometry and dtype and every per-image dataset with its type, each with at least `count` rows.
fn check_data_file(
    output: &Path,
    spec: &ImageFileSpec,
    share: &mut Share,
) -> Result<(), MasterError> {
    let unusable = |reason: String| MasterError::UnusableDataFile {
        master: output.to_owned(),
        writer: share.writer,
        data_file: share.path.clone(),
        reason,
    };
    let file = File::open(&share.path).map_err(|e| unusable(format!("cannot open it: {e}")))?;
    let group = file
        .group(&spec.detector_name)
        .map_err(|e| unusable(format!("no group /{}: {e}", spec.detector_name)))?;
    let count = share.count as usize;
    let image_type = type_descriptor(output, spec.dtype).map_err(|e| unusable(format!("{e}")))?;
    let mut expected = vec![(
        "data",
        image_type,
        vec![spec.height as usize, spec.width as usize],
    )];
    for &(name, ref dtype, columns) in PER_IMAGE {
        expected.push((name, dtype.clone(), row_shape(columns, spec)));
    }
    for (name, dtype, row) in expected {
        let ds = group
            .dataset(name)
            .map_err(|e| unusable(format!("no dataset {name}: {e}")))?;
        let found = ds
            .dtype()
            .and_then(|t| t.to_descriptor())
            .map_err(|e| unusable(format!("{name}: unreadable type: {e}")))?;
        if found != dtype {
            return Err(unusable(format!(
                "{name} has type {found}, the master maps {dtype}"
            )));
        }
        let shape = ds.shape();
        if shape.len() != row.len() + 1 || shape[1..] != row[..] {
            return Err(unusable(format!(
                "{name} has shape {shape:?}, the master maps [rows, {row:?}]"
            )));
        }
        if shape[0] < count {
            return Err(unusable(format!(
                "{name} has {} rows, the master maps {count}",
                shape[0]
            )));
        }
        share.rows_in_file.push((name, shape[0]));
    }
    let time = |name: &str| -> Option<String> {
        let value = file.attr(name).ok()?.read_scalar::<VarLenUnicode>().ok()?;
        Some(value.as_str().to_owned())
    };
    share.times = (time("start_time"), time("end_time"));
    share.run_counters = time("run_counters");
    Ok(())
}

/// The run's start (earliest `start_time` of the data files) and end (latest `end_time`), both
/// ISO 8601 UTC so that they compare as text; now where no file says.
fn run_times(shares: &[Share]) -> (String, String) {
    let start = shares.iter().filter_map(|s| s.times.0.clone()).min();
    let end = shares.iter().filter_map(|s| s.times.1.clone()).max();
    let now = now_iso8601();
    (start.unwrap_or_else(|| now.clone()), end.unwrap_or(now))
}

fn row_shape(columns: Columns, spec: &ImageFileSpec) -> Vec<usize> {
    match columns {
        Columns::None => vec![],
        Columns::Fixed(c) => vec![c],
        Columns::Modules => vec![usize::from(spec.n_modules)],
    }
}

fn hdf5_error(path: &Path, op: &'static str) -> impl FnOnce(hdf5::Error) -> FileError {
    let path = path.to_owned();
    move |source| FileError::Hdf5 { path, op, source }
}

/// What goes into the master.
struct Master<'a> {
    req: &'a MasterRequest,
    spec: &'a ImageFileSpec,
    nxmx: Option<&'a Nxmx>,
    config_json: &'a str,
    images: u64,
    shares: &'a [Share],
    start_time: &'a str,
    end_time: &'a str,
}

/// Root attributes, the detector group with its virtual datasets, the NXmx groups.
fn write_layout(file: &File, path: &Path, l: &Master<'_>) -> Result<(), FileError> {
    let spec = l.spec;
    let req = l.req;
    let group = file
        .create_group(&spec.detector_name)
        .map_err(hdf5_error(path, "creating the detector group"))?;
    let image_type = type_descriptor(path, spec.dtype)?;
    let image_shape = [spec.height as usize, spec.width as usize];
    virtual_dataset(&group, "data", &image_type, &image_shape, l)
        .map_err(hdf5_error(path, "creating the virtual data dataset"))?;
    for &(name, ref dtype, columns) in PER_IMAGE {
        let ds = virtual_dataset(&group, name, dtype, &row_shape(columns, spec), l)
            .map_err(hdf5_error(path, "creating a virtual ledger dataset"))?;
        if let Some((_, description, units)) = LEDGER.iter().find(|(n, ..)| *n == name) {
            (|| {
                set_str_attr(&ds, "description", description)?;
                if !units.is_empty() {
                    set_str_attr(&ds, "units", units)?;
                }
                Ok(())
            })()
            .map_err(hdf5_error(path, "writing a ledger dataset's attributes"))?;
        }
    }

    let attrs = || -> hdf5::Result<()> {
        // As in a data file (file.rs create_layout, the writer's start and close).
        set_str_attr(file, "NX_class", "NXroot")?;
        let default = if l.nxmx.is_some() {
            "entry"
        } else {
            &spec.detector_name
        };
        set_str_attr(file, "default", default)?;
        set_str_attr(&group, "NX_class", "NXdata")?;
        set_str_attr(&group, "signal", "data")?;
        set_str_attr(file, "start_time", l.start_time)?;
        set_str_attr(file, "end_time", l.end_time)?;
        set_str_attr(
            file,
            "software",
            concat!("std-daq ", env!("CARGO_PKG_VERSION")),
        )?;
        set_str_attr(file, "detector_config", l.config_json)?;
        set_str_attr(file, "output_file", &req.output_file)?;
        set_str_attr(file, "request_id", req.request_id.as_deref().unwrap_or(""))?;
        if let Some(m) = &req.metadata {
            set_str_attr(
                file,
                "metadata",
                &serde_json::Value::Object(m.clone()).to_string(),
            )?;
        }
        if let Some(t) = &req.traceparent {
            set_str_attr(file, "traceparent", t)?;
        }
        if let Some(summary) = &req.run_summary {
            set_str_attr(file, "run_summary", &summary.to_string())?;
        }
        // Every writer read the same services at its own end; the one that ended last wrote the
        // run's last image, so its end reading counts the whole run.
        let end_of = |text: &str| {
            serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v["end_time"].as_f64())
                .unwrap_or(f64::MIN)
        };
        if let Some(counters) = l
            .shares
            .iter()
            .filter_map(|s| s.run_counters.as_deref())
            .max_by(|a, b| end_of(a).total_cmp(&end_of(b)))
        {
            set_str_attr(file, "run_counters", counters)?;
        }
        // What the master is made of.
        file.new_attr::<u32>()
            .create("writers")?
            .write_scalar(&req.writers)?;
        file.new_attr::<u64>()
            .create("first_image_id")?
            .write_scalar(&req.first_image_id)?;
        let names = l
            .shares
            .iter()
            .map(|s| {
                s.name
                    .parse::<VarLenUnicode>()
                    .map_err(|e| hdf5::Error::from(format!("data file name {:?}: {e}", s.name)))
            })
            .collect::<hdf5::Result<Vec<_>>>()?;
        file.new_attr_builder()
            .with_data(&names)
            .create("data_files")?;
        Ok(())
    };
    attrs().map_err(hdf5_error(path, "writing the master's attributes"))?;

    if let Some(n) = l.nxmx {
        let data_path = format!("/{}/data", spec.detector_name);
        crate::nxmx::write_entry(file, n, &data_path, spec.width, spec.height, l.start_time)
            .and_then(|()| crate::nxmx::write_end_time(file, l.end_time))
            .map_err(hdf5_error(path, "writing the NXmx groups"))?;
    }
    file.flush()
        .map_err(hdf5_error(path, "flushing the master file"))
}

/// A virtual dataset `[images, row...]` at `group/name`: rows `k, k + N, ...` are rows
/// `0..count_k` of `/<detector>/<name>` in writer `k`'s file.
fn virtual_dataset(
    group: &Group,
    name: &str,
    dtype: &TypeDescriptor,
    row: &[usize],
    l: &Master<'_>,
) -> hdf5::Result<hdf5::Dataset> {
    let n = l.req.writers as usize;
    let mut shape = vec![l.images as usize];
    shape.extend_from_slice(row);
    let whole_row = row.iter().map(|&d| SliceOrIndex::SliceCount {
        start: 0,
        step: 1,
        count: d,
        block: 1,
    });
    // libhdf5 reads `%` in source names as a printf-style pattern (`%b`: a block number); `%%`
    // is a literal `%`.
    let source_path = format!("/{}/{name}", l.spec.detector_name).replace('%', "%%");
    // Without a mapping (an empty master) this is an ordinary empty dataset.
    let mut builder = group.new_dataset_builder().empty_as(dtype);
    for share in l.shares.iter().filter(|s| s.count > 0) {
        let count = share.count as usize;
        // The data file's real extent (checked to hold `count` rows): rows 0..count of it are
        // then a hyperslab, or "all" when they are all of it. (Given an extent of exactly
        // `count` rows, hdf5-metno would store "all" even for a file with more rows, which
        // libhdf5 widens to the file's extent when reading: every read would fail.)
        let rows = share
            .rows_in_file
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(count, |&(_, rows)| rows);
        let mut source_shape = vec![rows];
        source_shape.extend_from_slice(row);
        let mut virtual_rows = vec![SliceOrIndex::SliceCount {
            start: share.writer as usize,
            step: n,
            count,
            block: 1,
        }];
        virtual_rows.extend(whole_row.clone());
        let mut source_rows = vec![SliceOrIndex::SliceCount {
            start: 0,
            step: 1,
            count,
            block: 1,
        }];
        source_rows.extend(whole_row.clone());
        builder = builder.virtual_map(
            share.name.replace('%', "%%"),
            &source_path,
            source_shape,
            Selection::Hyperslab(Hyperslab::from(source_rows)),
            shape.clone(),
            Selection::Hyperslab(Hyperslab::from(virtual_rows)),
        );
    }
    builder.shape(shape).create(name)
}

/// Moves the finished `.part` to `output` without ever replacing a file there: a hard link
/// (fails if `output` exists), then the `.part` goes. Where hard links are not supported, a
/// rename after checking that `output` is free.
fn publish(part: &Path, output: &Path) -> Result<(), FileError> {
    let io = |source| FileError::Io {
        path: output.to_owned(),
        source,
    };
    match std::fs::hard_link(part, output) {
        Ok(()) => {
            if let Err(e) = std::fs::remove_file(part) {
                tracing::warn!(path = %part.display(), "removing the master's .part: {e}");
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(part);
            Err(FileError::AlreadyExists(output.to_owned()))
        }
        Err(_) => {
            if output.symlink_metadata().is_ok() {
                let _ = std::fs::remove_file(part);
                return Err(FileError::AlreadyExists(output.to_owned()));
            }
            std::fs::rename(part, output).map_err(io)
        }
    }
}
