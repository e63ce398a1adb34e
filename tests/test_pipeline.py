"""The chunked pipeline: same answer for every chunking and input type, agreement with xtec."""

import numpy as np
import pytest
import zarr
from sklearn.metrics import adjusted_rand_score
from xtec.GMM import GMM
from xtec.Preprocessing import Mask_Zeros, Threshold_Background

import xtec_flows
from xtec_flows.numerics.smoothing import SmoothingKernel
from xtec_flows.synthetic import CDW, HALO, make_volume

SHAPE3 = (10, 32, 32, 32)


@pytest.fixture(scope="module")
def volume3():
    return make_volume(SHAPE3, seed=1)


@pytest.fixture(scope="module")
def volume2():
    return make_volume((10, 64, 64), seed=2)


def labels_of(result):
    return result.labels[...]


@pytest.mark.filterwarnings("ignore:.*received no voxels:RuntimeWarning")  # strong smoothing empties a cluster
@pytest.mark.parametrize(
    "mode,kwargs",
    [
        ("d", {}),
        ("s", {"smoothing": SmoothingKernel("local", 2.0)}),  # radius 4.3 voxels
        ("s", {"smoothing": SmoothingKernel("periodic", 0.2, unit_cell=(16, 16, 16))}),
        ("peaks", {}),
    ],
)
def test_chunked_equals_in_memory(volume3, mode, kwargs):
    vol, temps, _ = volume3
    common = dict(mode=mode, n_components=3, n_init=1, random_state=0, **kwargs)
    whole = xtec_flows.cluster(vol, temps, chunks=SHAPE3[1:], **common)
    ref = labels_of(whole)
    assert ref.dtype == np.int8 and ref.shape == SHAPE3[1:]
    assert set(np.unique(ref)) <= {-1, 0, 1, 2}
    # uneven chunks; chunks smaller than the smoothing radius
    for chunks in [(11, 32, 7), (4, 3, 4) if mode == "s" else (5, 6, 7)]:
        part = xtec_flows.cluster(vol, temps, chunks=chunks, **common)
        np.testing.assert_array_equal(labels_of(part), ref)
        np.testing.assert_allclose(part.means, whole.means, rtol=1e-9, atol=1e-12)
        assert part.log_likelihood == pytest.approx(whole.log_likelihood, rel=1e-12)
        assert part.log_cutoff == whole.log_cutoff


def test_numpy_zarr_dask_inputs_agree(volume2, tmp_path):
    da = pytest.importorskip("dask.array")
    vol, temps, _ = volume2
    z = zarr.create_array(tmp_path / "v.zarr", shape=vol.shape, chunks=(1, 16, 16), dtype="float32")
    z[...] = vol
    results = [
        xtec_flows.cluster(v, temps, n_components=3, n_init=1)
        for v in (vol, z, da.from_array(vol, chunks=(5, 20, 64)))
    ]
    for r in results[1:]:
        np.testing.assert_array_equal(labels_of(r), labels_of(results[0]))


def test_labels_written_to_a_given_store(volume2, tmp_path):
    vol, temps, _ = volume2
    r = xtec_flows.cluster(vol, temps, n_components=3, labels_store=str(tmp_path / "labels.zarr"), chunks=(20, 20))
    on_disk = zarr.open_array(tmp_path / "labels.zarr", mode="r")
    assert on_disk.chunks == (20, 20)
    np.testing.assert_array_equal(on_disk[...], labels_of(r))
    assert on_disk.attrs["params"]["n_components"] == 3


def test_result_metadata(volume2):
    vol, temps, _ = volume2
    r = xtec_flows.cluster(vol, temps, n_components=3, random_state=7)
    d = r.to_dict()
    assert d["xtec_flows"] == xtec_flows.__version__
    assert d["params"]["random_state"] == 7 and d["params"]["mode"] == "d"
    assert np.asarray(d["means"]).shape == (3, vol.shape[0])
    assert np.asarray(d["variances"]).shape == (3, vol.shape[0])
    assert sum(d["counts"]) == d["n_thresholded"] == int((labels_of(r) >= 0).sum())
    assert sum(d["threshold"]["histogram_counts"]) == d["n_valid"]
    assert d["threshold"]["intensity_cutoff"] > 0
    assert np.isfinite(d["bic"]) and np.isfinite(d["log_likelihood"])
    assert set(d["timings"]) >= {"statistics", "threshold", "trajectories", "fit", "labels"}


def test_xtec_d_agrees_with_reference(quiet):
    # K = 3 is the clear structure of this volume (Bragg, CDW, halo); at larger K
    # both implementations split classes in seed-dependent ways.
    vol, temps, _ = make_volume((16, 48, 48, 48), seed=3)
    ours = xtec_flows.cluster(vol, temps, n_components=3, random_state=0)
    with quiet():
        np.random.seed(0)
        th = Threshold_Background(Mask_Zeros(vol), None, "KL")
        data = th.Rescale_mean(th.data_thresholded)
        gmm = GMM(data.T, 3)
        gmm.RunEM()
    ours_at_ref = labels_of(ours)[tuple(th.ind_thresholded.T)]
    assert (ours_at_ref >= 0).mean() > 0.99  # same voxels thresholded
    assert adjusted_rand_score(gmm.cluster_assignments, ours_at_ref) >= 0.9


def test_finds_cdw_and_halo(volume3):
    vol, temps, truth = volume3
    lab = labels_of(xtec_flows.cluster(vol, temps, n_components=4))
    for cls in (CDW, HALO):
        sel = truth == cls
        values, counts = np.unique(lab[sel], return_counts=True)
        best = values[np.argmax(counts)]
        assert best >= 0
        # the plurality cluster of this class holds mostly this class
        assert (truth[lab == best] == cls).mean() > 0.6


