"""The chunked XTEC engine: volume -> statistics -> threshold -> trajectories -> fit -> labels.

The 4-D input (T, *spatial) is streamed block by block through dask, normally once:

1. *statistics* (the one read): the temperature mean of every voxel (0 where
   masked, NaN where the trajectory holds NaN/Inf) goes to a 3-D scratch array
   (1/T of the input; a zarr array, or dask blocks persisted in the workers'
   memory under a distributed Client, see :func:`.store.scratch_store`); at the same time
   the block keeps the trajectories above a provisional cut (every valid one for inputs
   under ``StreamingLimits.cache_all_bytes``;
   otherwise a cut estimated on a sample of blocks, lowered by a margin);
2. *threshold*: the histogram of log <I>_T is built from the scratch array by
   cheap passes (or from memory), and the final cut found;
3. *trajectories*: the kept trajectories are filtered to the final cut. Small
   inputs' rows are sorted by flat voxel index in memory; larger inputs' rows stay
   where the first pass wrote them, one row block per spatial block, on local disk
   or in the workers' memory (:mod:`.trajectory_store`). Only if the final cut is
   below the provisional one is the input read a second time.

The fit then runs where the rows are (EM as a reduction of per-block sufficient
statistics; the seeding subsample is chosen by voxel index, so the answer does not
depend on the row order), and labels are written block by block into a chunked
int8 zarr array. XTEC-s (:mod:`..numerics.smoothing_blocks`), class discovery,
``apply`` and mode "peaks" work on the row blocks too: in mode "peaks" each block's rows
learn their connected peak where they are, and only the peaks' summed trajectories
(n_peaks x T) come back to be fitted.
dask's default scheduler is used, so an active ``distributed.Client`` takes the
block tasks; otherwise the local threaded scheduler does.

The stages, one module each, in the order data flows through them:

- :mod:`.params`        ClusterParams, every parameter declared once
- :mod:`.store`         where intermediates live (input as dask, scratch arrays, reading back)
- :mod:`.first_pass`    statistics pass + provisional cut (kernels: :mod:`xtec_flows.numerics.blocks`)
- :mod:`.histogram`     exact quartiles and the chunked threshold histogram
- :mod:`.components`    chunked connected components (mode "peaks")
- :mod:`.trajectory_store`  kept rows in blocks where they were read (disk or workers)
- :mod:`.trajectories`  the passes above, in order: :class:`Trajectories`
- :mod:`.fit`           features and the mixture fit
- :mod:`.class_discovery`  classes="auto": components grouped into physical classes
- :mod:`.labels`        labels written block by block
- :mod:`.result`        :class:`ClusterResult`
- :mod:`.model`         a stored model that labels other scans (:func:`apply`)
- here                  :func:`cluster`, :func:`run`, :func:`apply`, :func:`select_n_components`
"""

from __future__ import annotations

import time

import numpy as np

from .. import validation
from .._version import __version__
from ..io import zarr_io
from ..numerics.smoothing import SmoothingKernel
from .class_discovery import RestartChoice, discover_classes, restart_sample_size, stability_sample
from .fit import FitOutput, features, fit_trajectories
from .labels import write_labels
from .model import StoredModel, label_with_model
from .params import CLASS_DISCOVERY_FIELDS, CLASS_MODES, NONFINITE_POLICIES, ClusterParams
from .result import ClusterResult
from .store import DEFAULT_LIMITS, StreamingLimits, as_dask
from .trajectories import Trajectories, gather_trajectories

__all__ = [
    "CLASS_DISCOVERY_FIELDS", "CLASS_MODES", "NONFINITE_POLICIES", "SELECTION_CRITERIA", "ClusterParams",
    "ClusterResult", "FitOutput", "StoredModel", "StreamingLimits", "Trajectories", "apply", "as_dask", "check_class_discovery_input", "cluster", "features",
    "fit_trajectories", "gather_trajectories", "run", "select_n_components", "write_labels",
]


