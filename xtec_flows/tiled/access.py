"""What the plugin's Tiled key may do: scopes, and a write probe before any work."""

from __future__ import annotations

import logging

from .client import check_key, redact_secrets
from .errors import AccessDenied, denied_status
from .spec import DEFAULT_ROOT

log = logging.getLogger(__name__)

# What the plugin's key must be allowed: read runs, create and fill result containers.
WRITE_SCOPES = ("read:metadata", "read:data", "create:node", "write:metadata", "write:data")


def access_denied(what: str, error: BaseException) -> AccessDenied:
    status = denied_status(error)
    detail = redact_secrets(str(error).splitlines()[0] if str(error) else type(error).__name__)[:300]
    if status == 401:
        remedy = "the server does not accept the key: give a valid one in TILED_API_KEY or --api-key-file"
    else:
        remedy = ("the key lacks the scope or the access-policy grant: use the xtec-flows service key "
                  f"(scopes {', '.join(WRITE_SCOPES)}; deploy/tiled/bootstrap_access.py) and the 'derived' "
                  "tag's grant in access_tags.yml")
    return AccessDenied(f"Tiled refused to let this key {what} ({status}: {detail}); {remedy}")


def key_scopes(client) -> set[str] | None:
    """Scopes of the API key ``client`` uses, or None when the server cannot say (single-user
    servers and unauthenticated access have no per-key scopes)."""
    context = client.context
    key = getattr(context, "api_key", None)
    if not key or not context.server_info.authentication.links:
        return None
    try:
        me = context.whoami() or {}
    except Exception as exc:
        if denied_status(exc):
            raise access_denied("identify itself", exc) from None
        raise
    for record in me.get("api_keys", []):
        if record.get("first_eight") == key[:8]:
            return set(record.get("scopes") or [])
    return None


def check_key_scopes(client, root: str = DEFAULT_ROOT) -> None:
    """Raise AccessDenied when the key's scopes do not allow writing results (one request).

    A no-op where the server has no per-key scopes (single-user or anonymous servers).
    """
    scopes = key_scopes(client)
    if scopes is None:
        return
    missing = [s for s in WRITE_SCOPES if s not in scopes]
    if missing:
        raise AccessDenied(
            f"the Tiled API key lacks the scope(s) {', '.join(missing)} that xtec-flows needs to write "
            f"results under /{root.strip('/')} (it has: {', '.join(sorted(scopes)) or 'none'}); create the "
            "plugin's key with deploy/tiled/bootstrap_access.py or `tiled admin create-api-key` with "
            f"scopes {', '.join(WRITE_SCOPES)}")


def check_write_access(client, root: str = DEFAULT_ROOT):
    """Fail early, before any work, when this key cannot write results under ``root``.

    Checks the key's scopes, then creates and deletes an empty container under ``root``: only
    that proves the server's access policy lets this principal write there. Returns the
    derived root node.

    Raises
    ------
    AccessDenied : with what is missing and how to fix it; nothing has been written.
    """
    import secrets

    check_key_scopes(client, root)
    node = derived_root(client, root)
    key = f"access-probe-{secrets.token_hex(6)}"
    try:
        probe_node = node.create_container(key, metadata={"xtec_flows_probe": True})
    except Exception as exc:
        if denied_status(exc):
            raise access_denied(f"create results under /{root.strip('/')}", exc) from None
        raise
    try:
        probe_node.delete(recursive=True, external_only=False)
    except Exception as exc:
        log.warning("could not delete the access probe %s/%s: %s", root, key, type(exc).__name__)
    return node


def derived_root(client, root: str = DEFAULT_ROOT):
    """The container that holds results, created on first use.

    Raises AccessDenied when it is missing and this key may not create it (under an access
    policy the admin creates it: deploy/tiled/bootstrap_access.py containers).
    """
    node = client
    for part in [p for p in root.split("/") if p]:
        check_key(part, "derived-data root part")
        if part in node:
            node = node[part]
        else:
            try:
                node = node.create_container(part, metadata={"description": "XTEC clustering results (xtec-flows)"})
            except Exception as exc:
                if denied_status(exc):
                    raise access_denied(f"create the results container /{root.strip('/')} (have the Tiled "
                                         "admin create it: deploy/tiled/bootstrap_access.py containers)",
                                         exc) from None
                node = node[part]  # created concurrently by another worker: use theirs
    return node
