"""Recomputes every image's end-to-end checksum of a std-daq file independently of the Rust code
(docs/file-format.md): prints one JSON line {"stored": [...], "computed": [...], "kinds": [...]}.
Usage: checksums.py FILE DETECTOR_GROUP. `checksum` is also imported by swmr_reader.py.
"""
import json
import sys

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter from PyPI, not Debian's)
import numpy as np
import xxhash

BLOCK = 256 * 1024


def checksum(image: np.ndarray) -> int:
    b = np.ascontiguousarray(image).astype(image.dtype.newbyteorder("<")).tobytes()
    digests = b"".join(
        xxhash.xxh3_64_digest(b[i:i + BLOCK])[::-1] for i in range(0, len(b), BLOCK)
    )
    return xxhash.xxh3_64_intdigest(digests)


if __name__ == "__main__":
    with h5py.File(sys.argv[1], "r") as f:
        g = f[sys.argv[2]]
        data = g["data"]
        print(json.dumps({
            "stored": [int(v) for v in g["checksum"]],
            "kinds": [int(v) for v in g["checksum_kind"]],
            "computed": [checksum(data[i]) for i in range(data.shape[0])],
        }))
