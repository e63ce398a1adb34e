"""From mixture components to physical classes: curve models of a temperature dependence.

A maximum-likelihood diagonal mixture spends its components where the density
of trajectories is complex, not where the physics changes: it splits CDW peaks
into cores and shells and Bragg peaks by intensity, and with few components
it swallows a weak critical halo into the background (the halo/background
pair is also the pair that entropy-based merging (Baudry et al., J. Comput.
Graph. Stat. 19, 332, 2010) combines first, because their posteriors overlap
most). What a diffraction physicist separates is the *shape* of I(T): an
order parameter that vanishes at Tc, a critical peak at Tc, an intensity that
appears on warming, or a static intensity with a weak Debye-Waller or thermal
trend. So we fit more components than there are classes and group them by
model comparison of their mean trajectories, in the spirit of functional-data
clustering (curves summarised by the parameters of a physical model) rather
than of posterior overlap:

=============== ==============================================================
kind            curve model of the mean *relative* trajectory I(T) / <I>_T
=============== ==============================================================
static          c + s tau                        (tau = reduced temperature)
order_parameter c + s tau + A (1 - T/Tc)_+^(2 beta)  [+ B L(T; Tc, w, gamma)]
critical        c + s tau + B L(T; Tc, w, gamma)     [+ A (1 - T/Tc)_+^(2 beta)]
onset           c + s tau + A ((T - Tc)/(Tmax - Tc))_+^(2 beta)
other           none of these describes the curve (R^2 below ``min_r2``)
=============== ==============================================================

L is a rounded power law, (1 + ((T - Tc)/w)^2)^(-gamma/2): the |T - Tc|^-gamma
of a critical susceptibility far from Tc, rounded off within w of it (the cap
that resolution and inhomogeneity put on a measured divergence); gamma = 2 is
a Lorentzian in T. Its width may be a quarter of the temperature step
(``MIN_WIDTH_STEPS``): a narrow critical region lights up one or two measured
temperatures, and a wider floor made the fit move the order parameter's Tc up
to cover the critical point instead (seen: Tc 119 K for a true 82 K, 12.7 K
steps, when the floor was one step and L a Lorentzian). The order and critical terms
share one Tc: on the flanks of a CDW peak the order parameter and its
critical fluctuations overlap, and a component there is "order parameter"
when the ordered intensity at the lowest temperature exceeds the critical
peak at Tc, "critical" otherwise (the rule a diffraction truth table uses).
Models are compared by BIC with the noise variance unknown,
``T log(RSS/T) + p log T``, first at each model's best point of a parameter grid,
then, for the ``REFINED_MODELS`` best, again at their refined optima (a coarse grid
misses a sharp kink at Tc in every model alike, so its ranking is provisional): a component
mean averages thousands of voxels, so its scatter about any smooth curve is
dominated by model misfit and mixing, not by counting noise; an unknown
variance keeps the comparison about shape. A non-static model must also
change the relative intensity by at least ``min_amplitude`` (20 % of the
voxel's mean by default): with millions of voxels a 1 % wiggle (monitor
jitter, a Debye-Waller curvature) is always "significant", but it is not a
phase transition.

Every model's static part c + s tau stays >= 0 across the measured range: a relative
intensity is a sum of non-negative contributions, and without the bound a broad critical
term's tails and a negative baseline trade off against each other, which moved the split
between the order and critical amplitudes of CDW-flank components (seen: an order amplitude
1.7 against a critical 1.45 for voxels whose true CDW at the lowest temperature was 0.64 of
their critical peak, with c = -0.16).

The refinement (weighted least squares, ``numerics.bounded_lm``) starts from several points
(the deepest local minima of the grid over Tc, the data's own kink and peak, and for a class
the Tc its components agree on) and keeps the deepest basin: with a critical term there is a
basin past the true Tc, where the order term covers the critical tail.

Uncertainties are 1 sigma from the Jacobian of the weighted least-squares
problem at the optimum, scaled by the reduced chi^2 (``absolute_sigma=False``
in scipy's terms), so misfit widens them.

Everything here is a pure function of small arrays (K x T); the volume never
enters.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field

import numpy as np

from .bounded_lm import levenberg_marquardt


class ClassKind(str, enum.Enum):
    """The kinds of temperature dependence a class can have (values are what results record)."""

    ORDER_PARAMETER = "order_parameter"
    CRITICAL = "critical"
    ONSET = "onset"
    OTHER = "other"
    STATIC = "static"


# Display and label order of kinds: the temperature-dependent physics first.
KIND_ORDER = tuple(ClassKind)

MIN_TEMPERATURES = 8
"""Fewest temperatures with which a Tc, an exponent and a baseline can be fitted (7 parameters + 1)."""

MIN_WIDTH_STEPS = 0.25
"""Narrowest rounding width of a critical peak, in median temperature steps (see the module text)."""

# Grids for the separable (variable-projection) search: for fixed (Tc, beta, w, gamma) the
# model is linear in (c, s, A, B), solved exactly; the best grid point then seeds a
# nonlinear least-squares refinement of all parameters.
_BETA_GRID = np.array([0.05, 0.1, 0.17, 0.25, 0.33, 0.45, 0.65, 1.0])
_WIDTH_FRACTIONS = np.geomspace(0.01, 0.3, 6)  # of the temperature range
_GAMMA_GRID = np.array([1.0, 2.5])
_GAMMA_BOUNDS = (1.0, 6.0)
REFINE_STARTS = 3
"""Local minima of the grid's RSS profile over Tc from which the refinement starts (see _grid_search)."""
REFINED_MODELS = 2
"""Models (best by grid BIC first) refined and compared again by BIC at their optima."""
SCOUT_STEPS = 12
"""Steps of the refinement from each start before the deepest is refined to convergence."""
_N_TC_GRID = 48


