"""``xtec-flows`` command line: synth, cluster, bic.

The CLI orchestrates; numerics live in ``xtec_flows.numerics`` and storage in
``xtec_flows.io``. Every input is validated before anything is written, and an
output directory appears only once the run has succeeded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from . import validation

log = logging.getLogger("xtec_flows.cli")

SERIES_CHECK_CHOICES = ("exclude", "refuse")  # = series_check.ON_PROBLEM, without importing numpy at parse time


class CLIError(Exception):
    """An error whose message is meant for the user as is."""


# ---------------------------------------------------------------------------------------
# argument parsing helpers
# ---------------------------------------------------------------------------------------


def _int_tuple(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 24,64,64,64; got {text!r}")


def _float_list(text: str) -> list:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 10,20,30; got {text!r}")


def _k_range(text: str) -> list:
    """'2..10' or '2,3,5' -> list of ints."""
    try:
        if ".." in text:
            a, b = text.split("..")
            lo, hi = int(a), int(b)
            if hi < lo:
                raise ValueError
            return list(range(lo, hi + 1))
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a range like 2..10 or a list like 2,3,4; got {text!r}")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"n_components\": 3}}'; {exc}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object; got {type(value).__name__}")
    return value


def _add_tiled_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--tiled-uri", required=required, help="Tiled server URI, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", help="Tiled API key (default: the TILED_API_KEY environment variable, preferred)")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """Where a result goes: a directory (-o) for file inputs, or back to Tiled for a Tiled scan."""
    from .tiled.direct import READ_MODES

    p.add_argument("-o", "--output", help="output directory (created); required for file inputs")
    _add_tiled_options(p)
    p.add_argument("--scan", help="Tiled: bluesky scan uid or node path (the result goes back to Tiled)")
    p.add_argument("--root", default="xtec", help="Tiled: container for derived results (default xtec)")
    p.add_argument("--volume-field", help="Tiled: name of the volume in the run's primary stream (detected if unique)")
    p.add_argument("--temperature-field", help="Tiled: temperature column of the run (detected if unique)")
    p.add_argument("--read-mode", choices=READ_MODES, default="auto",
                   help="Tiled: read the scan's zarr/HDF5 files directly when this host can open them and they "
                        "match what Tiled serves ('auto', default), always through the server ('http'), or "
                        "files only ('direct': an error if not possible)")


def _add_engine_options(p: argparse.ArgumentParser, several_inputs: bool = False) -> None:
    _add_input_options(p, several_inputs)
    _add_parameter_options(p)
    _add_run_options(p)


def _add_input_options(p: argparse.ArgumentParser, several_inputs: bool = False) -> None:
    if several_inputs:
        p.add_argument("input", nargs="*", help="zarr array/group path, or NeXus/HDF5 as file.nxs:/entry/data/data, "
                       "or several NeXus files, one per temperature (nxrefine <sample>_<label>.nxs), in any order")
        p.add_argument("--series-check", choices=list(SERIES_CHECK_CHOICES), default="exclude",
                       help="several files: exclude (default) or refuse the files the series check finds unusable "
                            "(duplicated temperature, other grid or axes, other exposure or monitor, empty stub); "
                            "the audit goes into result.json")
    else:
        p.add_argument("input", nargs="?", help="zarr array/group path, or NeXus/HDF5 as file.nxs:/entry/data/data")
    p.add_argument("--temperatures", type=_float_list, help="comma-separated temperatures, one per slice (overrides the file)")


def _add_parameter_options(p: argparse.ArgumentParser) -> None:
    from .engine.params import add_options

    add_options(p, ENGINE_OPTIONS)
    p.add_argument("--kernel", choices=["local", "periodic"], default="local", help="mode s: smoothing kernel")
    p.add_argument("--length-scale", type=float, default=None,
                   help="mode s: kernel length scale L (default 1 voxel for local, 0.2 for periodic)")
    p.add_argument("--zero-cutoff", type=float, default=1e-2, help="mode s: kernel values below this are 0")
    p.add_argument("--smoothing-weights", choices=["uniform", "gaussian"], default="uniform")
    p.add_argument("--smoothing-iterations", type=int, default=1)
    p.add_argument("--unit-cell", type=_int_tuple, help="mode s, periodic kernel: voxels per r.l.u. per axis, e.g. 16,16,16")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunks", type=_int_tuple, help="spatial block shape for streaming, e.g. 64,64,64")
    p.add_argument("--scratch", help="directory for intermediate arrays (default: memory, a temp dir above 1 GiB, or the Dask "
                   "workers' memory under a distributed Client; on a multi-host cluster DIR must be shared)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


#: The engine parameters every clustering command takes (their constraints, defaults and help
#: are declared once, in engine/params.py); ``serve`` takes SERVE_OPTIONS and --parameters.
ENGINE_OPTIONS = ("threshold", "rescale", "mask", "nonfinite", "mode", "ordering", "random_state", "n_init",
                  "max_iter", "tol", "reg_covar")
SERVE_OPTIONS = ("mode", "threshold", "rescale", "random_state")
#: Automatic processing clusters with K=3 unless told otherwise (Bragg, a peak class, background).
SERVE_N_COMPONENTS = 3


def _add_n_components(p: argparse.ArgumentParser, default: int | None = None) -> None:
    from .engine.params import add_options

    add_options(p, ["n_components"], defaults=None if default is None else {"n_components": default})


def _add_serve_engine_options(p: argparse.ArgumentParser) -> None:
    from .engine.params import add_options

    add_options(p, SERVE_OPTIONS)


def _add_class_options(p: argparse.ArgumentParser) -> None:
    from .engine.params import CLASS_DISCOVERY_FIELDS, add_options

    add_options(p, CLASS_DISCOVERY_FIELDS)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="xtec-flows", description="X-ray TEmperature Clustering (XTEC), out of core.")
    parser.add_argument("--version", action="version", version=f"xtec-flows {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate a synthetic temperature series with ground truth (zarr v3)")
    s.add_argument("output", help="zarr group to create")
    s.add_argument("--shape", type=_int_tuple, default=(24, 64, 64, 64), help="T,L,K,H or T,K,H (default 24,64,64,64)")
    s.add_argument("--chunks", type=_int_tuple, help="chunk shape (T first), default full T x <=64 per axis")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--pixels-per-zone", type=int, default=None, help="voxels per reciprocal-lattice unit")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")

    c = sub.add_parser(
        "cluster",
        help="cluster a temperature series (file, or a Tiled scan with --tiled-uri/--scan) and write the results",
    )
    _add_engine_options(c, several_inputs=True)
    _add_output_options(c)
    _add_n_components(c)
    _add_class_options(c)
    c.add_argument("--overwrite", action="store_true", help="replace an earlier xtec-flows result in OUTPUT")
    c.add_argument("--no-plots", action="store_true", help="skip qmap.png and trajectories.png")

    r = sub.add_parser("results", help="list the XTEC results stored in Tiled for a scan")
    r.add_argument("uri", help="Tiled server URI")
    r.add_argument("scan", help="source scan uid (or node path of a plain array)")
    r.add_argument("--root", default="xtec")
    r.add_argument("--all", action="store_true", help="include running and failed results")
    r.add_argument("--api-key", help="API key (default: TILED_API_KEY)")
    r.add_argument("--json", action="store_true")

    i = sub.add_parser("import", help="import a NeXus/HDF5 temperature series into Tiled as a 4-D array node")
    i.add_argument("inputs", nargs="+", help="one 4-D dataset (file.nxs:/entry/data/data), or 3-D volumes, one per "
                   "temperature (files, file:path specs, or one file with one entry per temperature)")
    _add_tiled_options(i, required=True)
    i.add_argument("--key", required=True, help="name of the new node")
    i.add_argument("--parent", default="", help="container path to create the node in (default: root)")
    i.add_argument("--temperatures", type=_float_list, help="comma-separated temperatures (overrides the files)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing node with this key")
    i.add_argument("--series-check", choices=list(SERIES_CHECK_CHOICES), default="exclude",
                   help="per-temperature files: drop (exclude, default) or refuse duplicated temperatures, other "
                        "shapes or exposures, and empty stubs")
    i.add_argument("--json", action="store_true")

    v = sub.add_parser("serve", help="serve the Prefect deployments and watch Tiled for completed scans "
                       "(runs until SIGTERM / Ctrl-C)")
    v.add_argument("--tiled-uri", default=os.environ.get("XTEC_FLOWS_TILED_URI"),
                   help="Tiled server URI (default: XTEC_FLOWS_TILED_URI); the key comes from TILED_API_KEY")
    v.add_argument("--api-key-file", help="file holding the Tiled API key (default: the TILED_API_KEY environment "
                   "variable); never pass a key itself on a command line, where every user can read it")
    v.add_argument("--raw-path", default=os.environ.get("XTEC_FLOWS_RAW_PATH", "raw"),
                   help="container of the raw bluesky runs (default raw)")
    v.add_argument("--root", default=os.environ.get("XTEC_FLOWS_ROOT", "xtec"), help="container for results")
    _add_n_components(v, default=SERVE_N_COMPONENTS)
    _add_class_options(v)
    _add_serve_engine_options(v)
    v.add_argument("--parameters", type=_json_object, help="full clustering parameters as JSON (overrides the above)")
    v.add_argument("--plan", action="append", default=[], help="accept only runs of this plan (repeatable)")
    v.add_argument("--require-start-key", help="accept only runs whose start document has this key (e.g. sample)")
    v.add_argument("--require-start-value", help="... with this value")
    v.add_argument("--require-field", action="append", default=[],
                   help="accept only runs whose primary stream has this data key (repeatable)")
    v.add_argument("--volume-field", help="name of the volume in the primary stream (detected if unique)")
    v.add_argument("--temperature-field", help="temperature column (detected if unique)")
    v.add_argument("--limit", type=int, default=int(os.environ.get("XTEC_FLOWS_LIMIT", "2")),
                   help="flow runs executing at once (default 2)")
    v.add_argument("--reprocess-cron", default=os.environ.get("XTEC_FLOWS_REPROCESS_CRON", "0 3 * * *"),
                   help="cron schedule of reprocessing, UTC ('' for none; default 0 3 * * *)")
    v.add_argument("--reprocess-which", choices=["outdated", "missing", "all"], default="outdated")
    v.add_argument("--reprocess-days-back", type=float, default=30.0)
    v.add_argument("--reconcile-seconds", type=float, default=60.0, help="catch-up period of the watcher")
    v.add_argument("--lookback-days", type=float, default=7.0, help="catch-up window (days)")
    v.add_argument("--query-seconds", type=float, default=2.0, help="how often the runner polls Prefect")
    v.add_argument("--dask-address", default=os.environ.get("XTEC_FLOWS_DASK_ADDRESS"),
                   help="existing Dask scheduler, e.g. tcp://host:8786 (default: local threads)")
    v.add_argument("--live", action="store_true",
                   help="also follow running scans: a provisional result after each temperature (from the third; "
                        "TiledWriter must write events as they come, batch_size=1) and a Prefect event "
                        "xtec.class.appeared when an order parameter, critical or onset class first shows")
    v.add_argument("--live-poll-seconds", type=float, default=1.0,
                   help="how often --live looks for new temperatures (default 1)")
    v.add_argument("--watch-only", action="store_true",
                   help="only watch and submit each completed scan to xtec-cluster-scan/post-scan, which "
                        "Prefect workers serve (deploy/prefect/prefect.yaml); --limit and the reprocessing "
                        "options are then the work pool's and the yaml's")

    w = sub.add_parser("view", help="serve the results viewer in the browser (slices coloured by class, a voxel's "
                       "trajectory); reads Tiled's HTTP API with your key, never the storage")
    w.add_argument("--tiled-uri", required=True, help="Tiled server URI, e.g. http://127.0.0.1:8000")
    w.add_argument("--api-key-file", help="file holding the Tiled API key (default: the TILED_API_KEY environment "
                   "variable); the key stays in this process, the browser never sees it")
    w.add_argument("--root", default="xtec", help="container holding the results (default xtec)")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")

    a = sub.add_parser("apply", help="label a temperature series with a model fitted on another one (a doping, "
                       "pressure or field series on one temperature grid): same components and classes in every "
                       "scan, the classes' Tc refitted on this one")
    a.add_argument("--model", required=True, help="the model: an `xtec-flows cluster -o` output directory or its "
                   "result.json; with --tiled-uri, the path of a complete result node on that server "
                   "(xtec/<key>, see `xtec-flows results`)")
    _add_input_options(a, several_inputs=True)
    _add_run_options(a)
    _add_output_options(a)
    a.add_argument("--overwrite", action="store_true", help="replace an earlier xtec-flows result in OUTPUT")
    a.add_argument("--no-plots", action="store_true", help="skip qmap.png, trajectories.png and view.html")

    m = sub.add_parser("compare", help="compare a series of Tiled scans (doping, pressure, field) through one "
                       "classes='auto' model: a table of class fractions and Tc per scan, written to Tiled")
    m.add_argument("--tiled-uri", required=True, help="Tiled server URI, e.g. http://127.0.0.1:8000")
    m.add_argument("--api-key", help="Tiled API key (default: the TILED_API_KEY environment variable, preferred)")
    m.add_argument("--model", required=True, help="path of a complete classes='auto' result node (xtec/<key>)")
    m.add_argument("--scan", action="append", required=True,
                   help="a scan uid or node path, once per scan, in series order (at least two)")
    m.add_argument("--root", default="xtec", help="container for results and the table (default xtec)")
    m.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    m.add_argument("--quiet", action="store_true", help="no progress bars")

    d = sub.add_parser("demo", help="end to end on this machine: Tiled + Prefect + serve + a simulated scan")
    d.add_argument("--workdir", default="demo-output", help="directory for the servers' data and the maps")
    d.add_argument("--shape", type=_int_tuple, default=(24, 64, 64, 64), help="T,L,K,H of the simulated scan")
    d.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the result")

    b = sub.add_parser("bic", help="sweep the number of clusters and report BIC")
    _add_engine_options(b)
    b.add_argument("--k", type=_k_range, default=list(range(2, 11)), help="K values, e.g. 2..10 (default) or 2,4,6")
    b.add_argument("--criterion", choices=["bic", "icl", "elbow"], default="bic",
                   help="how the best K is chosen: lowest BIC (default), lowest ICL (BIC + 2 x assignment "
                        "entropy: stops at well-separated clusters), or the elbow of the BIC curve")
    b.add_argument("-o", "--output", help="directory for bic.json, bic.csv and bic.png")
    b.add_argument("--overwrite", action="store_true")
    return parser


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------


def _open_input(spec, temperatures, series_check: str = "exclude"):
    """(volume, temperatures) for a zarr or HDF5 input spec; a list of several specs is a series of
    NeXus files, one per temperature, and then (volume, temperatures, record) with the series
    check's record (audit table, unit, sources, dims) for result.json."""
    from .io import nexus, zarr_io

    if isinstance(spec, (list, tuple)):
        if len(spec) > 1:
            not_h5 = [s for s in spec if nexus.split_hdf5_spec(s) is None]
            if not_h5:
                raise CLIError(f"several inputs must be NeXus/HDF5 files, one per temperature; {not_h5[0]!r} is not "
                               "(a zarr series is one INPUT)")
            series = nexus.open_per_temperature(spec, temperatures, series_check)
            return series.volume, series.temperatures, series.record()
        volume, temps = _open_input(spec[0], temperatures)
        return volume, temps, None
    h5 = nexus.split_hdf5_spec(spec)
    if h5 is not None:
        volume, temps = nexus.open_volume(*h5)
    else:
        volume, temps, _ = zarr_io.open_volume(spec)
    if temperatures is not None:
        temps = temperatures
    return volume, temps


