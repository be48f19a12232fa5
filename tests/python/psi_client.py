"""Drives `std-daq api` with PSI's own std-daq-client (unchanged, from PyPI) and prints a JSON
report on the last line of stdout for tests/tests/psi_client.rs.

Steps: get_config; set_config with an invalid change (bit_depth) and a valid one (compression);
get_deployment_status until the change is applied; start_writer_async + simulator + get_status
until FINISHED; start_writer_sync while the simulator sends; a refused write (relative path);
an unbounded write (no n_images) stopped with stop_writer; get_stats; get_logs. Every wait polls
with a watchdog; nothing sleeps to synchronise.
"""
import argparse
import json
import subprocess
import sys
import threading
import time

from std_daq_client import StdDaqAdminException, StdDaqClient

WATCHDOG = 120.0


def poll(what, fn, done):
    deadline = time.monotonic() + WATCHDOG
    while True:
        value = fn()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}; last {value}")
        time.sleep(0.02)


def unbounded(client, args, report, simulate):
    """Needs the agent's unbounded writes: no n_images, stopped by stop_writer."""
    unbounded_file = f"{args.root}/psi_unbounded.h5"
    report["unbounded_file"] = unbounded_file
    report["unbounded_started"] = client.start_writer_async({"output_file": unbounded_file})
    poll("the unbounded write to wait", client.get_status,
         lambda s: s["acquisition"]["state"] == "WAITING_IMAGES"
         and s["acquisition"]["stats"]["start_time"] is not None)
    sim = threading.Thread(target=simulate, args=(600, 50))
    sim.start()
    poll("images in the unbounded write", client.get_status,
         lambda s: s["acquisition"]["stats"]["n_write_completed"] >= 10)
    report["unbounded_stopped"] = client.stop_writer()
    report["unbounded_status"] = client.get_status()
    report["logs_1"] = client.get_logs(1)
    sim.join()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--root", required=True, help="the agent's output root")
    ap.add_argument("--sim", required=True, help="std-det-sim")
    ap.add_argument("--sim-config", required=True)
    ap.add_argument("--part", choices=["main", "unbounded"], default="main")
    args = ap.parse_args()
    client = StdDaqClient(url_base=args.url)
    report = {}
    start_frame = [1]

    def simulate(n, rate=100):
        out = subprocess.run(
            [args.sim, "--config", args.sim_config, "--images", str(n), "--rate", str(rate),
             "--start-frame", str(start_frame[0])],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True)
        start_frame[0] += 10_000
        return json.loads(out.stdout)

    def refused(call, *a):
        try:
            call(*a)
        except StdDaqAdminException as e:
            return str(e)
        return None

    if args.part == "unbounded":
        unbounded(client, args, report, simulate)
        print(json.dumps(report))
        return

    report["config"] = client.get_config()
    report["invalid_config"] = refused(client.set_config, {"bit_depth": 12})
    report["config_after_invalid"] = client.get_config()
    report["set_config"] = client.set_config({"compression": "bitshuffle-lz4", "writer_user_id": 0})
    report["config_after_valid"] = client.get_config()
    report["deployment"] = poll(
        "the config to be applied", client.get_deployment_status,
        lambda d: d["status"] in ("SUCCESS", "FAILED"))

    # Asynchronous: answered at once, then get_status until the write finishes.
    async_file = f"{args.root}/psi_async.h5"
    started = client.start_writer_async({"output_file": async_file, "n_images": 20})
    report["async_started"] = started
    poll("the async write to wait for images", client.get_status,
         lambda s: s["acquisition"]["state"] == "WAITING_IMAGES"
         and s["acquisition"]["stats"]["start_time"] is not None
         and s["acquisition"]["info"]["output_file"] == async_file)
    seen = set()

    def watch(s):
        seen.add(s["acquisition"]["state"])
        return s["state"] == "READY"

    simulate(30)
    report["async_final"] = poll("the async write to finish", client.get_status, watch)
    report["async_states_seen"] = sorted(seen)

    # Synchronous: the simulator sends once the writer waits for images.
    sync_file = f"{args.root}/psi_sync.h5"

    def send_when_waiting():
        poll("the sync write to wait for images", client.get_status,
             lambda s: s["acquisition"]["info"].get("output_file") == sync_file
             and s["acquisition"]["stats"]["start_time"] is not None
             and s["acquisition"]["state"] == "WAITING_IMAGES")
        simulate(25)

    t = threading.Thread(target=send_when_waiting)
    t.start()
    report["sync"] = client.start_writer_sync({"output_file": sync_file, "n_images": 15,
                                               "run_id": 4242})
    t.join()

    # stop_writer on a bounded write: the kill of its request; the file keeps what was written.
    stopped_file = f"{args.root}/psi_stopped.h5"
    client.start_writer_async({"output_file": stopped_file, "n_images": 5000})
    poll("the write to stop to wait", client.get_status,
         lambda s: s["acquisition"]["state"] == "WAITING_IMAGES"
         and s["acquisition"]["stats"]["start_time"] is not None)
    sim = threading.Thread(target=simulate, args=(600, 50))
    sim.start()
    poll("images in the write to stop", client.get_status,
         lambda s: s["acquisition"]["stats"]["n_write_completed"] >= 10)
    report["stopped"] = client.stop_writer()
    report["stopped_file"] = stopped_file
    sim.join()

    # Refused by the agent: the client's exception with the agent's words.
    report["refused_write"] = refused(client.start_writer_async,
                                      {"output_file": "relative.h5", "n_images": 5})
    report["status_after_refusal"] = client.get_status()

    report["stats"] = client.get_stats()

    report["logs"] = client.get_logs(10)
    report["logs_1"] = client.get_logs(1)
    report["deployment_last"] = client.get_deployment_status()
    report["async_file"] = async_file
    report["sync_file"] = sync_file
    print(json.dumps(report))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # the report says what failed; the exit status too
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