@dataclass
class CurveFit:
    """A fitted temperature dependence of one mean trajectory (relative units, I / <I>_T).

    kind : ClassKind
    model : name of the selected model ("static", "order", "critical", "order+critical", "onset")
    tc, tc_err : transition temperature and 1 sigma (NaN for static and other)
    beta, beta_err : order-parameter exponent (order and onset terms; NaN otherwise)
    width, width_err : the critical peak's rounding half width in T (NaN without that term)
    gamma, gamma_err : the critical peak's power-law exponent far from Tc (NaN without that term)
    amplitude, amplitude_err : the order (or onset) term's change of the relative intensity
        between the lowest temperature and Tc (or Tc and the highest temperature)
    critical_amplitude, critical_amplitude_err : height of the critical peak at Tc
    baseline, slope : c and s of the static part (slope per unit reduced temperature)
    trend : "decreasing", "increasing" or "flat" (the static part, for static curves)
    r2 : weighted coefficient of determination of the selected model
    chi2_red : weighted residual sum of squares per degree of freedom (sem units)
    bic : the selected model's BIC (unknown-variance form)
    curve : (T,) the fitted curve at the given temperatures
    """

    kind: ClassKind
    model: str
    tc: float = math.nan
    tc_err: float = math.nan
    beta: float = math.nan
    beta_err: float = math.nan
    width: float = math.nan
    width_err: float = math.nan
    gamma: float = math.nan
    gamma_err: float = math.nan
    amplitude: float = math.nan
    amplitude_err: float = math.nan
    critical_amplitude: float = math.nan
    critical_amplitude_err: float = math.nan
    baseline: float = math.nan
    slope: float = math.nan
    trend: str = "flat"
    r2: float = math.nan
    chi2_red: float = math.nan
    bic: float = math.nan
    curve: np.ndarray = field(default_factory=lambda: np.empty(0))

    def to_dict(self) -> dict:
        """JSON-ready values (NaN becomes None)."""
        out = {}
        for name in ("model", "tc", "tc_err", "beta", "beta_err", "width", "width_err", "gamma", "gamma_err", "amplitude",
                     "amplitude_err", "critical_amplitude", "critical_amplitude_err", "baseline", "slope",
                     "trend", "r2", "chi2_red", "bic"):
            v = getattr(self, name)
            out[name] = None if isinstance(v, float) and not math.isfinite(v) else v
        out["kind"] = self.kind.value
        return out


# ---------------------------------------------------------------------------------------
# curve shapes
# ---------------------------------------------------------------------------------------


def order_parameter_shape(t: np.ndarray, tc, beta) -> np.ndarray:
    """(1 - T/Tc)_+^(2 beta), the intensity of a superlattice peak below Tc; broadcasts."""
    reduced = np.clip(1.0 - np.asarray(t, float) / tc, 0.0, None)
    return reduced ** (2.0 * np.asarray(beta, float))


def onset_shape(t: np.ndarray, tc, beta, t_max: float) -> np.ndarray:
    """((T - Tc)/(T_max - Tc))_+^(2 beta): an intensity that appears on warming through Tc."""
    tc = np.asarray(tc, float)
    reduced = np.clip((np.asarray(t, float) - tc) / np.maximum(t_max - tc, 1e-12), 0.0, None)
    return reduced ** (2.0 * np.asarray(beta, float))


def critical_shape(t: np.ndarray, tc, width, gamma=2.0) -> np.ndarray:
    """(1 + ((T - Tc)/w)^2)^(-gamma/2): a critical peak at Tc, rounded within w (in T) of Tc.

    Far from Tc it falls as |T - Tc|^-gamma, the power law of a susceptibility
    (gamma = 1 mean field, 1.24 three-dimensional Ising); within w of Tc it is
    rounded off, as finite resolution, sample inhomogeneity or a finite
    correlation length cap a measured divergence. gamma = 2 is a Lorentzian in T.
    A Lorentzian alone cannot make a peak that is both flat on top and steep at
    its flanks (a capped power law), and a fit with it moves Tc to compensate.
    """
    z = (np.asarray(t, float) - tc) / width
    return (1.0 + z * z) ** (-0.5 * np.asarray(gamma, float))


def _reduced(t: np.ndarray) -> np.ndarray:
    """Temperatures mapped onto [-1, 1], so the slope is the change across the range / 2."""
    lo, hi = float(t.min()), float(t.max())
    return (2.0 * t - (lo + hi)) / (hi - lo)


# ---------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------

# Model name -> (has order term, has critical term, has onset term).
_MODELS = {
    "static": (False, False, False),
    "order": (True, False, False),
    "critical": (False, True, False),
    "order+critical": (True, True, False),
    "onset": (False, False, True),
}


#: The models a class of each kind is fitted with (None: all, the kind is then named by the data).
MODELS_OF_KIND = {
    ClassKind.ORDER_PARAMETER: ("order", "order+critical"),
    ClassKind.CRITICAL: ("critical", "order+critical"),
    ClassKind.ONSET: ("onset",),
    ClassKind.STATIC: ("static",),
    ClassKind.OTHER: None,
}


def _n_params(name: str) -> int:
    order, crit, onset = _MODELS[name]
    # c, s; each shape term adds its amplitude; Tc is shared; beta and w once each.
    n = 2 + int(order) + int(crit) + int(onset)
    if order or crit or onset:
        n += 1  # Tc
    if order or onset:
        n += 1  # beta
    if crit:
        n += 2  # width, gamma
    return n


def _min_width(t: np.ndarray) -> float:
    """Narrowest rounding width of a critical peak on these temperatures: ``MIN_WIDTH_STEPS`` of
    the median step. Narrower, the peak's height at the measured temperatures depends on w and
    gamma only through where Tc falls between two of them, and they are not determined."""
    return MIN_WIDTH_STEPS * float(np.median(np.diff(np.sort(t))))


