"""End to end through the real stack: RunEngine + TiledWriter -> Tiled -> watcher -> Prefect
deployment run -> result in Tiled, and every fault the post-scan service must survive.

One stack per module (Tiled, Prefect server and ``xtec-flows serve`` as subprocesses); the
tests run in order on one xdist worker and each uses its own scans.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import numpy as np
import psutil
import pytest
from flow_support import (
    TERMINAL,
    flow_writing_result,
    result_status,
    runs_for_scan,
    start_stack,
    wait_until,
)
from tiled_support import run_temperature_scan, scan_volumes, write_plain_array_node

from xtec_flows import cluster
from xtec_flows import tiled as tiled_io

pytestmark = [pytest.mark.slow]

TEMPS = np.linspace(20.0, 300.0, 12)
SHAPE = (16, 16, 16)
BIG = (64, 64, 64)  # long enough (a few seconds) to interrupt mid-run


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # --live: the follower of running scans runs beside the watcher in every test here; only scans
    # written event by event (batch_size=1) get provisional results.
    s = start_stack(tmp_path_factory.mktemp("flows"), serve_args=("--live", "--live-poll-seconds", "0.5"))
    yield s
    s.stop()


def _scan(stack, seed, temps=TEMPS, shape=SHAPE, **kw):
    return run_temperature_scan(stack.client()["raw"], temps, spatial_shape=shape, seed=seed, **kw)


def _finished_runs(stack, uid, n=1, timeout=120):
    """Wait until scan ``uid`` has n flow runs, all finished; return them."""
    def done():
        runs = runs_for_scan(stack.prefect.api_url, uid)
        return runs if len(runs) >= n and all(r["state_type"] in TERMINAL for r in runs) else None

    return wait_until(done, timeout, what=f"{n} finished flow run(s) for {uid}")


def _wait_complete(stack, uid, timeout=120):
    client = stack.client()
    wait_until(lambda: result_status(client, uid) == "complete", timeout, what=f"complete result for {uid}")


def _artifacts(api_url, flow_run_id):
    with httpx.Client(trust_env=False, timeout=10) as http:
        return http.post(f"{api_url}/artifacts/filter",
                         json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).json()


def test_one_scan_gives_one_flow_run_and_a_result_readable_elsewhere(stack, tmp_path):
    uid = _scan(stack, seed=1)
    _wait_complete(stack, uid, timeout=90)
    runs = _finished_runs(stack, uid)
    assert [r["state_type"] for r in runs] == ["COMPLETED"]
    assert runs[0]["parameters"]["scan_uid"] == uid
    assert "api_key" not in json.dumps(runs[0]["parameters"]).lower()

    kinds = {a["type"] for a in _artifacts(stack.prefect.api_url, runs[0]["id"])}
    assert {"progress", "markdown", "table", "image"} <= kinds
    progress = [a for a in _artifacts(stack.prefect.api_url, runs[0]["id"]) if a["type"] == "progress"]
    assert progress and progress[0]["data"] == 100.0

    # A plain tiled client in another process reads the labels back.
    code = (
        "import json, sys, numpy as np\n"
        "from tiled.client import from_uri\n"
        "from tiled.queries import Key\n"
        f"c = from_uri({stack.tiled.uri!r}, api_key={stack.api_key!r})\n"
        f"hits = c['xtec'].search(Key('source.uid') == {uid!r}).search(Key('status') == 'complete')\n"
        "node = hits.values().first()\n"
        "np.save(sys.argv[1], node['labels'].read())\n"
        "print(json.dumps(node.metadata['counts']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "labels.npy")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    labels = np.load(tmp_path / "labels.npy")
    # Same labels as the engine run in memory on the same volume with the same parameters.
    expected = cluster(scan_volumes(TEMPS, SHAPE, seed=1), TEMPS, n_components=3)
    np.testing.assert_array_equal(labels, np.asarray(expected.labels))
    assert json.loads(out.stdout) == [int(c) for c in expected.counts]


def test_serve_live_publishes_provisional_results_during_the_scan_then_the_final_one(stack):
    from tiled.queries import Key

    from xtec_flows.tiled.live import running_scans

    client = stack.client()
    seen = []  # (temperatures measured, temperatures the provisional result covers)
    uid_box = {}

    def results_of(uid):
        return list(client["xtec"].search(Key("source.uid") == uid).values())

    def after_point(i):
        n = i + 1
        if n < 3:
            return
        uid = uid_box.setdefault("uid", wait_until(lambda: running_scans(client["raw"]), 30, what="the running scan")[0])

        def provisional():
            for node in results_of(uid):
                md = node.metadata or {}
                if md.get("status") == "provisional" and md.get("n_temperatures_covered") == n:
                    return md
            return None

        md = wait_until(provisional, 60, interval=0.1, what=f"a provisional result of {n} temperatures")
        seen.append((n, len(md["temperatures_covered"])))

    uid = _scan(stack, seed=21, batch_size=1, after_point=after_point)
    assert uid == uid_box["uid"]
    assert seen == [(n, n) for n in range(3, len(TEMPS) + 1)]
    _wait_complete(stack, uid)
    runs = _finished_runs(stack, uid)
    assert [r["state_type"] for r in runs] == ["COMPLETED"]
    nodes = results_of(uid)
    assert len(nodes) == 1  # the final result replaced the provisional one under the same key
    md = nodes[0].metadata
    assert md["status"] == "complete" and not md.get("provisional") and md["attempt"] == 1
    expected = cluster(scan_volumes(TEMPS, SHAPE, seed=21), TEMPS, n_components=3)
    np.testing.assert_array_equal(nodes[0]["labels"].read(), np.asarray(expected.labels))


def _create_run(stack, deployment: str, parameters: dict) -> dict:
    """Create a flow run of ``deployment`` over Prefect's REST API, as an operator would.

    Retries a few times on 5xx / connection errors (the SQLite-backed server can answer
    'database is locked' under load); anything else fails with the server's answer.
    """
    api = stack.prefect.api_url
    last = None
    for attempt in range(6):
        try:
            with httpx.Client(trust_env=False, timeout=30) as http:
                dep = http.get(f"{api}/deployments/name/{deployment}")
                if dep.status_code < 500:
                    assert dep.status_code == 200, dep.text
                    resp = http.post(f"{api}/deployments/{dep.json()['id']}/create_flow_run",
                                     json={"parameters": parameters})
                    if resp.status_code < 500:
                        assert resp.status_code in (200, 201), resp.text
                        return resp.json()
                last = f"{dep.status_code} {dep.text[:300]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(2 + 2 * attempt)
    raise AssertionError(f"could not create a flow run of {deployment}: {last}")


def _wait_run(stack, run_id: str, timeout: float) -> dict:
    def finished():
        try:
            with httpx.Client(trust_env=False, timeout=10) as http:
                r = http.get(f"{stack.prefect.api_url}/flow_runs/{run_id}")
        except httpx.TransportError:
            return None
        if r.status_code != 200:
            return None
        body = r.json()
        return body if body.get("state_type") in TERMINAL else None

    return wait_until(finished, timeout, what=f"flow run {run_id} to finish")


def _run_post_scan(stack, parameters, timeout=180):
    """Start the post-scan deployment by hand (as an operator would) and wait for it to end."""
    run = _create_run(stack, "xtec-cluster-scan/post-scan", parameters)
    return _wait_run(stack, run["id"], timeout)


def test_flow_runs_on_an_existing_dask_cluster_given_by_address(stack):
    from distributed import LocalCluster

    vol = scan_volumes(TEMPS, SHAPE, seed=31)
    write_plain_array_node(stack.client(), "dask_series", vol, TEMPS)
    # Workers as threads of this test process, reachable over TCP by the flow-run process.
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None) as dask_cluster:
        before = dask_cluster.scheduler.transition_counter
        run = _run_post_scan(stack, {"scan_uid": "/dask_series", "dask_address": dask_cluster.scheduler_address})
        worked = dask_cluster.scheduler.transition_counter - before
    assert run["state_type"] == "COMPLETED", run["state"]
    assert worked > 0  # the chunk tasks ran on the given cluster
    uid = tiled_io.open_scan(stack.client(), "dask_series").uid
    node = tiled_io.walk(stack.client(), "xtec")[tiled_io.result_key(uid, _serve_params())]
    expected = cluster(vol, TEMPS, n_components=3)
    np.testing.assert_array_equal(node["labels"].read(), np.asarray(expected.labels))


def test_bad_parameters_fail_the_run_before_anything_is_written(stack):
    keys_before = set(tiled_io.walk(stack.client(), "xtec"))
    run = _run_post_scan(stack, {"scan_uid": "/dask_series", "parameters": {"n_components": 3, "mode": "x"}},
                         timeout=120)
    assert run["state_type"] == "FAILED"
    assert "mode" in run["state"]["message"]
    assert set(tiled_io.walk(stack.client(), "xtec")) == keys_before


def test_aborted_scan_is_skipped_and_logged(stack):
    uid = _scan(stack, seed=2, fail_at=4)
    assert stack.client()["raw"][uid].metadata["stop"]["exit_status"] == "fail"
    # Event + at least two catch-up periods (4 s each).
    time.sleep(10)
    assert runs_for_scan(stack.prefect.api_url, uid) == []
    # No result, or (serve --live saw its first events) a provisional one marked aborted.
    assert result_status(stack.client(), uid) in (None, "aborted")
    assert f"scan {uid} ended with exit_status 'fail'" in stack.serve.log_path.read_text()


def test_misfit_scan_fails_once_with_a_clear_message_and_no_retry_storm(stack):
    temps = TEMPS.copy()
    temps[5] = temps[4]  # two volumes at one temperature: not a temperature series
    uid = _scan(stack, seed=3, temps=temps)
    runs = _finished_runs(stack, uid)
    assert [r["state_type"] for r in runs] == ["FAILED"]
    node = tiled_io.walk(stack.client(), "xtec")[tiled_io.result_key(uid, _serve_params())]
    md = node.metadata
    assert md["status"] == "failed" and md["retryable"] is False
    assert "duplicates" in md["error"] and "distinct temperature" in md["error"]
    # The task was not retried (bad input) ...
    with httpx.Client(trust_env=False, timeout=10) as http:
        tasks = http.post(f"{stack.prefect.api_url}/task_runs/filter",
                          json={"flow_runs": {"id": {"any_": [runs[0]["id"]]}}}).json()
    cluster_tasks = [t for t in tasks if t["name"].startswith("cluster-and-write")]
    assert len(cluster_tasks) == 1 and cluster_tasks[0]["run_count"] == 1
    # ... and catch-up does not submit it again.
    time.sleep(10)
    assert len(runs_for_scan(stack.prefect.api_url, uid)) == 1


def _serve_params():
    from xtec_flows.engine import ClusterParams

    return ClusterParams(n_components=3).to_dict()


def _flow_processes(serve):
    return psutil.Process(serve.pid).children(recursive=True)


def test_flow_process_killed_mid_run_leaves_nothing_complete_and_catch_up_finishes(stack):
    client = stack.client()
    uid = _scan(stack, seed=7, shape=BIG)
    wait_until(lambda: flow_writing_result(client, uid), 60, interval=0.05, what="a flow writing the result")
    victims = _flow_processes(stack.serve)
    assert victims, "no flow-run process found under the serve process"
    for p in victims:
        p.kill()
    assert result_status(client, uid) != "complete"
    _wait_complete(stack, uid, timeout=180)
    runs = _finished_runs(stack, uid, n=2)
    # The killed attempt crashed; one new attempt (a new idempotency key) completed.
    assert sorted(r["state_type"] for r in runs) == ["COMPLETED", "CRASHED"]
    expected = cluster(scan_volumes(TEMPS, BIG, seed=7), TEMPS, n_components=3)
    labels = tiled_io.walk(client, "xtec")[tiled_io.result_key(uid, _serve_params())]["labels"].read()
    np.testing.assert_array_equal(labels, np.asarray(expected.labels))


def test_tiled_restart_during_a_flow_ends_complete(stack):
    client = stack.client()
    uid = _scan(stack, seed=8, shape=BIG)
    wait_until(lambda: flow_writing_result(client, uid), 60, interval=0.05, what="a flow writing the result")
    stack.tiled.kill()
    time.sleep(2)
    stack.tiled.start()
    _wait_complete(stack, uid, timeout=180)
    runs = _finished_runs(stack, uid)
    assert runs[-1]["state_type"] == "COMPLETED"
    assert sum(r["state_type"] == "COMPLETED" for r in runs) == 1


def test_scheduled_reprocessing_supersedes_older_results(stack):
    client = stack.client()
    params4 = {**_serve_params(), "n_components": 4}
    run = _create_run(stack, "xtec-reprocess/scheduled",
                      {"parameters": params4, "max_scans": 2, "which": "outdated"})
    assert _wait_run(stack, run["id"], 180)["state_type"] == "COMPLETED"
    xtec = tiled_io.walk(client, "xtec")
    new = wait_until(lambda: [n for n in xtec.values() if (n.metadata or {}).get("parameters", {}).get("n_components") == 4
                              and n.metadata.get("status") == "complete" and n.metadata.get("supersedes")]
                     if len([n for n in xtec.values() if (n.metadata or {}).get("supersedes")]) >= 2 else None,
                     240, what="two reprocessed results with supersedes")
    for node in new:
        for old_key in node.metadata["supersedes"]:
            old = xtec[old_key]
            assert old.metadata["superseded_by"] == node.path_parts[-1]
            assert old.metadata["status"] == "complete"  # kept, not deleted
    # Idempotent: running it again submits nothing for the scans already done.
    from xtec_flows.tiled import watch

    again = watch.select_for_reprocessing(client["raw"], xtec, params4, which="all")
    assert not {n.metadata["source"]["uid"] for n in new} & set(again)
