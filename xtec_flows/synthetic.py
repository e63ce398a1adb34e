"""Synthetic X-ray temperature series with ground truth.

XTEC clusters the temperature trajectories I_q(T) of reciprocal-space voxels.
This module builds volumes ``I(T, L, K, H)`` (or ``I(T, K, H)``) whose voxels
belong to known classes with distinct trajectories, for the demo, the tests and
the benchmarks:

========== ===================================================================
class      noise-free trajectory
========== ===================================================================
background low, smooth in q, weak linear increase with T
bragg      sharp peaks at integer HKL, weak Debye-Waller decrease with T
cdw        superlattice peaks at HKL + q_CDW, order parameter
           (1 - T/Tc)^(2 beta) below Tc and 0 above
halo       critical diffuse scattering around the CDW positions, a Lorentzian
           chi(T) / (1 + (dq xi(T))^2) truncated at a few voxels, whose
           susceptibility chi and correlation length xi diverge (capped) at
           Tc, so the intensity peaks at Tc
gap        detector gaps: planes of voxels that are exactly 0 at every T
========== ===================================================================

Geometry: spatial index ``i`` along an axis maps to ``q = i / pixels_per_zone``
reciprocal-lattice units, so a shape-64 axis with 16 px/zone spans 4 zones.
Array axes are ``(T, L, K, H)``; the last spatial axis is H. With 2 spatial dims
they are ``(T, K, H)`` and the L component of the CDW wavevector is ignored.

Everything is evaluated block by block on regions of the global grid, so a
terabyte volume is written with bounded memory and the blocks agree exactly
with an in-memory evaluation of the whole grid. Peaks are separable sums over
lattice sites (products of 1-D combs), and only sites within a cutoff of the
region are evaluated; the halo uses the distance to the nearest CDW site.
:func:`write_zarr` generates and writes blocks in a few forked worker
processes (NumPy's Poisson sampler holds the GIL, so threads do not help).

Noise is Poisson, drawn with ``rng.poisson`` per temperature slice. It is exact
at every mean; no normal approximation is used because the background (where
almost all draws happen) has small means, where a normal approximation would be
visibly wrong, and the large-mean voxels are too few to matter for speed.
Noise depends on the block grid: :func:`write_zarr` seeds every block with
``SeedSequence(seed, spawn_key=block_index)``, so :func:`make_volume` (one block,
index ``(0, ..., 0)``) equals :func:`write_zarr` only when the chunks cover the
whole spatial grid. The noise-free intensity and the truth never depend on the
block grid.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_NAMES",
    "BACKGROUND",
    "BRAGG",
    "CDW",
    "HALO",
    "GAP",
    "SeriesModel",
    "temperatures",
    "components_block",
    "intensity_block",
    "truth_block",
    "make_volume",
    "write_zarr",
    "dims_for",
]

CLASS_NAMES = ("background", "bragg", "cdw", "halo", "gap")
BACKGROUND, BRAGG, CDW, HALO, GAP = range(5)

# Peaks are summed over lattice sites closer than this many sigmas: exp(-8**2/2)
# ~ 1e-14 relative, far below one count, so truncation is invisible.
_PEAK_CUTOFF_SIGMAS = 8.0

# Background modulation: one cosine per spatial axis (periods in zones, phases),
# incommensurate with the lattice so the background has no lattice structure.
_BG_PERIODS = (6.7, 4.1, 5.3)  # (L, K, H)
_BG_PHASES = (0.3, 1.1, 2.0)


@dataclass(frozen=True)
class SeriesModel:
    """Parameters of the synthetic temperature series.

    Lengths are in voxels (px) unless stated; intensities are mean counts.
    The defaults give a clearly structured volume in which every class is
    present, separable by rescaled trajectory, and (Bragg, CDW, halo) well
    above the background in log(mean_T I).
    """

    pixels_per_zone: int = 16
    """Voxels per reciprocal-lattice unit along every spatial axis."""
    t_min: float = 20.0
    """Lowest temperature (K)."""
    t_max: float = 300.0
    """Highest temperature (K); temperatures are evenly spaced."""
    tc: float = 150.0
    """CDW transition temperature (K)."""
    beta: float = 0.33
    """Order-parameter exponent: CDW peak ∝ (1 - T/Tc)^(2 beta) below Tc."""
    nu: float = 0.63
    """Correlation-length exponent: xi ∝ |1 - T/Tc|^(-nu), capped."""
    gamma: float = 1.24
    """Susceptibility exponent: chi ∝ |1 - T/Tc|^(-gamma), capped."""
    critical_cutoff: float = 0.05
    """Reduced temperature |1 - T/Tc| below which chi and xi stop growing (the cap)."""

    bragg_amplitude: float = 28000.0
    """Bragg peak height (counts) at T = 0 before the Debye-Waller factor."""
    bragg_sigma: float = 0.7
    """Gaussian width of Bragg peaks (px)."""
    debye_waller: float = 3.75e-4
    """Bragg intensity ∝ exp(-debye_waller * T) (1/K); ~10 % drop over 20-300 K."""

    cdw_amplitude: float = 3000.0
    """CDW peak height (counts) at T = 0."""
    cdw_sigma: float = 1.0
    """Gaussian width of CDW peaks (px)."""
    cdw_wavevector: tuple[float, float, float] = (0.5, 0.5, 0.0)
    """q_CDW as (H, K, L) in r.l.u.; CDW peaks sit at integer HKL + q_CDW.
    (1/2, 1/2, 0) puts them 8*sqrt(2) px from the nearest Bragg peak."""
    cdw_arms: int = 1
    """Number of CDW domains (1..3): arm j has the wavevector with its (H, K, L)
    components cyclically shifted j times, as the symmetry-equivalent domains
    of a multi-q CDW; every arm has the same order parameter and halo."""

    halo_amplitude: float = 300.0
    """Critical diffuse peak height (counts) at Tc (the capped susceptibility)."""
    halo_width: float = 1.5
    """Lorentzian half width 1/xi at Tc (px); it grows as |1 - T/Tc|^nu away from Tc."""
    halo_radius: float = 3.6
    """The halo is truncated to 0 beyond this distance (px) from its CDW site.
    A Lorentzian falls off only as 1/dq^2: untruncated (or with any smooth
    envelope) it leaves shells of "background" voxels with a weak Tc bump, and
    the ground truth would have no clean halo/background boundary. Choose a
    radius between lattice shells (3.6 px: shells up to dq^2 = 12 px^2)."""

    background_level: float = 10.0
    """Mean background (counts) at t_min."""
    background_modulation: float = 0.2
    """Relative amplitude of the smooth background variation in q."""
    background_slope: float = 0.15
    """Relative background increase from t_min to t_max (thermal diffuse scattering)."""

    exposure: float = 1.0
    """Counting time relative to the default: every mean count is multiplied by
    it before the Poisson draw, so 0.3 is 3x noisier (relative) than 1."""
    monitor_jitter: float = 0.0
    """Relative standard deviation of the incident-beam monitor between
    temperatures: temperature i's whole volume is scaled by a factor drawn
    from a normal distribution of mean 1 and this width (clipped at 0.5),
    the same for every block (drawn from ``monitor_seed``)."""
    monitor_seed: int = 0
    """Seed of the monitor factors (independent of the noise seed, block-independent)."""

    gap_period: int = 30
    """Detector gap every gap_period voxels along the last axis (0 disables gaps)."""
    gap_width: int = 2
    """Gap thickness (voxels): indices i with i % gap_period >= gap_period - gap_width."""

    truth_contrast: float = 2.0
    """A voxel gets a peak class only where that component exceeds truth_contrast
    times the background (see :func:`truth_block`)."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(
                    f"SeriesModel.{name} must be {allowed}; got {getattr(self, name)!r}"
                )

        need(int(self.pixels_per_zone) == self.pixels_per_zone and self.pixels_per_zone >= 2,
             "pixels_per_zone", "an integer >= 2")
        need(math.isfinite(self.t_min) and self.t_min >= 0, "t_min", "a finite number >= 0")
        need(math.isfinite(self.t_max) and self.t_max > self.t_min, "t_max", "> t_min")
        need(self.tc > 0, "tc", "> 0")
        for name in ("beta", "nu", "gamma", "critical_cutoff", "bragg_sigma", "cdw_sigma",
                     "halo_width", "halo_radius", "truth_contrast"):
            need(getattr(self, name) > 0, name, "> 0")
        for name in ("bragg_amplitude", "cdw_amplitude", "halo_amplitude", "debye_waller",
                     "background_modulation", "background_slope"):
            need(getattr(self, name) >= 0, name, ">= 0")
        need(self.background_level > 0, "background_level", "> 0")
        need(self.background_modulation < 1, "background_modulation",
             "< 1 (the background must stay positive)")
        need(len(self.cdw_wavevector) == 3, "cdw_wavevector", "a (H, K, L) triple")
        need(int(self.cdw_arms) == self.cdw_arms and 1 <= self.cdw_arms <= 3, "cdw_arms",
             "an integer from 1 to 3")
        need(math.isfinite(self.exposure) and self.exposure > 0, "exposure", "a finite number > 0")
        need(math.isfinite(self.monitor_jitter) and 0 <= self.monitor_jitter < 0.5, "monitor_jitter",
             "a number in [0, 0.5)")
        need(int(self.gap_period) == self.gap_period and self.gap_period >= 0,
             "gap_period", "an integer >= 0 (0 disables gaps)")
        need(int(self.gap_width) == self.gap_width
             and (self.gap_period == 0 or 0 < self.gap_width < self.gap_period),
             "gap_width", "an integer with 0 < gap_width < gap_period")

    # -- temperature dependences (vectorised over T) ---------------------------

    def bragg_factor(self, t: np.ndarray) -> np.ndarray:
        """Bragg peak height vs T, (n,) -> (n,)."""
        return self.bragg_amplitude * np.exp(-self.debye_waller * np.asarray(t, np.float64))

    def cdw_factor(self, t: np.ndarray) -> np.ndarray:
        """CDW peak height vs T: amplitude (1 - T/Tc)^(2 beta), 0 above Tc; (n,) -> (n,)."""
        reduced = np.clip(1.0 - np.asarray(t, np.float64) / self.tc, 0.0, None)
        return self.cdw_amplitude * reduced ** (2.0 * self.beta)

    def _scaled_distance(self, t: np.ndarray) -> np.ndarray:
        # |1 - T/Tc| in units of the cutoff, floored at 1: the cap keeps chi and
        # xi finite at Tc and makes both flat within the cutoff.
        reduced = np.abs(1.0 - np.asarray(t, np.float64) / self.tc)
        return np.maximum(reduced, self.critical_cutoff) / self.critical_cutoff

    def halo_susceptibility(self, t: np.ndarray) -> np.ndarray:
        """Peak halo intensity chi(T) (counts), maximal (= halo_amplitude) at Tc; (n,) -> (n,)."""
        return self.halo_amplitude * self._scaled_distance(t) ** (-self.gamma)

    def halo_halfwidth(self, t: np.ndarray) -> np.ndarray:
        """Lorentzian half width 1/xi(T) (px), minimal (= halo_width) at Tc; (n,) -> (n,)."""
        return self.halo_width * self._scaled_distance(t) ** self.nu

    def monitor_factors(self, n: int) -> np.ndarray:
        """Incident-beam factor of each of ``n`` temperatures (all 1 without jitter); (n,) float64."""
        if self.monitor_jitter == 0:
            return np.ones(int(n))
        rng = np.random.default_rng(np.random.SeedSequence(int(self.monitor_seed), spawn_key=(0x4D4F4E,)))
        return np.clip(1.0 + self.monitor_jitter * rng.standard_normal(int(n)), 0.5, 1.5)

    def cdw_arm_wavevectors(self) -> list[tuple[float, float, float]]:
        """The (H, K, L) wavevector of every CDW arm (cyclic shifts of ``cdw_wavevector``)."""
        h, k, l = self.cdw_wavevector
        shifts = [(h, k, l), (l, h, k), (k, l, h)]
        arms: list[tuple[float, float, float]] = []
        for q in shifts[: int(self.cdw_arms)]:
            if q not in arms:
                arms.append(q)
        return arms

    def background_factor(self, t: np.ndarray) -> np.ndarray:
        """Temperature factor of the background (1 at t_min); (n,) -> (n,)."""
        frac = (np.asarray(t, np.float64) - self.t_min) / (self.t_max - self.t_min)
        return 1.0 + self.background_slope * frac