def cluster(
    volume,
    temperatures,
    *,
    mode: str = "d",
    n_components: int = 4,
    threshold: str | float = "kl",
    rescale: str = "mean",
    mask: str = "zero-mean",
    nonfinite: str = "raise",
    smoothing: SmoothingKernel | None = None,
    reg_covar: float = 1e-6,
    tol: float = 1e-4,
    max_iter: int = 300,
    n_init: int = 3,
    random_state: int | None = 0,
    ordering: str = "monotonic",
    classes: str | None = None,
    max_components: int = 8,
    stability_runs: int = 3,
    chunks: tuple | None = None,
    labels_store=None,
    components_store=None,
    overwrite: bool = False,
    scratch=None,
    progress: bool = False,
    limits: StreamingLimits | None = None,
) -> ClusterResult:
    """Cluster the temperature trajectories of a reciprocal-space volume (XTEC).

    Parameters
    ----------
    volume : numpy, zarr or dask array of shape (T, *spatial), 1, 2 or 3 spatial dims
        Intensities I(T, L, K, H), I(T, K, H), or I(T, q) for a series of 1-D patterns (powder,
        line scans, PDFs). Never loaded whole: read block by block.
    temperatures : array-like of shape (T,), strictly monotonic
        (unless ``ordering="as-given"``: any finite values, e.g. times, or a temperature
        ramp then a hold, in measurement order)
    mode : {"d", "s", "peaks"}
        XTEC-d (every voxel), XTEC-s (label smoothing between E and M steps), or
        clustering of connected-peak averages.
    n_components : int
    threshold : {"kl", "simple", "none"} or float (explicit cut on <I>_T)
    rescale : {"mean", "zscore", "log-mean", "none"}
    classes : None or "auto"
        None: ``n_components`` clusters, each one label (XTEC-d/s as published).
        "auto": class discovery (see :mod:`xtec_flows.engine.class_discovery`): a mixture of
        ``max_components`` components, grouped into classes by the shape of their
        temperature dependence (order parameter, critical, onset, static, other) and
        Tc; ``labels`` then holds class labels, ``components`` the component labels,
        and ``result.classes`` each class's kind, Tc, exponent and stability over
        ``stability_runs`` refits. Needs at least 8 temperatures.
    labels_store : zarr store or path for the label array (default: in memory).
        A path holding other data is refused; an earlier xtec-flows label array
        there is replaced only with ``overwrite=True``.
    chunks : spatial block shape for the streaming passes (default: the input's storage chunks,
        merged into blocks of ``limits.cluster_block_voxels`` under a distributed Client)
    limits : :class:`~xtec_flows.engine.store.StreamingLimits`, memory against reads of the
        input (default: keep inputs under 512 MB whole, scratch under 1 GiB in memory); the
        labels do not depend on them

    Returns
    -------
    ClusterResult

    Examples
    --------
    >>> from xtec_flows.synthetic import make_volume
    >>> from xtec_flows import cluster
    >>> volume, temps, truth = make_volume((8, 32, 32), seed=0)
    >>> result = cluster(volume, temps, n_components=3)
    >>> result.labels.shape
    (32, 32)
    """
    params = ClusterParams(
        mode=mode,
        n_components=n_components,
        threshold=threshold,
        rescale=rescale,
        mask=mask,
        nonfinite=nonfinite,
        smoothing=smoothing,
        reg_covar=reg_covar,
        tol=tol,
        max_iter=max_iter,
        n_init=n_init,
        random_state=random_state,
        ordering=ordering,
        classes=classes,
        max_components=max_components,
        stability_runs=stability_runs,
    )
    return run(
        volume, temperatures, params, chunks=chunks, labels_store=labels_store, overwrite=overwrite,
        scratch=scratch, progress=progress, components_store=components_store, limits=limits,
    )


