"""Fit: the features the mixture sees, and the mixture fit itself (XTEC-d, -s, peaks)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..numerics.mixture import MixtureFit, MixtureParams, fit_mixture
from ..numerics.rescale import rescale
from ..numerics.smoothing import LabelSmoother
from ..numerics.smoothing_blocks import BlockSmoother
from .params import ClusterParams
from .trajectories import Trajectories


@dataclass
class FitOutput:
    """The mixture fit and its labels per thresholded voxel.

    mixture : MixtureFit over the rows of the features (voxels, or peaks in mode "peaks")
    sample_labels : (n_samples,) int8, the label of every thresholded voxel (mode "peaks" with
        chunked rows: a dask array, one chunk per block, computed where the rows are)
    counts : (K,) voxels per label
    """

    mixture: MixtureFit
    sample_labels: np.ndarray
    counts: np.ndarray

    @property
    def params(self) -> MixtureParams:
        return self.mixture.params

    @property
    def row_labels(self) -> np.ndarray:
        """(n_rows,) int8, per row of the features (peaks: per peak)."""
        return self.mixture.labels

    @property
    def restarts(self) -> list | None:
        """Every restart's (MixtureParams, mean log L), with keep_restarts."""
        return self.mixture.restarts

    @property
    def log_likelihood(self) -> float:
        return self.mixture.log_likelihood

    @property
    def bic(self) -> float:
        return self.mixture.bic

    @property
    def n_iter(self) -> int:
        return self.mixture.n_iter

    @property
    def converged(self) -> bool:
        return self.mixture.converged


def _rescale_float32(raw: np.ndarray, method: str, rows: int = 1 << 18) -> np.ndarray:
    """Rescale (n, T) trajectories into float32, a slab of rows at a time, so the
    float64 temporaries stay small however many voxels passed the threshold."""
    out = np.empty(raw.shape, dtype=np.float32)
    for start in range(0, raw.shape[0], rows):
        out[start : start + rows] = rescale(raw[start : start + rows], method)
    return out


def features(traj: Trajectories, params: ClusterParams):
    """What the mixture sees: rescaled trajectories (n_samples, T), or rescaled
    peak averages (n_peaks, T) in mode "peaks"; float32. A dask array, read block by block
    from the scratch, when the trajectories are chunked (rows in block order); the peak
    averages are always in memory (there are far fewer peaks than voxels)."""
    if params.mode == "peaks":
        return rescale(traj.peak_raw, params.rescale).astype(np.float32)
    if traj.chunked is not None:
        return traj.chunked.features(params.rescale)
    return _rescale_float32(traj.raw, params.rescale)


def fit_trajectories(
    traj: Trajectories, params: ClusterParams, n_components: int | None = None, X: np.ndarray | None = None,
    warn_empty: bool = True, n_init: int | None = None, keep_restarts: bool = False, init_params=None,
    init_sample_size: int | None = None, choose_restart=None,
) -> FitOutput:
    """Cluster gathered trajectories (features computed unless given); labels per thresholded voxel.

    ``init_params``: a warm start for the mixture (:func:`~xtec_flows.numerics.mixture.fit_mixture`);
    ``init_sample_size``: rows of the subsample the restarts run on (default: the parameters');
    ``choose_restart``: which restart wins (default: the highest log-likelihood; see ``fit_mixture``)."""
    k = params.n_components if n_components is None else n_components
    if X is None:
        X = features(traj, params)
    unit = "peaks" if params.mode == "peaks" else "thresholded voxels"
    if k > X.shape[0]:
        raise ValueError(
            f"n_components={k} is larger than the number of {unit} ({X.shape[0]}); "
            "lower n_components or the threshold"
        )
    smoother = None
    if params.mode == "s" and traj.chunked is not None:
        # Row blocks are spatial blocks: each is smoothed from its neighbours' rows, where they are.
        smoother = BlockSmoother(traj.row_keys, traj.spatial_shape, traj.spatial_chunks, traj.chunked.blocks,
                                 params.smoothing)
    elif params.mode == "s":
        smoother = LabelSmoother(traj.coords, traj.spatial_shape, params.smoothing)
    fit = fit_mixture(
        X,
        k,
        reg_covar=params.reg_covar,
        tol=params.tol,
        max_iter=params.max_iter,
        n_init=params.n_init if n_init is None else n_init,
        random_state=params.random_state,
        smoother=smoother,
        init_sample_size=params.init_sample_size if init_sample_size is None else init_sample_size,
        keep_restarts=keep_restarts,
        # Voxels are rows by their flat index, so the seeding subsample is the same voxels
        # however the rows are ordered (peaks: by peak number, already chunk-independent).
        sample_keys=None if params.mode == "peaks" else traj.row_keys,
        init_params=init_params,
        choose_restart=choose_restart,
    )
    labels = traj.voxel_labels(fit.labels)
    counts = fit.counts if params.mode != "peaks" else traj.voxel_counts(fit.labels, k)
    empty = [int(i) for i in np.nonzero(counts == 0)[0]]
    if empty and warn_empty:
        warnings.warn(
            f"{len(empty)} of {k} clusters received no voxels (labels {empty})"
            + (" after label smoothing" if params.mode == "s" else "")
            + f"; the data support fewer clusters: try n_components={k - len(empty)}",
            RuntimeWarning,
            stacklevel=3,
        )
    return FitOutput(fit, labels, counts)