def temperatures(n: int, model: SeriesModel = SeriesModel()) -> np.ndarray:
    """Evenly spaced temperatures from ``model.t_min`` to ``model.t_max``.

    Returns
    -------
    ndarray of shape (n,), float64, strictly increasing.
    """
    if isinstance(n, bool) or int(n) != n or n < 2:
        raise ValueError(f"n (number of temperatures) must be an integer >= 2; got {n!r}")
    return np.linspace(model.t_min, model.t_max, int(n), dtype=np.float64)


def dims_for(n_spatial: int) -> tuple[str, ...]:
    """Axis names of an intensity array: ("T", "L", "K", "H") or ("T", "K", "H")."""
    if n_spatial not in (2, 3):
        raise ValueError(f"number of spatial dims must be 2 or 3; got {n_spatial}")
    return ("T", "L", "K", "H") if n_spatial == 3 else ("T", "K", "H")


# -- spatial building blocks -------------------------------------------------


def _normalize_region(region, spatial_shape) -> tuple[tuple[int, int], ...]:
    """(start, stop) per spatial axis from a tuple of unit-step slices."""
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if len(spatial_shape) not in (2, 3):
        raise ValueError(
            f"spatial_shape must have 2 or 3 dims; got {spatial_shape!r}"
        )
    if region is None:
        region = tuple(slice(None) for _ in spatial_shape)
    region = tuple(region)
    if len(region) != len(spatial_shape):
        raise ValueError(
            f"region must hold one slice per spatial dim ({len(spatial_shape)}); got {region!r}"
        )
    bounds = []
    for sl, n in zip(region, spatial_shape):
        if not isinstance(sl, slice):
            raise ValueError(f"region entries must be slices; got {sl!r}")
        start, stop, step = sl.indices(n)
        if step != 1 or stop <= start:
            raise ValueError(
                f"region slices must be non-empty with step 1; got {sl!r} for size {n}"
            )
        bounds.append((start, stop))
    return tuple(bounds)


