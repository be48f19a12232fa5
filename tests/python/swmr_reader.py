"""Reads a std-daq file WHILE the writer writes it, as online processing would: opens the `.part`
with h5py in SWMR mode once, then for every line on stdin refreshes the datasets and prints one
JSON line: the images visible, how many of them give their ledger checksum (recomputed with the
documented algorithm, docs/file-format.md), their image ids and statuses.
Usage: swmr_reader.py FILE DETECTOR_GROUP
"""
import json
import os
import sys

import h5py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checksums import checksum  # noqa: E402  (the documented algorithm, one copy)


with h5py.File(sys.argv[1], "r", swmr=True) as f:
    g = f[sys.argv[2]]
    names = ["data", "image_id", "status", "checksum", "checksum_kind"]
    # Hold each dataset and refresh() that same object: refreshing a temporary `g[name]` and
    # reading through a new one gave every image the first image's pixels (h5py 3 / HDF5 2.0).
    ds = {n: g[n] for n in names}
    for _ in sys.stdin:
        for d in ds.values():
            d.refresh()
        # The ledger rows of a checkpoint land with its images; read no row beyond both.
        n = min(d.shape[0] for d in ds.values())
        data = ds["data"]
        sums = ds["checksum"][:n]
        kinds = ds["checksum_kind"][:n]
        exact = sum(
            1 for i in range(n) if kinds[i] == 1 and checksum(data[i]) == int(sums[i])
        )
        print(json.dumps({
            "images": int(data.shape[0]),
            "rows": n,
            "exact": exact,
            "image_ids": [int(v) for v in ds["image_id"][:n]],
            "statuses": [int(v) for v in ds["status"][:n]],
        }), flush=True)
