"""What can go wrong, and whether trying again can help: the retry policy, declared once.

:func:`failure_kind` sorts an exception (following its ``__cause__``/``__context__`` chain)
into a :class:`FailureKind`, from its type and the HTTP status of the response it carries,
never from its text:

- ``permanent``: known to be the scan's or the parameters' fault, so a second try fails the
  same way: ValueError and TypeError (every input check in xtec-flows raises one), a node
  that does not exist (:class:`NodeNotFound`), an HTTP 4xx other than 408, 409 and 429;
- ``transient``: the network or the server, worth retrying at once: lost connections,
  timeouts, HTTP 5xx, 408, 409 and 429, a result another worker is still writing;
- ``unknown``: anything else (MemoryError, a full disk, a lost Dask worker, Ctrl-C): not
  the scan's fault, so retried later, but at most :data:`MAX_ATTEMPTS` times in all.
"""

from __future__ import annotations

import enum

#: Attempts at one result (first run included) before a failure that is not permanent stops
#: being re-submitted by watchers and schedules.
MAX_ATTEMPTS = 3
#: HTTP statuses below 500 that say "not now" rather than "never".
RETRYABLE_CLIENT_STATUSES = (408, 409, 429)


def attempt_keys(result_key: str, max_attempts: int = MAX_ATTEMPTS) -> list[str]:
    """The idempotency keys of a result's attempts 0, 1, ...: whatever submits the work (the
    Prefect submitter) creates attempt ``i`` under key ``i``, so repeats find it again."""
    return [f"{result_key}#{i}" for i in range(max_attempts)]


class FailureKind(str, enum.Enum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


class NodeNotFound(KeyError):
    """The scan or node path names nothing on the server (the input's fault)."""

    def __str__(self) -> str:  # KeyError quotes its argument; this is a sentence
        return str(self.args[0]) if self.args else ""


class ScanNotReady(ValueError):
    """The scan exists but cannot be processed (yet): running, failed, or incomplete."""


class AccessDenied(PermissionError):
    """The Tiled key may not do what xtec-flows needs; the message says what and how to fix it."""


class ResultBusy(RuntimeError):
    """The result node is being written by another worker right now."""


def _chain(error: BaseException):
    """``error``, then its causes and contexts, each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def http_status(error: BaseException) -> int | None:
    """The HTTP status of the first response in ``error``'s chain, or None."""
    import httpx

    for exc in _chain(error):
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code
    return None


def denied_status(error: BaseException) -> int | None:
    """401/403 when ``error`` (or its cause) is Tiled refusing the key, else None."""
    status = http_status(error)
    return status if status in (401, 403) else None


def failure_kind(error: BaseException) -> FailureKind:
    """Whether ``error`` is the input's fault, the network's, or neither (module docstring)."""
    import httpx

    for exc in _chain(error):
        if isinstance(exc, httpx.HTTPStatusError):
            status = exc.response.status_code
            if status >= 500 or status in RETRYABLE_CLIENT_STATUSES:
                return FailureKind.TRANSIENT
            if status in (401, 403):
                return FailureKind.UNKNOWN  # the key or its grant, fixed by an admin, not by the scan
            return FailureKind.PERMANENT
        if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError, ResultBusy)):
            return FailureKind.TRANSIENT
        if isinstance(exc, AccessDenied):
            return FailureKind.UNKNOWN
        if isinstance(exc, (ValueError, TypeError, NodeNotFound)):
            return FailureKind.PERMANENT
    return FailureKind.UNKNOWN


def is_transient_error(error: BaseException) -> bool:
    """Whether trying again at once could help (Prefect task retries)."""
    return failure_kind(error) is FailureKind.TRANSIENT


def is_retryable(error: BaseException, attempt: int = 1) -> bool:
    """Whether a later run may succeed where attempt number ``attempt`` failed with ``error``."""
    return failure_kind(error) is not FailureKind.PERMANENT and attempt < MAX_ATTEMPTS