def _axis_offsets(wavevector, n_spatial: int) -> tuple[float, ...]:
    """CDW offset (r.l.u.) per array axis: q_CDW is (H, K, L), arrays are (L, K, H)."""
    h, k, l = wavevector
    return (l, k, h)[-n_spatial:]


def _comb(x: np.ndarray, offset: float, ppz: int, sigma: float) -> np.ndarray:
    """Sum of unit Gaussians at sites (n + offset) * ppz near the coordinates x; (m,) -> (m,)."""
    cut = _PEAK_CUTOFF_SIGMAS * sigma
    # Only sites within the cutoff of [x.min(), x.max()] contribute.
    n_lo = math.ceil((x[0] - cut) / ppz - offset)
    n_hi = math.floor((x[-1] + cut) / ppz - offset)
    if n_hi < n_lo:
        return np.zeros_like(x)
    sites = (np.arange(n_lo, n_hi + 1) + offset) * ppz
    d = x[:, None] - sites[None, :]
    return np.exp(-0.5 * (d / sigma) ** 2).sum(axis=1)


def _nearest_sq(x: np.ndarray, offset: float, ppz: int) -> np.ndarray:
    """Squared distance (px^2) to the nearest site (n + offset) * ppz, per axis; (m,) -> (m,)."""
    d = x - (np.round(x / ppz - offset) + offset) * ppz
    return d * d


