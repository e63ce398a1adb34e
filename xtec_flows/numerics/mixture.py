"""Diagonal-covariance Gaussian mixture fitted by EM, as a reduction of sufficient statistics.

The E-step of a block of trajectories yields responsibilities; the M-step needs
only their sums (``nk``), the responsibility-weighted sums of x and of x**2 and
the block's log-likelihood. Those add up over blocks, so the same code fits
trajectories held in one array, split over threads, or spread over a dask
cluster; responsibilities for the whole data set are never held at once
(except in smoothing mode, which needs them on the grid: n_samples x K).

Conventions follow scikit-learn: ``n_components``, ``reg_covar``, ``tol`` on the
change of the *mean* per-sample log-likelihood (so it does not depend on N),
``max_iter``, ``n_init``, ``random_state``. The log-likelihood is the true one:
the Gaussian normalising constant uses the data dimension T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from .subsample import hash_seed, is_dask, sample_rows

LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class MixtureParams:
    """Parameters of a diagonal Gaussian mixture.

    Attributes
    ----------
    weights : ndarray of shape (K,)
    means : ndarray of shape (K, T)
    variances : ndarray of shape (K, T)
    """

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    @property
    def n_components(self) -> int:
        return self.weights.size

    def permuted(self, order: np.ndarray) -> "MixtureParams":
        return MixtureParams(self.weights[order], self.means[order], self.variances[order])


@dataclass
class SufficientStats:
    """Per-block sums that an M-step needs; they add.

    nk : (K,)  sum of responsibilities
    sx : (K, T) sum of resp * x
    sxx : (K, T) sum of resp * x**2
    log_likelihood : float, sum over samples of log p(x)
    n : int, number of samples
    """

    nk: np.ndarray
    sx: np.ndarray
    sxx: np.ndarray
    log_likelihood: float
    n: int

    def __add__(self, other: "SufficientStats") -> "SufficientStats":
        return SufficientStats(
            self.nk + other.nk,
            self.sx + other.sx,
            self.sxx + other.sxx,
            self.log_likelihood + other.log_likelihood,
            self.n + other.n,
        )


def n_parameters(n_components: int, n_features: int) -> int:
    """Free parameters of a diagonal mixture: means, variances, K-1 weights."""
    return 2 * n_components * n_features + n_components - 1


def bic(log_likelihood_total: float, n_samples: int, n_components: int, n_features: int) -> float:
    """Bayesian information criterion, -2 log L + p log N (lower is better)."""
    return -2.0 * log_likelihood_total + n_parameters(n_components, n_features) * math.log(n_samples)


def augment(X: np.ndarray) -> np.ndarray:
    """[X, X**2] in float64, shape (n_samples, 2T).

    With it, the E-step is one matrix product and the M-step statistics are
    another: every EM pass reads a block once. Built per block (a few MB, so it
    stays in cache) from float32 trajectories; the float64 arithmetic keeps
    E[x^2] - E[x]^2 accurate.
    """
    n, t = X.shape
    XX = np.empty((n, 2 * t))
    XX[:, :t] = X
    np.multiply(XX[:, :t], XX[:, :t], out=XX[:, t:])
    return XX


def _weighted_log_prob_augmented(XX: np.ndarray, params: MixtureParams) -> np.ndarray:
    """log w_k + log N(x | k) from augmented data, *transposed*: shape (K, n_samples).

    Components-first layout: reductions over K become element-wise operations
    over K contiguous rows, far faster than numpy's reductions along a short
    last axis.
    """
    t = XX.shape[1] // 2
    precisions = 1.0 / params.variances
    # -0.5 |x - mu|^2_P = x.(mu P) - 0.5 x^2.P - 0.5 mu^2.P
    W = np.concatenate([params.means * precisions, -0.5 * precisions], axis=1)
    const = (
        -0.5 * (t * LOG_2PI + np.log(params.variances).sum(axis=1) + (params.means**2 * precisions).sum(axis=1))
        + np.log(params.weights)
    )
    out = W @ XX.T
    out += const[:, None]
    return out


def _e_step_augmented(XX: np.ndarray, params: MixtureParams) -> tuple[np.ndarray, np.ndarray]:
    """Responsibilities (K, n_samples) and log p(x) (n_samples,).

    Fused log-sum-exp: shift by the maximum over components, one exp, normalise.
    """
    wlp = _weighted_log_prob_augmented(XX, params)
    top = wlp[0].copy()
    for row in wlp[1:]:
        np.maximum(top, row, out=top)
    wlp -= top
    np.exp(wlp, out=wlp)
    total = wlp[0].copy()
    for row in wlp[1:]:
        total += row
    wlp /= total
    log_norm = np.log(total)
    log_norm += top
    return wlp, log_norm


def _stats_augmented(XX: np.ndarray, resp_t: np.ndarray, log_likelihood: float = 0.0) -> SufficientStats:
    """Statistics from augmented data and responsibilities shaped (K, n_samples)."""
    t = XX.shape[1] // 2
    moments = resp_t @ XX
    return SufficientStats(resp_t.sum(axis=1), moments[:, :t], moments[:, t:], float(log_likelihood), XX.shape[0])


def estimate_log_gaussian_prob(X: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """log N(x | mean_k, diag(var_k)) for every sample and component.

    Parameters
    ----------
    X : ndarray of shape (n_samples, T)
    means, variances : ndarray of shape (K, T)

    Returns
    -------
    log_prob : ndarray of shape (n_samples, K)
    """
    k = means.shape[0]
    return _weighted_log_prob_augmented(augment(X), MixtureParams(np.ones(k), means, variances)).T


def estimate_weighted_log_prob(X: np.ndarray, params: MixtureParams) -> np.ndarray:
    """log w_k + log N(x | k); shape (n_samples, K)."""
    return _weighted_log_prob_augmented(augment(X), params).T


def e_step(X: np.ndarray, params: MixtureParams) -> tuple[np.ndarray, np.ndarray]:
    """Responsibilities (n_samples, K) and per-sample log-likelihood (n_samples,)."""
    resp_t, log_norm = _e_step_augmented(augment(X), params)
    return resp_t.T, log_norm


def stats_from_responsibilities(X: np.ndarray, resp: np.ndarray, log_likelihood: float = 0.0) -> SufficientStats:
    """Sufficient statistics of one block given its responsibilities (n_samples, K)."""
    return _stats_augmented(augment(X), np.ascontiguousarray(resp.T), log_likelihood)


E_STEP_SLAB_ROWS = 16384
"""Rows per fused E-step: larger row blocks (a chunked store's spatial block can hold 10^5 rows)
are cut into slabs this size, whose float64 temporaries stay in cache (8k-16k rows is twice as
fast per row as 64k here)."""


def e_step_stats(X: np.ndarray, params: MixtureParams) -> SufficientStats:
    """Fused E-step and statistics of one block: responsibilities are dropped after use."""
    total = None
    for start in range(0, max(X.shape[0], 1), E_STEP_SLAB_ROWS):
        XX = augment(X[start : start + E_STEP_SLAB_ROWS])
        resp, log_norm = _e_step_augmented(XX, params)
        part = _stats_augmented(XX, resp, log_norm.sum())
        total = part if total is None else total + part
    return total


def m_step(stats: SufficientStats, reg_covar: float) -> MixtureParams:
    """Maximum-likelihood parameters from summed statistics.

    ``reg_covar`` is added to every variance so that a component collapsing on
    a few identical trajectories cannot reach zero variance.
    """
    # 10 eps keeps an empty component finite (its mean goes to 0, weight ~0),
    # as scikit-learn does, instead of a NaN that poisons the next E-step.
    nk = stats.nk + 10 * np.finfo(np.float64).eps
    means = stats.sx / nk[:, None]
    variances = stats.sxx / nk[:, None] - means * means
    np.maximum(variances, 0.0, out=variances)
    variances += reg_covar
    weights = nk / nk.sum()
    return MixtureParams(weights, means, variances)


def icl(bic_value: float, entropy: float) -> float:
    """Integrated completed likelihood in BIC form (Biernacki, Celeux & Govaert 2000): BIC + 2 * entropy.

    ``entropy`` = -sum_i sum_k r_ik log r_ik of the responsibilities. BIC keeps falling as
    components are added on millions of samples (any non-Gaussian class shape is better
    fitted by more components); the entropy term charges for components whose samples
    cannot be told apart, so ICL prefers well-separated clusterings (lower is better).
    """
    return float(bic_value + 2.0 * entropy)


def assignment_entropy(X: np.ndarray, params: MixtureParams, block_size: int = 8192) -> float:
    """-sum_i sum_k r_ik log r_ik over all samples, block by block; X of shape (n_samples, T),
    numpy, or dask (summed over its row blocks where they are)."""
    if hasattr(X, "dask") and hasattr(X, "to_delayed"):
        import dask

        parts = dask.compute(*[dask.delayed(assignment_entropy)(b, params, block_size)
                               for b in X.rechunk({1: -1}).to_delayed().ravel()])
        return float(sum(parts))
    total = 0.0
    for start in range(0, X.shape[0], block_size):
        resp_t, _ = _e_step_augmented(augment(np.asarray(X[start : start + block_size])), params)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = resp_t * np.log(resp_t)
        total -= float(np.nansum(terms))
    return total


def elbow(k_values, scores) -> int:
    """The K at the elbow of a decreasing criterion curve: farthest below the chord from first to last point.

    Both axes are scaled to [0, 1] first, so the rule does not depend on the units of the criterion.
    """
    k = np.asarray(k_values, dtype=float)
    y = np.asarray(scores, dtype=float)
    if k.size < 3:
        return int(k[int(np.argmin(y))])
    kn = (k - k[0]) / (k[-1] - k[0])
    span = y.max() - y.min()
    yn = (y - y.min()) / span if span > 0 else np.zeros_like(y)
    chord = yn[0] + (yn[-1] - yn[0]) * kn
    return int(k[int(np.argmax(chord - yn))])


def log_likelihood_per_sample(X: np.ndarray, params: MixtureParams) -> np.ndarray:
    """log p(x) of each sample under the mixture; shape (n_samples,)."""
    return logsumexp(estimate_weighted_log_prob(X, params), axis=1)


def kmeans_plusplus(X: np.ndarray, n_components: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (greedy, 2 + log K local trials as in scikit-learn).

    Parameters
    ----------
    X : ndarray of shape (n_samples, T)
    Returns
    -------
    centres : ndarray of shape (K, T)
    """
    n = X.shape[0]
    n_trials = 2 + int(math.log(n_components))
    centres = np.empty((n_components, X.shape[1]))
    x_sq = np.einsum("ij,ij->i", X, X)
    first = rng.integers(n)
    centres[0] = X[first]
    closest = np.maximum(x_sq - 2 * X @ X[first] + x_sq[first], 0.0)
    potential = closest.sum()
    for c in range(1, n_components):
        if potential <= 0:
            # All remaining points coincide with a centre: pick uniformly.
            candidates = rng.integers(n, size=n_trials)
        else:
            cum = np.cumsum(closest)
            candidates = np.searchsorted(cum, rng.random(n_trials) * cum[-1])
            np.clip(candidates, 0, n - 1, out=candidates)
        d = np.maximum(x_sq[None, :] - 2 * X[candidates] @ X.T + x_sq[candidates, None], 0.0)
        d = np.minimum(closest[None, :], d)
        best = int(np.argmin(d.sum(axis=1)))
        closest = d[best]
        potential = closest.sum()
        centres[c] = X[candidates[best]]
    return centres


def nearest_centre_stats(X: np.ndarray, centres: np.ndarray) -> SufficientStats:
    """Statistics of a hard assignment of each sample to its nearest centre (initial M-step)."""
    d = (X * X).sum(axis=1)[:, None] - 2 * X @ centres.T + (centres * centres).sum(axis=1)
    labels = np.argmin(d, axis=1)
    resp = np.zeros((X.shape[0], centres.shape[0]))
    resp[np.arange(X.shape[0]), labels] = 1.0
    return stats_from_responsibilities(X, resp)


def canonical_order(params: MixtureParams, counts: np.ndarray | None = None) -> np.ndarray:
    """Deterministic component order, so reprocessing a scan gives the same colours.

    Components are sorted by decreasing standard deviation over temperature of
    their mean trajectory: label 0 is the most temperature-dependent cluster
    (an order parameter or a critical halo), the last one the flattest
    (typically Bragg peaks or background after rescaling). Ties are broken by
    larger weight, then by the mean trajectory itself, lexicographically.

    Returns
    -------
    order : ndarray of shape (K,), a permutation; ``params.permuted(order)`` is canonical.
    """
    spread = params.means.std(axis=1)
    weight = params.weights if counts is None else np.asarray(counts, dtype=float)
    # Round so that bit-level noise between runs cannot flip the order.
    keys = [tuple(np.round(m, 10)) for m in params.means]
    idx = list(range(params.n_components))
    idx.sort(key=lambda k: (-round(float(spread[k]), 10), -float(weight[k]), keys[k]))
    return np.asarray(idx, dtype=np.intp)


# --------------------------------------------------------------------------------------
# The EM loop. Blocks of rows are mapped over a thread pool (numpy input; numpy
# releases the GIL in the matmuls and ufuncs) or over dask (dask input, which
# uses a distributed.Client when one is active). Either way a step is
# sum(per-block statistics).
# --------------------------------------------------------------------------------------


class _Blocks:
    """Row blocks of a trajectories array, numpy or dask, with a parallel map."""

    def __init__(self, X, block_size: int, n_threads: int | None, sample_keys=None):
        self.is_dask = is_dask(X)
        if self.is_dask:
            if len(X.chunks[1]) != 1:
                X = X.rechunk({1: -1})
            X = X.astype(np.float32)
            self.blocks = list(X.to_delayed().ravel())
            starts = np.cumsum((0,) + X.chunks[0])
        else:
            # float32 storage halves the memory traffic of every pass; each block
            # is widened to float64 inside the kernels (see augment).
            X = np.asarray(X, dtype=np.float32)
            starts = np.arange(0, X.shape[0], block_size).tolist() + [X.shape[0]]
            self.blocks = [X[a:b] for a, b in zip(starts[:-1], starts[1:])]
        self.slices = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
        if sample_keys is not None and tuple(np.shape(sample_keys)) != (int(starts[-1]),):
            raise ValueError(f"sample_keys must have one key per row, shape ({int(starts[-1])},); "
                             f"got {np.shape(sample_keys)}")
        self.sample_keys = sample_keys
        self.n_samples = int(starts[-1])
        self.n_features = int(X.shape[1])
        self.X = X
        self.n_threads = n_threads
        self._pool = None

    def map(self, func, *per_block_args):
        """[func(block_i, *args_i) for each block], computed in parallel."""
        if self.is_dask:
            import dask

            tasks = [
                dask.delayed(func)(b, *(a[i] for a in per_block_args)) for i, b in enumerate(self.blocks)
            ]
            return list(dask.compute(*tasks))
        if len(self.blocks) == 1 or self.n_threads == 1:
            return [func(b, *(a[i] for a in per_block_args)) for i, b in enumerate(self.blocks)]
        if self._pool is None:
            import os
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.n_threads or os.cpu_count() or 1)
        futures = [
            self._pool.submit(func, b, *(a[i] for a in per_block_args)) for i, b in enumerate(self.blocks)
        ]
        return [f.result() for f in futures]

    def reduce(self, func, *per_block_args) -> SufficientStats:
        parts = self.map(func, *per_block_args)
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total

    def sample(self, size: int, seed: int) -> np.ndarray:
        """A uniform random subset of at most ``size`` rows, (m, T) float64, for seeding: the
        rows of smallest rank by key, in key order (:func:`.subsample.sample_rows`), so a chunked
        trajectory store that holds the rows in block order seeds exactly as the in-memory path
        that holds them sorted by voxel."""
        return sample_rows([self.X], self.sample_keys, size, seed)[1][0].astype(np.float64)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _em_in_memory(X: np.ndarray, params: MixtureParams, reg_covar: float, tol: float, max_iter: int):
    """Plain EM on a small in-memory array; returns (params, mean log-likelihood)."""
    prev = -np.inf
    for _ in range(max_iter):
        stats = e_step_stats(X, params)
        ll = stats.log_likelihood / X.shape[0]
        params = m_step(stats, reg_covar)
        if abs(ll - prev) < tol:
            break
        prev = ll
    return params, ll


