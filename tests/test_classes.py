"""Class discovery: curve models, grouping, stability, the engine's classes='auto', ICL."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import curve_fit

import xtec_flows
from xtec_flows import synthetic
from xtec_flows.engine.class_discovery import STABLE_JACCARD, group_into_classes, measure_stability
from xtec_flows.numerics import classes as curves
from xtec_flows.numerics import stability
from xtec_flows.numerics.classes import ClassKind, CurveFit, component_moments, fit_curve, group_components
from xtec_flows.numerics.mixture import elbow
from xtec_flows.engine import ClusterParams

T24 = np.linspace(20.0, 300.0, 24)


def _order_curve(t, c, s, a, tc, beta):
    return c + s * curves._reduced(t) + a * curves.order_parameter_shape(t, tc, beta)


def _critical_curve(t, c, s, b, tc, w, gamma=2.0):
    return c + s * curves._reduced(t) + b * curves.critical_shape(t, tc, w, gamma)


@pytest.mark.parametrize("tc, beta", [(150.0, 0.33), (95.0, 0.2), (230.0, 0.5)])
def test_order_parameter_fit_recovers_tc_and_beta_like_scipy(tc, beta):
    rng = np.random.default_rng(1)
    true = _order_curve(T24, 0.3, -0.02, 2.0, tc, beta)
    sem = np.full(T24.size, 0.01)
    y = true + rng.normal(0, 0.01, T24.size)
    fit = fit_curve(T24, y, sem, kinds=("order",))
    assert fit.kind is ClassKind.ORDER_PARAMETER
    # Against scipy.optimize.curve_fit directly, started near the truth.
    p, cov = curve_fit(_order_curve, T24, y, p0=[0.3, 0.0, 1.5, tc + 3, 0.3], sigma=sem,
                       bounds=([-5, -5, 0, 21, 0.02], [5, 5, 10, 299, 3]))
    err = np.sqrt(np.diag(cov))
    assert abs(fit.tc - p[3]) < 0.1 * err[3] + 1e-3
    assert abs(fit.beta - p[4]) < 0.1 * err[4] + 1e-3
    assert fit.tc_err == pytest.approx(err[3], rel=0.05)
    # And the truth is within 3 sigma.
    assert abs(fit.tc - tc) < 3 * fit.tc_err
    assert abs(fit.beta - beta) < 3 * fit.beta_err


@pytest.mark.parametrize("width, gamma", [(25.0, 2.0), (8.0, 1.24)])
def test_critical_fit_recovers_tc_width_and_exponent_like_scipy(width, gamma):
    # A Lorentzian in T (gamma 2) and a rounded |T - Tc|^-1.24 power law (3-D Ising).
    rng = np.random.default_rng(2)
    y = _critical_curve(T24, 0.8, 0.05, 1.2, 140.0, width, gamma) + rng.normal(0, 0.01, T24.size)
    assert fit_curve(T24, y, np.full(T24.size, 0.01)).kind is ClassKind.CRITICAL
    fit = fit_curve(T24, y, np.full(T24.size, 0.01), kinds=("critical",))
    p, cov = curve_fit(_critical_curve, T24, y, p0=[0.8, 0.0, 1.0, 143.0, width * 0.8, 1.5],
                       sigma=np.full(T24.size, 0.01), bounds=([-5, -5, 0, 21, 1, 0.5], [5, 5, 10, 299, 280, 6]))
    err = np.sqrt(np.diag(cov))
    assert abs(fit.tc - 140.0) < 3 * fit.tc_err
    for i, got in ((3, fit.tc), (4, fit.width), (5, fit.gamma)):
        assert abs(got - p[i]) < 0.2 * err[i] + 1e-3
    assert abs(fit.gamma - gamma) < 3 * fit.gamma_err


def test_order_parameter_tc_is_not_pulled_by_a_sharp_critical_peak():
    # A CDW class's pooled mean relative trajectory from a synthetic volume (tc=81.55, beta=0.49,
    # critical_cutoff=0.025, 23 temperatures 12.7 K apart, monitor jitter divided out): the order
    # parameter ends between 70.9 and 83.6 K and the critical peak, narrower than a step, lights up
    # 83.6 K only. A Lorentzian at least one step wide could not follow it and the fit moved Tc
    # to 119 K instead, past the critical point.
    t = np.linspace(20.0, 300.0, 23)
    y = np.array([5.087, 4.123, 3.165, 2.243, 1.459, 1.489, 0.509, 0.375, 0.332, 0.311, 0.295, 0.294, 0.29,
                  0.289, 0.291, 0.294, 0.297, 0.3, 0.3, 0.298, 0.306, 0.308, 0.311])
    fit = fit_curve(t, y, np.full(t.size, 0.005), kinds=curves.MODELS_OF_KIND[ClassKind.ORDER_PARAMETER])
    assert fit.model == "order+critical"
    assert abs(fit.tc - 81.55) < 0.25 * (t[1] - t[0])
    assert abs(fit.beta - 0.49) < 0.1


def test_refinement_is_not_trapped_past_tc_where_the_order_term_covers_the_critical_tail():
    # Order parameter and a rounded critical peak sharing Tc = 140 K: on the grid the deepest
    # point is Tc ~ 152 K (the order term extended over the critical tail, a critical term with
    # gamma at its bound); refined from there alone the fit stays in that basin (weighted RSS
    # 47x the true one). Several starts find the true basin.
    t = np.linspace(20.0, 300.0, 38)
    rng = np.random.default_rng(0)
    y = (0.2 + 3.0 * curves.order_parameter_shape(t, 140.0, 0.4) + 0.5 * curves.critical_shape(t, 140.0, 10.0, 1.3)
         + rng.normal(0, 0.003, t.size))
    rss, starts = curves._grid_search(t, y[None], "order+critical")[0]
    assert abs(starts[0][0] - 140.0) > 5.0  # the grid's best point is in the wrong basin
    fit = fit_curve(t, y, np.full(t.size, 0.003))
    assert fit.model == "order+critical" and fit.kind is ClassKind.ORDER_PARAMETER
    assert abs(fit.tc - 140.0) < 3 * fit.tc_err + 0.5
    assert abs(fit.beta - 0.4) < 3 * fit.beta_err + 0.01
    assert abs(fit.gamma - 1.3) < 3 * fit.gamma_err + 0.05


def test_static_part_of_a_model_stays_non_negative():
    # A weak order parameter on a background that rises steeply with T: an unconstrained fit may
    # trade a negative baseline against the shape terms; a relative intensity cannot be negative.
    t = T24
    y = 0.05 + 0.9 * (t - t.min()) / np.ptp(t) + 1.0 * curves.order_parameter_shape(t, 150.0, 0.3)
    fit = fit_curve(t, y, np.full(t.size, 0.01), kinds=("order+critical",))
    assert fit.baseline - abs(fit.slope) >= -1e-9
    assert abs(fit.tc - 150.0) < 3 * fit.tc_err + 1.0


def test_model_jacobians_match_finite_differences(monkeypatch):
    # The refinement's analytic derivatives, for every model, at random points inside the box.
    captured = {}
    real = curves.levenberg_marquardt

    def spy(residuals, jacobian, x0, lower, upper, **kw):
        captured.update(residuals=residuals, jacobian=jacobian, lower=lower, upper=upper)
        return real(residuals, jacobian, x0, lower, upper, **kw)

    monkeypatch.setattr(curves, "levenberg_marquardt", spy)
    rng = np.random.default_rng(7)
    t = T24
    y = 0.3 + curves.order_parameter_shape(t, 140.0, 0.35) + 0.4 * curves.critical_shape(t, 140.0, 15.0, 1.5)
    w = rng.uniform(5.0, 50.0, t.size)
    for name in ("order", "critical", "order+critical", "onset"):
        start = (150.0, 0.3, 20.0, 2.0, np.array([0.3, 0.05, 1.0, 0.5]))
        curves._refine(t, y, w, name, [start])
        lo, hi = captured["lower"], captured["upper"]
        finite_hi = np.where(np.isfinite(hi), hi, lo + 5.0)
        for _ in range(3):
            x = lo + (finite_hi - lo) * rng.uniform(0.1, 0.9, lo.size)
            analytic = captured["jacobian"](x[None, :])[0]
            steps = 1e-6 * np.maximum(1.0, np.abs(x))
            numeric = np.stack([(captured["residuals"]((x + h)[None, :])[0] - captured["residuals"]((x - h)[None, :])[0])
                                / (2 * steps[i]) for i, h in enumerate(np.diag(steps))], axis=1)
            assert np.allclose(analytic, numeric, rtol=1e-5, atol=1e-6 * np.abs(analytic).max()), name


def test_bounded_levenberg_marquardt_agrees_with_scipy_and_solves_rows_independently():
    from scipy.optimize import least_squares

    from xtec_flows.numerics.bounded_lm import levenberg_marquardt

    t = np.linspace(0.0, 1.0, 30)
    truths = np.array([[2.0, 3.0, 0.5], [1.0, 8.0, 0.1], [0.5, 1.5, 0.0]])  # the last one's offset at its bound
    y = np.stack([a * np.exp(-b * t) + c for a, b, c in truths]) + np.random.default_rng(1).normal(0, 1e-3, (3, 30))
    y[2] -= 0.05  # pushes the third problem's offset against its lower bound 0
    lower, upper = np.array([0.0, 0.0, 0.0]), np.array([10.0, 20.0, 1.0])

    def residuals(X):
        return X[:, :1] * np.exp(-X[:, 1:2] * t) + X[:, 2:3] - y[: X.shape[0]]

    def jacobian(X):
        e = np.exp(-X[:, 1:2] * t)
        return np.stack([e, -X[:, :1] * t * e, np.ones_like(e)], axis=2)

    x0 = np.array([[1.0, 1.0, 0.2]] * 3)
    batch = levenberg_marquardt(residuals, jacobian, x0, lower, upper, ftol=1e-12, xtol=1e-12)
    assert batch.converged.all()
    for k in range(3):
        ref = least_squares(lambda x: x[0] * np.exp(-x[1] * t) + x[2] - y[k], x0[k], bounds=(lower, upper),
                            ftol=1e-12, xtol=1e-12, gtol=1e-12)
        assert np.allclose(batch.x[k], ref.x, atol=1e-6)
    assert batch.x[2, 2] == 0.0  # projected onto the bound, not past it
    # Row k of a batch is the problem k solved alone.
    one = levenberg_marquardt(lambda X: residuals(X), jacobian, x0[:1], lower, upper, ftol=1e-12, xtol=1e-12)
    assert np.allclose(one.x[0], batch.x[0])


def test_static_and_small_changes_are_static():
    rng = np.random.default_rng(3)
    # A 5 % Debye-Waller-like decrease with 1 % monitor-like wiggles: no transition.
    y = 1.05 - 0.1 * (T24 - 20) / 280 + rng.normal(0, 0.01, T24.size)
    fit = fit_curve(T24, y, np.full(T24.size, 0.001))
    assert fit.kind is ClassKind.STATIC
    assert fit.trend == "decreasing"
    assert math.isnan(fit.tc)


def test_onset_is_its_own_kind():
    y = 0.2 + 1.5 * curves.onset_shape(T24, 180.0, 0.3, 300.0)
    fit = fit_curve(T24, y, np.full(T24.size, 0.01))
    assert fit.kind is ClassKind.ONSET
    assert abs(fit.tc - 180.0) < 12


def test_too_few_temperatures_is_a_clear_error():
    t = np.linspace(10, 100, curves.MIN_TEMPERATURES - 1)
    with pytest.raises(ValueError, match="at least 8 temperatures"):
        fit_curve(t, np.ones(t.size), np.ones(t.size))


def _fit(kind, tc=math.nan, tc_err=1.0, trend="flat"):
    return CurveFit(kind=kind, model="x", tc=tc, tc_err=tc_err, trend=trend)


def test_grouping_merges_one_kind_at_one_tc_and_never_across_kinds():
    fits = [
        _fit(ClassKind.ORDER_PARAMETER, 150.0),  # core
        _fit(ClassKind.ORDER_PARAMETER, 151.5),  # shell: same transition
        _fit(ClassKind.CRITICAL, 150.5),  # the halo at the same Tc: another kind
        _fit(ClassKind.STATIC, trend="decreasing"),
        _fit(ClassKind.STATIC, trend="decreasing"),
        _fit(ClassKind.ORDER_PARAMETER, 60.0),  # a second transition
        _fit(ClassKind.OTHER),
        _fit(ClassKind.OTHER),
    ]
    counts = np.array([100, 200, 300, 400, 50, 80, 10, 20])
    groups = group_components(fits, counts, T24)
    as_sets = [(g.kind, sorted(g.components)) for g in groups]
    assert (ClassKind.ORDER_PARAMETER, [0, 1]) in as_sets
    assert (ClassKind.ORDER_PARAMETER, [5]) in as_sets
    assert (ClassKind.CRITICAL, [2]) in as_sets
    assert (ClassKind.STATIC, [3, 4]) in as_sets
    assert (ClassKind.OTHER, [6]) in as_sets and (ClassKind.OTHER, [7]) in as_sets
    # Canonical order: kinds in KIND_ORDER, order parameters by Tc descending.
    assert [g.kind for g in groups][:3] == [ClassKind.ORDER_PARAMETER, ClassKind.ORDER_PARAMETER, ClassKind.CRITICAL]
    assert groups[0].components == [0, 1]


def _rows(curve, n, rng, noise=0.05):
    """n trajectories (n, T) of one relative shape at random intensities with Poisson-like noise."""
    scale = rng.uniform(50, 500, size=(n, 1))
    return np.maximum(scale * curve[None, :] * (1 + rng.normal(0, noise, (n, curve.size))), 0.1)


def test_constructed_mixture_two_order_components_merge_critical_and_flat_do_not():
    rng = np.random.default_rng(4)
    order_a = _order_curve(T24, 0.2, 0.0, 2.5, 150.0, 0.33)
    order_b = _order_curve(T24, 0.45, 0.0, 1.4, 150.0, 0.33)  # a shell: same Tc, weaker order
    critical = _critical_curve(T24, 0.7, 0.0, 1.0, 150.0, 20.0)
    flat = np.full(T24.size, 1.0)
    blocks = [_rows(c, 500, rng) for c in (order_a, order_b, critical, flat)]
    raw = np.concatenate(blocks)
    labels = np.repeat(np.arange(4), 500)
    moments = component_moments(raw, labels, 4)
    rel = raw / raw.mean(axis=1, keepdims=True)
    rescaled_means = np.stack([rel[labels == k].mean(0) - 1 for k in range(4)])
    found = group_into_classes(T24, moments, rescaled_means)
    kinds = {tuple(c.components): c.kind for c in found.classes}
    assert kinds == {(0, 1): ClassKind.ORDER_PARAMETER, (2,): ClassKind.CRITICAL, (3,): ClassKind.STATIC}
    order = found.classes[0]
    assert order.n_voxels == 1000
    assert abs(order.fit.tc - 150.0) < max(3 * order.fit.tc_err, T24[1] - T24[0])
    # Raw class mean: exactly the mean of the member rows.
    np.testing.assert_allclose(order.mean_raw, raw[:1000].mean(0))


def test_component_moments_add_over_row_slabs():
    rng = np.random.default_rng(5)
    raw = rng.uniform(1, 10, (1000, 12))
    labels = rng.integers(0, 3, 1000)
    a = component_moments(raw, labels, 3)
    b = component_moments(raw, labels, 3, rows=97)
    np.testing.assert_allclose(a.relative_sum, b.relative_sum)
    np.testing.assert_array_equal(a.counts, np.bincount(labels, minlength=3))
    rel = raw / raw.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(a.relative_sum[1], rel[labels == 1].sum(0))


def test_adjusted_rand_index_matches_scikit_learn():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(6)
    for _ in range(5):
        a = rng.integers(-1, 4, 500)
        b = np.where(rng.random(500) < 0.7, a, rng.integers(0, 5, 500))
        assert stability.adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)


def test_match_labels_is_the_hungarian_optimum():
    ref = np.array([0] * 50 + [1] * 30 + [2] * 20)
    other = np.array([2] * 50 + [0] * 30 + [1] * 20)
    assert stability.match_labels(ref, other) == {0: 2, 1: 0, 2: 1}


def _discovery_with(kinds):
    classes = []
    from xtec_flows.engine.class_discovery import ClassDiscovery, PhysicalClass

    for label, kind in enumerate(kinds):
        classes.append(PhysicalClass(label, kind, [label], 1, CurveFit(kind=kind, model="x"),
                                     np.zeros(3), np.zeros(3), np.zeros(3)))
    return ClassDiscovery(classes, np.arange(len(kinds), dtype=np.int8), [], np.ones(3))


def test_stability_is_one_when_classes_reproduce_and_low_when_they_do_not():
    rng = np.random.default_rng(7)
    ref = np.repeat([0, 1, 2], 300)
    kinds = [ClassKind.ORDER_PARAMETER, ClassKind.CRITICAL, ClassKind.STATIC]
    # Reproduced with other label numbers: stable.
    d = _discovery_with(kinds)
    perm = np.array([2, 0, 1])
    measure_stability(d, ref, [(perm[ref], [kinds[1], kinds[2], kinds[0]])] * 2)
    assert [c.stability for c in d.classes] == [1.0, 1.0, 1.0]
    assert all(c.stable for c in d.classes) and d.stability["ari_mean"] == 1.0
    # Degenerate: classes 0 and 1 swap voxels at random between refits; class 2 holds.
    d = _discovery_with(kinds)
    refits = []
    for _ in range(3):
        other = ref.copy()
        mixed = ref < 2
        other[mixed] = rng.integers(0, 2, mixed.sum())
        refits.append((other, kinds))
    measure_stability(d, ref, refits)
    assert d.classes[0].stability < STABLE_JACCARD and d.classes[0].stable is False
    assert d.classes[1].stable is False
    assert d.classes[2].stability == 1.0
    # A matched class of another kind is no reproduction.
    d = _discovery_with(kinds)
    measure_stability(d, ref, [(ref, [ClassKind.STATIC, ClassKind.CRITICAL, ClassKind.STATIC])])
    assert d.classes[0].stability == 0.0 and d.classes[1].stability == 1.0


# -- the engine ---------------------------------------------------------------------------


def _found(labels, truth, cls):
    """Share of class cls's voxels in the label holding most of them, if that label is > 50 % cls."""
    best = None
    for lab in np.unique(labels[labels >= 0]):
        sel = labels == lab
        n = int((truth[sel] == cls).sum())
        if best is None or n > best[0]:
            best = (n, int(sel.sum()))
    return best[0] / (truth == cls).sum() if best and best[0] / best[1] > 0.5 else 0.0