def _bic(wrss: float, n: int, p: int) -> float:
    return n * math.log(max(wrss, 1e-300) / n) + p * math.log(n)


def _tc_grid(t: np.ndarray) -> np.ndarray:
    """Candidate Tc values: strictly inside the measured range, leaving two temperatures beyond."""
    ts = np.sort(t)
    lo, hi = ts[1], ts[-2]
    return np.linspace(lo, hi, _N_TC_GRID)


def _columns(t, name, tc, beta, width, gamma):
    """Columns of the linear part, 1, tau and the model's shape terms, for G nonlinear points.

    t : (T,); tc, beta, width, gamma : (G,) arrays (unused ones may be NaN). Returns (G, T, m).
    """
    tc, beta, width, gamma = (np.asarray(v, dtype=float)[:, None] for v in (tc, beta, width, gamma))
    g = tc.shape[0]
    tau = _reduced(t)
    cols = [np.broadcast_to(np.ones_like(t), (g, t.size)), np.broadcast_to(tau, (g, t.size))]
    order, crit, onset = _MODELS[name]
    if order:
        cols.append(order_parameter_shape(t[None, :], tc, beta))
    if onset:
        cols.append(onset_shape(t[None, :], tc, beta, float(t.max())))
    if crit:
        cols.append(critical_shape(t[None, :], tc, width, gamma))
    return np.stack(cols, axis=2)


def _design(t, name, tc, beta, width, gamma):
    """Columns (T, m) of the linear part for one nonlinear point: 1, tau, shape terms."""
    nan = math.nan
    return _columns(t, name, *([nan if v is None else v] for v in (tc, beta, width, gamma)))[0]


def _least_squares_operators(A: np.ndarray) -> np.ndarray:
    """(A^T A)^-1 A^T of a stack of design matrices A (G, T, m), m small: (G, m, T).

    The normal equations in place of an SVD pseudo-inverse (np.linalg.pinv per matrix is
    ~20x slower at G ~ 10^4); a ridge of 1e-10 of each Gram matrix's trace keeps the rare
    near-collinear grid point (a critical peak narrow enough to be one temperature) solvable.
    """
    gram = np.einsum("gti,gtj->gij", A, A)
    ridge = 1e-10 * np.trace(gram, axis1=1, axis2=2)[:, None, None] * np.eye(A.shape[2])
    return np.linalg.solve(gram + ridge, np.swapaxes(A, 1, 2))


@functools.lru_cache(maxsize=64)
def _grid_projections(t_key: tuple, name: str):
    """Least-squares projections of every grid point of a model, for one set of temperatures.

    The shape columns depend on the temperatures and the nonlinear parameters only,
    so for each grid point and each subset of active shape columns the pseudo-inverse
    is computed once; fitting a curve is then a batched matrix-vector product.

    A subset of columns depends on some of the nonlinear parameters only (the constant and
    slope on none, the order term not on the critical width), so each subset is projected at
    the distinct points of its own parameters and mapped back to the full grid.

    Returns (TC, BETA, WIDTH, GAMMA) of shape (G,), and per subset: (columns used,
    design (G', T, m) and pseudo-inverse (G', m, T) stored flat, and ``expand`` (G,), the
    subset's point of every grid point).
    """
    t = np.asarray(t_key, dtype=float)
    order, crit, onset = _MODELS[name]
    tcs = _tc_grid(t)
    betas = _BETA_GRID if (order or onset) else np.array([np.nan])
    widths = np.unique(np.maximum(_WIDTH_FRACTIONS * (t.max() - t.min()), _min_width(t))) if crit \
        else np.array([np.nan])
    gammas = _GAMMA_GRID if crit else np.array([np.nan])
    dims = (tcs.size, betas.size, widths.size, gammas.size)
    TC, BE, WI, GA = (a.ravel() for a in np.meshgrid(tcs, betas, widths, gammas, indexing="ij"))
    A = _columns(t, name, TC, BE, WI, GA)  # (G, T, m)
    m = A.shape[2]
    # Which grid axes (Tc, beta, w, gamma) each shape column depends on.
    column_axes = {}
    if order or onset:
        column_axes[2] = (0, 1)
    if crit:
        column_axes[m - 1] = (0, 2, 3)
    axes_index = np.unravel_index(np.arange(TC.size), dims)
    subsets = [[]]
    for j in range(2, m):
        subsets += [sub + [j] for sub in subsets]
    projections = []
    for subset in subsets:
        use = [0, 1] + subset
        relevant = {a for j in subset for a in column_axes[j]}
        representative = np.ravel_multi_index(
            tuple(axes_index[a] if a in relevant else np.zeros_like(axes_index[a]) for a in range(4)), dims)
        points, expand = np.unique(representative, return_inverse=True)
        As = np.ascontiguousarray(A[points][:, :, use])
        # Stored flat, (G' * m', T): one matrix-vector product per curve instead of G' small ones.
        g, t_n, k = As.shape
        projections.append((use, np.ascontiguousarray(np.swapaxes(As, 1, 2)).reshape(g * k, t_n),
                            _least_squares_operators(As).reshape(g * k, t_n), expand.ravel()))
    return TC, BE, WI, GA, m, projections


