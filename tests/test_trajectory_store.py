"""Trajectories left in chunks on local disk (engine.trajectory_store): the fit and the labels
work on them where they are, give the in-memory path's answers, and leave no scratch behind."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest

import xtec_flows
from xtec_flows.engine import ClusterParams, StreamingLimits, gather_trajectories
from xtec_flows.engine.fit import features
from xtec_flows.engine.trajectories import Trajectories
from xtec_flows.engine.trajectory_store import ChunkedTrajectories
from xtec_flows.numerics.smoothing import SmoothingKernel
from xtec_flows.synthetic import make_volume

# Any input counts as large: the first pass keeps its rows on disk instead of in memory.
CHUNKED = StreamingLimits(cache_all_bytes=0)


@pytest.fixture(scope="module")
def volume():
    return make_volume((16, 32, 32, 32), seed=5)


def _scratch_dirs(root: Path) -> list:
    return sorted(root.glob("xtec-flows-trajectories-*"))


def test_large_inputs_keep_rows_on_disk_in_block_order(volume, tmp_path):
    vol, temps, _ = volume
    in_memory = gather_trajectories(vol, temps, ClusterParams())
    chunked = gather_trajectories(vol, temps, ClusterParams(), chunks=(16, 16, 16), limits=CHUNKED, scratch=tmp_path)
    try:
        assert in_memory.chunked is None and chunked.chunked is not None
        assert chunked.flat is None and chunked.raw is None  # nothing of the rows in this process
        assert len(_scratch_dirs(tmp_path)) == 1
        assert chunked.n_samples == in_memory.n_samples
        X = features(chunked, ClusterParams())
        assert isinstance(X, da.Array)
        assert X.chunks[0] == tuple(int(n) for n in chunked.chunked.counts)  # one row block per spatial block
        # the same voxels and values, in block order instead of C order
        flat = chunked.row_keys.compute()
        order = np.argsort(flat)
        np.testing.assert_array_equal(flat[order], in_memory.flat)
        np.testing.assert_array_equal(X.compute()[order], features(in_memory, ClusterParams()))
    finally:
        chunked.close()
    assert _scratch_dirs(tmp_path) == []


@pytest.mark.parametrize("chunks", [(32, 32, 32), (16, 16, 16), (4, 6, 9)])
def test_chunked_em_equals_in_memory_em(volume, chunks):
    vol, temps, _ = volume
    # one restart: the equality is per restart, and many small blocks cost a task each per E-step
    ref = xtec_flows.cluster(vol, temps, n_components=4, n_init=1)
    other = xtec_flows.cluster(vol, temps, n_components=4, n_init=1, chunks=chunks, limits=CHUNKED)
    np.testing.assert_array_equal(other.labels[...], ref.labels[...])
    assert other.log_likelihood == pytest.approx(ref.log_likelihood, rel=1e-9)
    np.testing.assert_allclose(other.means, ref.means, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(other.counts, ref.counts)
    assert other.n_reads == 1


@pytest.mark.parametrize("chunks", [(16, 16, 16), (4, 6, 9)], ids=["blocks", "thin-blocks"])
@pytest.mark.parametrize("classes", [None, "auto"])
def test_peak_averaging_runs_on_chunked_rows_where_they_are(volume, monkeypatch, chunks, classes):
    # Peaks are connected across blocks, yet each block's rows learn their peak where they are
    # and only the peaks' sums come back: the in-memory labels, counts and classes, no gathering.
    vol, temps, _ = volume
    kwargs = dict(mode="peaks", n_components=3) if classes is None else dict(mode="peaks", classes="auto")
    ref = xtec_flows.cluster(vol, temps, **kwargs)

    def refuse(self, *args, **kwargs):
        raise AssertionError("mode peaks brought the chunked rows into memory")

    monkeypatch.setattr(Trajectories, "to_memory", refuse)
    monkeypatch.setattr(ChunkedTrajectories, "to_memory", refuse)
    other = xtec_flows.cluster(vol, temps, chunks=chunks, limits=CHUNKED, **kwargs)
    assert ref.n_peaks > 10 and other.n_peaks == ref.n_peaks
    np.testing.assert_array_equal(other.labels[...], ref.labels[...])
    np.testing.assert_array_equal(other.counts, ref.counts)
    assert other.log_likelihood == pytest.approx(ref.log_likelihood, rel=1e-9)
    if classes is not None:
        np.testing.assert_array_equal(other.components[...], ref.components[...])
        assert [(c["kind"], c["n_voxels"], c["n_peaks"]) for c in other.classes] == \
            [(c["kind"], c["n_voxels"], c["n_peaks"]) for c in ref.classes]
        assert sum(c["n_voxels"] for c in ref.classes) == ref.n_thresholded


@pytest.mark.parametrize("chunks, kernel", [
    ((16, 16, 16), SmoothingKernel("local", 1.0)),
    # blocks thinner than the support (radius 3 > 4/2): neighbours of neighbours are exchanged
    ((4, 6, 9), SmoothingKernel("local", 1.5, weights="gaussian", iterations=2)),
    ((12, 16, 9), SmoothingKernel("periodic", 0.2, unit_cell=(16, 16, 16))),
], ids=["local", "local-thin-blocks", "periodic"])
def test_xtec_s_smooths_chunked_rows_where_they_are(volume, monkeypatch, chunks, kernel):
    vol, temps, _ = volume
    kwargs = dict(mode="s", n_components=3, n_init=1, smoothing=kernel)
    ref = xtec_flows.cluster(vol, temps, **kwargs)

    def refuse(self):
        raise AssertionError("XTEC-s brought the chunked rows into memory")

    monkeypatch.setattr(Trajectories, "to_memory", refuse)
    other = xtec_flows.cluster(vol, temps, chunks=chunks, limits=CHUNKED, **kwargs)
    assert np.count_nonzero(ref.counts) == 3  # the smoothing left every cluster populated: a real comparison
    np.testing.assert_array_equal(other.labels[...], ref.labels[...])
    assert other.log_likelihood == pytest.approx(ref.log_likelihood, rel=1e-9)
    np.testing.assert_allclose(other.means, ref.means, rtol=1e-6, atol=1e-9)
    assert other.n_iter == ref.n_iter


def test_class_discovery_runs_on_chunked_rows_and_finds_the_in_memory_classes(volume, monkeypatch):
    vol, temps, _ = volume
    kwargs = dict(classes="auto", max_components=6, stability_runs=2)
    ref = xtec_flows.cluster(vol, temps, **kwargs)

    def refuse(self):
        raise AssertionError("class discovery brought the chunked rows into memory")

    monkeypatch.setattr(Trajectories, "to_memory", refuse)
    other = xtec_flows.cluster(vol, temps, chunks=(4, 6, 9), limits=CHUNKED, **kwargs)
    np.testing.assert_array_equal(other.labels[...], ref.labels[...])
    np.testing.assert_array_equal(other.components[...], ref.components[...])
    assert other.log_likelihood == pytest.approx(ref.log_likelihood, rel=1e-9)
    mine, theirs = other.discovery.to_dict(), ref.discovery.to_dict()
    assert mine["component_class"] == theirs["component_class"]
    assert mine["stability"]["sample"] == theirs["stability"]["sample"] == ref.n_thresholded
    np.testing.assert_allclose(mine["stability"]["ari"], theirs["stability"]["ari"], rtol=1e-9)
    for a, b in zip(mine["classes"], theirs["classes"]):
        assert (a["kind"], a["n_voxels"], a["components"]) == (b["kind"], b["n_voxels"], b["components"])
        np.testing.assert_allclose(a["mean_raw"], b["mean_raw"], rtol=1e-9)
        np.testing.assert_allclose(a["fit_curve"], b["fit_curve"], rtol=1e-6, atol=1e-9)
        assert a["stability"] == pytest.approx(b["stability"], rel=1e-9)


def test_scratch_removed_after_success_failure_and_interrupt(volume, tmp_path, monkeypatch):
    vol, temps, _ = volume
    xtec_flows.cluster(vol, temps, n_components=3, limits=CHUNKED, scratch=tmp_path)
    assert _scratch_dirs(tmp_path) == []

    # failure in the fit: more components than voxels above an explicit, very high cut
    with pytest.raises(ValueError, match="larger than the number"):
        xtec_flows.cluster(vol, temps, n_components=50, threshold=float(vol.mean(axis=0).max()) * 0.999,
                           limits=CHUNKED, scratch=tmp_path)
    assert _scratch_dirs(tmp_path) == []

    # Ctrl-C in the middle of the EM, and in the middle of the first pass
    import xtec_flows.engine.fit as fit_module
    import xtec_flows.engine.first_pass as first_pass_module

    def interrupted(*args, **kwargs):
        assert len(_scratch_dirs(tmp_path)) == 1  # the rows are there while the fit runs
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(fit_module, "fit_mixture", interrupted)
        with pytest.raises(KeyboardInterrupt):
            xtec_flows.cluster(vol, temps, n_components=3, limits=CHUNKED, scratch=tmp_path)
    assert _scratch_dirs(tmp_path) == []

    written = []
    real_write = first_pass_module.write_candidates

    def write_then_interrupt(group, block, *rows):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(block)
        return real_write(group, block, *rows)

    with monkeypatch.context() as m:
        m.setattr(first_pass_module, "write_candidates", write_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            xtec_flows.cluster(vol, temps, n_components=3, chunks=(10, 10, 10), limits=CHUNKED, scratch=tmp_path)
    assert written and _scratch_dirs(tmp_path) == []


def test_a_stored_model_labels_chunked_rows_where_they_are(volume, monkeypatch):
    import json

    from xtec_flows.engine import StoredModel, apply

    vol, temps, _ = volume
    fitted = xtec_flows.cluster(vol, temps, classes="auto", max_components=6, stability_runs=0)
    model = StoredModel.from_summary(json.loads(json.dumps(fitted.to_dict())), {"kind": "file", "path": "r.json"})
    ref = apply(vol, temps, model)

    def refuse(self):
        raise AssertionError("apply brought the chunked rows into memory")

    monkeypatch.setattr(Trajectories, "to_memory", refuse)
    import xtec_flows.engine as engine
    from xtec_flows.numerics.subsample import is_dask

    row_labels = []
    label_with_model = engine.label_with_model

    def spy(*args, **kwargs):
        labelled = label_with_model(*args, **kwargs)
        row_labels.append(labelled.row_labels)
        return labelled

    monkeypatch.setattr(engine, "label_with_model", spy)
    other = apply(vol, temps, model, chunks=(4, 6, 9), limits=CHUNKED)
    # The rows' labels stayed with their blocks: a dask array of the row blocks' chunks.
    assert len(row_labels) == 1 and is_dask(row_labels[0]) and row_labels[0].numblocks[0] > 1
    np.testing.assert_array_equal(other.labels[...], ref.labels[...])
    np.testing.assert_array_equal(other.labels[...], fitted.labels[...])
    np.testing.assert_array_equal(other.components[...], ref.components[...])
    assert other.log_likelihood == pytest.approx(ref.log_likelihood, rel=1e-9)
    assert [c["n_voxels"] for c in other.classes] == [c["n_voxels"] for c in ref.classes]
    np.testing.assert_allclose([c["tc"] or 0.0 for c in other.classes], [c["tc"] or 0.0 for c in ref.classes],
                               rtol=1e-6)


def test_the_bic_sweep_scores_chunked_rows_where_they_are(volume, monkeypatch):
    vol, temps, _ = volume
    ref = xtec_flows.select_n_components(vol, temps, [2, 3, 4], criterion="icl", n_init=1)

    def refuse(self):
        raise AssertionError("select_n_components brought the chunked rows into memory")

    monkeypatch.setattr(Trajectories, "to_memory", refuse)
    other = xtec_flows.select_n_components(vol, temps, [2, 3, 4], criterion="icl", n_init=1, chunks=(16, 16, 16),
                                           limits=CHUNKED)
    for a, b in zip(other, ref):
        assert (a["n_components"], a["best"], a["n_iter"]) == (b["n_components"], b["best"], b["n_iter"])
        for key in ("bic", "icl", "entropy", "log_likelihood"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
