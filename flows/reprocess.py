"""Flow: scheduled reprocessing of scans selected by a Tiled query.

Selects completed scans (time range, sample, plan) that lack a complete result for the
current parameters and engine version, and submits one ``cluster_scan`` run per scan
through the same idempotent :class:`~xtec_flows_prefect.submit.Submitter` the watcher uses. Those runs are
executed by the serving process under its concurrency limit, so a schedule never saturates
the beamline host; each new result records which older results it supersedes.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from xtec_flows_prefect.cluster_scan import _retry_if_transient
from xtec_flows_prefect.submit import DEFAULT_DEPLOYMENT, Submitter
from xtec_flows.tiled import watch
from xtec_flows import tiled as tiled_io
from xtec_flows.engine import ClusterParams


@task(name="select-scans", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_if_transient,
      cache_policy=NO_CACHE)
def select_scans(tiled_uri: str, parameters: dict, raw_path: str, root: str, rule: dict, since: float | None,
                 until: float | None, which: str, max_scans: int) -> list[str]:
    client = tiled_io.connect(tiled_uri)
    raw = tiled_io.walk(client, raw_path)
    results_root = tiled_io.derived_root(client, root)
    uids = watch.select_for_reprocessing(raw, results_root, parameters, watch.ScanRule(**rule), since=since,
                                         until=until, which=which)
    return uids[:max_scans]


@flow(name="xtec-reprocess")
def reprocess(
    tiled_uri: str,
    parameters: dict | None = None,
    raw_path: str = "raw",
    root: str = tiled_io.DEFAULT_ROOT,
    since: str | None = None,
    until: str | None = None,
    days_back: float | None = None,
    sample: str | None = None,
    plan_names: list[str] | None = None,
    which: str = "outdated",
    max_scans: int = 100,
    deployment: str = DEFAULT_DEPLOYMENT,
    dask_address: str | None = None,
) -> dict:
    """Re-cluster the selected scans with ``parameters``.

    since, until : ISO dates/datetimes (UTC if no zone) bounding start.time
    days_back : alternative to ``since``: scans started within this many days
    sample : only scans whose start document has this ``sample``
    which : "outdated" (results only with other parameters / engine), "missing" (no result
        at all), or "all"
    max_scans : at most this many submissions per run (the rest wait for the next one)

    Returns {"selected": [...], "submitted": [...]}
    """
    import time

    logger = get_run_logger()
    params = ClusterParams.from_dict(parameters).to_dict()
    if which not in ("outdated", "missing", "all"):
        raise ValueError(f"which must be 'outdated', 'missing' or 'all'; got {which!r}")
    if max_scans < 1:
        raise ValueError(f"max_scans must be >= 1; got {max_scans}")
    t_since = watch.utc_timestamp(since)
    if days_back is not None:
        t_since = max(t_since or 0.0, time.time() - 86400.0 * float(days_back))
    rule = watch.ScanRule(plan_names=tuple(plan_names or ()), start_key="sample" if sample else None,
                          start_value=sample)
    uids = select_scans(tiled_uri, params, raw_path, root, rule.to_dict(), t_since, watch.utc_timestamp(until),
                        which, max_scans)
    submit = Submitter(deployment=deployment, parameters=params,
                       flow_parameters={"tiled_uri": tiled_uri, "raw_path": raw_path, "root": root,
                                        "dask_address": dask_address})
    rows = []
    for uid in uids:
        run = submit(uid, supersede_older=True, extra_tags=("reprocess",))
        rows.append({"scan": uid, "flow_run": getattr(run, "name", None) or "already done"})
    logger.info("reprocess: %d scan(s) selected (%s), %d submitted", len(uids), which,
                sum(1 for r in rows if r["flow_run"] != "already done"))
    create_table_artifact(key="xtec-reprocess", table=rows or [{"scan": "(none)", "flow_run": ""}],
                          description=f"scans selected for reprocessing ({which})")
    return {"selected": uids, "submitted": [r["scan"] for r in rows if r["flow_run"] != "already done"]}
