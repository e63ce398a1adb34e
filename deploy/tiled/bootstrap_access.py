#!/usr/bin/env python
"""Set up who may do what on a production Tiled server, once, as its admin.

    set -a; . /etc/xtec-flows/tiled.env; set +a          # the server's own environment
    python bootstrap_access.py all http://tiled-host:8000

Three steps, also runnable one by one (``all`` runs them in this order):

``principals URI``
    Creates the two service principals and their scoped API keys: ``xtec-flows`` (role user)
    and ``beamline-writer`` (role admin: tiled 0.2 grants "register" of external HDF5 to admins
    only). Prints, once, to standard output::

        XTEC_FLOWS_PRINCIPAL=<uuid>             BEAMLINE_WRITER_PRINCIPAL=<uuid>
        XTEC_FLOWS_TILED_API_KEY=<secret>       BEAMLINE_WRITER_TILED_API_KEY=<secret>

    The UUIDs are not secret: put them into tiled.env (``tags`` reads them from there). Put the
    keys into the services' environment files and keep them nowhere else.
``tags``
    Compiles access_tags.yml (next to this script; ``--tags`` for another file) into the catalog
    database named by TILED_CATALOG_DATABASE_URI, reading principals from
    TILED_AUTHN_DATABASE_URI. Run it again after editing the file; no restart needed.
``containers URI``
    Creates /raw (tag ``raw``, spec CatalogOfBlueskyRuns) and /xtec (tag ``derived``), which
    neither service may create itself. Existing containers are left as they are.

The admin logs in with TILED_ADMIN_PASSWORD from the environment (never the command line).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# Scopes of the keys. The access policy narrows them further per node (access_tags.yml).
# "create:apikeys", "revoke:apikeys": on a server with authentication providers a websocket
# subscription mints a short-lived key for itself and revokes it once connected
# (tiled.client.stream); without them the watcher can only poll.
XTEC_FLOWS_SCOPES = ["read:metadata", "read:data", "create:node", "write:metadata", "write:data", "delete:node",
                     "delete:revision", "create:apikeys", "revoke:apikeys"]
WRITER_SCOPES = ["read:metadata", "read:data", "create:node", "write:metadata", "write:data", "register"]

PRINCIPAL_VARS = ("XTEC_FLOWS_PRINCIPAL", "BEAMLINE_WRITER_PRINCIPAL")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class BootstrapError(Exception):
    """A step cannot run; the message names what is missing and how to supply it."""


def _require_env(name: str, why: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise BootstrapError(f"set {name} in the environment ({why})")
    return value


def admin_context(uri: str, provider: str, admin: str):
    """A tiled client Context logged in as the admin with TILED_ADMIN_PASSWORD."""
    from tiled.client import Context
    from tiled.client.context import password_grant

    password = _require_env("TILED_ADMIN_PASSWORD", "the admin's password; never on the command line")
    context, _ = Context.from_any_uri(uri)
    tokens = password_grant(context.http_client, f"{uri.rstrip('/')}/api/v1/auth/provider/{provider}/token",
                            provider, admin, password)
    context.configure_auth(tokens, remember_me=False)
    return context


def create_principals(context) -> dict[str, str]:
    plugin = context.admin.create_service_principal(role="user")
    writer = context.admin.create_service_principal(role="admin")
    plugin_key = context.admin.create_api_key(plugin["uuid"], scopes=XTEC_FLOWS_SCOPES, note="xtec-flows")
    writer_key = context.admin.create_api_key(writer["uuid"], scopes=WRITER_SCOPES, note="beamline-writer")
    return {
        "XTEC_FLOWS_PRINCIPAL": str(plugin["uuid"]),
        "BEAMLINE_WRITER_PRINCIPAL": str(writer["uuid"]),
        "XTEC_FLOWS_TILED_API_KEY": plugin_key["secret"],
        "BEAMLINE_WRITER_TILED_API_KEY": writer_key["secret"],
    }


def load_tag_config(path: Path, env: dict) -> dict:
    """access_tags.yml with every ${VAR} replaced from ``env``; a missing VAR is an error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BootstrapError(f"tag definitions {path} do not exist; pass --tags FILE") from None
    config = yaml.safe_load(text)  # parsed first, so ${...} in comments does not count
    needed = set()

    def substitute(value):
        if isinstance(value, dict):
            return {substitute(k): substitute(v) for k, v in value.items()}
        if isinstance(value, list):
            return [substitute(v) for v in value]
        if isinstance(value, str):
            needed.update(_VAR.findall(value))
            return _VAR.sub(lambda m: env.get(m.group(1)) or m.group(0), value)
        return value

    config = substitute(config)
    missing = sorted(name for name in needed if not env.get(name))
    if missing:
        raise BootstrapError(f"{path} needs {', '.join(missing)} in the environment: the UUIDs that "
                             "`bootstrap_access.py principals` printed (keep them in tiled.env)")
    if not isinstance(config, dict) or not isinstance(config.get("tags"), dict):
        raise BootstrapError(f"{path} must be a mapping with a 'tags' mapping (see deploy/tiled/access_tags.yml)")
    return config


