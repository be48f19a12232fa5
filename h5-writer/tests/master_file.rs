//! The master file of N writers read back through libhdf5 (virtual datasets): every run position
//! in order with its pixels and ledger row, exactly the prefix every writer wrote, raw and
//! bitshuffle-compressed sources, and the refusals.
#![allow(clippy::unwrap_used)]

mod master_common;

use std::path::Path;

use h5_writer::file::{Compression, FileError, ImageFileSpec, LEDGER};
use h5_writer::master::{write_master, MasterError};
use hdf5::types::VarLenUnicode;
use hdf5::File;
use master_common::*;
use std_daq_common::writer_command::MasterRequest;

const CONFIG_JSON: &str = r#"{"detector_name":"jf-test"}"#;

fn str_attr(location: &hdf5::Location, name: &str) -> String {
    location
        .attr(name)
        .unwrap()
        .read_scalar::<VarLenUnicode>()
        .unwrap()
        .as_str()
        .to_owned()
}

fn column<T: hdf5::H5Type>(f: &File, name: &str) -> Vec<T> {
    f.dataset(&format!("{DETECTOR}/{name}"))
        .unwrap()
        .read_raw::<T>()
        .unwrap()
}

/// Checks that `master` holds run positions `0..images` in order, each exactly as written
/// (`missing`: positions written as never-came rows).
fn assert_positions(master: &Path, images: u64, missing: &[u64]) {
    let f = File::open(master).unwrap();
    let data = f.dataset(&format!("{DETECTOR}/data")).unwrap();
    assert_eq!(data.shape(), vec![images as usize, HEIGHT, WIDTH]);
    if images > 0 {
        assert_eq!(data.layout(), hdf5::dataset::Layout::Virtual);
    }
    let pixels = data.read_raw::<u16>().unwrap();
    let image_ids = column::<u64>(&f, "image_id");
    let status = column::<u16>(&f, "status");
    let missing_packets = column::<u32>(&f, "missing_packets");
    let missing_modules = column::<u64>(&f, "missing_modules");
    let n_missing = column::<u16>(&f, "n_missing_modules");
    let per_module = column::<u16>(&f, "module_missing_packets");
    let frame_index = column::<u64>(&f, "frame_index");
    let timestamp = column::<u64>(&f, "timestamp");
    let bunch_id = column::<f64>(&f, "bunch_id");
    let lost = column::<u8>(&f, "lost_in_buffer");
    let checksum = column::<u64>(&f, "checksum");
    let checksum_kind = column::<u16>(&f, "checksum_kind");
    let calibration_id = column::<u64>(&f, "calibration_id");
    assert_eq!(image_ids.len(), images as usize);
    let per_image = HEIGHT * WIDTH;
    for p in 0..images {
        let i = p as usize;
        let got = &pixels[i * per_image..(i + 1) * per_image];
        if missing.contains(&p) {
            assert!(got.iter().all(|&v| v == 0), "position {p}: {got:?}");
            assert_eq!(status[i], 0, "position {p}");
            assert_eq!((image_ids[i], checksum_kind[i]), (0, 0), "position {p}");
            continue;
        }
        let want: Vec<u16> = (0..HEIGHT)
            .flat_map(|y| (0..WIDTH).map(move |x| pixel(p, y, x)))
            .collect();
        assert_eq!(got, &want[..], "pixels of position {p}");
        let r = record(p, &image(p, HEIGHT, WIDTH));
        assert_eq!(image_ids[i], FIRST_IMAGE_ID + p);
        assert_eq!(status[i], r.status, "position {p}");
        assert_eq!(missing_packets[i], r.missing_packets);
        assert_eq!(missing_modules[i * 4..i * 4 + 4], r.missing_modules);
        assert_eq!(n_missing[i], p.count_ones() as u16 + 1);
        assert_eq!(per_module[i * 2..i * 2 + 2], r.module_missing_packets[..2]);
        assert_eq!(frame_index[i], r.frame_index);
        assert_eq!(timestamp[i], r.timestamp);
        assert_eq!(bunch_id[i], r.bunch_id);
        assert_eq!(lost[i], 0);
        assert_eq!(checksum[i], r.checksum);
        assert_eq!(checksum_kind[i], 1);
        assert_eq!(calibration_id[i], r.calibration_id);
    }
}

fn make(dir: &Path, compression: Compression, rows: &[u64], missing: &[u64]) -> MasterRequest {
    write_run(dir, "run", &spec(compression), None, rows, missing)
}

