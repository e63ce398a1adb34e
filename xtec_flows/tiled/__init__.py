"""The Tiled plugin: read temperature scans from a Tiled server, write XTEC results back.

Modules, in the order data flows through them:

- :mod:`.client`   connect, walk the tree, keep API keys out of logs
- :mod:`.errors`   exception types and the retry policy (which failures are the input's fault)
- :mod:`.arrays`   Tiled array nodes as lazily read dask arrays
- :mod:`.scans`    :func:`open_scan`: a run, container or array node -> :class:`TiledScan`
- :mod:`.spec`     the result contract, declared once: node names, dims, metadata keys, Status
- :mod:`.results`  the one writer and reader of that contract
- :mod:`.access`   what the key may do, checked before any work
- :mod:`.series`   importing a series (e.g. from NeXus) as an array node
- :mod:`.process`  one scan end to end: read -> cluster -> write (imports the engine)
- :mod:`.watch`    which scans need clustering, and a watcher that notices them
- :mod:`.live`     provisional results for scans still running, and alerts when a class appears
- :mod:`.compare`  a series of scans labelled by one stored model, tabulated (imports the engine)

The names below are the package's public API (``from xtec_flows import tiled as tiled_io``);
:mod:`.process`, :mod:`.watch` and :mod:`.live` are imported by name, since they pull in the engine.
"""

from .access import WRITE_SCOPES, check_key_scopes, check_write_access, derived_root, key_scopes
from .arrays import lazy_array, lazy_array_spatial
from .client import MAX_REQUEST_BYTES, check_key, connect, node_path, redact_secrets, redact_uri, walk
from .errors import (MAX_ATTEMPTS, AccessDenied, FailureKind, NodeNotFound, ResultBusy, ScanNotReady,
                     attempt_keys, failure_kind, http_status, is_retryable, is_transient_error)
from .results import (LoadedResult, begin_provisional, begin_result, class_scalars, class_table, fail_result, find_result,
                      find_results, json_safe, latest_result, load_model, load_result, mark_aborted, mark_superseded, reject_scan,
                      summarise, utc_now, write_labels_array, write_result)
from .scans import TiledScan, check_run_complete, open_scan
from .series import write_series
from .spec import (CLASS_CURVES, CLASS_LABELS, CLASS_METADATA_KEYS, CLASS_NODES, CLASS_TABLE,
                   CLASS_TABLE_COLUMNS, CLASSES_CONTENT, COMPONENTS, DEFAULT_ROOT, LABELS, RESULT_ARRAYS,
                   PROVISIONAL_KEYS, RESULT_SPEC, RESULT_SPEC_VERSION, NodeSpec, Status, engine_major,
                   result_key)

__all__ = [
    "WRITE_SCOPES",
    "check_key_scopes",
    "check_write_access",
    "derived_root",
    "key_scopes",
    "lazy_array",
    "lazy_array_spatial",
    "MAX_REQUEST_BYTES",
    "check_key",
    "connect",
    "node_path",
    "redact_secrets",
    "redact_uri",
    "walk",
    "MAX_ATTEMPTS",
    "attempt_keys",
    "AccessDenied",
    "FailureKind",
    "NodeNotFound",
    "ResultBusy",
    "ScanNotReady",
    "failure_kind",
    "http_status",
    "is_retryable",
    "is_transient_error",
    "LoadedResult",
    "begin_provisional",
    "begin_result",
    "class_scalars",
    "class_table",
    "fail_result",
    "find_result",
    "find_results",
    "json_safe",
    "latest_result",
    "load_model",
    "load_result",
    "mark_aborted",
    "mark_superseded",
    "reject_scan",
    "summarise",
    "utc_now",
    "write_labels_array",
    "write_result",
    "TiledScan",
    "check_run_complete",
    "open_scan",
    "write_series",
    "CLASS_CURVES",
    "CLASS_LABELS",
    "CLASS_METADATA_KEYS",
    "CLASS_NODES",
    "CLASS_TABLE",
    "CLASS_TABLE_COLUMNS",
    "CLASSES_CONTENT",
    "COMPONENTS",
    "DEFAULT_ROOT",
    "LABELS",
    "RESULT_ARRAYS",
    "PROVISIONAL_KEYS",
    "RESULT_SPEC",
    "RESULT_SPEC_VERSION",
    "NodeSpec",
    "Status",
    "engine_major",
    "result_key",
]