def _grid_search(t, Y, name, tc_hints=None, all_starts=True):
    """Grid optima of a model for each row of ``Y`` (curves of shape (K, T) on the temperatures
    ``t``), shape amplitudes >= 0: per curve (RSS of the best point, starts), where a start is
    (tc, beta, width, gamma, linear coefficients) and ``starts`` holds the best point of each of
    the ``REFINE_STARTS`` deepest local minima of the RSS profile over Tc, best first, then the
    best points at the Tc of ``tc_hints`` (K,) and of the data's own kink and peak; with
    ``all_starts=False`` (grid fits, nothing to refine) the best point alone.

    The grid is searched unweighted, so its projections are shared by every curve on the
    same temperatures: all K curves are one matrix product per subset of shape columns.
    The weighted refinement then starts from every start: the unweighted grid ranks basins
    differently from the weighted problem, and with a critical term the objective has a basin
    at a Tc past the true one, where the order term covers the critical tail (seen: Tc 150 and
    160 K for components of one CDW at 139.6 K, weighted RSS 10x that of the basin at 141 K).
    """
    TC, BE, WI, GA, m, projections = _grid_projections(tuple(float(v) for v in t), name)
    n_curves = Y.shape[0]
    n_tc = _N_TC_GRID  # TC is the slowest grid axis: point g has Tc index g // rest
    rest = TC.size // n_tc
    prof_rss = np.full((n_tc, n_curves), np.inf)
    prof_g = np.zeros((n_tc, n_curves), dtype=np.int64)
    prof_coef = np.zeros((n_tc, n_curves, m))
    yy = np.einsum("kt,kt->k", Y, Y)
    curves_idx = np.arange(n_curves)[None, :]
    for use, design_t, pinv, expand in projections:
        coef = (pinv @ Y.T).reshape(-1, len(use), n_curves)  # (G', m', K)
        # RSS of a least-squares fit: y.y - (A^T y).coef (no (G', T) residual array).
        rss = yy[None, :] - np.einsum("gik,gik->gk", (design_t @ Y.T).reshape(-1, len(use), n_curves), coef)
        if len(use) > 2:
            # Shape amplitudes >= 0 and a static part c + s tau >= 0 over the range (|s| <= c).
            feasible = np.all(coef[:, 2:, :] >= 0, axis=1) & (coef[:, 0, :] >= np.abs(coef[:, 1, :]))
            rss = np.where(feasible, rss, np.inf)
        rss = rss[expand].reshape(n_tc, rest, n_curves)
        g = np.argmin(rss, axis=1)  # (n_tc, K): best point of the other parameters at each Tc
        rss_g = np.take_along_axis(rss, g[:, None, :], axis=1)[:, 0, :]
        better = rss_g < prof_rss
        g_full = np.arange(n_tc)[:, None] * rest + g
        prof_rss = np.where(better, rss_g, prof_rss)
        prof_g = np.where(better, g_full, prof_g)
        picked = np.zeros((n_tc, n_curves, m))
        picked[:, :, use] = coef[expand[g_full], :, curves_idx]  # (n_tc, K, m')
        prof_coef = np.where(better[:, :, None], picked, prof_coef)
    tc_axis = TC.reshape(n_tc, rest)[:, 0]
    out = []
    for k in range(n_curves):
        r = prof_rss[:, k]
        padded = np.concatenate(([np.inf], r, [np.inf]))
        minima = np.flatnonzero((r <= padded[:-2]) & (r <= padded[2:]) & np.isfinite(r))
        if minima.size == 0:
            minima = np.array([int(np.argmin(r))])
        minima = list(minima[np.argsort(r[minima], kind="stable")][:REFINE_STARTS if all_starts else 1])
        # The grid is too coarse in beta, w and gamma to make the true Tc a local minimum
        # when the curve has a sharp kink there; the data's own kink and peak are starts too.
        hints = [] if tc_hints is None or not np.isfinite(tc_hints[k]) else [float(tc_hints[k])]
        for tc in (hints + _data_tc_candidates(t, Y[k])) if all_starts else []:
            i = int(np.argmin(np.abs(tc_axis - tc)))
            if np.isfinite(r[i]) and i not in minima:
                minima.append(i)
        starts = [(float(TC[prof_g[i, k]]), float(BE[prof_g[i, k]]), float(WI[prof_g[i, k]]), float(GA[prof_g[i, k]]),
                   prof_coef[i, k].copy()) for i in minima]
        out.append((max(float(r[minima[0]]), 0.0), starts))
    return out


def _data_tc_candidates(t: np.ndarray, y: np.ndarray) -> list:
    """Model-free guesses of a transition in one sorted curve (T,): where its slope changes most
    (the foot of an order parameter, the start of an onset) and where it stands highest above
    the straight line through its ends (a critical peak)."""
    if t.size < 4:
        return []
    slope = np.diff(y) / np.diff(t)
    kink = int(np.argmax(np.abs(np.diff(slope)))) + 1
    line = y[0] + (y[-1] - y[0]) * (t - t[0]) / (t[-1] - t[0])
    peak = int(np.argmax(y - line))
    return [float(t[kink]), float(t[peak])]