#[test]
fn two_writers_uneven_rows_map_every_position_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let req = make(dir.path(), Compression::None, &[5, 4], &[]);
    let summary = write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap();
    assert_eq!((summary.images, summary.images_left_out), (9, 0));
    assert_eq!(summary.output_file, req.output_file);
    let master = Path::new(&req.output_file);
    assert_positions(master, 9, &[]);
    assert!(!dir.path().join("run.h5.part").exists());

    let f = File::open(master).unwrap();
    assert_eq!(str_attr(&f, "request_id"), "req-42");
    assert_eq!(str_attr(&f, "output_file"), req.output_file);
    assert_eq!(str_attr(&f, "detector_config"), CONFIG_JSON);
    assert_eq!(str_attr(&f, "metadata"), r#"{"scan_id":7}"#);
    assert!(str_attr(&f, "traceparent").starts_with("00-0af7"));
    let summary_json: serde_json::Value =
        serde_json::from_str(&str_attr(&f, "run_summary")).unwrap();
    assert_eq!(summary_json, req.run_summary.clone().unwrap());
    assert_eq!(f.attr("writers").unwrap().read_scalar::<u32>().unwrap(), 2);
    assert_eq!(
        f.attr("first_image_id")
            .unwrap()
            .read_scalar::<u64>()
            .unwrap(),
        FIRST_IMAGE_ID
    );
    let names: Vec<String> = f
        .attr("data_files")
        .unwrap()
        .read_raw::<VarLenUnicode>()
        .unwrap()
        .iter()
        .map(|s| s.as_str().to_owned())
        .collect();
    assert_eq!(names, ["run_writer0.h5", "run_writer1.h5"]);
    // (The virtual mappings' source names are checked through h5py in master_h5py.rs:
    // hdf5-metno cannot parse the hyperslabs libhdf5 hands back.)
    for name in ["start_time", "end_time", "software", "NX_class"] {
        assert!(!str_attr(&f, name).is_empty(), "{name}");
    }
    assert_eq!(str_attr(&f, "default"), DETECTOR);
}

#[test]
fn a_writer_that_ended_early_trims_the_master_to_the_common_prefix() {
    let dir = tempfile::tempdir().unwrap();
    // Writer 1 stopped after 3 rows (positions 1, 3, 5): position 7 is missing, so 8 is left out.
    let req = make(dir.path(), Compression::None, &[5, 3], &[]);
    assert_eq!(req.images(), 7);
    let summary = write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap();
    assert_eq!((summary.images, summary.images_left_out), (7, 1));
    assert_positions(Path::new(&req.output_file), 7, &[]);
}

#[test]
fn three_writers_and_a_position_whose_image_never_came() {
    let dir = tempfile::tempdir().unwrap();
    // Rows [3, 3, 2]: positions 0..8; position 4 (writer 1, row 1) never came: status 0, zeros.
    let req = make(dir.path(), Compression::None, &[3, 3, 2], &[4]);
    let summary = write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap();
    assert_eq!((summary.images, summary.images_left_out), (8, 0));
    assert_positions(Path::new(&req.output_file), 8, &[4]);

    // One writer with a single row holds the others back: positions 0..4.
    let dir = tempfile::tempdir().unwrap();
    let req = make(dir.path(), Compression::None, &[3, 1, 3], &[]);
    let summary = write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap();
    assert_eq!((summary.images, summary.images_left_out), (4, 3));
    assert_positions(Path::new(&req.output_file), 4, &[]);
}

#[test]
fn n_images_caps_the_master() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = make(dir.path(), Compression::None, &[5, 4], &[]);
    req.n_images = Some(6);
    let summary = write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap();
    assert_eq!((summary.images, summary.images_left_out), (6, 0));
    assert_positions(Path::new(&req.output_file), 6, &[]);
}

#[test]
fn bitshuffle_compressed_sources_read_through_the_filter() {
    if !hdf5::filters::Filter::user(32008, &[0, 2]).is_available() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "the bitshuffle HDF5 filter is missing (apt-get install bitshuffle)"
        );
        eprintln!("SKIPPED: no bitshuffle HDF5 filter plugin");
        return;
    }
    for rows in [&[5u64, 4][..], &[3, 2, 2]] {
        let dir = tempfile::tempdir().unwrap();
        let req = make(dir.path(), Compression::BitshuffleLz4, rows, &[]);
        let images = req.images();
        let spec = spec(Compression::BitshuffleLz4);
        let summary = write_master(&req, &spec, None, CONFIG_JSON).unwrap();
        assert_eq!(summary.images, images);
        assert_positions(Path::new(&req.output_file), images, &[]);
    }
}

