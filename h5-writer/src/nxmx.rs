//! The NXmx groups of a file (docs/nxmx.md): what DIALS/dxtbx, XDS (Durin) and the PyPI package
//! `nxmx` read. Written once when the file is created, beside std_daq's `/<detector>` group, whose
//! `data` is also `/entry/data/data` (a hard link: one dataset, two paths), plus `end_time` at
//! close.
//!
//! ```text
//! /entry                                   NXentry: definition "NXmx", start_time, end_time
//! /entry/data/data                         -> /<detector>/data (NXdata, signal "data")
//! /entry/sample                            NXsample: name, depends_on "."
//! /entry/instrument                        NXinstrument: name
//! /entry/instrument/beam                   NXbeam: incident_wavelength (angstrom)
//! /entry/instrument/detector               NXdetector: description, distance, beam_center_x/y,
//!                                          sensor_material, sensor_thickness, saturation_value,
//!                                          underload_value (photon counts),
//!                                          bit_depth_readout, pixel_mask (gaps, chip gaps,
//!                                          the calibration's dead pixels), depends_on
//! /entry/instrument/detector/transformations/det_z     translation along z by the distance
//! /entry/instrument/detector/module_<m>    NXdetector_module: data_origin, data_size,
//!                                          module_offset -> det_z, fast/slow_pixel_direction
//! ```
//!
//! Never: write a value the config did not give or docs/nxmx.md does not name as a default.

use hdf5::types::VarLenUnicode;
use hdf5::{File, Group, Location};
use std_daq_common::nxmx::Nxmx;

const DETECTOR: &str = "/entry/instrument/detector";

fn text(s: &str) -> hdf5::Result<VarLenUnicode> {
    s.parse()
        .map_err(|e| hdf5::Error::from(format!("text {s:?}: {e}")))
}

fn attr(location: &Location, name: &str, value: &str) -> hdf5::Result<()> {
    location
        .new_attr::<VarLenUnicode>()
        .create(name)?
        .write_scalar(&text(value)?)
}

fn vector_attr(location: &Location, name: &str, v: [f64; 3]) -> hdf5::Result<()> {
    location.new_attr_builder().with_data(&v).create(name)?;
    Ok(())
}

fn group(parent: &Group, name: &str, class: &str) -> hdf5::Result<Group> {
    let g = parent.create_group(name)?;
    attr(&g, "NX_class", class)?;
    Ok(g)
}

fn string(parent: &Group, name: &str, value: &str) -> hdf5::Result<()> {
    parent
        .new_dataset::<VarLenUnicode>()
        .create(name)?
        .write_scalar(&text(value)?)
}

fn number(parent: &Group, name: &str, value: f64, units: Option<&str>) -> hdf5::Result<()> {
    let d = parent.new_dataset::<f64>().create(name)?;
    d.write_scalar(&value)?;
    if let Some(u) = units {
        attr(&d, "units", u)?;
    }
    Ok(())
}

/// A translation axis: a length dataset along `vector` after `depends_on`.
fn translation(
    parent: &Group,
    name: &str,
    length_m: f64,
    vector: [f64; 3],
    depends_on: &str,
) -> hdf5::Result<()> {
    let d = parent
        .new_dataset_builder()
        .with_data(&[length_m])
        .create(name)?;
    attr(&d, "units", "m")?;
    attr(&d, "transformation_type", "translation")?;
    vector_attr(&d, "vector", vector)?;
    vector_attr(&d, "offset", [0.0; 3])?;
    attr(&d, "offset_units", "m")?;
    attr(&d, "depends_on", depends_on)?;
    Ok(())
}

