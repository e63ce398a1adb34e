"""Which scans need clustering, and a watcher that notices them as they complete.

The Tiled side of automatic processing. It knows nothing about Prefect: whatever
runs the clustering is passed in as ``submit(uid)`` (the flows package passes a
function that starts a Prefect deployment run). Three ways a completed scan is
noticed, because each alone can miss one:

* the websocket subscription on the raw-runs container: a run's metadata update
  that carries the ``stop`` document (seconds after the scan ends);
* a catch-up query for completed, successful scans without a complete result, at
  start-up, after the subscription is lost, and every ``reconcile_seconds``
  (a streaming cache such as Redis can drop events without disconnecting);
* polling with the same query when the server offers no websocket streaming.

Submissions that fail (the orchestrator is down) are kept and retried; nothing is
written to Tiled here.
"""

from __future__ import annotations

import datetime as _dt
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .. import tiled as tiled_io

log = logging.getLogger(__name__)

#: Result states after which nothing more is to be done for a (scan, parameters) pair.
DONE = "done"
#: A result exists but is not finished (running, or failed for a transient reason).
UNFINISHED = "unfinished"
#: No result exists yet.
MISSING = "missing"
#: The result failed because of the data or parameters: re-running would fail again.
REJECTED = "rejected"


@dataclass(frozen=True)
class ScanRule:
    """Which completed runs are temperature scans to cluster.

    plan_names : accept only runs whose start document's ``plan_name`` is one of these
        (empty: any plan)
    start_key : the start document must have this key (e.g. "sample"); dotted keys
        reach into nested dicts
    start_value : if given, ``start[start_key]`` must equal it (compared as strings)
    required_fields : data keys the run's ``stream`` must have (e.g. the volume field)
    stream : the event stream holding the volumes
    """

    plan_names: tuple[str, ...] = ()
    start_key: str | None = None
    start_value: str | None = None
    required_fields: tuple[str, ...] = ()
    stream: str = "primary"

    def __post_init__(self):
        if isinstance(self.plan_names, str) or isinstance(self.required_fields, str):
            raise TypeError("ScanRule.plan_names and required_fields must be sequences of names, not a string")
        object.__setattr__(self, "plan_names", tuple(self.plan_names))
        object.__setattr__(self, "required_fields", tuple(self.required_fields))
        if self.start_value is not None and not self.start_key:
            raise ValueError("ScanRule.start_value needs start_key (the start-document key to compare)")

    def queries(self) -> list:
        """Tiled queries selecting completed, successful runs this rule may accept."""
        from tiled.queries import Eq, In, Key, KeyPresent

        qs = [Eq("stop.exit_status", "success")]
        if self.plan_names:
            qs.append(In("start.plan_name", list(self.plan_names)))
        if self.start_key:
            key = f"start.{self.start_key}"
            qs.append(KeyPresent(key) if self.start_value is None else Key(key) == self.start_value)
        return qs

    def check(self, metadata: dict, data_keys: Iterable[str] | None = None) -> str | None:
        """Why a run does not qualify (a message), or None when it does.

        metadata : the run container's metadata ({"start": ..., "stop": ...})
        data_keys : the data keys of ``stream`` (None: not checked)
        """
        start = metadata.get("start") or {}
        stop = metadata.get("stop") or {}
        uid = start.get("uid", "?")
        if not stop:
            return f"scan {uid} has not finished (no stop document)"
        if stop.get("exit_status") != "success":
            return f"scan {uid} ended with exit_status {stop.get('exit_status')!r}; only successful scans are clustered"
        reason = self.check_start(start)
        if reason is not None:
            return reason
        if data_keys is not None and self.required_fields:
            missing = [f for f in self.required_fields if f not in set(data_keys)]
            if missing:
                return f"scan {uid} stream {self.stream!r} lacks required field(s) {missing}"
        return None

    def check_start(self, start: dict) -> str | None:
        """Why a run's start document does not qualify (a message), or None (running scans too)."""
        uid = start.get("uid", "?")
        if self.plan_names and start.get("plan_name") not in self.plan_names:
            return f"scan {uid} ran plan {start.get('plan_name')!r}, not one of {list(self.plan_names)}"
        if self.start_key:
            value = _dotted(start, self.start_key)
            if value is _MISSING:
                return f"scan {uid} has no start-document key {self.start_key!r}"
            if self.start_value is not None and str(value) != str(self.start_value):
                return f"scan {uid} has {self.start_key}={value!r}, not {self.start_value!r}"
        return None

    def to_dict(self) -> dict:
        return {"plan_names": list(self.plan_names), "start_key": self.start_key, "start_value": self.start_value,
                "required_fields": list(self.required_fields), "stream": self.stream}


