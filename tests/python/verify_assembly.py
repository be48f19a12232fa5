#!/usr/bin/env python3
"""Checks an std-daq HDF5 file against the simulator's formula, with the geometry (module
positions, corner-order mirroring, chip gaps, double pixels) and JUNGFRAU conversion taken from the
detector config and calibration file and recomputed here with numpy, independently of the Rust
code. Prints one JSON report on stdout.

  offset(frame, module) = ((frame mod 65535) * 7919 + module * 104729) mod 65535
  raw(frame, module, px) = 1 + (px + offset) mod 65535   (narrowed to the pixel width)
  converted: gain bits 00/01/11 -> G0/G1/G2, 10 -> 0; E = (adc - pedestal[s]) / gain[s] (keV,
  gains in ADU/keV); pixel_mask != 0, gain 0 or non-finite -> 0.

Raw images may have lost packets: each packet's pixels must then be all zero, and the zeroed
packets (a missing module counts all of them) must add up to the file's missing_packets.
"""
import argparse
import json
import sys

import h5py
import numpy as np

PERIOD = 65535


def sim_module(frame, module, h, w, dtype):
    offset = ((frame % PERIOD) * 7919 + module * 104729) % PERIOD
    values = 1 + (np.arange(h * w, dtype=np.int64) + offset) % PERIOD
    return (values & np.iinfo(dtype).max).astype(dtype).reshape(h, w)


def convert(raw, gains, peds, mask):
    raw = raw.astype(np.int64)
    adc = (raw & 0x3FFF).astype(np.float64)
    bits = raw >> 14
    out = np.zeros(raw.shape, dtype=np.float64)
    for b, s in ((0, 0), (1, 1), (3, 2)):
        g = gains[s].astype(np.float64)
        ok = (bits == b) & (g != 0) & np.isfinite(g) & np.isfinite(peds[s])
        with np.errstate(divide="ignore", invalid="ignore"):
            e = (adc - peds[s]) / g
        out[ok] = e[ok]
    out[mask != 0] = 0.0
    return out


def with_gaps(module, chips_x, chips_y, chip, gap, double_pixels):
    """The module's rectangle (unmirrored): chips spaced by `gap`, double pixels handled."""
    h, w = module.shape
    rect = np.zeros((h + gap * (chips_y - 1), w + gap * (chips_x - 1)), dtype=module.dtype)
    for j in range(chips_y):
        for k in range(chips_x):
            y, x = j * (chip + gap), k * (chip + gap)
            rect[y:y + chip, x:x + chip] = module[j * chip:(j + 1) * chip, k * chip:(k + 1) * chip]
    if gap and double_pixels == "split":
        for k in range(1, chips_x):
            g = k * (chip + gap) - gap
            rect[:, g - 1] /= 2
            rect[:, g] = rect[:, g - 1]
            rect[:, g + 2] /= 2
            rect[:, g + 1] = rect[:, g + 2]
        for j in range(1, chips_y):
            g = j * (chip + gap) - gap
            rect[g - 1, :] /= 2
            rect[g, :] = rect[g - 1, :]
            rect[g + 2, :] /= 2
            rect[g + 1, :] = rect[g + 2, :]
    elif gap and double_pixels == "mask":
        for k in range(1, chips_x):
            g = k * (chip + gap) - gap
            rect[:, g - 1:g + 3] = 0
        for j in range(1, chips_y):
            g = j * (chip + gap) - gap
            rect[g - 1:g + 3, :] = 0
    return rect