async def compile_tags(config: dict, catalog_uri: str, authn_uri: str, provider: str) -> None:
    from tiled.access_control.access_tags import AccessTagsCompiler
    from tiled.access_control.scopes import ALL_SCOPES
    from tiled.server.connection_pool import close_database_connection_pool
    from tiled.server.settings import DatabaseSettings

    def no_groups(name):
        raise KeyError(name)  # groups need a group source (e.g. LDAP); this deployment names principals

    catalog = DatabaseSettings(uri=catalog_uri)
    authn = DatabaseSettings(uri=authn_uri)
    compiler = AccessTagsCompiler(sorted(ALL_SCOPES), config, catalog, no_groups,
                                  authn_database_settings=authn, provider=provider)
    try:
        compiler.load_tag_config()
        await compiler.load_principal_tags()
        await compiler.compile()
    finally:
        for settings in (catalog, authn):
            await close_database_connection_pool(settings)


def create_containers(context, raw: str, derived: str) -> list[str]:
    from tiled.client.constructors import from_context
    from tiled.structures.core import Spec

    root = from_context(context, remember_me=False)
    made = []
    for key, tags, specs, description in (
        (raw, ["raw"], [Spec("CatalogOfBlueskyRuns", version="3.0")], "Bluesky runs (beamline writer)"),
        (derived, ["derived"], [], "XTEC clustering results (xtec-flows)"),
    ):
        if key in root:
            continue
        root.create_container(key, metadata={"description": description}, specs=specs, access_tags=tags)
        made.append(key)
    return made


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["all", "principals", "tags", "containers"])
    parser.add_argument("uri", nargs="?", help="Tiled server URI (all, principals, containers)")
    parser.add_argument("--provider", default="local", help="authentication provider of the admin (config.yml)")
    parser.add_argument("--admin", default="admin", help="the admin's user name")
    parser.add_argument("--tags", type=Path, default=HERE / "access_tags.yml", help="tag definitions")
    parser.add_argument("--raw", default="raw", help="container for Bluesky runs")
    parser.add_argument("--derived", default="xtec", help="container for results (xtec-flows --root)")
    args = parser.parse_args(argv)
    if args.step != "tags" and not args.uri:
        parser.error(f"step {args.step!r} needs the Tiled server URI")
    env = dict(os.environ)
    try:
        context = admin_context(args.uri, args.provider, args.admin) if args.step != "tags" else None
        if args.step in ("all", "principals"):
            created = create_principals(context)
            env.update(created)
            for name, value in created.items():
                sys.stdout.write(f"{name}={value}\n")
            sys.stdout.flush()
        if args.step in ("all", "tags"):
            config = load_tag_config(args.tags, env)
            catalog = _require_env("TILED_CATALOG_DATABASE_URI", "the catalog database of config.yml")
            authn = _require_env("TILED_AUTHN_DATABASE_URI", "the authentication database of config.yml")
            asyncio.run(compile_tags(config, catalog, authn, args.provider))
            sys.stderr.write(f"compiled {len(config['tags'])} tags from {args.tags}\n")
        if args.step in ("all", "containers"):
            made = create_containers(context, args.raw, args.derived)
            sys.stderr.write(f"created containers: {', '.join(made) or 'none (they exist)'}\n")
    except BootstrapError as exc:
        sys.stderr.write(f"bootstrap_access.py {args.step}: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
