"""What an XTEC run produced (:class:`ClusterResult`), and its JSON summary."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import zarr

from .._version import __version__
from .class_discovery import ClassDiscovery
from .params import ClusterParams


@dataclass
class ClusterResult:
    """Everything an XTEC run produced.

    labels : zarr.Array of shape spatial, int8; -1 = not clustered, else 0..K-1
        in canonical order (see ``numerics.mixture.canonical_order``)
    means, variances : (K, T) per-cluster trajectories in rescaled units
    weights : (K,) mixing weights; counts : (K,) voxels per label
    """

    labels: zarr.Array
    temperatures: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    weights: np.ndarray
    counts: np.ndarray
    log_likelihood: float
    bic: float
    n_iter: int
    converged: bool
    log_cutoff: float
    threshold_success: bool
    histogram_edges: np.ndarray
    histogram_counts: np.ndarray
    n_valid: int
    n_thresholded: int
    n_samples: int
    n_peaks: int
    params: ClusterParams
    timings: dict
    n_reads: int = 1
    version: str = __version__
    components: zarr.Array | None = None
    discovery: ClassDiscovery | None = None
    #: provenance of the stored model that labelled this scan (:func:`xtec_flows.engine.apply`), else None
    model: dict | None = None

    @property
    def classes(self) -> list | None:
        """Class summaries (dicts, see ``PhysicalClass.to_dict``) with classes='auto', else None."""
        return None if self.discovery is None else [c.to_dict() for c in self.discovery.classes]

    @property
    def stability(self) -> dict | None:
        return None if self.discovery is None else self.discovery.stability

    @property
    def intensity_cutoff(self) -> float:
        return math.exp(self.log_cutoff) if math.isfinite(self.log_cutoff) else 0.0

    def to_dict(self) -> dict:
        """JSON-ready summary (everything but the label volume)."""
        return {
            "xtec_flows": self.version,
            "params": self.params.to_dict(),
            "shape": list(self.labels.shape),
            "temperatures": self.temperatures.tolist(),
            "n_components": int(self.means.shape[0]),
            "means": self.means.tolist(),
            "variances": self.variances.tolist(),
            "weights": self.weights.tolist(),
            "counts": [int(c) for c in self.counts],
            "log_likelihood": self.log_likelihood,
            "bic": self.bic,
            "n_iter": self.n_iter,
            "converged": self.converged,
            "threshold": {
                "method": self.params.threshold,
                "log_cutoff": self.log_cutoff if math.isfinite(self.log_cutoff) else None,
                "intensity_cutoff": self.intensity_cutoff,
                "success": self.threshold_success,
                "histogram_edges": self.histogram_edges.tolist(),
                "histogram_counts": [int(c) for c in self.histogram_counts],
            },
            "n_valid": self.n_valid,
            "n_thresholded": self.n_thresholded,
            "n_samples": self.n_samples,
            "n_peaks": self.n_peaks,
            "input_reads": self.n_reads,
            "timings": self.timings,
            **({} if self.model is None else {"model": self.model}),
            **({} if self.discovery is None else {
                "n_classes": len(self.discovery.classes),
                **self.discovery.to_dict(),
            }),
        }