_MISSING = object()


def _dotted(doc: dict, key: str):
    node = doc
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def stop_document(metadata: dict) -> dict | None:
    """The stop document in a child-metadata-updated payload.

    Tiled 0.2.20 nests the metadata one level deeper when a streaming cache is on
    (``payload["metadata"]["metadata"]["stop"]``); both shapes are accepted.
    """
    md = metadata or {}
    if "stop" not in md and isinstance(md.get("metadata"), dict):
        md = md["metadata"]
    return md.get("stop")


def result_states(results_root) -> dict[str, str]:
    """State of every result under the derived root, by result key (one paged listing).

    Returns {key: DONE | UNFINISHED | REJECTED}; a key that is absent is MISSING.
    """
    states = {}
    for key, node in results_root.items():
        states[key] = state_of_metadata(node.metadata or {})
    return states


def state_of_metadata(md: dict) -> str:
    """DONE, REJECTED or UNFINISHED, from a result node's metadata."""
    status = md.get("status")
    if status == tiled_io.Status.COMPLETE:
        return DONE
    if status == tiled_io.Status.FAILED and md.get("retryable") is False:
        return REJECTED
    return UNFINISHED


def result_state(results_root, key: str) -> str:
    """State of one result (MISSING when there is none)."""
    node = tiled_io.find_result(results_root, key)
    return MISSING if node is None else state_of_metadata(node.metadata or {})


def is_mongo_catalog(raw) -> bool:
    """Whether ``raw`` is databroker's MongoDB-backed catalog (spec CatalogOfBlueskyRuns 1)."""
    return any(s.name == "CatalogOfBlueskyRuns" and str(s.version).startswith("1") for s in (raw.specs or []))


def completed_scans(raw, rule: ScanRule = ScanRule(), *, since: float | None = None, until: float | None = None):
    """Uids of completed, successful runs in ``raw`` that the rule's queries select, oldest first.

    since, until : start.time bounds (POSIX seconds), inclusive / exclusive
    """
    from tiled.queries import Key

    # databroker's MongoAdapter applies every query to the start document (it strips "start."
    # and searches run_start), so a stop.* query matches nothing there; rule.check() below reads
    # exit_status from each stop document instead. It sorts by run_start keys too ("time").
    mongo = is_mongo_catalog(raw)
    hits = raw
    for q in rule.queries():
        if mongo and getattr(q, "key", "").startswith("stop."):
            continue
        hits = hits.search(q)
    if since is not None:
        hits = hits.search(Key("start.time") >= float(since))
    if until is not None:
        hits = hits.search(Key("start.time") < float(until))
    out = []
    for key, node in hits.sort(("time" if mongo else "start.time", 1)).items():
        if rule.check(node.metadata or {}) is None:
            out.append(key)
    return out


def scans_needing_results(raw, results_root, params: dict, rule: ScanRule = ScanRule(), *,
                          since: float | None = None, until: float | None = None) -> list[str]:
    """Completed scans selected by ``rule`` that have no complete (or rejected) result for ``params``."""
    states = result_states(results_root)
    return [uid for uid in completed_scans(raw, rule, since=since, until=until)
            if states.get(tiled_io.result_key(uid, params), MISSING) in (MISSING, UNFINISHED)]


def select_for_reprocessing(raw, results_root, params: dict, rule: ScanRule = ScanRule(), *,
                            since: float | None = None, until: float | None = None,
                            which: str = "outdated") -> list[str]:
    """Scans to (re)cluster with ``params``.

    which : "outdated" - scans whose only complete results were made with other parameters
                or another engine version (they lack one for ``params``)
            "missing" - scans with no complete result at all
            "all" - every selected scan without a complete result for ``params``
    Scans that already have a complete result for ``params`` are never selected (idempotent).
    """
    if which not in ("outdated", "missing", "all"):
        raise ValueError(f"which must be one of 'outdated', 'missing', 'all'; got {which!r}")
    # One paged listing gives both each result's state and which scans have any complete result.
    states: dict[str, str] = {}
    has_complete: set = set()
    for key, node in results_root.items():
        md = node.metadata or {}
        states[key] = state_of_metadata(md)
        if states[key] == DONE:
            has_complete.add((md.get("source") or {}).get("uid"))
    out = []
    for uid in completed_scans(raw, rule, since=since, until=until):
        key = tiled_io.result_key(uid, params)
        if states.get(key, MISSING) in (DONE, REJECTED):
            continue
        has_other = uid in has_complete
        if which == "all" or (which == "outdated" and has_other) or (which == "missing" and not has_other):
            out.append(uid)
    return out