def _outer(vectors: Sequence[np.ndarray], op) -> np.ndarray:
    """Combine 1-D per-axis vectors with op (multiply/add) into an (m1, m2[, m3]) float32 array."""
    n = len(vectors)
    out = None
    for axis, v in enumerate(vectors):
        shaped = np.asarray(v, np.float32).reshape([-1 if a == axis else 1 for a in range(n)])
        out = shaped if out is None else op(out, shaped)
    result = np.empty(tuple(len(v) for v in vectors), dtype=np.float32)
    result[...] = out  # materialise (op of all axes is already full-size for n >= 2)
    return result


class _Fields:
    """Temperature-independent spatial profiles of one region, each (*region_shape) float32."""

    def __init__(self, model: SeriesModel, bounds: tuple[tuple[int, int], ...]):
        ppz = int(model.pixels_per_zone)
        n_sp = len(bounds)
        coords = [np.arange(a, b, dtype=np.float64) for a, b in bounds]
        arms = [_axis_offsets(q, n_sp) for q in model.cdw_arm_wavevectors()]
        self.shape = tuple(b - a for a, b in bounds)
        # Peak lattices are rectangular, so the sum over sites of a separable
        # Gaussian is the product of per-axis combs: O(voxels), no site loop.
        self.bragg = _outer([_comb(x, 0.0, ppz, model.bragg_sigma) for x in coords], np.multiply)
        self.cdw = None
        self.d2 = None
        for offsets in arms:
            cdw = _outer(
                [_comb(x, off, ppz, model.cdw_sigma) for x, off in zip(coords, offsets)], np.multiply
            )
            # Halo: nearest CDW site only (over all arms). A Lorentzian summed over a
            # 3-D lattice diverges, and physically each halo is the tail of its own peak.
            d2 = _outer([_nearest_sq(x, off, ppz) for x, off in zip(coords, offsets)], np.add)
            if self.cdw is None:
                self.cdw, self.d2 = cdw, d2
            else:
                self.cdw += cdw
                np.minimum(self.d2, d2, out=self.d2)
        # Hard truncation of the halo at halo_radius (see SeriesModel.halo_radius).
        self.envelope = (self.d2 <= np.float32(model.halo_radius**2)).astype(np.float32)
        # Background: 1 + m * mean_i cos(2 pi q_i / P_i + phi_i), slow in q.
        periods, phases = _BG_PERIODS[-n_sp:], _BG_PHASES[-n_sp:]
        waves = [
            (model.background_modulation / n_sp) * np.cos(2 * np.pi * (x / ppz) / p + ph)
            for x, p, ph in zip(coords, periods, phases)
        ]
        self.background = _outer(waves, np.add)
        self.background += np.float32(1.0)
        self.background *= np.float32(model.background_level)
        # Gaps: planes along the last axis.
        if model.gap_period:
            last = np.arange(*bounds[-1])
            gap_1d = (last % model.gap_period) >= (model.gap_period - model.gap_width)
        else:
            gap_1d = np.zeros(self.shape[-1], bool)
        self.gap_1d = gap_1d  # (region_shape[-1],) bool


