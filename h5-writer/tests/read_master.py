#!/usr/bin/env python3
"""Reads an std-daq master file (a run of N writers, HDF5 virtual datasets over their data files)
with h5py, as a scientist would, and checks it against what the test wrote: every run position in
order with its pixels ((p + 1) * 100 + 10 * y + x, master_common/mod.rs) and ledger row, image
ids first_image_id + p, zero pixels and status 0 for positions whose image never came, every
image's end-to-end checksum recomputed from the pixels read through the master (hdf5plugin
decompresses bitshuffle sources), and virtual sources named by file name only.

Usage: read_master.py MASTER EXPECTED_JSON   (from any working directory; prints a JSON report)
"""
import json
import os
import sys

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter)
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "python"))
from checksums import checksum  # noqa: E402  (the project's one copy of the algorithm)


def main():
    master, expected = sys.argv[1], json.loads(sys.argv[2])
    images, first = expected["images"], expected["first_image_id"]
    h, w, missing = expected["height"], expected["width"], set(expected["missing"])
    with h5py.File(master, "r") as f:
        g = f[expected["detector"]]
        data = g["data"]
        assert data.is_virtual, "data is not a virtual dataset"
        assert data.shape == (images, h, w), data.shape
        sources = sorted({s.file_name for s in data.virtual_sources()})
        assert sources == expected["data_files"], sources
        names = [str(n) for n in f.attrs["data_files"]]
        assert names == expected["data_files"], names
        assert int(f.attrs["writers"]) == len(names)
        assert int(f.attrs["first_image_id"]) == first
        if expected.get("nxmx"):
            entry_data = f["entry/data/data"]
            assert entry_data.shape == data.shape
            assert np.array_equal(entry_data[()], data[()])
        col = {name: g[name][()] for name in (
            "image_id", "status", "missing_packets", "missing_modules", "n_missing_modules",
            "module_missing_packets", "frame_index", "timestamp", "bunch_id", "lost_in_buffer",
            "checksum", "checksum_kind", "calibration_id")}
        for name, values in col.items():
            assert values.shape[0] == images, (name, values.shape)
            assert g[name].is_virtual, name
        ys, xs = np.mgrid[0:h, 0:w]
        pixels = data[()]
        checked = 0
        for p in range(images):
            if p in missing:
                assert not pixels[p].any(), p
                assert col["status"][p] == 0 and col["checksum_kind"][p] == 0, p
                continue
            want = ((p + 1) * 100 + ys * 10 + xs).astype(np.uint16)
            assert np.array_equal(pixels[p], want), p
            assert col["image_id"][p] == first + p, (p, col["image_id"][p])
            assert col["status"][p] == (2 if p % 3 == 2 else 1), p
            assert col["missing_packets"][p] == 3 * p
            assert list(col["missing_modules"][p]) == [p, 0, 0, 1 << 63]
            assert col["n_missing_modules"][p] == bin(p).count("1") + 1
            assert list(col["module_missing_packets"][p]) == [10 * p, 10 * p + 1]
            assert col["frame_index"][p] == 70_000 + p
            assert col["timestamp"][p] == 1_000_000 + 10 * p
            assert col["bunch_id"][p] == p + 0.25
            assert col["lost_in_buffer"][p] == 0
            assert col["calibration_id"][p] == 900 + p
            assert col["checksum_kind"][p] == 1
            assert checksum(pixels[p]) == int(col["checksum"][p]), p
            checked += 1
        folder = os.path.dirname(os.path.abspath(master))
        with h5py.File(os.path.join(folder, sources[0]), "r") as source:
            filters = sorted(source[expected["detector"]]["data"]._filters)
        print(json.dumps({"images": images, "checked": checked, "sources": sources,
                          "cwd": os.getcwd(), "source_filters": filters}))

if __name__ == "__main__":
    main()
