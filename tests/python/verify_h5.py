#!/usr/bin/env python3
"""Checks an std-daq HDF5 file against the simulator's formula, independently of the Rust code.

Prints one JSON report on stdout. Every image's pixels are recomputed from
  offset(frame, module) = ((frame mod 65535) * 7919 + module * 104729) mod 65535
  value(frame, module, px) = 1 + (px + offset) mod 65535
with packets listed in --drop expected to be zero (8192 bytes = 4096 pixels per packet).
"""
import argparse
import json
import sys

import h5py
import numpy as np

PERIOD = 65535
# (module width, module height, payload bytes per packet) per detector.
DETECTORS = {"jungfrau": (1024, 512, 8192), "eiger": (512, 256, 4096), "gigafrost": None}
GF_PERIOD = 4095


def gigafrost_rows_per_packet(module_w, module_h):
    """std_daq's gf::n_rows_per_packet, with its integer rounding."""
    blocks = module_w // 12
    cache_line_blocks = (7400 // (36 * blocks)) * blocks // 2
    return min(cache_line_blocks * 48 // module_w, module_h)


def expected_gigafrost(frame, height, width, drops):
    """The image PSI's converter assembles from the simulator's 8 streams (see sim.rs)."""
    image = np.zeros((height, width), dtype=np.uint16)
    sw, sh = width // 2, height // 4
    rows_pp = gigafrost_rows_per_packet(sw, sh)
    missing = 0
    for m in range(8):
        offset = ((frame % PERIOD) * 7919 + m * 104729) % PERIOD
        offset = (2 * offset) % (2 * GF_PERIOD)
        px = np.arange(sw * sh, dtype=np.int64)
        stream = ((1 + (px + offset) % GF_PERIOD).astype(np.uint16)).reshape(sh, sw)
        lost = drops.get((frame, m), set())
        n_packets = -(-sh // rows_pp)
        for p in lost:
            if p < n_packets:
                stream[p * rows_pp:(p + 1) * rows_pp, :] = 0
                missing += 1
        quadrant, link = m // 2, m % 2
        col = width // 2 if quadrant % 2 == 1 else 0
        for r in range(sh):
            row = height // 2 + link + 2 * r if quadrant < 2 else (height - 1) // 2 - link - 2 * r
            image[row, col:col + sw] = stream[r]
    return image, missing


def expected_module(frame, module, pixels, dtype):
    offset = ((frame % PERIOD) * 7919 + module * 104729) % PERIOD
    values = 1 + (np.arange(pixels, dtype=np.int64) + offset) % PERIOD
    # 8-bit data keeps the low byte of the formula, as the simulator sends it.
    return (values & np.iinfo(dtype).max).astype(dtype)


def parse_drops(text):
    drops = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        f, m, p = item.split(":")
        packets = range(256) if p == "*" else [int(p)]
        drops.setdefault((int(f), int(m)), set()).update(packets)
    return drops


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("file")
    ap.add_argument("--detector", required=True)
    ap.add_argument("--n-modules", type=int, default=2)
    ap.add_argument("--drop", default="")
    ap.add_argument("--drop-file", help="read --drop from this file (long lists exceed the "
                                         "kernel's 128 KiB limit for one argument)")
    ap.add_argument("--kind", choices=sorted(DETECTORS), default="jungfrau")
    ap.add_argument("--allow-lost-in-buffer", action="store_true",
                    help="images flagged status 4 (overwritten in the ImageBuffer before the "
                         "writer got them) must be all zeros and count as lost, not as mismatches")
    ap.add_argument("--hdf5plugin", action="store_true",
                    help="load PyPI's hdf5plugin (compressed data without Debian's plugin)")
    args = ap.parse_args()
    if args.hdf5plugin:
        import hdf5plugin  # noqa: F401  (registers the bitshuffle filter)
    if args.kind != "gigafrost":
        module_w, module_h, payload = DETECTORS[args.kind]
        pixels = module_w * module_h
    if args.drop_file:
        with open(args.drop_file) as f:
            args.drop = f.read().strip()
    drops = parse_drops(args.drop)

    with h5py.File(args.file, "r") as f:
        g = f[args.detector]
        data = g["data"]
        ids = g["image_id"][:]
        status = g["status"][:]
        missing = g["missing_packets"][:]
        report = {
            "shape": list(data.shape),
            "dtype": str(data.dtype),
            "chunks": list(data.chunks) if data.chunks else None,
            "images": int(data.shape[0]),
            "ids_strictly_increasing": bool(np.all(np.diff(ids.astype(np.int64)) > 0)),
            "first_id": int(ids[0]) if len(ids) else None,
            "last_id": int(ids[-1]) if len(ids) else None,
            "status_counts": {str(int(k)): int(v) for k, v in zip(*np.unique(status, return_counts=True))},
            "record_lengths_match": all(len(g[k]) == data.shape[0] for k in
                                        ("image_id", "status", "missing_packets",
                                         "missing_modules", "n_missing_modules")),
            "ids_consecutive": bool(np.all(np.diff(ids.astype(np.int64)) == 1)),
            "exact_images": 0,
            "lost_in_buffer": 0,
            "mismatches": [],
            "flagged": {},
        }
        for i in range(min(data.shape[0], len(ids), len(status), len(missing))):
            frame = int(ids[i])
            image = data[i]
            if args.allow_lost_in_buffer and int(status[i]) == 4:
                if np.any(image != 0):
                    report["mismatches"].append(
                        {"index": i, "image_id": frame, "lost_in_buffer_but_not_zero": True})
                else:
                    report["lost_in_buffer"] += 1
                continue
            expect_missing = 0
            ok = True
            if args.kind == "gigafrost":
                want, expect_missing = expected_gigafrost(frame, data.shape[1], data.shape[2], drops)
                if not np.array_equal(image, want):
                    ok = False
                    bad = np.argwhere(image != want)[0]
                    report["mismatches"].append(
                        {"index": i, "image_id": frame, "pixel": [int(bad[0]), int(bad[1])],
                         "got": int(image[bad[0], bad[1]]), "want": int(want[bad[0], bad[1]])})
            per_packet = 1 if args.kind == "gigafrost" else payload // data.dtype.itemsize
            n_packets = 0 if args.kind == "gigafrost" else pixels // per_packet
            for m in range(0 if args.kind == "gigafrost" else args.n_modules):
                got = image[m * module_h:(m + 1) * module_h, :module_w].reshape(-1)
                want = expected_module(frame, m, pixels, data.dtype)
                for p in drops.get((frame, m), ()):
                    if p >= n_packets:
                        continue
                    want[p * per_packet:(p + 1) * per_packet] = 0
                    expect_missing += 1
                if not np.array_equal(got, want):
                    ok = False
                    bad = int(np.argmax(got != want))
                    report["mismatches"].append(
                        {"index": i, "image_id": frame, "module": m, "pixel": bad,
                         "got": int(got[bad]), "want": int(want[bad])})
            if int(missing[i]) != expect_missing:
                ok = False
                report["mismatches"].append(
                    {"index": i, "image_id": frame, "missing_packets": int(missing[i]),
                     "want_missing": expect_missing})
            want_status = 1 if expect_missing == 0 else 2
            if int(status[i]) != want_status:
                ok = False
                report["mismatches"].append(
                    {"index": i, "image_id": frame, "status": int(status[i]), "want_status": want_status})
            if int(status[i]) != 1:
                report["flagged"][str(frame)] = int(missing[i])
            if ok:
                report["exact_images"] += 1
        report["mismatches"] = report["mismatches"][:20]
    print(json.dumps(report))
    accounted = report["exact_images"] + report["lost_in_buffer"]
    ok = accounted == report["images"] and report["ids_strictly_increasing"]
    return 0 if ok and report["record_lengths_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