@pytest.fixture(scope="module")
def off_default_run():
    """A setting the method was not developed on: other Tc, fewer temperatures, noisier, monitor jitter."""
    model = synthetic.SeriesModel(tc=110.0, exposure=0.5, monitor_jitter=0.04, monitor_seed=3, cdw_arms=2)
    volume, temps, truth = synthetic.make_volume((16, 40, 40, 40), model=model, seed=5)
    result = xtec_flows.cluster(volume, temps, classes="auto", random_state=5)
    return model, volume, temps, truth, result


def test_classes_auto_finds_cdw_and_halo_with_tc(off_default_run):
    model, _, temps, truth, result = off_default_run
    labels = result.labels[...]
    assert _found(labels, truth, synthetic.CDW) >= 0.8
    assert _found(labels, truth, synthetic.HALO) >= 0.8
    kinds = [c["kind"] for c in result.classes]
    assert "order_parameter" in kinds and "critical" in kinds
    order = next(c for c in result.classes if c["kind"] == "order_parameter")
    assert abs(order["tc"] - model.tc) <= temps[1] - temps[0]
    assert order["beta"] is not None and order["tc_err"] > 0
    # Labels are class labels; components map onto them through the classes' member lists.
    components = result.components[...]
    mapping = {comp: c["label"] for c in result.classes for comp in c["components"]}
    sel = components >= 0
    np.testing.assert_array_equal(labels[sel], np.vectorize(mapping.get)(components[sel]))
    assert np.array_equal(labels < 0, components < 0)
    assert sum(c["n_voxels"] for c in result.classes) == int(sel.sum())
    # The common temperature factor found the monitor jitter it was given.
    factor = np.asarray(result.to_dict()["temperature_factor"])
    true = model.monitor_factors(temps.size)
    assert np.corrcoef(factor, true / true.mean())[0, 1] > 0.9