#[test]
fn std_daq_verify_checks_every_image_through_the_master() {
    let dir = tempfile::tempdir().unwrap();
    let req = make(dir.path(), Compression::None, &[5, 4], &[]);
    write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap();
    let report = h5_writer::verify::verify_file(Path::new(&req.output_file)).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.images, report.checked), (9, 9));
}

#[test]
fn a_moved_folder_still_reads() {
    let root = tempfile::tempdir().unwrap();
    let before = root.path().join("before");
    std::fs::create_dir(&before).unwrap();
    let req = make(&before, Compression::None, &[3, 3], &[]);
    write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap();
    let after = root.path().join("after");
    std::fs::rename(&before, &after).unwrap();
    assert_positions(&after.join("run.h5"), 6, &[]);
}

#[test]
fn the_master_has_every_per_image_dataset_of_a_data_file_with_its_type_and_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let req = make(dir.path(), Compression::None, &[2, 2], &[]);
    write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap();
    let data_file = File::open(&req.sources[0].file).unwrap();
    let master = File::open(&req.output_file).unwrap();
    let (dg, mg) = (
        data_file.group(DETECTOR).unwrap(),
        master.group(DETECTOR).unwrap(),
    );
    let mut names = dg.member_names().unwrap();
    names.sort();
    let mut master_names = mg.member_names().unwrap();
    master_names.sort();
    assert_eq!(names, master_names);
    assert_eq!(names.len(), LEDGER.len() + 1, "{names:?}");
    for name in &names {
        let (d, m) = (dg.dataset(name).unwrap(), mg.dataset(name).unwrap());
        assert_eq!(
            d.dtype().unwrap().to_descriptor().unwrap(),
            m.dtype().unwrap().to_descriptor().unwrap(),
            "{name}"
        );
        assert_eq!(d.shape()[1..], m.shape()[1..], "{name}");
        assert_eq!(m.shape()[0], 4, "{name}");
        let mut attrs = d.attr_names().unwrap();
        attrs.sort();
        let mut master_attrs = m.attr_names().unwrap();
        master_attrs.sort();
        assert_eq!(attrs, master_attrs, "{name}");
        for a in &attrs {
            assert_eq!(str_attr(&d, a), str_attr(&m, a), "{name}.{a}");
        }
    }
    for a in ["NX_class", "signal"] {
        assert_eq!(str_attr(&dg, a), str_attr(&mg, a));
    }
}

#[test]
fn with_nxmx_entry_data_is_the_virtual_data() {
    let cfg = std_daq_common::config::DetectorConfig::from_json_str(
        r#"{"detector_name":"jf-test","detector_type":"jungfrau-raw","n_modules":1,
            "bit_depth":16,"image_pixel_height":512,"image_pixel_width":1024,
            "start_udp_port":50000,"module_positions":{"0":[0,0,1023,511]}}"#,
        "test",
    )
    .unwrap();
    let nxmx = cfg.nxmx().unwrap();
    let spec = ImageFileSpec {
        height: 512,
        width: 1024,
        n_modules: 2,
        ..spec(Compression::None)
    };
    let dir = tempfile::tempdir().unwrap();
    let mut req = write_run(dir.path(), "nx", &spec, Some(&nxmx), &[2, 1], &[]);
    req.n_images = Some(3);
    let summary = write_master(&req, &spec, Some(&nxmx), CONFIG_JSON).unwrap();
    assert_eq!(summary.images, 3);
    let f = File::open(&req.output_file).unwrap();
    assert_eq!(str_attr(&f, "default"), "entry");
    let entry_data = f.dataset("entry/data/data").unwrap();
    assert_eq!(entry_data.shape(), vec![3, 512, 1024]);
    let pixels = entry_data.read_raw::<u16>().unwrap();
    for p in 0..3u64 {
        let at = |y: usize, x: usize| pixels[p as usize * 512 * 1024 + y * 1024 + x];
        assert_eq!(at(0, 0), pixel(p, 0, 0));
        assert_eq!(at(511, 1023), pixel(p, 511, 1023));
    }
    // The data file's NXmx groups, and the run's times from the data files.
    let data_file = File::open(&req.sources[0].file).unwrap();
    for path in ["entry/instrument/detector/distance", "entry/sample/name"] {
        assert!(f.link_exists(path), "{path}");
    }
    let entry = f.group("entry").unwrap();
    assert_eq!(
        entry
            .dataset("start_time")
            .unwrap()
            .read_scalar::<VarLenUnicode>()
            .unwrap(),
        data_file
            .dataset("entry/start_time")
            .unwrap()
            .read_scalar::<VarLenUnicode>()
            .unwrap()
    );
    assert!(entry.link_exists("end_time"));
}

