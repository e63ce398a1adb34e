"""Test harness for the Prefect layer: a real Tiled server, a real Prefect server and a real
``xtec-flows serve`` process, all subprocesses on 127.0.0.1, plus helpers that read Prefect's
REST API (so the test process never imports Prefect's settings machinery).

The stack is expensive (~25 s to start on 2 cores): a test module shares one, and ``make test``
runs pytest-xdist with ``--dist loadfile`` so a module's tests stay on one worker (``loadgroup``
did not keep groups together with pytest 9 + xdist 3.8 here).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from xtec_flows.demo.services import PrefectService, ServeService, TiledService
from xtec_flows import tiled as tiled_io

API_KEY = "flowsecret123"
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@dataclass
class Stack:
    directory: Path
    tiled: TiledService
    prefect: PrefectService
    serve: ServeService | None
    api_key: str = API_KEY

    def client(self):
        return tiled_io.connect(self.tiled.uri, self.api_key)

    def stop(self) -> None:
        for svc in (self.serve, self.prefect, self.tiled):
            if svc is not None:
                svc.stop()


def start_stack(directory: Path, serve_args=(), serve_env=None, streaming_cache: str | None = "memory",
                with_serve: bool = True) -> Stack:
    directory = Path(directory)
    tiled = TiledService(directory / "tiled", API_KEY, streaming_cache=streaming_cache,
                         readable=[directory / "hdf5"])
    prefect = PrefectService(directory / "prefect")
    try:
        for svc in (tiled, prefect):
            svc.launch()
        for svc in (tiled, prefect):
            svc.wait_ready(svc.ready, svc.start_timeout)
        from tiled.structures.core import Spec

        tiled_io.connect(tiled.uri, API_KEY).create_container(
            "raw", specs=[Spec("CatalogOfBlueskyRuns", version="3.0")])
        stack = Stack(directory, tiled, prefect, None)
        if with_serve:
            stack.serve = start_serve(stack, serve_args, serve_env)
        return stack
    except BaseException:
        prefect.stop()
        tiled.stop()
        raise


def start_serve(stack: Stack, args=(), env=None) -> ServeService:
    serve = ServeService(stack.directory / "serve", stack.tiled.uri, stack.api_key, stack.prefect.api_url,
                         args=["--raw-path", "raw", "-k", "3", "--limit", "2", "--query-seconds", "1",
                               "--reconcile-seconds", "4", "--reprocess-cron", "", *args],
                         extra_env={"TILED_RETRY_ATTEMPTS": "3", "TILED_RETRY_TIMEOUT": "10", **(env or {})})
    return serve.start()


def flow_runs(api_url: str, flow_name: str = "xtec-cluster-scan") -> list[dict]:
    """Every flow run of ``flow_name`` (JSON dicts: parameters, state_type, start/end_time, ...)."""
    with httpx.Client(trust_env=False, timeout=10.0) as http:
        flows = http.post(f"{api_url}/flows/filter", json={"flows": {"name": {"any_": [flow_name]}}}).json()
        if not flows:
            return []
        runs, offset = [], 0
        while True:
            page = http.post(f"{api_url}/flow_runs/filter",
                             json={"flows": {"id": {"any_": [flows[0]["id"]]}}, "limit": 200,
                                   "offset": offset}).json()
            runs += page
            if len(page) < 200:
                return runs
            offset += 200


def runs_for_scan(api_url: str, uid: str) -> list[dict]:
    return [r for r in flow_runs(api_url) if (r.get("parameters") or {}).get("scan_uid") == uid]


def wait_until(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy (returned). Once a second by default:
    each poll costs the servers a few requests, on the same 2 cores as the stack under test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(interval)


def result_status(client, uid: str) -> str | None:
    from xtec_flows.tiled.results import find_results

    nodes = find_results(client, uid, status=None)
    return (nodes[0].metadata or {}).get("status") if nodes else None


def flow_writing_result(client, uid: str) -> bool:
    """A flow run is writing scan ``uid``'s result: status running, and not a provisional one
    (``serve --live`` writes those in its own process, possibly even after the last event if the
    stop document comes later)."""
    from xtec_flows.tiled.results import find_results

    nodes = find_results(client, uid, status=None)
    md = (nodes[0].metadata or {}) if nodes else {}
    return md.get("status") == "running" and not md.get("provisional")


def max_overlap(intervals) -> int:
    """Largest number of [start, end) intervals covering one instant."""
    events = []
    for start, end in intervals:
        events += [(start, 1), (end, -1)]
    best = current = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        current += step
        best = max(best, current)
    return best


def parse_time(text: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------------------------------
# a burst of scans from several acquisition processes (the load test and bench_flows.py)
# ---------------------------------------------------------------------------------------

_BURST_WRITER = """
import json, os, sys
import numpy as np
import bluesky.plans, bluesky_tiled_plugins, ophyd.sim  # imported before the start, as at a running end station
from tiled.client import from_uri
from xtec_flows.demo.beamline import run_temperature_scan
raw = from_uri(sys.argv[1], api_key=os.environ["TILED_API_KEY"])[sys.argv[2]]
seeds, n_temps, shape = json.loads(sys.argv[3]), int(sys.argv[4]), tuple(json.loads(sys.argv[5]))
temps = np.linspace(20.0, 300.0, n_temps)
if sys.argv[6] == "wait":  # connected and ready: wait for the common start
    print("ready", flush=True)
    sys.stdin.readline()