def most_likely_restart(fits: list) -> int:
    """Index of the fit of highest mean log-likelihood in [(MixtureParams, mean log L), ...] (the first of equals)."""
    return max(range(len(fits)), key=lambda i: fits[i][1])


def _initial_params(blocks, n_components, n_init, rng, reg_covar, tol, max_iter, sample_size, subsample_fits=None,
                    sample_seed: int = 0, choose_restart=None, chosen: dict | None = None):
    """Starting parameters for the full-data EM, one set per restart that is worth a full fit.

    Seeds come from k-means++ on a random subsample of at most ``sample_size``
    rows. When the data are larger than that, every restart is first run to
    convergence on the subsample, and only one goes on to the full data (the
    best by subsample log-likelihood, or the one ``choose_restart`` picks; its
    index is put in ``chosen["index"]``): n_init costs n_init small fits plus one
    big fit, and the big fit starts close to its optimum, so it needs few passes
    over the data. When the subsample is the whole data set, each restart is a
    full fit of its own.
    """
    sample = blocks.sample(sample_size, sample_seed)
    if sample.shape[0] >= blocks.n_samples:
        for _ in range(n_init):
            centres = kmeans_plusplus(sample, n_components, rng)
            yield m_step(blocks.reduce(nearest_centre_stats, [centres] * len(blocks.blocks)), reg_covar)
        return
    fits = []
    for _ in range(n_init):
        centres = kmeans_plusplus(sample, n_components, rng)
        start = m_step(nearest_centre_stats(sample, centres), reg_covar)
        fits.append(_em_in_memory(sample, start, reg_covar, tol, max_iter))
    if subsample_fits is not None:
        subsample_fits.extend(fits)
    index = (choose_restart or most_likely_restart)(fits)
    if chosen is not None:
        chosen["index"] = index
    yield fits[index][0]