def _params_from(args, n_components: int):
    from .engine import ClusterParams
    from .engine.params import values_from_options
    from .numerics.smoothing import SmoothingKernel

    smoothing = None
    if args.mode == "s":
        smoothing = SmoothingKernel(
            kind=args.kernel,
            length_scale=args.length_scale if args.length_scale is not None else (1.0 if args.kernel == "local" else 0.2),
            zero_cutoff=args.zero_cutoff,
            weights=args.smoothing_weights,
            unit_cell=tuple(args.unit_cell or ()),
            iterations=args.smoothing_iterations,
        )
    from .engine.params import CLASS_DISCOVERY_FIELDS

    values = values_from_options(args, ENGINE_OPTIONS + CLASS_DISCOVERY_FIELDS)
    return ClusterParams(n_components=n_components, smoothing=smoothing, **values)


def _is_synthetic(path: Path) -> bool:
    """True if ``path`` is a zarr group written by ``xtec-flows synth`` (safe to overwrite)."""
    try:
        import zarr

        group = zarr.open_group(str(path), mode="r")
    except Exception:  # not zarr at all: certainly not ours
        return False
    return "class_names" in group.attrs and "model" in group.attrs


def cmd_synth(args) -> dict:
    from . import synthetic

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not _is_synthetic(out):
        raise CLIError(f"{out} holds data that xtec-flows synth did not write; it is never overwritten, choose another path")
    model = synthetic.SeriesModel() if args.pixels_per_zone is None else synthetic.SeriesModel(pixels_per_zone=args.pixels_per_zone)
    t0 = time.perf_counter()
    synthetic.write_zarr(out, args.shape, model=model, seed=args.seed, chunks=args.chunks, overwrite=args.overwrite, progress=not args.quiet)
    return {"output": str(out), "shape": list(args.shape), "seed": args.seed, "seconds": round(time.perf_counter() - t0, 3)}


