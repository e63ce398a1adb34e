"""A results viewer in the browser (issue 16).

``xtec-flows view --tiled-uri URI`` serves :func:`app.make_app`: one page (``page.html``, vanilla
JS + canvas) whose JSON/binary endpoints read Tiled's public HTTP API with the user's key, added
server-side; :func:`offline.write_offline_view` writes the same page as one self-contained HTML
file. Nothing in the library imports this package (only the CLI does): it needs starlette and
httpx, which the numeric core does not.
"""

from .offline import write_offline_view

__all__ = ["make_app", "write_offline_view"]


def make_app(tiled_uri: str, api_key: str | None, root: str = "xtec", **kw):
    """See :func:`xtec_flows.viewer.app.make_app` (imported lazily: starlette is needed only to serve)."""
    from .app import make_app as _make_app

    return _make_app(tiled_uri, api_key, root, **kw)
