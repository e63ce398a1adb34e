"""The Tiled side of automatic processing (no Prefect): scan rules, result states, the watcher
(subscription, catch-up, polling fallback, failed submissions), reprocessing selection and
supersede records, against real Tiled servers and real bluesky runs."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
from flow_support import wait_until
from tiled_support import run_temperature_scan

from xtec_flows.tiled import results, watch
from xtec_flows.demo.services import TiledService
from xtec_flows import tiled as tiled_io
from xtec_flows.engine import ClusterParams
from xtec_flows.tiled.process import process_scan

TEMPS = np.linspace(20.0, 300.0, 8)
SHAPE = (12, 12, 12)
PARAMS = ClusterParams(n_components=3, n_init=1)


# ------------------------------------------------------------------------------ pure parts


def test_scan_rule_accepts_and_explains_rejections():
    start = {"uid": "u1", "plan_name": "list_scan", "sample": "CsV3Sb5", "nested": {"k": 1}}
    ok = {"start": start, "stop": {"exit_status": "success"}}
    assert watch.ScanRule().check(ok) is None
    assert watch.ScanRule(plan_names=("list_scan",), start_key="sample", start_value="CsV3Sb5").check(ok) is None
    assert watch.ScanRule(start_key="nested.k", start_value="1").check(ok) is None
    assert "no stop document" in watch.ScanRule().check({"start": start})
    assert "exit_status 'abort'" in watch.ScanRule().check({"start": start, "stop": {"exit_status": "abort"}})
    assert "ran plan 'list_scan'" in watch.ScanRule(plan_names=("grid_scan",)).check(ok)
    assert "no start-document key 'proposal'" in watch.ScanRule(start_key="proposal").check(ok)
    assert "not 'other'" in watch.ScanRule(start_key="sample", start_value="other").check(ok)
    assert "lacks required field(s) ['volume']" in watch.ScanRule(required_fields=("volume",)).check(ok, ["x"])
    with pytest.raises(TypeError, match="sequences of names"):
        watch.ScanRule(plan_names="list_scan")
    with pytest.raises(ValueError, match="needs start_key"):
        watch.ScanRule(start_value="x")


def test_stop_document_accepts_both_payload_shapes():
    stop = {"exit_status": "success"}
    assert watch.stop_document({"start": {}, "stop": stop}) == stop
    assert watch.stop_document({"metadata": {"start": {}, "stop": stop}}) == stop  # streaming-cache shape
    assert watch.stop_document({"start": {}}) is None


def test_cluster_params_from_dict_round_trips_and_refuses_unknown_names():
    p = ClusterParams(mode="s", n_components=3)
    assert ClusterParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match=r"unknown clustering parameter\(s\) \['k'\]"):
        ClusterParams.from_dict({"k": 3})
    with pytest.raises(ValueError, match="mode"):
        ClusterParams.from_dict({"mode": "x"})


def test_utc_timestamp():
    assert watch.utc_timestamp("1970-01-02") == 86400.0
    assert watch.utc_timestamp(5) == 5.0
    assert watch.utc_timestamp(None) is None
    with pytest.raises(ValueError, match="ISO date"):
        watch.utc_timestamp("yesterday")


# ------------------------------------------------------------------------ against Tiled


def _scan(raw, seed, **kw):
    return run_temperature_scan(raw, TEMPS, spatial_shape=SHAPE, seed=seed, **kw)


def test_result_states_and_scans_needing_results(containers):
    client, raw, root = containers
    done = _scan(raw, 1)
    todo = _scan(raw, 2)
    aborted = _scan(raw, 3, fail_at=2)
    other_plan = _scan(raw, 4, md={"sample": "B"})
    process_scan(client, f"{raw.path_parts[-1]}/{done}", PARAMS, root=root.path_parts[-1])
    params = PARAMS.to_dict()
    assert watch.result_state(root, tiled_io.result_key(done, params)) == watch.DONE
    assert watch.result_state(root, tiled_io.result_key(todo, params)) == watch.MISSING
    needing = watch.scans_needing_results(raw, root, params)
    assert needing == [todo, other_plan]  # oldest first; the aborted scan is never selected
    assert aborted not in needing
    assert watch.scans_needing_results(raw, root, params, watch.ScanRule(start_key="sample", start_value="B")) == [
        other_plan]
    # A rejected scan (bad input) is not "needing" any more; a transient failure still is.
    tiled_io.reject_scan(root, tiled_io.result_key(todo, params), {"uid": todo}, params, ValueError("bad"))
    assert watch.result_state(root, tiled_io.result_key(todo, params)) == watch.REJECTED
    assert watch.scans_needing_results(raw, root, params) == [other_plan]
    node = root.create_container(tiled_io.result_key(other_plan, params), metadata={"status": "running"})
    tiled_io.fail_result(node, ConnectionError("server went away"))
    assert node.metadata["retryable"] is True
    assert watch.result_state(root, node.path_parts[-1]) == watch.UNFINISHED
    assert watch.scans_needing_results(raw, root, params) == [other_plan]


def test_reprocessing_selection_and_supersede_records(containers):
    client, raw, root = containers
    a, b, c = (_scan(raw, s) for s in (5, 6, 7))
    rel_raw, rel_root = raw.path_parts[-1], root.path_parts[-1]
    for uid in (a, b):
        process_scan(client, f"{rel_raw}/{uid}", PARAMS, root=rel_root)
    new = ClusterParams(n_components=4, n_init=1)
    nd = new.to_dict()
    assert watch.select_for_reprocessing(raw, root, nd, which="outdated") == [a, b]
    assert watch.select_for_reprocessing(raw, root, nd, which="missing") == [c]
    assert watch.select_for_reprocessing(raw, root, nd, which="all") == [a, b, c]
    with pytest.raises(ValueError, match="which must be one of"):
        watch.select_for_reprocessing(raw, root, nd, which="old")
    out = process_scan(client, f"{rel_raw}/{a}", new, root=rel_root)
    older = results.mark_superseded(root, out.node)
    assert older == [tiled_io.result_key(a, PARAMS.to_dict())]
    assert root[older[0]].metadata["superseded_by"] == out.key
    assert root[out.key].metadata["supersedes"] == older
    assert watch.select_for_reprocessing(raw, root, nd, which="outdated") == [b]  # a is done: idempotent


class _Recorder:
    """A submit callable that records uids; can be told to fail (orchestrator down)."""

    def __init__(self):
        self.calls = []
        self.failing = False
        self.lock = threading.Lock()

    def __call__(self, uid):
        with self.lock:
            if self.failing:
                raise ConnectionError("orchestrator unreachable")
            self.calls.append(uid)


def _run_watcher(w):
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    return t


def test_watcher_submits_each_completed_scan_via_subscription_and_catches_up(containers):
    client, raw, root = containers
    before = _scan(raw, 8)  # completed before the watcher starts: found by the start-up catch-up
    rec = _Recorder()
    w = watch.ScanWatcher(raw, root, PARAMS.to_dict(), rec, reconcile_seconds=60, retry_seconds=0.5)
    t = _run_watcher(w)
    try:
        wait_until(lambda: before in rec.calls, 20, what="catch-up submission")
        assert w.stats.mode == "subscribed"
        new = _scan(raw, 9)
        wait_until(lambda: new in rec.calls, 20, what="event submission")  # long before the 60 s reconcile
        aborted = _scan(raw, 10, fail_at=1)
        wait_until(lambda: aborted in w.stats.skipped, 20, what="aborted scan skipped")
        assert "exit_status 'fail'" in w.stats.skipped[aborted]
        assert aborted not in rec.calls
        # Orchestrator down: the scan is kept and submitted once it is back.
        rec.failing = True
        late = _scan(raw, 11)
        wait_until(lambda: w.stats.submit_errors >= 1, 20, what="failed submission")
        rec.failing = False
        wait_until(lambda: late in rec.calls, 20, what="retried submission")
    finally:
        w.stop()
        t.join(10)
    assert not t.is_alive()
    assert rec.calls.count(new) == 1 and rec.calls.count(before) == 1


def test_watcher_catches_up_on_a_schedule_when_events_are_missed(containers):
    """A streaming cache can drop events without disconnecting: periodic catch-up finds the scan."""
    client, raw, root = containers
    rec = _Recorder()
    w = watch.ScanWatcher(raw, root, PARAMS.to_dict(), rec, reconcile_seconds=1.0)
    # Simulate a lost event: the callback ignores everything.
    w._on_metadata_updated = lambda update: None
    t = _run_watcher(w)
    try:
        wait_until(lambda: w.stats.mode == "subscribed", 20)
        uid = _scan(raw, 12)
        wait_until(lambda: uid in rec.calls, 20, what="reconcile submission")
        assert w.stats.events == 0 and w.stats.catch_ups >= 2
    finally:
        w.stop()
        t.join(10)


def test_watcher_polls_when_the_server_has_no_streaming_cache(tmp_path):
    srv = TiledService(tmp_path / "nocache", "pollkey1", streaming_cache=None).start()
    try:
        client = tiled_io.connect(srv.uri, "pollkey1")
        raw = client.create_container("raw")
        root = tiled_io.derived_root(client, "xtec")
        rec = _Recorder()
        w = watch.ScanWatcher(raw, root, PARAMS.to_dict(), rec, reconcile_seconds=1.0, subscribe_timeout=5)
        t = _run_watcher(w)
        try:
            wait_until(lambda: w.stats.mode == "polling", 30, what="polling mode")
            uid = _scan(raw, 13)
            wait_until(lambda: uid in rec.calls, 30, what="polled submission")
            time.sleep(2.5)  # more polls: the submit callable is idempotent, but the watcher
            # re-offers an unfinished scan only; here no result exists, so it is offered again.
            assert set(rec.calls) == {uid}
        finally:
            w.stop()
            t.join(15)
    finally:
        srv.stop()


# ------------------------------------------------------------------------ serve: bad input


def test_serve_refuses_bad_configuration_before_starting_anything(monkeypatch, capsys, tmp_path):
    from xtec_flows import cli

    monkeypatch.delenv("XTEC_FLOWS_TILED_URI", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert cli.main(["serve"]) == 2
    assert "--tiled-uri or XTEC_FLOWS_TILED_URI" in capsys.readouterr().err
    assert cli.main(["serve", "--tiled-uri", "http://127.0.0.1:9", "--api-key-file", str(tmp_path / "nokey")]) == 2
    assert "cannot read --api-key-file" in capsys.readouterr().err
    monkeypatch.delenv("PREFECT_API_URL")
    assert cli.main(["serve", "--tiled-uri", "http://127.0.0.1:9"]) == 2
    assert "set PREFECT_API_URL" in capsys.readouterr().err
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert cli.main(["serve", "--tiled-uri", "http://127.0.0.1:9?api_key=abc"]) == 2
    err = capsys.readouterr().err
    assert "must not carry an API key" in err and "abc" not in err
    assert cli.main(["serve", "--tiled-uri", "http://127.0.0.1:9", "--parameters", '{"k": 3}']) == 2
    assert "unknown clustering parameter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--tiled-uri", "http://127.0.0.1:9", "--parameters", "[1]"])


def test_serve_names_a_missing_raw_container(tiled_server):
    from xtec_flows_prefect.serve import ServeConfig, make_watcher

    cfg = ServeConfig(tiled_uri=tiled_server.uri, raw_path="no_such_container")
    with pytest.raises(ValueError, match="no container 'no_such_container'.*--raw-path"):
        make_watcher(cfg, client=tiled_server.client())


def test_serve_waits_out_a_prefect_server_that_does_not_answer(tiled_server, tmp_path):
    """systemd's After= orders start-up, not readiness, and a Prefect server restarts now and
    then: ``xtec-flows serve`` started while nothing answers at PREFECT_API_URL keeps trying with
    a backoff and a warning instead of exiting, and still stops at once on SIGTERM."""
    from xtec_flows.demo.services import ServeService, free_port

    raw = f"raw-{uuid.uuid4().hex[:8]}"
    tiled_server.client().create_container(raw)
    nobody = free_port()  # nothing listens there
    serve = ServeService(tmp_path / "serve", tiled_server.uri, tiled_server.api_key,
                         f"http://127.0.0.1:{nobody}/api",
                         args=["--raw-path", raw, "--root", f"xtec-{raw}", "--reprocess-cron", ""])
    serve.launch()
    try:
        def tried_three_times():
            assert serve.alive, f"serve exited instead of waiting for Prefect:\n{serve.log_tail()}"
            return serve.log_path.read_text().count("the Prefect server is unreachable") >= 3

        wait_until(tried_three_times, 90, what="three attempts to reach the Prefect server")
        assert serve.alive, serve.log_tail()
        text = serve.log_path.read_text()
        assert "registering deployments: the Prefect server is unreachable" in text
        assert "Traceback" not in text and "error:" not in text
        serve.stop(grace=10.0)
        assert serve.proc.returncode != -9, "serve did not stop within 10 s of SIGTERM"
    finally:
        serve.stop()
