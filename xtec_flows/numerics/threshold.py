"""Background threshold on log(<I>_T), from histogram sufficient statistics.

XTEC drops background voxels before clustering. The cut is made on
x = log(mean_T I) of every valid voxel. The paper's "KL" method models the
low-intensity side of the histogram of x as a Gaussian truncated at a cut x_c and
moves x_c to minimise the Kullback-Leibler divergence between the truncated
histogram and that Gaussian; voxels with x > x_c are kept.

Everything here works on a :class:`LogMeanHistogram`: per-bin counts, sums and
sums of squares of x. Those add up across chunks, so a chunked pass over a
terabyte volume and an in-memory call on a small array give the same cutoff.
Because the cut always falls on a bin edge, the mean and variance of "all values
below the cut" are exact cumulative sums, not approximations.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.special import xlogy

THRESHOLD_METHODS = ("kl", "simple", "none")


@dataclass(frozen=True)
class LogMeanHistogram:
    """Histogram of x = log(mean_T I) with per-bin moments.

    Attributes
    ----------
    edges : ndarray of shape (n_bins + 1,)
    counts : ndarray of shape (n_bins,), int64
    sums, sums_sq : ndarray of shape (n_bins,), float64
        Sum of x and of x**2 over the values in each bin.
    bin_size : float
        Nominal bin width (half the Freedman-Diaconis width). The actual width
        ``edges[1] - edges[0]`` is slightly smaller because the bins span
        [min, max] exactly, as numpy.histogram does.
    """

    edges: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    sums_sq: np.ndarray
    bin_size: float

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def mean(self) -> float:
        return float(self.sums.sum() / self.n)

    @property
    def std(self) -> float:
        m = self.mean
        return float(math.sqrt(max(self.sums_sq.sum() / self.n - m * m, 0.0)))

    @property
    def density(self) -> np.ndarray:
        """Probability density per bin, normalised with the nominal bin size (n_bins,)."""
        return self.counts / (self.n * self.bin_size)


def half_freedman_diaconis_width(q25: float, q75: float, n: int) -> float:
    """Half the Freedman-Diaconis bin width, 0.5 * 2 IQR / n^(1/3).

    The half width resolves the background peak of log(<I>_T) finely enough for
    the KL search while keeping bins populated.
    """
    return float((q75 - q25) / n ** (1.0 / 3.0))


def quartile_ranks(n: int) -> tuple[int, int]:
    """Ranks (0-based, into the sorted values) used for the quartiles."""
    return min(int(round(0.25 * n)), n - 1), min(int(round(0.75 * n)), n - 1)


def n_bins_for(lo: float, hi: float, bin_size: float) -> int:
    return max(int(math.ceil((hi - lo) / bin_size)), 1)


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value for bins [e_i, e_{i+1}), last bin closed, as numpy.histogram."""
    n_bins = edges.size - 1
    lo, hi = edges[0], edges[-1]
    scale = n_bins / (hi - lo) if hi > lo else 0.0
    idx = ((values - lo) * scale).astype(np.int64)
    np.clip(idx, 0, n_bins - 1, out=idx)
    # Floating-point rounding can put a value one bin off: correct against the edges.
    idx -= values < edges[idx]
    idx += (values >= edges[np.minimum(idx + 1, n_bins)]) & (idx < n_bins - 1)
    # Values outside [edges[0], edges[-1]] land in the end bins.
    np.clip(idx, 0, n_bins - 1, out=idx)
    return idx


