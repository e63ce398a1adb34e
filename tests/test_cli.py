"""End-to-end tests of the ``xtec-flows`` command line (synth, cluster, bic).

Most tests call ``xtec_flows.cli.main([...])`` in-process; one test runs the
installed console script in a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import xtec_flows
from xtec_flows import cli
from xtec_flows.io import nexus
from xtec_flows.synthetic import make_volume

SHAPE_3D = (8, 24, 24, 24)
SHAPE_2D = (8, 48, 48)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RESULT_KEYS = {
    "xtec_flows", "params", "shape", "temperatures", "n_components", "means", "variances", "weights",
    "counts", "log_likelihood", "bic", "n_iter", "converged", "threshold", "n_valid", "n_thresholded",
}


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of an in-process CLI call."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def tree_bytes(path: Path) -> dict:
    """{relative path: bytes} of every file below ``path`` (to prove it is untouched)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def partial_dirs(parent: Path) -> list:
    return sorted(p.name for p in Path(parent).glob(".*.partial-*"))


def read_labels(outdir: Path) -> tuple:
    arr = zarr.open_array(str(outdir / "labels.zarr"), mode="r")
    return arr[...], arr


def check_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def check_result(outdir: Path, spatial_shape: tuple, k: int, n_t: int) -> dict:
    """Validate labels.zarr and result.json of a cluster run; returns result.json."""
    doc = json.loads((outdir / "result.json").read_text())
    assert RESULT_KEYS <= set(doc)
    assert doc["xtec_flows"] == xtec_flows.__version__
    assert doc["params"]["n_components"] == k
    assert doc["n_components"] == k
    assert doc["shape"] == list(spatial_shape)
    assert len(doc["temperatures"]) == n_t
    assert np.asarray(doc["means"]).shape == (k, n_t)
    assert np.asarray(doc["variances"]).shape == (k, n_t)
    assert len(doc["counts"]) == k
    assert sum(doc["counts"]) == doc["n_thresholded"] > 0
    assert doc["n_thresholded"] <= doc["n_valid"]
    assert np.isfinite(doc["bic"]) and np.isfinite(doc["log_likelihood"])
    thr = doc["threshold"]
    assert {"method", "log_cutoff", "intensity_cutoff", "success", "histogram_edges", "histogram_counts"} <= set(thr)
    assert thr["intensity_cutoff"] >= 0
    assert len(thr["histogram_edges"]) == len(thr["histogram_counts"]) + 1
    assert sum(thr["histogram_counts"]) > 0

    labels, arr = read_labels(outdir)
    assert arr.shape == tuple(spatial_shape)
    assert arr.dtype == np.int8
    assert labels.min() >= -1 and labels.max() <= k - 1
    assert int((labels >= 0).sum()) == doc["n_thresholded"]
    np.testing.assert_array_equal(np.bincount(labels[labels >= 0].ravel(), minlength=k), doc["counts"])
    return doc


@pytest.fixture(scope="module")
def synth3d(tmp_path_factory) -> Path:
    """A small synthetic 3-D series written by the CLI (read-only for the tests)."""
    path = tmp_path_factory.mktemp("synth") / "series3d.zarr"
    assert cli.main(["synth", str(path), "--shape", ",".join(map(str, SHAPE_3D)), "--seed", "1", "--quiet"]) == 0
    return path


