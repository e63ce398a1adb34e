"""Provisional results while a scan runs, and an alert when a class appears.

A scan that TiledWriter writes event by event (``batch_size=1``) is in Tiled while it is being
measured. :class:`LiveFollower` polls the raw-runs container for runs without a stop document
and, after each new temperature from the third on, clusters the temperatures recorded so far
and publishes the result under the scan's result key (the key the final result will have)
with status ``provisional`` and :data:`~.spec.PROVISIONAL_KEYS`. Then:

* the stop document of a successful scan: the post-scan flow writes the final result, which
  replaces the provisional one (:func:`~.results.begin_result`); the follower lets go;
* a scan that ends without success: the provisional result is marked ``aborted``;
* at most one update per scan is computed at a time; temperatures that arrive meanwhile are
  taken together by the next update (the latest recorded count wins);
* a follower started while a scan runs picks it up from its provisional result (temperatures
  covered, labels, alerts already sent).

Each update's EM is warm-started from the previous update's mixture (:func:`warm_start`), so it
converges in a few iterations near the solution already shown, and successive updates keep
their colours: each fixed-K update is renamed to match the previous one
(:mod:`xtec_flows.numerics.relabel`). With ``classes="auto"`` the fit switches from a
fixed-K fit to class discovery once the series has the temperatures class discovery needs,
and each class kind that signals a transition (order parameter, critical, onset) is
announced once per scan through ``notify(ClassAlert)`` — the flows package turns that into a
Prefect event. Like the watcher, this module knows nothing about Prefect.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .. import tiled as tiled_io
from ..engine import ClusterParams, run
from ..numerics.classes import MIN_TEMPERATURES, ClassKind
from ..numerics.mixture import MixtureParams
from ..numerics.relabel import matching_permutation, rename
from .watch import ScanRule, is_mongo_catalog

log = logging.getLogger(__name__)

#: Class kinds that announce a transition: an alert is sent the first time a scan shows one.
ALERT_KINDS = (ClassKind.ORDER_PARAMETER.value, ClassKind.CRITICAL.value, ClassKind.ONSET.value)
#: Fewest temperatures a provisional fit is made from (XTEC's minimum).
MIN_PROVISIONAL_TEMPERATURES = 3
#: Components of the fixed-K fit used before class discovery has enough temperatures.
EARLY_COMPONENTS = 4


@dataclass(frozen=True)
class ClassAlert:
    """A class kind seen for the first time in a running scan.

    scan : the scan's uid; kind : the class kind (:data:`ALERT_KINDS`); label : its class label
    in that update; tc : its fitted transition temperature (None when the fit has none);
    temperature : the last temperature measured when it was seen; n_temperatures : how many
    were measured; result : the provisional result's Tiled path; sample : the start
    document's sample, if any
    """

    scan: str
    kind: str
    label: int
    tc: float | None
    temperature: float
    n_temperatures: int
    result: str
    sample: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def provisional_params(params: ClusterParams, n_temperatures: int) -> ClusterParams:
    """What a provisional result of ``n_temperatures`` is clustered with.

    Class discovery needs MIN_TEMPERATURES; below that a fixed-K fit of EARLY_COMPONENTS
    (at most ``max_components``). Stability refits are skipped: an update must be quick, and
    the final result measures stability.
    """
    if params.classes is None:
        return params
    if n_temperatures < MIN_TEMPERATURES:
        return dataclasses.replace(params, classes=None, n_components=min(EARLY_COMPONENTS, params.max_components))
    return dataclasses.replace(params, stability_runs=0)


def warm_start(previous: MixtureParams | None, n_temperatures: int, params: ClusterParams) -> MixtureParams | None:
    """Where the next provisional fit's EM begins: the previous update's mixture, its
    trajectories extended to ``n_temperatures`` by repeating their last temperature (EM moves
    them from there). None (seed afresh) without a previous fit of as many components, e.g.
    when the fit switches from the early fixed-K fit to class discovery."""
    k = params.n_components if params.classes is None else params.max_components
    if previous is None or previous.n_components != k or previous.means.shape[1] > n_temperatures:
        return None
    grow = n_temperatures - previous.means.shape[1]
    extend = lambda a: np.concatenate([a, np.repeat(a[:, -1:], grow, axis=1)], axis=1)  # noqa: E731
    # An emptied component keeps a small weight and variance: EM may fill it again.
    weights = np.maximum(np.asarray(previous.weights, dtype=np.float64), 1e-6)
    variances = np.maximum(extend(np.asarray(previous.variances, dtype=np.float64)), params.reg_covar)
    return MixtureParams(weights, extend(np.asarray(previous.means, dtype=np.float64)), variances)


def running_scans(raw, rule: ScanRule = ScanRule(), *, since: float | None = None) -> list[str]:
    """Uids of runs in ``raw`` that have no stop document yet (started at ``since`` or later), oldest first."""
    from tiled.queries import Key, KeyPresent

    mongo = is_mongo_catalog(raw)
    hits = raw
    if not mongo:  # databroker's MongoAdapter applies queries to the start document only
        hits = hits.search(KeyPresent("stop", exists=False))
    for q in rule.queries():
        if not getattr(q, "key", "").startswith("stop."):
            hits = hits.search(q)
    if since is not None:
        hits = hits.search(Key("start.time") >= float(since))
    out = []
    for key, node in hits.sort(("time" if mongo else "start.time", 1)).items():
        md = node.metadata or {}
        if not md.get("stop") and rule.check_start(md.get("start") or {}) is None:
            out.append(key)
    return out


@dataclass
class _Followed:
    """What the follower remembers of one running scan."""

    covered: int = 0
    labels: np.ndarray | None = None
    n_labels: int = 0
    alerts: list = field(default_factory=list)
    future: Future | None = None
    #: temperatures recorded when the data were last refused (bad input): retried only with more
    refused: int = 0
    #: the previous update's mixture, (K, covered) means and variances: the next fit's warm start
    mixture: MixtureParams | None = None
    #: whether an earlier provisional result (a follower restarted mid-scan) has been looked for
    resumed: bool = False


@dataclass
class LiveStats:
    """Counters of a follower (logs, tests, the latency benchmark)."""

    polls: int = 0
    updates: int = 0
    #: updates whose EM began from the previous update's mixture
    warm_starts: int = 0
    aborted: int = 0
    alerts: int = 0
    errors: int = 0
    #: (uid, n_temperatures, seconds from the poll that saw the temperature to the result being readable)
    latencies: list = field(default_factory=list)


class LiveFollower:
    """Publish provisional results for the running scans in ``raw``.

    Parameters
    ----------
    raw, results_root : tiled containers of the bluesky runs and of the results
    params : the clustering parameters of the final result (they decide the key)
    notify : ``callable(ClassAlert)``, called once per scan and alert kind; raising means
        "not sent", and the next update tries again
    rule : which runs to follow (plan names, start-document keys; the stop part is not used)
    poll_seconds : how often running scans are looked for and their events counted
    lookback_seconds : only runs started this long ago or later are followed
    max_workers : updates computed at once (of different scans; one scan has at most one)
    read_mode, chunks : as for :func:`~xtec_flows.tiled.process.process_scan`; "http" by default,
        because the writer extends a running scan's file before Tiled's record of it, which a
        direct read refuses
    """

    def __init__(self, raw, results_root, params: ClusterParams, *, notify: Callable[[ClassAlert], object] | None = None,
                 rule: ScanRule = ScanRule(), poll_seconds: float = 0.5, lookback_seconds: float | None = 86400.0,
                 max_workers: int = 1, read_mode: str = "http", chunks=None):
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be positive; got {poll_seconds!r}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1; got {max_workers!r}")
        self.raw = raw
        self.results_root = results_root
        self.params = params
        self.key_params = params.to_dict()
        self.notify = notify
        self.rule = rule
        self.poll_seconds = float(poll_seconds)
        self.lookback_seconds = lookback_seconds
        self.read_mode = read_mode
        self.chunks = chunks
        self.stats = LiveStats()
        self._followed: dict[str, _Followed] = {}
        self._in_flight: set[Future] = set()  # updates of followed scans and of scans just let go
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="xtec-live")
        self._stop = threading.Event()

    # -- public -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask :meth:`run` to return (thread-safe); updates in flight finish first."""
        self._stop.set()

    def run(self) -> None:
        """Follow running scans until :meth:`stop`. Blocking; run it in a thread of its own."""
        log.info("following running scans in %s (every %.1f s)", tiled_io.node_path(self.raw) or "/", self.poll_seconds)
        try:
            while not self._stop.is_set():
                try:
                    self.poll()
                except Exception:  # a follower that dies quietly would leave every scan provisional
                    self.stats.errors += 1
                    log.exception("provisional-results poll failed; trying again in %.1f s", self.poll_seconds)
                self._stop.wait(self.poll_seconds)
        finally:
            self._pool.shutdown(wait=True)

    def poll(self) -> list[str]:
        """One look: start an update for every followed or running scan with none in flight.

        Returns the uids an update was started for."""
        self.stats.polls += 1
        since = None if self.lookback_seconds is None else time.time() - self.lookback_seconds
        try:
            uids = running_scans(self.raw, self.rule, since=since)
        except Exception as exc:  # the server may be restarting: the next poll tries again
            log.warning("could not list running scans (%s: %s)", type(exc).__name__,
                        tiled_io.redact_secrets(str(exc))[:300])
            return []
        started = []
        with self._lock:
            for uid in dict.fromkeys([*self._followed, *uids]):
                state = self._followed.setdefault(uid, _Followed())
                if state.future is not None and not state.future.done():
                    continue  # coalesce: the next update takes every temperature recorded by then
                state.future = self._pool.submit(self._update_safely, uid, time.monotonic())
                self._in_flight.add(state.future)
                state.future.add_done_callback(self._in_flight.discard)
                started.append(uid)
        return started

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait until no update is in flight (tests, the benchmark)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                futures = list(self._in_flight)
            if all(f.done() for f in futures):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"provisional updates still running after {timeout} s")
            time.sleep(0.02)

    # -- one update -------------------------------------------------------------------------
    def _update_safely(self, uid: str, noticed: float) -> None:
        try:
            self.update(uid, noticed)
        except Exception as exc:  # one scan's trouble must not stop the others
            self.stats.errors += 1
            log.warning("provisional update of scan %s failed (%s: %s)", uid, type(exc).__name__,
                        tiled_io.redact_secrets(str(exc))[:500])

    def update(self, uid: str, noticed: float | None = None) -> str | None:
        """Bring scan ``uid``'s provisional result up to date. Returns what was done:
        "updated", "aborted", "finished" (stopped successfully: the final result takes over),
        or None (nothing new)."""
        noticed = time.monotonic() if noticed is None else noticed
        with self._lock:
            state = self._followed.setdefault(uid, _Followed())
        key = tiled_io.result_key(uid, self.key_params)
        try:
            node = self.raw[uid]
        except KeyError:  # deleted while it ran: nothing left to follow
            self._let_go(uid)
            return None
        md = node.metadata or {}
        stop = md.get("stop")
        if stop:
            self._let_go(uid)
            if stop.get("exit_status") == "success":
                return "finished"
            return self._abort(uid, key, stop)
        try:
            scan = tiled_io.open_scan(node, partial=True, read_mode=self.read_mode)
        except (ValueError, KeyError, tiled_io.ScanNotReady) as exc:
            # Before its first events a run has no stream or no fields to tell apart yet.
            log.debug("scan %s: nothing to cluster yet (%s)", uid, exc)
            return None
        n = len(scan.temperatures)
        if not state.resumed:  # once per followed scan, not at every poll before its 3rd temperature
            state.resumed = True
            self._restore(state, key)
        if n < MIN_PROVISIONAL_TEMPERATURES or n <= max(state.covered, state.refused):
            return None
        params = provisional_params(self.params, n)
        warm = warm_start(state.mixture, n, params)
        try:
            result = run(scan.volume, scan.temperatures, params, chunks=self.chunks, warm_start=warm)
        except ValueError as exc:  # the data so far are refused (e.g. a repeated temperature)
            state.refused = n
            log.warning("scan %s: its first %d temperatures cannot be clustered (%s); no provisional result "
                        "until more are recorded", uid, n, tiled_io.redact_secrets(str(exc))[:500])
            return None
        if result.classes is None:
            result = self._keep_colours(result, state)
        out = tiled_io.begin_provisional(self.results_root, key, scan, self.key_params, {
            "n_temperatures_covered": n,
            "temperatures_covered": [float(t) for t in scan.temperatures],
            "provisional_parameters": params.to_dict(),
            "alerts": list(state.alerts),
        })
        if out is None:
            log.info("scan %s: the final result has taken over; no provisional update", uid)
            self._let_go(uid)
            return None
        tiled_io.write_result(out, result, scan, status=tiled_io.Status.PROVISIONAL)
        state.covered = n
        state.mixture = MixtureParams(np.asarray(result.weights), np.asarray(result.means), np.asarray(result.variances))
        self.stats.warm_starts += warm is not None
        state.labels = np.asarray(result.labels[...])
        state.n_labels = int(result.means.shape[0]) if result.classes is None else 0
        self.stats.updates += 1
        self.stats.latencies.append((uid, n, time.monotonic() - noticed))
        log.info("scan %s: provisional result from %d temperatures in %s", uid, n, tiled_io.node_path(out))
        self._alert(uid, scan, result, out, state)
        return "updated"

    def _let_go(self, uid: str) -> None:
        with self._lock:  # poll() walks the followed scans under the lock
            self._followed.pop(uid, None)

    def _restore(self, state: _Followed, key: str) -> None:
        """Pick a scan up from its provisional result (a follower restarted mid-scan)."""
        old = tiled_io.find_result(self.results_root, key)
        md = {} if old is None else (old.metadata or {})
        if md.get("status") != tiled_io.Status.PROVISIONAL:
            return
        state.covered = int(md.get("n_temperatures_covered") or 0)
        state.alerts = list(md.get("alerts") or [])
        try:
            state.mixture = MixtureParams(*(np.asarray(old[k].read()) for k in ("weights", "means", "variances")))
        except KeyError:
            state.mixture = None
        if md.get("content") != tiled_io.CLASSES_CONTENT and tiled_io.LABELS.key in old:
            state.labels = np.asarray(old[tiled_io.LABELS.key].read())
            state.n_labels = int(md.get("n_components") or 0)
        log.info("scan %s: resuming after its provisional result of %d temperatures", key, state.covered)

    def _keep_colours(self, result, state: _Followed):
        """Rename a fixed-K result's clusters after the previous update's, so colours stay put."""
        k = int(result.means.shape[0])
        if state.labels is None or state.n_labels != k or state.labels.shape != tuple(result.labels.shape):
            return result
        labels = np.asarray(result.labels[...])
        order = matching_permutation(labels, state.labels, k)
        if np.array_equal(order, np.arange(k)):
            return result
        inverse = np.argsort(order)  # row i of the renamed arrays is old row inverse[i]
        return dataclasses.replace(
            result, labels=rename(labels, order), means=result.means[inverse], variances=result.variances[inverse],
            weights=result.weights[inverse], counts=result.counts[inverse],
        )

    def _abort(self, uid: str, key: str, stop: dict) -> str | None:
        old = tiled_io.find_result(self.results_root, key)
        if old is None or (old.metadata or {}).get("status") != tiled_io.Status.PROVISIONAL:
            return None
        tiled_io.mark_aborted(old, stop)
        self.stats.aborted += 1
        log.info("scan %s ended with exit_status %r: provisional result marked aborted", uid, stop.get("exit_status"))
        return "aborted"

    def _alert(self, uid: str, scan, result, node, state: _Followed) -> None:
        """Announce each transition kind the first time this scan shows it."""
        if self.notify is None or result.classes is None:
            return
        fresh = []
        for c in result.classes:
            if c["kind"] in ALERT_KINDS and c["kind"] not in state.alerts and c["kind"] not in fresh:
                fresh.append(c["kind"])
                alert = ClassAlert(scan=uid, kind=c["kind"], label=int(c["label"]),
                                   tc=None if c.get("tc") is None else float(c["tc"]),
                                   temperature=float(scan.temperatures[-1]), n_temperatures=len(scan.temperatures),
                                   result=tiled_io.node_path(node), sample=scan.metadata.get("sample"))
                try:
                    self.notify(alert)
                except Exception as exc:
                    fresh.pop()
                    log.warning("could not send the %s alert for scan %s (%s); will try at the next update",
                                c["kind"], uid, type(exc).__name__)
                    continue
                self.stats.alerts += 1
        if fresh:
            state.alerts = [*state.alerts, *fresh]
            node.update_metadata(metadata={"alerts": state.alerts})
