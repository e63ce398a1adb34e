"""1-D series (T, q) — powder, line scans, PDFs — and ordering parameters taken as given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

import xtec_flows
from xtec_flows import cli
from xtec_flows.numerics.classes import order_parameter_shape

REAL = Path("/work/shared/data/17bm_insitu_Y2Mn2O7_synthesis.npz")


def powder_series(n_t=20, n_q=600, seed=0):
    """(T, q) counts: static peaks, peaks of a phase that vanishes at Tc = 180, and background.

    Returns (series, temperatures, truth) with truth 0 = background, 1 = static, 2 = vanishing.
    """
    rng = np.random.default_rng(seed)
    t = np.linspace(20, 300, n_t)
    q = np.arange(n_q, dtype=float)
    static_centres = np.arange(40, n_q, 80.0)
    order_centres = static_centres + 40
    peak = lambda centres: np.exp(-0.5 * ((q[:, None] - centres[None, :]) / 2.0) ** 2).sum(axis=1)  # noqa: E731
    static, order = peak(static_centres), peak(order_centres)
    lam = (50.0 + 2000.0 * static[None, :] * (1 - 2e-4 * t[:, None])
           + 1500.0 * order[None, :] * order_parameter_shape(t, 180.0, 0.3)[:, None])
    truth = np.zeros(n_q, np.int8)
    truth[static > 0.02] = 1
    truth[order > 0.02] = 2
    return rng.poisson(lam).astype(np.float32), t, truth


@pytest.mark.parametrize("mode", ["d", "s", "peaks"])
def test_fixed_k_on_a_1d_series(mode):
    series, t, truth = powder_series()
    result = xtec_flows.cluster(series, t, mode=mode, n_components=2, random_state=0)
    labels = result.labels[...]
    assert labels.shape == (600,)
    clustered = labels >= 0
    assert clustered[truth > 0].mean() > 0.9 and clustered[truth == 0].mean() < 0.1
    # The two peak families get different labels.
    sel = clustered & (truth > 0)
    agree = [(labels[sel & (truth == c)] == np.bincount(labels[sel & (truth == c)]).argmax()).mean() for c in (1, 2)]
    assert min(agree) > 0.9
    assert np.bincount(labels[sel & (truth == 1)]).argmax() != np.bincount(labels[sel & (truth == 2)]).argmax()


def test_classes_auto_on_a_1d_series_finds_the_vanishing_phase():
    series, t, truth = powder_series(n_t=24)
    result = xtec_flows.cluster(series, t, classes="auto", random_state=1)
    labels = result.labels[...]
    order = [c for c in result.classes if c["kind"] == "order_parameter"]
    assert len(order) == 1 and abs(order[0]["tc"] - 180.0) <= t[1] - t[0]
    sel = labels == order[0]["label"]
    assert (truth[sel] == 2).mean() > 0.9 and sel[truth == 2].mean() > 0.8


def test_ordering_as_given_accepts_a_ramp_then_a_hold_and_monotonic_refuses_it():
    series, _, _ = powder_series(n_t=20)
    ramp_hold = np.concatenate([np.linspace(20, 300, 14), np.full(6, 300.0)])
    with pytest.raises(ValueError, match="ordering='as-given'"):
        xtec_flows.cluster(series, ramp_hold, n_components=2)
    result = xtec_flows.cluster(series, ramp_hold, n_components=2, ordering="as-given")
    assert result.params.to_dict()["ordering"] == "as-given"
    assert "ordering" not in xtec_flows.engine.ClusterParams().to_dict()
    with pytest.raises(ValueError, match="distinct values.*pass the times as the coordinate"):
        xtec_flows.cluster(series, ramp_hold, classes="auto", ordering="as-given")
    with pytest.raises(ValueError, match="ordering must be one of"):
        xtec_flows.cluster(series, ramp_hold, ordering="sorted")


def test_cli_1d_series_writes_a_profile_map(tmp_path, capsys):
    series, t, _ = powder_series()
    arr = zarr.open_array(str(tmp_path / "p.zarr"), mode="w", shape=series.shape, dtype="float32")
    arr[...] = series
    arr.attrs["temperatures"] = [float(v) for v in t]
    out = tmp_path / "out"
    assert cli.main(["cluster", str(tmp_path / "p.zarr"), "-o", str(out), "-k", "2", "--quiet", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["shape"] == [600]
    assert (out / "qmap.png").stat().st_size > 10_000
    assert zarr.open_array(str(out / "labels.zarr"), mode="r").shape == (600,)


@pytest.mark.skipif(not REAL.exists(), reason=f"the real 17-BM series is not on this machine ({REAL})")
def test_real_powder_series_in_time_order():
    data = np.load(REAL)
    intensity, minutes, celsius = data["intensity"], data["time_min"], data["temperature_C"]
    # The temperature ramps, then holds: refused as a temperature series, taken as given in time.
    with pytest.raises(ValueError, match="duplicates"):
        xtec_flows.cluster(intensity, celsius, n_components=4)
    result = xtec_flows.cluster(intensity, celsius, n_components=4, ordering="as-given")
    assert result.labels.shape == (2500,) and result.counts.sum() == result.n_thresholded > 100