@pytest.fixture(scope="module")
def synth2d(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "series2d.zarr"
    assert cli.main(["synth", str(path), "--shape", ",".join(map(str, SHAPE_2D)), "--seed", "2", "--quiet"]) == 0
    return path


@pytest.fixture(scope="module")
def nexus_file(tmp_path_factory):
    """(spec, volume, temperatures) of a NeXus file holding a 2-D series."""
    volume, temps, _ = make_volume(SHAPE_2D, seed=3)
    path = tmp_path_factory.mktemp("nexus") / "series.nxs"
    spec = nexus.write_series(path, volume, temps)
    return spec, volume, temps


# ---------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------


def test_synth_writes_zarr_group(synth3d):
    group = zarr.open_group(str(synth3d), mode="r")
    intensity = group["intensity"]
    assert intensity.shape == SHAPE_3D
    assert intensity.dtype == np.float32
    truth = group["truth"]
    assert truth.shape == SHAPE_3D[1:]
    temps = np.asarray(group.attrs["temperatures"])
    assert temps.shape == (SHAPE_3D[0],)
    assert np.all(np.diff(temps) > 0)
    data = intensity[...]
    assert np.isfinite(data).all() and data.max() > 0


def test_synth_2d(tmp_path, capsys):
    out = tmp_path / "s2.zarr"
    rc, stdout, _ = run_cli(["synth", out, "--shape", "6,20,20", "--quiet"], capsys)
    assert rc == 0
    assert str(out) in stdout
    group = zarr.open_group(str(out), mode="r")
    assert group["intensity"].shape == (6, 20, 20)
    assert group["truth"].shape == (20, 20)
    assert len(group.attrs["temperatures"]) == 6


def test_synth_refuses_existing_path(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert run_cli(["synth", out, "--shape", "6,16,16", "--seed", "0", "--quiet"], capsys)[0] == 0
    before = tree_bytes(out)
    rc, stdout, err = run_cli(["synth", out, "--shape", "6,16,16", "--seed", "5", "--quiet"], capsys)
    assert rc == 2
    assert err.startswith("xtec-flows synth: error:")
    assert "--overwrite" in err and str(out) in err
    assert tree_bytes(out) == before

    # also a foreign file at the path
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    rc, _, err = run_cli(["synth", other, "--shape", "6,16,16", "--quiet"], capsys)
    assert rc == 2 and "already exists" in err
    assert other.read_text() == "keep me"


def test_synth_overwrite_replaces(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert run_cli(["synth", out, "--shape", "6,16,16", "--seed", "0", "--quiet"], capsys)[0] == 0
    assert run_cli(["synth", out, "--shape", "6,20,20", "--seed", "1", "--quiet", "--overwrite"], capsys)[0] == 0
    assert zarr.open_group(str(out), mode="r")["intensity"].shape == (6, 20, 20)


# ---------------------------------------------------------------------------------------
# cluster
# ---------------------------------------------------------------------------------------


def test_cluster_zarr_outputs_and_plots(synth3d, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["cluster", synth3d, "-o", out, "-k", "3", "--quiet"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["labels.zarr", "qmap.png", "result.json", "trajectories.png",
                                                     "view.html"]
    doc = check_result(out, SHAPE_3D[1:], 3, SHAPE_3D[0])
    page = (out / "view.html").read_text()
    assert 'id="xtec-data"' in page and "http://" not in page.split('id="xtec-data"')[1][:2000]  # self-contained
    assert doc["input"] == str(synth3d)
    check_png(out / "qmap.png")
    check_png(out / "trajectories.png")
    # human-readable summary
    assert "K = 3" in stdout and str(out) in stdout
    assert partial_dirs(tmp_path) == []


def test_cluster_labels_match_python_api(synth3d, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(["cluster", synth3d, "-o", out, "-k", "3", "--seed", "0", "--quiet", "--no-plots"], capsys)
    assert rc == 0, err
    assert not (out / "qmap.png").exists() and not (out / "trajectories.png").exists()
    doc = check_result(out, SHAPE_3D[1:], 3, SHAPE_3D[0])
    labels, _ = read_labels(out)

    group = zarr.open_group(str(synth3d), mode="r")
    temps = np.asarray(group.attrs["temperatures"])
    api = xtec_flows.cluster(group["intensity"], temps, n_components=3, random_state=0)
    np.testing.assert_array_equal(labels, api.labels[...])
    assert doc["counts"] == [int(c) for c in api.counts]
    np.testing.assert_allclose(doc["means"], api.means)
    assert doc["bic"] == pytest.approx(api.bic)
    assert doc["log_likelihood"] == pytest.approx(api.log_likelihood)

    # the same data as an in-memory numpy array (different block layout) gives the same labels
    api_np = xtec_flows.cluster(group["intensity"][...], temps, n_components=3, random_state=0)
    np.testing.assert_array_equal(labels, api_np.labels[...])


def test_cluster_json_stdout(synth2d, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["cluster", synth2d, "-o", out, "-k", "3", "--quiet", "--no-plots", "--json"], capsys)
    assert rc == 0, err
    lines = [l for l in stdout.splitlines() if l.strip()]
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert isinstance(doc, dict)
    assert RESULT_KEYS <= set(doc)
    assert doc["output"] == str(out)
    assert doc["xtec_flows"] == xtec_flows.__version__
    assert sum(doc["counts"]) == doc["n_thresholded"]
    assert np.asarray(doc["means"]).shape == (3, SHAPE_2D[0])
    assert {"intensity_cutoff", "log_cutoff", "method"} <= set(doc["threshold"])
    full = json.loads((out / "result.json").read_text())
    for key in ("counts", "means", "bic", "log_likelihood", "n_thresholded", "params"):
        assert doc[key] == full[key]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--mode", "d"], id="d"),
        pytest.param(["--mode", "s"], id="s-local"),
        pytest.param(["--mode", "s", "--kernel", "local", "--length-scale", "1.5", "--smoothing-weights", "gaussian"], id="s-local-gaussian"),
        pytest.param(["--mode", "s", "--kernel", "periodic", "--unit-cell", "16,16,16", "--length-scale", "0.2"], id="s-periodic"),
        pytest.param(["--mode", "peaks"], id="peaks"),
        pytest.param(["--rescale", "zscore", "--threshold", "simple"], id="zscore-simple"),
        pytest.param(["--rescale", "log-mean", "--mask", "any-zero"], id="logmean-anyzero"),
        pytest.param(["--chunks", "8,8,8"], id="chunks"),
    ],
)
def test_cluster_modes(synth3d, tmp_path, capsys, extra):
    out = tmp_path / "run"
    rc, _, err = run_cli(["cluster", synth3d, "-o", out, "-k", "3", "--quiet", "--no-plots", *extra], capsys)
    assert rc == 0, err
    doc = check_result(out, SHAPE_3D[1:], 3, SHAPE_3D[0])
    mode = extra[extra.index("--mode") + 1] if "--mode" in extra else "d"
    assert doc["params"]["mode"] == mode
    if mode == "peaks":
        assert doc["n_peaks"] >= 3
        assert doc["n_samples"] == doc["n_peaks"]
    if mode == "s":
        kernel = extra[extra.index("--kernel") + 1] if "--kernel" in extra else "local"
        assert doc["params"]["smoothing"]["kind"] == kernel
        if kernel == "periodic":
            assert doc["params"]["smoothing"]["unit_cell"] == [16, 16, 16]
    # every mode finds more than one populated cluster on this volume
    assert sum(c > 0 for c in doc["counts"]) >= 2


def test_cluster_periodic_needs_unit_cell(synth3d, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(["cluster", synth3d, "-o", out, "--mode", "s", "--kernel", "periodic", "--quiet", "--no-plots"], capsys)
    assert rc == 2
    assert "unit_cell" in err
    assert not out.exists() and partial_dirs(tmp_path) == []


def test_cluster_chunking_does_not_change_labels(synth3d, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(["cluster", synth3d, "-o", a, "-k", "3", "--quiet", "--no-plots"], capsys)[0] == 0
    assert run_cli(["cluster", synth3d, "-o", b, "-k", "3", "--quiet", "--no-plots", "--chunks", "8,12,24"], capsys)[0] == 0
    np.testing.assert_array_equal(read_labels(a)[0], read_labels(b)[0])


# ---------------------------------------------------------------------------------------
# NeXus / HDF5 input
# ---------------------------------------------------------------------------------------


def test_cluster_nexus_temperatures_from_file(nexus_file, tmp_path, capsys):
    spec, volume, temps = nexus_file
    assert spec.endswith(".nxs:/entry/data/data")
    out = tmp_path / "run"
    rc, _, err = run_cli(["cluster", spec, "-o", out, "-k", "3", "--quiet", "--no-plots"], capsys)
    assert rc == 0, err
    doc = check_result(out, SHAPE_2D[1:], 3, SHAPE_2D[0])
    np.testing.assert_allclose(doc["temperatures"], temps)
    api = xtec_flows.cluster(volume, temps, n_components=3)
    np.testing.assert_array_equal(read_labels(out)[0], api.labels[...])


def test_cluster_nexus_default_signal_without_inner_path(tmp_path, capsys):
    """A NeXus file with root @default -> NXentry @default -> NXdata @signal needs no inner path."""
    import h5py

    volume, temps, _ = make_volume((6, 20, 20), seed=3)
    path = tmp_path / "default.nxs"
    nexus.write_series(path, volume, temps)
    with h5py.File(path, "a") as f:
        f.attrs["default"] = "entry"
    out = tmp_path / "run"
    rc, _, err = run_cli(["cluster", path, "-o", out, "-k", "3", "--quiet", "--no-plots"], capsys)
    assert rc == 0, err
    doc = check_result(out, (20, 20), 3, 6)
    np.testing.assert_allclose(doc["temperatures"], temps)


def test_cluster_write_series_file_without_inner_path(nexus_file, tmp_path, capsys):
    spec, _, temps = nexus_file
    path = spec.rsplit(":", 1)[0]
    out = tmp_path / "run"
    rc, _, err = run_cli(["cluster", path, "-o", out, "-k", "3", "--quiet", "--no-plots"], capsys)
    assert rc == 0, err
    np.testing.assert_allclose(json.loads((out / "result.json").read_text())["temperatures"], temps)


def test_cluster_temperatures_option_overrides_file(nexus_file, tmp_path, capsys):
    spec, _, temps = nexus_file
    override = [5.0 + 10.0 * i for i in range(len(temps))]
    out = tmp_path / "run"
    rc, _, err = run_cli(
        ["cluster", spec, "-o", out, "-k", "3", "--quiet", "--no-plots", "--temperatures", ",".join(map(str, override))],
        capsys,
    )
    assert rc == 0, err
    doc = check_result(out, SHAPE_2D[1:], 3, SHAPE_2D[0])
    np.testing.assert_allclose(doc["temperatures"], override)
    assert not np.allclose(doc["temperatures"], temps)


def test_cluster_hdf5_without_temperatures(tmp_path, capsys):
    import h5py

    volume, temps, _ = make_volume((6, 20, 20), seed=0)
    path = tmp_path / "bare.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=volume)
    parent = tmp_path / "outs"
    parent.mkdir()
    out = parent / "run"
    rc, _, err = run_cli(["cluster", f"{path}:/data", "-o", out, "--quiet", "--no-plots"], capsys)
    assert rc == 2
    assert err.startswith("xtec-flows cluster: error:")
    assert "--temperatures" in err
    assert not out.exists() and list(parent.iterdir()) == []

    # ... and with --temperatures it works
    rc, _, err = run_cli(
        ["cluster", f"{path}:/data", "-o", out, "-k", "3", "--quiet", "--no-plots",
         "--temperatures", ",".join(str(t) for t in temps)],
        capsys,
    )
    assert rc == 0, err
    check_result(out, (20, 20), 3, 6)


# ---------------------------------------------------------------------------------------
# overwrite semantics
# ---------------------------------------------------------------------------------------


def test_cluster_overwrite(synth2d, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["cluster", synth2d, "-o", out, "-k", "2", "--quiet", "--no-plots"], capsys)[0] == 0
    first = (out / "result.json").read_bytes()
    first_tree = tree_bytes(out)

    # without --overwrite: refused, earlier result unchanged
    rc, _, err = run_cli(["cluster", synth2d, "-o", out, "-k", "3", "--quiet", "--no-plots"], capsys)
    assert rc == 2
    assert err.startswith("xtec-flows cluster: error:") and "--overwrite" in err
    assert (out / "result.json").read_bytes() == first
    assert tree_bytes(out) == first_tree

    # a failing run with --overwrite leaves the earlier result intact
    rc, _, err = run_cli(["cluster", synth2d, "-o", out, "-k", "3", "--quiet", "--no-plots", "--overwrite",
                          "--threshold", "1e12"], capsys)
    assert rc == 2 and "threshold" in err
    assert tree_bytes(out) == first_tree
    assert partial_dirs(tmp_path) == []

    # with --overwrite: replaced
    rc, _, err = run_cli(["cluster", synth2d, "-o", out, "-k", "3", "--quiet", "--no-plots", "--overwrite"], capsys)
    assert rc == 0, err
    assert (out / "result.json").read_bytes() != first
    check_result(out, SHAPE_2D[1:], 3, SHAPE_2D[0])
    assert partial_dirs(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_cluster_refuses_foreign_directory(synth2d, tmp_path, capsys, overwrite):
    out = tmp_path / "precious"
    (out / "sub").mkdir(parents=True)
    (out / "data.txt").write_text("measurements")
    (out / "sub" / "result.json").write_text('{"not": "ours"}')
    (out / "result.json").write_text('{"something": "else"}')
    before = tree_bytes(out)
    argv = ["cluster", synth2d, "-o", out, "-k", "2", "--quiet", "--no-plots"] + (["--overwrite"] if overwrite else [])
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    assert "other data" in err and str(out) in err
    assert tree_bytes(out) == before
    assert partial_dirs(tmp_path) == []


def test_cluster_into_existing_empty_directory(synth2d, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    rc, _, err = run_cli(["cluster", synth2d, "-o", out, "-k", "2", "--quiet", "--no-plots"], capsys)
    assert rc == 0, err
    check_result(out, SHAPE_2D[1:], 2, SHAPE_2D[0])


# ---------------------------------------------------------------------------------------
# bic
# ---------------------------------------------------------------------------------------


def test_bic_outputs(synth3d, tmp_path, capsys):
    out = tmp_path / "bic"
    rc, stdout, err = run_cli(["bic", synth3d, "--k", "2..4", "-o", out, "--quiet"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["bic.csv", "bic.json", "bic.png"]
    check_png(out / "bic.png")

    doc = json.loads((out / "bic.json").read_text())
    assert doc["xtec_flows"] == xtec_flows.__version__
    table = doc["table"]
    assert [r["n_components"] for r in table] == [2, 3, 4]
    assert sum(bool(r["best"]) for r in table) == 1
    best = next(r for r in table if r["best"])
    assert best["bic"] == min(r["bic"] for r in table)
    assert all(np.isfinite(r["bic"]) and np.isfinite(r["log_likelihood"]) for r in table)

    with open(out / "bic.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["n_components"]) for r in rows] == [2, 3, 4]
    assert sum(r["best"] == "True" for r in rows) == 1
    for r, t in zip(rows, table):
        assert float(r["bic"]) == pytest.approx(t["bic"], rel=1e-6, abs=1e-6)
    assert "<- best" in stdout

    # the K=3 row agrees with a cluster run of the same parameters
    group = zarr.open_group(str(synth3d), mode="r")
    api = xtec_flows.cluster(group["intensity"], np.asarray(group.attrs["temperatures"]), n_components=3)
    assert table[1]["bic"] == pytest.approx(api.bic)


def test_bic_json_stdout(synth2d, tmp_path, capsys):
    rc, stdout, err = run_cli(["bic", synth2d, "--k", "2,3", "--quiet", "--json"], capsys)
    assert rc == 0, err
    lines = [l for l in stdout.splitlines() if l.strip()]
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert [r["n_components"] for r in doc["table"]] == [2, 3]
    assert sum(bool(r["best"]) for r in doc["table"]) == 1
    assert doc["xtec_flows"] == xtec_flows.__version__
    assert "output" not in doc
    assert list(tmp_path.iterdir()) == []  # no -o: nothing written


def test_bic_refuses_foreign_directory(synth2d, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "data.txt").write_text("measurements")
    rc, _, err = run_cli(["bic", synth2d, "--k", "2..3", "-o", out, "--quiet", "--overwrite"], capsys)
    assert rc == 2 and "other data" in err
    assert tree_bytes(out) == {"data.txt": b"measurements"}


def test_bic_overwrite_replaces_earlier_bic_result(synth2d, tmp_path, capsys):
    out = tmp_path / "bic"
    assert run_cli(["bic", synth2d, "--k", "2..3", "-o", out, "--quiet"], capsys)[0] == 0
    before = tree_bytes(out)
    rc, _, err = run_cli(["bic", synth2d, "--k", "2..3", "-o", out, "--quiet"], capsys)
    assert rc == 2
    assert tree_bytes(out) == before
    # the refusal should say it is an earlier xtec-flows result and suggest --overwrite
    assert "--overwrite" in err
    rc, _, err = run_cli(["bic", synth2d, "--k", "2..4", "-o", out, "--quiet", "--overwrite"], capsys)
    assert rc == 0, err
    assert [r["n_components"] for r in json.loads((out / "bic.json").read_text())["table"]] == [2, 3, 4]


# ---------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------


def test_same_seed_gives_identical_data_and_labels(tmp_path, capsys):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    for p in (a, b):
        assert run_cli(["synth", p, "--shape", "8,40,40", "--seed", "11", "--quiet"], capsys)[0] == 0
    ia = zarr.open_group(str(a), mode="r")["intensity"][...]
    ib = zarr.open_group(str(b), mode="r")["intensity"][...]
    np.testing.assert_array_equal(ia, ib)

    ra, rb = tmp_path / "ra", tmp_path / "rb"
    assert run_cli(["cluster", a, "-o", ra, "-k", "3", "--seed", "5", "--quiet", "--no-plots"], capsys)[0] == 0
    assert run_cli(["cluster", b, "-o", rb, "-k", "3", "--seed", "5", "--quiet", "--no-plots"], capsys)[0] == 0
    np.testing.assert_array_equal(read_labels(ra)[0], read_labels(rb)[0])
    da_, db_ = (json.loads((r / "result.json").read_text()) for r in (ra, rb))
    assert da_["counts"] == db_["counts"] and da_["means"] == db_["means"]


def test_rerun_gives_same_labels_in_same_order(synth3d, tmp_path, capsys):
    runs = []
    for name, seed in (("r1", "0"), ("r2", "0"), ("r3", "7")):
        out = tmp_path / name
        assert run_cli(["cluster", synth3d, "-o", out, "-k", "3", "--seed", seed, "--quiet", "--no-plots"], capsys)[0] == 0
        runs.append((read_labels(out)[0], json.loads((out / "result.json").read_text())))
    (l1, d1), (l2, d2), (l3, d3) = runs
    np.testing.assert_array_equal(l1, l2)
    assert d1["counts"] == d2["counts"]
    # canonical label order: a different EM seed converging to the same fit gives the same label numbers
    np.testing.assert_array_equal(l1, l3)
    np.testing.assert_allclose(d1["means"], d3["means"], atol=1e-3)
    # canonical order: label 0 is the most temperature-dependent mean trajectory
    spread = np.asarray(d1["means"]).std(axis=1)
    assert np.all(np.diff(spread) <= 1e-12)


# ---------------------------------------------------------------------------------------
# installed console script
# ---------------------------------------------------------------------------------------


def _console_script() -> str:
    exe = Path(sys.executable).parent / ("xtec-flows.exe" if os.name == "nt" else "xtec-flows")
    if exe.exists():
        return str(exe)
    found = shutil.which("xtec-flows")
    if found is None:
        pytest.skip("xtec-flows console script not installed")
    return found


def test_console_script_subprocess(synth2d, tmp_path):
    exe = _console_script()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0
    assert version.stdout.strip() == f"xtec-flows {xtec_flows.__version__}"

    out = tmp_path / "run"
    proc = subprocess.run(
        [exe, "cluster", str(synth2d), "-o", str(out), "-k", "3", "--quiet", "--no-plots", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["n_components"] == 3 and doc["output"] == str(out)
    check_result(out, SHAPE_2D[1:], 3, SHAPE_2D[0])

    # the exit code of a user error reaches the shell
    again = subprocess.run(
        [exe, "cluster", str(synth2d), "-o", str(out), "--quiet", "--no-plots"], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 2
    assert "xtec-flows cluster: error:" in again.stderr and "--overwrite" in again.stderr
