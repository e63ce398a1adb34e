"""zarr backend: open input volumes, create label arrays.

Only this module (and the other ``xtec_flows.io`` modules) touches storage.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import zarr

log = logging.getLogger(__name__)

# Marker attribute: an output directory or array we wrote may be overwritten with
# --overwrite; anything else at the path is refused even then.
PRODUCER_KEY = "xtec_flows"


def open_volume(path: str | os.PathLike) -> tuple[zarr.Array, np.ndarray | None, zarr.Group | None]:
    """Open a temperature series stored in zarr.

    ``path`` may be a zarr array, or a zarr group whose ``signal`` attribute
    (NeXus convention) names the array, or a group holding exactly one array of
    3 or more dimensions. ``path/name`` inside a group also works (zarr paths).

    Returns
    -------
    array : zarr.Array of shape (T, *spatial)
    temperatures : ndarray of shape (T,) or None
        From the array's or the group's ``temperatures`` attribute, or a
        ``temperatures``/``temperature`` array in the group.
    group : the enclosing group or None
    """
    path = str(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"input {path!r} does not exist; give a zarr array or group path")
    try:
        node = zarr.open(path, mode="r")
    except Exception as exc:  # zarr raises several types for "not zarr"
        raise ValueError(f"input {path!r} is not a readable zarr array or group: {exc}") from exc
    group = None
    if isinstance(node, zarr.Group):
        group = node
        signal = group.attrs.get("signal")
        if signal is not None:
            if signal not in group:
                raise ValueError(f"zarr group {path!r} names signal {signal!r}, but it holds no such array")
            node = group[signal]
        else:
            candidates = [name for name, a in group.arrays() if a.ndim >= 3]
            if len(candidates) != 1:
                raise ValueError(
                    f"zarr group {path!r} holds {len(candidates)} arrays of 3+ dims ({candidates}); "
                    "set the group's 'signal' attribute or give the array path, e.g. "
                    f"{path}/<name>"
                )
            node = group[candidates[0]]
    temps = node.attrs.get("temperatures")
    if temps is None and group is not None:
        temps = group.attrs.get("temperatures")
        for name in ("temperatures", "temperature"):
            if temps is None and name in group:
                temps = group[name][...]
    return node, (None if temps is None else np.asarray(temps, dtype=np.float64)), group


def is_ours(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory holding an xtec-flows output (safe to overwrite)."""
    p = Path(path)
    for marker in ("result.json", "bic.json", "labels.zarr/zarr.json", "zarr.json"):
        m = p / marker
        if m.exists():
            try:
                import json

                doc = json.loads(m.read_text())
            except (OSError, ValueError):
                continue
            if doc.get(PRODUCER_KEY) or doc.get("attributes", {}).get(PRODUCER_KEY):
                return True
    return False


def prepare_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Make sure ``path`` can receive results; never deletes foreign data.

    An empty or missing directory is fine. A directory with an earlier
    xtec-flows result is replaced only with ``overwrite``. Any other content is
    refused, with or without ``overwrite``.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"output {str(p)!r} exists and is not a directory; choose another -o/--output")
    if p.exists() and any(p.iterdir()):
        if not is_ours(p):
            raise FileExistsError(
                f"output directory {str(p)!r} already holds other data (not an xtec-flows result); "
                "choose an empty or new directory"
            )
        if not overwrite:
            raise FileExistsError(
                f"output directory {str(p)!r} already holds an xtec-flows result; "
                "pass --overwrite (overwrite=True) to replace it"
            )
    return p


def create_labels(store, shape: tuple, chunks: tuple, attrs: dict | None = None) -> zarr.Array:
    """An int8 label array filled with -1 (= not clustered), zarr v3."""
    arr = zarr.create_array(
        store=store,
        shape=shape,
        chunks=chunks,
        dtype="int8",
        fill_value=-1,
        zarr_format=3,
        overwrite=True,
        dimension_names=None,
    )
    if attrs:
        arr.attrs.update(attrs)
    return arr


def scratch_array(store, name: str, shape: tuple, chunks: tuple, dtype) -> zarr.Array:
    """A temporary intermediate array (statistics, provisional labels)."""
    # Uncompressed: scratch is written once and read a few times, and the
    # statistic (float noise) hardly compresses; zstd only cost time.
    return zarr.create_array(
        store=store, name=name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, overwrite=True,
        compressors=None,
    )


def check_labels_target(store, overwrite: bool) -> None:
    """Refuse a labels destination that holds data we did not write.

    ``store`` may be a path or a zarr store. A path that exists must be empty
    or an earlier xtec-flows label array (then ``overwrite`` is required).
    Called before any computation, so a refused run writes nothing.
    """
    if not isinstance(store, (str, os.PathLike)):
        return
    p = Path(store)
    if not p.exists():
        return
    if p.is_dir() and not any(p.iterdir()):
        return
    if not is_ours(p):
        raise FileExistsError(
            f"labels_store {str(p)!r} already holds other data (not an xtec-flows label array); "
            "give a new or empty path"
        )
    if not overwrite:
        raise FileExistsError(
            f"labels_store {str(p)!r} holds an earlier xtec-flows label array; pass overwrite=True to replace it"
        )
