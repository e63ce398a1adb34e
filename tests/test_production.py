"""Production tier: deploy/ run as written on PostgreSQL + Redis + a Dask cluster.

Marker ``production``; skipped with a message when PostgreSQL or redis-server is missing, unless
XTEC_FLOWS_REQUIRE_SERVICES=1 (set by .ci/run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from flow_support import TERMINAL, max_overlap, parse_time, result_status, runs_for_scan, wait_until
from production_support import require_services, start_production_serve, start_production_stack
from tiled_support import run_temperature_scan, scan_volumes

from xtec_flows import cluster
from xtec_flows.io import tiled as tiled_io

pytestmark = [pytest.mark.production, pytest.mark.slow]

TEMPS = np.linspace(20.0, 300.0, 12)
SHAPE = (16, 16, 16)
LIMIT = 2


@pytest.fixture(scope="module")
def prod(tmp_path_factory):
    require_services()
    stack = start_production_stack(tmp_path_factory.mktemp("production"), limit=LIMIT)
    yield stack
    stack.stop()


def _scan(prod, seed, shape=SHAPE, **kw):
    return run_temperature_scan(prod.writer()["raw"], TEMPS, spatial_shape=shape, seed=seed, **kw)


def _complete(prod, uid, timeout=180):
    client = prod.plugin()
    wait_until(lambda: result_status(client, uid) == "complete", timeout, what=f"complete result for {uid}")


def _runs(prod, uid, n=1, timeout=120):
    def done():
        runs = runs_for_scan(prod.prefect.api_url, uid)
        return runs if len(runs) >= n and all(r["state_type"] in TERMINAL for r in runs) else None

    return wait_until(done, timeout, what=f"finished flow runs for {uid}")


def _expected_labels(seed):
    return np.asarray(cluster(scan_volumes(TEMPS, SHAPE, seed=seed), TEMPS, n_components=3).labels)


def test_scan_to_result_on_the_production_stack(prod, tmp_path):
    uid = _scan(prod, seed=1)
    _complete(prod, uid)
    assert [r["state_type"] for r in _runs(prod, uid)] == ["COMPLETED"]
    # The clustering ran on the Dask workers started the way deploy/ says.
    worker_logs = " ".join(w.log_path.read_text(errors="replace") for w in prod.workers)
    assert "Registered to" in worker_logs
    # A plain tiled client in another process reads the result with the plugin's key.
    code = (
        "import sys, numpy as np\n"
        "from tiled.client import from_uri\n"
        "from tiled.queries import Key\n"
        f"c = from_uri({prod.tiled.uri!r}, api_key={prod.plugin_key!r})\n"
        f"node = c['xtec'].search(Key('source.uid') == {uid!r}).values().first()\n"
        "np.save(sys.argv[1], node['labels'].read())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "l.npy")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), _expected_labels(1))


def test_unauthenticated_requests_are_refused(prod):
    import httpx

    with httpx.Client(trust_env=False, timeout=10) as http:
        assert http.get(f"{prod.tiled.uri}/api/v1/metadata/raw").status_code == 401
        assert http.get(f"{prod.tiled.uri}/api/v1/metadata/raw",
                        headers={"Authorization": "Apikey wrongkey"}).status_code == 401


_WRITER = """
import json, sys
import numpy as np
from tiled.client import from_uri
from xtec_flows.demo.beamline import run_temperature_scan
raw = from_uri(sys.argv[1], api_key=sys.argv[2])["raw"]
seeds = json.loads(sys.argv[3])
temps = np.linspace(20.0, 300.0, 6)
print(json.dumps([run_temperature_scan(raw, temps, spatial_shape=(12, 12, 12), seed=s) for s in seeds]))
"""


@pytest.mark.load
def test_twenty_scans_within_a_minute_each_processed_once_within_the_limit(prod):
    # Two acquisition processes (two end stations), ten small scans each, while the first
    # results are already being computed.
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, prod.tiled.uri, prod.writer_key,
                                 json.dumps(list(range(200 + 10 * w, 210 + 10 * w)))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(2)]
    uids = []
    for w in writers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-2000:]
        uids += json.loads(out.strip().splitlines()[-1])
    assert len(set(uids)) == 20
    raw = prod.writer()["raw"]
    stops = [float(raw[u].metadata["stop"]["time"]) for u in uids]
    for uid in uids:
        _complete(prod, uid, timeout=600)
    assert max(stops) - min(stops) < 60, f"the 20 scans took {max(stops) - min(stops):.0f} s to complete"
    intervals = []
    for uid in uids:
        runs = _runs(prod, uid)
        assert [r["state_type"] for r in runs] == ["COMPLETED"], uid
        intervals.append((parse_time(runs[0]["start_time"]), parse_time(runs[0]["end_time"])))
    assert max_overlap(intervals) <= LIMIT
    keys = list(tiled_io._walk(prod.plugin(), "xtec"))
    assert len(keys) == len(set(keys))
    tiled_log = prod.tiled.log_path.read_text(errors="replace")
    assert " 500 " not in tiled_log and "Internal Server Error" not in tiled_log


def test_redis_restart_while_subscribed_loses_no_scan(prod):
    """Tiled refuses writes while its streaming cache is down; the acquisition's client retries
    (tiled's defaults) bridge a short restart. The scan's events may be lost; the periodic
    catch-up must still find it."""
    prod.redis.kill()
    writer = subprocess.Popen([sys.executable, "-c", _WRITER.replace("(12, 12, 12)", "(16, 16, 16)"),
                               prod.tiled.uri, prod.writer_key, json.dumps([31])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={k: v for k, v in os.environ.items() if not k.startswith("TILED_RETRY")})
    time.sleep(4)  # the scan starts while Redis is down
    prod.redis.start()
    out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err[-2000:]
    (uid,) = json.loads(out.strip().splitlines()[-1])
    _complete(prod, uid, timeout=180)
    assert [r["state_type"] for r in _runs(prod, uid)] == ["COMPLETED"]
    after = _scan(prod, seed=32)  # and events flow again afterwards
    _complete(prod, after, timeout=180)


def test_serve_killed_and_restarted_processes_each_scan_once(prod):
    uid = _scan(prod, seed=41)
    prod.serve.kill()  # SIGKILL of the whole serve process group, flow runs included
    prod.serve = start_production_serve(prod, limit=LIMIT)
    _complete(prod, uid, timeout=300)
    keys = [k for k in tiled_io._walk(prod.plugin(), "xtec")
            if k == tiled_io.result_key(uid, json.loads(json.dumps(_params())))]
    assert len(keys) == 1
    runs = wait_until(lambda: (lambda rs: rs if any(r["state_type"] == "COMPLETED" for r in rs)
                               and all(r["state_type"] in TERMINAL for r in rs) else None)(
        runs_for_scan(prod.prefect.api_url, uid)), 120, what="the scan's flow runs to finish")
    assert sum(r["state_type"] == "COMPLETED" for r in runs) == 1


def _params():
    from xtec_flows.pipeline import ClusterParams

    return ClusterParams(n_components=3).to_dict()


BIG = (48, 48, 48)


def _expected_big(seed):
    return np.asarray(cluster(scan_volumes(TEMPS, BIG, seed=seed), TEMPS, n_components=3).labels)


def _labels(prod, uid):
    return tiled_io._walk(prod.plugin(), "xtec")[tiled_io.result_key(uid, _params())]["labels"].read()


def test_dask_worker_killed_mid_clustering_still_gives_identical_labels(prod):
    client = prod.plugin()
    uid = _scan(prod, seed=51, shape=BIG)
    wait_until(lambda: result_status(client, uid) == "running", 120, interval=0.05, what="result running")
    victim = prod.workers[0]
    victim.kill()
    try:
        _complete(prod, uid, timeout=300)
    finally:
        victim.start()  # back to two workers for the next tests
    np.testing.assert_array_equal(_labels(prod, uid), _expected_big(51))


def test_catalog_connections_terminated_during_a_result_write_end_complete(prod):
    client = prod.plugin()
    uid = _scan(prod, seed=61, shape=BIG)
    wait_until(lambda: result_status(client, uid) == "running", 120, interval=0.05, what="result running")
    killed = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # several rounds, so some land inside the writes
        killed += prod.databases.terminate_connections(prod.catalog_db)
        time.sleep(0.2)
    assert killed > 0
    _complete(prod, uid, timeout=300)
    np.testing.assert_array_equal(_labels(prod, uid), _expected_big(61))


def test_no_key_appears_in_logs_parameters_artifacts_or_metadata(prod):
    import httpx

    secrets_ = [prod.plugin_key, prod.writer_key]
    texts = {}
    for proc in [prod.serve, prod.tiled, prod.prefect, prod.scheduler, *prod.workers]:
        texts[proc.name] = proc.log_path.read_text(errors="replace")
    api = prod.prefect.api_url
    with httpx.Client(trust_env=False, timeout=30) as http:
        texts["flow runs"] = json.dumps(http.post(f"{api}/flow_runs/filter", json={"limit": 200}).json())
        texts["deployments"] = json.dumps(http.post(f"{api}/deployments/filter", json={}).json())
        texts["artifacts"] = json.dumps(http.post(f"{api}/artifacts/filter", json={"limit": 200}).json())
        texts["logs"] = json.dumps(http.post(f"{api}/logs/filter", json={"limit": 200}).json())
    client = prod.plugin()
    texts["tiled metadata"] = json.dumps([node.metadata for node in tiled_io._walk(client, "xtec").values()],
                                         default=str)
    for where, text in texts.items():
        for key in secrets_:
            assert key not in text, f"an API key appears in {where}"