def test_classes_auto_result_is_recorded(off_default_run):
    *_, result = off_default_run
    doc = result.to_dict()
    assert doc["n_classes"] == len(doc["classes"]) >= 3
    assert doc["params"]["classes"] == "auto" and doc["params"]["max_components"] == 8
    assert doc["stability"]["runs"] == 3 and len(doc["stability"]["ari"]) == 3
    # The restart continued is one of the 4, the one the others agree with most (ties: likelihood).
    agreement = doc["stability"]["restart_agreement"]
    assert len(agreement) == 4 and doc["stability"]["chosen_restart"] in range(4)
    assert agreement[doc["stability"]["chosen_restart"]] >= max(agreement) - 0.01
    from xtec_flows.cli import _human

    summary = _human("cluster", {**doc, "input": "volume", "output": "out"})
    assert f"restart {doc['stability']['chosen_restart']} of 4 continued" in summary
    for c in doc["classes"]:
        assert {"label", "components", "kind", "n_voxels", "tc", "tc_err", "beta", "beta_err", "stable",
                "mean_raw", "mean_rescaled", "fit_curve"} <= set(c)
        assert len(c["mean_raw"]) == 16


def test_well_separated_classes_are_stable():
    volume, temps, truth = synthetic.make_volume((16, 32, 32, 32), seed=0)
    result = xtec_flows.cluster(volume, temps, classes="auto", random_state=0)
    transition = [c for c in result.classes if c["kind"] in ("order_parameter", "critical")]
    assert len(transition) == 2
    assert all(c["stable"] and c["stability"] > 0.9 for c in transition)
    assert result.stability["ari_mean"] > 0.8