def _refine(t, y, w, name, starts):
    """Nonlinear weighted least squares from grid points: ``SCOUT_STEPS`` steps from every start
    at once tell the basins apart, and the deepest is refined to convergence.

    Returns (parameters, 1 sigma errors, weighted RSS, curve (T,)).
    """
    order, crit, onset = _MODELS[name]
    # The static part c + s tau is fitted as its values at the two ends of the range, e0 = c - s
    # and e1 = c + s, both >= 0 (see the module text); c and s are reported.
    names = ["e0", "e1"]
    lo, hi = [0.0, 0.0], [np.inf, np.inf]
    for flag, label in ((order, "A"), (onset, "A"), (crit, "B")):
        if flag:
            names.append(label)
            lo.append(0.0)
            hi.append(np.inf)
    ts = np.sort(t)
    span = float(t.max() - t.min())
    names.append("tc")
    lo.append(float(ts[1]) - 1e-9)
    hi.append(float(ts[-2]) + 1e-9)
    if order or onset:
        names.append("beta")
        lo.append(0.02)
        hi.append(3.0)
    if crit:
        names += ["w", "gamma"]
        lo += [_min_width(t), _GAMMA_BOUNDS[0]]
        hi += [span, _GAMMA_BOUNDS[1]]
    lo, hi = np.asarray(lo), np.asarray(hi)
    n_amplitudes = int(order or onset) + int(crit)
    x0 = []
    for tc0, beta0, w0, gamma0, lin in starts:  # lin: c, s, then the shape amplitudes
        row = [lin[0] - lin[1], lin[0] + lin[1]] + [max(float(v), 0.0) for v in lin[2:2 + n_amplitudes]]
        row.append(tc0)
        if order or onset:
            row.append(beta0)
        if crit:
            row += [w0, gamma0]
        x0.append(row)
    x0 = np.clip(np.asarray(x0, float), lo + 1e-12, hi - 1e-12)
    tau = _reduced(t)
    t_max = float(t.max())
    col = {n: i for i, n in enumerate(names)}

    def curve(X):  # (S, p) -> (S, T)
        p = {n: X[:, i, None] for n, i in col.items()}
        out = 0.5 * (p["e0"] + p["e1"]) + 0.5 * (p["e1"] - p["e0"]) * tau
        if order:
            out = out + p["A"] * order_parameter_shape(t, p["tc"], p["beta"])
        if onset:
            out = out + p["A"] * onset_shape(t, p["tc"], p["beta"], t_max)
        if crit:
            out = out + p["B"] * critical_shape(t, p["tc"], p["w"], p["gamma"])
        return out

    def jacobian(X):  # (S, p) -> (S, T, p)
        # Analytic derivatives of the weighted residuals: a finite-difference Jacobian costs
        # one model evaluation per parameter per step.
        p = {n: X[:, i, None] for n, i in col.items()}
        shape = (X.shape[0], t.size)
        d = {"e0": np.broadcast_to(0.5 * (1.0 - tau), shape), "e1": np.broadcast_to(0.5 * (1.0 + tau), shape)}
        tc, tiny = p["tc"], 1e-12
        d["tc"] = np.zeros(shape)
        if order or onset:
            two_beta = 2.0 * p["beta"]
            if order:
                base = 1.0 - t / tc
                dbase_dtc = t / (tc * tc)
            else:
                base = (t - tc) / (t_max - tc)
                dbase_dtc = (t - t_max) / (t_max - tc) ** 2
            inside = base > 0
            b = np.where(inside, base, tiny)
            term = np.where(inside, b**two_beta, 0.0)
            d["A"] = term
            d["tc"] = np.where(inside, p["A"] * two_beta * b ** (two_beta - 1.0) * dbase_dtc, 0.0)
            d["beta"] = np.where(inside, p["A"] * 2.0 * np.log(b) * term, 0.0)
        if crit:
            z = (t - tc) / p["w"]
            q = 1.0 + z * z
            lor = q ** (-0.5 * p["gamma"])
            dlor_dz = -p["gamma"] * z * lor / q
            d["B"] = lor
            d["tc"] = d["tc"] + p["B"] * dlor_dz * (-1.0 / p["w"])
            d["w"] = p["B"] * dlor_dz * (-z / p["w"])
            d["gamma"] = p["B"] * (-0.5 * np.log(q)) * lor
        return np.stack([d[n] for n in names], axis=2) * w[:, None]

    def residuals(X):
        return (curve(X) - y) * w

    # Tolerances 1e-6: Tc and beta to a millionth of their value are far inside their
    # uncertainties, and near a bound (a peak narrower than the grid can resolve, gamma at its
    # limit) further decades cost most of the iterations.
    if len(x0) > 1:
        scout = levenberg_marquardt(residuals, jacobian, x0, lo, hi, max_iter=SCOUT_STEPS, ftol=1e-6, xtol=1e-6)
        x0 = scout.x[int(np.argmin(scout.cost))][None, :]
    res = levenberg_marquardt(residuals, jacobian, x0, lo, hi, max_iter=200, ftol=1e-6, xtol=1e-6)
    x, J = res.x[0], res.jacobian[0]
    wrss = float(res.cost[0])
    dof = max(t.size - len(x), 1)
    try:
        cov = np.linalg.pinv(J.T @ J) * (wrss / dof)
    except np.linalg.LinAlgError:
        cov = np.full((len(x), len(x)), np.nan)
    fitted = curve(res.x)[0]
    # Back to c = (e0 + e1) / 2, s = (e1 - e0) / 2, with the covariance carried along.
    to_cs = np.eye(len(x))
    to_cs[:2, :2] = [[0.5, 0.5], [-0.5, 0.5]]
    x = to_cs @ x
    cov = to_cs @ cov @ to_cs.T
    reported = ["c", "s"] + names[2:]
    return dict(zip(reported, x)), dict(zip(reported, np.sqrt(np.clip(np.diag(cov), 0, None)))), wrss, fitted


def fit_curve(temperatures: np.ndarray, mean: np.ndarray, sem: np.ndarray, **options) -> CurveFit:
    """Select and fit the model of one mean relative trajectory.

    Parameters
    ----------
    temperatures : ndarray of shape (T,), T >= MIN_TEMPERATURES, distinct
    mean : ndarray of shape (T,), the mean of I / <I>_T over a component's voxels
    sem : ndarray of shape (T,), its standard error (> 0; floored at 1e-6 of the mean's spread)
    **options : min_amplitude, min_r2, kinds, refine, as :func:`fit_curves`

    Returns
    -------
    CurveFit
    """
    t = np.asarray(temperatures, dtype=float)
    y = np.asarray(mean, dtype=float)
    s = np.asarray(sem, dtype=float)
    if t.ndim != 1 or y.shape != t.shape or s.shape != t.shape:
        raise ValueError(
            f"temperatures, mean and sem must be 1-D arrays of one length; got shapes {t.shape}, {y.shape}, {s.shape}"
        )
    return fit_curves(t, y[None, :], s[None, :], **options)[0]


