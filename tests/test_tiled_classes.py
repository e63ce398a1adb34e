"""classes="auto" results in Tiled: the extra nodes, their metadata, reading them back (with
xtec_flows and with nothing but tiled.client), the flow's artifacts, and serve/reprocessing
parameters; a fixed-K result keeps its layout and key."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from tiled_support import write_plain_array_node

from xtec_flows.engine import run as run_engine
from xtec_flows.tiled import results
from xtec_flows import tiled as tiled_io
from xtec_flows.engine import ClusterParams
from xtec_flows.tiled.process import process_scan
from xtec_flows.synthetic import make_volume

SHAPE = (12, 24, 24, 24)  # 12 temperatures: class discovery needs at least 8
AUTO = ClusterParams(classes="auto", max_components=8, stability_runs=2, n_init=1)
FIXED = ClusterParams(n_components=3, n_init=1)
#: What a fixed-K result container held before class discovery existed.
FIXED_NODES = {"labels", "means", "variances", "temperatures", "counts", "weights", "histogram_edges",
               "histogram_counts"}
FIXED_METADATA = {"status", "attempt", "created", "source", "parameters", "engine_major", "versions", "n_components",
                  "counts", "log_likelihood", "bic", "n_iter", "converged", "threshold", "n_valid",
                  "n_thresholded", "n_peaks", "input_reads", "timings", "shape", "dims", "completed"}


@pytest.fixture(scope="module")
def series():
    volume, temps, _ = make_volume(SHAPE, seed=0)
    return volume, temps


@pytest.fixture(scope="module")
def scan_path(tiled_server, series):
    volume, temps = series
    return write_plain_array_node(tiled_server.client(), "classes_series", volume, temps)


@pytest.fixture(scope="module")
def engine(series):
    """The same clustering in memory: what the Tiled result must hold."""
    return run_engine(*series, AUTO)


@pytest.fixture(scope="module")
def auto_node(tiled_server, scan_path):
    out = process_scan(tiled_server.client(), scan_path, AUTO)
    return tiled_server.client()["xtec"][out.key]


def test_auto_result_has_class_nodes_matching_the_engine(auto_node, engine):
    node, md = auto_node, auto_node.metadata
    assert md["status"] == "complete" and md["content"] == "classes"
    assert set(node) == FIXED_NODES | {s.key for s in tiled_io.CLASS_NODES}
    n = md["n_classes"]
    assert n == len(engine.classes) >= 1
    # metadata: the engine's class summaries without their per-temperature lists
    assert md["classes"] == [tiled_io.class_scalars(c) for c in engine.classes]
    assert "fit_curve" not in md["classes"][0] and md["classes"][0]["components"]
    assert md["stability"]["runs"] == 2 and len(md["stability"]["ari"]) == 2
    assert len(md["temperature_factor"]) == SHAPE[0]
    assert md["component_class"] == engine.to_dict()["component_class"]
    # label volumes: classes in labels, mixture components in components
    labels, components = node["labels"], node["components"]
    assert tuple(labels.dims) == tuple(components.dims) == ("L", "K", "H")
    assert labels.metadata["content"] == "classes" and components.metadata["content"] == "components"
    lab, comp = labels.read(), components.read()
    np.testing.assert_array_equal(lab, engine.labels[...])
    np.testing.assert_array_equal(comp, engine.components[...])
    class_of = np.full(int(md["n_components"]), -1, dtype=np.int8)
    for c in md["classes"]:
        class_of[c["components"]] = c["label"]
    assert set(np.unique(lab)) <= {c["label"] for c in md["classes"]} | {-1}
    np.testing.assert_array_equal(lab[comp >= 0], class_of[comp[comp >= 0]])
    assert np.all(lab[comp < 0] == -1)
    # the class table: scalar columns, one row per class, agreeing with the metadata
    table = node["classes"].read()
    assert list(table.columns) == list(tiled_io.CLASS_TABLE_COLUMNS) and len(table) == n
    assert list(table["label"]) == list(range(n))
    assert list(table["components"]) == [",".join(map(str, c["components"])) for c in md["classes"]]
    assert list(table["n_voxels"]) == [c["n_voxels"] for c in md["classes"]]
    for name in ("tc", "beta", "width", "stability"):
        expected = [np.nan if c[name] is None else c[name] for c in md["classes"]]
        np.testing.assert_allclose(table[name].to_numpy(dtype=float), expected, equal_nan=True)
    assert [None if pd.isna(s) else bool(s) for s in table["stable"]] == [c["stable"] for c in md["classes"]]
    # (C, T) class curves
    for name, spec in tiled_io.CLASS_CURVES.items():
        arr = node[spec.key]
        assert tuple(arr.dims) == ("class", "temperature") and arr.shape == (n, SHAPE[0])
        np.testing.assert_allclose(arr.read(), [c[name] for c in engine.classes])


def test_load_result_and_a_plain_tiled_client_read_the_classes(tiled_server, auto_node, engine):
    from tiled.client import from_uri

    loaded = results.load_result(auto_node)
    np.testing.assert_array_equal(loaded.components, engine.components[...])
    assert [c["label"] for c in loaded.classes] == [c["label"] for c in engine.classes]
    for got, want in zip(loaded.classes, engine.classes):
        assert {k: got[k] for k in ("kind", "components", "tc", "stable")} == \
            {k: want[k] for k in ("kind", "components", "tc", "stable")}
        np.testing.assert_allclose(got["mean_relative"], want["mean_relative"])
        np.testing.assert_allclose(got["fit_curve"], want["fit_curve"])
    lazy = results.load_result(auto_node, lazy=True)
    np.testing.assert_array_equal(lazy.components.compute(), loaded.components)
    # README recipe: nothing but tiled.client
    c = from_uri(tiled_server.uri, api_key=tiled_server.api_key)
    result = c["xtec"][auto_node.path_parts[-1]]
    table = result["classes"].read()
    assert isinstance(table, pd.DataFrame) and len(table) == result.metadata["n_classes"]
    np.testing.assert_array_equal(result["components"].read(), loaded.components)
    rows = results.summarise([result])
    assert rows[0]["classes"] == "auto" and rows[0]["n_classes"] == len(table)


def test_fixed_k_result_keeps_its_layout_and_key(tiled_server, scan_path):
    # The same (uid, parameters, engine major) gave this key before class discovery existed.
    if tiled_io.engine_major() == 0:
        assert tiled_io.result_key("scan-golden", FIXED.to_dict()) == "xtec-0903693a204cc887eb99"
    out = process_scan(tiled_server.client(), scan_path, FIXED)
    node = tiled_server.client()["xtec"][out.key]
    assert set(node) == FIXED_NODES and set(node.metadata) == FIXED_METADATA
    assert dict(node["labels"].metadata) == {"description": "cluster label per voxel; -1 = not clustered",
                                             "fill_value": -1}
    loaded = results.load_result(node)
    assert loaded.components is None and loaded.classes is None
    assert "classes" not in results.summarise([node])[0]


def test_publish_result_shows_the_classes(tiled_server, auto_node, tmp_path, monkeypatch):
    from xtec_flows_prefect import cluster_scan

    made, qmaps = {}, []
    for name in ("create_table_artifact", "create_markdown_artifact", "create_image_artifact", "create_link_artifact"):
        monkeypatch.setattr(cluster_scan, name, lambda name=name, **kw: made.setdefault(name, []).append(kw))
    from xtec_flows import plotting

    original = plotting.qmap
    monkeypatch.setattr(plotting, "qmap", lambda labels, path, n, **kw: (qmaps.append(n),
                                                                           original(labels, path, n, **kw)))
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    monkeypatch.setenv(cluster_scan.MAPS_DIR_ENV, str(tmp_path))
    key = auto_node.path_parts[-1]
    summary = {"key": key, "path": f"/xtec/{key}", "reused": False, "uri": "u", "browse": "b"}
    out = cluster_scan.publish_result.fn(tiled_server.uri, summary, False)
    n = auto_node.metadata["n_classes"]
    assert qmaps == [n]  # one colour per class
    assert (tmp_path / key / "classes.png").stat().st_size > 0 and out["maps"] == str(tmp_path / key)
    images = [kw["key"] for kw in made["create_image_artifact"]]
    assert [k.rsplit("-", 1)[1] for k in images] == ["qmap", "trajectories", "classes"]
    markdown = made["create_markdown_artifact"][0]["markdown"]
    assert f"## {n} classes" in markdown and "| class | kind | voxels | Tc | β or width, γ | stable |" in markdown
    assert "| component | voxels | fraction |" in markdown
    # the self-contained browser view, linked from the summary and as a link artifact
    view = tmp_path / key / "view.html"
    assert view.stat().st_size > 0 and view.as_uri() in markdown
    assert [kw["link"] for kw in made["create_link_artifact"]] == [view.as_uri()]


def test_class_table_markdown():
    from xtec_flows_prefect.cluster_scan import class_table_markdown

    classes = [
        {"label": 0, "kind": "order_parameter", "trend": "flat", "n_voxels": 1234, "tc": 152.73, "tc_err": 3.88,
         "beta": 0.3284, "beta_err": 0.0119, "width": 25.0, "width_err": 3.0, "stable": True},
        {"label": 1, "kind": "critical", "trend": "flat", "n_voxels": 312, "tc": 152.28, "tc_err": None,
         "beta": None, "beta_err": None, "width": 28.61, "width_err": 1.63, "gamma": 1.31, "gamma_err": 0.12,
         "stable": False},
        {"label": 2, "kind": "static", "trend": "decreasing", "n_voxels": 398, "tc": None, "tc_err": None,
         "beta": None, "beta_err": None, "width": None, "width_err": None, "stable": None},
    ]
    lines = class_table_markdown(classes)
    assert lines[2] == "| 0 | order parameter | 1,234 | 152.7 ± 3.9 | β 0.328 ± 0.012 | yes |"
    assert lines[3] == "| 1 | critical | 312 | 152.3 | width 28.6 ± 1.6, γ 1.31 ± 0.12 | **no** |"
    assert lines[4] == "| 2 | static (decreasing) | 398 | – | – | – |"


def test_serve_and_reprocessing_carry_auto_parameters():
    from xtec_flows_prefect.serve import ServeConfig, build_deployments
    from xtec_flows_prefect.submit import idempotency_base

    cfg = ServeConfig(tiled_uri="http://127.0.0.1:9", parameters={"classes": "auto", "max_components": 6})
    post, scheduled = build_deployments(cfg)
    for deployment in (post, scheduled):
        p = deployment.parameters["parameters"]
        assert p["classes"] == "auto" and p["max_components"] == 6
        # what cluster_scan and reprocess do with them: a round trip that keeps the result key
        assert ClusterParams.from_dict(p).to_dict() == p
    assert idempotency_base("u", cfg.parameters) != idempotency_base("u", FIXED.to_dict())


def test_too_few_temperatures_fail_once_without_retries(tiled_server):
    volume, temps, _ = make_volume((6, 8, 8, 8), seed=1)
    path = write_plain_array_node(tiled_server.client(), "classes_short_series", volume, temps)
    with pytest.raises(ValueError, match="at least 8 temperatures"):
        process_scan(tiled_server.client(), path, AUTO)
    (failed,) = results.find_results(tiled_server.client(), f"/{path}", status="failed")
    assert failed.metadata["retryable"] is False and set(failed) == set()  # nothing written, not resubmitted