def run(
    volume, temperatures, params: ClusterParams, *, chunks=None, labels_store=None, overwrite=False, scratch=None,
    progress=False, on_stage=None, components_store=None, limits: StreamingLimits | None = None, warm_start=None,
) -> ClusterResult:
    """:func:`cluster` with a ready :class:`ClusterParams`.

    ``warm_start``: a :class:`~xtec_flows.numerics.mixture.MixtureParams` of the mixture's
    shape to begin EM from instead of seeding (a provisional update of a growing scan starts
    from the previous update's fit); it does not enter the result's parameters.

    ``on_stage(name, fraction)``, if given, is called as each pass ends ("read", "fit",
    "labels") with the fraction of the work done so far (0..1); orchestrators use it for
    progress reports.
    """
    report = on_stage or (lambda name, fraction: None)
    zarr_io.check_labels_target(labels_store, overwrite)
    if params.classes is not None:
        zarr_io.check_labels_target(components_store, overwrite)
        check_class_discovery_input(volume, temperatures, params.ordering)
    traj = gather_trajectories(volume, temperatures, params, chunks=chunks, scratch=scratch, progress=progress,
                               limits=limits or DEFAULT_LIMITS)
    try:
        return _fit_and_label(traj, params, labels_store, components_store, report, warm_start)
    finally:
        traj.close()