def fit_curves(
    temperatures: np.ndarray,
    means: np.ndarray,
    sems: np.ndarray,
    *,
    min_amplitude: float = 0.2,
    min_r2: float = 0.8,
    kinds: tuple | None = None,
    refine: bool = True,
    tc_hints=None,
) -> list:
    """Select and fit the model of K mean relative trajectories on the same temperatures; the
    parameter grid is searched for all K at once (one matrix product per model).

    Parameters
    ----------
    temperatures : ndarray of shape (T,), T >= MIN_TEMPERATURES, distinct
    means : ndarray of shape (K, T), each the mean of I / <I>_T over a component's voxels
    sems : ndarray of shape (K, T), their standard errors (> 0; floored at 1e-6 of each mean's spread)
    min_amplitude : float
        Smallest change of the relative intensity that counts as a temperature
        dependence (order amplitude, critical peak height or onset amplitude).
    min_r2 : float
        Smallest weighted R^2 (about the weighted mean) of the selected model
        for a curve with a temperature dependence; below it the kind is "other".
    kinds : tuple of model names to consider (default: all)
    refine : bool
        Refine the grid optimum by nonlinear least squares and estimate uncertainties;
        False keeps the grid point (Tc to 1/48 of the range) and leaves the errors NaN.
    tc_hints : None or array-like of shape (K,), a Tc known for each curve (NaN: none), e.g. where
        the components of a class agree; the refinement starts from there too

    Returns
    -------
    list of K CurveFit, in the order of the rows
    """
    t = np.asarray(temperatures, dtype=float)
    Y = np.asarray(means, dtype=float)
    S = np.asarray(sems, dtype=float)
    if t.ndim != 1 or Y.ndim != 2 or Y.shape[1:] != t.shape or S.shape != Y.shape:
        raise ValueError(
            f"means and sems must be (K, T) arrays and temperatures (T,); got shapes {Y.shape}, {S.shape}, {t.shape}"
        )
    if t.size < MIN_TEMPERATURES:
        raise ValueError(
            f"fitting a Tc needs at least {MIN_TEMPERATURES} temperatures; got {t.size}. "
            "Measure more temperatures or cluster with a fixed number of components (classes=None)"
        )
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(Y))):
        raise ValueError("temperatures and mean must be finite")
    if np.unique(t).size != t.size:
        raise ValueError("temperatures must be distinct to fit a temperature dependence")
    order = np.argsort(t)
    t, Y, S = t[order], Y[:, order], S[:, order]
    names = tuple(kinds) if kinds is not None else tuple(_MODELS)
    candidates = {}
    for name in names:
        if name == "static":
            X = _design(t, "static", None, None, None, None)
            coef, *_ = np.linalg.lstsq(X, Y.T, rcond=None)
            r = Y.T - X @ coef
            candidates[name] = [(float(v), None) for v in np.einsum("tk,tk->k", r, r)]
        else:
            candidates[name] = _grid_search(t, Y, name, tc_hints, all_starts=refine)
    fits = []
    for k in range(Y.shape[0]):
        fit = _select(t, Y[k], S[k], {name: c[k] for name, c in candidates.items()}, min_amplitude, min_r2,
                      kinds is not None, refine)
        fit.curve = fit.curve[np.argsort(order)]
        fits.append(fit)
    return fits


def _select(t, y, s, candidates: dict, min_amplitude: float, min_r2: float, kinds_given: bool,
            refine: bool) -> CurveFit:
    """The model of one sorted curve from its grid optima ``{name: (rss, starts)}``."""
    floor = max(1e-9, 1e-6 * float(np.ptp(y)))
    w = 1.0 / np.maximum(np.where(np.isfinite(s), s, np.inf), floor)
    w = np.where(np.isfinite(w), w, 1.0 / floor)
    n = t.size
    bics = {name: _bic(c[0], n, _n_params(name)) for name, c in candidates.items()}
    ranked = sorted(bics, key=bics.get)
    ybar = float(np.sum(w * w * y) / np.sum(w * w))
    tss = float(np.sum((w * (y - ybar)) ** 2))
    # Take the best model by BIC whose temperature dependence is large enough to count.
    # The size test runs on the grid points (cheap).
    acceptable = []
    for name in ranked:
        fit = _finish(t, y, w, name, candidates[name][1], tss, bics[name], refine=False)
        if name == "static":
            break
        if _change(fit) >= min_amplitude:
            acceptable.append((name, fit))
            if len(acceptable) == (REFINED_MODELS if refine else 1):
                break
    if not acceptable and name != "static":
        # Only models with a transition were asked for (a class of known kind) and none is
        # large enough: the best of them still describes the class.
        name = ranked[0]
        acceptable = [(name, _finish(t, y, w, name, candidates[name][1], tss, bics[name], refine=False))]
    if acceptable:
        name, fit = acceptable[0]
    if refine and acceptable:
        # The grid ranks models at its coarse points, where a sharp kink at Tc is missed by all
        # of them alike; the ``REFINED_MODELS`` best are compared again at their optima (seen:
        # "order" ahead of "order+critical" on the grid, refined to Tc 202 K for a true 179 K).
        best = None
        for name_r, _ in acceptable[:REFINED_MODELS]:
            refined = _finish(t, y, w, name_r, candidates[name_r][1], tss, math.nan, refine=True)
            if (_change(refined) >= min_amplitude or kinds_given) and (best is None or refined.bic < best.bic):
                best = refined
        if best is not None:
            fit = best
    if fit.kind is not ClassKind.STATIC and fit.r2 < min_r2:
        fit.kind = ClassKind.OTHER
    return fit


def _change(fit: CurveFit) -> float:
    """Largest change of the relative intensity made by the fit's non-static terms."""
    vals = [v for v in (fit.amplitude, fit.critical_amplitude) if math.isfinite(v)]
    return max(vals) if vals else 0.0