def test_fixed_k_parameters_and_results_are_unchanged():
    assert not set(ClusterParams().to_dict()) & {"classes", "max_components", "stability_runs"}
    volume, temps, _ = synthetic.make_volume((8, 24, 24), seed=1)
    a = xtec_flows.cluster(volume, temps, n_components=3)
    b = xtec_flows.cluster(volume, temps, n_components=3, classes=None, max_components=5)
    np.testing.assert_array_equal(a.labels[...], b.labels[...])
    assert a.components is None and a.classes is None and "classes" not in a.to_dict()


def test_bad_class_parameters_are_refused_before_reading():
    with pytest.raises(ValueError, match="max_components .* from 2 to 127; got 1"):
        ClusterParams(classes="auto", max_components=1)
    with pytest.raises(ValueError, match="classes must be one of"):
        ClusterParams(classes="yes")

    class Unreadable:
        shape = (6, 10, 10)
        dtype = np.dtype("float32")

        def __getitem__(self, item):  # pragma: no cover - must never be called
            raise AssertionError("read before the check")

    with pytest.raises(ValueError, match="needs at least 8 temperatures; this series has 6"):
        xtec_flows.cluster(Unreadable(), np.arange(6.0), classes="auto")


def test_cli_too_few_temperatures_writes_nothing(tmp_path):
    volume, temps, _ = synthetic.make_volume((6, 16, 16), seed=0)
    import zarr

    arr = zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=volume.shape, dtype="float32")
    arr[...] = volume
    arr.attrs["temperatures"] = [float(t) for t in temps]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "xtec_flows.cli", "cluster", str(tmp_path / "v.zarr"), "-o", str(out),
                           "--classes", "auto", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "at least 8 temperatures" in proc.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.zarr"]