def _check_temps(temps) -> np.ndarray:
    temps = np.asarray(temps, dtype=np.float64)
    if temps.ndim != 1 or temps.size < 1 or not np.all(np.isfinite(temps)):
        raise ValueError(
            f"temps must be a 1-D array of finite temperatures; got shape {temps.shape}"
        )
    return temps


def components_block(model: SeriesModel, temps, region, spatial_shape) -> dict[str, np.ndarray]:
    """Noise-free intensity components of one region.

    Parameters
    ----------
    model : SeriesModel
    temps : array of shape (T,)
    region : tuple of slices into the spatial grid (None = whole grid)
    spatial_shape : tuple of 2 or 3 ints

    Returns
    -------
    dict with keys "background", "bragg", "cdw", "halo", each (T, *region_shape)
    float32, and "gap", (*region_shape) bool. The noise-free intensity is the sum
    of the four components with gap voxels set to 0 (this is what
    :func:`intensity_block` computes, in a fused, memory-lean way).
    """
    temps = _check_temps(temps)
    f = _Fields(model, _normalize_region(region, spatial_shape))
    col = (slice(None),) + (None,) * len(f.shape)
    f32 = lambda a: np.asarray(a, np.float32)[col]  # noqa: E731 - (T,) -> (T, 1, 1[, 1])
    w = f32(model.halo_halfwidth(temps))
    gap = np.broadcast_to(f.gap_1d, f.shape).copy()
    scale = model.exposure * model.monitor_factors(temps.size)
    return {
        "background": f32(scale * model.background_factor(temps)) * f.background,
        "bragg": f32(scale * model.bragg_factor(temps)) * f.bragg,
        "cdw": f32(scale * model.cdw_factor(temps)) * f.cdw,
        "halo": f32(scale * model.halo_susceptibility(temps)) * f.envelope / (1.0 + f.d2 / (w * w)),
        "gap": gap,
    }


def intensity_block(model: SeriesModel, temps, region, spatial_shape, rng=None) -> np.ndarray:
    """Intensity of one region of the grid.

    Parameters
    ----------
    model : SeriesModel
    temps : array of shape (T,)
    region : tuple of slices (unit step) into the spatial grid, one per spatial
        dim; None means the whole grid
    spatial_shape : tuple of 2 or 3 ints, the full spatial grid (K, H) or (L, K, H)
    rng : numpy.random.Generator or None
        Source of Poisson noise, drawn one temperature slice at a time in order
        T = 0, 1, ...; None gives the noise-free mean intensity.

    Returns
    -------
    ndarray of shape (T, *region_shape), float32. Gap voxels are exactly 0.
    """
    temps = _check_temps(temps)
    f = _Fields(model, _normalize_region(region, spatial_shape))
    bragg_t = model.bragg_factor(temps)
    cdw_t = model.cdw_factor(temps)
    chi_t = model.halo_susceptibility(temps)
    inv_w2_t = 1.0 / model.halo_halfwidth(temps) ** 2
    bg_t = model.background_factor(temps)
    # Counting time and the monitor scale every component of a temperature alike.
    scale_t = model.exposure * model.monitor_factors(temps.size)

    out = np.empty((temps.size,) + f.shape, dtype=np.float32)
    scratch = np.empty(f.shape, dtype=np.float32)
    # Fused per-temperature evaluation with in-place ufuncs: two block-sized
    # buffers instead of one (T, ...) temporary per component.
    for i in range(temps.size):
        lam = out[i]
        np.multiply(f.d2, np.float32(inv_w2_t[i]), out=lam)
        lam += np.float32(1.0)
        np.divide(f.envelope, lam, out=lam)
        lam *= np.float32(chi_t[i])
        np.multiply(f.background, np.float32(bg_t[i]), out=scratch)
        lam += scratch
        np.multiply(f.bragg, np.float32(bragg_t[i]), out=scratch)
        lam += scratch
        if cdw_t[i] > 0:
            np.multiply(f.cdw, np.float32(cdw_t[i]), out=scratch)
            lam += scratch
        if scale_t[i] != 1.0:
            lam *= np.float32(scale_t[i])
        if rng is not None:
            # Exact Poisson counts (int64), cast to float32 on assignment.
            lam[...] = rng.poisson(lam)
        lam[..., f.gap_1d] = 0.0
    return out


