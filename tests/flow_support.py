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
from xtec_flows.io import tiled as tiled_io

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


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(interval)


def result_status(client, uid: str) -> str | None:
    from xtec_flows.results import find_results

    nodes = find_results(client, uid, status=None)
    return (nodes[0].metadata or {}).get("status") if nodes else None


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
