"""Label smoothing: equal to the reference Markov operator and to a dense masked convolution."""

import math

import numpy as np
import pytest
from scipy import ndimage
from xtec.GMM import GMM_kernels

from xtec_flows.numerics.smoothing import LabelSmoother, SmoothingKernel

CASES = [
    ("local", 1.0, "uniform", (), (20, 24, 16)),
    ("local", 1.7, "gaussian", (), (20, 24, 16)),
    ("local", 2.0, "uniform", (), (40, 37)),
    ("periodic", 0.3, "uniform", (8, 8, 8), (20, 24, 16)),
    ("periodic", 0.25, "gaussian", (10, 12, 8), (20, 24, 16)),
    ("periodic", 0.2, "uniform", (9, 10), (40, 37)),
]


def random_problem(shape, seed=0, fraction=0.15, K=3):
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < fraction
    coords = np.argwhere(mask)
    resp = rng.random((coords.shape[0], K))
    resp /= resp.sum(axis=1, keepdims=True)
    return mask, coords, resp


@pytest.mark.parametrize("kind,L,weights,cell,shape", CASES)
def test_equals_reference_markov_product(kind, L, weights, cell, shape, quiet):
    _, coords, resp = random_problem(shape)
    with quiet():
        markov = GMM_kernels.Build_Markov_Matrix(
            coords, L, kind, np.array(cell) if cell else None, weights == "uniform", 1e-2
        )
    ours = LabelSmoother(coords, shape, SmoothingKernel(kind, L, 1e-2, weights, cell))(resp)
    np.testing.assert_allclose(ours, markov @ resp, atol=1e-6, rtol=0)


@pytest.mark.parametrize("L,weights", [(1.0, "uniform"), (1.5, "gaussian")])
def test_local_equals_dense_masked_convolution(L, weights):
    shape = (18, 15, 12)
    mask, coords, resp = random_problem(shape, seed=1)
    kernel = SmoothingKernel("local", L, 1e-2, weights)
    offsets, w = kernel.local_offsets(3)
    r = int(np.abs(offsets).max())
    dense_kernel = np.zeros((2 * r + 1,) * 3)
    dense_kernel[tuple((offsets + r).T)] = w
    den = ndimage.correlate(mask.astype(float), dense_kernel, mode="constant")
    expected = np.empty_like(resp)
    for k in range(resp.shape[1]):
        grid = np.zeros(shape)
        grid[tuple(coords.T)] = resp[:, k]
        num = ndimage.correlate(grid, dense_kernel, mode="constant")
        expected[:, k] = num[tuple(coords.T)] / den[tuple(coords.T)]
    ours = LabelSmoother(coords, shape, kernel)(resp)
    np.testing.assert_allclose(ours, expected, atol=1e-12)


def test_rows_stay_probabilities_and_iterations_compose():
    shape = (16, 16, 16)
    _, coords, resp = random_problem(shape, seed=2)
    once = LabelSmoother(coords, shape, SmoothingKernel("local", 1.2))
    twice = LabelSmoother(coords, shape, SmoothingKernel("local", 1.2, iterations=2))
    np.testing.assert_allclose(once(resp).sum(axis=1), 1.0)
    np.testing.assert_allclose(twice(resp), once(once(resp)))


def test_periodic_kernel_sees_lattice_translations():
    # Two voxels one unit cell apart are neighbours for the periodic kernel only.
    shape = (40,)
    coords = np.array([[3], [13]])
    resp = np.array([[1.0, 0.0], [0.0, 1.0]])
    periodic = LabelSmoother(coords, shape, SmoothingKernel("periodic", 0.2, unit_cell=(10,)))(resp)
    local = LabelSmoother(coords, shape, SmoothingKernel("local", 1.0))(resp)
    np.testing.assert_allclose(periodic, 0.5)
    np.testing.assert_allclose(local, resp)


def test_support_radius():
    k = SmoothingKernel("local", 2.0, 1e-2)
    offsets, _ = k.local_offsets(3)
    assert np.sqrt((offsets**2).sum(axis=1)).max() < k.radius
    assert k.radius == pytest.approx(2.0 * math.sqrt(math.log(100)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="gauss"), "kind must be one of"),
        (dict(weights="flat"), "weights must be one of"),
        (dict(length_scale=0), "length_scale must be > 0"),
        (dict(zero_cutoff=1.5), "zero_cutoff must be in"),
        (dict(kind="periodic"), "needs unit_cell"),
        (dict(iterations=0), "iterations must be"),
    ],
)
def test_bad_kernel_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SmoothingKernel(**kwargs)


def test_operator_built_in_batches_is_the_same():
    from xtec_flows.numerics.smoothing import local_smoothing_operator

    shape = (14, 15, 16)
    _, coords, _ = random_problem(shape, seed=4)
    kernel = SmoothingKernel("local", 1.5, weights="gaussian")
    whole = local_smoothing_operator(coords, shape, kernel)
    batched = local_smoothing_operator(coords, shape, kernel, batch=97)
    assert (abs(whole - batched) > 1e-15).nnz == 0
