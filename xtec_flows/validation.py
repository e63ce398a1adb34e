"""Validation at the boundary: every check names the input, the allowed values,
what was received and the remedy. Called once, before anything is computed or
written."""

from __future__ import annotations

import numbers

import numpy as np

MODES = ("d", "s", "peaks")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}")


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a number > 0; got {value!r}")
    return float(value)


def check_volume(volume) -> tuple:
    """Shape and dtype of a (T, *spatial) volume; returns the shape."""
    shape = getattr(volume, "shape", None)
    dtype = getattr(volume, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(
            f"volume must be a numpy, zarr or dask array shaped (T, *spatial); got {type(volume).__name__}"
        )
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf":
        raise TypeError(
            f"volume must hold real numbers (integer or float intensities); got dtype {dtype}. "
            "Convert counts to float32 before clustering"
        )
    if len(shape) not in (2, 3, 4):
        raise ValueError(
            f"volume must be shaped (T, *spatial) with 1, 2 or 3 spatial dims (a series of 1-D patterns, "
            f"2-D images or 3-D volumes), i.e. 2 to 4 dims in all; got shape {tuple(shape)} "
            f"({len(shape) - 1} spatial dims). Slice or stack the data accordingly"
        )
    if shape[0] < 3:
        raise ValueError(
            f"volume has {shape[0]} temperatures (axis 0 of shape {tuple(shape)}); XTEC needs at least 3. "
            "Is the temperature axis first?"
        )
    if any(s < 1 for s in shape[1:]):
        raise ValueError(f"volume has an empty spatial axis: shape {tuple(shape)}")
    return tuple(int(s) for s in shape)


ORDERINGS = ("monotonic", "as-given")
"""How the series coordinate (axis 0's values) may run: "monotonic" (a temperature series,
strictly increasing or decreasing) or "as-given" (any finite values in measurement order, e.g.
time, field, or a temperature ramp followed by a hold, as the user states it)."""


def check_temperatures(temperatures, n_temperatures: int, ordering: str = "monotonic") -> np.ndarray:
    """1-D, finite, one per volume slice; strictly monotonic (heating or cooling) unless
    ``ordering="as-given"``."""
    check_choice("ordering", ordering, ORDERINGS)
    if temperatures is None:
        raise ValueError(
            "temperatures are required: pass one value per slice of axis 0 "
            "(CLI: --temperatures 10,20,...), or store them in the input's 'temperatures' attribute"
        )
    try:
        t = np.asarray(temperatures, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"temperatures must be numbers; got {temperatures!r}") from exc
    if t.ndim != 1:
        raise ValueError(f"temperatures must be 1-D; got shape {t.shape}")
    if t.size != n_temperatures:
        raise ValueError(
            f"temperatures has {t.size} values but the volume has {n_temperatures} temperature slices "
            "(axis 0); give exactly one temperature per slice"
        )
    if t.size < 3:
        raise ValueError(f"need at least 3 temperatures; got {t.size}")
    if not np.isfinite(t).all():
        raise ValueError(f"temperatures must be finite; got {t.tolist()}")
    if ordering == "as-given":
        return t
    d = np.diff(t)
    if np.any(d == 0):
        dup = t[1:][d == 0]
        raise ValueError(
            f"temperatures contain duplicates ({dup.tolist()}); each slice must be a distinct temperature. "
            "Average or drop repeated scans first, or, if the series is ordered by something else (time, "
            "a ramp then a hold), say so with ordering='as-given' (CLI: --ordering as-given)"
        )
    if not (np.all(d > 0) or np.all(d < 0)):
        raise ValueError(
            f"temperatures must be strictly increasing or strictly decreasing; got {t.tolist()}. "
            "Sort the volume's slices by temperature, or, if the series is ordered by something else (time, "
            "field, a ramp then a hold), say so with ordering='as-given' (CLI: --ordering as-given)"
        )
    return t
