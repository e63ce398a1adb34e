"""Flow: cluster one completed temperature scan served by Tiled and write the result back.

Tasks are coarse (seconds to minutes each); the chunk-level work stays inside dask. Tasks
return small summaries, never arrays, and take no array inputs (NO_CACHE avoids hashing).
Retries happen only for transient failures (lost connections, timeouts, 5xx); bad input fails
the run at once, with the reason in the flow-run log and in the result node (status
'failed', retryable False).
"""

from __future__ import annotations

import base64
import os
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from xtec_flows import tiled as tiled_io
from xtec_flows.engine import ClusterParams
from xtec_flows.tiled.process import process_scan

#: Where the q-map / trajectory PNGs are written (one folder per result key).
MAPS_DIR_ENV = "XTEC_FLOWS_MAPS_DIR"


def maps_dir() -> Path:
    return Path(os.environ.get(MAPS_DIR_ENV) or Path(tempfile.gettempdir()) / "xtec-flows-maps")


def _retry_if_transient(task_obj, task_run, state) -> bool:
    """Prefect retry condition: only failures that could pass on a second try."""
    try:
        state.result()
    except BaseException as exc:  # the task's own exception
        return tiled_io.is_transient_error(exc)
    return False


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    out = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(p for p in out.split("-") if p)[:100]


@task(name="cluster-and-write", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_retry_if_transient,
      cache_policy=NO_CACHE)
def cluster_and_write(tiled_uri: str, scan_path: str, parameters: dict, root: str, volume_field: str | None,
                      temperature_field: str | None, dask_address: str | None, progress_id=None,
                      model_path: str | None = None) -> dict:
    """Resolve the scan, run the chunked engine, write the result (or reuse a complete one).

    Returns a summary: result key, Tiled path and URI, whether it was reused.
    """
    logger = get_run_logger()
    params = ClusterParams.from_dict(parameters)
    client = tiled_io.connect(tiled_uri)
    model = None if model_path is None else tiled_io.load_model(tiled_io.walk(client, model_path))

    def on_stage(name: str, fraction: float) -> None:
        logger.info("pass %s done (%.0f%%)", name, 100 * fraction)
        if progress_id is not None:
            try:
                update_progress_artifact(artifact_id=progress_id, progress=100.0 * fraction)
            except Exception as exc:  # progress is a courtesy; never fail the work for it
                logger.warning("could not update the progress artifact: %s", type(exc).__name__)

    def run():
        return process_scan(client, scan_path, params, root=root, volume_field=volume_field,
                            temperature_field=temperature_field, on_stage=on_stage, model=model)

    if dask_address:
        from distributed import Client

        with Client(dask_address, timeout="30s"):
            outcome = run()
    else:
        outcome = run()
    base = tiled_io.redact_uri(tiled_uri).rstrip("/")
    return {
        "key": outcome.key,
        "path": outcome.path,
        "reused": outcome.reused,
        "uri": f"{base}/api/v1/metadata{outcome.path}",
        "browse": f"{base}/ui/browse{outcome.path}",
    }