def cmd_cluster(args) -> dict:
    import numpy as np
    import zarr

    if args.tiled_uri:
        return cmd_cluster_tiled(args)
    if not args.input or not args.output:
        raise CLIError("cluster needs INPUT and -o OUTPUT (or --tiled-uri URI --scan UID for a Tiled scan)")

    from . import engine
    from .io import zarr_io

    model = getattr(args, "model", None)
    params = model.params if model is not None else _params_from(args, args.n_components)
    out = zarr_io.prepare_output_dir(args.output, args.overwrite)
    inputs = args.input
    volume, temps, series = _open_input(inputs, args.temperatures, args.series_check)
    args.input = inputs[0] if len(inputs) == 1 else f"{len(inputs)} files {inputs[0]} ... {inputs[-1]}"
    # Work next to the destination and move into place only on success: a
    # failed run leaves no partial output and does not destroy an old one.
    created = _first_missing_ancestor(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        stores = dict(labels_store=zarr.storage.LocalStore(str(work / "labels.zarr")),
                      components_store=zarr.storage.LocalStore(str(work / "components.zarr")) if params.classes else None)
        if model is None:
            result = engine.run(volume, temps, params, chunks=args.chunks, scratch=args.scratch,
                                progress=not args.quiet, **stores)
        else:
            result = engine.apply(volume, temps, model, chunks=args.chunks, scratch=args.scratch,
                                  progress=not args.quiet, **stores)
        summary = result.to_dict()
        summary.update({"series_check": series} if series is not None else {})  # the audit of a multi-file input
        summary["input"] = args.input
        (work / "result.json").write_text(json.dumps(summary, indent=1))
        if not args.no_plots:
            from . import plotting

            n_colours = result.means.shape[0] if result.classes is None else len(result.classes)
            what = f"XTEC-{params.mode}" + (" classes" if result.classes is not None else "") + (
                " (stored model)" if model is not None else "")
            names = None if result.classes is None else plotting.class_names(result.classes)
            # A 1-D series' map is its mean profile coloured by label (small: T x q).
            profile = np.asarray(volume[...]).mean(axis=0) if result.labels.ndim == 1 else None
            plotting.qmap(result.labels, work / "qmap.png", n_colours, title=f"{what}: {args.input}", names=names,
                          intensity=profile)
            plotting.trajectories(result.temperatures, result.means, result.variances, result.counts, work / "trajectories.png",
                                  ylabel=f"rescaled I(T) ({params.rescale})")
            if result.classes is not None:
                plotting.class_trajectories(result.temperatures, result.classes, work / "classes.png",
                                            title=f"classes of {args.input}")
            if result.labels.ndim == 3:
                from .viewer import write_offline_view

                # The browser view of this result, self-contained: slices coloured by label,
                # a voxel's trajectory on click (the live one is `xtec-flows view`).
                write_offline_view(work, work / "view.html", volume=volume)
        if out.exists():
            zarr_io.prepare_output_dir(out, args.overwrite)  # re-check: nothing foreign appeared meanwhile
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    summary["output"] = str(out)
    return summary


def _first_missing_ancestor(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (to undo mkdir on failure)."""
    missing = None
    p = path.absolute()
    while not p.exists():
        missing = p
        p = p.parent
    return missing


def cmd_results(args) -> dict:
    from .tiled import results
    from . import tiled as tiled_io

    client = tiled_io.connect(args.uri, args.api_key)
    nodes = results.find_results(client, args.scan, root=args.root, status=None if args.all else "complete")
    return {"uri": tiled_io.redact_uri(args.uri), "scan": args.scan, "root": args.root,
            "results": results.summarise(nodes)}


def cmd_import(args) -> dict:
    from .io import nexus
    from . import tiled as tiled_io

    volume, temps, sources = nexus.open_series(args.inputs, args.temperatures, args.series_check)
    temps = validation.check_temperatures(temps, volume.shape[0])
    validation.check_volume(volume)
    client = tiled_io.connect(args.tiled_uri, args.api_key)
    parent = tiled_io.derived_root(client, args.parent) if args.parent else client
    node = tiled_io.write_series(parent, args.key, volume, temps, sources=sources, overwrite=args.overwrite)
    return {"uri": tiled_io.redact_uri(args.tiled_uri), "path": tiled_io.node_path(node), "shape": list(volume.shape),
            "temperatures": temps.tolist(), "sources": sources}


def cmd_cluster_tiled(args) -> dict:
    from .tiled import process
    from . import tiled as tiled_io

    if not args.scan:
        raise CLIError("--tiled-uri needs --scan UID (the bluesky scan uid or node path to cluster)")
    if args.input or args.output:
        raise CLIError("give either a file INPUT with -o OUTPUT, or --tiled-uri with --scan (results go back to Tiled)")
    model = getattr(args, "model", None)
    params = None if model is not None else _params_from(args, args.n_components)
    outcome = process.process_scan(args.tiled_uri, args.scan, params, root=args.root, api_key=args.api_key,
                                   volume_field=args.volume_field, temperature_field=args.temperature_field,
                                   chunks=args.chunks, progress=not args.quiet, read_mode=args.read_mode,
                                   model=model)
    md = dict(outcome.node.metadata or {})
    return {"uri": tiled_io.redact_uri(args.tiled_uri), "scan": args.scan, "key": outcome.key, "path": outcome.path,
            **({"model": md.get("model")} if md.get("model") else {}),
            "status": outcome.status, "reused": outcome.reused, "n_components": md.get("n_components"),
            "counts": md.get("counts"), "bic": md.get("bic"), "log_likelihood": md.get("log_likelihood")}


def cmd_bic(args) -> dict:
    from . import engine
    from .io import zarr_io

    if not args.input:
        raise CLIError("bic needs INPUT (a zarr or NeXus/HDF5 temperature series)")
    out = None
    if args.output:
        out = zarr_io.prepare_output_dir(args.output, args.overwrite)
    volume, temps = _open_input(args.input, args.temperatures)
    params = _params_from(args, max(args.k))
    kwargs = params.to_dict()
    kwargs.pop("n_components")
    kwargs["smoothing"] = params.smoothing
    for name in engine.CLASS_DISCOVERY_FIELDS:
        kwargs.pop(name, None)
    table = engine.select_n_components(volume, temps, args.k, criterion=args.criterion, chunks=args.chunks,
                                         scratch=args.scratch, progress=not args.quiet, **kwargs)
    doc = {"xtec_flows": __import__("xtec_flows").__version__, "input": args.input, "params": params.to_dict(), "table": table}
    if out is not None:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / "bic.json").write_text(json.dumps(doc, indent=1))
        lines = ["n_components,bic,icl,entropy,log_likelihood,n_iter,converged,best"]
        lines += [f"{r['n_components']},{r['bic']:.6f},{r['icl']:.6f},{r['entropy']:.6f},{r['log_likelihood']:.6f},"
                  f"{r['n_iter']},{r['converged']},{r['best']}" for r in table]
        (out / "bic.csv").write_text("\n".join(lines) + "\n")
        from . import plotting

        plotting.bic_curve(table, out / "bic.png")
        doc["output"] = str(out)
    return doc


def _human(command: str, doc: dict) -> str:
    if command == "view":
        return "xtec-flows view: stopped"
    if command == "compare":
        lines = [f"comparison through {doc['model']} written to {doc['path']} on {doc['uri']}",
                 f"{'scan':<40} {'class':>5} {'kind':<16} {'voxels':>8} {'fraction':>8} Tc"]
        for r in doc["rows"]:
            tc = "-" if r["tc"] is None else f"{r['tc']:.1f}" + ("" if r["tc_err"] is None else f" ± {r['tc_err']:.1f}")
            lines.append(f"{r['scan']:<40} {r['label']:>5} {r['kind']:<16} {r['n_voxels']:>8} {r['fraction']:>8.3f} {tc}")
        return "\n".join(lines)
    if command == "serve":
        return "xtec-flows serve: stopped"
    if command == "demo":
        lines = [
            f"scan {doc['scan']} completed at {doc['stop_time']}; result appeared in Tiled "
            f"{doc['latency']:.1f} s after its stop document",
            f"result: {doc['result_uri']}",
            f"K = {doc['n_components']}, counts {doc['counts']} (mode {doc['mode']})",
            f"maps: {doc['maps']}/qmap.png and {doc['maps']}/trajectories.png",
            f"read it back:  from tiled.client import from_uri; from_uri(URI, api_key=...)['{doc['root']}']"
            f"['{doc['key']}']['labels'].read()",
        ]
        return "\n".join(lines)
    if command in ("cluster", "apply") and "key" in doc:
        what = "existing result (not recomputed)" if doc["reused"] else "new result"
        lines = [f"{what} {doc['path']} on {doc['uri']} for scan {doc['scan']}: status {doc['status']}",
                 f"K = {doc['n_components']}, counts {doc['counts']}, BIC = {doc['bic']}"]
        return "\n".join(lines)
    if command == "results":
        if not doc["results"]:
            return f"no results for scan {doc['scan']} under /{doc['root']} on {doc['uri']}"
        rows = [f"{'key':<26} {'status':<9} {'mode':<5} {'K':>3} {'BIC':>14} completed"]
        for r in doc["results"]:
            bic = f"{r['bic']:.6g}" if isinstance(r["bic"], (int, float)) else "-"
            rows.append(f"{r['key']:<26} {r['status'] or '-':<9} {r['mode'] or '-':<5} {r['n_components'] or '-':>3} "
                        f"{bic:>14} {r['completed'] or r['error'] or ''}")
        return "\n".join(rows)
    if command == "import":
        return f"imported {len(doc['sources'])} dataset(s) as {doc['path']} {doc['shape']} on {doc['uri']}"
    if command == "synth":
        return f"wrote {doc['output']} shape {doc['shape']} in {doc['seconds']} s"
    if command in ("cluster", "apply"):
        t = doc["threshold"]
        lines = [f"labelled with the stored model {doc['model'].get('path')}"] if "model" in doc else []
        lines += [
            f"XTEC-{doc['params']['mode']} on {doc['input']}: {doc['n_thresholded']} of {doc['n_valid']} voxels above "
            f"<I>_T > {t['intensity_cutoff']:.4g} ({t['method']})",
            f"K = {doc['n_components']}, log L = {doc['log_likelihood']:.6g}, BIC = {doc['bic']:.6g}"
            + ("" if "model" in doc else f", {doc['n_iter']} iterations, converged = {doc['converged']}"),
        ]
        if "classes" in doc:
            from .plotting import class_label

            stab = doc["stability"]
            lines.append(f"{doc['n_classes']} classes from {doc['n_components']} components"
                         + (f"; agreement over {stab['runs']} refits: mean ARI {stab['ari_mean']:.3f}"
                            if stab.get("ari_mean") is not None else "")
                         + (f"; restart {stab['chosen_restart']} of {len(stab['restart_agreement'])} continued "
                            f"(mean ARI {stab['restart_agreement'][stab['chosen_restart']]:.3f} with the others)"
                            if stab.get("restart_agreement") else ""))
            for c in doc["classes"]:
                lines.append("  class " + class_label(c))
            lines.append(f"results in {doc['output']}: labels.zarr (classes) components.zarr result.json qmap.png "
                         "trajectories.png classes.png")
            return "\n".join(lines)
        for k, (c, w) in enumerate(zip(doc["counts"], doc["weights"])):
            lines.append(f"  cluster {k}: {c} voxels (weight {w:.3f})")
        lines.append(f"results in {doc['output']}: labels.zarr result.json qmap.png trajectories.png")
        return "\n".join(lines)
    rows = [f"{'K':>3} {'BIC':>16} {'ICL':>16} {'log L':>16} {'iter':>5}"]
    for r in doc["table"]:
        rows.append(f"{r['n_components']:>3} {r['bic']:>16.6g} {r['icl']:>16.6g} {r['log_likelihood']:>16.6g} "
                    f"{r['n_iter']:>5}" + (f"  <- best ({r['criterion']})" if r["best"] else ""))
    return "\n".join(rows)


def cmd_serve(args) -> dict:
    """Serve the deployments and the watcher; returns when stopped."""
    _quiet_prefect_defaults()
    if not args.tiled_uri:
        raise CLIError("give the Tiled server with --tiled-uri or XTEC_FLOWS_TILED_URI")
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as exc:
            raise CLIError(f"cannot read --api-key-file {args.api_key_file}: {exc.strerror}") from None
        if not key:
            raise CLIError(f"--api-key-file {args.api_key_file} is empty")
        os.environ["TILED_API_KEY"] = key  # flow-run processes inherit it; it is never a parameter
    if not os.environ.get("PREFECT_API_URL"):
        raise CLIError("set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api "
                       "(a served deployment needs a real server; see deploy/README.md)")
    serving = _serving_plugin()
    ServeConfig, serve = serving.ServeConfig, serving.serve
    from .tiled.watch import ScanRule

    from .engine.params import CLASS_DISCOVERY_FIELDS, values_from_options

    params = args.parameters if args.parameters is not None else values_from_options(
        args, ("n_components", *SERVE_OPTIONS, *CLASS_DISCOVERY_FIELDS))
    cfg = ServeConfig(
        tiled_uri=args.tiled_uri, raw_path=args.raw_path, root=args.root, parameters=params,
        rule=ScanRule(plan_names=tuple(args.plan), start_key=args.require_start_key,
                      start_value=args.require_start_value, required_fields=tuple(args.require_field)),
        limit=args.limit, reprocess_cron=args.reprocess_cron or None, reprocess_which=args.reprocess_which,
        reprocess_days_back=args.reprocess_days_back, reconcile_seconds=args.reconcile_seconds,
        lookback_seconds=None if args.lookback_days <= 0 else 86400.0 * args.lookback_days,
        query_seconds=args.query_seconds, dask_address=args.dask_address,
        volume_field=args.volume_field, temperature_field=args.temperature_field, watch_only=args.watch_only,
        live=args.live, live_poll_seconds=args.live_poll_seconds,
    )
    serve(cfg)
    return {"stopped": True}


def _serving_plugin():
    """The Prefect side (flows/, installed as ``xtec_flows_prefect``), found by its entry point
    in the group ``xtec_flows.serving``: the library itself never imports the flows."""
    from importlib.metadata import entry_points

    found = list(entry_points(group="xtec_flows.serving"))
    if not found:
        raise CLIError("serve needs the Prefect flows, which are not installed: pip install 'xtec-flows[flows]' "
                       "from the project (they install as the package xtec_flows_prefect)")
    return found[0].load()


def cmd_apply(args) -> dict:
    from .engine import StoredModel

    if args.tiled_uri:
        from . import tiled as tiled_io

        args.model = tiled_io.load_model(tiled_io.walk(tiled_io.connect(args.tiled_uri, args.api_key), args.model))
        return cmd_cluster_tiled(args)
    path = Path(args.model)
    summary_path = path / "result.json" if path.is_dir() else path
    try:
        summary = json.loads(summary_path.read_text())
    except OSError as exc:
        raise CLIError(f"cannot read the model {summary_path} ({exc.strerror}); give an `xtec-flows cluster -o` "
                       "output directory or its result.json") from None
    except json.JSONDecodeError as exc:
        raise CLIError(f"the model {summary_path} is not JSON ({exc}); give an `xtec-flows cluster -o` output "
                       "directory or its result.json") from None
    if not isinstance(summary, dict):
        raise CLIError(f"the model {summary_path} is not an xtec-flows result.json")
    args.model = StoredModel.from_summary(summary, {"kind": "file", "path": str(summary_path.resolve()),
                                                    "input": summary.get("input")})
    args.tiled_uri = None
    return cmd_cluster(args)


def cmd_compare(args) -> dict:
    from . import tiled as tiled_io
    from .tiled.compare import compare_scans

    client = tiled_io.connect(args.tiled_uri, args.api_key)
    frame, node = compare_scans(client, args.model, args.scan, root=args.root, progress=not args.quiet)
    return {"uri": tiled_io.redact_uri(args.tiled_uri), "model": args.model, "path": tiled_io.node_path(node),
            "rows": tiled_io.json_safe(frame.astype(object).where(frame.notna(), None).to_dict(orient="records"))}


def cmd_view(args) -> dict:
    import uvicorn

    from .tiled.client import redact_uri
    from .viewer.app import make_app

    if args.api_key_file:
        try:
            api_key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CLIError(f"cannot read --api-key-file {args.api_key_file} ({exc.strerror}); give a readable file "
                           "holding the Tiled API key, or set TILED_API_KEY") from None
        if not api_key:
            raise CLIError(f"--api-key-file {args.api_key_file} is empty; put the Tiled API key in it")
    else:
        api_key = os.environ.get("TILED_API_KEY") or None  # None: anonymous, for a public server
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach port %d reads Tiled with this key's permissions",
                    args.host, args.port)
    app = make_app(args.tiled_uri, api_key, root=args.root)
    log.info("results viewer on http://%s:%d/ (results under /%s of %s)", args.host, args.port,
             args.root.strip("/"), redact_uri(args.tiled_uri))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return {"stopped": True}


def cmd_demo(args) -> dict:
    _quiet_prefect_defaults()
    from .demo.stack import run_demo

    return run_demo(Path(args.workdir), shape=tuple(args.shape), timeout=args.timeout)


def _quiet_prefect_defaults() -> None:
    """No telemetry, and the library's own log records in the flow-run logs (before prefect is imported)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "xtec_flows")
    # Library records outside a flow run (the watcher) go to the process log only.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = args.verbose or args.command in ("serve", "demo")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if args.command == "serve"
                        else "%(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpcore", "numexpr"):  # one line per request is noise at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)
    commands = {"synth": cmd_synth, "cluster": cmd_cluster, "bic": cmd_bic, "results": cmd_results, "view": cmd_view,
                "apply": cmd_apply, "compare": cmd_compare,
                "import": cmd_import, "serve": cmd_serve, "demo": cmd_demo}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            doc = commands[args.command](args)
    except (CLIError, ValueError, TypeError, FileExistsError, FileNotFoundError, KeyError, PermissionError) as exc:
        sys.stderr.write(f"xtec-flows {args.command}: error: {_safe_message(exc)}\n")
        return 2
    except Exception as exc:
        if not _is_remote_error(exc):
            raise
        if _from_prefect(exc):
            sys.stderr.write(
                f"xtec-flows {args.command}: error: the Prefect server refused or failed the request: "
                f"{_safe_message(exc)}\n(check PREFECT_API_URL and, for Prefect Cloud, PREFECT_API_KEY)\n")
        else:
            sys.stderr.write(
                f"xtec-flows {args.command}: error: the Tiled server refused or failed the request: "
                f"{_safe_message(exc)}\n(check the URI and the API key: --api-key or TILED_API_KEY)\n")
        return 2
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(_compact(doc)) + "\n")
    else:
        sys.stdout.write(_human(args.command, doc) + "\n")
    return 0


def _safe_message(exc: BaseException) -> str:
    """The error text with any API key removed (URIs may carry ?api_key=...)."""
    from .tiled.client import redact_secrets

    return redact_secrets(str(exc))


def _is_remote_error(exc: BaseException) -> bool:
    """Errors of the Tiled client / HTTP layer, reported to the user instead of a traceback."""
    module = type(exc).__module__
    if module.startswith(("tiled", "httpx", "httpcore")):
        return True
    return isinstance(exc, RuntimeError) and "API key" in str(exc)


def _from_prefect(exc: BaseException) -> bool:
    """Whether an HTTP-layer error came from a request to PREFECT_API_URL (serve talks to both
    servers with httpx, and the user must be told which one failed)."""
    base = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not base:
        return False
    try:
        url = str(exc.request.url)  # httpx errors carry the request they failed on
    except (AttributeError, RuntimeError):
        return type(exc).__module__.startswith("prefect")
    return url.startswith(base)


def _compact(doc: dict) -> dict:
    """The --json summary: drop the bulky histogram arrays (they are in result.json)."""
    d = dict(doc)
    if "threshold" in d:
        d["threshold"] = {k: v for k, v in d["threshold"].items() if not k.startswith("histogram")}
    return d


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
