"""Every bad input gets a clear error, through the Python API and the CLI, and
nothing is written: no output directory, no labels store, no partial work dirs."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr

import xtec_flows
from xtec_flows import cli
from xtec_flows.io import nexus, zarr_io
from xtec_flows.synthetic import make_volume

SHAPE = (6, 20, 20)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good():
    """(volume, temperatures) of a small valid 2-D series."""
    volume, temps, _ = make_volume(SHAPE, seed=0)
    return volume, temps


def _bright_voxels(volume, n):
    """Spatial indices of the n voxels with the highest mean intensity (they pass any threshold)."""
    mean = volume.mean(axis=0)
    flat = np.argsort(mean.ravel())[::-1][:n]
    return [tuple(int(i) for i in np.unravel_index(f, mean.shape)) for f in flat]


def tree_bytes(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def write_zarr_input(path: Path, data: np.ndarray, temps=None) -> Path:
    arr = zarr.create_array(store=str(path), shape=data.shape, dtype=data.dtype, chunks=data.shape)
    arr[...] = data
    if temps is not None:
        arr.attrs["temperatures"] = [float(t) for t in temps]
    return path


def api_fails(tmp_path, exc, match, volume, temps, **kwargs):
    """xtec_flows.cluster raises ``exc`` matching ``match`` and writes no labels store."""
    target = Path(tempfile.mkdtemp(prefix="api-", dir=tmp_path))
    store = target / "labels.zarr"
    with pytest.raises(exc, match=match) as info:
        xtec_flows.cluster(volume, temps, labels_store=str(store), **kwargs)
    assert not store.exists()
    assert list(target.iterdir()) == []
    return info.value


def cli_fails(tmp_path, capsys, argv, match, command="cluster"):
    """The CLI exits 2 with 'xtec-flows CMD: error: ...' matching ``match``; the output
    directory does not exist afterwards and its parent holds no partial directories."""
    parent = tmp_path / "outs"
    parent.mkdir(exist_ok=True)
    before = sorted(p.name for p in parent.iterdir())
    out = parent / "result"
    capsys.readouterr()
    rc = cli.main([command, *[str(a) for a in argv], "-o", str(out)] + (["--no-plots"] if command == "cluster" else []))
    stdout, err = capsys.readouterr()
    assert rc == 2, (stdout, err)
    assert err.startswith(f"xtec-flows {command}: error:"), err
    assert re.search(match, err), err
    assert stdout == ""
    assert not out.exists()
    assert sorted(p.name for p in parent.iterdir()) == before
    assert not list(parent.glob(".*partial*"))
    return err


def cli_ok(tmp_path, capsys, argv):
    out = tmp_path / "ok"
    capsys.readouterr()
    rc = cli.main(["cluster", *[str(a) for a in argv], "-o", str(out), "--no-plots", "--quiet"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    return out


def argparse_rejects(capsys, argv, match):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err


# ---------------------------------------------------------------------------------------
# non-finite values
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_api(tmp_path, good, bad):
    volume, temps = good
    vol = volume.copy()
    (i, j), (k, l) = _bright_voxels(vol, 2)
    vol[2, i, j] = bad
    vol[0, k, l] = bad
    err = api_fails(tmp_path, ValueError, r"nonfinite='mask'", vol, temps, n_components=3)
    assert "NaN or Inf" in str(err) and "2 voxel" in str(err)

    # with nonfinite="mask" it runs and those voxels stay unclustered
    res = xtec_flows.cluster(vol, temps, n_components=3, nonfinite="mask")
    labels = res.labels[...]
    assert labels[i, j] == -1 and labels[k, l] == -1
    ref = xtec_flows.cluster(volume, temps, n_components=3).labels[...]
    assert ref[i, j] >= 0 and ref[k, l] >= 0  # they would have been clustered
    assert labels.max() == 2 and (labels >= 0).sum() == sum(res.counts)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_nonfinite_cli(tmp_path, capsys, good, bad):
    volume, temps = good
    vol = volume.copy()
    (i, j), (k, l) = _bright_voxels(vol, 2)
    vol[3, i, j] = bad
    vol[1, k, l] = bad
    src = write_zarr_input(tmp_path / "in.zarr", vol, temps)
    cli_fails(tmp_path, capsys, [src, "-k", "3", "--quiet"], r"--mask-nonfinite")

    out = cli_ok(tmp_path, capsys, [src, "-k", "3", "--mask-nonfinite"])
    labels = zarr.open_array(str(out / "labels.zarr"), mode="r")[...]
    assert labels[i, j] == -1 and labels[k, l] == -1
    doc = json.loads((out / "result.json").read_text())
    assert doc["params"]["nonfinite"] == "mask"
    assert sum(doc["counts"]) == int((labels >= 0).sum())


# ---------------------------------------------------------------------------------------
# volume content, shape and dtype
# ---------------------------------------------------------------------------------------


def test_all_zero_volume(tmp_path, capsys, good):
    _, temps = good
    vol = np.zeros(SHAPE, np.float32)
    api_fails(tmp_path, ValueError, r"no voxel with positive mean intensity", vol, temps)
    src = write_zarr_input(tmp_path / "zero.zarr", vol, temps)
    cli_fails(tmp_path, capsys, [src, "--quiet"], r"no voxel with positive mean intensity")


@pytest.mark.parametrize("shape", [(6, 4, 4, 4, 4), (6,)], ids=["4-spatial", "0-spatial"])
def test_wrong_number_of_spatial_dims(tmp_path, capsys, shape):
    # 1-D series (T, q) are valid input (tests/test_series_1d.py); none or 4 spatial dims are not.
    vol = np.ones(shape, np.float32)
    temps = np.arange(shape[0], dtype=float)
    api_fails(tmp_path, ValueError, r"1, 2 or 3 spatial dims", vol, temps)
    src = write_zarr_input(tmp_path / "in.zarr", vol, temps)
    cli_fails(tmp_path, capsys, [src, "--quiet"], r"1, 2 or 3 spatial dims.*got shape")


@pytest.mark.parametrize(
    "dtype, data",
    [
        ("complex64", lambda: np.ones(SHAPE, np.complex64)),
        ("bool", lambda: np.ones(SHAPE, bool)),
        ("<U1", lambda: np.full(SHAPE, "a")),
        ("object", lambda: np.full(SHAPE, 1.0, dtype=object)),
    ],
)
def test_non_numeric_dtype_api(tmp_path, good, dtype, data):
    _, temps = good
    api_fails(tmp_path, TypeError, r"volume must hold real numbers.*got dtype " + dtype.replace("<", ".?"), data(), temps)


@pytest.mark.parametrize("dtype", ["complex64", "bool"])
def test_non_numeric_dtype_cli(tmp_path, capsys, good, dtype):
    _, temps = good
    src = write_zarr_input(tmp_path / "in.zarr", np.ones(SHAPE, dtype), temps)
    cli_fails(tmp_path, capsys, [src, "--quiet"], r"real numbers.*" + dtype)


@pytest.mark.parametrize("volume", [[[[1.0]]], "series.zarr", None], ids=["list", "path-string", "none"])
def test_volume_not_an_array_api(tmp_path, good, volume):
    _, temps = good
    api_fails(tmp_path, TypeError, r"volume must be a numpy, zarr or dask array", volume, temps)


def test_integer_counts_are_accepted(good):
    volume, temps = good
    res = xtec_flows.cluster(np.rint(volume).astype(np.uint16), temps, n_components=2)
    assert res.labels.shape == SHAPE[1:]


# ---------------------------------------------------------------------------------------
# temperatures
# ---------------------------------------------------------------------------------------

BAD_TEMPERATURES = [
    pytest.param([10, 20, 30, 40, 50], r"temperatures has 5 values but the volume has 6", id="too-short"),
    pytest.param([10, 20, 30, 40, 50, 60, 70], r"temperatures has 7 values but the volume has 6", id="too-long"),
    pytest.param([10, 20, 40, 30, 50, 60], r"strictly increasing or strictly decreasing", id="non-monotonic"),
    pytest.param([10, 20, 20, 30, 40, 50], r"duplicates", id="duplicate"),
    pytest.param([10, 20, 30, float("nan"), 50, 60], r"temperatures must be finite", id="nan"),
]


@pytest.mark.parametrize("temps, match", BAD_TEMPERATURES)
def test_bad_temperatures_api(tmp_path, good, temps, match):
    volume, _ = good
    api_fails(tmp_path, ValueError, match, volume, temps)


@pytest.mark.parametrize("temps, match", BAD_TEMPERATURES)
def test_bad_temperatures_cli(tmp_path, capsys, good, temps, match):
    volume, good_temps = good
    src = write_zarr_input(tmp_path / "in.zarr", volume, good_temps)
    cli_fails(tmp_path, capsys, [src, "--quiet", "--temperatures", ",".join(str(t) for t in temps)], match)


def test_bad_temperatures_stored_in_input(tmp_path, capsys, good):
    volume, _ = good
    src = write_zarr_input(tmp_path / "in.zarr", volume, [10, 20, 30, 30, 40, 50])
    cli_fails(tmp_path, capsys, [src, "--quiet"], r"duplicates")


def test_missing_and_non_numeric_temperatures(tmp_path, capsys, good):
    volume, _ = good
    api_fails(tmp_path, ValueError, r"temperatures are required.*--temperatures", volume, None)
    api_fails(tmp_path, TypeError, r"temperatures must be numbers", volume,
              ["a", "b", "c", "d", "e", "f"])
    src = write_zarr_input(tmp_path / "in.zarr", volume)  # no temperatures attribute
    cli_fails(tmp_path, capsys, [src, "--quiet"], r"temperatures are required.*--temperatures")
    argparse_rejects(capsys, ["cluster", src, "-o", tmp_path / "x", "--temperatures", "10,abc,30"], r"comma-separated numbers")
    assert not (tmp_path / "x").exists()


def test_fewer_than_three_temperatures(tmp_path, capsys, good):
    volume, _ = good
    vol = volume[:2]
    api_fails(tmp_path, ValueError, r"volume has 2 temperatures.*at least 3", vol, [10.0, 20.0])
    src = write_zarr_input(tmp_path / "two.zarr", np.ascontiguousarray(vol), [10.0, 20.0])
    cli_fails(tmp_path, capsys, [src, "--quiet"], r"2 temperatures.*at least 3")
    cli_fails(tmp_path, capsys, [src, "--quiet", "--temperatures", "10,20"], r"at least 3")


def test_decreasing_temperatures_are_accepted(good):
    volume, temps = good
    res = xtec_flows.cluster(volume[::-1].copy(), temps[::-1].copy(), n_components=2)
    assert res.temperatures[0] > res.temperatures[-1]


# ---------------------------------------------------------------------------------------
# threshold and number of components
# ---------------------------------------------------------------------------------------


def test_nothing_passes_explicit_threshold(tmp_path, capsys, good):
    volume, temps = good
    above = float(volume.mean(axis=0).max()) * 2
    api_fails(tmp_path, ValueError, r"no voxel passed the threshold", volume, temps, threshold=above)
    src = write_zarr_input(tmp_path / "in.zarr", volume, temps)
    cli_fails(tmp_path, capsys, [src, "--quiet", "--threshold", repr(above)], r"no voxel passed the threshold.*lower")


@pytest.mark.parametrize("value", [0.0, -5.0, float("nan")])
def test_non_positive_explicit_threshold(tmp_path, good, value):
    volume, temps = good
    api_fails(tmp_path, ValueError, r"threshold .*must be a number > 0", volume, temps, threshold=value)


@pytest.mark.parametrize("k, exc, match", [
    (0, ValueError, r"n_components must be an integer from 1 to 127; got 0"),
    (-2, ValueError, r"n_components must be an integer from 1 to 127; got -2"),
    (2.5, TypeError, r"n_components must be an integer"),
    (True, TypeError, r"n_components must be an integer"),
    (128, ValueError, r"n_components must be an integer from 1 to 127; got 128 \(labels are int8\)"),
])
def test_bad_n_components_api(tmp_path, good, k, exc, match):
    volume, temps = good
    api_fails(tmp_path, exc, match, volume, temps, n_components=k)


def test_n_components_larger_than_trajectories(tmp_path, capsys, good):
    volume, temps = good
    api_fails(tmp_path, ValueError, r"n_components=100 is larger than the number of thresholded voxels", volume, temps,
              n_components=100, threshold=float(np.sort(volume.mean(axis=0).ravel())[-50]))
    # even with no threshold at all, K cannot exceed the number of voxels
    small = np.ascontiguousarray(volume[:, :5, :5])
    api_fails(tmp_path, ValueError, r"larger than the number of thresholded voxels \(25\)", small, temps,
              n_components=26, threshold="none")
    api_fails(tmp_path, ValueError, r"larger than the number of peaks", volume, temps, n_components=120, mode="peaks")

    src = write_zarr_input(tmp_path / "in.zarr", volume, temps)
    cli_fails(tmp_path, capsys, [src, "--quiet", "-k", "120", "--threshold", "simple"], r"n_components=120 is larger")
    cli_fails(tmp_path, capsys, [src, "--quiet", "-k", "0"], r"n_components must be an integer from 1 to 127")
    cli_fails(tmp_path, capsys, [src, "--quiet", "-k", "-3"], r"n_components must be an integer from 1 to 127")


# ---------------------------------------------------------------------------------------
# unknown names
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "x"}, r"mode must be one of \('d', 's', 'peaks'\); got 'x'"),
    ({"mode": "D"}, r"mode must be one of"),
    ({"rescale": "log"}, r"rescale must be one of .*got 'log'"),
    ({"threshold": "otsu"}, r"threshold must be one of .*got 'otsu'"),
    ({"mask": "nonzero"}, r"mask must be one of .*got 'nonzero'"),
    ({"nonfinite": "ignore"}, r"nonfinite must be one of .*got 'ignore'"),
])
def test_unknown_names_api(tmp_path, good, kwargs, match):
    volume, temps = good
    api_fails(tmp_path, ValueError, match, volume, temps, **kwargs)


def test_smoothing_kernel_errors_api(tmp_path, good):
    from xtec_flows.numerics.smoothing import SmoothingKernel

    volume, temps = good
    with pytest.raises(ValueError, match=r"smoothing kind must be one of"):
        SmoothingKernel(kind="gauss")
    with pytest.raises(ValueError, match=r"periodic smoothing kernel needs unit_cell"):
        SmoothingKernel(kind="periodic")
    api_fails(tmp_path, ValueError, r"smoothing applies to mode 's' only", volume, temps, smoothing=SmoothingKernel())
    api_fails(tmp_path, TypeError, r"smoothing must be a SmoothingKernel", volume, temps, mode="s", smoothing="local")
    api_fails(tmp_path, ValueError, r"unit_cell has 3 entries but the grid has 2 spatial dims", volume, temps,
              mode="s", smoothing=SmoothingKernel(kind="periodic", unit_cell=(16, 16, 16)))


@pytest.mark.parametrize("option, value, match", [
    ("--mode", "x", r"invalid choice: 'x'"),
    ("--rescale", "log", r"invalid choice: 'log'"),
    ("--threshold", "otsu", r"--threshold must be kl, simple, none or a mean intensity"),
    ("--mask", "nonzero", r"invalid choice: 'nonzero'"),
    ("--kernel", "gauss", r"invalid choice: 'gauss'"),
    ("--smoothing-weights", "box", r"invalid choice: 'box'"),
    ("-k", "three", r"invalid int value"),
    ("--unit-cell", "a,b", r"comma-separated integers"),
])
@pytest.mark.parametrize("command", ["cluster", "bic"])
def test_unknown_names_cli(tmp_path, capsys, good, option, value, match, command):
    if option == "-k" and command == "bic":
        option, value, match = "--k", "4..2", r"expected a range like 2..10"
    volume, temps = good
    src = write_zarr_input(tmp_path / "in.zarr", volume, temps)
    out = tmp_path / "out"
    argparse_rejects(capsys, [command, src, "-o", out, option, value], match)
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# output paths
# ---------------------------------------------------------------------------------------


def test_output_holding_other_data_cli(tmp_path, capsys, good):
    volume, temps = good
    src = write_zarr_input(tmp_path / "in.zarr", volume, temps)

    foreign = tmp_path / "foreign"
    (foreign / "zarr_like").mkdir(parents=True)
    (foreign / "zarr_like" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    (foreign / "notes.txt").write_text("do not delete")
    before = tree_bytes(foreign)
    for extra in ([], ["--overwrite"]):
        for command in ("cluster", "bic"):
            capsys.readouterr()
            argv = [command, str(src), "-o", str(foreign), "--quiet", *extra] + (["--no-plots"] if command == "cluster" else [])
            assert cli.main(argv) == 2
            err = capsys.readouterr().err
            assert "already holds other data" in err and str(foreign) in err
            assert tree_bytes(foreign) == before

    a_file = tmp_path / "result.txt"
    a_file.write_text("a file")
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert cli.main(["cluster", str(src), "-o", str(a_file), "--quiet", "--no-plots", *extra]) == 2
        assert "is not a directory" in capsys.readouterr().err
        assert a_file.read_text() == "a file"
    assert not list(tmp_path.glob(".*partial*"))


def test_output_earlier_result_needs_overwrite(tmp_path, capsys, good):
    volume, temps = good
    src = write_zarr_input(tmp_path / "in.zarr", volume, temps)
    out = cli_ok(tmp_path, capsys, [src, "-k", "2"])
    before = tree_bytes(out)
    capsys.readouterr()
    assert cli.main(["cluster", str(src), "-o", str(out), "-k", "3", "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "already holds an xtec-flows result" in err and "--overwrite" in err
    assert tree_bytes(out) == before
    with pytest.raises(FileExistsError, match=r"--overwrite"):
        zarr_io.prepare_output_dir(out, overwrite=False)
    assert zarr_io.prepare_output_dir(out, overwrite=True) == out
    assert tree_bytes(out) == before  # preparing never deletes


def test_api_labels_store_with_other_data(tmp_path, good):
    volume, temps = good
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data.txt").write_text("measurements")
    before = tree_bytes(target)
    try:
        with pytest.raises(FileExistsError, match=r"other data"):
            xtec_flows.cluster(volume, temps, n_components=2, labels_store=str(target))
    finally:
        assert tree_bytes(target) == before


def test_failed_run_creates_no_parent_directories(tmp_path, capsys, good):
    volume, temps = good
    src = write_zarr_input(tmp_path / "in.zarr", volume, temps)
    out = tmp_path / "new" / "nested" / "result"
    capsys.readouterr()
    assert cli.main(["cluster", str(src), "-o", str(out), "--quiet", "--no-plots", "--threshold", "1e12"]) == 2
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------
# input paths
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["cluster", "bic"])
def test_missing_input_path(tmp_path, capsys, command):
    missing = tmp_path / "nope.zarr"
    cli_fails(tmp_path, capsys, [missing, "--quiet"], r"input '.*nope\.zarr' does not exist", command=command)
    cli_fails(tmp_path, capsys, [f"{tmp_path / 'nope.nxs'}:/entry/data/data", "--quiet"],
              r"input file '.*nope\.nxs' does not exist", command=command)
    with pytest.raises(FileNotFoundError, match=r"nope\.zarr"):
        zarr_io.open_volume(missing)
    with pytest.raises(FileNotFoundError, match=r"nope\.nxs"):
        nexus.open_volume(tmp_path / "nope.nxs", "/entry/data/data")


def test_input_not_zarr(tmp_path, capsys):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    cli_fails(tmp_path, capsys, [empty, "--quiet"], r"is not a readable zarr array or group")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cli_fails(tmp_path, capsys, [text, "--quiet"], r"notes\.txt")
    with pytest.raises(ValueError, match=r"not a readable zarr"):
        zarr_io.open_volume(empty)


def test_hdf5_bad_inner_path(tmp_path, capsys, good):
    volume, temps = good
    spec = nexus.write_series(tmp_path / "s.nxs", volume, temps)
    path = spec.rsplit(":", 1)[0]
    cli_fails(tmp_path, capsys, [f"{path}:/entry/data/nothing", "--quiet"], r"has no dataset '/entry/data/nothing'")
    import h5py

    with h5py.File(path, "a") as f:
        f.create_group("entry/empty")
    cli_fails(tmp_path, capsys, [f"{path}:/entry/empty", "--quiet"], r"is a group, not a dataset")
    text = tmp_path / "fake.nxs"
    text.write_text("not hdf5")
    cli_fails(tmp_path, capsys, [f"{text}:/entry/data/data", "--quiet"], r"not a readable HDF5/NeXus file")


def test_zarr_group_with_two_arrays_and_no_signal(tmp_path, capsys, good):
    volume, temps = good
    vol4 = np.broadcast_to(volume[:, None], (SHAPE[0], 3) + SHAPE[1:]).astype(np.float32)
    path = tmp_path / "two.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.attrs["temperatures"] = [float(t) for t in temps]
    for name in ("a", "b"):
        arr = group.create_array(name, shape=vol4.shape, dtype="float32")
        arr[...] = vol4
    with pytest.raises(ValueError, match=r"holds 2 arrays of 3\+ dims.*'signal' attribute"):
        zarr_io.open_volume(path)
    for command in ("cluster", "bic"):
        cli_fails(tmp_path, capsys, [path, "--quiet"], r"holds 2 arrays.*'signal' attribute", command=command)

    # naming the array, or setting 'signal', resolves it
    out = cli_ok(tmp_path, capsys, [f"{path}/a", "-k", "2", "--temperatures", ",".join(map(str, temps))])
    assert zarr.open_array(str(out / "labels.zarr"), mode="r").shape == vol4.shape[1:]
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["signal"] = "missing"
    cli_fails(tmp_path, capsys, [path, "--quiet"], r"names signal 'missing', but it holds no such array")
    group.attrs["signal"] = "b"
    node, t, _ = zarr_io.open_volume(path)
    assert node.shape == vol4.shape
    np.testing.assert_allclose(t, temps)


def test_bic_bad_input_writes_nothing(tmp_path, capsys, good):
    volume, temps = good
    vol = volume.copy()
    vol[0, 0, 0] = np.nan
    src = write_zarr_input(tmp_path / "in.zarr", vol, temps)
    cli_fails(tmp_path, capsys, [src, "--quiet", "--k", "2..3"], r"--mask-nonfinite", command="bic")
    src2 = write_zarr_input(tmp_path / "in2.zarr", volume, temps)
    cli_fails(tmp_path, capsys, [src2, "--quiet", "--k", "0..2"], r"k must be an integer >= 1", command="bic")
    cli_fails(tmp_path, capsys, [src2, "--quiet", "--temperatures", "1,2,3"], r"temperatures has 3 values", command="bic")