@dataclass
class WatcherStats:
    """Counters a watcher keeps (for logs, tests and the demo)."""

    events: int = 0
    catch_ups: int = 0
    submissions: int = 0
    skipped: dict = field(default_factory=dict)
    submit_errors: int = 0
    disconnects: int = 0
    mode: str = "starting"


class ScanWatcher:
    """Notice completed scans in a Tiled container and hand each to ``submit`` once.

    Parameters
    ----------
    raw : tiled container client holding the bluesky runs (e.g. ``client["raw"]``)
    results_root : tiled container client holding the results (e.g. ``client["xtec"]``)
    params : clustering parameters (dict, as ``ClusterParams.to_dict()``): they decide the result key
    submit : ``callable(uid)``; raising means "not submitted, try again later". It must itself be
        idempotent per (uid, params) (the flows package uses Prefect idempotency keys), because a
        scan can be noticed more than once (event + catch-up).
    rule : which runs qualify
    reconcile_seconds : period of the catch-up query while subscribed (and of polling when the
        server has no websocket streaming)
    lookback_seconds : catch-up only considers scans started this long ago or later (None: all)
    retry_seconds : wait before re-trying submissions that failed
    """

    def __init__(self, raw, results_root, params: dict, submit: Callable[[str], object], *,
                 rule: ScanRule = ScanRule(), reconcile_seconds: float = 60.0,
                 lookback_seconds: float | None = 7 * 86400.0, retry_seconds: float = 5.0,
                 subscribe_timeout: float = 10.0):
        if reconcile_seconds <= 0 or retry_seconds <= 0:
            raise ValueError("reconcile_seconds and retry_seconds must be positive")
        self.raw = raw
        self.results_root = results_root
        self.params = dict(params)
        self.submit = submit
        self.rule = rule
        self.reconcile_seconds = float(reconcile_seconds)
        self.lookback_seconds = lookback_seconds
        self.retry_seconds = float(retry_seconds)
        self.subscribe_timeout = float(subscribe_timeout)
        self.stats = WatcherStats()
        self._events: queue.Queue = queue.Queue()
        self._pending: dict[str, float] = {}  # uid -> time of next submission attempt
        self._stop = threading.Event()
        self._subscription = None
        self._lost = threading.Event()

    # -- subscription callbacks (run on tiled's subscription thread: only enqueue) ----------
    def _on_metadata_updated(self, update) -> None:
        stop = stop_document(update.metadata)
        if stop is not None:
            self._events.put(update.key)

    def _on_disconnected(self, _subscription) -> None:
        self._lost.set()
        self._events.put(None)  # wake the loop

    # -- public -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask :meth:`run` to return (thread-safe)."""
        self._stop.set()
        self._events.put(None)

    def run(self) -> None:
        """Watch until :meth:`stop` is called. Blocking; run it in a thread of its own."""
        self._subscribe()
        self.catch_up()
        next_reconcile = time.monotonic() + self.reconcile_seconds
        try:
            while not self._stop.is_set():
                timeout = max(0.0, min([next_reconcile, *self._pending.values()]) - time.monotonic())
                try:
                    uid = self._events.get(timeout=timeout)
                except queue.Empty:
                    uid = None
                if self._stop.is_set():
                    break
                if uid is not None:
                    self.stats.events += 1
                    self._consider(uid)
                if self._lost.is_set():
                    self._lost.clear()
                    self.stats.disconnects += 1
                    log.warning("lost the Tiled subscription on %s; re-subscribing and catching up",
                                tiled_io.node_path(self.raw))
                    self._subscribe()
                    self.catch_up()
                    next_reconcile = time.monotonic() + self.reconcile_seconds
                if time.monotonic() >= next_reconcile:
                    if self._subscription is None:
                        self._subscribe()
                    self.catch_up()
                    next_reconcile = time.monotonic() + self.reconcile_seconds
                self._retry_pending()
        finally:
            self._unsubscribe()

    def catch_up(self) -> list[str]:
        """Submit every completed scan in the look-back window that lacks a complete result."""
        since = None if self.lookback_seconds is None else time.time() - self.lookback_seconds
        try:
            uids = scans_needing_results(self.raw, self.results_root, self.params, self.rule, since=since)
        except Exception as exc:  # the server may be restarting; the next reconcile tries again
            log.warning("catch-up query failed (%s: %s); will try again",
                        type(exc).__name__, tiled_io.redact_secrets(str(exc)))
            return []
        self.stats.catch_ups += 1
        if uids:
            log.info("catch-up: %d completed scan(s) without a complete result", len(uids))
        for uid in uids:
            self._consider(uid, checked=not self.rule.required_fields)
        return uids

    # -- internals --------------------------------------------------------------------------
    def _subscribe(self) -> None:
        self._unsubscribe()
        try:
            sub = self.raw.subscribe()
        except Exception as exc:
            self._polling(f"cannot subscribe ({type(exc).__name__})")
            return
        sub.child_metadata_updated.add_callback(self._on_metadata_updated)
        sub.disconnected.add_callback(self._on_disconnected)
        # start_in_thread() blocks until connected and never returns on a server without a
        # streaming cache (its thread dies on HTTP 500), so connect in a helper thread and give up
        # after a timeout.
        errors = []

        def connect():
            try:
                sub.start_in_thread()
            except Exception as exc:  # pragma: no cover - depends on the server
                errors.append(exc)

        t = threading.Thread(target=connect, daemon=True, name="xtec-watch-subscribe")
        t.start()
        t.join(self.subscribe_timeout)
        if t.is_alive() or errors or not sub._connected_event.is_set():
            reason = f"{type(errors[0]).__name__}" if errors else "no answer"
            try:
                sub.disconnect(wait=False)
            except Exception:
                pass
            self._polling(f"websocket subscription failed ({reason}); the server may have no streaming cache")
            return
        self._subscription = sub
        self._lost.clear()
        self.stats.mode = "subscribed"
        log.info("subscribed to completed scans in %s (catch-up every %.0f s)",
                 tiled_io.node_path(self.raw) or "/", self.reconcile_seconds)

    def _polling(self, reason: str) -> None:
        if self.stats.mode != "polling":
            log.warning("%s: polling every %.0f s instead", reason, self.reconcile_seconds)
        self.stats.mode = "polling"
        self._subscription = None

    def _unsubscribe(self) -> None:
        sub, self._subscription = self._subscription, None
        if sub is not None:
            try:
                sub.disconnected.remove_callback(self._on_disconnected)
                sub.disconnect(wait=False)
            except Exception:
                pass

    def _consider(self, uid: str, checked: bool = False) -> None:
        """Submit ``uid`` if it qualifies and has no finished result."""
        if not checked:
            try:
                reason = self._qualifies(uid)
            except Exception as exc:
                log.warning("could not inspect scan %s (%s); will try again", uid, type(exc).__name__)
                self._pending.setdefault(uid, time.monotonic() + self.retry_seconds)
                return
            if reason is not None:
                if self.stats.skipped.get(uid) != reason:
                    log.info("skipping: %s", reason)
                self.stats.skipped[uid] = reason
                return
        self._submit(uid)

    def _qualifies(self, uid: str) -> str | None:
        node = self.raw[uid]
        md = node.metadata or {}
        data_keys = None
        if self.rule.required_fields:
            try:
                stream_md = node[self.rule.stream].metadata or {}
            except KeyError:
                stream_md = {}
            data_keys = list((stream_md.get("data_keys") or {}).keys())
            for descriptor in stream_md.get("descriptors") or []:  # databroker's MongoDB stream
                data_keys += list((descriptor.get("data_keys") or {}).keys())
        reason = self.rule.check(md, data_keys)
        if reason is not None:
            return reason
        state = result_state(self.results_root, tiled_io.result_key(uid, self.params))
        if state == DONE:
            return f"scan {uid} already has a complete result"
        if state == REJECTED:
            return f"scan {uid} was rejected earlier (its result records why); not retried"
        return None

    def _submit(self, uid: str) -> None:
        try:
            self.submit(uid)
        except Exception as exc:
            self.stats.submit_errors += 1
            log.warning("could not submit scan %s (%s: %s); retrying in %.0f s", uid, type(exc).__name__,
                        tiled_io.redact_secrets(str(exc))[:300], self.retry_seconds)
            self._pending[uid] = time.monotonic() + self.retry_seconds
            return
        self._pending.pop(uid, None)
        self.stats.submissions += 1

    def _retry_pending(self) -> None:
        now = time.monotonic()
        for uid, when in list(self._pending.items()):
            if when <= now and not self._stop.is_set():
                self._pending.pop(uid, None)
                self._consider(uid)


def utc_timestamp(value: str | float | None) -> float | None:
    """POSIX seconds from an ISO date/datetime string (UTC when no zone is given) or a number."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        t = _dt.datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise ValueError(f"expected an ISO date or datetime such as 2026-11-25T08:00; got {value!r}") from exc
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()