def test_icl_and_elbow_in_select_n_components():
    volume, temps, _ = synthetic.make_volume((12, 32, 32, 32), seed=2)
    table = xtec_flows.select_n_components(volume, temps, range(2, 7), criterion="icl")
    assert [r["n_components"] for r in table] == [2, 3, 4, 5, 6]
    for r in table:
        assert r["icl"] == pytest.approx(r["bic"] + 2 * r["entropy"])
        assert r["entropy"] >= 0 and r["criterion"] == "icl"
    assert sum(r["best"] for r in table) == 1
    best = next(r for r in table if r["best"])
    assert best["icl"] == min(r["icl"] for r in table)
    with pytest.raises(ValueError, match="criterion must be one of"):
        xtec_flows.select_n_components(volume, temps, [2, 3], criterion="aic")


def test_elbow_rule():
    assert elbow([1, 2, 3, 4, 5, 6], [100, 40, 20, 18, 17, 16]) == 3
    assert elbow([2, 3], [5.0, 4.0]) == 3


def test_generator_knobs():
    base = synthetic.SeriesModel(gap_period=0)
    t = synthetic.temperatures(10, base)
    spatial = (32, 32, 32)
    # Exposure scales every mean count; the monitor scales each temperature alike, for every block.
    lam = synthetic.intensity_block(base, t, None, spatial)
    twice = synthetic.intensity_block(synthetic.SeriesModel(gap_period=0, exposure=2.0), t, None, spatial)
    np.testing.assert_allclose(twice, 2 * lam, rtol=1e-6)
    jit = synthetic.SeriesModel(gap_period=0, monitor_jitter=0.05, monitor_seed=1)
    whole = synthetic.intensity_block(jit, t, None, spatial)
    part = synthetic.intensity_block(jit, t, (slice(0, 16), slice(8, 32), slice(0, 32)), spatial)
    np.testing.assert_array_equal(whole[:, :16, 8:], part)
    np.testing.assert_allclose(whole / lam, np.broadcast_to(jit.monitor_factors(10)[:, None, None, None], lam.shape),
                               rtol=1e-5)
    # More CDW arms, more CDW voxels; the wavevectors are cyclic shifts.
    three = synthetic.SeriesModel(gap_period=0, cdw_arms=3)
    assert three.cdw_arm_wavevectors() == [(0.5, 0.5, 0.0), (0.0, 0.5, 0.5), (0.5, 0.0, 0.5)]
    n_cdw = lambda m: int((synthetic.truth_block(m, None, spatial) == synthetic.CDW).sum())  # noqa: E731
    assert n_cdw(three) > 2 * n_cdw(base)
    with pytest.raises(ValueError, match="cdw_arms"):
        synthetic.SeriesModel(cdw_arms=4)
    with pytest.raises(ValueError, match="exposure"):
        synthetic.SeriesModel(exposure=0)