/// Writes `/entry` for a file whose images are at `data_path` (`/<detector>/data`), `width` x
/// `height` pixels.
pub fn write_entry(
    file: &File,
    n: &Nxmx,
    data_path: &str,
    width: u32,
    height: u32,
    start_time: &str,
) -> hdf5::Result<()> {
    let root = file.as_group()?;
    let entry = group(&root, "entry", "NXentry")?;
    attr(&entry, "default", "data")?;
    string(&entry, "definition", "NXmx")?;
    string(&entry, "start_time", start_time)?;

    let data = group(&entry, "data", "NXdata")?;
    attr(&data, "signal", "data")?;
    data.link_hard(data_path, "data")?;

    let sample = group(&entry, "sample", "NXsample")?;
    string(&sample, "name", &n.sample_name)?;
    string(&sample, "depends_on", ".")?;

    let instrument = group(&entry, "instrument", "NXinstrument")?;
    string(&instrument, "name", "std-daq")?;
    let beam = group(&instrument, "beam", "NXbeam")?;
    number(
        &beam,
        "incident_wavelength",
        n.incident_wavelength_angstrom,
        Some("angstrom"),
    )?;

    let det = group(&instrument, "detector", "NXdetector")?;
    string(&det, "description", &n.description)?;
    number(&det, "distance", n.detector_distance_m, Some("m"))?;
    number(&det, "beam_center_x", n.beam_center_x_px, Some("pixel"))?;
    number(&det, "beam_center_y", n.beam_center_y_px, Some("pixel"))?;
    number(&det, "x_pixel_size", n.pixel_size_m, Some("m"))?;
    number(&det, "y_pixel_size", n.pixel_size_m, Some("m"))?;
    string(&det, "sensor_material", &n.sensor_material)?;
    number(&det, "sensor_thickness", n.sensor_thickness_m, Some("m"))?;
    det.new_dataset::<i32>()
        .create("bit_depth_readout")?
        .write_scalar(&i32::from(n.bit_depth_readout))?;
    for (name, value) in [
        ("saturation_value", n.saturation_value),
        ("underload_value", n.underload_value),
    ] {
        if let Some(v) = value {
            det.new_dataset::<i64>().create(name)?.write_scalar(&v)?;
        }
    }
    let values = match &n.pixel_mask {
        Some(m) => m.values.to_vec(),
        None => n.gap_mask(width, height),
    };
    let mask = ndarray::Array2::from_shape_vec((height as usize, width as usize), values)
        .map_err(|e| hdf5::Error::from(format!("pixel mask: {e}")))?;
    let mask = det
        .new_dataset_builder()
        .with_data(&mask)
        .chunk((height as usize, width as usize))
        .deflate(4)
        .create("pixel_mask")?;
    if let Some((file, id)) = n.pixel_mask.as_ref().and_then(|m| m.calibration.as_ref()) {
        attr(&mask, "calibration_file", file)?;
        mask.new_attr::<u64>()
            .create("calibration_id")?
            .write_scalar(id)?;
    }
    det.new_dataset::<bool>()
        .create("pixel_mask_applied")?
        .write_scalar(&false)?;
    let det_z = format!("{DETECTOR}/transformations/det_z");
    string(&det, "depends_on", &det_z)?;
    let transformations = group(&det, "transformations", "NXtransformations")?;
    translation(
        &transformations,
        "det_z",
        n.detector_distance_m,
        [0.0, 0.0, 1.0],
        ".",
    )?;

    for (m, g) in n.modules.iter().enumerate() {
        let module = group(&det, &format!("module_{m}"), "NXdetector_module")?;
        let origin = g.data_origin.map(|v| v as i32);
        let size = g.data_size.map(|v| v as i32);
        module
            .new_dataset_builder()
            .with_data(&origin)
            .create("data_origin")?;
        module
            .new_dataset_builder()
            .with_data(&size)
            .create("data_size")?;
        let [x, y, z] = g.offset_m;
        let length = (x * x + y * y + z * z).sqrt();
        let vector = if length > 0.0 {
            [x / length, y / length, z / length]
        } else {
            [1.0, 0.0, 0.0]
        };
        translation(&module, "module_offset", length, vector, &det_z)?;
        let offset_path = format!("{DETECTOR}/module_{m}/module_offset");
        translation(
            &module,
            "fast_pixel_direction",
            n.pixel_size_m,
            [-1.0, 0.0, 0.0],
            &offset_path,
        )?;
        translation(
            &module,
            "slow_pixel_direction",
            n.pixel_size_m,
            [0.0, -1.0, 0.0],
            &offset_path,
        )?;
    }
    Ok(())
}

/// `/entry/end_time`, at close.
pub fn write_end_time(file: &File, end_time: &str) -> hdf5::Result<()> {
    let entry = file.group("entry")?;
    if entry.link_exists("end_time") {
        return Ok(());
    }
    string(&entry, "end_time", end_time)
}
