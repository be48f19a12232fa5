#!/usr/bin/env python3
"""Reads an std-daq file with `nxmx` (DIALS's NXmx reader, PyPI) and prints one JSON report:
entries, definition, times, the detector and its modules, every module's transformation chain
resolved to lab positions (mm), wavelength, distance, and the NXdata images (h5py with
hdf5plugin from PyPI, so compressed files read too): their shape, their sum (every pixel read
and decompressed), and that they are the same dataset as std_daq's `/<detector>/data` (whose
pixels verify_h5.py checks against the simulator's formula)."""
import argparse
import json

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter from PyPI, not Debian's)
import numpy as np
import nxmx



def position(axis):
    """The lab position (mm) that an axis's dependency chain puts the origin at."""
    chain = nxmx.get_dependency_chain(axis)
    m = nxmx.get_cumulative_transformation(chain)
    return [float(v) for v in (m[0] @ np.array([0.0, 0.0, 0.0, 1.0]))[:3]]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("file")
    args = ap.parse_args()
    with h5py.File(args.file, "r") as f:
        nx = nxmx.NXmx(f)
        entries = nx.entries
        entry = entries[0]
        instrument = entry.instruments[0]
        det = instrument.detectors[0]
        modules = []
        for mod in det.modules:
            origin = position(mod.module_offset)
            fast = np.array(position(mod.fast_pixel_direction)) - np.array(origin)
            slow = np.array(position(mod.slow_pixel_direction)) - np.array(origin)
            modules.append({
                "data_origin": [int(v) for v in mod.data_origin],
                "data_size": [int(v) for v in mod.data_size],
                "origin_mm": origin,
                "fast_step_mm": [float(v) for v in fast],
                "slow_step_mm": [float(v) for v in slow],
            })
        data = entry.data[0]
        images = f["/entry/data/data"]
        report = {
            "entries": len(entries),
            "definition": entry.definition,
            "start_time": entry.start_time.isoformat(),
            "end_time": entry.end_time.isoformat() if entry.end_time else None,
            "instruments": len(entry.instruments),
            "detectors": len(instrument.detectors),
            "modules": modules,
            "wavelength_angstrom": float(instrument.beams[0].incident_wavelength.to("angstrom").magnitude),
            "distance_mm": float(det.distance.to("mm").magnitude),
            "beam_center": [float(det.beam_center_x.magnitude), float(det.beam_center_y.magnitude)],
            "sensor": [det.sensor_material, float(det.sensor_thickness.to("mm").magnitude)],
            "saturation_value": det.saturation_value,
            "bit_depth_readout": det.bit_depth_readout,
            "pixel_mask_gaps": int(np.count_nonzero(det.pixel_mask[()] & 1)),
            "signal": data.signal,
            "n_images": int(images.shape[0]),
            "shape": list(images.shape),
            "same_dataset_as_std_daq_path": None,
            "pixel_sum": float(sum(float(images[i].sum(dtype=np.float64)) for i in range(images.shape[0]))),
        }
        group = [k for k in f.keys() if k != "entry"][0]
        report["same_dataset_as_std_daq_path"] = f[f"/{group}/data"].id == images.id
    print(json.dumps(report))


if __name__ == "__main__":
    main()