def test_peaks_mode_classes_count_voxels_and_peaks():
    # In mode "peaks" the mixture's rows are peaks: a class reports its voxels (what the label
    # volume shows) and, beside them, its peaks.
    from xtec_flows.synthetic import make_volume

    volume, temps, _ = make_volume((12, 24, 24, 24), seed=2)
    result = xtec_flows.cluster(volume, temps, mode="peaks", classes="auto", max_components=4, stability_runs=0)
    labels = np.asarray(result.labels[...])
    classes = result.classes
    assert classes and all("n_peaks" in c for c in classes)
    assert [c["n_voxels"] for c in classes] == [int((labels == c["label"]).sum()) for c in classes]
    assert sum(c["n_peaks"] for c in classes) <= result.n_peaks
    assert sum(c["n_voxels"] for c in classes) > sum(c["n_peaks"] for c in classes)
    fixed = xtec_flows.cluster(volume, temps, classes="auto", max_components=4, stability_runs=0)
    assert all("n_peaks" not in c for c in fixed.classes)


def test_the_restart_whose_classes_the_others_reproduce_wins_over_the_most_likely_one():
    from xtec_flows.engine.class_discovery import RestartChoice
    from xtec_flows.numerics.mixture import MixtureParams

    rng = np.random.default_rng(12)
    curves_ = [_order_curve(T24, 0.2, 0.0, 2.5, 150.0, 0.33), _critical_curve(T24, 0.7, 0.0, 1.0, 150.0, 20.0),
               np.full(T24.size, 1.0)]
    raw = np.concatenate([_rows(c, n, rng) for c, n in zip(curves_, (400, 400, 800))])
    truth = np.repeat([0, 1, 2], [400, 400, 800])
    X = raw / raw.mean(axis=1, keepdims=True) - 1

    def params_of(labels):
        k = labels.max() + 1
        return MixtureParams(np.bincount(labels) / labels.size, np.stack([X[labels == j].mean(0) for j in range(k)]),
                             np.stack([X[labels == j].var(0) + 1e-4 for j in range(k)]))

    halves = rng.integers(0, 2, truth.size)
    good_a = params_of(np.where(truth == 2, 2 + halves, truth))  # the flat rows split in two: one class still
    good_b = params_of(np.where(truth == 2, 3 - halves, truth))
    # One component for the order-parameter and the critical rows: a class cut across kinds.
    bad = params_of(np.where(truth == 2, 1 + np.where(halves == 1, 1, 0) + (rng.random(truth.size) < 0.5), 0))
    choose = RestartChoice(T24, X, raw, n_components=4)
    assert choose([(good_a, 18.7), (bad, 21.4), (good_b, 19.0)]) == 2  # the likelier of the two that agree
    assert choose.agreement[0] == pytest.approx(choose.agreement[2]) and choose.agreement[0] > choose.agreement[1]
    # Every restart's classes on the sample are kept (the stability refits reuse them): the good
    # ones are order parameter, critical and one static class of the two flat components.
    labels, kinds = choose.labelings[0]
    assert sorted(k.value for k in kinds) == ["critical", "order_parameter", "static"]
    assert len(choose.labelings) == 3 and labels.shape == truth.shape
    # Where the restarts agree, the likelihood decides, as it always did.
    assert choose([(good_a, 18.7), (good_b, 19.0), (good_a, 21.4)]) == 2
    # Two restarts cannot outvote each other.
    assert choose([(good_a, 18.7), (bad, 21.4)]) == 1


def test_a_strong_halo_does_not_take_a_cdw_shell_with_it():
    """halo_amplitude=600, seed 1: the most likely of the 4 restarts puts a CDW shell with the
    halo (CDW found 0.59, as the likelihood alone chose); the restart the others reproduce keeps
    the CDW whole."""
    model = synthetic.SeriesModel(halo_amplitude=600.0)
    volume, temps, truth = synthetic.make_volume((24, 64, 64, 64), model=model, seed=1)
    result = xtec_flows.cluster(volume, temps, classes="auto", random_state=1)
    labels, t = np.asarray(result.labels).ravel(), truth.ravel()
    ok = t != synthetic.GAP
    assert _found(labels[ok], t[ok], synthetic.CDW) >= 0.8
    assert _found(labels[ok], t[ok], synthetic.HALO) >= 0.8
    stab = result.to_dict()["stability"]
    assert stab["restart_agreement"][stab["chosen_restart"]] == pytest.approx(max(stab["restart_agreement"]), abs=0.01)