@dataclass
class MixtureFit:
    """A fitted mixture and its diagnostics.

    params : canonical-order parameters (see :func:`canonical_order`)
    labels : ndarray of shape (n_samples,), int8 (component of highest responsibility); for dask
        input a dask array of the same row chunks, persisted where the blocks are (a distributed
        worker's memory), so the caller never holds one label per row
    counts : ndarray of shape (K,), samples per label
    log_likelihood : total log-likelihood of the data under ``params`` (unsmoothed)
    bic : Bayesian information criterion
    n_iter, converged : EM iterations of the best restart and whether |Δ mean log L| < tol
    history : mean log-likelihood after every E-step of the best restart
    n_init_best : index of the restart that won (into ``restarts`` when they are kept)
    """

    params: MixtureParams
    labels: np.ndarray
    counts: np.ndarray
    log_likelihood: float
    bic: float
    n_iter: int
    converged: bool
    history: list
    n_init_best: int
    restarts: list = None
    """With ``keep_restarts``: the converged parameters of every restart, (MixtureParams,
    mean log-likelihood), in the order they ran: fits on the seeding subsample when the
    data are larger than it, else full fits. Independent optima from other seeds, for
    stability checks at no extra cost."""


def _smoothed_blocks(blocks: "_Blocks", params: MixtureParams, smoother) -> tuple[list, list]:
    """Delayed smoothed responsibilities (n_i, K) and log-likelihood sums, per row block, of dask
    row blocks: the E-step and the smoothing (``smoother.smooth``, a :class:`.smoothing_blocks.BlockSmoother`)
    run where the blocks are; nothing is computed yet."""
    import dask

    if not hasattr(smoother, "smooth"):
        raise TypeError("row blocks (a dask array) are smoothed by a smoothing_blocks.BlockSmoother; "
                        f"got {type(smoother).__name__}")
    steps = [dask.delayed(e_step, nout=2)(b, params) for b in blocks.blocks]
    log_likelihoods = [dask.delayed(np.sum)(log_norm) for _, log_norm in steps]
    return smoother.smooth([resp for resp, _ in steps]), log_likelihoods


