"""``xtec-flows demo``: the whole chain on one machine, then everything stopped again.

1. an embedded Tiled server (SQLite catalog, local zarr storage, in-memory streaming cache)
   and a Prefect server (SQLite), both on 127.0.0.1;
2. ``xtec-flows serve``: the two deployments plus the scan watcher;
3. a simulated bluesky temperature scan (RunEngine + TiledWriter) into Tiled's ``raw``;
4. wait for the clustering result to appear in Tiled, automatically; report its URI, the
   cluster counts and where the maps are;
5. stop every process started here (also on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import signal
import time
from pathlib import Path

import numpy as np

from .. import tiled as tiled_io
from .services import PrefectService, ServeService, TiledService

log = logging.getLogger(__name__)

DEMO_TEMPERATURES_K = (20.0, 300.0)  # the synthetic crystal's Tc sits in between


def _terminate_on_sigterm():
    """Turn SIGTERM into KeyboardInterrupt so the `finally` clean-up runs."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def wait_for_result(client, uid: str, timeout: float, root: str = tiled_io.DEFAULT_ROOT, poll: float = 0.25):
    """The complete result node of scan ``uid`` once it exists (raises TimeoutError)."""
    from ..tiled.results import find_results

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = find_results(client, uid, root=root, status=None)
        for node in nodes:
            status = (node.metadata or {}).get("status")
            if status == "complete":
                return node
            if status == "failed" and (node.metadata or {}).get("retryable") is False:
                raise RuntimeError(f"the clustering of scan {uid} failed: {(node.metadata or {}).get('error')}")
        time.sleep(poll)
    raise TimeoutError(f"no complete result for scan {uid} within {timeout:.0f} s")


def wait_for_maps(maps_dir: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (maps_dir / "qmap.png").exists() and (maps_dir / "trajectories.png").exists():
            return True
        time.sleep(0.25)
    return False


def wait_for_flow_run(api_url: str, result_key: str, timeout: float) -> str | None:
    """Final state type of the cluster_scan flow run for a result key (its idempotency key base)."""
    import httpx

    keys = tiled_io.attempt_keys(result_key)
    deadline = time.monotonic() + timeout
    state = None
    with httpx.Client(trust_env=False, timeout=5.0) as http:
        while time.monotonic() < deadline:
            runs = http.post(f"{api_url}/flow_runs/filter",
                             json={"flow_runs": {"idempotency_key": {"any_": keys}}}).json()
            states = [r.get("state_type") for r in runs]
            if states and all(s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states):
                return states[-1]
            state = states[-1] if states else None
            time.sleep(0.25)
    log.warning("the flow run for %s has not finished (state %s)", result_key, state)
    return state


def run_demo(workdir: Path, shape=(24, 64, 64, 64), timeout: float = 300.0, n_components: int = 3) -> dict:
    """Run the demo in ``workdir`` (its ``stack`` folder is recreated); returns a summary dict."""
    from .beamline import run_temperature_scan

    if len(shape) != 4 or min(shape) < 2:
        raise ValueError(f"shape must be T,L,K,H with every size >= 2; got {shape}")
    workdir = Path(workdir).resolve()
    stack = workdir / "stack"
    if stack.exists():
        shutil.rmtree(stack)
    api_key = secrets.token_hex(16)
    tiled = TiledService(stack / "tiled", api_key)
    prefect = PrefectService(stack / "prefect")
    serve = None
    previous = _terminate_on_sigterm()
    try:
        log.info("starting Tiled and Prefect servers on 127.0.0.1 ...")
        # Both start in parallel: Prefect's migrations and Tiled's catalog init take ~10 s each.
        for svc in (tiled, prefect):
            svc.launch()
        for svc in (tiled, prefect):
            svc.wait_ready(svc.ready, svc.start_timeout)
        log.info("Tiled at %s, Prefect at %s", tiled.uri, prefect.api_url)

        client = tiled_io.connect(tiled.uri, api_key)
        from tiled.structures.core import Spec

        client.create_container("raw", specs=[Spec("CatalogOfBlueskyRuns", version="3.0")],
                                metadata={"description": "raw bluesky runs (TiledWriter)"})
        serve = ServeService(stack / "serve", tiled.uri, api_key, prefect.api_url,
                             args=["--raw-path", "raw", "-k", str(n_components), "--limit", "2",
                                   "--query-seconds", "1", "--reconcile-seconds", "30"])
        serve.start()
        log.info("xtec-flows serve is watching %s/raw", tiled.uri)

        temperatures = np.linspace(*DEMO_TEMPERATURES_K, shape[0])
        log.info("running a simulated %s temperature scan into Tiled ...", "x".join(map(str, shape)))
        uid = run_temperature_scan(client["raw"], temperatures, spatial_shape=shape[1:], seed=0,
                                   md={"sample": "demo-crystal", "purpose": "xtec-flows demo"})
        stop = client["raw"][uid].metadata["stop"]
        log.info("scan %s finished; waiting for its clustering result ...", uid)
        node = wait_for_result(client, uid, timeout)
        md = node.metadata
        latency = _iso_seconds(md["completed"]) - float(stop["time"])
        flow_state = wait_for_flow_run(prefect.api_url, node.path_parts[-1], 60)
        maps = serve.directory / "maps" / node.path_parts[-1]
        if not wait_for_maps(maps, 60):
            log.warning("the maps did not appear in %s (see %s)", maps, serve.log_path)
        # Keep the maps after the stack folder is gone.
        kept = workdir / "maps"
        if maps.exists():
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(maps, kept)
        return {
            "scan": uid,
            "stop_time": time.strftime("%H:%M:%S", time.localtime(float(stop["time"]))),
            "latency": latency,
            "result_uri": f"{tiled.uri}/api/v1/metadata{tiled_io.node_path(node)}",
            "root": tiled_io.DEFAULT_ROOT,
            "key": node.path_parts[-1],
            "n_components": md.get("n_components"),
            "counts": md.get("counts"),
            "mode": (md.get("parameters") or {}).get("mode"),
            "maps": str(kept),
            "logs": str(stack),
            "flow_run_state": flow_state,
        }
    finally:
        for svc in (serve, prefect, tiled):
            if svc is not None:
                svc.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        log.info("stopped every process the demo started")


def _iso_seconds(text: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(text).timestamp()
