"""Inside the Tiled server (not the client): the catalog tree the deploy/ configs and the
embedded default serve, with a guard against storage a rolled-back write left behind.

Why: tiled 0.2 creates a new array's zarr directory (``init_storage``) *before* it commits the
node's row to the catalog database. When the commit fails (the database connection dropped:
a PostgreSQL failover or restart, ``pg_terminate_backend``, a full disk), the row is rolled back
and the directory stays. Every later write of an array at that path then fails with HTTP 500
(zarr's ``ContainsArrayError``), and deleting the parent through the API does not remove the
directory, because the catalog never knew it. A result key hit that way could never be
written again (tests/test_production.py terminates the catalog's connections mid-write and
saw exactly that). The guard removes such a directory when a new node is created at its path.

That is safe because tiled flushes the new node's row before it initialises storage: a
second live node at the same path would have failed that flush with 409, so nothing the
catalog knows of can own the directory. Only file storage is guarded (a directory we can see);
other storage goes to tiled's own adapters unchanged.

Use: ``tree: xtec_flows.tiled.server:catalog`` in a Tiled config, with the same ``args`` as
``tree: catalog`` (it is tiled's own ``from_uri``; importing this module installs the guard).
"""

from __future__ import annotations

import logging
import shutil
from urllib.parse import quote_plus, urljoin

log = logging.getLogger(__name__)


def storage_directory(storage_uri: str, path_parts: list[str]):
    """The local directory tiled's zarr adapter gives a node at ``path_parts`` under file
    storage ``storage_uri`` (the formula of ``ZarrArrayAdapter.init_storage``)."""
    from tiled.utils import path_from_uri

    data_uri = urljoin(storage_uri + "/", "/".join(quote_plus(segment) for segment in path_parts))
    return path_from_uri(data_uri)


def _guarded_zarr_adapter():
    from tiled.adapters.zarr import ZarrArrayAdapter

    class OrphanSafeZarrArrayAdapter(ZarrArrayAdapter):
        """tiled's zarr array adapter, which first clears a directory no node owns (module docstring)."""

        @classmethod
        def init_storage(cls, storage, data_source, path_parts):
            if str(getattr(storage, "uri", "")).startswith("file:"):
                directory = storage_directory(storage.uri, list(path_parts))
                if directory.exists():
                    log.warning("removing %s: storage of an array whose creation was rolled back (no node owns "
                                "it; a new array is being created at its path)", directory)
                    shutil.rmtree(directory)
            return super().init_storage(storage, data_source, path_parts)

    return OrphanSafeZarrArrayAdapter


def install_storage_guard() -> None:
    """Make new zarr arrays go through :class:`OrphanSafeZarrArrayAdapter` in this process."""
    from tiled.catalog.adapter import STORAGE_ADAPTERS_BY_MIMETYPE
    from tiled.mimetypes import ZARR_MIMETYPE

    STORAGE_ADAPTERS_BY_MIMETYPE.set(ZARR_MIMETYPE, _guarded_zarr_adapter)


# What ``tree: xtec_flows.tiled.server:catalog`` names: tiled's own ``from_uri``, the very object
# (tiled gives that one its pool sizes and streaming cache only when it *is* ``from_uri``), with
# the guard installed as tiled imports this module to resolve the name.
from tiled.catalog import from_uri as catalog  # noqa: E402

install_storage_guard()