def _number(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _with_error(value, error, digits: int) -> str:
    if value is None:
        return "–"
    return _number(value, digits) + ("" if error is None else f" ± {_number(error, digits)}")


def class_table_markdown(classes: list) -> list[str]:
    """Markdown table lines for class summaries (dicts of ``result.classes``): label, kind,
    voxels, Tc ± err, the exponent β ± err (or, for a critical class, the width and power law γ), stable."""
    lines = ["| class | kind | voxels | Tc | β or width, γ | stable |", "|---|---|---|---|---|---|"]
    for c in classes:
        if c.get("beta") is not None:
            shape = "β " + _with_error(c["beta"], c.get("beta_err"), 3)
        elif c.get("width") is not None:
            shape = "width " + _with_error(c["width"], c.get("width_err"), 1)
            if c.get("gamma") is not None:
                shape += ", γ " + _with_error(c["gamma"], c.get("gamma_err"), 2)
        else:
            shape = "–"
        stable = {True: "yes", False: "**no**", None: "–"}[c.get("stable")]
        kind = c["kind"].replace("_", " ") + (f" ({c['trend']})" if c["kind"] == "static" and c.get("trend") else "")
        tc = _with_error(c.get("tc"), c.get("tc_err"), 1)
        lines.append(f"| {c['label']} | {kind} | {int(c['n_voxels']):,} | {tc} | {shape} | {stable} |")
    return lines


def _png_data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@task(name="publish-result", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_if_transient,
      cache_policy=NO_CACHE)
def publish_result(tiled_uri: str, summary: dict, supersede_older: bool) -> dict:
    """Artifacts for the result: markdown summary with a link, cluster-count table, maps.

    The q-map and trajectory PNGs go to ``$XTEC_FLOWS_MAPS_DIR/<key>/``; the image artifacts
    carry them as data URLs so the Prefect UI shows them without a file server. A
    classes="auto" result adds a table of its classes to the summary and the class-trajectory
    figure (``classes.png``), and its q-map has one colour per class.
    """
    from xtec_flows import plotting

    client = tiled_io.connect(tiled_uri)
    node = tiled_io.walk(client, summary["path"])
    md = dict(node.metadata or {})
    superseded = []
    if supersede_older:
        root_node = node.parent if hasattr(node, "parent") else tiled_io.walk(client, summary["path"].rsplit("/", 1)[0])
        superseded = tiled_io.mark_superseded(root_node, node)
    loaded = tiled_io.load_result(node, lazy=True)
    k = int(md.get("n_components") or len(loaded.counts))
    classes = loaded.classes
    out = maps_dir() / summary["key"]
    out.mkdir(parents=True, exist_ok=True)
    source = md.get("source") or {}
    params = md.get("parameters") or {}
    uid8 = source.get("uid", "")[:8]
    images = {"qmap": "q-map", "trajectories": "cluster mean trajectories"}
    if classes is None:
        plotting.qmap(loaded.labels, out / "qmap.png", k, title=f"XTEC-{params.get('mode')} K={k}: {uid8}")
    else:
        # The label volume holds classes: one colour per class, not per component.
        plotting.qmap(loaded.labels, out / "qmap.png", len(classes),
                      title=f"XTEC-{params.get('mode')} {len(classes)} classes ({k} components): {uid8}",
                      names=plotting.class_names(classes))
        plotting.class_trajectories(loaded.temperatures, classes, out / "classes.png",
                                    title=f"classes of {uid8}")
        images = {**images, "trajectories": "component mean trajectories", "classes": "class mean trajectories"}
    plotting.trajectories(loaded.temperatures, loaded.means, loaded.variances, loaded.counts, out / "trajectories.png")
    view = None
    if loaded.labels.ndim == 3:
        from xtec_flows.viewer import write_offline_view

        # The browser view, self-contained (central slices and their trajectories for a large
        # result): opens from the maps directory with no server.
        view = write_offline_view(node, out / "view.html")
    counts = [int(c) for c in loaded.counts]
    rows = [{"cluster": i, "voxels": c, "fraction": round(c / max(sum(counts), 1), 4)} for i, c in enumerate(counts)]
    tag = artifact_key(f"xtec-{source.get('uid', summary['key'])[:12]}")
    create_table_artifact(key=f"{tag}-counts", table=rows, description=f"cluster counts, {summary['path']}")
    threshold = md.get("threshold") or {}
    lines = [
        f"# XTEC result for scan `{source.get('uid')}`",
        "",
        f"- result: [{summary['path']}]({summary['browse']}) (`{summary['uri']}`)",
        f"- status: **{md.get('status')}**{' (reused, not recomputed)' if summary.get('reused') else ''}",
        f"- mode {params.get('mode')}, K = {k}, BIC {md.get('bic')}, converged {md.get('converged')}",
        f"- voxels clustered: {md.get('n_thresholded')} of {md.get('n_valid')} valid"
        f" (cut log<I> = {threshold.get('log_cutoff')})",
        f"- maps: {', '.join(f'`{out / name}.png`' for name in images)}",
    ]
    if view is not None:
        lines.append(f"- browser view: [{view}]({view.as_uri()}) (live: `xtec-flows view --tiled-uri ...`)")
    if superseded:
        lines.append(f"- supersedes: {', '.join(f'`{s}`' for s in superseded)}")
    if classes is not None:
        stability = md.get("stability") or {}
        lines += ["", f"## {len(classes)} classes (from {k} mixture components; stability ARI "
                      f"{_number(stability.get('ari_mean'), 3)} over {stability.get('runs')} refits)", ""]
        lines += class_table_markdown(classes)
    unit = "cluster" if classes is None else "component"
    lines += ["", f"| {unit} | voxels | fraction |", "|---|---|---|"]
    lines += [f"| {r['cluster']} | {r['voxels']} | {r['fraction']} |" for r in rows]
    create_markdown_artifact(key=f"{tag}-summary", markdown="\n".join(lines), description="XTEC clustering result")
    for name, description in images.items():
        create_image_artifact(image_url=_png_data_url(out / f"{name}.png"), key=f"{tag}-{name}",
                              description=description)
    if view is not None:
        create_link_artifact(key=f"{tag}-view", link=view.as_uri(), link_text="XTEC result in the browser",
                             description="self-contained browser view of the result (slices, trajectories)")
    return {**summary, "counts": counts, "maps": str(out), "superseded": superseded}


@flow(name="xtec-cluster-scan", log_prints=False)
def cluster_scan(
    tiled_uri: str,
    scan_uid: str,
    parameters: dict | None = None,
    raw_path: str = "raw",
    root: str = tiled_io.DEFAULT_ROOT,
    volume_field: str | None = None,
    temperature_field: str | None = None,
    dask_address: str | None = None,
    supersede_older: bool = False,
    model_path: str | None = None,
) -> dict:
    """Cluster one completed scan and write the result into Tiled.

    Parameters
    ----------
    tiled_uri : Tiled server URI (no key in it: the key comes from TILED_API_KEY)
    scan_uid : bluesky start uid (a key of ``raw_path``) or a node path starting with '/'
    parameters : ClusterParams as a dict (defaults for anything left out)
    raw_path : container of the raw runs
    root : derived-data root for results
    dask_address : an existing Dask scheduler ("tcp://host:8786"); default local threads
    supersede_older : mark the scan's other complete results as superseded by this one
    model_path : a complete result node ("xtec/<key>") whose fitted model labels this scan instead
        of a new fit (a doping or field series on one temperature grid); ``parameters`` are then
        the model's

    Returns a summary: key, path, uri, counts, maps folder, reused.
    """
    logger = get_run_logger()
    # Validate the parameters before anything is read or written (a bad value fails the run
    # here, without retries).
    params = ClusterParams.from_dict(parameters)
    tiled_io.check_key(scan_uid.strip("/").split("/")[-1], "scan uid")
    if "api_key=" in tiled_uri:
        raise ValueError("tiled_uri must not carry an API key (it would be stored with the flow run); "
                         "set TILED_API_KEY in the serving process's environment instead")
    scan_path = scan_uid if scan_uid.startswith("/") else f"{raw_path.strip('/')}/{scan_uid}"
    progress_id = create_progress_artifact(progress=0.0, key=artifact_key(f"xtec-progress-{scan_uid[:12]}"),
                                           description=f"XTEC clustering of {scan_path}")
    summary = cluster_and_write(tiled_uri, scan_path, params.to_dict(), root, volume_field, temperature_field,
                                dask_address, progress_id, model_path)
    update_progress_artifact(artifact_id=progress_id, progress=100.0)
    published = publish_result(tiled_uri, summary, supersede_older)
    logger.info("result %s %s: counts %s; maps in %s", published["path"],
                "reused" if published["reused"] else "written", published["counts"], published["maps"])
    return published