print(json.dumps([run_temperature_scan(raw, temps, spatial_shape=shape, seed=s) for s in seeds]))
"""


def write_burst(tiled_uri: str, api_key: str, writers: int = 2, per_writer: int = 10, seed0: int = 200,
                n_temps: int = 6, shape=(12, 12, 12), raw: str = "raw", env: dict | None = None,
                timeout: float = 600, together: bool = False) -> list[str]:
    """Scans from ``writers`` acquisition processes at once (RunEngine + TiledWriter each), as
    several end stations would; the key reaches them through the environment, ``env`` adds to it
    (a None value removes a variable). Returns the uids.

    ``together``: every process first starts, imports and connects, and only then do all begin
    their scans at one moment, so the burst's spread is that of the scans, not of interpreter
    start-up on a loaded machine.
    """
    import json
    import subprocess
    import sys
    import tempfile

    from xtec_flows.demo.services import child_env

    proc_env = child_env(TILED_API_KEY=api_key)
    for name, value in (env or {}).items():  # None removes a variable
        if value is None:
            proc_env.pop(name, None)
        else:
            proc_env[name] = str(value)
    # stderr to files: a writer's warnings must not fill a pipe nobody reads while it waits to start
    errs = [tempfile.TemporaryFile("w+") for _ in range(writers)]
    procs = [subprocess.Popen([sys.executable, "-c", _BURST_WRITER, tiled_uri, raw,
                               json.dumps(list(range(seed0 + per_writer * w, seed0 + per_writer * (w + 1)))),
                               str(n_temps), json.dumps(list(shape)), "wait" if together else "go"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errs[w], text=True,
                              env=proc_env)
             for w in range(writers)]

    def failure(proc, err) -> RuntimeError:
        err.seek(0)
        return RuntimeError(f"an acquisition process failed (exit code {proc.returncode}):\n{err.read()[-2000:]}")

    try:
        if together:
            for proc, err in zip(procs, errs):
                if proc.stdout.readline().strip() != "ready":
                    proc.wait(timeout=timeout)
                    raise failure(proc, err)
            for proc in procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()
        uids = []
        for proc, err in zip(procs, errs):
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise failure(proc, err)
            uids += json.loads(out.strip().splitlines()[-1])
    finally:
        for proc, err in zip(procs, errs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.close()
    return uids


def burst_outcome(client, prefect_api_url: str, uids, raw: str = "raw", results: str = "xtec",
                  timeout: float = 900) -> dict:
    """Wait for every scan's complete result; then what happened, from Tiled's and Prefect's records.

    Returns stops (stop-document times), latencies (stop -> result ``completed``, s), runs (every
    flow run of each scan, by uid), peak (most flow runs running at once), span (first stop ->
    last completion, s), throughput (scans per minute over the span).
    """
    from xtec_flows.tiled import watch

    # One paged listing of the results per poll, every 2 s: polling each scan's result by search
    # would itself load Tiled (a few requests per scan per poll) and slow what is being measured.
    wanted, completed = set(uids), {}
    deadline = time.monotonic() + timeout
    while set(completed) != wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no complete result for {sorted(wanted - set(completed))} within {timeout:.0f} s")
        root = tiled_io.walk(client, results)
        for node in root.values():
            md = node.metadata or {}
            uid = (md.get("source") or {}).get("uid")
            if uid in wanted and watch.state_of_metadata(md) == watch.DONE:
                completed[uid] = parse_time(md["completed"])
        if set(completed) != wanted:
            time.sleep(2.0)
    stops = {uid: float(client[raw][uid].metadata["stop"]["time"]) for uid in uids}
    runs = {uid: wait_until(lambda: (lambda rs: rs if rs and all(r["state_type"] in TERMINAL for r in rs) else None)(
        runs_for_scan(prefect_api_url, uid)), 120, interval=1.0, what=f"finished flow runs for {uid}") for uid in uids}
    intervals = [(parse_time(r["start_time"]), parse_time(r["end_time"]))
                 for rs in runs.values() for r in rs if r.get("start_time") and r.get("end_time")]
    span = max(completed.values()) - min(stops.values())
    return {"stops": stops, "latencies": [completed[u] - stops[u] for u in uids], "runs": runs,
            "peak": max_overlap(intervals), "span": span, "throughput": 60.0 * len(uids) / span}