def _smoothed_step_blocks(blocks: "_Blocks", params: MixtureParams, smoother) -> tuple[SufficientStats, float]:
    """One XTEC-s step over dask row blocks: only the K x T statistics come back."""
    import dask

    smoothed, log_likelihoods = _smoothed_blocks(blocks, params, smoother)
    parts, lls = dask.compute([dask.delayed(stats_from_responsibilities)(b, r)
                               for b, r in zip(blocks.blocks, smoothed)], log_likelihoods)
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total, float(sum(lls))


def _smoothed_labels_blocks(blocks: "_Blocks", params: MixtureParams, smoother) -> tuple:
    """Labels (n,) int8 from the smoothed responsibilities of dask row blocks, persisted where the
    blocks are (see :func:`_persisted_assignment`), and the total log L."""
    import dask

    smoothed, log_likelihoods = _smoothed_blocks(blocks, params, smoother)
    labels, lls = dask.persist([dask.delayed(_argmax_int8)(r) for r in smoothed], log_likelihoods)
    return _persisted_labels(labels, [s.stop - s.start for s in blocks.slices]), float(sum(dask.compute(*lls)))


def _relabelled(labels: np.ndarray, relabel: np.ndarray) -> np.ndarray:
    return relabel[labels]


def label_counts(labels, n_components: int) -> np.ndarray:
    """(K,) int64 rows per label of (n,) labels, numpy or dask (summed over its blocks where they are)."""
    if not is_dask(labels):
        return np.bincount(labels, minlength=n_components)
    import dask

    parts = dask.compute(*[dask.delayed(np.bincount)(b, minlength=n_components)
                           for b in labels.to_delayed().ravel()])
    return np.sum(parts, axis=0).astype(np.int64) if parts else np.zeros(n_components, np.int64)


