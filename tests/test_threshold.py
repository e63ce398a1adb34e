"""Background threshold: the KL search against the xtec reference, and the chunked histogram."""

import math

import numpy as np
import pytest
from xtec.Preprocessing import Mask_Zeros, Threshold_Background

from conftest import lognormal_volume
from xtec_flows.numerics import threshold as th
from xtec_flows.engine import ClusterParams, gather_trajectories


@pytest.mark.parametrize("seed", range(4))
def test_kl_cutoff_matches_reference_within_one_bin(seed, quiet):
    vol = lognormal_volume(seed)
    with quiet():
        ref = Threshold_Background(Mask_Zeros(vol), None, "KL")
    temps = np.arange(vol.shape[0]) + 10.0
    ours = gather_trajectories(vol, temps, ClusterParams(), chunks=(7, 11, 30))
    assert abs(ours.cutoff.log_cutoff - ref.LogI_cutoff) <= ours.histogram.bin_size
    assert ours.histogram.bin_size == pytest.approx(ref.bin_size, rel=1e-5)
    # Same cut, same voxels kept.
    assert abs(ours.n_samples - ref.data_thresholded.shape[1]) <= 0.01 * ours.n_samples


def test_chunked_histogram_equals_in_memory():
    vol = lognormal_volume(5)
    temps = np.arange(vol.shape[0]) + 10.0
    log_mean = np.log(vol.mean(axis=0, dtype=np.float64).astype(np.float32)[vol.mean(axis=0) > 0].astype(np.float64))
    mem = th.histogram_of(log_mean)
    for chunks in [(30, 30, 30), (4, 30, 9), (13, 7, 5)]:
        ch = gather_trajectories(vol, temps, ClusterParams(), chunks=chunks).histogram
        np.testing.assert_array_equal(ch.counts, mem.counts)
        np.testing.assert_allclose(ch.edges, mem.edges)
        np.testing.assert_allclose(ch.sums, mem.sums, rtol=1e-9)
        assert ch.bin_size == pytest.approx(mem.bin_size)


def test_histogram_bins_like_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=10_000)
    h = th.histogram_of(x)
    counts, edges = np.histogram(x, h.counts.size)
    np.testing.assert_array_equal(h.counts, counts)
    np.testing.assert_allclose(h.edges, edges)
    # Per-bin moments are exact.
    idx = th.bin_index(x, h.edges)
    np.testing.assert_allclose(h.sums, np.bincount(idx, weights=x, minlength=h.counts.size))


def test_simple_and_explicit_and_none():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 0.5, 5000)
    h = th.histogram_of(x)
    assert th.find_cutoff(h, "simple").log_cutoff == pytest.approx(x.mean() + 2 * x.std())
    assert th.find_cutoff(h, 20.0).log_cutoff == pytest.approx(math.log(20.0))
    assert th.find_cutoff(h, "none").log_cutoff == -math.inf
    with pytest.raises(ValueError, match="threshold must be one of"):
        th.find_cutoff(h, "otsu")
    with pytest.raises(ValueError, match="mean intensity > 0"):
        th.find_cutoff(h, -1.0)


def test_kl_cut_lies_above_background_peak():
    vol = lognormal_volume(2)
    log_mean = np.log(vol.mean(axis=0)[vol.mean(axis=0) > 0])
    cut = th.kl_cutoff(th.histogram_of(log_mean))
    assert cut.success
    assert np.median(log_mean) < cut.log_cutoff < log_mean.max()