def truth_block(model: SeriesModel, region, spatial_shape) -> np.ndarray:
    """Ground-truth class code of every voxel of one region.

    Decided from the noise-free components, each class at its reference
    temperature (t_min for Bragg and CDW, Tc clipped into [t_min, t_max] for
    the halo), with c = ``model.truth_contrast``:

    - GAP: detector-gap voxels.
    - BRAGG: Bragg(t_min) > c * background(t_min), and Bragg(t_min) exceeds the
      sum of the other peak components at t_min and at Tc.
    - CDW: the same with the CDW component (its trajectory is then
      order-parameter-like even on the flanks where the halo overlaps).
    - HALO: halo(Tc) > c * background(Tc) + the other peaks at Tc, and not
      BRAGG or CDW.
    - BACKGROUND: the rest.

    With the default model every Bragg/CDW/halo voxel has a mean intensity well
    above every background voxel, and background voxels carry at most weak
    Bragg or CDW tails (the halo is truncated, see ``SeriesModel.halo_radius``).

    Parameters
    ----------
    model : SeriesModel
    region : tuple of slices into the spatial grid (None = whole grid)
    spatial_shape : tuple of 2 or 3 ints

    Returns
    -------
    ndarray of shape (*region_shape), int8 codes indexing CLASS_NAMES.
    """
    f = _Fields(model, _normalize_region(region, spatial_shape))
    t_ref = np.array([model.t_min, min(max(model.tc, model.t_min), model.t_max)])
    c = model.truth_contrast
    bg = [f.background * np.float32(v) for v in model.background_factor(t_ref)]
    bragg = [f.bragg * np.float32(v) for v in model.bragg_factor(t_ref)]
    cdw = [f.cdw * np.float32(v) for v in model.cdw_factor(t_ref)]
    chi, w = model.halo_susceptibility(t_ref), model.halo_halfwidth(t_ref)
    halo = [
        np.float32(chi[j]) * f.envelope / (1.0 + f.d2 / np.float32(w[j] ** 2)) for j in range(2)
    ]

    truth = np.full(f.shape, BACKGROUND, dtype=np.int8)
    # Assign in increasing precedence; later assignments win. A peak class
    # must beat the other peaks at both reference temperatures (so that on the
    # CDW flanks, where order and critical scattering overlap, the larger
    # component names the voxel) and be strong against the background.
    truth[halo[1] > c * bg[1] + bragg[1] + cdw[1]] = HALO
    others = np.maximum(bragg[0] + halo[0], bragg[1] + halo[1])
    truth[(cdw[0] > others) & (cdw[0] > c * bg[0])] = CDW
    others = np.maximum(cdw[0] + halo[0], cdw[1] + halo[1])
    truth[(bragg[0] > others) & (bragg[0] > c * bg[0])] = BRAGG
    truth[..., f.gap_1d] = GAP
    return truth


# -- whole volumes -----------------------------------------------------------


def _check_shape(shape) -> tuple[int, ...]:
    try:
        shape = tuple(shape)
        ok = all(not isinstance(s, bool) and int(s) == s for s in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok or len(shape) not in (3, 4):
        raise ValueError(
            "shape must be (T, K, H) or (T, L, K, H): 3 or 4 positive integers "
            f"(T plus 2 or 3 spatial dims), e.g. (24, 64, 64, 64); got {shape!r}"
        )
    shape = tuple(int(s) for s in shape)
    if shape[0] < 3:
        raise ValueError(f"shape[0] (number of temperatures T) must be >= 3; got {shape[0]}")
    if any(s < 1 for s in shape[1:]):
        raise ValueError(f"shape spatial dims must all be >= 1; got {shape[1:]}")
    return shape


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    return int(seed)


def _block_rng(seed: int, block_index: tuple[int, ...]) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(block_index)))


