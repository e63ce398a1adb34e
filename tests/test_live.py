"""Provisional results while a scan runs (xtec_flows.tiled.live), on a real Tiled server.

Scans go through a real RunEngine into TiledWriter with ``batch_size=1`` (each event written
as it is measured); ``after_point`` pauses the scan between temperatures, which is where the
tests look at what Tiled serves.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tiled_support import run_temperature_scan
from xtec_flows import tiled as tiled_io
from xtec_flows.engine import ClusterParams
from xtec_flows.numerics.relabel import matching_permutation, rename
from xtec_flows.numerics.mixture import MixtureParams
from xtec_flows.tiled.live import LiveFollower, provisional_params, running_scans, warm_start
from xtec_flows.tiled.process import process_scan

TEMPS = np.linspace(20.0, 200.0, 10)


def _result_md(root, key) -> dict:
    """The result's metadata, {} while there is none (or it is being replaced by a newer update)."""
    try:
        return root[key].metadata or {}
    except KeyError:
        return {}


def _wait(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_matching_permutation_undoes_a_renaming_and_keeps_unlabelled_voxels():
    rng = np.random.default_rng(3)
    previous = rng.integers(-1, 4, size=(8, 9, 10))
    swap = np.array([2, 0, 3, 1])
    relabelled = np.where(previous >= 0, swap[np.maximum(previous, 0)], -1)
    order = matching_permutation(relabelled, previous, 4)
    assert np.array_equal(rename(relabelled, order), previous)
    with pytest.raises(ValueError, match="differ in size"):
        matching_permutation(relabelled[:2], previous, 4)


def test_provisional_parameters_fall_back_to_fixed_k_below_what_class_discovery_needs():
    auto = ClusterParams(classes="auto", max_components=6)
    early = provisional_params(auto, 5)
    assert early.classes is None and early.n_components == 4
    late = provisional_params(auto, 8)
    assert late.classes == "auto" and late.stability_runs == 0
    fixed = ClusterParams(n_components=3)
    assert provisional_params(fixed, 3) is fixed


def test_a_warm_start_extends_the_previous_mixture_and_is_skipped_when_the_components_change():
    previous = MixtureParams(np.array([0.5, 0.5, 0.0]), np.arange(12.0).reshape(3, 4), np.ones((3, 4)))
    fixed = ClusterParams(n_components=3)
    warm = warm_start(previous, 6, fixed)
    assert warm.means.shape == (3, 6) and np.array_equal(warm.means[:, 4:], np.repeat(previous.means[:, 3:], 2, 1))
    assert (warm.weights > 0).all() and (warm.variances > 0).all()  # an emptied component may fill again
    assert warm_start(None, 6, fixed) is None
    assert warm_start(previous, 6, ClusterParams(n_components=4)) is None
    assert warm_start(previous, 3, fixed) is None  # fewer temperatures than it was fitted on
    # classes="auto" fits max_components: the early 4-component fit does not carry over
    assert warm_start(previous, 9, ClusterParams(classes="auto", max_components=6)) is None


def test_provisional_results_grow_during_the_scan_and_the_final_result_replaces_them(containers):
    client, raw, root = containers
    params = ClusterParams(n_components=3)
    follower = LiveFollower(raw, root, params, poll_seconds=0.1)
    thread = threading.Thread(target=follower.run, daemon=True)
    thread.start()
    seen = []  # (points measured, status, temperatures covered) read from Tiled during the scan
    uid_box = {}

    def after_point(i):
        n = i + 1
        if n < 3:
            return
        uid = uid_box.get("uid") or _wait(lambda: running_scans(raw), what="the running scan")[0]
        uid_box["uid"] = uid
        key = tiled_io.result_key(uid, params.to_dict())
        md = _wait(lambda: (m := _result_md(root, key)).get("status") == "provisional"
                   and m.get("n_temperatures_covered") == n and m, what=f"a provisional result of {n} temperatures")
        seen.append((n, md["status"], md["temperatures_covered"]))

    try:
        uid = run_temperature_scan(raw, TEMPS, batch_size=1, after_point=after_point)
    finally:
        follower.stop()
        thread.join(30)
    assert uid == uid_box["uid"]
    assert [s[0] for s in seen] == list(range(3, len(TEMPS) + 1))
    assert all(status == "provisional" for _, status, _ in seen)
    assert seen[2][2] == pytest.approx(TEMPS[:5].tolist())
    key = tiled_io.result_key(uid, params.to_dict())
    provisional = tiled_io.load_result(root[key])
    assert provisional.labels.shape == (16, 16, 16)
    assert follower.stats.errors == 0 and follower.stats.updates == len(TEMPS) - 2
    assert follower.stats.warm_starts == follower.stats.updates - 1  # each after the first began from the last

    # The stop document: the final result takes the same key and replaces the provisional one.
    out = process_scan(client, f"{tiled_io.node_path(raw)}/{uid}", params, root=tiled_io.node_path(root))
    assert out.key == key and not out.reused
    assert list(root.keys()).count(key) == 1 and len(root) == 1
    md = root[key].metadata
    assert md["status"] == "complete" and not md.get("provisional") and md.get("attempt") == 1
    assert "n_temperatures_covered" not in md
    # A follower that looks again afterwards leaves the final result alone.
    assert LiveFollower(raw, root, params).update(uid) == "finished"
    assert root[key].metadata["status"] == "complete"


def test_an_aborted_scan_leaves_its_provisional_result_marked_aborted(containers):
    _, raw, root = containers
    params = ClusterParams(n_components=3)
    follower = LiveFollower(raw, root, params)

    def after_point(i):
        follower.poll()
        follower.wait_idle()

    uid = run_temperature_scan(raw, TEMPS, batch_size=1, fail_at=6, after_point=after_point)
    key = tiled_io.result_key(uid, params.to_dict())
    assert _result_md(root, key)["n_temperatures_covered"] == 6
    follower.poll()
    follower.wait_idle()
    md = _result_md(root, key)
    old = tiled_io.find_result(root, key)
    assert follower.stats.errors == 0
    assert md["status"] == "aborted" and md["exit_status"] == "fail"
    assert follower.stats.aborted == 1 and running_scans(raw) == []


def test_refused_data_are_tried_again_only_when_more_temperatures_arrive(containers, monkeypatch, caplog):
    from xtec_flows.tiled import live

    _, raw, root = containers
    params = ClusterParams(n_components=3)
    follower = LiveFollower(raw, root, params)
    fits = []
    real_run = live.run
    monkeypatch.setattr(live, "run", lambda volume, temps, *a, **kw: (fits.append(len(temps)),
                                                                       real_run(volume, temps, *a, **kw))[1])
    temps = TEMPS.copy()
    temps[4] = temps[3]  # a repeated temperature from the 5th point on: every fit of 5 or more is refused
    outcomes = []

    def after_point(i):
        uid = running_scans(raw)[0]
        outcomes.append((i + 1, follower.update(uid), follower.update(uid)))

    with caplog.at_level("WARNING", logger="xtec_flows.tiled.live"):
        uid = run_temperature_scan(raw, temps, batch_size=1, after_point=after_point)
    assert outcomes[2:5] == [(3, "updated", None), (4, "updated", None), (5, None, None)]
    assert fits == list(range(3, len(temps) + 1))  # each count fitted once, refused or not
    refusals = [r for r in caplog.records if "cannot be clustered" in r.getMessage()]
    assert len(refusals) == len(temps) - 4 and "duplicate" in refusals[0].getMessage()
    md = _result_md(root, tiled_io.result_key(uid, params.to_dict()))
    assert md["status"] == "provisional" and md["n_temperatures_covered"] == 4


def test_a_follower_restarted_mid_scan_picks_the_scan_up_where_its_result_stands(containers):
    _, raw, root = containers
    params = ClusterParams(n_components=3)
    followers = [LiveFollower(raw, root, params)]
    what = {}

    def after_point(i):
        uid = running_scans(raw)[0]
        if i == 4:  # the watcher host restarts: a new follower, nothing in memory
            followers.append(LiveFollower(raw, root, params))
            what["restart"] = followers[-1].update(uid)
        what[i + 1] = followers[-1].update(uid)

    uid = run_temperature_scan(raw, TEMPS[:7], batch_size=1, after_point=after_point)
    assert [what[n] for n in (1, 2)] == [None, None]
    assert [what[n] for n in (3, 4)] == ["updated", "updated"]
    # The new follower read the result of 4 temperatures and computed only what was new.
    assert what["restart"] == "updated" and what[5] is None
    assert what[6] == what[7] == "updated"
    assert followers[1].stats.updates == 3
    key = tiled_io.result_key(uid, params.to_dict())
    assert _result_md(root, key)["n_temperatures_covered"] == 7


def test_an_alert_fires_once_per_scan_and_class_kind_and_survives_a_restart(containers):
    _, raw, root = containers
    params = ClusterParams(classes="auto", max_components=6)
    alerts = []
    followers = [LiveFollower(raw, root, params, notify=alerts.append)]
    temps = np.linspace(20.0, 200.0, 14)

    def after_point(i):
        uid = running_scans(raw)[0]
        if i == 11:
            followers.append(LiveFollower(raw, root, params, notify=alerts.append))
        followers[-1].update(uid)

    uid = run_temperature_scan(raw, temps, batch_size=1, after_point=after_point)
    key = tiled_io.result_key(uid, params.to_dict())
    md = _result_md(root, key)
    assert md["status"] == "provisional" and md["content"] == "classes"
    assert md["provisional_parameters"]["classes"] == "auto" and md["provisional_parameters"]["stability_runs"] == 0
    kinds = [a.kind for a in alerts]
    assert "order_parameter" in kinds, [c["kind"] for c in md["classes"]]
    assert len(kinds) == len(set(kinds))
    assert md["alerts"] == kinds
    first = alerts[0]
    assert first.scan == uid and first.n_temperatures >= 8 and first.result.endswith(key)
    assert first.temperature == pytest.approx(temps[first.n_temperatures - 1])


def test_the_alert_reaches_prefect_once_and_the_documented_automation_posts_it_to_a_webhook(tmp_path):
    """flows/alerts.py on Prefect's temporary test server: one event per (scan, kind), even when
    sent twice, routed by deploy/prefect/class-alert-automation.json to a webhook (a local HTTP
    server standing in for a chat channel)."""
    import asyncio
    import http.server
    import json
    from pathlib import Path

    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.schemas.automations import AutomationCore
    from prefect.events.worker import EventsWorker
    from prefect.testing.utilities import prefect_test_harness

    from xtec_flows.tiled.live import ClassAlert
    from xtec_flows_prefect.alerts import CLASS_APPEARED, class_alert_event, emit_class_alert

    alert = ClassAlert(scan="uid-1", kind="order_parameter", label=0, tc=151.5, temperature=120.0,
                       n_temperatures=9, result="/xtec/xtec-abc", sample="LaAg")
    event = class_alert_event(alert, "http://tiled:8000")
    assert event["id"] == class_alert_event(alert)["id"]
    assert event["id"] != class_alert_event(ClassAlert(**{**alert.to_dict(), "kind": "critical"}))["id"]
    assert "Tc = 151.5" in event["payload"]["message"] and event["resource"]["xtec.kind"] == "order_parameter"

    posts = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    automation = json.loads((Path(__file__).parents[1] / "deploy/prefect/class-alert-automation.json").read_text())

    async def read_events():
        async with get_client() as client:
            for _ in range(150):
                page = await client.read_events(filter=EventFilter(event=EventNameFilter(name=[CLASS_APPEARED])), limit=50)
                if page.events:
                    return page.events
                await asyncio.sleep(0.2)
            return []

    async def create_automation(block_id):
        automation["actions"][0]["block_document_id"] = str(block_id)
        async with get_client() as client:
            await client.create_automation(AutomationCore.model_validate(automation))

    try:
        with prefect_test_harness(server_startup_timeout=180):
            block_id = Webhook(url=f"http://127.0.0.1:{hook.server_port}/xtec").save("xtec-alerts", overwrite=True)
            asyncio.run(create_automation(block_id))
            time.sleep(2)  # the triggers service loads automations periodically
            emit_class_alert(alert)
            emit_class_alert(alert)  # a restarted follower sending it again: the same event
            EventsWorker.drain_all()
            events = asyncio.run(read_events())
            _wait(lambda: posts, timeout=60, what="the webhook call")
    finally:
        hook.shutdown()
    assert len(events) == 1
    assert events[0].resource.id == "xtec.scan.uid-1" and events[0].payload["tc"] == 151.5
    assert posts[0]["kind"] == "order_parameter" and posts[0]["scan"] == "uid-1"
    assert posts[0]["text"].startswith("order parameter class appeared in scan uid-1")