#[test]
fn refuses_an_existing_output_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let req = make(dir.path(), Compression::None, &[2, 2], &[]);
    std::fs::write(&req.output_file, b"not yours").unwrap();
    let err = write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap_err();
    assert!(
        matches!(err, MasterError::File(FileError::AlreadyExists(_))),
        "{err:?}"
    );
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(&req.output_file).unwrap(), b"not yours");
    assert!(!dir.path().join("run.h5.part").exists());

    // A second master over the same run is refused too.
    std::fs::remove_file(&req.output_file).unwrap();
    write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap();
    let err = write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap_err();
    assert!(
        matches!(err, MasterError::File(FileError::AlreadyExists(_))),
        "{err:?}"
    );
    assert_positions(Path::new(&req.output_file), 4, &[]);
}

#[test]
fn refuses_a_data_file_with_fewer_rows_than_the_request_says() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = make(dir.path(), Compression::None, &[3, 2], &[]);
    // The request claims 3 rows of writer 1: position 5 would read fill values.
    req.sources[1].rows = 3;
    let err = write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap_err();
    match &err {
        MasterError::UnusableDataFile { writer, reason, .. } => {
            assert_eq!(*writer, 1);
            assert!(reason.contains("2 rows, the master maps 3"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!Path::new(&req.output_file).exists());
    assert!(!dir.path().join("run.h5.part").exists());

    // A data file that is not there.
    req.sources[1].rows = 2;
    std::fs::remove_file(&req.sources[1].file).unwrap();
    let err = write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap_err();
    assert!(
        matches!(err, MasterError::UnusableDataFile { writer: 1, .. }),
        "{err:?}"
    );

    // Another geometry than the writers'.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let req = make(&other, Compression::None, &[1, 1], &[]);
    let wider = ImageFileSpec {
        width: WIDTH as u32 + 1,
        ..spec(Compression::None)
    };
    let err = write_master(&req, &wider, None, CONFIG_JSON).unwrap_err();
    assert!(err.to_string().contains("data has shape"), "{err}");
}

#[test]
fn refuses_requests_it_cannot_map() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(Compression::None);
    let base = make(dir.path(), Compression::None, &[2, 2], &[]);
    let invalid = |req: &MasterRequest, what: &str| {
        let err = write_master(req, &spec, None, CONFIG_JSON).unwrap_err();
        assert!(
            matches!(&err, MasterError::InvalidRequest { reason, .. } if reason.contains(what)),
            "{what}: {err:?}"
        );
    };
    let mut req = base.clone();
    req.sources[1].file = "/elsewhere/run_writer1.h5".into();
    invalid(&req, "not in the master's folder");
    let mut req = base.clone();
    req.sources.pop();
    invalid(&req, "1 sources for 2 writers");
    // A huge writer count is refused before anything walks it.
    let mut req = base.clone();
    req.writers = u32::MAX;
    invalid(&req, "2 sources for 4294967295 writers");
    let mut req = base.clone();
    req.sources[1].writer = 0;
    invalid(&req, "more than one source for writer 0");
    let mut req = base.clone();
    req.sources[1].writer = 2;
    invalid(&req, "names writer 2 of 2");
    let mut req = base.clone();
    req.writers = 0;
    invalid(&req, "writers is 0");
    let mut req = base.clone();
    req.output_file = "run.h5".into();
    invalid(&req, "absolute");
    assert!(!Path::new(&base.output_file).exists());
}

#[test]
fn a_writer_without_rows_gives_an_empty_master() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = make(dir.path(), Compression::None, &[2, 1], &[]);
    // Writer 0 died before its first checkpoint: not even position 0 is there.
    req.sources[0].rows = 0;
    let summary = write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap();
    assert_eq!((summary.images, summary.images_left_out), (0, 1));
    assert_positions(Path::new(&req.output_file), 0, &[]);
}

#[test]
fn percent_signs_in_names_are_literal() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ImageFileSpec {
        detector_name: "jf%b".into(),
        ..spec(Compression::None)
    };
    let req = write_run(dir.path(), "run%b_100%", &spec, None, &[2, 1], &[]);
    assert!(req.sources[1].file.ends_with("run%b_100%_writer1.h5"));
    write_master(&req, &spec, None, CONFIG_JSON).unwrap();
    let f = File::open(&req.output_file).unwrap();
    let data = f.dataset("jf%b/data").unwrap().read_raw::<u16>().unwrap();
    let per_image = HEIGHT * WIDTH;
    for p in 0..3u64 {
        assert_eq!(data[p as usize * per_image], pixel(p, 0, 0), "position {p}");
    }
    let ids = f
        .dataset("jf%b/image_id")
        .unwrap()
        .read_raw::<u64>()
        .unwrap();
    assert_eq!(
        ids,
        [FIRST_IMAGE_ID, FIRST_IMAGE_ID + 1, FIRST_IMAGE_ID + 2]
    );
}

