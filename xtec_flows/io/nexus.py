"""NeXus/HDF5 backend: open a temperature series stored in an HDF5 file.

Inputs are written ``file.nxs:/entry/data/data``. Temperatures are looked up,
in order, in: the dataset's ``temperatures`` attribute; the NXdata group's
first axis (``@axes``) if it has one value per slice; a sibling dataset named
``temperature(s)``; the entry's ``sample/temperature``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..series_check import SeriesAudit

log = logging.getLogger(__name__)

HDF5_SUFFIXES = (".nxs", ".h5", ".hdf5", ".hdf", ".nx5", ".cxi")


def open_hdf5(path: str):
    """Open an HDF5/NeXus file read-only, with errors that name the input."""
    import h5py

    if not Path(path).exists():
        raise FileNotFoundError(f"input file {path!r} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"input {path!r} is not a readable HDF5/NeXus file: {exc}") from exc


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
    dataset : h5py.Dataset of shape (T, *spatial) (the file stays open), or a HarmonisedVolume
        when the NXdata axes name Q axes (see :func:`harmonise`)
    temperatures : ndarray of shape (T,) or None
    """
    import h5py

    path = str(path)
    f = open_hdf5(path)
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
    return harmonise(ds)


def harmonise(ds):
    """(volume, temperatures) of a whole series in one dataset, in the project's (T, L, K, H) order.

    When the NXdata ``@axes`` name the Q axes (``Te,Ql,Qk,Qh`` as in the XTEC tutorial, or the
    legacy ``H,K,L`` order, with the temperature axis anywhere), the dataset is wrapped in a
    lazy :class:`HarmonisedVolume` that records the dims and axis coordinates; otherwise it
    is returned as is (axis 0 is temperature).
    """
    axes = ds.parent.attrs.get("axes") if ds.ndim >= 3 else None
    names = [_text(a) for a in np.atleast_1d(axes)] if axes is not None else []
    if len(names) != ds.ndim:
        return ds, _temperatures_near(ds)
    t_axes = [j for j, n in enumerate(names) if n.lower() in TEMPERATURE_AXES]
    t_axis = t_axes[0] if t_axes else 0
    others = [j for j in range(ds.ndim) if j != t_axis]
    perm, dims = spatial_order([names[j] for j in others])
    if dims is None:
        return ds, _temperatures_near(ds)
    full = (t_axis,) + tuple(others[p] for p in perm)
    group = ds.parent
    temps = ds.attrs.get("temperatures")
    if temps is None and names[t_axis] in group and group[names[t_axis]].shape == (ds.shape[t_axis],):
        temps = group[names[t_axis]][...]
    coords = {}
    for j, d in zip(full[1:], dims):
        if names[j] in group and group[names[j]].shape[:1] in ((ds.shape[j],), (ds.shape[j] + 1,)):
            coords[d] = np.asarray(group[names[j]][...], dtype=np.float64)
    volume = HarmonisedVolume([ds], [full], stacked=False, dims=("T",) + dims, coords=coords, files=[ds.file])
    if temps is None and t_axis == 0:
        temps = _temperatures_near(ds)
    return volume, (None if temps is None else np.asarray(temps, dtype=np.float64))


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