def expected_pixel_mask(cfg, shape, module_shape, chips, gap, double_pixels, cal):
    """The NXmx pixel_mask docs/nxmx.md describes: 1 where no module or chip covers a pixel (or a
    masked double pixel), 2 where the calibration cannot convert it (spread like the pixels)."""
    mh, mw = module_shape
    chips_x, chips_y = chips
    mask = np.ones(shape, dtype=np.uint32)
    for m in range(cfg["n_modules"]):
        cov = with_gaps(np.ones((mh, mw)), chips_x, chips_y, 256, gap, double_pixels)
        rect = np.where(cov != 0, 0, 1).astype(np.uint32)
        if cal is not None:
            gains, peds, pmask = cal
            rows = slice(m * mh, (m + 1) * mh)
            g, p = gains[:, rows].astype(np.float64), peds[:, rows].astype(np.float64)
            bad = (pmask[rows] != 0) | np.any((g == 0) | ~np.isfinite(g) | ~np.isfinite(p), axis=0)
            dead = with_gaps(bad.astype(np.float64), chips_x, chips_y, 256, gap, double_pixels) != 0
            rect[(rect == 0) & dead] = 2
        x0, y0, x1, y1 = cfg["module_positions"][str(m)]
        if x1 < x0:
            rect = rect[:, ::-1]
        if y1 < y0:
            rect = rect[::-1, :]
        mask[min(y0, y1):max(y0, y1) + 1, min(x0, x1):max(x0, x1) + 1] = rect
    return mask


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("file")
    ap.add_argument("--config", required=True)
    ap.add_argument("--calibration")
    args = ap.parse_args()
    cfg = json.load(open(args.config))
    kind = cfg["detector_type"]
    n = cfg["n_modules"]
    gaps = cfg.get("chip_gaps", False)
    gap = 2 if gaps else 0
    if kind.startswith("jungfrau"):
        mh, mw, chips_x, chips_y, dtype = 512, 1024, 4, 2, np.uint16
    else:
        mh, mw, chips_x, chips_y = 256, 512, 2, 1
        dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32}[cfg["bit_depth"]]
    converted = kind == "jungfrau-converted"
    double_pixels = cfg.get("double_pixels", "split") if converted else "keep"
    payload = 4096 if kind == "eiger" else 8192
    per_packet = payload // np.dtype(dtype).itemsize
    n_packets = mh * mw // per_packet
    cal = None
    if converted:
        with h5py.File(args.calibration, "r") as c:
            cal = (c["gains"][:], c["pedestals"][:], c["pixel_mask"][:])

    with h5py.File(args.file, "r") as f:
        g = f[cfg["detector_name"]]
        data = g["data"]
        ids = g["image_id"][:]
        status = g["status"][:]
        missing = g["missing_packets"][:]
        mmods = g["missing_modules"][:]
        report = {
            "shape": list(data.shape),
            "dtype": str(data.dtype),
            "images": int(data.shape[0]),
            "ids_strictly_increasing": bool(np.all(np.diff(ids.astype(np.int64)) > 0)),
            "status_counts": {str(int(k)): int(v) for k, v in zip(*np.unique(status, return_counts=True))},
            "consistent_images": 0,
            "exact_images": 0,
            "max_abs_error": 0.0,
            "missing_module_images": {},
            "mismatches": [],
        }
        for i in range(data.shape[0]):
            frame = int(ids[i])
            image = data[i]
            covered = np.zeros(image.shape, dtype=bool)
            zero_packets = 0
            ok = True
            exact = True
            for m in range(n):
                x0, y0, x1, y1 = cfg["module_positions"][str(m)]
                left, top = min(x0, x1), min(y0, y1)
                rect_got = image[top:max(y0, y1) + 1, left:max(x0, x1) + 1]
                covered[top:max(y0, y1) + 1, left:max(x0, x1) + 1] = True
                # Back to unmirrored rectangle coordinates.
                if x1 < x0:
                    rect_got = rect_got[:, ::-1]
                if y1 < y0:
                    rect_got = rect_got[::-1, :]
                flagged = bool((int(mmods[i][m // 64]) >> (m % 64)) & 1)
                if flagged:
                    report["missing_module_images"].setdefault(str(m), []).append(frame)
                    zero_packets += n_packets
                    if np.any(rect_got != 0):
                        ok = False
                        report["mismatches"].append({"image_id": frame, "module": m, "flagged_but_not_zero": True})
                    continue
                raw = sim_module(frame, m, mh, mw, dtype)
                if converted:
                    gains, peds, mask = cal
                    rows = slice(m * mh, (m + 1) * mh)
                    want = with_gaps(convert(raw, gains[:, rows], peds[:, rows], mask[rows]),
                                     chips_x, chips_y, 256, gap, double_pixels)
                    err = np.abs(rect_got.astype(np.float64) - want)
                    tol = 1e-3 + 1e-5 * np.abs(want)
                    report["max_abs_error"] = max(report["max_abs_error"], float(err.max()))
                    if np.any(err > tol):
                        ok = False
                        y, x = np.unravel_index(int(np.argmax(err - tol)), err.shape)
                        report["mismatches"].append({"image_id": frame, "module": m, "y": int(y), "x": int(x),
                                                     "got": float(rect_got[y, x]), "want": float(want[y, x])})
                    if not np.array_equal(rect_got, want.astype(np.float32)):
                        exact = False
                else:
                    # Gap pixels zero; each packet's pixels exact or all zero.
                    expected_rect = with_gaps(raw, chips_x, chips_y, 256, gap, "keep")
                    placed = with_gaps(np.ones_like(raw), chips_x, chips_y, 256, gap, "keep") != 0
                    if np.any(rect_got[~placed] != 0):
                        ok = False
                        report["mismatches"].append({"image_id": frame, "module": m, "gap_not_zero": True})
                    got = rect_got[placed].reshape(-1)
                    want = expected_rect[placed].reshape(-1)
                    for p in range(n_packets):
                        s = slice(p * per_packet, (p + 1) * per_packet)
                        if np.array_equal(got[s], want[s]):
                            continue
                        exact = False
                        if np.all(got[s] == 0):
                            zero_packets += 1
                        else:
                            ok = False
                            bad = int(np.argmax(got[s] != want[s]))
                            report["mismatches"].append({"image_id": frame, "module": m, "packet": p,
                                                         "got": int(got[s][bad]), "want": int(want[s][bad])})
                            break
            if np.any(image[~covered] != 0):
                ok = False
                report["mismatches"].append({"image_id": frame, "outside_modules_not_zero": True})
            if not converted and int(missing[i]) != zero_packets:
                ok = False
                report["mismatches"].append({"image_id": frame, "missing_packets": int(missing[i]),
                                             "zero_packets": zero_packets})
            want_status = 1 if int(missing[i]) == 0 else 2
            if int(status[i]) != want_status:
                ok = False
                report["mismatches"].append({"image_id": frame, "status": int(status[i]), "want": want_status})
            report["consistent_images"] += ok
            report["exact_images"] += ok and exact
        path = "/entry/instrument/detector/pixel_mask"
        if path in f:
            got = f[path][:]
            want = expected_pixel_mask(cfg, tuple(data.shape[1:]), (mh, mw), (chips_x, chips_y),
                                       gap, double_pixels, cal)
            report["pixel_mask_mismatches"] = int(np.count_nonzero(got != want))
            report["pixel_mask_counts"] = {str(int(k)): int(v) for k, v in zip(*np.unique(got, return_counts=True))}
            report["pixel_mask_calibration"] = f[path].attrs.get("calibration_file", "")
            if isinstance(report["pixel_mask_calibration"], bytes):
                report["pixel_mask_calibration"] = report["pixel_mask_calibration"].decode()
        report["mismatches"] = report["mismatches"][:20]
        report["status"] = [int(s) for s in status]
        report["n_missing_modules"] = [int(v) for v in g["n_missing_modules"][:]]
    print(json.dumps(report))
    return 0 if report["consistent_images"] == report["images"] else 1


if __name__ == "__main__":
    sys.exit(main())
