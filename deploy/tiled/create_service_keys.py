#!/usr/bin/env python
"""Create the two service principals and their scoped API keys on a production Tiled server.

    TILED_ADMIN_PASSWORD=... python create_service_keys.py http://tiled-host:8000

Prints one line per key (NAME=SECRET) to standard output, once: put them into the services'
environment files (TILED_API_KEY for xtec-flows, the acquisition host's TiledWriter key) and
keep them nowhere else. Run it again to rotate keys (old keys stay valid until revoked with
`tiled admin`).
"""

from __future__ import annotations

import argparse
import os
import sys

# Scopes: the plugin reads runs and writes results; the beamline writer writes runs and
# registers external detector files (tiled 0.2 grants "register" to admin principals only).
# "create:apikeys", "revoke:apikeys": on a server with authentication providers a websocket subscription mints a
# short-lived key for itself and revokes it once connected (tiled.client.stream); without them the
# watcher can only poll.
XTEC_FLOWS_SCOPES = ["read:metadata", "read:data", "create:node", "write:metadata", "write:data", "delete:node",
                     "delete:revision", "create:apikeys", "revoke:apikeys"]
WRITER_SCOPES = ["read:metadata", "read:data", "create:node", "write:metadata", "write:data", "register"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri", help="Tiled server URI")
    parser.add_argument("--provider", default="local")
    parser.add_argument("--admin", default="admin")
    args = parser.parse_args()
    password = os.environ.get("TILED_ADMIN_PASSWORD")
    if not password:
        parser.error("set TILED_ADMIN_PASSWORD in the environment (never on the command line)")

    from tiled.client import Context
    from tiled.client.context import password_grant

    ctx, _ = Context.from_any_uri(args.uri)
    tokens = password_grant(ctx.http_client, f"{args.uri.rstrip('/')}/api/v1/auth/provider/{args.provider}/token",
                            args.provider, args.admin, password)
    ctx.configure_auth(tokens, remember_me=False)
    plugin = ctx.admin.create_service_principal(role="user")
    writer = ctx.admin.create_service_principal(role="admin")
    plugin_key = ctx.admin.create_api_key(plugin["uuid"], scopes=XTEC_FLOWS_SCOPES, note="xtec-flows")
    writer_key = ctx.admin.create_api_key(writer["uuid"], scopes=WRITER_SCOPES, note="beamline-writer")
    sys.stdout.write(f"XTEC_FLOWS_TILED_API_KEY={plugin_key['secret']}\n")
    sys.stdout.write(f"BEAMLINE_WRITER_TILED_API_KEY={writer_key['secret']}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