def _grid_point(t, name, start):
    """(parameters, NaN errors, curve) at a grid optimum, in the names _refine uses."""
    order, crit, onset = _MODELS[name]
    tc, beta, width, gamma, lin = start
    p = {"c": lin[0], "s": lin[1], "tc": tc}
    j = 2
    if order or onset:
        p["A"], p["beta"] = lin[j], beta
        j += 1
    if crit:
        p["B"], p["w"], p["gamma"] = lin[j], width, gamma
    design = _design(t, name, tc, beta, width, gamma)
    curve = design @ lin[: design.shape[1]]
    return p, {key: math.nan for key in p}, curve


def _finish(t, y, w, name, starts, tss, bic_value, refine=True) -> CurveFit:
    """Refine the selected model from each of its grid ``starts`` (the lowest weighted RSS wins;
    without ``refine``, the best grid point is kept) and fill a CurveFit. ``bic_value`` is the
    grid's; a refined fit carries the BIC of its own weighted RSS instead."""
    n = t.size
    if name == "static":
        X = _design(t, "static", None, None, None, None)
        coef, *_ = np.linalg.lstsq(X * w[:, None], y * w, rcond=None)
        curve = X @ coef
        wrss = float(np.sum((w * (y - curve)) ** 2))
        dof = max(n - 2, 1)
        cov = np.linalg.pinv((X * w[:, None]).T @ (X * w[:, None])) * (wrss / dof)
        slope, slope_err = float(coef[1]), float(math.sqrt(max(cov[1, 1], 0.0)))
        # The slope is the change across the range / 2; a trend is named when the change
        # across the range is at least 2 % of the mean and 3 sigma.
        change = 2 * slope
        trend = "flat"
        if abs(change) >= 0.02 * max(abs(float(coef[0])), 1e-12) and abs(slope) > 3 * slope_err:
            trend = "decreasing" if slope < 0 else "increasing"
        return CurveFit(
            kind=ClassKind.STATIC, model="static", baseline=float(coef[0]), slope=slope, trend=trend,
            r2=1.0 - wrss / tss if tss > 0 else 1.0, chi2_red=wrss / dof, bic=bic_value, curve=curve,
        )
    if refine:
        p, e, wrss, curve = _refine(t, y, w, name, starts)
        bic_value = _bic(wrss, n, len(p))
    else:
        p, e, curve = _grid_point(t, name, starts[0])
        wrss = float(np.sum((w * (y - curve)) ** 2))
    dof = max(n - len(p), 1)
    order, crit, onset = _MODELS[name]
    fit = CurveFit(
        kind=ClassKind.ORDER_PARAMETER, model=name, tc=float(p["tc"]), tc_err=float(e["tc"]),
        baseline=float(p["c"]), slope=float(p["s"]), r2=1.0 - wrss / tss if tss > 0 else 1.0,
        chi2_red=wrss / dof, bic=bic_value, curve=curve,
    )
    t_min = float(t.min())
    if order or onset:
        fit.beta, fit.beta_err = float(p["beta"]), float(e["beta"])
        # The order term's size: its value at the lowest temperature (order) or highest (onset).
        g = order_parameter_shape(t_min, p["tc"], p["beta"]) if order else 1.0
        fit.amplitude, fit.amplitude_err = float(p["A"] * g), float(e["A"] * g)
    if crit:
        fit.width, fit.width_err = float(p["w"]), float(e["w"])
        fit.gamma, fit.gamma_err = float(p["gamma"]), float(e["gamma"])
        # The peak's height as the data show it: its largest value at a measured temperature.
        g = float(critical_shape(t, p["tc"], p["w"], p["gamma"]).max())
        fit.critical_amplitude, fit.critical_amplitude_err = float(p["B"] * g), float(e["B"] * g)
    if onset:
        fit.kind = ClassKind.ONSET
    elif crit and (not order or fit.critical_amplitude > fit.amplitude):
        fit.kind = ClassKind.CRITICAL
    return fit


# ---------------------------------------------------------------------------------------
# grouping components into classes
# ---------------------------------------------------------------------------------------


@dataclass
class ComponentGroup:
    """Components that form one class.

    kind : ClassKind
    components : list of component indices
    trend : the static trend ("decreasing", "increasing", "flat"), for static classes
    tc : the components' count-weighted Tc (NaN for kinds without one, or when not known)
    """

    kind: ClassKind
    components: list
    trend: str = "flat"
    tc: float = math.nan


def tc_tolerance(temperatures: np.ndarray, tc: float) -> float:
    """Tc resolution of a temperature grid: the spacing of the measured temperatures around tc."""
    ts = np.sort(np.asarray(temperatures, float))
    gaps = np.diff(ts)
    i = int(np.clip(np.searchsorted(ts, tc) - 1, 0, gaps.size - 1))
    return float(gaps[i])


