//! Our chunks are byte-identical to what Debian's bitshuffle (C, liblz4 1.9.4) produces, and a
//! compressed file reads back exactly in h5py (through the HDF5 filter plugin) and in the hdf5
//! crate. Needs `/usr/bin/python3` with numpy, h5py and bitshuffle (`apt-get install bitshuffle`);
//! skipped with a message otherwise.
//!
//! Own test binary for the same reason as `h5py_reads_file.rs` (python inherits libhdf5's file
//! descriptors and locks).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use h5_writer::compress::{decompress, Compressor, HEADER_BYTES};
use h5_writer::file::{Compression, ImageFile, ImageFileSpec, ImageRecord};
use std_daq_common::Dtype;

const PYTHON: &str = "/usr/bin/python3";

fn have_python_bitshuffle() -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import numpy, h5py, bitshuffle, bitshuffle.h5"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: {PYTHON} cannot import numpy, h5py and bitshuffle (apt-get install bitshuffle)");
    }
    ok
}

fn python(script: &str, args: &[&Path]) -> String {
    // Not locking: a python started by a test running beside this one may have inherited
    // (fork) this process's descriptor of the file with HDF5's lock on it.
    let out = Command::new(PYTHON)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[test]
fn chunks_are_byte_identical_to_debian_bitshuffle() {
    if !have_python_bitshuffle() {
        return;
    }
    let mut rng = common::Rng::new(42);
    let mut random = |n: usize| -> Vec<u8> { (0..n).map(|_| rng.next_u64() as u8).collect() };
    let u16s = |v: Vec<u16>| common::u16_bytes(&v);
    // (name, numpy dtype, element size, bytes)
    let cases: Vec<(&str, &str, usize, Vec<u8>)> = vec![
        (
            "jf_raw_512x1024",
            "<u2",
            2,
            u16s(common::jungfrau_raw(512, 1024, 1)),
        ),
        (
            "jf_corrected_512x1024",
            "<u2",
            2,
            u16s(common::jungfrau_corrected(512, 1024, 2)),
        ),
        (
            "jf_raw_1024x1024",
            "<u2",
            2,
            u16s(common::jungfrau_raw(1024, 1024, 3)),
        ),
        ("zeros_512x1024", "<u2", 2, vec![0; 512 * 1024 * 2]),
        ("ffff_512x1024", "<u2", 2, vec![0xFF; 512 * 1024 * 2]),
        ("tiny_3x5", "<u2", 2, u16s(common::jungfrau_raw(3, 5, 4))),
        // Not a multiple of the block (4096) nor of 8 elements nor of 64.
        (
            "jf_raw_4097",
            "<u2",
            2,
            u16s(common::jungfrau_raw(1, 4097, 5)),
        ),
        (
            "jf_raw_37x111",
            "<u2",
            2,
            u16s(common::jungfrau_raw(37, 111, 6)),
        ),
        ("random_u16_1000", "<u2", 2, random(2000)),
        ("u8_3x5", "|u1", 1, random(15)),
        ("u8_random_517x1030", "|u1", 1, random(517 * 1030)),
        (
            "u8_low_nibble_300x301",
            "|u1",
            1,
            random(300 * 301).iter().map(|b| b & 15).collect(),
        ),
        (
            "u32_jf_like_512x1024",
            "<u4",
            4,
            common::jungfrau_raw(512, 1024, 7)
                .iter()
                .flat_map(|&v| (u32::from(v) * 3).to_le_bytes())
                .collect(),
        ),
        ("u32_random_3x5", "<u4", 4, random(60)),
        ("u32_random_5001", "<u4", 4, random(4 * 5001)),
        (
            "u64_counts_2049",
            "<u8",
            8,
            (0..2049u64)
                .flat_map(|i| (i * i % 1000).to_le_bytes())
                .collect(),
        ),
        (
            "f32_ramp_777",
            "<f4",
            4,
            (0..777)
                .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
                .collect(),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = String::new();
    let mut ours = Vec::new();
    for (name, dtype, elem, bytes) in &cases {
        let mut c = Compressor::new(*elem).unwrap();
        let chunk = c.compress(bytes).unwrap().to_vec();
        let mut back = Vec::new();
        decompress(&chunk, *elem, &mut back).unwrap();
        assert_eq!(&back, bytes, "{name}: Rust round trip");
        std::fs::write(dir.path().join(format!("{name}.in")), bytes).unwrap();
        std::fs::write(dir.path().join(format!("{name}.ours")), &chunk).unwrap();
        manifest.push_str(&format!("{name} {dtype}\n"));
        ours.push(chunk);
    }
    std::fs::write(dir.path().join("manifest"), manifest).unwrap();

    // compress_lz4 returns the blocks only; the filter adds the 12-byte header (checked by
    // `file_reads_back_in_h5py_and_matches_the_filter_byte_for_byte`). decompress_lz4 of ours
    // checks the other direction.
    let script = r#"
import sys, os, numpy as np, bitshuffle
d = sys.argv[1]
for line in open(os.path.join(d, "manifest")):
    name, dtype = line.split()
    arr = np.fromfile(os.path.join(d, name + ".in"), dtype=np.dtype(dtype))
    open(os.path.join(d, name + ".py"), "wb").write(bitshuffle.compress_lz4(arr, 0).tobytes())
    ours = np.fromfile(os.path.join(d, name + ".ours"), dtype=np.uint8)
    back = bitshuffle.decompress_lz4(ours[12:], arr.shape, arr.dtype, 0)
    print(name, "decoded" if np.array_equal(back.view(np.uint8), arr.view(np.uint8)) else "DIFFERENT")
"#;
    let stdout = python(script, &[dir.path()]);
    for ((name, _, _, _), chunk) in cases.iter().zip(&ours) {
        assert!(
            stdout.lines().any(|l| l == format!("{name} decoded")),
            "{name}: python could not decode ours:\n{stdout}"
        );
        let theirs = std::fs::read(dir.path().join(format!("{name}.py"))).unwrap();
        let body = &chunk[HEADER_BYTES..];
        assert!(
            first_difference(body, &theirs).is_none(),
            "{name}: ours ({} bytes) differs from bitshuffle.compress_lz4 ({} bytes) at byte {:?}",
            body.len(),
            theirs.len(),
            first_difference(body, &theirs)
        );
    }
}

#[test]
fn file_reads_back_in_h5py_and_matches_the_filter_byte_for_byte() {
    if !have_python_bitshuffle() {
        return;
    }
    let (h, w) = (512usize, 1024usize);
    let images: Vec<Vec<u16>> = (0..3)
        .map(|i| common::jungfrau_raw(h, w, 100 + i))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("compressed.h5");
    let spec = ImageFileSpec {
        detector_name: "jf".into(),
        n_images: 10,
        height: h as u32,
        width: w as u32,
        dtype: Dtype::Uint16,
        compression: Compression::BitshuffleLz4,
        n_modules: 1,
    };
    let mut f = ImageFile::create(&path, &spec).unwrap();
    f.write_image(0, &common::u16_bytes(&images[0]), ImageRecord::default())
        .unwrap();
    // Index 1 skipped (no chunk: reads as the fill value 0), 2 written then zeroed (a zero
    // chunk over it), 3 written.
    f.write_image(2, &common::u16_bytes(&images[1]), ImageRecord::default())
        .unwrap();
    f.write_zero_image(2, ImageRecord::default()).unwrap();
    f.write_image(3, &common::u16_bytes(&images[2]), ImageRecord::default())
        .unwrap();
    assert_eq!(f.close().unwrap(), 4);
    let mut expected: Vec<u16> = images[0].clone();
    expected.extend(vec![0u16; 2 * h * w]);
    expected.extend(&images[2]);
    std::fs::write(
        dir.path().join("expected.bin"),
        common::u16_bytes(&expected),
    )
    .unwrap();

    // h5py reads the pixels through the plugin; its own filter, fed the same images, writes the
    // very chunks we wrote (header included).
    let script = r#"
import sys, numpy as np, h5py
path, expected, copy = sys.argv[1:4]
with h5py.File(path, "r") as f:
    d = f["jf/data"]
    a = d[()]
    print(d.shape, d.dtype, d.chunks, dict(d._filters))
    exp = np.fromfile(expected, dtype="<u2").reshape(a.shape)
    print("pixels", "equal" if np.array_equal(a, exp) else "DIFFERENT")
    print("fill value", d.fillvalue, "chunks", d.id.get_num_chunks())
    with h5py.File(copy, "w") as g:
        e = g.create_dataset("data", data=a, chunks=d.chunks, compression=32008, compression_opts=(0, 2))
        same = all(d.id.read_direct_chunk((i, 0, 0)) == e.id.read_direct_chunk((i, 0, 0)) for i in (0, 2, 3))
    print("chunks", "identical" if same else "DIFFERENT")
"#;
    let stdout = python(
        script,
        &[
            &path,
            &dir.path().join("expected.bin"),
            &dir.path().join("h5py.h5"),
        ],
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "(4, 512, 1024) uint16 (1, 512, 1024) {'32008': (0, 3, 2, 0, 2)}",
            "pixels equal",
            "fill value 0 chunks 3",
            "chunks identical",
        ],
        "h5py output:\n{stdout}"
    );

    // The hdf5 crate (same libhdf5, plugin loaded from the default folder) reads it too.
    let file = hdf5::File::open(&path).unwrap();
    let data = file.dataset("jf/data").unwrap();
    assert_eq!(data.shape(), vec![4, h, w]);
    assert_eq!(data.read_raw::<u16>().unwrap(), expected);
    assert_eq!(data.num_chunks(), Some(3), "row 1 has no chunk");
    let stored: u64 = (0..3).map(|i| data.chunk_info(i).unwrap().size).sum();
    assert!(
        stored < (3 * h * w * 2) as u64 * 4 / 5,
        "stored {stored} bytes: not compressed?"
    );
}
