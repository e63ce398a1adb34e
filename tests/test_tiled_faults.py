"""Tiled fault injection: read-only server, server killed mid-write, bad API keys, foreign reader.

Every Tiled server here is a child process (``tiled serve catalog``, see ``tiled_subprocess``)
on a free port with its own temporary directories, started and stopped (always, in fixture
teardown) by these tests. In-process apps are avoided on purpose: Tiled apps in one Python
process share one settings object, and a server that must be SIGKILLed or restarted read-only
on the same directories is most honestly a separate process.

What every test checks: the error is clear and bounded in time, no API key leaks into it, and
nothing partial is ever visible as a ``complete`` result.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import httpx
import numpy as np
import pytest

import xtec_flows
from tiled_subprocess import SubprocessTiledServer, child_env
from tiled_support import scan_volumes, write_plain_array_node
from xtec_flows import cli
from xtec_flows.tiled import results
from xtec_flows import tiled as tiled_io
from xtec_flows.tiled import results as tiled_results
from xtec_flows.engine import ClusterParams
from xtec_flows.tiled.process import process_scan

TEMPS = [20.0, 60.0, 100.0, 130.0, 150.0, 170.0, 220.0, 300.0]
SHAPE = (16, 16, 16)
PARAMS = ClusterParams(n_components=3, n_init=1)
CLI_PARAMS = ["-k", "3", "--n-init", "1", "--quiet"]  # the same parameters as PARAMS, from the CLI
API_KEY = "FaultsKey9x7"  # alphanumeric (tiled requirement), distinctive so leaks are easy to spot
WRONG_KEY = "WrongKey4242q"
# Retry budget for these tests (tiled reads TILED_RETRY_* at import; the module globals are read at
# every request, so the fixture below patches them too).
RETRY_ATTEMPTS, RETRY_TIMEOUT = 2, 3.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    import tiled.client.utils as tcu

    monkeypatch.setattr(tcu, "TILED_RETRY_ATTEMPTS", RETRY_ATTEMPTS)
    monkeypatch.setattr(tcu, "TILED_RETRY_TIMEOUT", RETRY_TIMEOUT)
    monkeypatch.setenv("TILED_RETRY_ATTEMPTS", str(RETRY_ATTEMPTS))
    monkeypatch.setenv("TILED_RETRY_TIMEOUT", str(RETRY_TIMEOUT))
    monkeypatch.delenv("TILED_API_KEY", raising=False)


@pytest.fixture
def new_server(tmp_path):
    """Factory of subprocess servers in this test's tmp dir; every one is stopped at teardown."""
    made: list[SubprocessTiledServer] = []

    def make(name: str = "srv") -> SubprocessTiledServer:
        srv = SubprocessTiledServer(tmp_path / name, API_KEY)
        made.append(srv)
        return srv

    try:
        yield make
    finally:
        for srv in made:
            srv.stop()
        assert not any(s.alive for s in made)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One writable subprocess server for the tests that do not break it."""
    srv = SubprocessTiledServer(tmp_path_factory.mktemp("faults_shared"), API_KEY)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@functools.lru_cache(maxsize=None)
def _expected(seed: int) -> np.ndarray:
    vol = scan_volumes(TEMPS, SHAPE, seed=seed)
    labels = xtec_flows.engine.run(vol, np.asarray(TEMPS), PARAMS).labels[...]
    return np.asarray(labels, dtype=np.int8)


def expected_labels(seed: int) -> np.ndarray:
    return _expected(seed).copy()


def write_scan(client, key: str, seed: int) -> str:
    """A plain 4-D array node (T, L, K, H) with temperatures in its metadata; returns its uid."""
    uid = f"faults-{key}-{uuid.uuid4().hex[:8]}"
    write_plain_array_node(client, key, scan_volumes(TEMPS, SHAPE, seed=seed), TEMPS, metadata={"uid": uid})
    return uid


def all_results(client, uid):
    """Every result node of the scan, whatever its status."""
    return results.find_results(client, uid, status=None)


def run_cli_subprocess(args, *, api_key=None, timeout=120):
    """``python -m xtec_flows.cli ARGS`` in a fresh process (real exit code, real stderr)."""
    env = child_env(TILED_RETRY_ATTEMPTS=str(RETRY_ATTEMPTS), TILED_RETRY_TIMEOUT=str(RETRY_TIMEOUT),
                    PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if api_key is not None:
        env["TILED_API_KEY"] = api_key
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "xtec_flows.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)
    return proc, time.monotonic() - t0


def assert_no_key(text: str, *keys: str) -> None:
    for k in keys:
        assert k not in text, f"API key {k!r} leaked into: {text!r}"


def test_cli_defaults_equal_params():
    """The CLI runs below use the same result key as PARAMS (so 'one result per key' is checkable)."""
    args = cli.build_parser().parse_args(["cluster", "--tiled-uri", "http://x", "--scan", "s", *CLI_PARAMS])
    assert cli._params_from(args, args.n_components).to_dict() == PARAMS.to_dict()


# --------------------------------------------------------------------------------------------- 1. read-only


def test_read_only_server_reads_but_never_shows_a_complete_result(new_server):
    srv = new_server("ro").start()
    uid = write_scan(srv.client(), "scan_ro", seed=11)
    srv.stop()
    srv.start(writable=False)  # same catalog and data dirs; no --write: "served as read-only"
    assert "read-only" in srv.log_tail(200)
    c = srv.client()

    # reading works
    scan = tiled_io.open_scan(c, "scan_ro")
    assert scan.uid == uid
    np.testing.assert_array_equal(scan.temperatures, TEMPS)
    np.testing.assert_array_equal(scan.volume.compute(), scan_volumes(TEMPS, SHAPE, seed=11))

    # processing fails clearly (405: data cannot be written) and quickly (4xx is not retried)
    t0 = time.monotonic()
    with pytest.raises(httpx.HTTPStatusError) as ei:
        process_scan(c, "scan_ro", PARAMS)
    assert time.monotonic() - t0 < 30
    msg = str(ei.value)
    assert ei.value.response.status_code == 405 and "cannot be written" in msg
    assert_no_key(msg, API_KEY)

    # the result container was created (metadata writes are allowed) but says "failed", with the error
    nodes = all_results(c, uid)
    assert len(nodes) == 1
    md = nodes[0].metadata
    assert md["status"] == "failed", dict(md)
    assert "405" in md["error"] and "cannot be written" in md["error"]
    assert_no_key(json.dumps(dict(md)), API_KEY)
    assert "labels" not in nodes[0]  # no partial data node
    assert results.latest_result(c, uid) is None
    assert results.find_results(c, uid, status="complete") == []

    # the CLI, in a fresh process: exit code 2, a one-line reason, no traceback, no key
    proc, elapsed = run_cli_subprocess(["cluster", "--tiled-uri", srv.uri, "--scan", "scan_ro", *CLI_PARAMS],
                                       api_key=API_KEY)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "xtec-flows cluster: error:" in proc.stderr and "405" in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert_no_key(proc.stdout + proc.stderr, API_KEY)
    assert elapsed < 60

    # the retry replaced the failed result (same key) instead of adding another; still not complete
    nodes = all_results(c, uid)
    assert len(nodes) == 1 and nodes[0].metadata["status"] == "failed"
    assert results.latest_result(c, uid) is None


# --------------------------------------------------------------------------------------------- 2. server dies


def test_server_killed_mid_write_then_rerun_completes(new_server, monkeypatch, capsys):
    srv = new_server("kill").start()
    uid = write_scan(srv.client(), "scan_kill", seed=12)
    c = srv.client()
    key = tiled_io.result_key(uid, PARAMS.to_dict())
    original = tiled_io.write_labels_array
    killed = []

    def write_labels_then_kill_server(node, labels, dims, key="labels"):
        arr = original(node, labels, dims, key=key)  # the labels reach the server...
        srv.kill()  # ...then it goes away before the other arrays and the 'complete' status
        killed.append(time.monotonic())
        return arr

    monkeypatch.setattr(tiled_results, "write_labels_array", write_labels_then_kill_server)
    with pytest.raises(httpx.HTTPError) as ei:
        process_scan(c, "scan_kill", PARAMS)
    assert killed, "the fault was not injected"
    assert time.monotonic() - killed[0] < 20, "client retries were not bounded"
    assert isinstance(ei.value, httpx.TransportError), repr(ei.value)  # connection refused / closed
    assert str(ei.value)
    assert_no_key(str(ei.value), API_KEY)
    monkeypatch.setattr(tiled_results, "write_labels_array", original)

    # while the server is down the CLI says so, quickly, without a traceback
    t0 = time.monotonic()
    rc = cli.main(["results", srv.uri, uid, "--api-key", API_KEY])
    err = capsys.readouterr().err
    assert rc == 2 and time.monotonic() - t0 < 20
    assert "error:" in err and "Traceback" not in err
    assert_no_key(err, API_KEY)

    # restart on the same directories: the dead worker's result is left 'running', never 'complete'
    srv.start()
    c = srv.client()
    stale = all_results(c, uid)
    assert [n.path_parts[-1] for n in stale] == [key]
    assert stale[0].metadata["status"] == "running"  # fail_result could not reach the dead server
    assert results.latest_result(c, uid) is None

    # a failure that is not the server's: the result is marked failed with the error
    def write_labels_then_fail(node, labels, dims, key="labels"):
        original(node, labels, dims, key=key)
        raise RuntimeError("injected failure after the labels were written")

    monkeypatch.setattr(tiled_results, "write_labels_array", write_labels_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        process_scan(c, "scan_kill", PARAMS)
    monkeypatch.setattr(tiled_results, "write_labels_array", original)
    nodes = all_results(c, uid)
    assert [n.path_parts[-1] for n in nodes] == [key]  # replaced the 'running' one, not added
    assert nodes[0].metadata["status"] == "failed"
    assert "injected failure" in nodes[0].metadata["error"]
    assert results.latest_result(c, uid) is None

    # the re-run replaces the stale result and completes it
    out = process_scan(c, "scan_kill", PARAMS)
    assert out.status == "complete" and not out.reused and out.key == key
    nodes = all_results(c, uid)
    assert [n.path_parts[-1] for n in nodes] == [key]
    node = nodes[0]
    assert node.metadata["status"] == "complete"
    assert "error" not in node.metadata  # a fresh container, not the failed one patched
    assert sorted(node) == sorted(["labels", "means", "variances", "temperatures", "counts", "weights",
                                   "histogram_edges", "histogram_counts"])
    np.testing.assert_array_equal(node["labels"].read(), expected_labels(12))
    assert node["means"].shape == (3, len(TEMPS))
    assert results.latest_result(c, uid).path_parts[-1] == key
    # and once complete, it is reused, not recomputed
    assert process_scan(c, "scan_kill", PARAMS).reused


# --------------------------------------------------------------------------------------------- 3. API keys


@pytest.fixture(scope="module")
def keyed_scan(shared_server):
    return "scan_keys", write_scan(shared_server.client(), "scan_keys", seed=13)


@pytest.mark.parametrize("case", ["wrong", "missing", "wrong-in-uri"])
def test_bad_api_key_fails_fast_and_never_leaks(shared_server, keyed_scan, case, capsys, caplog):
    path, uid = keyed_scan
    uri, key = shared_server.uri, {"wrong": WRONG_KEY, "missing": None, "wrong-in-uri": None}[case]
    if case == "wrong-in-uri":
        uri = f"{uri}/api/v1?api_key={WRONG_KEY}"

    t0 = time.monotonic()
    with pytest.raises(Exception) as ei:
        tiled_io.connect(uri, key)
    assert time.monotonic() - t0 < 10, "a bad key must not be retried for tens of seconds"
    msg = str(ei.value)
    assert ("401" in msg or "API key" in msg), msg
    assert_no_key(msg + repr(ei.value), WRONG_KEY, API_KEY)

    t0 = time.monotonic()
    with caplog.at_level("DEBUG", logger="xtec_flows"), pytest.raises(Exception) as ei:
        process_scan(uri, path, PARAMS, api_key=key)
    assert time.monotonic() - t0 < 10
    assert_no_key(str(ei.value) + repr(ei.value) + caplog.text, WRONG_KEY, API_KEY)

    for argv in (["cluster", "--tiled-uri", uri, "--scan", path, *CLI_PARAMS], ["results", uri, uid]):
        if key is not None:
            argv += ["--api-key", key]
        t0 = time.monotonic()
        rc = cli.main(argv)
        out = capsys.readouterr()
        assert rc == 2, out
        assert time.monotonic() - t0 < 10
        assert "error:" in out.err and "Traceback" not in out.err
        assert ("401" in out.err or "API key" in out.err), out.err
        assert out.out == ""
        assert_no_key(out.out + out.err, WRONG_KEY, API_KEY)

    # nothing was written for this scan
    c = shared_server.client()
    assert all_results(c, uid) == []


# --------------------------------------------------------------------------------------------- 4. other process


READER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import numpy as np
    from tiled.client import from_uri
    from tiled.queries import Key

    uri, uid = sys.argv[1], sys.argv[2]
    c = from_uri(uri, api_key=os.environ["XTEC_TEST_READER_KEY"])
    hits = c["xtec"].search(Key("source.uid") == uid)
    out = []
    for key, node in hits.items():
        labels = node["labels"].read()
        values, counts = np.unique(labels, return_counts=True)
        out.append({
            "key": key,
            "status": node.metadata["status"],
            "shape": list(labels.shape),
            "dtype": str(labels.dtype),
            "sha256": hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest(),
            "unique": values.tolist(),
            "unique_counts": counts.tolist(),
            "counts": node["counts"].read().tolist(),
        })
    print(json.dumps(out))
    """
)