def _persisted_labels(parts: list, lengths: list):
    """One (n,) int8 dask array of per-block delayed labels (already persisted)."""
    import dask.array as da

    if not parts:
        return da.zeros((0,), dtype=np.int8)
    return da.concatenate([da.from_delayed(p, (int(n),), dtype=np.int8) for p, n in zip(parts, lengths)])


def _persisted_assignment(blocks: "_Blocks", params: MixtureParams):
    """Labels of dask row blocks, persisted where the blocks are (a distributed worker's memory;
    this process's under the threaded scheduler), and the total log L: only the log-likelihood
    comes back, so the labels of millions of voxels never pass through the caller."""
    import dask

    tasks = [dask.delayed(_final_assignment, nout=2)(b, params) for b in blocks.blocks]
    labels, lls = dask.persist([t[0] for t in tasks], [t[1] for t in tasks])
    total = float(sum(dask.compute(*lls)))
    return _persisted_labels(labels, [s.stop - s.start for s in blocks.slices]), total


def assign_blocks(X, params: MixtureParams):
    """Labels (n,) int8 of a dask array of rows (n, T) under ``params``, persisted where its row
    blocks are, as a dask array of the same row chunks, and the total log-likelihood: only the
    log-likelihood comes back (see :func:`_persisted_assignment`)."""
    blocks = _Blocks(X, 0, None)
    try:
        return _persisted_assignment(blocks, params)
    finally:
        blocks.close()


