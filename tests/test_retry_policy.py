"""The retry policy: which failures are the input's fault (never re-submitted), which are the
network's (retried at once), and which are neither (re-submitted later, a bounded number of
times). Classified by exception type and the HTTP status of the response object, never by
text; checked on real httpx responses and against a real Tiled server."""

from __future__ import annotations

import errno

import httpx
import numpy as np
import pytest
from tiled_support import run_temperature_scan

from xtec_flows import tiled as tiled_io
from xtec_flows.engine import ClusterParams
from xtec_flows.tiled import process, watch
from xtec_flows.tiled.errors import FailureKind, failure_kind, http_status, is_retryable, is_transient_error

TEMPS = np.linspace(20.0, 300.0, 8)
PARAMS = ClusterParams(n_components=3, n_init=1)


def _http_error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://127.0.0.1:1/api/v1/metadata/raw/x")
    response = httpx.Response(status, request=request, json={"detail": "from the server"})
    return httpx.HTTPStatusError(f"{status} from the server", request=request, response=response)


def _raised_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise error from inner
    except BaseException as outer:
        return outer


@pytest.mark.parametrize("status, kind", [
    (400, FailureKind.PERMANENT), (404, FailureKind.PERMANENT), (410, FailureKind.PERMANENT),
    (422, FailureKind.PERMANENT), (401, FailureKind.UNKNOWN), (403, FailureKind.UNKNOWN),
    (408, FailureKind.TRANSIENT), (409, FailureKind.TRANSIENT), (429, FailureKind.TRANSIENT),
    (500, FailureKind.TRANSIENT), (502, FailureKind.TRANSIENT), (503, FailureKind.TRANSIENT),
])
def test_http_errors_are_classified_by_the_response_status(status, kind):
    error = _http_error(status)
    assert http_status(error) == status
    assert failure_kind(error) is kind
    # ... also when wrapped by whatever called the client
    assert failure_kind(_raised_from(RuntimeError("while reading block 3"), error)) is kind


@pytest.mark.parametrize("error, kind", [
    (ValueError("volume has 3 dims"), FailureKind.PERMANENT),
    (TypeError("temperatures must be numbers"), FailureKind.PERMANENT),
    (tiled_io.ScanNotReady("scan ended with exit_status 'abort'"), FailureKind.PERMANENT),
    (tiled_io.NodeNotFound("Tiled has no node 'raw/nope'"), FailureKind.PERMANENT),
    (MemoryError(), FailureKind.UNKNOWN),
    (OSError(errno.ENOSPC, "No space left on device"), FailureKind.UNKNOWN),
    (RuntimeError("lost a Dask worker"), FailureKind.UNKNOWN),
    (KeyboardInterrupt(), FailureKind.UNKNOWN),
    (KeyError("a bug deep inside"), FailureKind.UNKNOWN),
    (ConnectionError("connection reset"), FailureKind.TRANSIENT),
    (TimeoutError(), FailureKind.TRANSIENT),
    (httpx.ConnectError("refused"), FailureKind.TRANSIENT),
    (tiled_io.ResultBusy("another worker"), FailureKind.TRANSIENT),
    (tiled_io.AccessDenied("key lacks write:data"), FailureKind.UNKNOWN),
])
def test_exceptions_are_classified_by_type(error, kind):
    assert failure_kind(error) is kind
    assert is_transient_error(error) is (kind is FailureKind.TRANSIENT)


def test_the_text_of_an_error_decides_nothing():
    # "409" or "503" in a message without a response is not an HTTP status
    assert failure_kind(ValueError("field '409' has 3 dims")) is FailureKind.PERMANENT
    assert failure_kind(RuntimeError("server said 503")) is FailureKind.UNKNOWN
    assert http_status(RuntimeError("409 Conflict")) is None


def test_retryable_is_bounded_by_attempts():
    assert is_retryable(MemoryError(), attempt=1) and is_retryable(MemoryError(), attempt=tiled_io.MAX_ATTEMPTS - 1)
    assert not is_retryable(MemoryError(), attempt=tiled_io.MAX_ATTEMPTS)
    assert not is_retryable(ValueError("bad"), attempt=1)


# ------------------------------------------------------------------------ against Tiled


def test_failures_not_of_the_input_are_resubmitted_a_bounded_number_of_times(containers, monkeypatch):
    client, raw, root = containers
    uid = run_temperature_scan(raw, TEMPS, spatial_shape=(10, 10, 10), seed=3)
    scan_path = f"{raw.path_parts[-1]}/{uid}"
    key = tiled_io.result_key(uid, PARAMS.to_dict())
    params = PARAMS.to_dict()

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 40.0 GiB")

    monkeypatch.setattr(process, "run", out_of_memory)
    for attempt in range(1, tiled_io.MAX_ATTEMPTS + 1):
        with pytest.raises(MemoryError):
            process.process_scan(client, scan_path, PARAMS, root=root.path_parts[-1])
        md = root[key].metadata
        assert md["status"] == "failed" and md["failure_kind"] == "unknown" and md["attempt"] == attempt
        assert md["retryable"] is (attempt < tiled_io.MAX_ATTEMPTS)
        needing = watch.scans_needing_results(raw, root, params)
        assert needing == ([uid] if attempt < tiled_io.MAX_ATTEMPTS else [])
    assert watch.result_state(root, key) == watch.REJECTED
    # An operator's explicit re-run still works, and replaces the failed node.
    monkeypatch.undo()
    out = process.process_scan(client, scan_path, PARAMS, root=root.path_parts[-1])
    assert out.status == "complete" and not out.reused and root[key].metadata["status"] == "complete"


class _StaleView:
    """A results root that does not yet see a node another worker just created (the race
    between begin_result's check and its create); everything else goes to the real node."""

    def __init__(self, node):
        self._node = node

    def __contains__(self, key):
        return False

    def __getattr__(self, name):
        return getattr(self._node, name)

    def __getitem__(self, key):
        return self._node[key]


def test_a_result_created_concurrently_is_recognised_by_the_409_status(containers):
    client, raw, root = containers
    uid = run_temperature_scan(raw, TEMPS, spatial_shape=(10, 10, 10), seed=4)
    the_scan = tiled_io.open_scan(client, f"{raw.path_parts[-1]}/{uid}")
    key = tiled_io.result_key(uid, PARAMS.to_dict())
    root.create_container(key, metadata={"status": "running"})  # the other worker
    with pytest.raises(tiled_io.ResultBusy, match="being computed by another worker") as info:
        tiled_io.begin_result(_StaleView(root), key, the_scan, PARAMS.to_dict())
    assert http_status(info.value) == 409 and failure_kind(info.value) is FailureKind.TRANSIENT
    root[key].update_metadata(metadata={"status": "complete"})
    node, existing = tiled_io.begin_result(_StaleView(root), key, the_scan, PARAMS.to_dict())
    assert existing and node.metadata["status"] == "complete"