def group_components(
    fits: list,
    counts: np.ndarray,
    temperatures: np.ndarray,
    *,
    n_sigma: float = 3.0,
) -> list:
    """Merge components of one kind whose transition temperatures agree.

    Components of a kind with a Tc (order parameter, critical, onset) join a
    group when their Tc is within ``max(n_sigma * sqrt(err_1^2 + err_2^2),
    temperature spacing at Tc)`` of the group's count-weighted Tc; the
    spacing floor because a temperature grid cannot resolve Tc more finely
    than its step, however small the statistical error. Tc is the criterion,
    not beta or amplitude, because a component's mean mixes its voxels with
    their neighbours' (a CDW shell carries critical scattering, a halo the
    tail of its CDW peak), which changes the apparent exponent and amplitude
    but not where the transition is. Static components group by trend;
    "other" components stay classes of their own.

    Parameters
    ----------
    fits : list of CurveFit, one per component
    counts : ndarray of shape (K,), voxels per component
    temperatures : ndarray of shape (T,)

    Returns
    -------
    list of ComponentGroup, in canonical class order: kinds in ``KIND_ORDER``, then Tc
    descending (static: decreasing, flat, increasing), then size.
    """
    counts = np.asarray(counts, dtype=float)
    if len(fits) != counts.size:
        raise ValueError(f"fits ({len(fits)}) and counts ({counts.size}) must have one entry per component")
    by_size = sorted(range(len(fits)), key=lambda k: (-counts[k], k))
    groups: list[tuple[ComponentGroup, list]] = []  # (group, [(tc, err, count)])
    for k in by_size:
        f = fits[k]
        if counts[k] <= 0:
            continue
        if f.kind is ClassKind.OTHER:
            groups.append((ComponentGroup(f.kind, [k]), []))
            continue
        if f.kind is ClassKind.STATIC:
            for g, _ in groups:
                if g.kind is ClassKind.STATIC and g.trend == f.trend:
                    g.components.append(k)
                    break
            else:
                groups.append((ComponentGroup(f.kind, [k], f.trend), []))
            continue
        err = f.tc_err if math.isfinite(f.tc_err) else 0.0
        placed = False
        for g, members in groups:
            if g.kind is not f.kind:
                continue
            wsum = sum(c for _, _, c in members)
            tc_g = sum(tc * c for tc, _, c in members) / wsum
            err_g = math.sqrt(sum((e * c) ** 2 for _, e, c in members)) / wsum
            tol = max(n_sigma * math.hypot(err, err_g), tc_tolerance(temperatures, tc_g))
            if abs(f.tc - tc_g) <= tol:
                g.components.append(k)
                members.append((f.tc, err, counts[k]))
                placed = True
                break
        if not placed:
            groups.append((ComponentGroup(f.kind, [k]), [(f.tc, err, counts[k])]))

    trend_rank = {"decreasing": 0, "flat": 1, "increasing": 2}

    def key(item):
        g, members = item
        tc = sum(tc * c for tc, _, c in members) / sum(c for _, _, c in members) if members else 0.0
        size = sum(counts[k] for k in g.components)
        return (KIND_ORDER.index(g.kind), trend_rank.get(g.trend, 1) if g.kind is ClassKind.STATIC else 0,
                -tc, -size, min(g.components))

    ordered = sorted(groups, key=key)
    for g, members in ordered:
        g.components.sort()
        if members:
            g.tc = float(sum(tc * c for tc, _, c in members) / sum(c for _, _, c in members))
    return [g for g, _ in ordered]


# ---------------------------------------------------------------------------------------
# per-component trajectory statistics
# ---------------------------------------------------------------------------------------


@dataclass
class ComponentMoments:
    """Sums over the voxels of each component (they add over row blocks).

    counts : (K,) voxels
    raw_sum : (K, T) sum of raw intensities
    relative_sum, relative_sq_sum : (K, T) sums of I / <I>_T and of its square
    """

    counts: np.ndarray
    raw_sum: np.ndarray
    relative_sum: np.ndarray
    relative_sq_sum: np.ndarray

    def __add__(self, other: "ComponentMoments") -> "ComponentMoments":
        return ComponentMoments(self.counts + other.counts, self.raw_sum + other.raw_sum,
                                self.relative_sum + other.relative_sum, self.relative_sq_sum + other.relative_sq_sum)

    def merged(self, groups: list) -> "ComponentMoments":
        """Moments of unions of components: ``groups`` is a list of component-index lists."""
        pick = lambda a: np.stack([a[g].sum(axis=0) for g in groups])  # noqa: E731
        return ComponentMoments(pick(self.counts), pick(self.raw_sum), pick(self.relative_sum),
                                pick(self.relative_sq_sum))

    def relative_mean_sem(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean relative trajectory (K, T) and its standard error (K, T); NaN for empty components."""
        n = self.counts[:, None].astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.relative_sum / n
            var = np.maximum(self.relative_sq_sum / n - mean * mean, 0.0)
            sem = np.sqrt(var / np.maximum(n - 1, 1))
        return mean, sem

    def raw_mean(self) -> np.ndarray:
        """Mean raw trajectory (K, T)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.raw_sum / self.counts[:, None]


def component_moments(raw: np.ndarray, labels: np.ndarray, n_components: int, rows: int = 1 << 16) -> ComponentMoments:
    """Per-component sums of raw and relative (I / <I>_T) trajectories, a slab of rows at a time.

    Parameters
    ----------
    raw : ndarray of shape (n_samples, T), raw intensities (every row has <I>_T > 0)
    labels : ndarray of shape (n_samples,), component of each row (0..K-1; negative rows are skipped)
    n_components : int, K

    Returns
    -------
    ComponentMoments
    """
    raw = np.asarray(raw)
    labels = np.asarray(labels)
    if raw.ndim != 2 or labels.shape != (raw.shape[0],):
        raise ValueError(f"raw must be (n_samples, T) and labels (n_samples,); got {raw.shape}, {labels.shape}")
    k, t = int(n_components), raw.shape[1]
    out = ComponentMoments(np.zeros(k, np.int64), np.zeros((k, t)), np.zeros((k, t)), np.zeros((k, t)))
    for start in range(0, raw.shape[0], rows):
        x = raw[start : start + rows].astype(np.float64)
        lab = labels[start : start + rows].astype(np.int64)
        keep = lab >= 0
        x, lab = x[keep], lab[keep]
        if lab.size == 0:
            continue
        rel = x / x.mean(axis=1, keepdims=True)
        # Scatter-add by (component, temperature) with bincount: a one-hot matrix product
        # is as cheap in flops but hits OpenBLAS's slow path for these short-wide shapes.
        idx = (lab[:, None] * t + np.arange(t)[None, :]).ravel()
        add = lambda v: np.bincount(idx, weights=v.ravel(), minlength=k * t).reshape(k, t)  # noqa: E731
        out.counts += np.bincount(lab, minlength=k)
        out.raw_sum += add(x)
        out.relative_sum += add(rel)
        out.relative_sq_sum += add(rel * rel)
    return out
