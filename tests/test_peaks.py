"""Peak averaging: chunked connected components equal scipy's, averages equal the reference's."""

import numpy as np
import pytest
from scipy import ndimage
from xtec.Preprocessing import Mask_Zeros, Peak_averaging, Threshold_Background

from conftest import lognormal_volume
from xtec_flows.numerics import peaks
from xtec_flows.engine import ClusterParams, gather_trajectories


def blob_volume(seed=0, shape=(24, 26, 22), T=5):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), 1.2)
    bright = field > np.quantile(field, 0.85)
    base = np.where(bright, 200.0, 5.0) * rng.uniform(0.8, 1.2, shape)
    vol = rng.poisson(np.broadcast_to(base, (T,) + shape)).astype(np.float32) + 1
    return vol, bright


@pytest.mark.parametrize("shape,chunks", [
    ((24, 26, 22), (24, 26, 22)),
    ((24, 26, 22), (8, 9, 7)),
    ((24, 26, 22), (5, 26, 3)),
    # Every voxel on a block boundary; a smaller volume, since each of its blocks is a task.
    ((12, 14, 10), (2, 2, 2)),
])
def test_chunked_components_equal_scipy_label(shape, chunks):
    vol, _ = blob_volume(shape=shape)
    temps = np.arange(vol.shape[0]) + 1.0
    traj = gather_trajectories(vol, temps, ClusterParams(mode="peaks", n_components=2, threshold=50.0), chunks=chunks)
    mask = vol.mean(axis=0) > 50.0
    ref, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    assert traj.n_peaks == n
    np.testing.assert_array_equal(traj.peak_ids, ref[tuple(traj.coords.T)])


def test_diagonal_contact_across_a_corner_joins():
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = mask[2, 2] = True  # touch only at a corner, which is also a chunk corner
    vol = np.stack([np.where(mask, 100.0, 1.0)] * 3).astype(np.float32)
    traj = gather_trajectories(vol, [1.0, 2.0, 3.0], ClusterParams(mode="peaks", n_components=1, threshold=10.0), chunks=(2, 2))
    assert traj.n_peaks == 1


def test_slab_edges_and_resolution():
    slab = np.array([[[1, 0, 2], [0, 0, 0]], [[0, 3, 0], [0, 0, 4]]])  # (2, 2, 3)
    edges = peaks.slab_edges(slab)
    # Full connectivity: (0, 2) before touches (1, 2) after diagonally.
    assert {tuple(int(v) for v in e) for e in edges} == {(1, 3), (2, 3), (2, 4)}
    mapping, n = peaks.resolve_labels(4, edges[:2], np.array([0, 5, 9, 20, 1]))
    assert n == 2
    assert mapping[1] == mapping[2] == mapping[3] == 2
    assert mapping[4] == 1  # its first voxel (flat 1) comes first


def test_peak_means_equal_reference(quiet):
    vol = lognormal_volume(3, shape=(20, 20, 20))
    with quiet():
        th = Threshold_Background(Mask_Zeros(vol), None, "KL")
        ref = Peak_averaging(vol, th)
    traj = gather_trajectories(vol, np.arange(vol.shape[0]) + 1.0, ClusterParams(mode="peaks"), chunks=(7, 20, 6))
    means, sizes = peaks.peak_means(traj.raw, traj.peak_ids, traj.n_peaks)
    assert traj.n_peaks == ref.peak_avg_data.shape[1]
    np.testing.assert_allclose(means, ref.peak_avg_data.T, rtol=1e-5)
    assert sizes.tolist() == [len(i) for i in ref.peak_avg_ind_list]
