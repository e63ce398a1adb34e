"""NeXus/HDF5 backend: open a temperature series stored in an HDF5 file.

Inputs are written ``file.nxs:/entry/data/data``. Temperatures are looked up,
in order, in: the dataset's ``temperatures`` attribute; the NXdata group's
first axis (``@axes``) if it has one value per slice; a sibling dataset named
``temperature(s)``; the entry's ``sample/temperature``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

HDF5_SUFFIXES = (".nxs", ".h5", ".hdf5", ".hdf", ".nx5", ".cxi")


def split_hdf5_spec(spec: str) -> tuple[str, str] | None:
    """``'file.nxs:/entry/data/data'`` -> ``('file.nxs', '/entry/data/data')``; None if not HDF5."""
    if ":" in spec:
        path, inner = spec.rsplit(":", 1)
        if Path(path).suffix.lower() in HDF5_SUFFIXES or (Path(path).is_file() and _is_hdf5(path)):
            return path, inner or "/"
    if Path(spec).suffix.lower() in HDF5_SUFFIXES:
        return spec, ""
    return None


def _is_hdf5(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def _find_default_signal(f):
    """Follow NeXus @default / @signal attributes to the plottable dataset."""
    import h5py

    node = f
    for _ in range(4):
        if isinstance(node, h5py.Dataset):
            return node
        signal = node.attrs.get("signal")
        if signal is not None:
            signal = signal.decode() if isinstance(signal, bytes) else str(signal)
            if signal in node:
                return node[signal]
        default = node.attrs.get("default")
        if default is None:
            # No @default: descend into the only NXentry/NXdata child, if unambiguous.
            groups = [k for k, v in node.items() if isinstance(v, h5py.Group)]
            if len(groups) != 1:
                break
            default = groups[0]
        default = default.decode() if isinstance(default, bytes) else str(default)
        if default not in node:
            break
        node = node[default]
    return None


def open_volume(path: str | os.PathLike, inner: str = ""):
    """Open an HDF5 dataset lazily.

    Returns
    -------
    dataset : h5py.Dataset of shape (T, *spatial) (the file stays open)
    temperatures : ndarray of shape (T,) or None
    """
    import h5py

    path = str(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"input file {path!r} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"input {path!r} is not a readable HDF5/NeXus file: {exc}") from exc
    if inner in ("", "/"):
        ds = _find_default_signal(f)
        if ds is None:
            raise ValueError(
                f"{path!r}: no dataset path given and no NeXus default signal found; "
                f"write it as {path}:/entry/data/data"
            )
    else:
        if inner not in f:
            raise ValueError(f"{path!r} has no dataset {inner!r}; check the path inside the file (h5ls -r {path})")
        ds = f[inner]
        if not isinstance(ds, h5py.Dataset):
            sig = _find_default_signal(ds)
            if sig is None:
                raise ValueError(f"{path}:{inner} is a group, not a dataset; give the dataset path")
            ds = sig
    return ds, _temperatures_near(ds)


def _temperatures_near(ds) -> np.ndarray | None:
    n = ds.shape[0] if ds.ndim else 0
    t = ds.attrs.get("temperatures")
    if t is not None:
        return np.asarray(t, dtype=np.float64)
    parent = ds.parent
    axes = parent.attrs.get("axes")
    if axes is not None:
        axes = [a.decode() if isinstance(a, bytes) else str(a) for a in np.atleast_1d(axes)]
        if axes and axes[0] in parent and parent[axes[0]].shape == (n,):
            return np.asarray(parent[axes[0]][...], dtype=np.float64)
    for name in ("temperatures", "temperature", "T"):
        if name in parent and parent[name].shape == (n,):
            return np.asarray(parent[name][...], dtype=np.float64)
    root = ds.file
    for candidate in ("entry/sample/temperature", "entry/sample/temperatures"):
        if candidate in root and root[candidate].shape == (n,):
            return np.asarray(root[candidate][...], dtype=np.float64)
    return None


def write_series(path: str | os.PathLike, volume: np.ndarray, temperatures: np.ndarray, chunks=None) -> str:
    """Write a (T, *spatial) series as a NeXus NXdata group (for tests and examples).

    Returns the input spec ``'path:/entry/data/data'``.
    """
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["default"] = "entry"
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "data"
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "data"
        data.attrs["axes"] = ["temperature"] + ["."] * (volume.ndim - 1)
        data.create_dataset("data", data=volume, chunks=chunks)
        data.create_dataset("temperature", data=np.asarray(temperatures, dtype=np.float64))
    return f"{path}:/entry/data/data"


class StackedVolumes:
    """One 3-D volume per temperature, each in its own HDF5 dataset, seen as (T, *spatial).

    Only slicing with an integer or a slice on the first axis and slices on the
    others is supported (what chunked readers need); datasets are opened on
    demand and closed after each read.
    """

    def __init__(self, members: list[tuple[str, str]]):
        import h5py

        if not members:
            raise ValueError("no volumes to stack")
        self.members = members
        shapes, dtypes = set(), set()
        for path, inner in members:
            with h5py.File(path, "r") as f:
                ds = f[inner]
                shapes.add(ds.shape)
                dtypes.add(ds.dtype)
        if len(shapes) != 1:
            raise ValueError(
                f"the volumes to stack differ in shape ({sorted(shapes)}); every temperature needs the same grid"
            )
        (spatial,) = shapes
        if len(spatial) not in (2, 3):
            raise ValueError(f"each volume must be 2-D or 3-D; got shape {spatial}")
        self.shape = (len(members),) + tuple(spatial)
        self.dtype = np.result_type(*dtypes)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        import h5py

        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        idx = range(self.shape[0])[first]
        single = isinstance(idx, int)
        out = []
        for i in [idx] if single else idx:
            path, inner = self.members[i]
            with h5py.File(path, "r") as f:
                out.append(np.asarray(f[inner][rest] if rest else f[inner][...], dtype=self.dtype))
        return out[0] if single else np.stack(out)


def _entry_temperature(f, inner: str) -> float | None:
    """The temperature of the entry holding dataset ``inner`` (sample/temperature, scalar)."""
    parts = [p for p in inner.split("/") if p]
    if not parts:
        return None
    entry = f[parts[0]]
    for candidate in ("sample/temperature", "sample/temperature_setpoint", "instrument/temperature"):
        if candidate in entry:
            v = np.asarray(entry[candidate][...]).ravel()
            if v.size:
                return float(v.mean())
    t = f[inner].attrs.get("temperature")
    return float(t) if t is not None else None


def open_series(specs: list[str], temperatures=None):
    """A temperature series from NeXus/HDF5 inputs.

    ``specs`` is one 4-D (or 3-D for 2 spatial dims) dataset (``file.nxs:/entry/data/data``), or
    several 3-D volumes, one per temperature: ``file:/path`` specs, plain files
    (their NeXus default signal), or one file whose entries each hold a volume
    (as nxrefine writes them; every NXentry with a default signal is used).

    Returns
    -------
    volume : h5py.Dataset or StackedVolumes of shape (T, *spatial)
    temperatures : ndarray (T,) or None
    sources : list of str, the datasets read
    """
    import h5py

    if len(specs) == 1:
        path, inner = split_hdf5_spec(specs[0]) or (specs[0], "")
        if not Path(path).exists():
            raise FileNotFoundError(f"input file {path!r} does not exist")
        members = _entries_with_volumes(path) if inner in ("", "/") else []
        if len(members) <= 1:
            ds, temps = open_volume(path, inner)
            return ds, (temperatures if temperatures is not None else temps), [f"{path}:{ds.name}"]
    else:
        members = []
        for spec in specs:
            path, inner = split_hdf5_spec(spec) or (spec, "")
            ds, _ = open_volume(path, inner)
            members.append((path, ds.name))
            ds.file.close()
    stacked = StackedVolumes(members)
    if temperatures is None:
        found = []
        for path, inner in members:
            with h5py.File(path, "r") as f:
                found.append(_entry_temperature(f, inner))
        missing = [f"{p}:{i}" for (p, i), t in zip(members, found) if t is None]
        if missing:
            raise ValueError(
                f"no temperature found for {missing[:3]}{'...' if len(missing) > 3 else ''} "
                "(looked for <entry>/sample/temperature); pass --temperatures"
            )
        temperatures = np.asarray(found)
        order = np.argsort(temperatures, kind="stable")
        if np.any(order != np.arange(order.size)):
            # Files named or listed out of order: sort the stack by temperature.
            members = [members[i] for i in order]
            stacked = StackedVolumes(members)
            temperatures = temperatures[order]
    return stacked, np.asarray(temperatures, dtype=np.float64), [f"{p}:{i}" for p, i in members]


def _entries_with_volumes(path: str) -> list[tuple[str, str]]:
    import h5py

    members = []
    with h5py.File(path, "r") as f:
        for name, node in f.items():
            if isinstance(node, h5py.Group):
                ds = _find_default_signal(node)
                if ds is None and "data" in node and isinstance(node["data"], h5py.Group):
                    ds = _find_default_signal(node["data"])
                if ds is not None and ds.ndim in (2, 3):
                    members.append((path, ds.name))
    return members