def partial_histogram(values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts, sums and sums of squares per bin of one chunk of values (n_bins,) each."""
    values = np.asarray(values, dtype=np.float64).ravel()
    n_bins = edges.size - 1
    idx = bin_index(values, edges)
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    sums = np.bincount(idx, weights=values, minlength=n_bins)
    sums_sq = np.bincount(idx, weights=values * values, minlength=n_bins)
    return counts, sums, sums_sq


def histogram_of(values: np.ndarray, bin_size: float | None = None) -> LogMeanHistogram:
    """In-memory histogram of a 1-D array of log-mean values (the oracle path)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2:
        raise ValueError(f"need at least 2 values to build a histogram; got {values.size}")
    lo, hi = float(values.min()), float(values.max())
    if bin_size is None:
        r25, r75 = quartile_ranks(values.size)
        # Two order statistics need a selection, not a sort: O(n).
        q = np.partition(values, (r25, r75))
        edges, bin_size = histogram_edges(lo, hi, q[r25], q[r75], values.size)
    else:
        edges = np.linspace(lo, hi, n_bins_for(lo, hi, bin_size) + 1)
    counts, sums, sums_sq = partial_histogram(values, edges)
    return LogMeanHistogram(edges, counts, sums, sums_sq, float(bin_size))


def histogram_edges(lo: float, hi: float, q25: float, q75: float, n: int) -> tuple[np.ndarray, float]:
    """Bin edges over [lo, hi] at half the Freedman-Diaconis width, and that width.

    Shared by the in-memory and the chunked histogram so both bin identically.
    A degenerate IQR (e.g. a constant background) falls back to sqrt(n) bins;
    an empty range to one unit-wide bin.
    """
    if not hi > lo:
        return np.array([lo, lo + 1.0]), 1.0
    bin_size = half_freedman_diaconis_width(q25, q75, n)
    if not bin_size > 0:
        bin_size = (hi - lo) / max(int(math.sqrt(n)), 1)
    return np.linspace(lo, hi, n_bins_for(lo, hi, bin_size) + 1), float(bin_size)


def _gaussian(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return np.exp(-((x - mean) ** 2) / (2.0 * std * std)) / math.sqrt(2.0 * math.pi * std * std)


class _TruncatedKL:
    """KL divergence between the histogram truncated at bin i and a Gaussian
    with the mean and std of the values below the cut."""

    def __init__(self, hist: LogMeanHistogram):
        self.x = hist.edges[:-1]
        self.y = hist.density
        self.width = hist.edges[1] - hist.edges[0]
        self.cum_n = np.concatenate([[0], np.cumsum(hist.counts)])
        self.cum_s = np.concatenate([[0.0], np.cumsum(hist.sums)])
        self.cum_ss = np.concatenate([[0.0], np.cumsum(hist.sums_sq)])

    def __call__(self, i: int) -> float:
        n_below = self.cum_n[i]
        if i < 2 or n_below < 2:
            return math.nan
        mean = self.cum_s[i] / n_below
        var = max(self.cum_ss[i] / n_below - mean * mean, 0.0)
        if var == 0.0:
            return math.nan
        # 1e-12 keeps log q finite where the Gaussian underflows.
        q = _gaussian(self.x[:i], mean, math.sqrt(var)) + 1e-12
        norm = self.y[:i].sum() * self.width
        if norm <= 0:
            return math.nan
        p = self.y[:i] / norm
        return float(np.sum(xlogy(p, p) - xlogy(p, q)))


@dataclass(frozen=True)
class Cutoff:
    """Result of a threshold search.

    ``log_cutoff`` is on x = log(mean_T I); voxels with x > log_cutoff are kept.
    ``success`` is False when the KL search did not converge or its cut fell
    outside [mean - std, mean + 2 std] of x (the paper's sanity window).
    """

    method: str
    log_cutoff: float
    bin_index: int | None
    success: bool
    iterations: int = 0


def kl_cutoff(hist: LogMeanHistogram, max_iter: int = 100) -> Cutoff:
    """The paper's truncated-Gaussian KL search for the background cut.

    A Newton-like walk on log KL: from a start between the histogram's mode and
    mean + std, step the cut by -bin_size * d(log KL)/dx until the step is
    smaller than one bin or ``max_iter`` steps were taken.
    """
    kl = _TruncatedKL(hist)
    n_bins = hist.counts.size
    if n_bins < 5:
        return Cutoff("kl", float(hist.edges[0]), 0, False, 0)
    mode = int(np.argmax(hist.counts))
    start = int(np.searchsorted(kl.x, hist.mean + hist.std))
    i = int(0.5 * mode + 0.5 * start)
    if i >= n_bins:
        i = mode - 2
    i = int(np.clip(i, 2, n_bins - 2))
    step = math.inf
    it = 0
    ok = True
    while step > hist.bin_size and it < max_iter:
        k0, k1 = kl(i), kl(i + 1)
        if not (k0 > 0 and k1 > 0):
            ok = False
            break
        slope = (math.log(k1) - math.log(k0)) / hist.bin_size
        step = abs(hist.bin_size * slope)
        i = int(np.searchsorted(kl.x, kl.x[i] - hist.bin_size * slope))
        i = int(np.clip(i, 2, n_bins - 2))
        it += 1
    cut = float(kl.x[i])
    converged = ok and step <= hist.bin_size
    in_window = hist.mean - hist.std <= cut <= hist.mean + 2 * hist.std
    return Cutoff("kl", cut, i, bool(converged and in_window), it)


def simple_cutoff(hist: LogMeanHistogram) -> Cutoff:
    """mean + 2 std of x: a quick cut for strongly peaked data."""
    return Cutoff("simple", hist.mean + 2.0 * hist.std, None, True, 0)


def find_cutoff(hist: LogMeanHistogram, method: str | float, max_iter: int = 100) -> Cutoff:
    """Dispatch on the threshold method.

    Parameters
    ----------
    method : {"kl", "simple", "none"} or float
        A float is an explicit cutoff on the mean intensity <I>_T (not its log).
    """
    if isinstance(method, (int, float)) and not isinstance(method, bool):
        if not method > 0:
            raise ValueError(f"an explicit threshold must be a mean intensity > 0; got {method!r}")
        return Cutoff("explicit", math.log(method), None, True, 0)
    if method == "kl":
        cut = kl_cutoff(hist, max_iter=max_iter)
        if not cut.success:
            warnings.warn(
                f"the KL background search did not settle inside [mean - std, mean + 2 std] of "
                f"log(<I>_T) (cut {cut.log_cutoff:.4g}); the cut is kept, but check the threshold "
                "histogram or pass threshold='simple' or an explicit intensity",
                RuntimeWarning,
                stacklevel=2,
            )
        return cut
    if method == "simple":
        return simple_cutoff(hist)
    if method == "none":
        return Cutoff("none", -math.inf, None, True, 0)
    raise ValueError(
        f"threshold must be one of {THRESHOLD_METHODS} or a positive number; got {method!r}"
    )
