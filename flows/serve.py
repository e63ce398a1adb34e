"""One process for a beamline host: both deployments served, plus the Tiled scan watcher.

``xtec-flows serve`` calls :func:`serve`. The process

* registers and serves ``xtec-cluster-scan/post-scan`` (started per completed scan) and
  ``xtec-reprocess/scheduled`` (cron), running at most ``limit`` flow runs at a time, each in
  its own subprocess;
* runs a :class:`xtec_flows.tiled.watch.ScanWatcher` on the raw-runs container that submits each
  completed scan once (Prefect idempotency keys), catching up at start-up, after a lost
  subscription and periodically;
* with ``live``, runs a :class:`xtec_flows.tiled.live.LiveFollower` that publishes provisional
  results of scans still running and emits ``xtec.class.appeared`` events
  (:mod:`xtec_flows_prefect.alerts`) when a transition shows.

The Tiled API key reaches the flow runs only through the environment (TILED_API_KEY), never
through flow parameters, so it is not stored in Prefect.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field

from xtec_flows.tiled import live, watch
from xtec_flows import tiled as tiled_io
from xtec_flows.engine import ClusterParams

from xtec_flows_prefect.submit import Submitter

log = logging.getLogger(__name__)

POST_SCAN = "post-scan"
SCHEDULED = "scheduled"


@dataclass
class ServeConfig:
    """Everything ``xtec-flows serve`` needs (CLI options / environment).

    tiled_uri : Tiled server (the key comes from TILED_API_KEY)
    raw_path : container the beamline's TiledWriter writes runs into
    root : derived-data root for results
    parameters : ClusterParams dict used for automatic processing (``{"classes": "auto", ...}``
        for class discovery: the flows and reprocessing pass it on like any other parameters)
    rule : which completed runs to cluster
    limit : flow runs executing at once in this process (post-scan and reprocessing together)
    reprocess_cron : cron schedule of the reprocessing deployment (None: no schedule)
    reprocess_which : "outdated", "missing" or "all"
    reprocess_days_back : the reprocessing window (None: every scan)
    reconcile_seconds : watcher catch-up period; lookback_seconds: its window
    query_seconds : how often the runner polls Prefect for scheduled runs
    dask_address : existing Dask scheduler for the clustering (None: local threads)
    live : follow running scans: provisional results after each temperature, class alerts
    live_poll_seconds : how often the follower looks for new temperatures
    watch_only : only watch and submit; Prefect workers serve the deployments
        (deploy/prefect/prefect.yaml), so ``limit``, ``query_seconds`` and the reprocessing
        settings are theirs, not this process's
    """

    tiled_uri: str
    raw_path: str = "raw"
    root: str = tiled_io.DEFAULT_ROOT
    parameters: dict = field(default_factory=lambda: ClusterParams(n_components=3).to_dict())
    rule: watch.ScanRule = field(default_factory=watch.ScanRule)
    limit: int = 2
    reprocess_cron: str | None = "0 3 * * *"
    reprocess_which: str = "outdated"
    reprocess_days_back: float | None = 30.0
    reconcile_seconds: float = 60.0
    lookback_seconds: float | None = 7 * 86400.0
    query_seconds: float = 2.0
    dask_address: str | None = None
    volume_field: str | None = None
    temperature_field: str | None = None
    watch_only: bool = False
    live: bool = False
    live_poll_seconds: float = 1.0

    def __post_init__(self):
        if "api_key=" in self.tiled_uri:
            raise ValueError("the Tiled URI must not carry an API key (it would end up in flow parameters); "
                             "set TILED_API_KEY instead")
        self.parameters = ClusterParams.from_dict(self.parameters).to_dict()
        if self.limit < 1:
            raise ValueError(f"limit (concurrent flow runs) must be >= 1; got {self.limit}")
        if self.live_poll_seconds <= 0:
            raise ValueError(f"live_poll_seconds must be positive; got {self.live_poll_seconds}")
        if self.reprocess_which not in ("outdated", "missing", "all"):
            raise ValueError(f"reprocess_which must be 'outdated', 'missing' or 'all'; got {self.reprocess_which!r}")

    def flow_parameters(self) -> dict:
        return {"tiled_uri": self.tiled_uri, "raw_path": self.raw_path, "root": self.root,
                "volume_field": self.volume_field, "temperature_field": self.temperature_field,
                "dask_address": self.dask_address}


def build_deployments(cfg: ServeConfig) -> list:
    """The two RunnerDeployments this process serves."""
    from xtec_flows_prefect.cluster_scan import cluster_scan
    from xtec_flows_prefect.reprocess import reprocess

    post = cluster_scan.to_deployment(
        name=POST_SCAN,
        parameters={**cfg.flow_parameters(), "parameters": cfg.parameters},
        tags=["xtec", "post-scan"],
        description="Cluster one completed temperature scan (started by the xtec-flows watcher).",
    )
    kw = {"cron": cfg.reprocess_cron} if cfg.reprocess_cron else {}
    scheduled = reprocess.to_deployment(
        name=SCHEDULED,
        parameters={"tiled_uri": cfg.tiled_uri, "parameters": cfg.parameters, "raw_path": cfg.raw_path,
                    "root": cfg.root, "which": cfg.reprocess_which, "days_back": cfg.reprocess_days_back,
                    "dask_address": cfg.dask_address,
                    "deployment": f"{cluster_scan.name}/{POST_SCAN}"},
        tags=["xtec", "reprocess"],
        description="Re-cluster scans whose results were made with other parameters or engine versions.",
        **kw,
    )
    return [post, scheduled]


def make_watcher(cfg: ServeConfig, client=None) -> watch.ScanWatcher:
    """The watcher for ``cfg``.

    Raises ValueError when the raw container does not exist, tiled_io.AccessDenied when the key
    may not write results under ``cfg.root`` (both before any work is done).
    """
    from xtec_flows_prefect.cluster_scan import cluster_scan

    client = client if client is not None else tiled_io.connect(cfg.tiled_uri)
    try:
        raw = tiled_io.walk(client, cfg.raw_path)
    except KeyError:
        raise ValueError(f"the Tiled server {tiled_io.redact_uri(cfg.tiled_uri)} has no container {cfg.raw_path!r} "
                         "for raw runs; point --raw-path at the container your TiledWriter writes into") from None
    # Before anything is subscribed or submitted: can this key write results at all?
    results_root = tiled_io.check_write_access(client, cfg.root)
    submit = Submitter(deployment=f"{cluster_scan.name}/{POST_SCAN}", parameters=cfg.parameters,
                       flow_parameters=cfg.flow_parameters())
    return watch.ScanWatcher(raw, results_root, cfg.parameters, submit, rule=cfg.rule,
                             reconcile_seconds=cfg.reconcile_seconds, lookback_seconds=cfg.lookback_seconds)


def make_follower(cfg: ServeConfig, client=None) -> live.LiveFollower:
    """The follower of running scans for ``cfg`` (provisional results, class alerts as Prefect events)."""
    from xtec_flows_prefect.alerts import emit_class_alert

    client = client if client is not None else tiled_io.connect(cfg.tiled_uri)
    raw = tiled_io.walk(client, cfg.raw_path)
    results_root = tiled_io.check_write_access(client, cfg.root)
    uri = tiled_io.redact_uri(cfg.tiled_uri)
    return live.LiveFollower(raw, results_root, ClusterParams.from_dict(cfg.parameters),
                             notify=lambda alert: emit_class_alert(alert, uri), rule=cfg.rule,
                             poll_seconds=cfg.live_poll_seconds)


def start_follower(cfg: ServeConfig):
    """Start the follower in a thread when ``cfg.live``; returns (follower, thread) or (None, None)."""
    if not cfg.live:
        return None, None
    follower = make_follower(cfg)
    thread = threading.Thread(target=follower.run, name="xtec-live-follower", daemon=True)
    thread.start()
    return follower, thread


def stop_follower(follower, thread) -> None:
    if follower is not None:
        follower.stop()
        thread.join(timeout=30)


def crash_orphaned_runs(deployment_ids) -> int:
    """Mark runs of our deployments left Pending/Running by a previous life of this process Crashed.

    A serve process that was SIGKILLed (or whose host rebooted) leaves its in-flight flow runs
    Running for ever: nothing executes them any more, and the submitter would treat them as in
    hand. This process serves these deployments alone (one ``serve`` per deployment name, see
    deploy/README), so at start-up such runs are orphans; crashing them lets catch-up submit the
    next attempt. Returns how many were marked.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(deployment_ids))),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]))))
        for run in runs:
            client.set_flow_run_state(run.id, Crashed(message="xtec-flows serve restarted: the process running "
                                                              "this flow run is gone"), force=True)
            log.warning("flow run %s (%s) was left %s by a previous serve process: marked Crashed",
                        run.name, run.id, run.state.type.value if run.state else "?")
    return len(runs)


