"""Reusing a model: a mixture fitted on one scan labels others measured on the same temperature
grid, with the same components and classes, and each scan's own class fits (its Tc)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import xtec_flows
from xtec_flows import cli
from xtec_flows.engine import StoredModel, apply
from xtec_flows.synthetic import SeriesModel, make_volume

SHAPE = (16, 32, 32, 32)


def _model(result, path="/data/a/result.json") -> StoredModel:
    # Through JSON, as result.json stores it.
    return StoredModel.from_summary(json.loads(json.dumps(result.to_dict())), {"kind": "file", "path": path})


@pytest.fixture(scope="module")
def series_a():
    return make_volume(SHAPE, seed=0)


@pytest.mark.parametrize("kwargs", [{"n_components": 3}, {"classes": "auto"}, {"mode": "peaks", "n_components": 3}],
                         ids=["d", "classes", "peaks"])
def test_a_model_labels_its_own_scan_as_its_fit_did_and_another_scan_as_a_fit_would(series_a, kwargs):
    volume, temps, _ = series_a
    fitted = xtec_flows.cluster(volume, temps, **kwargs)
    model = _model(fitted)
    again = apply(volume, temps, model)
    np.testing.assert_array_equal(again.labels[...], fitted.labels[...])
    assert again.model["path"] == "/data/a/result.json" and again.to_dict()["model"] == again.model
    np.testing.assert_array_equal(again.means, fitted.means)
    other, other_temps, _ = make_volume(SHAPE, seed=1)
    own = xtec_flows.cluster(other, other_temps, **kwargs)
    applied = apply(other, other_temps, model)
    assert adjusted_rand_score(own.labels[...].ravel(), applied.labels[...].ravel()) > 0.99
    if "classes" in kwargs:
        assert [c["kind"] for c in applied.classes] == [c["kind"] for c in fitted.classes]
        np.testing.assert_array_equal(applied.components[...] >= 0, applied.labels[...] >= 0)


def test_the_classes_are_refitted_on_each_scan():
    # A series in which Tc moves: the model's classes, this scan's Tc.
    temps_model = SeriesModel(tc=150.0)
    volume, temps, _ = make_volume(SHAPE, model=temps_model, seed=0)
    model = _model(xtec_flows.cluster(volume, temps, classes="auto"))
    step = float(temps[1] - temps[0])
    for tc in (120.0, 180.0):
        shifted, shifted_temps, _ = make_volume(SHAPE, model=SeriesModel(tc=tc), seed=3)
        result = apply(shifted, shifted_temps, model)
        order = [c for c in result.classes if c["kind"] == "order_parameter"]
        assert order, result.classes
        biggest = max(order, key=lambda c: c["n_voxels"])
        assert abs(biggest["tc"] - tc) <= step, (tc, biggest["tc"])


def test_another_temperature_grid_is_refused_before_anything_is_read(series_a):
    volume, temps, _ = series_a
    model = _model(xtec_flows.cluster(volume, temps, n_components=3))

    class Unreadable:
        shape = (12, 8, 8, 8)
        dtype = np.dtype("float32")

        def __getitem__(self, item):  # pragma: no cover - must never be called
            raise AssertionError("read before the check")

    with pytest.raises(ValueError, match="has 12 temperatures but /data/a/result.json was fitted on 16"):
        apply(Unreadable(), np.linspace(20, 300, 12), model)
    shifted = np.asarray(temps, dtype=float).copy()
    shifted[5] += 5.0
    Unreadable.shape = (16, 8, 8, 8)
    with pytest.raises(ValueError, match=r"temperature 5 is .* but /data/a/result.json was fitted at"):
        apply(Unreadable(), shifted, model)


def test_a_summary_that_is_not_a_result_is_refused():
    with pytest.raises(ValueError, match="records no clustering parameters"):
        StoredModel.from_summary({"means": [[1.0]]}, {"path": "notes.json"})
    with pytest.raises(ValueError, match="holds no 'variances'"):
        StoredModel.from_summary({"params": {}, "means": [[1.0, 2.0]], "weights": [1.0], "temperatures": [1, 2]},
                                 {"path": "partial.json"})


def test_cli_apply_writes_a_result_that_names_its_model(series_a, tmp_path, capsys):
    from xtec_flows.synthetic import write_zarr

    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    write_zarr(a, SHAPE, seed=0, progress=False)
    write_zarr(b, SHAPE, seed=1, progress=False)
    assert cli.main(["cluster", str(a), "-o", str(tmp_path / "fit"), "-k", "3", "--quiet", "--no-plots"]) == 0
    capsys.readouterr()
    rc = cli.main(["apply", "--model", str(tmp_path / "fit"), str(b), "-o", str(tmp_path / "applied"), "--quiet",
                   "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc = json.loads(out.out)
    assert doc["model"]["path"] == str((tmp_path / "fit" / "result.json").resolve())
    assert json.loads((tmp_path / "applied" / "result.json").read_text())["model"] == doc["model"]
    assert (tmp_path / "applied" / "view.html").exists()
    # a model that is not a result: a clear error, nothing written
    (tmp_path / "junk.json").write_text("[1, 2]")
    rc = cli.main(["apply", "--model", str(tmp_path / "junk.json"), str(b), "-o", str(tmp_path / "nothing"),
                   "--quiet"])
    assert rc == 2 and "is not an xtec-flows result.json" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


# ------------------------------------------------------------------------ against Tiled


def test_a_tiled_result_labels_another_scan_and_is_named_by_its_result(containers):
    from tiled_support import write_plain_array_node

    from xtec_flows import tiled as tiled_io
    from xtec_flows.tiled.process import process_scan

    client, raw, root = containers
    shape = (16, 20, 20, 20)
    (va, ta, _), (vb, tb, _) = make_volume(shape, seed=0), make_volume(shape, seed=1)
    path_a = write_plain_array_node(raw, "sample_a", va, ta)
    path_b = write_plain_array_node(raw, "sample_b", vb, tb)
    rel = root.path_parts[-1]
    fitted = process_scan(client, path_a, xtec_flows.ClusterParams(classes="auto"), root=rel)
    model = tiled_io.load_model(fitted.node)
    assert model.source["path"] == fitted.path and model.component_class is not None
    labelled = process_scan(client, path_b, root=rel, model=model)
    md = labelled.node.metadata
    assert md["model"]["path"] == fitted.path and md["status"] == "complete"
    assert labelled.key != tiled_io.result_key(path_b.strip("/").split("/")[-1], model.params.to_dict())
    expected = apply(vb, tb, model)
    np.testing.assert_array_equal(labelled.node["labels"].read(), expected.labels[...])
    assert [c["kind"] for c in md["classes"]] == [c["kind"] for c in expected.classes]
    # the same again: the complete result is found, not recomputed
    assert process_scan(client, path_b, root=rel, model=model).reused
    # a scan on another temperature grid: refused, before any result is computed
    path_c = write_plain_array_node(raw, "sample_c", vb[:12], tb[:12])
    with pytest.raises(ValueError, match="has 12 temperatures but .* was fitted on 16"):
        process_scan(client, path_c, root=rel, model=model)
    # an incomplete node is no model
    with pytest.raises(ValueError, match="not a complete xtec-flows result"):
        tiled_io.load_model(raw)


def test_the_flow_labels_a_scan_with_a_stored_model(tiled_server, tmp_path, monkeypatch):
    """cluster_scan(model_path=...) in a real Prefect flow run (Prefect's temporary test server)."""
    from prefect.testing.utilities import prefect_test_harness
    from tiled_support import write_plain_array_node

    from xtec_flows import tiled as tiled_io
    from xtec_flows.tiled.process import process_scan
    from xtec_flows_prefect.cluster_scan import MAPS_DIR_ENV, cluster_scan

    client = tiled_server.client()
    raw = client.create_container(f"flow_model_{tmp_path.name[-12:]}")
    shape = (16, 16, 16, 16)
    (va, ta, _), (vb, tb, _) = make_volume(shape, seed=0), make_volume(shape, seed=1)
    path_a = write_plain_array_node(raw, "a", va, ta)
    path_b = "/" + write_plain_array_node(raw, "b", vb, tb).strip("/")
    fitted = process_scan(client, path_a, xtec_flows.ClusterParams(n_components=3))
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    monkeypatch.setenv(MAPS_DIR_ENV, str(tmp_path / "maps"))
    # A 2-core CI machine under load can need more than the default 30 s to migrate and start it.
    with prefect_test_harness(server_startup_timeout=180):
        out = cluster_scan(tiled_server.uri, path_b, model_path=fitted.path)
    node = tiled_server.client()["xtec"][out["key"]]
    assert node.metadata["model"]["path"] == fitted.path and node.metadata["status"] == "complete"
    expected = apply(vb, tb, tiled_io.load_model(fitted.node))
    np.testing.assert_array_equal(node["labels"].read(), expected.labels[...])


def test_a_series_compared_through_one_model_gives_each_scan_its_tc(containers, tiled_server, monkeypatch, capsys):
    import pandas as pd
    from tiled_support import write_plain_array_node

    from xtec_flows import tiled as tiled_io
    from xtec_flows.tiled.compare import COMPARISON_COLUMNS, compare_scans
    from xtec_flows.tiled.process import process_scan

    client, raw, root = containers
    shape = (16, 24, 24, 24)
    paths = {}
    for tc in (130.0, 150.0, 170.0):
        volume, temps, _ = make_volume(shape, model=SeriesModel(tc=tc), seed=int(tc))
        paths[tc] = write_plain_array_node(raw, f"x{int(tc)}", volume, temps)
    rel = root.path_parts[-1]
    fitted = process_scan(client, paths[150.0], xtec_flows.ClusterParams(classes="auto"), root=rel)
    scans = [paths[tc] for tc in (130.0, 150.0, 170.0)]
    frame, node = compare_scans(client, fitted.path, scans, root=rel)
    assert list(frame.columns) == list(COMPARISON_COLUMNS) and frame["scan"].tolist()[0] == scans[0]
    step = 280.0 / 15
    # the model's CDW class: its order-parameter class at the model scan's Tc (150); the same label
    # in every scan, with that scan's Tc
    cdw = min((c for c in fitted.node.metadata["classes"] if c["kind"] == "order_parameter"),
              key=lambda c: abs(c["tc"] - 150.0))["label"]
    rows = frame[frame["label"] == cdw].set_index("scan")
    for tc, scan in zip((130.0, 150.0, 170.0), scans):
        assert abs(rows.loc[scan, "tc"] - tc) <= step, (tc, rows.loc[scan, "tc"])
        assert rows.loc[scan, "kind"] == "order_parameter" and rows.loc[scan, "n_voxels"] > 0
    # the same table through a plain tiled client, with what it was made from
    table = client[rel][node.path_parts[-1]]
    pd.testing.assert_frame_equal(table.read()[list(COMPARISON_COLUMNS)].reset_index(drop=True),
                                  frame.reset_index(drop=True), check_dtype=False)
    assert table.metadata["model"]["path"] == fitted.path and table.metadata["scans"] == scans
    with pytest.raises(ValueError, match="at least two scans"):
        compare_scans(client, fitted.path, scans[:1], root=rel)
    # the CLI: the same table (the scans' results exist: nothing is recomputed)
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    capsys.readouterr()
    argv = ["compare", "--tiled-uri", tiled_server.uri, "--model", fitted.path, "--root", rel, "--json", "--quiet"]
    assert cli.main(argv + [a for scan in scans for a in ("--scan", scan)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["path"] == tiled_io.node_path(node)
    assert [r["tc"] is None for r in doc["rows"]] == frame["tc"].isna().tolist()
    assert [r["tc"] for r in doc["rows"] if r["tc"] is not None] == pytest.approx(frame["tc"].dropna().tolist())
    fixed = process_scan(client, paths[130.0], xtec_flows.ClusterParams(n_components=3), root=rel)
    with pytest.raises(ValueError, match="needs a classes='auto' model"):
        compare_scans(client, fixed.path, scans, root=rel)
