#!/usr/bin/env python3
"""Runs bluesky plans with stddaq_bluesky.StdDaqDetector against a real `std-daq api` (for
tests/tests/bluesky.rs) and prints one JSON report on stdout.

Plans (--plans, comma-separated, run in this order by one RunEngine):
  count  bp.count([det], num=5)
  fly    a fly scan of --fly-frames frames: prepare(TriggerInfo(number_of_events=n)), kickoff,
         collect_while_completing
With --acquire sim the detector is the project's simulator (SimulatorAcquireLogic: one frame per
trigger, all frames at kickoff); with --acquire free it is already sending frames (the default
acquire logic, made by the blueapi device factory stddaq_bluesky.blueapi.stddaq).

For each run the report has the documents (names in order, counts), the stream resources and
datums, and what reading back through the stream resource (file from the uri, dataset, rows from
the datum indices) gives, checked against the simulator's pixel formula (verify_h5.py's).
"""
import argparse
import json
import os
import sys
from collections import defaultdict
from urllib.parse import urlparse

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
import h5py
import numpy as np
from bluesky import RunEngine
from ophyd_async.core import (
    AutoIncrementFilenameProvider,
    StaticPathProvider,
    TriggerInfo,
    init_devices,
)

from stddaq_bluesky import SimulatorAcquireLogic, StdDaqDetector, StdDaqTriggerLogic
from stddaq_bluesky.blueapi import stddaq

sys.path.insert(0, os.path.dirname(__file__))
from verify_h5 import expected_module  # noqa: E402  (the independent pixel formula)

MODULE_W, MODULE_H = 1024, 512


def fly(det, n):
    @bpp.stage_decorator([det])
    @bpp.run_decorator()
    def inner():
        yield from bps.prepare(det, TriggerInfo(number_of_events=n), wait=True)
        yield from bps.declare_stream(det, name="primary", collect=True)
        yield from bps.kickoff(det, wait=True)
        yield from bps.collect_while_completing(
            flyers=[det], dets=[det], flush_period=0.2, stream_name="primary"
        )

    yield from inner()


def read_back(docs, n_modules):
    """Reads every datum's rows through its stream resource and checks them."""
    resources = {d["uid"]: d for d in docs["stream_resource"]}
    out = {"rows": [], "exact": 0, "not_exact": [], "files": {}}
    for datum in docs["stream_datum"]:
        res = resources[datum["stream_resource"]]
        uri = urlparse(res["uri"])
        path, dataset = uri.path, res["parameters"]["dataset"]
        start, stop = datum["indices"]["start"], datum["indices"]["stop"]
        with h5py.File(path, "r") as f:
            data = f[dataset]
            # std_daq's group beside /entry holds the per-image records.
            group = f[next(k for k in f.keys() if k != "entry")]
            out["files"][path] = {"images": int(data.shape[0]), "dataset": dataset}
            for row in range(start, stop):
                image = data[row]
                image_id = int(group["image_id"][row])
                ok = all(
                    np.array_equal(
                        image[m * MODULE_H:(m + 1) * MODULE_H, :MODULE_W].reshape(-1),
                        expected_module(image_id, m, MODULE_W * MODULE_H, image.dtype),
                    )
                    for m in range(n_modules)
                )
                out["rows"].append([path, row, image_id])
                if ok:
                    out["exact"] += 1
                else:
                    out["not_exact"].append([path, row, image_id])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", required=True)
    ap.add_argument("--dir", required=True, help="where the PathProvider puts files")
    ap.add_argument("--plans", default="count")
    ap.add_argument("--acquire", choices=["sim", "free"], default="sim")
    ap.add_argument("--sim", help="std-det-sim (with --acquire sim)")
    ap.add_argument("--config", help="the detector config (with --acquire sim)")
    ap.add_argument("--first-frame", type=int, default=1)
    ap.add_argument("--fly-frames", type=int, default=20)
    ap.add_argument("--n-modules", type=int, default=2)
    args = ap.parse_args()

    RE = RunEngine({})
    docs_by_run = []
    current = {}

    def collect(name, doc):
        if name == "start":
            current["docs"] = defaultdict(list)
            current["order"] = []
            docs_by_run.append(current.copy())
        run = docs_by_run[-1]
        run["docs"][name].append(doc)
        run["order"].append(name)

    RE.subscribe(collect)
    path_provider = StaticPathProvider(AutoIncrementFilenameProvider("scan"), args.dir)
    with init_devices():
        if args.acquire == "sim":
            trigger = StdDaqTriggerLogic()
            acquire = SimulatorAcquireLogic(
                args.sim, args.config, trigger, rate=100.0, first_frame=args.first_frame
            )
            det = StdDaqDetector(
                args.url, path_provider, name="det", acquire_logic=acquire, trigger_logic=trigger
            )
        else:
            # The blueapi device factory, as blueapi would call it.
            os.environ["STDDAQ_API_URL"] = args.url
            os.environ["STDDAQ_DEVICE_NAME"] = "det"
            det = stddaq(path_provider)

    finals = []
    for plan in args.plans.split(","):
        if plan == "count":
            RE(bp.count([det], num=5))
        elif plan == "fly":
            RE(fly(det, args.fly_frames))
        else:
            raise SystemExit(f"unknown plan {plan}")
        last = det.data_logic.last_final
        finals.append({"action": last.action, "message": last.message,
                       "images_written": last.images_written} if last else None)

    report = []
    for run, final in zip(docs_by_run, finals):
        d = run["docs"]
        report.append({
            "counts": {k: len(v) for k, v in d.items()},
            "order": run["order"],
            "exit_status": d["stop"][0]["exit_status"] if d["stop"] else None,
            "stream_resources": [
                {k: r[k] for k in ("data_key", "mimetype", "uri", "parameters")}
                for r in d["stream_resource"]
            ],
            "datums": [dd["indices"] for dd in d["stream_datum"]],
            "data_keys": {
                k: {"shape": v["shape"], "dtype_numpy": v.get("dtype_numpy"),
                    "external": v.get("external")}
                for desc in d["descriptor"] for k, v in desc["data_keys"].items()
            },
            "read_back": read_back(d, args.n_modules),
            "final_status": final,
        })
    print(json.dumps(report))


if __name__ == "__main__":
    main()
