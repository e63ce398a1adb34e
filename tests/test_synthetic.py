"""Tests of the synthetic temperature-series generator (xtec_flows.synthetic)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr

from xtec_flows import synthetic as syn
from xtec_flows.synthetic import (
    BACKGROUND,
    BRAGG,
    CDW,
    CLASS_NAMES,
    GAP,
    HALO,
    SeriesModel,
    intensity_block,
    make_volume,
    temperatures,
    truth_block,
    write_zarr,
)

MODEL = SeriesModel()
SHAPE_2D = (8, 32, 32)
SHAPE_3D = (6, 32, 32, 32)


@pytest.fixture(scope="module")
def clean_3d():
    """Noise-free (T=24, 48^3) intensity, temperatures and truth of the default model."""
    spatial = (48, 48, 48)
    temps = temperatures(24, MODEL)
    clean = intensity_block(MODEL, temps, None, spatial, None)
    return clean, temps, truth_block(MODEL, None, spatial)


def test_class_codes():
    assert CLASS_NAMES == ("background", "bragg", "cdw", "halo", "gap")
    assert (BACKGROUND, BRAGG, CDW, HALO, GAP) == (0, 1, 2, 3, 4)


def test_temperatures():
    t = temperatures(24, MODEL)
    assert t.shape == (24,) and t.dtype == np.float64
    assert np.all(np.diff(t) > 0)
    assert t[0] == MODEL.t_min and t[-1] == MODEL.t_max
    with pytest.raises(ValueError, match="n"):
        temperatures(1)


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D])
def test_make_volume_shapes_and_dtypes(shape):
    volume, temps, truth = make_volume(shape, seed=3)
    assert volume.shape == shape and volume.dtype == np.float32
    assert temps.shape == (shape[0],) and temps.dtype == np.float64
    assert truth.shape == shape[1:] and truth.dtype == np.int8
    assert np.all(np.isfinite(volume)) and volume.min() >= 0
    # Poisson counts are whole numbers.
    assert np.array_equal(volume, np.round(volume))
    assert set(np.unique(truth)) <= set(range(len(CLASS_NAMES)))


def test_seed_reproducible():
    a, _, _ = make_volume(SHAPE_2D, seed=5)
    b, _, _ = make_volume(SHAPE_2D, seed=5)
    c, _, _ = make_volume(SHAPE_2D, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D])
def test_gaps_are_exactly_zero_at_all_temperatures(shape):
    volume, _, truth = make_volume(shape, seed=0)
    h = np.arange(shape[-1])
    gap_h = h % MODEL.gap_period >= MODEL.gap_period - MODEL.gap_width
    assert gap_h.any()  # the default model has gaps in a 32-wide volume
    assert np.all(volume[..., gap_h] == 0)
    assert np.all(truth[..., gap_h] == GAP)
    assert not np.any(truth[..., ~gap_h] == GAP)
    # Outside the gaps the background (~10 counts) is essentially never 0.
    assert (volume[..., ~gap_h] == 0).mean() < 1e-3


def test_gaps_disabled():
    model = SeriesModel(gap_period=0)
    _, _, truth = make_volume(SHAPE_2D, model=model)
    assert not np.any(truth == GAP)


def test_truth_has_all_classes_3d(clean_3d):
    _, _, truth = clean_3d
    counts = np.bincount(truth.ravel(), minlength=5)
    assert np.all(counts > 0), dict(zip(CLASS_NAMES, counts))
    assert counts[BACKGROUND] > 0.5 * truth.size  # mostly background


def test_truth_2d_has_peak_classes():
    truth = truth_block(MODEL, None, (32, 32))
    assert set(np.unique(truth)) == set(range(5))


def test_cdw_is_an_order_parameter(clean_3d):
    clean, temps, truth = clean_3d
    traj = clean[:, truth == CDW]  # (T, n)
    above, below = temps > MODEL.tc, temps < MODEL.tc
    # The CDW component vanishes above Tc ...
    comp = syn.components_block(MODEL, temps, None, truth.shape)["cdw"][:, truth == CDW]
    assert np.all(comp[above] == 0)
    assert np.all(np.diff(comp[below], axis=0) <= 0)  # grows on cooling
    # ... so above Tc only background and the critical halo remain. The halo is
    # centred on the CDW position and peaks at Tc, but on every CDW voxel it
    # stays well below the ordered intensity, and it fades away from Tc.
    assert np.all(traj[above].max(axis=0) < 0.65 * traj[0])
    assert np.all(traj[-1] < 0.15 * traj[0])
    assert np.median(traj[above].mean(axis=0) / traj[0]) < 0.2
    assert np.all(traj[0] > traj[below][-1])


def test_halo_peaks_near_tc(clean_3d):
    clean, temps, truth = clean_3d
    traj = clean[:, truth == HALO]
    step = temps[1] - temps[0]
    t_peak = temps[np.argmax(traj, axis=0)]
    assert np.all(np.abs(t_peak - MODEL.tc) <= step)
    assert np.all(traj.max(axis=0) > 1.5 * traj[-1])
    # On the CDW flanks the ordered peak adds a low-T shoulder below the Tc peak.
    assert np.all(traj.max(axis=0) > 1.2 * traj[0])
    assert np.median(traj[0] / traj.max(axis=0)) < 0.6


def test_bragg_decreases_weakly(clean_3d):
    clean, _, truth = clean_3d
    traj = clean[:, truth == BRAGG]
    assert np.all(np.diff(traj, axis=0) < 0)
    drop = 1 - traj[-1] / traj[0]
    assert np.all((drop > 0.02) & (drop < 0.2))


def test_background_is_flat(clean_3d):
    clean, _, truth = clean_3d
    traj = clean[:, truth == BACKGROUND]
    rescaled = np.abs(traj / traj.mean(axis=0) - 1)
    # Linear +-7 %; only voxels next to peaks carry weak (< 30 %) peak tails.
    assert np.percentile(rescaled.max(axis=0), 95) < 0.08
    assert np.percentile(rescaled.max(axis=0), 99) < 0.15
    assert rescaled.max() < 0.3


def test_signal_classes_stand_out_in_log_mean():
    volume, _, truth = make_volume((12, 48, 48, 48), seed=1)
    log_mean = np.log(np.maximum(volume.mean(axis=0), 1e-12))
    signal = np.isin(truth, [BRAGG, CDW, HALO])
    assert log_mean[signal].min() > log_mean[truth == BACKGROUND].max()


def test_classes_separable_by_rescaled_trajectory(clean_3d):
    clean, _, truth = clean_3d
    keep = truth != GAP
    x = clean[:, keep].T.astype(np.float64)
    y = truth[keep]
    x = x / x.mean(axis=1, keepdims=True) - 1
    centroids = np.stack([x[y == k].mean(axis=0) for k in (BACKGROUND, BRAGG, CDW, HALO)])
    for k in (CDW, HALO):
        d = ((x[y == k, None, :] - centroids[None]) ** 2).sum(axis=-1)
        assert np.all(d.argmin(axis=1) == k), CLASS_NAMES[k]


def test_components_sum_to_intensity():
    temps = temperatures(7)
    region = (slice(3, 20), slice(10, 31), slice(0, 32))
    comps = syn.components_block(MODEL, temps, region, (32, 32, 32))
    total = comps["background"] + comps["bragg"] + comps["cdw"] + comps["halo"]
    total[..., comps["gap"][0, 0]] = 0
    clean = intensity_block(MODEL, temps, region, (32, 32, 32), None)
    np.testing.assert_allclose(clean, total, rtol=1e-5, atol=1e-4)


def test_blocks_match_whole_grid():
    spatial = (40, 36, 33)
    temps = temperatures(5)
    whole = intensity_block(MODEL, temps, None, spatial, None)
    truth = truth_block(MODEL, None, spatial)
    region = (slice(8, 24), slice(17, 36), slice(5, 30))
    np.testing.assert_allclose(
        intensity_block(MODEL, temps, region, spatial, None), whole[(slice(None),) + region],
        rtol=1e-6,
    )
    assert np.array_equal(truth_block(MODEL, region, spatial), truth[region])


def _read(path):
    g = zarr.open_group(str(path), mode="r")
    return g, g["intensity"][...], g["truth"][...]


def test_write_zarr_full_chunks_equals_make_volume(tmp_path):
    path = tmp_path / "v.zarr"
    g = write_zarr(path, SHAPE_3D, seed=7, chunks=SHAPE_3D)
    volume, temps, truth = make_volume(SHAPE_3D, seed=7)
    g, intensity, truth_z = _read(path)
    assert g.metadata.zarr_format == 3
    assert g["intensity"].dtype == np.float32 and g["truth"].dtype == np.int8
    assert np.array_equal(intensity, volume)
    assert np.array_equal(truth_z, truth)
    attrs = g.attrs.asdict()
    assert attrs["signal"] == "intensity"
    assert attrs["temperatures"] == [float(t) for t in temps]
    assert attrs["dims"] == ["T", "L", "K", "H"]
    assert attrs["class_names"] == list(CLASS_NAMES)
    assert attrs["seed"] == 7
    assert attrs["model"]["tc"] == MODEL.tc
    stored = dict(attrs["model"], cdw_wavevector=tuple(attrs["model"]["cdw_wavevector"]))
    assert SeriesModel(**stored) == MODEL
    ia = g["intensity"].attrs.asdict()
    assert ia["temperatures"] == attrs["temperatures"] and ia["dims"] == attrs["dims"]


def test_write_zarr_default_chunks_2d(tmp_path):
    g = write_zarr(tmp_path / "v.zarr", (5, 80, 40))
    assert g["intensity"].chunks == (5, 64, 40)
    assert g["truth"].chunks == (64, 40)
    assert g.attrs["dims"] == ["T", "K", "H"]


def test_write_zarr_chunked_is_reproducible(tmp_path):
    shape, chunks = (5, 32, 32, 32), (5, 16, 16, 16)  # 8 blocks: the 2-process path
    write_zarr(tmp_path / "a.zarr", shape, seed=2, chunks=chunks, workers=2)
    write_zarr(tmp_path / "b.zarr", shape, seed=2, chunks=chunks, workers=1)
    write_zarr(tmp_path / "c.zarr", shape, seed=3, chunks=chunks[1:], workers=1)
    ga, a, ta = _read(tmp_path / "a.zarr")
    _, b, tb = _read(tmp_path / "b.zarr")
    _, c, _ = _read(tmp_path / "c.zarr")
    assert ga["intensity"].chunks == chunks
    assert np.array_equal(a, b) and np.array_equal(ta, tb)
    assert not np.array_equal(a, c)
    assert np.array_equal(ta, truth_block(MODEL, None, shape[1:]))
    # Noise depends on the chunk grid, but only the noise: both are Poisson
    # draws around the same means.
    whole, _, _ = make_volume(shape, seed=2)
    assert not np.array_equal(a, whole)
    valid = ta != GAP
    assert abs(a[:, valid].mean() / whole[:, valid].mean() - 1) < 0.01


def test_write_zarr_refuses_to_overwrite(tmp_path):
    path = tmp_path / "v.zarr"
    write_zarr(path, SHAPE_2D)
    with pytest.raises(FileExistsError, match="overwrite=True") as err:
        write_zarr(path, SHAPE_2D)
    assert str(path) in str(err.value)
    g = write_zarr(path, (4, 16, 16), overwrite=True)
    assert g["intensity"].shape == (4, 16, 16)


@pytest.mark.parametrize(
    "shape", [(24, 64), (2, 16, 16), (4, 8, 8, 8, 8), (4, 0, 8), (4.5, 8, 8), "abc", None]
)
def test_bad_shape(tmp_path, shape):
    with pytest.raises(ValueError, match="shape"):
        make_volume(shape)
    with pytest.raises(ValueError, match="shape"):
        write_zarr(tmp_path / "v.zarr", shape)
    assert not (tmp_path / "v.zarr").exists()


@pytest.mark.parametrize("chunks", [(4, 8, 8, 8), (0, 8, 8), (4, -1), "x"])
def test_bad_chunks(tmp_path, chunks):
    with pytest.raises(ValueError, match="chunks"):
        write_zarr(tmp_path / "v.zarr", (4, 16, 16), chunks=chunks)


def test_bad_seed_and_model():
    with pytest.raises(ValueError, match="seed"):
        make_volume(SHAPE_2D, seed=-1)
    with pytest.raises(ValueError, match="t_max"):
        SeriesModel(t_max=10.0)
    with pytest.raises(ValueError, match="gap_width"):
        SeriesModel(gap_period=4, gap_width=4)
    with pytest.raises(TypeError, match="SeriesModel"):
        make_volume(SHAPE_2D, model=dataclasses.asdict(MODEL))