/// What docs/file-format.md warns about: libhdf5 does not fail on a missing source file, its rows
/// read as fill values (zero pixels, status 0).
#[test]
fn a_data_file_deleted_after_the_master_reads_as_zeros_with_status_0() {
    let dir = tempfile::tempdir().unwrap();
    let req = make(dir.path(), Compression::None, &[2, 2], &[]);
    write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap();
    std::fs::remove_file(&req.sources[1].file).unwrap();
    // Positions 1 and 3 were writer 1's.
    assert_positions(Path::new(&req.output_file), 4, &[1, 3]);
}

/// What the master costs: writing it over 4 writers x 25 000 rows, reading a ledger column and
/// single images through it against reading the data files directly:
/// `cargo test -p std-h5-writer --test master_file bench_ -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: writes ~200 MB to /tmp"]
fn bench_master() {
    use std::time::Instant;
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let rows = [25_000u64; 4];
    let mut req = make(dir.path(), Compression::None, &rows, &[]);
    req.n_images = None;
    let start = Instant::now();
    let summary = write_master(&req, &spec(Compression::None), None, CONFIG_JSON).unwrap();
    let write_ms = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(summary.images, 100_000);
    let size = std::fs::metadata(&req.output_file).unwrap().len();
    let start = Instant::now();
    let ids = column::<u64>(&File::open(&req.output_file).unwrap(), "image_id");
    let vds_ms = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(ids[99_999], FIRST_IMAGE_ID + 99_999);
    let start = Instant::now();
    for s in &req.sources {
        let f = File::open(&s.file).unwrap();
        assert_eq!(column::<u64>(&f, "image_id").len(), 25_000);
    }
    let direct_ms = start.elapsed().as_secs_f64() * 1e3;
    let master = File::open(&req.output_file).unwrap();
    let status = master.dataset(&format!("{DETECTOR}/status")).unwrap();
    let start = Instant::now();
    for p in (0..100_000).step_by(100) {
        let one = status.read_slice_1d::<u16, _>(p..p + 1).unwrap();
        assert_eq!(one[0], if p % 3 == 2 { 2 } else { 1 });
    }
    let single_us = start.elapsed().as_secs_f64() * 1e6 / 1000.0;
    println!("bench_master: one status row through the master: {single_us:.0} us per read");
    println!(
        "bench_master: master over 4 x 25000 rows written in {write_ms:.1} ms ({size} bytes); \
         image_id of 100000 images: {vds_ms:.1} ms through the master, {direct_ms:.1} ms from \
         the 4 data files"
    );

    // One image at a time, 1 MiB images (512 x 1024 u16), 2 writers x 100 rows.
    let big = ImageFileSpec {
        height: 512,
        width: 1024,
        ..spec(Compression::None)
    };
    let folder = dir.path().join("big");
    std::fs::create_dir(&folder).unwrap();
    let req = write_run(&folder, "big", &big, None, &[100, 100], &[]);
    write_master(&req, &big, None, CONFIG_JSON).unwrap();
    // `position(i)`: the run position at row i of the file read.
    let read_all = |path: &str, n: usize, position: &dyn Fn(usize) -> u64| {
        let f = File::open(path).unwrap();
        let data = f.dataset(&format!("{DETECTOR}/data")).unwrap();
        let start = Instant::now();
        for i in 0..n {
            let image: ndarray::Array2<u16> = data.read_slice_2d((i, .., ..)).unwrap();
            assert_eq!(image[[511, 1023]], pixel(position(i), 511, 1023));
        }
        start.elapsed().as_secs_f64()
    };
    let vds = read_all(&req.output_file, 200, &|i| i as u64);
    let direct = read_all(&req.sources[0].file, 100, &|i| 2 * i as u64)
        + read_all(&req.sources[1].file, 100, &|i| 2 * i as u64 + 1);
    println!(
        "bench_master: 200 images of 1 MiB one by one (page cache): {:.0} MB/s through the master, \
         {:.0} MB/s from the data files",
        200.0 * 1.048_576 / vds,
        200.0 * 1.048_576 / direct
    );
}