def test_results_read_back_in_a_separate_process(shared_server):
    c = shared_server.client()
    uid = write_scan(c, "scan_reader", seed=14)
    outcome = process_scan(c, "scan_reader", PARAMS)
    assert outcome.status == "complete"

    env = child_env(XTEC_TEST_READER_KEY=shared_server.api_key, TILED_RETRY_ATTEMPTS=str(RETRY_ATTEMPTS),
                    TILED_RETRY_TIMEOUT=str(RETRY_TIMEOUT))
    proc = subprocess.run([sys.executable, "-c", READER, shared_server.uri, uid], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(docs) == 1, docs
    doc = docs[0]

    expected = expected_labels(14)
    values, counts = np.unique(expected, return_counts=True)
    assert doc["key"] == outcome.key and doc["status"] == "complete"
    assert doc["shape"] == list(SHAPE) and doc["dtype"] == "int8"
    assert doc["sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()
    assert doc["unique"] == values.tolist() and doc["unique_counts"] == counts.tolist()
    assert set(doc["unique"]) <= {-1, 0, 1, 2} and len([v for v in doc["unique"] if v >= 0]) == 3
    assert doc["counts"] == [int((expected == k).sum()) for k in range(3)]


def test_storage_left_by_a_rolled_back_write_does_not_poison_the_result_key(tmp_path):
    """A dropped catalog connection between tiled's ``init_storage`` and its commit leaves an array
    directory no node owns; before the guard (xtec_flows/tiled/server.py) every later write at that
    path failed with 500 and the scan never completed. Here the embedded default (a real ``tiled
    serve config``) starts with that leftover where the result's labels and means go."""
    from tiled.client import from_uri

    from xtec_flows.demo.services import TiledService
    from xtec_flows.tiled.server import storage_directory
    from xtec_flows.tiled.spec import result_key
    from tiled_support import run_temperature_scan

    srv = TiledService(tmp_path / "tiled", API_KEY).start()
    try:
        client = from_uri(srv.uri, api_key=API_KEY)
        uid = run_temperature_scan(client.create_container("raw"), TEMPS, spatial_shape=SHAPE, seed=4)
        key = result_key(uid, PARAMS.to_dict())
        import zarr

        leftovers = [storage_directory((tmp_path / "tiled" / "data").resolve().as_uri(), ["xtec", key, name])
                     for name in ("labels", "means")]
        for directory in leftovers:
            zarr.create_array(zarr.storage.LocalStore(str(directory)), shape=(3,), chunks=(3,), dtype="f8")
        outcome = process_scan(client, f"raw/{uid}", PARAMS, root="xtec")
        node = client["xtec"][outcome.key]
        assert outcome.key == key and node.metadata["status"] == "complete"
        expected = xtec_flows.cluster(scan_volumes(TEMPS, SHAPE, seed=4), TEMPS, n_components=3, n_init=1)
        np.testing.assert_array_equal(node["labels"].read(), np.asarray(expected.labels))
        assert node["means"].read().shape == (3, len(TEMPS))
        assert "rolled back" in srv.log_path.read_text()
    finally:
        srv.stop()
