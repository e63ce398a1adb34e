"""Connecting to Tiled, walking its tree, and keeping keys out of logs.

API keys come from the caller or ``TILED_API_KEY`` and are never logged or stored: every URI
recorded in metadata is stripped of its query string (:func:`redact_uri`).
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import urlsplit, urlunsplit

from .errors import NodeNotFound

log = logging.getLogger(__name__)

# Requests to Tiled stay well under its 300 MB response limit and the client's
# 100 MB upload split.
MAX_REQUEST_BYTES = 64 << 20


def redact_uri(uri: str) -> str:
    """The URI without query string or credentials (safe to log and to store)."""
    parts = urlsplit(uri)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_secrets(text: str) -> str:
    """``text`` with any ``api_key=...`` value masked (error messages may quote URIs)."""
    return re.sub(r"(api_key=)[^&\s'\"]+", r"\1***", text)


def connect(uri: str, api_key: str | None = None, compress_transfers: bool = False):
    """A Tiled client for ``uri``; the key comes from ``api_key`` or ``TILED_API_KEY``.

    By default responses are requested uncompressed: processing runs next to the
    server (same host or facility network), where the server's per-request
    re-compression of stored chunks costs more than it saves (a 24x128^3
    read was 1.9x faster uncompressed on loopback; benchmarks/RESULTS.md, section tiled). Over a slow link,
    pass ``compress_transfers=True``.
    """
    from tiled.client import from_uri

    key = api_key or os.environ.get("TILED_API_KEY") or None
    log.info("connecting to %s", redact_uri(uri))
    headers = None if compress_transfers else {"accept-encoding": "identity"}
    return from_uri(uri, api_key=key, headers=headers)


def walk(client, path: str):
    node = client
    for part in [p for p in str(path).split("/") if p]:
        try:
            node = node[part]
        except KeyError:
            raise NodeNotFound(
                f"Tiled has no node {path!r} under {redact_uri(client.uri)} (missing part {part!r}); "
                "check the scan uid or node path"
            ) from None
    return node


def node_path(node) -> str:
    return "/" + "/".join(p for p in node.path_parts if p)


# Keys this package writes must be readable back: Tiled 0.2 accepts but cannot
# serve keys with '/', '?', '#', '%', and '.'/'..' (see notes).
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")


def check_key(key: str, what: str = "key") -> str:
    if not isinstance(key, str) or not _SAFE_KEY.match(key) or key in (".", ".."):
        raise ValueError(
            f"{what} {key!r} is not a node name Tiled can serve back; use letters, digits, '_', '-' and '.' "
            "(not first), at most 200 characters"
        )
    return key