def make_volume(
    shape, *, model: SeriesModel = SeriesModel(), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate a whole volume in memory.

    Parameters
    ----------
    shape : (T, K, H) or (T, L, K, H)
    model : SeriesModel
    seed : int
        Noise is drawn from ``SeedSequence(seed, spawn_key=(0,) * n_spatial)``,
        i.e. the single block of a :func:`write_zarr` whose chunks cover the
        whole spatial grid; with smaller chunks the noise differs.

    Returns
    -------
    volume : ndarray of shape (T, *spatial), float32
    temperatures : ndarray of shape (T,), float64
    truth : ndarray of shape (*spatial), int8
    """
    shape = _check_shape(shape)
    seed = _check_seed(seed)
    if not isinstance(model, SeriesModel):
        raise TypeError(f"model must be a SeriesModel; got {type(model).__name__}")
    spatial = shape[1:]
    temps = temperatures(shape[0], model)
    rng = _block_rng(seed, (0,) * len(spatial))
    volume = intensity_block(model, temps, None, spatial, rng)
    return volume, temps, truth_block(model, None, spatial)


def _check_chunks(chunks, shape) -> tuple[int, ...]:
    spatial = shape[1:]
    if chunks is None:
        return (shape[0],) + tuple(min(64, s) for s in spatial)
    try:
        chunks = tuple(int(c) for c in chunks)
    except (TypeError, ValueError):
        chunks = None
    if chunks is not None and len(chunks) == len(spatial):
        chunks = (shape[0],) + chunks  # spatial-only chunks: full T
    if chunks is None or len(chunks) != len(shape) or any(c < 1 for c in chunks):
        raise ValueError(
            f"chunks must be None or {len(shape)} (or {len(spatial)} spatial) positive "
            f"integers for shape {shape}; got {chunks!r}"
        )
    return tuple(min(c, s) for c, s in zip(chunks, shape))


@dataclass(frozen=True)
class _Job:
    """Everything a (possibly separate) process needs to write one block; picklable."""

    path: str
    model: SeriesModel
    temps: np.ndarray
    spatial: tuple[int, ...]
    block_shape: tuple[int, ...]
    seed: int

    def region(self, block: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(
            slice(i * c, min((i + 1) * c, n))
            for i, c, n in zip(block, self.block_shape, self.spatial)
        )

    def write(self, arrays, block: tuple[int, ...]) -> None:
        """Generate block ``block`` (index in the spatial chunk grid) and store it."""
        intensity, truth = arrays
        region = self.region(block)
        rng = _block_rng(self.seed, block)
        intensity[(slice(None),) + region] = intensity_block(
            self.model, self.temps, region, self.spatial, rng
        )
        truth[region] = truth_block(self.model, region, self.spatial)
        logger.debug("wrote block %s", block)


_WORKER: dict = {}


def _worker_init(job: _Job) -> None:
    import zarr

    group = zarr.open_group(job.path, mode="r+", zarr_format=3)
    _WORKER["job"] = job
    _WORKER["arrays"] = (group["intensity"], group["truth"])


def _worker_write(block: tuple[int, ...]) -> tuple[int, ...]:
    _WORKER["job"].write(_WORKER["arrays"], block)
    return block


def write_zarr(
    path,
    shape,
    *,
    model: SeriesModel = SeriesModel(),
    seed: int = 0,
    chunks=None,
    overwrite: bool = False,
    progress: bool = False,
    workers: int | None = None,
):
    """Write a synthetic temperature series to a zarr v3 group, block by block.

    Parameters
    ----------
    path : str or os.PathLike
        Local directory of the group.
    shape : (T, K, H) or (T, L, K, H)
    model : SeriesModel
    seed : int
        Block ``b`` (index in the spatial chunk grid) draws its noise from
        ``SeedSequence(seed, spawn_key=b)``: reproducible, independent of the
        number of workers and of the write order, but dependent on the chunks.
    chunks : tuple of ints, optional
        Chunks of ``intensity``, (T, *spatial) or spatial only (full T). Default
        full T and at most 64 along every spatial axis. Each spatial chunk is one
        generation block (T x chunk voxels in memory per worker).
    overwrite : bool
        Replace an existing ``path``; otherwise FileExistsError.
    progress : bool
        Show a tqdm progress bar over blocks.
    workers : int, optional
        Worker processes generating and writing blocks concurrently (default:
        min(2, cpu count)); forked, so no ``__main__`` guard is needed. Volumes
        with fewer than ``4 * workers`` blocks, ``workers=1``, platforms
        without fork and daemonic callers write in the calling process. The
        output does not depend on ``workers``.

    Returns
    -------
    zarr.Group with arrays ``intensity`` (T, *spatial) float32 and ``truth``
    (*spatial) int8, and attrs ``signal``, ``temperatures``, ``dims``,
    ``class_names``, ``model``, ``seed``.
    """
    import zarr

    shape = _check_shape(shape)
    seed = _check_seed(seed)
    if not isinstance(model, SeriesModel):
        raise TypeError(f"model must be a SeriesModel; got {type(model).__name__}")
    chunks = _check_chunks(chunks, shape)
    path = Path(os.fspath(path))
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{str(path)!r} already exists; pass overwrite=True (--overwrite on the command line) "
            "to replace it"
        )
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    if isinstance(workers, bool) or int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be a positive integer; got {workers!r}")

    spatial, n_t = shape[1:], shape[0]
    temps = temperatures(n_t, model)
    dims = dims_for(len(spatial))
    t_list = [float(t) for t in temps]

    group = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=3)
    group.attrs.update(
        {
            "signal": "intensity",
            "temperatures": t_list,
            "dims": list(dims),
            "class_names": list(CLASS_NAMES),
            "model": dataclasses.asdict(model),
            "seed": int(seed),
            "generator": "xtec_flows.synthetic",
        }
    )
    intensity = group.create_array(
        "intensity", shape=shape, chunks=chunks, dtype="float32", fill_value=0.0,
        dimension_names=dims,
    )
    intensity.attrs.update({"temperatures": t_list, "dims": list(dims), "units": "counts"})
    truth = group.create_array(
        "truth", shape=spatial, chunks=chunks[1:], dtype="int8", fill_value=0,
        dimension_names=dims[1:],
    )
    truth.attrs.update({"class_names": list(CLASS_NAMES), "dims": list(dims[1:])})

    grid = [math.ceil(s / c) for s, c in zip(spatial, chunks[1:])]
    blocks = [tuple(int(i) for i in b) for b in np.ndindex(*grid)]
    job = _Job(str(path), model, temps, spatial, chunks[1:], int(seed))
    # Processes, not threads: NumPy's Poisson sampler holds the GIL and is
    # ~95 % of the run time. Small volumes are not worth starting processes,
    # and daemonic processes (e.g. pool workers) may not have children.
    use_pool = (
        workers > 1
        and len(blocks) >= 4 * workers
        and "fork" in multiprocessing.get_all_start_methods()
        and not multiprocessing.current_process().daemon
    )

    from tqdm.auto import tqdm

    logger.info(
        "writing synthetic series %s (%d blocks of %s, %s) to %s",
        shape, len(blocks), chunks,
        f"{workers} worker processes" if use_pool else "in process", path,
    )
    start = time.perf_counter()
    with tqdm(total=len(blocks), disable=not progress, desc="synthetic", unit="block") as bar:
        if not use_pool:
            arrays = (intensity, truth)
            for b in blocks:
                job.write(arrays, b)
                bar.update()
        else:
            # fork, not spawn/forkserver: those re-import the caller's __main__
            # in every worker, which re-runs any unguarded script (including,
            # e.g., an rmtree of the output) in the children. fork is safe here:
            # the workers only use numpy and zarr, zarr resets its IO loop after
            # fork, and the executor forks all workers before starting its own
            # thread. Each worker opens the arrays once and writes its blocks
            # itself, so no block data crosses process boundaries and at most
            # `workers` blocks are in memory at a time.
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_worker_init,
                initargs=(job,),
            )
            with pool:
                with warnings.catch_warnings():
                    # The workers are forked at the first submit. Python >= 3.12
                    # warns about fork() with live threads (zarr's IO loop, tqdm's
                    # monitor); see above for why that is safe here.
                    warnings.filterwarnings(
                        "ignore", message=".*use of fork\\(\\) may lead to deadlocks"
                    )
                    futures = [pool.submit(_worker_write, b) for b in blocks]
                try:
                    for fut in as_completed(futures):
                        fut.result()
                        bar.update()
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    logger.info("wrote %s in %.1f s", path, time.perf_counter() - start)
    return group