#: Longest wait between attempts to reach an unreachable Prefect server (seconds).
MAX_ORCHESTRATOR_BACKOFF = 15.0


def orchestrator_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything it wraps) means the Prefect server could not be reached or
    failed with a 5xx: a condition to wait out, not a reason to stop serving."""
    import httpx

    pending, seen = [exc], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, httpx.TransportError):
            return True
        if isinstance(e, httpx.HTTPStatusError) and e.response is not None and e.response.status_code >= 500:
            return True
        # Prefect's service loops give up with this after consecutive connection failures.
        if isinstance(e, RuntimeError) and "exceeded error threshold" in str(e):
            return True
        if isinstance(e, BaseExceptionGroup):
            pending.extend(e.exceptions)
        pending.extend([e.__cause__, e.__context__])
    return False


def _while_orchestrator_unreachable(action, what: str):
    """Call ``action()`` until it returns, waiting out an unreachable Prefect server with a
    bounded exponential backoff (a server restarting, or started after this process: systemd's
    After= orders start-up, not readiness). Other errors propagate at once."""
    delay = 1.0
    while True:
        try:
            return action()
        except Exception as exc:
            if not orchestrator_unreachable(exc):
                raise
            log.warning("%s: the Prefect server is unreachable (%s); trying again in %.0f s", what,
                        type(exc).__name__, delay)
        time.sleep(delay)
        delay = min(2 * delay, MAX_ORCHESTRATOR_BACKOFF)


def require_deployment(name: str) -> str:
    """The id of deployment ``name`` ("flow/deployment") on the Prefect server; ValueError
    naming the remedy when it is not there."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return str(client.read_deployment_by_name(name).id)
        except ObjectNotFound:
            raise ValueError(
                f"the Prefect server has no deployment {name!r} for --watch-only to submit to; deploy "
                "deploy/prefect/prefect.yaml first (the commands are in its header) and start a worker "
                "on its pool, or run serve without --watch-only to serve the deployments itself") from None


