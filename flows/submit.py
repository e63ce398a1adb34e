"""Start a cluster_scan deployment run exactly once per (scan, parameters).

Prefect's idempotency key makes creation safe to repeat: the watcher may notice a scan twice
(websocket event and catch-up) and gets the same flow run back. A run that ended without
writing a result (crashed, or failed on a transient error after its retries) gets one more
attempt under a new key, at most ``max_attempts`` in all, so a scan is neither lost nor
retried forever. A run that completed is final; a scan rejected for bad input is never
submitted again (the watcher reads that from its result node).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from xtec_flows import tiled as tiled_io

log = logging.getLogger(__name__)

DEFAULT_DEPLOYMENT = "xtec-cluster-scan/post-scan"


def idempotency_base(scan_uid: str, parameters: dict) -> str:
    """The result key doubles as the idempotency key: one per (scan, parameters, engine major)."""
    return tiled_io.result_key(scan_uid, parameters)


@dataclass
class Submitter:
    """Callable ``submit(uid)`` for :class:`xtec_flows.tiled.watch.ScanWatcher`.

    deployment : "<flow name>/<deployment name>"
    parameters : ClusterParams dict (decides the result key)
    flow_parameters : other cluster_scan parameters (raw_path, root, dask_address, ...)
    """

    deployment: str = DEFAULT_DEPLOYMENT
    parameters: dict = field(default_factory=dict)
    flow_parameters: dict = field(default_factory=dict)
    max_attempts: int = tiled_io.MAX_ATTEMPTS
    tags: tuple = ("xtec",)
    _given_up: set = field(default_factory=set, repr=False)

    def existing_runs(self, keys: list[str]) -> list:
        """Flow runs created under these idempotency keys, in the keys' order."""
        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=keys)))
        return sorted(runs, key=lambda r: keys.index(r.idempotency_key))

    def __call__(self, scan_uid: str, *, supersede_older: bool = False, extra_tags=()):
        """Create (or find) the flow run for ``scan_uid``; returns it, or None when finished/given up.

        Raises whatever the Prefect client raises when the server cannot be reached (the
        caller keeps the scan and tries again later).
        """
        from prefect.client.schemas.objects import StateType
        from prefect.deployments import run_deployment

        base = idempotency_base(scan_uid, self.parameters)
        keys = tiled_io.attempt_keys(base, self.max_attempts)
        runs = self.existing_runs(keys)
        for run in runs:
            state = run.state.type if run.state else None
            if state is None or state not in (StateType.COMPLETED, StateType.FAILED, StateType.CRASHED,
                                              StateType.CANCELLED):
                return run  # scheduled, pending, running, paused: in hand already
            if state == StateType.COMPLETED:
                return None
        attempt = len(runs)
        if attempt >= self.max_attempts:
            if base not in self._given_up:  # say it once, not at every catch-up
                self._given_up.add(base)
                log.error("scan %s: %d flow runs ended without a result; giving up (see the flow runs' logs)",
                          scan_uid, attempt)
            return None
        parameters = {**self.flow_parameters, "scan_uid": scan_uid, "parameters": self.parameters}
        if supersede_older:
            parameters["supersede_older"] = True
        run = run_deployment(
            self.deployment,
            parameters=parameters,
            timeout=0,
            idempotency_key=keys[attempt],
            flow_run_name=f"xtec-{scan_uid[:8]}-{base[5:13]}" + (f"-retry{attempt}" if attempt else ""),
            tags=[*self.tags, *extra_tags],
            as_subflow=False,
        )
        log.info("scan %s: flow run %s (%s)%s", scan_uid, run.name, run.id, f", attempt {attempt + 1}" if attempt else "")
        return run
