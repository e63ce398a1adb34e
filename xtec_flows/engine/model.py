"""Reusing a model: label a new scan with a mixture fitted on another one.

A doping, pressure or field series is measured scan after scan on the same temperature grid;
fitting each scan afresh gives clusters whose numbering and boundaries move from scan to scan.
Applying one scan's fitted mixture to the others instead gives every voxel of every scan the
component (and, for a ``classes="auto"`` model, the class) it is most probable under that one
model, so class 2 means the same temperature dependence everywhere, and the class curves
refitted on each scan's own voxels give that scan's Tc.

What is taken from the model: the clustering parameters (threshold method, rescaling, mask,
mode), the components' means, variances and weights, and, for classes, which components form
which class and of which kind. What is the new scan's own: the threshold (the KL cut is a
property of a scan's intensity distribution), the trajectories, and every class's fit.
Labels are the argmax of the stored mixture's responsibilities, with no EM step and no label
smoothing (a mode "s" model labels voxels as XTEC-d would with its parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..numerics import classes as curves
from ..numerics.mixture import MixtureParams, assign_blocks, bic, e_step
from ..numerics.subsample import is_dask
from .class_discovery import ClassDiscovery, component_class_of, component_moments, fit_classes
from .params import ClusterParams


@dataclass(frozen=True)
class StoredModel:
    """A fitted mixture, as a result stores it, ready to label other scans.

    params : the ClusterParams it was fitted with
    mixture : MixtureParams, means and variances (K, T) in rescaled units, weights (K,)
    temperatures : (T,) the series coordinate it was fitted on
    component_class : (K,) int8 class of each component (-1: none) for a classes="auto" model, else None
    class_kinds : one ClassKind value (str) per class, with component_class
    class_trends : one static trend (str) per class, with component_class
    source : where the model came from (a result directory, or a Tiled result node): recorded
        in every result made with it
    """

    params: ClusterParams
    mixture: MixtureParams
    temperatures: np.ndarray
    component_class: np.ndarray | None = None
    class_kinds: tuple = ()
    class_trends: tuple = ()
    source: dict = field(default_factory=dict)

    @classmethod
    def from_summary(cls, summary: dict, source: dict, *, means=None, variances=None, weights=None,
                     temperatures=None) -> StoredModel:
        """A model from a result's summary: ``result.json`` of ``xtec-flows cluster`` (which holds
        the arrays too), or a Tiled result's metadata with its arrays given separately.

        Raises ValueError naming what is missing (a summary that is not an xtec-flows result).
        """
        where = source.get("path") or source.get("uri") or "the model"
        params = summary.get("params", summary.get("parameters"))
        if not isinstance(params, dict):
            raise ValueError(f"{where} is not an xtec-flows result: it records no clustering parameters "
                             "('params' in result.json, 'parameters' in a Tiled result)")
        arrays = {"means": means, "variances": variances, "weights": weights, "temperatures": temperatures}
        for name in arrays:
            if arrays[name] is None:
                if name not in summary:
                    raise ValueError(f"{where} holds no {name!r}; give a complete result of xtec-flows cluster")
                arrays[name] = summary[name]
        mixture = MixtureParams(np.asarray(arrays["weights"], dtype=np.float64),
                                np.asarray(arrays["means"], dtype=np.float64),
                                np.asarray(arrays["variances"], dtype=np.float64))
        t = np.asarray(arrays["temperatures"], dtype=np.float64)
        if mixture.means.shape != mixture.variances.shape or mixture.means.shape != (mixture.weights.size, t.size):
            raise ValueError(f"{where}: means {mixture.means.shape}, variances {mixture.variances.shape}, weights "
                             f"{mixture.weights.shape} and temperatures {t.shape} do not describe one mixture")
        component_class = summary.get("component_class")
        kinds = trends = ()
        if component_class is not None:
            component_class = np.asarray(component_class, dtype=np.int8)
            listed = summary.get("classes") or []
            kinds = tuple(c["kind"] for c in listed)
            trends = tuple(c.get("trend") or "flat" for c in listed)
            if component_class.size != mixture.weights.size or component_class.max(initial=-1) >= len(kinds):
                raise ValueError(f"{where}: component_class {component_class.tolist()} does not match its "
                                 f"{mixture.weights.size} components and {len(kinds)} classes")
        return cls(ClusterParams.from_dict(params), mixture, t, component_class, kinds, trends, dict(source))

    def check_temperatures(self, temperatures: np.ndarray) -> None:
        """Refuse a scan on another temperature grid: the components are (T,) curves on this one.

        Temperatures agree when each is within a tenth of the model's smallest step (or 1e-6 of
        its value for a one-step grid)."""
        t = np.asarray(temperatures, dtype=np.float64)
        where = self.source.get("path") or "the model"
        if t.shape != self.temperatures.shape:
            raise ValueError(
                f"the scan has {t.size} temperatures but {where} was fitted on {self.temperatures.size} "
                f"({_range(self.temperatures)}); a model labels scans measured on its own temperature grid: "
                "fit this scan on its own (xtec-flows cluster) or measure the model's temperatures")
        steps = np.abs(np.diff(self.temperatures))
        tolerance = 0.1 * float(steps[steps > 0].min()) if np.any(steps > 0) else 1e-6 * float(np.abs(t).max())
        off = np.abs(t - self.temperatures)
        if off.max() > tolerance:
            i = int(np.argmax(off))
            raise ValueError(
                f"the scan's temperature {i} is {t[i]:g} but {where} was fitted at {self.temperatures[i]:g} "
                f"(tolerance {tolerance:g}); a model labels scans measured on its own temperature grid: fit "
                "this scan on its own (xtec-flows cluster) or measure the model's temperatures")

    def provenance(self) -> dict:
        """What a result made with this model records as its ``model``."""
        return {**self.source, "n_components": int(self.mixture.weights.size),
                "classes": None if self.component_class is None else len(self.class_kinds)}


def _range(t: np.ndarray) -> str:
    return f"{t.min():g} to {t.max():g}" if t.size else "none"


@dataclass
class Labelling:
    """A stored model applied to one scan's features.

    row_labels : (n_rows,) int8, component of every row of the features (peaks: per peak)
    sample_labels : (n_samples,) int8, component of every thresholded voxel
    counts : (K,) voxels per component
    log_likelihood, bic : of the features under the stored mixture
    discovery : the model's classes refitted on this scan (classes models), else None
    """

    row_labels: np.ndarray
    sample_labels: np.ndarray
    counts: np.ndarray
    log_likelihood: float
    bic: float
    discovery: ClassDiscovery | None = None


def _assign_block(X: np.ndarray, mixture, rows: int) -> tuple[np.ndarray, float]:
    """(labels (n,) int8, total log-likelihood) of in-memory rows, a slab at a time."""
    labels = np.empty(X.shape[0], dtype=np.int8)
    total = 0.0
    for start in range(0, X.shape[0], rows):
        resp, log_norm = e_step(np.asarray(X[start:start + rows]), mixture)
        labels[start:start + rows] = np.argmax(resp, axis=1)
        total += float(log_norm.sum())
    return labels, total


def _assign(X, mixture, rows: int) -> tuple[np.ndarray, float]:
    """:func:`_assign_block` of in-memory rows; of a dask array's row blocks (chunked
    trajectories), the labels stay persisted where the blocks are (a dask array of the same row
    chunks) and only the log-likelihood comes back."""
    if not is_dask(X):
        return _assign_block(X, mixture, rows)
    return assign_blocks(X, mixture)


def label_with_model(model: StoredModel, X: np.ndarray, temperatures: np.ndarray, row_raw: np.ndarray,
                     traj, rows: int = 1 << 16) -> Labelling:
    """Label features with a stored mixture, a slab of rows at a time (only (rows, K) at once).

    X : (n_rows, T) float32 features (rescaled as the model's params say), numpy or dask (chunked
    trajectories, read block by block); row_raw : (n_rows, T) raw intensities of the same rows
    (for the class fits), numpy or dask with the same row chunks; traj : the
    :class:`~.trajectories.Trajectories` the rows come from (in mode "peaks" the rows are its
    peaks: their voxels and sizes).
    """
    k = model.mixture.weights.size
    row_labels, total = _assign(X, model.mixture, rows)
    sample_labels, counts = traj.voxel_labels(row_labels), traj.voxel_counts(row_labels, k)
    discovery = None
    if model.component_class is not None:
        moments = component_moments(row_raw, row_labels, k)
        groups = [curves.ComponentGroup(curves.ClassKind(kind), [int(c) for c in np.nonzero(model.component_class
                                                                                            == label)[0]], trend)
                  for label, (kind, trend) in enumerate(zip(model.class_kinds, model.class_trends))]
        factor = np.ones(temperatures.size)
        found = fit_classes(temperatures, moments, groups, model.mixture.means, factor)
        discovery = ClassDiscovery(found, component_class_of(groups, k), [], factor,
                                   stability={"runs": 0, "ari": [], "ari_mean": None, "sample": 0,
                                              "note": "labels from a stored model: no refits"})
        if traj.peak_sizes is not None:
            discovery.count_peak_voxels(row_labels, traj.peak_sizes)
    n = max(X.shape[0], 1)
    return Labelling(row_labels, sample_labels, counts, total, bic(total, n, k, X.shape[1]) if n > 1 else math.nan,
                     discovery)