def _fit_and_label(traj: Trajectories, params: ClusterParams, labels_store, components_store, report,
                   warm_start=None) -> ClusterResult:
    report("read", 0.6)
    t0 = time.perf_counter()
    X = features(traj, params)
    discovery = None
    if params.classes is None:
        traj.raw = None  # the raw intensities are not needed any more: free them before the fit
        fit = fit_trajectories(traj, params, X=X, init_params=warm_start)
        traj.timings["fit"] = time.perf_counter() - t0
    else:
        k = min(params.max_components, X.shape[0])
        if warm_start is not None and warm_start.n_components != k:
            warm_start = None  # fewer rows than max_components: seed afresh
        row_raw = _row_raw(traj, params)
        row_keys = None if params.mode == "peaks" else traj.row_keys
        # The restarts that lost are fits from other seeds: they serve as the stability refits,
        # so run at least one restart per refit beside the winner, each on a subsample. The
        # winner is the restart whose classes the others reproduce best (on the rows the
        # stability is measured on), not merely the most likely one.
        choose = sample = None
        if params.stability_runs > 0 and warm_start is None:
            sample = stability_sample(X, row_raw, row_keys, params.random_state)
            choose = RestartChoice(traj.temperatures, sample[1], sample[2], n_components=k)
        fit = fit_trajectories(traj, params, n_components=k, X=X, warn_empty=False,
                               n_init=max(params.n_init, params.stability_runs + 1), keep_restarts=True,
                               init_params=warm_start,
                               init_sample_size=restart_sample_size(k, params.init_sample_size),
                               choose_restart=choose)
        traj.timings["fit"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        discovery = discover_classes(
            traj.temperatures, X, row_raw, fit.row_labels, fit.params.means, n_components=k, restarts=fit.restarts,
            stability_runs=params.stability_runs, random_state=params.random_state, reg_covar=params.reg_covar,
            tol=params.tol, max_iter=params.max_iter, init_sample_size=params.init_sample_size,
            row_keys=row_keys, chosen_restart=fit.mixture.n_init_best, sample=sample,
            choice=choose,
        )
        if params.mode == "peaks":
            discovery.count_peak_voxels(fit.row_labels, traj.peak_sizes)
        traj.raw = None
        del row_raw
        traj.timings["classes"] = time.perf_counter() - t1
    del X
    report("fit", 0.8)
    return _labelled_result(traj, params, fit.sample_labels, discovery, fit.params, counts=fit.counts,
                            log_likelihood=fit.log_likelihood, bic=fit.bic, n_iter=fit.n_iter, converged=fit.converged,
                            labels_store=labels_store, components_store=components_store, report=report)


def apply(
    volume, temperatures, model: StoredModel, *, chunks=None, labels_store=None, components_store=None,
    overwrite=False, scratch=None, progress=False, on_stage=None, limits: StreamingLimits | None = None,
) -> ClusterResult:
    """Label a scan with a stored model instead of fitting one (see :mod:`.model`).

    The scan is thresholded and rescaled as the model's parameters say, every voxel (or peak)
    gets its most probable component under the stored mixture, and a classes model's classes
    are refitted on this scan's voxels (their Tc is this scan's). ``result.model`` records
    where the model came from; ``means``/``variances``/``weights`` are the model's.

    Raises ValueError, before anything is read, when the scan's temperatures are not the
    model's (:meth:`StoredModel.check_temperatures`).
    """
    report = on_stage or (lambda name, fraction: None)
    params = model.params
    zarr_io.check_labels_target(labels_store, overwrite)
    if model.component_class is not None:
        zarr_io.check_labels_target(components_store, overwrite)
    n_t = validation.check_volume(volume)[0]
    model.check_temperatures(validation.check_temperatures(temperatures, n_t, params.ordering))
    traj = gather_trajectories(volume, temperatures, params, chunks=chunks, scratch=scratch, progress=progress,
                               limits=limits or DEFAULT_LIMITS)
    try:
        return _label_by_model(traj, model, params, labels_store, components_store, report)
    finally:
        traj.close()


def _label_by_model(traj: Trajectories, model: StoredModel, params: ClusterParams, labels_store, components_store,
                    report) -> ClusterResult:
    report("read", 0.6)
    t0 = time.perf_counter()
    X = features(traj, params)
    labelled = label_with_model(model, X, traj.temperatures, _row_raw(traj, params), traj)
    traj.raw = None
    del X
    traj.timings["fit"] = time.perf_counter() - t0
    report("fit", 0.8)
    return _labelled_result(traj, params, labelled.sample_labels, labelled.discovery, model.mixture,
                            counts=labelled.counts, log_likelihood=labelled.log_likelihood, bic=labelled.bic, n_iter=0,
                            converged=True, labels_store=labels_store, components_store=components_store,
                            report=report, model=model.provenance())


def _row_raw(traj: Trajectories, params: ClusterParams):
    """(n_rows, T) raw intensities of the rows the mixture saw: voxels, or peak means in mode "peaks"."""
    if params.mode == "peaks":
        return traj.peak_raw
    if traj.chunked is not None:
        return traj.chunked.raw()
    return traj.raw


def _labelled_result(traj: Trajectories, params: ClusterParams, sample_labels, discovery, mixture, *, counts,
                     log_likelihood, bic, n_iter, converged, labels_store, components_store, report,
                     model: dict | None = None) -> ClusterResult:
    """Write the labels (class labels and components with classes) and assemble the result.

    sample_labels : (n_samples,) int8 component of every thresholded voxel; mixture : the
    MixtureParams the labels come from (fitted, or a stored model's)."""
    t0 = time.perf_counter()
    attrs = {zarr_io.PRODUCER_KEY: __version__, "params": params.to_dict()}
    if model is not None:
        attrs["model"] = model
    components = None
    if discovery is None:
        labels = write_labels(traj, sample_labels, labels_store, attrs=attrs)
    else:
        labels = write_labels(traj, discovery.class_labels(sample_labels), labels_store,
                              attrs={**attrs, "content": "classes"})
        components = write_labels(traj, sample_labels, components_store, attrs={**attrs, "content": "components"})
    traj.timings["labels"] = time.perf_counter() - t0
    report("labels", 0.85)
    return ClusterResult(
        labels=labels, temperatures=traj.temperatures, means=mixture.means, variances=mixture.variances,
        weights=mixture.weights, counts=counts, log_likelihood=log_likelihood, bic=bic, n_iter=n_iter,
        converged=converged, log_cutoff=traj.cutoff.log_cutoff, threshold_success=traj.cutoff.success,
        histogram_edges=traj.histogram.edges, histogram_counts=traj.histogram.counts, n_valid=traj.n_valid,
        n_thresholded=traj.n_samples, n_samples=traj.n_peaks if params.mode == "peaks" else traj.n_samples,
        n_peaks=traj.n_peaks, params=params, timings=traj.timings, n_reads=traj.n_reads, components=components,
        discovery=discovery, model=model,
    )


def check_class_discovery_input(volume, temperatures, ordering: str = "monotonic") -> None:
    """Refuse, before anything is read, a series too short to fit a Tc, or one whose coordinate repeats."""
    from ..numerics.classes import MIN_TEMPERATURES

    n_t = validation.check_volume(volume)[0]
    t = validation.check_temperatures(temperatures, n_t, ordering)
    if np.unique(t).size != t.size:
        raise ValueError(
            "classes='auto' fits each class's intensity as a function of the series coordinate, which must "
            f"then take distinct values; these repeat ({np.unique(t).size} distinct of {t.size}). For a series "
            "ordered by time with a temperature ramp and hold, pass the times as the coordinate (and interpolate "
            "the temperatures at the fitted transition), or drop the repeated scans"
        )
    if n_t < MIN_TEMPERATURES:
        raise ValueError(
            f"classes='auto' fits a transition temperature, an exponent and a baseline to every class, which "
            f"needs at least {MIN_TEMPERATURES} temperatures; this series has {n_t}. Measure more temperatures, "
            "or cluster with a fixed number of components (classes=None, e.g. n_components=3)"
        )


SELECTION_CRITERIA = ("bic", "icl", "elbow")


def select_n_components(volume, temperatures, k_values=range(2, 11), *, criterion: str = "bic", chunks=None,
                        scratch=None, progress=False, limits: StreamingLimits | None = None, **kwargs) -> list[dict]:
    """Sweep K and report BIC and ICL (lower is better); the volume is read only twice.

    criterion : "bic" (lowest BIC), "icl" (lowest ICL = BIC + 2 x assignment entropy,
        which stops adding components that overlap) or "elbow" (the knee of the BIC curve).
        On millions of voxels BIC alone keeps falling with K; ICL or the elbow give an
        honest choice. The table shows all three.

    Returns
    -------
    table : list of dicts with keys n_components, bic, icl, entropy, log_likelihood, n_iter,
        converged, sorted by K; the chosen row has ``"best": True``, every row ``"criterion"``.
    """
    from ..numerics.mixture import assignment_entropy, elbow, icl

    validation.check_choice("criterion", criterion, SELECTION_CRITERIA)
    k_values = [validation.check_int("k", k, 1) for k in k_values]
    if not k_values:
        raise ValueError("k_values is empty; give at least one number of components, e.g. 2..10")
    params = ClusterParams(n_components=max(k_values), **kwargs)
    traj = gather_trajectories(volume, temperatures, params, chunks=chunks, scratch=scratch, progress=progress,
                               limits=limits or DEFAULT_LIMITS)
    try:
        # Chunked rows (inputs above 512 MB) are fitted and scored block by block where they are.
        X = features(traj, params)
        table = []
        for k in sorted(set(k_values)):
            fit = fit_trajectories(traj, params, n_components=k, X=X)
            entropy = assignment_entropy(X, fit.params)
            table.append(
                {"n_components": k, "bic": fit.bic, "icl": icl(fit.bic, entropy), "entropy": entropy,
                 "log_likelihood": fit.log_likelihood, "n_iter": fit.n_iter, "converged": fit.converged}
            )
    finally:
        traj.close()
    if criterion == "elbow":
        chosen = elbow([r["n_components"] for r in table], [r["bic"] for r in table])
        best = next(r for r in table if r["n_components"] == chosen)
    else:
        best = min(table, key=lambda r: r[criterion])
    for r in table:
        r["best"] = r is best
        r["criterion"] = criterion
    return table