def _argmax_int8(resp: np.ndarray) -> np.ndarray:
    return np.argmax(resp, axis=1).astype(np.int8)


def _final_assignment(X, params: MixtureParams):
    resp_t, log_norm = _e_step_augmented(augment(X), params)
    return np.argmax(resp_t, axis=0).astype(np.int8), float(log_norm.sum())


def fit_mixture(
    X,
    n_components: int,
    *,
    reg_covar: float = 1e-6,
    tol: float = 1e-4,
    max_iter: int = 300,
    n_init: int = 1,
    random_state: int | None = 0,
    smoother=None,
    init_sample_size: int = 20_000,
    block_size: int = 8192,
    n_threads: int | None = None,
    keep_restarts: bool = False,
    sample_keys=None,
    init_params: MixtureParams | None = None,
    choose_restart=None,
) -> MixtureFit:
    """Fit a diagonal Gaussian mixture by EM.

    Parameters
    ----------
    X : ndarray or dask array of shape (n_samples, T)
        Rescaled trajectories.
    n_components : int
    smoother : callable or None
        ``smoother(resp) -> resp`` applied between E and M steps (XTEC-s label
        smoothing), with ``resp`` of shape (n_samples, K). Needs all
        responsibilities at once, so with a smoother the E-step keeps them.
        For dask ``X`` whose row blocks are spatial blocks, a
        :class:`.smoothing_blocks.BlockSmoother`: each block is smoothed from its
        neighbours' rows, and only K x T statistics come back.
    init_sample_size : int
        k-means++ seeds are drawn from at most this many random rows.
    sample_keys : None or (n_samples,) integer array (numpy or dask)
        What identifies each row, e.g. its voxel's flat index: the seeding subsample is the
        rows of smallest :func:`.subsample.subsample_rank` of their keys, so the fit does not depend on
        the order of the rows. Default: the row indices.
    init_params : None or MixtureParams with means and variances of shape (n_components, T)
        A warm start: EM begins from these parameters (e.g. the previous fit of a series
        that has grown by a temperature) instead of k-means++ seeds; ``n_init`` is then 1.
    choose_restart : None or callable
        ``choose_restart([(MixtureParams, mean log L), ...]) -> index``: which of the ``n_init``
        converged restarts wins (goes on to the full data when the restarts ran on the seeding
        subsample). Default: the highest log-likelihood.

    Returns
    -------
    MixtureFit
    """
    from threadpoolctl import threadpool_limits

    # Parallelism comes from the blocks. A multi-threaded BLAS on top of that
    # oversubscribes the cores, and OpenBLAS's threads are pathological for these
    # tall-skinny products (seen: 0.5 s instead of 0.2 ms for (4 x 17k) @ (17k x 24)).
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_mixture(
            X, n_components, reg_covar=reg_covar, tol=tol, max_iter=max_iter, n_init=n_init,
            random_state=random_state, smoother=smoother, init_sample_size=init_sample_size,
            block_size=block_size, n_threads=n_threads, keep_restarts=keep_restarts, sample_keys=sample_keys,
            init_params=init_params, choose_restart=choose_restart,
        )


