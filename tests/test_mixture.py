"""Diagonal Gaussian mixture: kernels against scipy.stats, EM properties, chunked = whole."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from xtec_flows.numerics import mixture as mx
from xtec_flows.numerics.subsample import subsample_rank


def blobs(seed=0, n=3000, T=8, K=3, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.5, (K, T))
    truth = rng.integers(K, size=n)
    X = centres[truth] + rng.normal(0, spread, (n, T)) * rng.uniform(0.5, 1.5, (K, T))[truth]
    return X, truth


def test_log_gaussian_prob_matches_scipy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 6))
    means = rng.normal(size=(3, 6))
    var = rng.uniform(0.2, 2.0, (3, 6))
    ours = mx.estimate_log_gaussian_prob(X, means, var)
    for k in range(3):
        ref = stats.multivariate_normal(means[k], np.diag(var[k])).logpdf(X)
        np.testing.assert_allclose(ours[:, k], ref, rtol=1e-10, atol=1e-10)


def test_log_likelihood_is_mixture_density():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 5))
    p = mx.MixtureParams(np.array([0.2, 0.8]), rng.normal(size=(2, 5)), rng.uniform(0.5, 1.5, (2, 5)))
    ref = np.log(sum(p.weights[k] * stats.multivariate_normal(p.means[k], np.diag(p.variances[k])).pdf(X) for k in range(2)))
    np.testing.assert_allclose(mx.log_likelihood_per_sample(X, p), ref, rtol=1e-10)


def test_sufficient_statistics_add_up():
    X, _ = blobs(1, n=1000)
    p = mx.MixtureParams(np.full(3, 1 / 3), X[:3].copy(), np.ones((3, X.shape[1])))
    whole = mx.e_step_stats(X, p)
    parts = mx.e_step_stats(X[:317], p) + mx.e_step_stats(X[317:700], p) + mx.e_step_stats(X[700:], p)
    np.testing.assert_allclose(parts.nk, whole.nk)
    np.testing.assert_allclose(parts.sx, whole.sx)
    np.testing.assert_allclose(parts.sxx, whole.sxx)
    assert parts.log_likelihood == pytest.approx(whole.log_likelihood)
    a = mx.m_step(whole, 1e-6)
    b = mx.m_step(parts, 1e-6)
    np.testing.assert_allclose(a.means, b.means)
    np.testing.assert_allclose(a.variances, b.variances)


def test_em_never_decreases_log_likelihood():
    X, _ = blobs(2, n=4000, K=4, spread=0.8)
    fit = mx.fit_mixture(X, 4, tol=1e-10, max_iter=60, random_state=3)
    h = np.asarray(fit.history)
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h[1:]))


def test_blocked_and_threaded_fit_equals_single_block():
    X, _ = blobs(3, n=5000)
    a = mx.fit_mixture(X, 3, block_size=10_000, n_threads=1, random_state=0)
    b = mx.fit_mixture(X, 3, block_size=777, n_threads=2, random_state=0)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.params.means, b.params.means, rtol=1e-8, atol=1e-10)
    assert a.log_likelihood == pytest.approx(b.log_likelihood, rel=1e-10)


def test_dask_input_equals_numpy():
    da = pytest.importorskip("dask.array")
    X, _ = blobs(4, n=3000)
    a = mx.fit_mixture(X, 3, block_size=1000, random_state=1)
    b = mx.fit_mixture(da.from_array(X, chunks=(1000, -1)), 3, random_state=1)
    # Row blocks keep their labels where they are (persisted, one chunk per block): the caller
    # gets a dask array, not one label per row.
    assert isinstance(b.labels, da.Array) and b.labels.chunks == ((1000, 1000, 1000),)
    np.testing.assert_array_equal(a.labels, b.labels.compute())
    np.testing.assert_array_equal(a.counts, b.counts)
    assert a.log_likelihood == pytest.approx(b.log_likelihood, rel=1e-10)


def test_agrees_with_sklearn():
    X, truth = blobs(5, n=6000, K=4, spread=0.25)
    ours = mx.fit_mixture(X, 4, random_state=0, n_init=2)
    sk = GaussianMixture(4, covariance_type="diag", random_state=0, n_init=2).fit(X)
    assert adjusted_rand_score(ours.labels, sk.predict(X)) > 0.99
    assert adjusted_rand_score(ours.labels, truth) > 0.99
    # Same mean log-likelihood (sklearn's score is the per-sample mean).
    assert ours.log_likelihood / X.shape[0] == pytest.approx(sk.score(X), abs=1e-3)


def test_bic_formula_and_sklearn():
    X, _ = blobs(6, n=2000)
    fit = mx.fit_mixture(X, 3, random_state=0)
    n, T = X.shape
    assert fit.bic == pytest.approx(-2 * fit.log_likelihood + (2 * 3 * T + 2) * math.log(n))
    sk = GaussianMixture(3, covariance_type="diag", random_state=0).fit(X)
    assert fit.bic == pytest.approx(sk.bic(X), rel=1e-3)


def test_bic_prefers_true_k():
    X, _ = blobs(7, n=4000, K=3, spread=0.2)
    bics = {k: mx.fit_mixture(X, k, random_state=0, n_init=2).bic for k in range(1, 6)}
    assert min(bics, key=bics.get) == 3


def test_seeded_and_canonical_order():
    X, _ = blobs(8, n=3000, K=3)
    a = mx.fit_mixture(X, 3, random_state=11)
    b = mx.fit_mixture(X, 3, random_state=11)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = mx.fit_mixture(X, 3, random_state=12)  # other seed, same solution, same label order
    np.testing.assert_array_equal(a.labels, c.labels)
    spread = a.params.means.std(axis=1)
    assert np.all(np.diff(spread) <= 1e-12)
    assert a.labels.dtype == np.int8
    assert a.counts.sum() == X.shape[0]


def test_smoother_is_applied_between_e_and_m():
    X, _ = blobs(9, n=500, K=2)
    calls = []

    def smoother(resp):
        calls.append(resp.shape)
        return np.full_like(resp, 0.5)  # erase all information

    fit = mx.fit_mixture(X, 2, smoother=smoother, max_iter=5, random_state=0)
    assert calls and calls[0] == (500, 2)
    # Uniform responsibilities make both components identical.
    np.testing.assert_allclose(fit.params.means[0], fit.params.means[1])


def test_kmeans_plusplus_spreads_centres():
    X, truth = blobs(10, n=3000, K=4, spread=0.1)
    centres = mx.kmeans_plusplus(X, 4, np.random.default_rng(0))
    nearest_truth = {int(truth[np.argmin(((X - c) ** 2).sum(1))]) for c in centres}
    assert len(nearest_truth) == 4


def test_seeding_subsample_belongs_to_the_rows_not_their_order():
    """With more rows than the seeding subsample, the fit keyed by row identity (a voxel's flat
    index) is the same fit whatever order and blocking the rows come in: numpy in one order,
    numpy shuffled, dask in row blocks of two sizes. Labels identical (as a permutation of the
    rows), log-likelihood equal to 1e-9 relative."""
    import dask.array as da

    X, _ = blobs(seed=5, n=12_000, T=8, K=3, spread=0.6)
    keys = np.arange(X.shape[0], dtype=np.int64) * 7 + 3  # voxel-like, not the row positions
    kw = dict(n_init=2, random_state=11, init_sample_size=2_000, block_size=1_000)
    ref = mx.fit_mixture(X, 3, sample_keys=keys, **kw)
    perm = np.random.default_rng(0).permutation(X.shape[0])
    runs = {
        "shuffled": (mx.fit_mixture(X[perm], 3, sample_keys=keys[perm], **kw), perm),
        "dask 997": (mx.fit_mixture(da.from_array(X[perm], chunks=(997, -1)), 3,
                                    sample_keys=da.from_array(keys[perm], chunks=997), **kw), perm),
        "dask 4096": (mx.fit_mixture(da.from_array(X, chunks=(4096, -1)), 3, sample_keys=keys, **kw),
                      np.arange(X.shape[0])),
    }
    for name, (fit, order) in runs.items():
        np.testing.assert_array_equal(fit.labels, ref.labels[order], err_msg=name)
        assert fit.log_likelihood == pytest.approx(ref.log_likelihood, rel=1e-9), name
        np.testing.assert_allclose(fit.params.means, ref.params.means, rtol=1e-7, atol=1e-9, err_msg=name)
    rank = subsample_rank(keys, 42)
    assert rank.min() >= 0.0 and rank.max() < 1.0 and np.unique(rank).size == rank.size
    assert abs(rank.mean() - 0.5) < 0.01  # uniform


def test_sample_keys_must_match_the_rows():
    X, _ = blobs(n=500)
    with pytest.raises(ValueError, match="one key per row"):
        mx.fit_mixture(X, 3, sample_keys=np.arange(499))


def test_subsample_is_chosen_by_key_whatever_the_order_and_blocks():
    import dask.array as da

    from xtec_flows.numerics.subsample import sample_rows

    rng = np.random.default_rng(3)
    keys = rng.choice(10**7, size=5000, replace=False)
    X = rng.normal(size=(5000, 4)).astype(np.float32)
    extra = np.arange(5000) * 10
    pos, (rows, other) = sample_rows([X, extra], keys, 700, seed=11)
    assert pos.size == 700 and np.all(np.diff(keys[pos]) > 0)  # key order
    np.testing.assert_array_equal(rows, X[pos])
    np.testing.assert_array_equal(other, extra[pos])
    perm = rng.permutation(5000)
    for chunk in (5000, 613, 97):
        p2, (r2, o2) = sample_rows([da.from_array(X[perm], chunks=(chunk, -1)), da.from_array(extra[perm], chunks=chunk)],
                                   da.from_array(keys[perm], chunks=chunk), 700, seed=11)
        np.testing.assert_array_equal(perm[p2], pos)  # positions index the permuted rows
        np.testing.assert_array_equal(r2, rows)
        np.testing.assert_array_equal(o2, other)
    everything, _ = sample_rows([X], keys, 10**6, seed=11)
    np.testing.assert_array_equal(keys[everything], np.sort(keys))


def test_a_warm_start_from_a_converged_fit_stays_there_and_one_of_the_wrong_shape_is_refused():
    X, truth = blobs(4, n=4000, K=3, T=8)
    cold = mx.fit_mixture(X, 3, tol=1e-6, random_state=1)
    warm = mx.fit_mixture(X, 3, tol=1e-6, random_state=99, init_params=cold.params)
    # EM begins at the optimum: its first E-step already has the converged likelihood, and it stops at once
    assert warm.history[0] == pytest.approx(cold.log_likelihood / len(X), rel=1e-9) and warm.n_iter == 2
    # it really begins there: from displaced means the first likelihood is lower, then EM climbs back
    off = mx.fit_mixture(X, 3, tol=1e-6, init_params=mx.MixtureParams(cold.params.weights, cold.params.means + 0.3,
                                                                       cold.params.variances))
    assert off.history[0] < warm.history[0] - 0.01 and off.log_likelihood == pytest.approx(cold.log_likelihood, rel=1e-6)
    np.testing.assert_array_equal(warm.labels, cold.labels)
    assert warm.log_likelihood == pytest.approx(cold.log_likelihood, rel=1e-6)
    # the previous fit of a series one temperature shorter, its last temperature repeated: a
    # temperature series changes smoothly, so EM starts near the clusters and finds them
    rng = np.random.default_rng(5)
    t = np.linspace(0, 1, 8)
    curves = np.stack([np.full(8, 1.0), 1.0 - t ** 2, 0.2 + 2 * np.exp(-((t - 0.6) / 0.15) ** 2)])
    truth = rng.integers(3, size=3000)
    series = curves[truth] + rng.normal(0, 0.1, (3000, 8))
    short = mx.fit_mixture(series[:, :7], 3, tol=1e-6, random_state=1)
    grown = mx.MixtureParams(short.params.weights, np.hstack([short.params.means, short.params.means[:, -1:]]),
                             np.hstack([short.params.variances, short.params.variances[:, -1:]]))
    refit = mx.fit_mixture(series, 3, tol=1e-6, init_params=grown)
    assert adjusted_rand_score(refit.labels, truth) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"shape \(3, 8\)"):
        mx.fit_mixture(X, 3, init_params=short.params)
    with pytest.raises(ValueError, match="positive variances"):
        mx.fit_mixture(X, 3, init_params=mx.MixtureParams(grown.weights, grown.means, 0 * grown.variances))


@pytest.mark.parametrize("init_sample_size", [500, 10_000], ids=["restarts-on-a-subsample", "full-restarts"])
def test_choose_restart_decides_which_restart_goes_on(init_sample_size):
    X, _ = blobs(seed=11, n=4000, T=6, K=6, spread=0.6)  # 6 blobs, 4 components: restarts differ
    seen = []

    def third(fits):
        seen.append([ll for _, ll in fits])
        return 2

    fit = mx.fit_mixture(X, 4, n_init=4, random_state=3, init_sample_size=init_sample_size, keep_restarts=True,
                         choose_restart=third)
    assert len(seen) == 1 and len(seen[0]) == 4
    assert [ll for _, ll in fit.restarts] == seen[0]
    assert fit.n_init_best == 2
    if init_sample_size < X.shape[0]:
        # The chosen subsample restart is the one continued: EM from its parameters gives this fit.
        again = mx.fit_mixture(X, 4, init_params=fit.restarts[2][0])
        np.testing.assert_allclose(again.params.means, fit.params.means, rtol=1e-9, atol=1e-12)
        assert again.log_likelihood == pytest.approx(fit.log_likelihood, rel=1e-12)
    else:  # every restart was a full fit: the chosen one is returned
        assert fit.log_likelihood / X.shape[0] == pytest.approx(fit.restarts[2][1], rel=1e-12)
        assert len({round(ll, 6) for ll in seen[0]}) > 1  # (the restarts differ, so the choice matters)
    # Without it the most likely restart wins, as before.
    plain = mx.fit_mixture(X, 4, n_init=4, random_state=3, init_sample_size=init_sample_size, keep_restarts=True)
    lls = [ll for _, ll in plain.restarts]
    assert lls == seen[0] and plain.n_init_best == int(np.argmax(lls))