def open_series(specs: list[str], temperatures=None, on_problem: str = "exclude"):
    """A temperature series from NeXus/HDF5 inputs.

    ``specs`` is one 4-D (or 3-D for 2 spatial dims) dataset (``file.nxs:/entry/data/data``), or
    several 3-D volumes, one per temperature: ``file:/path`` specs or plain files (nxrefine
    wrappers, see :func:`open_per_temperature`, which sorts them and runs the series check with
    ``on_problem``), or one file whose entries each hold a volume (every NXentry with a
    default signal is used).

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
            name = ds.members[0].name if isinstance(ds, HarmonisedVolume) else ds.name
            return ds, (temperatures if temperatures is not None else temps), [f"{path}:{name}"]
    else:
        series = open_per_temperature(specs, temperatures, on_problem)
        return series.volume, series.temperatures, series.sources
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


# ---------------------------------------------------------------------------------------
# nxrefine / CHESS QM2 series: one wrapper file per temperature, external links, units, axis order
# ---------------------------------------------------------------------------------------

# Spatial axis names as nxrefine (Ql, Qk, Qh) and older files (H, K, L) write them, mapped to the
# project's order (L, K, H): the volume is (T, L, K, H) whatever order the file stores.
AXIS_ALIASES = {"ql": "L", "l": "L", "qk": "K", "k": "K", "qh": "H", "h": "H"}
CANONICAL_SPATIAL = ("L", "K", "H")
TEMPERATURE_AXES = ("te", "t", "temperature", "temperatures")
# NXdata groups holding the transformed volume of an nxrefine wrapper file, in order of preference.
TRANSFORM_GROUPS = ("masked_transform", "transform")
# Where nxrefine/QM2 files keep the per-scan count time and monitor (looked up in every entry).
EXPOSURE_PATHS = ("instrument/detector/frame_time", "instrument/detector/count_time",
                  "instrument/detector/exposure_time")
MONITOR_PATHS = ("monitor/preset", "monitor1/preset", "monitor/integral", "monitor1/integral")
# Temperature units -> (scale, offset) to kelvin, and the name each is recorded under.
_UNITS = {"k": ("K", 1.0, 0.0), "kelvin": ("K", 1.0, 0.0),
          "c": ("C", 1.0, 273.15), "°c": ("C", 1.0, 273.15), "degc": ("C", 1.0, 273.15),
          "celsius": ("C", 1.0, 273.15), "deg c": ("C", 1.0, 273.15), "℃": ("C", 1.0, 273.15),
          "mk": ("mK", 1e-3, 0.0), "millikelvin": ("mK", 1e-3, 0.0)}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def temperature_unit(units) -> tuple[str, float, float]:
    """``'degC'`` -> ``('C', 1.0, 273.15)``: the unit's name and the (scale, offset) to kelvin.

    No units means kelvin (what nxrefine writes when it writes none).
    """
    if units is None:
        return _UNITS["k"]
    key = _text(units).strip().lower()
    if key not in _UNITS:
        raise ValueError(f"unknown temperature units {_text(units)!r}; expected one of K, C (°C, degC) or mK")
    return _UNITS[key]


def convert_temperature(value: float, units, to: str) -> float:
    """``value`` in ``units`` expressed in ``to`` ('K', 'C' or 'mK')."""
    _, scale, offset = temperature_unit(units)
    kelvin = value * scale + offset
    _, to_scale, to_offset = temperature_unit(to)
    return (kelvin - to_offset) / to_scale


def spatial_order(names) -> tuple[tuple, tuple | None]:
    """The permutation putting a volume's stored spatial axes in (L, K, H) order.

    ``names`` are the NXdata ``@axes`` of the spatial axes as stored. Returns ``(perm, dims)`` with
    ``stored.transpose(perm)`` in the project's order; names that are not Q axes leave the order
    alone (``dims`` None).

    >>> spatial_order(["H", "K", "L"])
    ((2, 1, 0), ('L', 'K', 'H'))
    >>> spatial_order(["Ql", "Qk", "Qh"])
    ((0, 1, 2), ('L', 'K', 'H'))
    """
    names = [str(n) for n in names]
    canon = [AXIS_ALIASES.get(n.lower()) for n in names]
    wanted = CANONICAL_SPATIAL[-len(names):] if 0 < len(names) <= 3 else None
    if wanted is None or None in canon or sorted(canon) != sorted(wanted):
        return tuple(range(len(names))), None
    return tuple(canon.index(a) for a in wanted), tuple(wanted)


class HarmonisedVolume:
    """A (T, *spatial) view, in the project's axis order, of one 4-D dataset or of one 3-D
    dataset per temperature, read lazily block by block.

    ``members`` are open h5py datasets (their files stay open until :meth:`close`);
    ``perms[i]`` puts member i's stored axes in the project's order. With ``stacked`` False
    there is one member, a whole series whose permutation covers axis 0 too.
    ``dims`` (e.g. ``('T', 'L', 'K', 'H')``) and ``coords`` (axis name -> 1-D array, in the
    project's order) describe the grid when the file does.
    """

    def __init__(self, members, perms, *, stacked=True, dims=None, coords=None, files=()):
        if not members:
            raise ValueError("no volumes to stack")
        self.members, self.perms, self.stacked = list(members), [tuple(p) for p in perms], stacked
        self.files = list(files)
        shapes = {tuple(ds.shape[j] for j in p) for ds, p in zip(self.members, self.perms)}
        if len(shapes) != 1:
            raise ValueError(f"the volumes to stack differ in shape ({sorted(shapes)}); every temperature needs "
                             "the same grid")
        (shape,) = shapes
        self.shape = ((len(self.members),) + shape) if stacked else shape
        self.dtype = np.result_type(*[ds.dtype for ds in self.members])
        self.ndim = len(self.shape)
        self.dims, self.coords = dims, dict(coords or {})

    def _read(self, ds, perm, key):
        # ints become length-1 slices so the stored axes can be permuted, then are dropped.
        stored = [slice(None)] * len(perm)
        squeeze = []
        for j, k in enumerate(key):
            if isinstance(k, (int, np.integer)):
                k = range(ds.shape[perm[j]])[k]
                stored[perm[j]] = slice(k, k + 1)
                squeeze.append(j)
            else:
                stored[perm[j]] = k
        block = np.asarray(ds[tuple(stored)], dtype=self.dtype).transpose(perm)
        return block.squeeze(axis=tuple(squeeze)) if squeeze else block

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        key = key + (slice(None),) * (self.ndim - len(key))
        if not self.stacked:
            return self._read(self.members[0], self.perms[0], key)
        idx = range(self.shape[0])[key[0]]
        if isinstance(idx, int):
            return self._read(self.members[idx], self.perms[idx], key[1:])
        blocks = [self._read(self.members[i], self.perms[i], key[1:]) for i in idx]
        if not blocks:
            return np.empty((0,) + np.empty(self.shape[1:])[key[1:]].shape, dtype=self.dtype)
        return np.stack(blocks)

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files = []


def _all_zero(ds, block_bytes: int = 64 << 20) -> bool:
    """Whether a dataset holds only zeros, without reading it whole when it does not.

    The central plane of a reciprocal-space volume crosses the Bragg peaks, so one plane
    settles the usual case; only a volume that is zero there is scanned, slab by slab,
    stopping at the first non-zero value.
    """
    if np.any(ds[ds.shape[0] // 2]):
        return False
    plane = max(int(np.prod(ds.shape[1:])) * ds.dtype.itemsize, 1)
    step = max(block_bytes // plane, 1)
    for start in range(0, ds.shape[0], step):
        if np.any(ds[start:start + step]):
            return False
    return True


def _scalar(node) -> float | None:
    v = np.asarray(node[...], dtype=np.float64).ravel()
    return float(v.mean()) if v.size else None


def _entries(f, first: str | None):
    import h5py

    names = [first] if first else []
    names += [k for k, v in f.items() if isinstance(v, h5py.Group) and k not in names]
    return [f[n] for n in names if n in f]


def _first_value(f, entry_name, paths) -> float | None:
    for entry in _entries(f, entry_name):
        for p in paths:
            try:
                if p in entry:
                    return _scalar(entry[p])
            except (KeyError, OSError):  # a dangling link in one entry must not hide the others
                continue
    return None


def _transform_group(f, inner: str):
    """(NXdata group, entry name) holding the volume of a per-temperature file."""
    import h5py

    if inner not in ("", "/"):
        if inner not in f:
            raise ValueError(f"{f.filename!r} has no {inner!r}; check the path inside the file (h5ls -r {f.filename})")
        node = f[inner]
        if isinstance(node, h5py.Dataset):
            return node.parent, inner.strip("/").split("/")[0], node.name.rsplit("/", 1)[-1]
        return node, inner.strip("/").split("/")[0], None
    default = f.attrs.get("default")
    entry = _text(default) if default is not None and _text(default) in f else ("entry" if "entry" in f else None)
    if entry is not None:
        for name in TRANSFORM_GROUPS:
            if name in f[entry]:
                return f[entry][name], entry, None
        d = f[entry].attrs.get("default")
        if d is not None and _text(d) in f[entry]:
            return f[entry][_text(d)], entry, None
    ds = _find_default_signal(f)
    if ds is None:
        return None, entry, None
    return ds.parent, ds.name.strip("/").split("/")[0], ds.name.rsplit("/", 1)[-1]


def _signal_name(group, given):
    if given:
        return given
    s = group.attrs.get("signal")
    if s is not None:
        return _text(s)
    for name in ("data", "v"):
        if group.get(name, getlink=True) is not None:
            return name
    return None


def read_slice_facts(spec: str, temperature=None):
    """Open one per-temperature file and gather what the series check needs.

    ``spec`` is ``file.nxs`` (its ``entry/masked_transform``, ``entry/transform`` or NeXus default)
    or ``file.nxs:/path``. An external link (nxrefine's ``<label>/masked_transform.nxs:/entry/data/v``)
    is resolved relative to the wrapper file's directory, and that file is kept open.

    Returns
    -------
    facts : SliceFacts (temperature in the file's units, see ``units``)
    dataset : h5py.Dataset or None (None when the slice is empty or missing)
    perm : tuple, the stored axes to the project's order
    coords : dict, axis name -> 1-D array in the project's order
    units : the temperature's units as written, or None
    files : list of open h5py.File to close
    """
    import h5py

    from ..series_check import SliceFacts

    path, inner = split_hdf5_spec(spec) or (spec, "")
    f = open_hdf5(path)
    files = [f]
    group, entry, signal = _transform_group(f, inner)
    units = None
    temp = temperature
    if temp is None:
        for e in _entries(f, entry):
            for cand in ("sample/temperature", "sample/temperature_setpoint", "instrument/temperature"):
                if cand in e:
                    temp = _scalar(e[cand])
                    units = e[cand].attrs.get("units")
                    break
            if temp is not None:
                break
    exposure = _first_value(f, entry, EXPOSURE_PATHS)
    monitor = _first_value(f, entry, MONITOR_PATHS)

    def facts(empty, shape=None, axes=None):
        return SliceFacts(source=spec, temperature=temp, shape=shape, axes=axes, exposure=exposure,
                          monitor=monitor, empty=empty)

    if group is None:
        return facts(f"no {'/'.join(TRANSFORM_GROUPS)} group or NeXus default signal"), None, (), {}, units, files
    signal = _signal_name(group, signal)
    link = group.get(signal, getlink=True) if signal else None
    if link is None:
        return facts(f"{group.name} has no signal dataset"), None, (), {}, units, files
    if isinstance(link, h5py.ExternalLink):
        target = Path(link.filename)
        if not target.is_absolute():
            target = Path(path).parent / target
        where = f"{group.name}/{signal} links to {link.filename}:{link.path}"
        if not target.exists():
            return facts(f"missing: {where}, which does not exist"), None, (), {}, units, files
        try:
            tf = h5py.File(target, "r")
        except OSError as exc:
            return facts(f"missing: {where}, not readable ({exc})"), None, (), {}, units, files
        files.append(tf)
        if link.path not in tf:
            return facts(f"missing: {where}, which has no such dataset"), None, (), {}, units, files
        ds = tf[link.path]
    else:
        try:
            ds = group[signal]
        except KeyError:
            return facts(f"missing: {group.name}/{signal} is a dangling link"), None, (), {}, units, files
    if not isinstance(ds, h5py.Dataset):
        return facts(f"{group.name}/{signal} is not a dataset"), None, (), {}, units, files
    axes = group.attrs.get("axes")
    names = [_text(a) for a in np.atleast_1d(axes)] if axes is not None else []
    perm, dims = spatial_order(names) if len(names) == ds.ndim else (tuple(range(ds.ndim)), None)
    shape = tuple(int(ds.shape[j]) for j in perm)
    coords = {}
    if dims is not None:
        for j, d in zip(perm, dims):
            if names[j] in group and group[names[j]].shape[:1] in ((ds.shape[j],), (ds.shape[j] + 1,)):
                coords[d] = np.asarray(group[names[j]][...], dtype=np.float64)
    if ds.size == 0:
        return facts("empty stub: dataset of size 0", shape, dims), None, perm, coords, units, files
    if ds.id.get_storage_size() == 0:
        return facts("empty stub: dataset never written", shape, dims), None, perm, coords, units, files
    if _all_zero(ds):
        return facts("all zeros", shape, dims), None, perm, coords, units, files
    return facts(None, shape, dims), ds, perm, coords, units, files


@dataclass
class NexusSeries:
    """A per-temperature series as read: the (T, *spatial) view, sorted, and what the check found.

    ``temperatures`` : ndarray of shape (T,), in ``temperature_unit``;
    ``sources`` : the kept inputs, in the volume's order; ``audit`` : the series check.
    """

    volume: HarmonisedVolume
    temperatures: np.ndarray
    temperature_unit: str
    sources: list
    audit: SeriesAudit

    def record(self) -> dict:
        """JSON-ready metadata: the audit table, the unit, the sources, the dims and axis coordinates."""
        doc = self.audit.to_dict()
        doc.update(temperature_unit=self.temperature_unit, sources=list(self.sources),
                   dims=list(self.volume.dims) if self.volume.dims else None,
                   coords={k: np.asarray(v).tolist() for k, v in self.volume.coords.items()})
        return doc


def open_per_temperature(specs, temperatures=None, on_problem: str = "exclude", *, gap_factor: float = 1.5,
                         rtol: float = 1e-6) -> NexusSeries:
    """One file per temperature (nxrefine ``<sample>_<label>.nxs`` wrappers, in any order) as one series.

    Each input's temperature (``entry/sample/temperature``) is converted to the most common unit
    among the inputs (K, C or mK); the series check (:func:`xtec_flows.series_check.check_series`)
    then drops or refuses the offenders (``on_problem``) and gives the order. Volumes whose
    NXdata axes are H, K, L are transposed to the project's (L, K, H) order, lazily.

    ``temperatures``, if given, are the inputs' temperatures in the order given (they override
    the files and are taken in the caller's unit).
    """
    import dataclasses

    from ..series_check import check_series

    specs = [str(s) for s in specs]
    if temperatures is not None and len(temperatures) != len(specs):
        raise ValueError(f"--temperatures has {len(temperatures)} values for {len(specs)} input files; "
                         "give one temperature per file, in the order of the files")
    opened = []
    try:
        for i, spec in enumerate(specs):
            opened.append(read_slice_facts(spec, None if temperatures is None else float(temperatures[i])))
        if temperatures is None:
            named = []
            for (facts, *_rest), spec in zip(opened, specs):
                units = _rest[3]
                if facts.temperature is not None:
                    try:
                        named.append(temperature_unit(units)[0])
                    except ValueError as exc:
                        raise ValueError(f"{spec}: entry/sample/temperature has {exc}") from None
            unit = max(dict.fromkeys(named), key=named.count) if named else "K"
            converted = []
            for facts, _ds, _perm, _coords, units, _files in opened:
                if facts.temperature is not None:
                    facts = dataclasses.replace(facts, temperature=convert_temperature(facts.temperature, units, unit))
                converted.append(facts)
        else:
            unit = "as given (--temperatures)"
            converted = [o[0] for o in opened]
        audit = check_series(converted, on_problem, gap_factor=gap_factor, rtol=rtol)
    except BaseException:
        for o in opened:
            for fh in o[5]:
                fh.close()
        raise
    for r in audit.excluded:
        log.warning("series check: excluded %s (%s: %s)", r["source"], r["problem"], r["detail"])
    keep = set(audit.kept)
    for i, o in enumerate(opened):
        if i not in keep:
            for fh in o[5]:
                fh.close()
    first = opened[audit.kept[0]]
    dims = ("T",) + first[0].axes if first[0].axes else None
    temps = np.asarray([converted[i].temperature for i in audit.kept], dtype=np.float64)
    coords = dict(first[3])
    volume = HarmonisedVolume([opened[i][1] for i in audit.kept], [opened[i][2] for i in audit.kept],
                              dims=dims, coords=coords, files=[fh for i in audit.kept for fh in opened[i][5]])
    return NexusSeries(volume=volume, temperatures=temps, temperature_unit=unit,
                       sources=[specs[i] for i in audit.kept], audit=audit)