def _check_init_params(init: MixtureParams, n_components: int, n_features: int) -> MixtureParams:
    means = np.asarray(init.means, dtype=np.float64)
    variances = np.asarray(init.variances, dtype=np.float64)
    weights = np.asarray(init.weights, dtype=np.float64)
    if means.shape != (n_components, n_features) or variances.shape != means.shape or weights.shape != (n_components,):
        raise ValueError(f"init_params must have means and variances of shape ({n_components}, {n_features}) and "
                         f"weights of shape ({n_components},); got {means.shape}, {variances.shape}, {weights.shape}")
    if not (np.isfinite(means).all() and (variances > 0).all() and (weights > 0).all()):
        raise ValueError("init_params must have finite means and positive variances and weights")
    return MixtureParams(weights / weights.sum(), means, variances)


def _fit_mixture(X, n_components, *, reg_covar, tol, max_iter, n_init, random_state, smoother,
                 init_sample_size, block_size, n_threads, keep_restarts=False, sample_keys=None,
                 init_params=None, choose_restart=None) -> MixtureFit:
    rng = np.random.default_rng(random_state)
    # The subsample's hash seed comes from random_state apart from ``rng``, so choosing the
    # subsample consumes nothing of the stream k-means++ draws from.
    sample_seed = hash_seed(random_state)
    blocks = _Blocks(X, block_size, n_threads, sample_keys)
    n, n_features = blocks.n_samples, blocks.n_features
    if init_params is not None:
        init_params = _check_init_params(init_params, n_components, n_features)
    try:
        subsample_fits = [] if keep_restarts else None
        chosen = {}  # the subsample restart that went on to the full data, when they ran on one
        summaries = []  # every full fit's (params, mean log L)
        best, candidates = None, []  # candidates: every full fit, kept only for choose_restart
        starts = [init_params] if init_params is not None else _initial_params(
            blocks, n_components, n_init, rng, reg_covar, tol, max_iter, init_sample_size, subsample_fits, sample_seed,
            choose_restart, chosen)
        for restart, params in enumerate(starts):
            history: list[float] = []
            converged = False
            n_iter = 0
            resp_blocks = None
            for n_iter in range(1, max_iter + 1):
                args = [params] * len(blocks.blocks)
                if smoother is None:
                    stats = blocks.reduce(e_step_stats, args)
                    ll = stats.log_likelihood
                elif blocks.is_dask:
                    stats, ll = _smoothed_step_blocks(blocks, params, smoother)
                else:
                    parts = blocks.map(e_step, args)
                    resp = smoother(np.concatenate([p[0] for p in parts]))
                    ll = float(sum(p[1].sum() for p in parts))
                    resp_blocks = [resp[s] for s in blocks.slices]
                    stats = blocks.reduce(stats_from_responsibilities, resp_blocks)
                history.append(ll / n)
                params = m_step(stats, reg_covar)
                if len(history) > 1 and abs(history[-1] - history[-2]) < tol:
                    converged = True
                    break
            if smoother is None and blocks.is_dask:
                labels, total_ll = _persisted_assignment(blocks, params)
            elif smoother is None:
                parts = blocks.map(_final_assignment, [params] * len(blocks.blocks))
                labels = np.concatenate([p[0] for p in parts])
                total_ll = float(sum(p[1] for p in parts))
            elif blocks.is_dask:
                labels, total_ll = _smoothed_labels_blocks(blocks, params, smoother)
            else:
                # XTEC-s labels come from the smoothed responsibilities.
                parts = blocks.map(e_step, [params] * len(blocks.blocks))
                resp = smoother(np.concatenate([p[0] for p in parts]))
                labels = np.argmax(resp, axis=1).astype(np.int8)
                total_ll = float(sum(p[1].sum() for p in parts))
            fit = (params, labels, history, total_ll, n_iter, converged, restart)
            summaries.append((params, total_ll / n))
            if choose_restart is not None:
                candidates.append(fit)
            elif best is None or total_ll > best[3]:
                best = fit
    finally:
        blocks.close()
    if choose_restart is not None:
        best = candidates[choose_restart(summaries) if len(candidates) > 1 else 0]
    params, labels, history, total_ll, n_iter, converged, restart = best
    restart = chosen.get("index", restart)
    counts = label_counts(labels, n_components)
    order = canonical_order(params, counts)
    relabel = np.empty(n_components, dtype=np.int8)
    relabel[order] = np.arange(n_components, dtype=np.int8)
    return MixtureFit(
        params=params.permuted(order),
        labels=labels.map_blocks(_relabelled, relabel, dtype=np.int8) if is_dask(labels) else relabel[labels],
        counts=counts[order],
        log_likelihood=total_ll,
        bic=bic(total_ll, n, n_components, n_features),
        n_iter=n_iter,
        converged=converged,
        history=history,
        n_init_best=restart,
        restarts=(subsample_fits if subsample_fits else summaries) if keep_restarts else None,
    )
