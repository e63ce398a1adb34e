"""Class discovery: more mixture components than physics, grouped into classes by temperature dependence.

Runs after the mixture fit (``classes="auto"``), on the components' labels and the raw
trajectories, in memory or block by block where the trajectory store keeps them. The fit
itself continues the restart whose classes the other restarts reproduce best
(:class:`RestartChoice`, called by the mixture fit on the stability sample). Steps:

1. per-component moments of the relative trajectories I / <I>_T (one pass over the rows);
2. a curve model per component (:func:`numerics.classes.fit_curves`), with a common
   per-temperature factor divided out first (see :func:`common_temperature_factor`);
3. components grouped into classes of one kind and one Tc (:func:`numerics.classes.group_components`),
   each class refitted on its pooled mean trajectory;
4. stability: the mixture refitted from other seeds on a subsample, its classes
   matched to these ones (Hungarian), agreement reported as ARI and a per-class
   Jaccard score; a class below ``STABLE_JACCARD`` is flagged ``stable: false``.

Why groups of components and not a fit with K = number of classes: at the
physical K the maximum-likelihood mixture spends its components on the broad
background and on splitting CDW peaks, and swallows a critical halo into the
background; more components separate the halo but split the CDW and Bragg
peaks. The split pieces share a temperature dependence, which is what this
module reunites (see benchmarks/RESULTS.md, section 13).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from ..numerics import classes as curves
from ..numerics import stability as agreement
from ..numerics.classes import ClassKind, ComponentMoments
from ..numerics.subsample import hash_seed, is_dask, sample_rows

log = logging.getLogger(__name__)

STABLE_JACCARD = 0.7
"""A class whose voxels overlap its matched class of a refit by less than this (mean Jaccard) is not stable."""
MIN_COMMON_FACTOR = 0.01
"""A common temperature factor within 1 % of 1 at every temperature is counting noise: left uncorrected."""
STABILITY_SAMPLE = 60_000
"""Rows of the subsample on which stability refits run (all rows when there are fewer)."""
RESTART_ROWS_PER_COMPONENT = 625
"""Rows per component of the subsample on which class discovery's restarts run (5,000 at
``max_components`` 8) before the winner is refined on every row. A restart is asked which basin
it falls into, not for its last digits; fitting each of ``stability_runs + 1`` restarts at 8
components on every row cost 2-4x a whole XTEC-d run (benchmarks/RESULTS.md, section 13), and
the classes found on the grid of generator settings did not change with the smaller sample."""
CONSENSUS_TOLERANCE = 0.01
"""Restarts whose mean ARI with the others is within this of the highest are equally reproducible
(the sample's own noise); the likelihood decides between them."""
STABILITY_STREAM = 0x5EED
"""Stream number of the stability subsample's rank seed, apart from the mixture's seeding subsample."""


@dataclass
class PhysicalClass:
    """One class: a kind of temperature dependence and the components that show it.

    label : the value in the class-label array
    kind : ClassKind
    components : component labels (indices into the mixture) it merges
    n_voxels : voxels in the class
    n_peaks : in mode "peaks", the peaks (rows of the fit) in the class; else None
    fit : numerics.classes.CurveFit of the pooled mean relative trajectory
    mean_raw : (T,) mean raw intensity;  mean_relative : (T,) mean of I / <I>_T
    mean_rescaled : (T,) mean of the rescaled trajectories the mixture saw (count-weighted component means)
    stability : mean Jaccard overlap with its matched class over the refits (NaN without refits)
    """

    label: int
    kind: ClassKind
    components: list
    n_voxels: int
    fit: curves.CurveFit
    mean_raw: np.ndarray
    mean_relative: np.ndarray
    mean_rescaled: np.ndarray
    stability: float = math.nan
    n_peaks: int | None = None

    @property
    def stable(self) -> bool | None:
        return None if not math.isfinite(self.stability) else bool(self.stability >= STABLE_JACCARD)

    def to_dict(self) -> dict:
        fit = self.fit.to_dict()
        fit.pop("kind")
        if self.kind is ClassKind.CRITICAL:
            # A critical class's order term only models the tail of a neighbouring peak; its
            # exponent is not the class's (the critical parameter is the width).
            fit["beta"] = fit["beta_err"] = None
        return {
            "label": int(self.label),
            "kind": self.kind.value,
            "trend": fit.pop("trend"),
            "components": [int(c) for c in self.components],
            "n_voxels": int(self.n_voxels),
            **({} if self.n_peaks is None else {"n_peaks": int(self.n_peaks)}),
            **fit,
            "stability": None if not math.isfinite(self.stability) else float(self.stability),
            "stable": self.stable,
            "mean_raw": [float(v) for v in self.mean_raw],
            "mean_relative": [float(v) for v in self.mean_relative],
            "mean_rescaled": [float(v) for v in self.mean_rescaled],
            "fit_curve": [float(v) for v in self.fit.curve],
        }


@dataclass
class ClassDiscovery:
    """The classes of one run.

    classes : list of PhysicalClass, in label order
    component_class : ndarray of shape (K,), int8, class label of every component (-1 for empty ones)
    component_fits : list of CurveFit, one per component
    temperature_factor : (T,) the common per-temperature factor divided out before fitting
    stability : {"runs", "ari", "ari_mean", "sample", "stable_jaccard", "chosen_restart",
        "restart_agreement"}: refits and their agreement with this run; which restart this run
        continued and every restart's mean ARI with the others (None when not chosen by agreement)
    """

    classes: list
    component_class: np.ndarray
    component_fits: list
    temperature_factor: np.ndarray
    stability: dict = field(default_factory=dict)

    def class_labels(self, component_labels):
        """Class label of every sample from its component label; shape of the input, int8
        (a dask array stays one, mapped block by block where it is)."""
        if is_dask(component_labels):
            return component_labels.map_blocks(_classes_of, self.component_class, dtype=np.int8)
        return _classes_of(component_labels, self.component_class)

    def count_peak_voxels(self, peak_component_labels: np.ndarray, peak_sizes: np.ndarray) -> None:
        """Mode "peaks": the fit's rows are peaks, so n_voxels counted peaks; recount voxels from
        every peak's component label (n_peaks,) and size (n_peaks,), and keep the peaks as n_peaks."""
        labels = self.class_labels(peak_component_labels)
        voxels = np.bincount(labels[labels >= 0], weights=np.asarray(peak_sizes)[labels >= 0],
                             minlength=len(self.classes)).astype(np.int64)
        for c in self.classes:
            c.n_peaks, c.n_voxels = c.n_voxels, int(voxels[c.label])

    def to_dict(self) -> dict:
        return {
            "classes": [c.to_dict() for c in self.classes],
            "component_class": [int(c) for c in self.component_class],
            "component_kinds": [f.kind.value for f in self.component_fits],
            "temperature_factor": [float(v) for v in self.temperature_factor],
            "stability": self.stability,
        }


def _classes_of(component_labels: np.ndarray, component_class: np.ndarray) -> np.ndarray:
    return component_class[np.asarray(component_labels, dtype=np.intp)]


def component_moments(row_raw, row_labels: np.ndarray, n_components: int) -> ComponentMoments:
    """:func:`numerics.classes.component_moments` of in-memory rows, or, for a dask array of
    rows, summed over its row blocks (each block read where it is, once): (K, T) sums travel,
    never the rows."""
    if not is_dask(row_raw):
        return curves.component_moments(row_raw, row_labels, n_components)
    import dask

    row_raw = row_raw.rechunk({1: -1})
    starts = np.cumsum((0,) + tuple(row_raw.chunks[0]))
    tasks = [dask.delayed(curves.component_moments)(block, row_labels[a:b], n_components)
             for block, a, b in zip(row_raw.to_delayed().ravel(), starts[:-1], starts[1:])]
    total = curves.component_moments(np.empty((0, row_raw.shape[1])), np.empty(0, np.int8), n_components)
    for part in dask.compute(*tasks):
        total = total + part
    return total


def common_temperature_factor(moments: ComponentMoments, fits: list) -> np.ndarray:
    """A multiplicative factor per temperature shared by all voxels, (T,), mean 1.

    Anything that scales a whole volume at one temperature (the incident-beam
    monitor, a changed counting time, an absorption change) multiplies every
    voxel's trajectory alike. Static components are the internal monitor, as
    Bragg intensities are in crystallographic scaling: their curves are smooth
    (c + s tau), so data / curve of the static components, count-weighted,
    estimates the factor; components with a transition are not used, because
    a misfit of their shape near Tc would pass for a monitor change. Without a
    static component the factor is 1. It is reported with the result (a
    drifting monitor is worth knowing about) and divided out before the final fits.
    """
    mean, _ = moments.relative_mean_sem()
    ratios, weights = [], []
    for k, fit in enumerate(fits):
        if fit.kind is ClassKind.STATIC and moments.counts[k] > 0 and np.all(fit.curve > 0.05):
            ratios.append(mean[k] / fit.curve)
            weights.append(float(moments.counts[k]))
    if not ratios:
        return np.ones(mean.shape[1])
    factor = np.average(np.asarray(ratios), axis=0, weights=np.asarray(weights))
    return factor / factor.mean()


def _fit_components(temperatures, moments: ComponentMoments, factor: np.ndarray, **fit_kw) -> list:
    mean, sem = moments.relative_mean_sem()
    filled = np.flatnonzero(moments.counts > 0)
    fitted = iter(curves.fit_curves(temperatures, mean[filled] / factor, sem[filled] / factor, **fit_kw)
                  if filled.size else [])
    return [next(fitted) if moments.counts[k] > 0 else curves.CurveFit(kind=ClassKind.OTHER, model="empty")
            for k in range(mean.shape[0])]


def component_groups(temperatures, moments: ComponentMoments, *, factor: np.ndarray | None = None,
                     **fit_kw) -> tuple:
    """Curve fits of the components and their groups (the classes, not yet fitted).

    Parameters
    ----------
    temperatures : ndarray of shape (T,)
    moments : ComponentMoments of K components
    factor : ndarray of shape (T,), a known common temperature factor; None estimates it
        (:func:`common_temperature_factor`)
    **fit_kw : options of :func:`numerics.classes.fit_curves` (``refine=False``: grid fits only)

    Returns
    -------
    (groups: list of ComponentGroup in class-label order, fits: list of K CurveFit, factor (T,))
    """
    t = np.asarray(temperatures, dtype=float)
    fits = None
    if factor is None:
        factor, scouted = estimate_temperature_factor(t, moments, **fit_kw)
        if not fit_kw.get("refine", True) and np.all(factor == 1.0):
            fits = scouted  # the grid fits on undivided data are the fits asked for
    if fits is None:
        fits = _fit_components(t, moments, factor, **fit_kw)
    return curves.group_components(fits, moments.counts, t), fits, factor


def estimate_temperature_factor(temperatures, moments: ComponentMoments, **fit_kw) -> tuple:
    """:func:`common_temperature_factor` from grid fits of the components, 1 where it is within
    ``MIN_COMMON_FACTOR`` of 1 everywhere.

    Which components are static, and their curves, come from the grid alone (a static fit is
    linear; refinement never changes a curve's kind to or from static), so no refined fits.

    Returns (factor (T,), the grid fits on undivided data: list of K CurveFit).
    """
    t = np.asarray(temperatures, dtype=float)
    scouted = _fit_components(t, moments, np.ones(t.size), **{**fit_kw, "refine": False})
    factor = common_temperature_factor(moments, scouted)
    if np.max(np.abs(factor - 1.0)) < MIN_COMMON_FACTOR:
        factor = np.ones(t.size)
    return factor, scouted


def group_into_classes(temperatures, moments: ComponentMoments, rescaled_means: np.ndarray,
                       *, factor: np.ndarray | None = None, **fit_kw):
    """Curve fits, groups and refitted classes from component moments (no stability).

    Parameters
    ----------
    temperatures : ndarray of shape (T,)
    moments : ComponentMoments of K components
    rescaled_means : ndarray of shape (K, T), the mixture's component means (rescaled units)
    factor : as :func:`component_groups`

    Returns
    -------
    ClassDiscovery without stability
    """
    t = np.asarray(temperatures, dtype=float)
    groups, fits, factor = component_groups(t, moments, factor=factor, **fit_kw)
    return ClassDiscovery(fit_classes(t, moments, groups, rescaled_means, factor, **fit_kw),
                          component_class_of(groups, moments.counts.size), fits, factor)


def component_class_of(groups: list, n_components: int) -> np.ndarray:
    """(K,) int8: the class label of every component (its group's index; -1 in none)."""
    component_class = np.full(n_components, -1, dtype=np.int8)
    for label, g in enumerate(groups):
        component_class[g.components] = label
    return component_class


def fit_classes(temperatures, moments: ComponentMoments, groups: list, rescaled_means: np.ndarray,
                factor: np.ndarray, **fit_kw) -> list:
    """One PhysicalClass per group of components (curves.ComponentGroup), fitted on the pooled
    moments of its components with the models of its kind only.

    The class keeps the kind (and, if static, the trend) its components were grouped by, even
    when its pooled mean sits near a boundary between kinds. ``rescaled_means`` : (K, T) the
    mixture's component means; ``factor`` : (T,) the common temperature factor divided out.
    """
    t = np.asarray(temperatures, dtype=float)
    if not groups:
        return []
    merged = moments.merged([g.components for g in groups])
    mean, sem = merged.relative_mean_sem()
    raw_mean = merged.raw_mean()
    found = []
    for label, g in enumerate(groups):
        if merged.counts[label] == 0:
            # A class of a stored model that no voxel of this scan joins: nothing to fit.
            fit = curves.CurveFit(kind=g.kind, model="empty", curve=np.full(t.size, np.nan))
        else:
            # The fit also starts where the class's components put Tc (a pooled mean of cores
            # and shells can have a deeper wrong basin than any of its components).
            fit = curves.fit_curve(t, mean[label] / factor, sem[label] / factor,
                                   kinds=curves.MODELS_OF_KIND[g.kind], tc_hints=[g.tc], **fit_kw)
        fit.kind = g.kind
        if g.kind is ClassKind.STATIC:
            fit.trend = g.trend
        w = moments.counts[g.components].astype(float)
        rescaled = (rescaled_means[g.components] * w[:, None]).sum(axis=0) / max(w.sum(), 1.0)
        found.append(PhysicalClass(label, g.kind, list(g.components), int(merged.counts[label]), fit,
                                   raw_mean[label], mean[label], rescaled))
    return found


def measure_stability(discovery: ClassDiscovery, reference_labels: np.ndarray, refit_labelings: list) -> None:
    """Fill ``discovery.stability`` and each class's score from class labelings of the same sample rows.

    Parameters
    ----------
    reference_labels : ndarray of shape (n,), this run's class labels on the sample
    refit_labelings : list of (ndarray of shape (n,), list of ClassKind per label) from refits
    """
    labels = [c.label for c in discovery.classes]
    scores = np.zeros((len(refit_labelings), len(labels)))
    aris = []
    for r, (other, kinds) in enumerate(refit_labelings):
        aris.append(agreement.adjusted_rand_index(reference_labels, other))
        mapping = agreement.match_labels(reference_labels, other)
        # A match of another kind is no reproduction.
        mapping = {a: b for a, b in mapping.items() if b < len(kinds) and kinds[b] is discovery.classes[a].kind}
        scores[r] = agreement.jaccard_by_label(reference_labels, other, mapping, labels)
    for c, s in zip(discovery.classes, scores.mean(axis=0) if len(refit_labelings) else []):
        c.stability = float(s)
    discovery.stability = {
        "runs": len(refit_labelings),
        "ari": [float(a) for a in aris],
        "ari_mean": float(np.mean(aris)) if aris else None,
        "sample": int(np.asarray(reference_labels).size),
        "stable_jaccard": STABLE_JACCARD,
    }


def restart_sample_size(n_components: int, init_sample_size: int) -> int:
    """Rows of the seeding subsample for class discovery's mixture fit: the restarts converge
    on it and only the best goes on to the full data (see ``RESTART_ROWS_PER_COMPONENT``)."""
    return min(int(init_sample_size), RESTART_ROWS_PER_COMPONENT * int(n_components))


def stability_sample(X, row_raw, row_keys, random_state) -> tuple:
    """The rows on which restarts and refits are compared: at most ``STABILITY_SAMPLE``, chosen by
    key as the seeding subsample is (the same voxels in memory or in blocks).

    Returns (positions (m,), X rows (m, T), raw rows (m, T)), in memory.
    """
    positions, (Xs, raw_s) = sample_rows([X, row_raw], row_keys, STABILITY_SAMPLE,
                                         hash_seed(random_state, STABILITY_STREAM))
    return positions, Xs, raw_s


def sample_classes(temperatures, raw_s: np.ndarray, component_labels: np.ndarray, n_components: int,
                   factor: np.ndarray | None = None) -> tuple:
    """(class labels (m,), kinds) of a labelling of the sample rows by components (m,), grouped on
    their raw rows ``raw_s`` (m, T) with grid fits only: restarts and refits are asked which
    classes they find, not for their errors. ``factor``: a known common temperature factor (None:
    estimated from this labelling)."""
    # Only which classes: no class-level fits.
    groups, _, _ = component_groups(temperatures, curves.component_moments(raw_s, component_labels, n_components),
                                    factor=factor, refine=False)
    return _classes_of(component_labels, component_class_of(groups, n_components)), [g.kind for g in groups]


def component_labels_of(rows: np.ndarray, params) -> np.ndarray:
    """(m,) int8 component of highest responsibility of every row (m, T) under ``params``."""
    from ..numerics.mixture import e_step

    return np.argmax(e_step(rows, params)[0], axis=1).astype(np.int8)


class RestartChoice:
    """Which restart's classes the other restarts agree with most: the one to go on with.

    Called by the mixture fit (``fit_mixture(choose_restart=...)``) with the converged restarts,
    [(MixtureParams, mean log L), ...]. Each restart labels the sample rows ``Xs`` (m, T), its
    components are grouped into classes on the raw rows ``raw_s`` (m, T) (grid fits only, one
    common factor for all, from the most likely restart), and its agreement is its mean ARI with the other restarts' class labels.
    Among the restarts within ``tolerance`` of the highest agreement, the one of highest
    log-likelihood wins, so where the restarts agree this is the maximum-likelihood choice.
    Every restart's class labels on the sample stay in ``labelings`` ([(labels (m,), kinds)]):
    the losers are the stability refits, so :func:`discover_classes` reuses them.

    Why not the likelihood alone: with more components than classes, the likelihood ranks how
    the components tile the data, not whether the classes are right, and its best optimum can
    be the one that cuts a class in two (a CDW peak's shell joining a strong halo, seen at
    halo_amplitude 600: log L 21.4 against 18.7-19.6 for three restarts that agree with each
    other and keep the CDW whole). Choosing the solution that the other seeds reproduce is the
    stability principle of clustering validation (Ben-Hur et al., Pac. Symp. Biocomput. 2002;
    Lange et al., Neural Comput. 16, 1299, 2004), applied to the restarts already run.
    """

    def __init__(self, temperatures, Xs: np.ndarray, raw_s: np.ndarray, *, n_components: int,
                 tolerance: float = CONSENSUS_TOLERANCE):
        self.temperatures = np.asarray(temperatures, dtype=float)
        self.Xs, self.raw_s = Xs, raw_s
        self.n_components = int(n_components)
        self.tolerance = float(tolerance)
        self.labelings: list = []
        self.agreement: np.ndarray | None = None

    def __call__(self, restarts: list) -> int:
        from ..numerics.mixture import most_likely_restart

        labels = [component_labels_of(self.Xs, params) for params, _ in restarts]
        n = len(restarts)
        best_ll = most_likely_restart(restarts)
        # The common temperature factor is a property of the data, not of a restart: estimated
        # once, from the most likely restart's static components, it serves every restart.
        factor, _ = estimate_temperature_factor(
            self.temperatures, curves.component_moments(self.raw_s, labels[best_ll], self.n_components))
        self.labelings = [sample_classes(self.temperatures, self.raw_s, lab, self.n_components, factor=factor)
                          for lab in labels]
        if n < 3:  # with two, agreement is symmetric: it cannot tell them apart
            return best_ll
        pair = np.ones((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                pair[i, j] = pair[j, i] = agreement.adjusted_rand_index(self.labelings[i][0], self.labelings[j][0])
        self.agreement = (pair.sum(axis=1) - 1.0) / (n - 1)
        near = [i for i in range(n) if self.agreement[i] >= self.agreement.max() - self.tolerance]
        chosen = max(near, key=lambda i: restarts[i][1])
        if chosen != best_ll:
            log.info("restart %d (agreement %.3f with the others) chosen over restart %d of higher log-likelihood "
                     "(agreement %.3f)", chosen, self.agreement[chosen], best_ll, self.agreement[best_ll])
        return chosen


def discover_classes(
    temperatures: np.ndarray,
    X: np.ndarray,
    row_raw: np.ndarray,
    row_labels: np.ndarray,
    component_means: np.ndarray,
    *,
    n_components: int,
    restarts: list | None = None,
    stability_runs: int = 3,
    random_state: int | None = 0,
    reg_covar: float = 1e-6,
    tol: float = 1e-4,
    max_iter: int = 300,
    init_sample_size: int = 20_000,
    row_keys=None,
    chosen_restart: int | None = None,
    sample: tuple | None = None,
    choice: RestartChoice | None = None,
) -> ClassDiscovery:
    """Classes from a fitted mixture, with their stability over refits.

    Parameters
    ----------
    temperatures : ndarray of shape (T,)
    X : ndarray or dask array of shape (n_rows, T), the features the mixture was fitted on
        (rescaled); dask (chunked trajectories): read block by block, never held whole
    row_raw : ndarray or dask array of shape (n_rows, T), raw intensities of the same rows
        (dask: the same row chunks as ``X``)
    row_labels : ndarray of shape (n_rows,), the fitted component of each row
    row_keys : None or (n_rows,) integers, numpy or dask: what identifies each row (a voxel's
        flat index), from which the stability subsample is chosen; None: the row index
    component_means : ndarray of shape (K, T), the mixture's means (rescaled units)
    restarts : the mixture fit's restarts, (MixtureParams, mean log L), from
        ``fit_mixture(keep_restarts=True)``; all but the chosen one serve as refits
    stability_runs : refits to compare with: the other restarts first (other k-means++
        seeds, already converged), then, if there are fewer, new fits from seeds
        ``random_state + 1 ...`` on a subsample of at most ``STABILITY_SAMPLE`` rows (one
        start each, no smoothing). They test whether the classes, not a particular
        optimum, reproduce.
    chosen_restart : index into ``restarts`` of the one this fit continued (the mixture fit's
        ``n_init_best``); None: the one of highest log-likelihood
    sample : the stability subsample, as :func:`stability_sample` returns it, if already drawn
    choice : the :class:`RestartChoice` that chose ``chosen_restart`` on ``sample``: the refits
        among the restarts reuse its class labels, and its agreement goes to the stability record

    Returns
    -------
    ClassDiscovery
    """
    from threadpoolctl import threadpool_limits

    from ..numerics.mixture import fit_mixture, most_likely_restart

    # Small matrix products only (K x T curves, grids of a few thousand points): a
    # multi-threaded BLAS costs more in start-up than it saves (0.4 vs 1.2 ms per grid search).
    with threadpool_limits(limits=1, user_api="blas"):
        moments = component_moments(row_raw, row_labels, n_components)
        discovery = group_into_classes(temperatures, moments, component_means)
        if stability_runs <= 0:
            measure_stability(discovery, np.empty(0, np.int8), [])
            return discovery
        sample, Xs, raw_s = sample if sample is not None else stability_sample(X, row_raw, row_keys, random_state)
        # The subsample's labels only (dask labels: gathered from where the blocks are).
        reference = np.asarray(discovery.class_labels(row_labels[sample]))
        refits = []

        def classes_of(labels):
            # The common factor is a property of the data, not of a fit: reuse this run's.
            return sample_classes(temperatures, raw_s, labels, n_components, factor=discovery.temperature_factor)

        restarts = list(restarts or [])
        if restarts and chosen_restart is None:
            chosen_restart = most_likely_restart(restarts)
        losers = sorted((i for i in range(len(restarts)) if i != chosen_restart), key=lambda i: -restarts[i][1])
        for i in losers[:stability_runs]:
            refits.append(choice.labelings[i] if choice is not None and choice.labelings
                          else classes_of(component_labels_of(Xs, restarts[i][0])))
        for r in range(1, stability_runs - len(refits) + 1):
            seed = None if random_state is None else int(random_state) + r
            # tol 10x looser than the main fit's: a refit is asked which classes it finds, and the
            # last digits of its likelihood do not move a component between kinds.
            fit = fit_mixture(Xs, n_components, reg_covar=reg_covar, tol=10 * tol, max_iter=max_iter, n_init=1,
                              random_state=seed, init_sample_size=init_sample_size)
            refits.append(classes_of(fit.labels))
        measure_stability(discovery, reference, refits)
        discovery.stability["chosen_restart"] = chosen_restart
        discovery.stability["restart_agreement"] = (
            None if choice is None or choice.agreement is None else [float(a) for a in choice.agreement])
        unstable = [c.label for c in discovery.classes if c.stable is False]
        if unstable:
            log.warning("classes %s did not reproduce over %d refits (stability < %.2f)", unstable, stability_runs,
                        STABLE_JACCARD)
        return discovery