def test_select_n_components(volume2):
    vol, temps, _ = volume2
    table = xtec_flows.select_n_components(vol, temps, [2, 3, 4, 5], n_init=1)
    assert [r["n_components"] for r in table] == [2, 3, 4, 5]
    assert sum(r["best"] for r in table) == 1
    assert all(np.isfinite(r["bic"]) for r in table)


def test_distributed_client_is_used(volume2):
    distributed = pytest.importorskip("distributed")
    vol, temps, _ = volume2
    local = labels_of(xtec_flows.cluster(vol, temps, n_components=3, n_init=1))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
        with distributed.Client(lc) as client, distributed.get_task_stream(client) as stream:
            r = xtec_flows.cluster(vol, temps, n_components=3, n_init=1, chunks=(16, 16))
    # the block tasks ran on the cluster's workers, and gave the same labels
    assert len(stream.data) >= 16
    np.testing.assert_array_equal(labels_of(r), local)


def test_blocks_follow_the_storage_chunks_locally_and_merge_them_on_a_cluster():
    import math

    from xtec_flows.engine import StreamingLimits, as_dask

    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=(24, 384, 384, 384), chunks=(24, 64, 64, 64),
                            dtype="f4")
    assert {c for axis in as_dask(arr).chunks[1:] for c in axis} == {64}
    merged = as_dask(arr, on_cluster=True)
    block = tuple(axis[0] for axis in merged.chunks[1:])
    # Whole storage chunks per block, as few as reach the cluster's block size.
    assert all(b % 64 == 0 for b in block) and math.prod(block) == StreamingLimits().cluster_block_voxels
    assert merged.chunks[0] == (24,)
    # A volume smaller than one such block is one block; explicit chunks are kept as given.
    small = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 64, 64, 96), chunks=(8, 64, 64, 64), dtype="f4")
    assert as_dask(small, on_cluster=True).chunks[1:] == ((64,), (64,), (96,))
    assert as_dask(arr, (32, 32, 32), on_cluster=True).chunks[1] == (32,) * 12


def test_a_cluster_run_on_merged_blocks_gives_the_local_labels(volume2):
    distributed = pytest.importorskip("distributed")
    from xtec_flows.engine import StreamingLimits

    vol, temps, _ = volume2
    stored = zarr.create_array(zarr.storage.MemoryStore(), shape=vol.shape, chunks=(vol.shape[0], 16, 16),
                               dtype=vol.dtype)
    stored[...] = vol
    # Locally the 16 x 16 storage chunks are the blocks (16 of them); on the cluster they merge
    # four at a time (4 blocks), and neither changes the labels.
    limits = StreamingLimits(block_voxels=8 * 16 * 16, cluster_block_voxels=32 * 32)
    local = labels_of(xtec_flows.cluster(stored, temps, n_components=3, n_init=1, limits=limits))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
        with distributed.Client(lc) as client, distributed.get_task_stream(client) as stream:
            r = xtec_flows.cluster(stored, temps, n_components=3, n_init=1, limits=limits)
    first_pass = [t for t in stream.data if "block_first_pass" in str(t["key"])]
    assert len(first_pass) == 4
    np.testing.assert_array_equal(labels_of(r), local)


def test_import_keeps_heavy_dependencies_out():
    import subprocess
    import sys

    code = (
        "import sys, xtec_flows, xtec_flows.engine, xtec_flows.numerics.mixture;"
        "bad=[m for m in ('matplotlib','prefect','tiled','distributed','sklearn') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("path", ["sampled provisional cut", "sample misjudged", "second read"])
def test_large_volume_paths_give_the_same_result(volume3, path):
    """Small inputs keep every trajectory in the first pass; large ones keep only those
    above a cut estimated on sampled blocks (on disk: at least 1.5 times as many as the sample
    predicts, so a sample that misjudged the volume does not cost a read), and read again
    if the final cut is lower. All routes must give identical results."""
    from xtec_flows.engine import StreamingLimits

    vol, temps, _ = volume3
    common = dict(mode="peaks", n_components=3, n_init=1, chunks=(8, 8, 16))
    ref = xtec_flows.cluster(vol, temps, **common)
    assert ref.n_reads == 1
    # A margin far above any real cut stands for a sample that misjudged the volume; the
    # generous candidate set absorbs it, and without it (candidate_factor=0) the input is read again.
    limits = StreamingLimits(cache_all_bytes=0, provisional_margin_bins=4 if path == "sampled provisional cut" else -1000,
                             candidate_factor=0.0 if path == "second read" else 1.5)
    other = xtec_flows.cluster(vol, temps, **common, limits=limits)
    assert other.n_reads == (2 if path == "second read" else 1)
    np.testing.assert_array_equal(labels_of(other), labels_of(ref))
    np.testing.assert_array_equal(other.histogram_counts, ref.histogram_counts)
    assert other.log_cutoff == ref.log_cutoff


def test_docstring_examples_run():
    import doctest

    from xtec_flows import engine

    failures, tried = doctest.testmod(engine, verbose=False)
    assert tried > 0 and failures == 0


def test_empty_cluster_is_reported(volume2):
    vol, temps, _ = volume2
    with pytest.warns(RuntimeWarning, match="received no voxels"):
        # far more clusters than the smoothed data support
        xtec_flows.cluster(vol, temps, mode="s", n_components=12, n_init=1,
                           smoothing=SmoothingKernel("local", 3.0, iterations=3))
