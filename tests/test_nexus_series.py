"""NeXus series as nxrefine and CHESS QM2 write them, and the series check.

The files are written with the nexusformat library the way nxrefine does: one wrapper
``<sample>_<label>.nxs`` per temperature holding ``entry/sample/temperature`` (with units) and
``entry/masked_transform``, an NXdata whose signal is an external link to
``<label>/masked_transform.nxs:/entry/data/v``; the reader itself uses h5py.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

nx = pytest.importorskip("nexusformat.nexus")

from xtec_flows import cli  # noqa: E402
from xtec_flows.io import nexus  # noqa: E402
from xtec_flows.series_check import SeriesCheckError, SliceFacts, check_series  # noqa: E402
from xtec_flows.synthetic import make_volume  # noqa: E402

SHAPE = (10, 16, 16, 16)


@pytest.fixture(scope="module")
def series():
    volume, temps, _ = make_volume(SHAPE, seed=3)
    return volume, temps


def write_wrapper(directory, label, volume, temperature, units="K", axes=("Ql", "Qk", "Qh"), group="masked_transform",
                  frame_time=None, stub=False):
    """One nxrefine temperature: ``<label>/masked_transform.nxs`` and the wrapper ``sample_<label>.nxs``.

    ``volume`` is (L, K, H); with ``axes`` H,K,L it is stored transposed, as legacy files are.
    """
    os.makedirs(directory / label, exist_ok=True)
    target = directory / label / "masked_transform.nxs"
    stored = volume if tuple(axes) != ("H", "K", "L") else volume.transpose(2, 1, 0)
    if stub:  # the reduction created the file but never wrote the transform
        with h5py.File(target, "w") as f:
            f.create_dataset("entry/data/v", shape=stored.shape, dtype="f4", chunks=True)
    else:
        nx.NXroot(nx.NXentry(nx.NXdata(nx.NXfield(stored, name="v"), name="data"))).save(str(target), mode="w")
    q = {"L": np.linspace(-2, 2, volume.shape[0]), "K": np.linspace(-1, 1, volume.shape[1]),
         "H": np.linspace(-3, 3, volume.shape[2])}
    fields = [nx.NXfield(q[a[-1].upper()], name=a) for a in axes]
    root = nx.NXroot(nx.NXentry())
    root.entry.sample = nx.NXsample()
    root.entry.sample.temperature = nx.NXfield(temperature, units=units)
    link = nx.NXlink("/entry/data/v", file=os.path.join(label, "masked_transform.nxs"), name="data")
    root.entry[group] = nx.NXdata(link, fields)
    root.entry.attrs["default"] = group
    root.attrs["default"] = "entry"
    if frame_time is not None:
        root["f1"] = nx.NXentry(nx.NXinstrument(nx.NXdetector(frame_time=nx.NXfield(frame_time, units="s"),
                                                              name="detector"), name="instrument"))
    path = directory / f"sample_{label}.nxs"
    root.save(str(path), mode="w")
    return str(path)


def write_series_files(directory, volume, temps, order, **kwargs):
    """Wrappers for every temperature, listed in ``order``; even slices in K, odd ones in °C."""
    paths = []
    for i in order:
        t, units = (temps[i], "K") if i % 2 == 0 else (temps[i] - 273.15, "°C")
        paths.append(write_wrapper(directory, f"{i:02d}", volume[i], t, units=units, **kwargs))
    return paths


def test_wrappers_shuffled_units_mixed(tmp_path, series):
    volume, temps = series
    order = np.random.default_rng(0).permutation(len(temps))
    paths = write_series_files(tmp_path, volume, temps, order)
    s = nexus.open_per_temperature(paths)
    assert s.temperature_unit == "K"
    np.testing.assert_allclose(s.temperatures, temps, rtol=0, atol=1e-9)
    assert s.volume.shape == volume.shape and s.volume.dims == ("T", "L", "K", "H")
    np.testing.assert_array_equal(s.volume[...], volume)
    np.testing.assert_array_equal(s.volume[2:5, 3:9, :, 1], volume[2:5, 3:9, :, 1])
    np.testing.assert_allclose(s.volume.coords["H"], np.linspace(-3, 3, SHAPE[3]))
    assert [p for p in s.sources] == [paths[list(order).index(i)] for i in range(len(temps))]
    assert [r["problem"] for r in s.audit.rows] == ["order"]
    # open_series (xtec-flows import) goes the same way
    vol, t, sources = nexus.open_series(paths)
    np.testing.assert_array_equal(vol[...], volume)
    s.volume.close()


def test_units_converted_to_the_most_common(tmp_path, series):
    volume, temps = series
    paths = [write_wrapper(tmp_path, f"{i}", volume[i], temps[i] - 273.15, units="C") for i in range(4)]
    paths.append(write_wrapper(tmp_path, "4", volume[4], temps[4] * 1000, units="mK"))
    s = nexus.open_per_temperature(paths)
    assert s.temperature_unit == "C"
    np.testing.assert_allclose(s.temperatures, temps[:5] - 273.15, atol=1e-9)
    with pytest.raises(ValueError, match=r"sample_x\.nxs.*unknown temperature units 'furlongs'"):
        nexus.open_per_temperature(paths + [write_wrapper(tmp_path, "x", volume[5], 3.0, units="furlongs")])


def test_legacy_hkl_axes_and_transform_group(tmp_path, series):
    volume, temps = series
    paths = [write_wrapper(tmp_path, f"{i}", volume[i], temps[i], axes=("H", "K", "L"), group="transform")
             for i in range(5)]
    s = nexus.open_per_temperature(paths[::-1])
    assert s.volume.dims == ("T", "L", "K", "H")
    np.testing.assert_array_equal(s.volume[...], volume[:5])
    np.testing.assert_array_equal(s.volume[1, 2:7, 4], volume[1, 2:7, 4])
    np.testing.assert_allclose(s.volume.coords["L"], np.linspace(-2, 2, SHAPE[1]))


@pytest.mark.parametrize("axes", [("Te", "Ql", "Qk", "Qh"), ("Te", "Qh", "Qk", "Ql")])
def test_tutorial_single_4d_file(tmp_path, series, axes):
    volume, temps = series
    stored = volume if axes[1] == "Ql" else volume.transpose(0, 3, 2, 1)
    fields = [nx.NXfield(temps, name="Te", units="K")] + [nx.NXfield(np.arange(n, dtype=float), name=a)
                                                          for a, n in zip(axes[1:], stored.shape[1:])]
    root = nx.NXroot(nx.NXentry(nx.NXdata(nx.NXfield(stored, name="data"), fields, name="data")))
    path = tmp_path / "tutorial.nxs"
    root.save(str(path), mode="w")
    vol, t = nexus.open_volume(path)
    np.testing.assert_array_equal(t, temps)
    assert vol.shape == volume.shape and vol.dims == ("T", "L", "K", "H")
    np.testing.assert_array_equal(vol[:, 4:8, 2:5, 7], volume[:, 4:8, 2:5, 7])


def run_cli(args, capsys):
    rc = cli.main(["cluster", *map(str, args), "-k", "3", "--n-init", "1", "--no-plots", "--quiet", "--json"])
    return rc, capsys.readouterr()


def test_cli_cluster_several_files(tmp_path, series, capsys):
    volume, temps = series
    paths = write_series_files(tmp_path, volume, temps, np.random.default_rng(1).permutation(len(temps)))
    out = tmp_path / "out"
    rc, io = run_cli([*paths, "-o", out], capsys)
    assert rc == 0, io.err
    doc = json.loads((out / "result.json").read_text())
    np.testing.assert_allclose(doc["temperatures"], temps, atol=1e-9)
    check = doc["series_check"]
    assert check["n_slices"] == check["n_kept"] == len(temps) and check["temperature_unit"] == "K"
    assert check["dims"] == ["T", "L", "K", "H"] and len(check["coords"]["K"]) == SHAPE[2]
    # the same series clustered from one in-memory array gives the same labels
    ref = tmp_path / "ref.nxs"
    spec = nexus.write_series(ref, volume, temps)
    rc, io = run_cli([spec, "-o", tmp_path / "ref"], capsys)
    assert rc == 0, io.err
    import zarr

    a = zarr.open_array(str(out / "labels.zarr"), mode="r")[...]
    b = zarr.open_array(str(tmp_path / "ref" / "labels.zarr"), mode="r")[...]
    np.testing.assert_array_equal(a, b)


BAD = {
    "duplicate": ("duplicate", r"temperature .* also in"),
    "shape": ("shape", r"shape \(16, 16, 12\), most slices \(16, 16, 16\)"),
    "stub": ("empty", r"empty stub: dataset never written"),
    "exposure": ("exposure", r"exposure 2, most slices 1"),
}


def bad_series(tmp_path, volume, temps, kind):
    paths = [write_wrapper(tmp_path, f"{i:02d}", volume[i], temps[i], frame_time=1.0) for i in range(8)]
    label = "bad"
    if kind == "duplicate":
        bad = write_wrapper(tmp_path, label, volume[9], temps[3], frame_time=1.0)
    elif kind == "shape":
        bad = write_wrapper(tmp_path, label, volume[9][:, :, :12], temps[9], frame_time=1.0)
    elif kind == "stub":
        bad = write_wrapper(tmp_path, label, volume[9], temps[9], frame_time=1.0, stub=True)
    else:
        bad = write_wrapper(tmp_path, label, volume[9], temps[9], frame_time=2.0)
    return paths[:4] + [bad] + paths[4:], bad


@pytest.mark.parametrize("kind", list(BAD))
def test_series_check_exclude(tmp_path, series, capsys, kind):
    volume, temps = series
    paths, bad = bad_series(tmp_path, volume, temps, kind)
    out = tmp_path / "out"
    rc, io = run_cli([*paths, "-o", out, "--series-check", "exclude"], capsys)
    assert rc == 0, io.err
    check = json.loads((out / "result.json").read_text())["series_check"]
    problem, detail = BAD[kind]
    excluded = [r for r in check["findings"] if r["action"] == "excluded"]
    assert [(r["source"], r["problem"]) for r in excluded] == [(bad, problem)]
    assert check["n_kept"] == 8 and bad not in check["sources"]
    import re

    assert re.search(detail, excluded[0]["detail"])


@pytest.mark.parametrize("kind", list(BAD))
def test_series_check_refuse(tmp_path, series, capsys, kind):
    volume, temps = series
    paths, bad = bad_series(tmp_path, volume, temps, kind)
    out = tmp_path / "deeper" / "out"
    rc, io = run_cli([*paths, "-o", out, "--series-check", "refuse"], capsys)
    assert rc == 2
    problem, detail = BAD[kind]
    assert "series check refused" in io.err and bad in io.err and problem in io.err
    assert "--series-check exclude" in io.err
    assert not (tmp_path / "deeper").exists()


def test_missing_linked_file_is_an_empty_slice(tmp_path, series):
    volume, temps = series
    paths = [write_wrapper(tmp_path, f"{i}", volume[i], temps[i]) for i in range(5)]
    os.remove(tmp_path / "2" / "masked_transform.nxs")
    s = nexus.open_per_temperature(paths)
    (row,) = [r for r in s.audit.rows if r["action"] == "excluded"]
    assert row["source"] == paths[2] and row["problem"] == "empty" and "does not exist" in row["detail"]
    np.testing.assert_array_equal(s.volume[...], volume[[0, 1, 3, 4]])


def test_check_series_pure():
    f = [SliceFacts(f"s{i}", t, (4, 4, 4), ("L", "K", "H"), exposure=1.0, monitor=5.0)
         for i, t in enumerate([10.0, 20.0, 30.0, 60.0, 70.0])]
    audit = check_series(f)
    assert audit.kept == [0, 1, 2, 3, 4]
    (gap,) = audit.rows
    assert gap["problem"] == "gap" and gap["action"] == "reported" and gap["source"] == "s3"
    f.append(SliceFacts("zero", 80.0, (4, 4, 4), ("L", "K", "H"), empty="all zeros"))
    f.append(SliceFacts("mon", 90.0, (4, 4, 4), ("L", "K", "H"), monitor=7.0))
    f.append(SliceFacts("axes", 95.0, (4, 4, 4), ("x", "y", "z")))
    audit = check_series(f)
    assert {r["source"]: r["problem"] for r in audit.excluded} == {"zero": "empty", "mon": "monitor", "axes": "axes"}
    with pytest.raises(SeriesCheckError, match=r"zero: empty \(all zeros\); re-run the reduction"):
        check_series(f, on_problem="refuse")
    with pytest.raises(ValueError, match=r"on_problem must be one of \('exclude', 'refuse'\); got 'drop'"):
        check_series(f, on_problem="drop")


def test_all_zero_volume(tmp_path, series):
    volume, temps = series
    paths = [write_wrapper(tmp_path, f"{i}", volume[i], temps[i]) for i in range(4)]
    paths.append(write_wrapper(tmp_path, "z", np.zeros_like(volume[4]), temps[4]))
    s = nexus.open_per_temperature(paths)
    assert [(r["source"], r["detail"]) for r in s.audit.excluded] == [(paths[4], "all zeros")]