def watch_and_submit(cfg: ServeConfig) -> None:
    """Watch for completed scans and submit each once to ``post-scan``, which Prefect workers
    serve (deploy/prefect/prefect.yaml); until SIGTERM / Ctrl-C.

    The deployment must exist (checked at start, waiting out an unreachable Prefect server);
    its work pool's concurrency limit, not this process, bounds the runs.
    """
    from xtec_flows_prefect.cluster_scan import cluster_scan

    watcher = make_watcher(cfg)
    name = f"{cluster_scan.name}/{POST_SCAN}"
    _while_orchestrator_unreachable(lambda: require_deployment(name), f"looking up deployment {name}")
    previous = signal.signal(signal.SIGTERM, lambda *_: watcher.stop())
    log.info("watching %s/%s; submitting completed scans to %s, served by Prefect workers",
             tiled_io.redact_uri(cfg.tiled_uri), cfg.raw_path, name)
    follower, follower_thread = start_follower(cfg)
    try:
        watcher.run()
    except KeyboardInterrupt:
        log.info("interrupted; stopping")
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_follower(follower, follower_thread)


def serve(cfg: ServeConfig) -> None:
    """Serve both deployments and watch for completed scans until SIGTERM / Ctrl-C (with
    ``cfg.watch_only``, only watch: see :func:`watch_and_submit`).

    An unreachable Prefect server, at start-up or later, is waited out (the watcher keeps the
    scans it could not submit and submits them once Prefect answers again).
    """
    if cfg.watch_only:
        return watch_and_submit(cfg)
    import prefect

    deployments = build_deployments(cfg)
    watcher = make_watcher(cfg)
    # Register the deployments before the watcher submits anything to them, and clear what a
    # killed predecessor left running so that catch-up can re-submit it.
    ids = _while_orchestrator_unreachable(lambda: [d.apply() for d in deployments], "registering deployments")
    _while_orchestrator_unreachable(lambda: crash_orphaned_runs(ids), "checking for orphaned flow runs")
    thread = threading.Thread(target=watcher.run, name="xtec-scan-watcher", daemon=True)
    thread.start()
    follower, follower_thread = start_follower(cfg)
    log.info("serving %s with at most %d concurrent run(s); watching %s/%s", [d.name for d in deployments],
             cfg.limit, tiled_io.redact_uri(cfg.tiled_uri), cfg.raw_path)
    try:
        # prefect.serve returns on SIGTERM / Ctrl-C; it raises when Prefect cannot be reached
        # (while it registers the deployments, or once its poll loop has failed several times).
        _while_orchestrator_unreachable(
            lambda: prefect.serve(*deployments, limit=cfg.limit, pause_on_shutdown=False,
                                  print_starting_message=False, query_seconds=cfg.query_seconds),
            "serving the deployments")
    finally:
        watcher.stop()
        thread.join(timeout=10)
        stop_follower(follower, follower_thread)
