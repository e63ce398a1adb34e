"""The results viewer: a small ASGI (starlette) app serving one page and the JSON/binary endpoints
it calls, each answered by proxying Tiled's public HTTP API with the user's key added here,
server-side (the browser never sees the key, and Tiled's access policy holds).

Endpoints (``KEY`` = a result container's key under the results root)::

    GET /                                   the page (page.html)
    GET /api/results                        {"root", "results": [{key, status, content, uid, path, created}]}
    GET /api/result/KEY                     the result's description (reader.describe): shape, dims, coords,
                                            status, legend, temperatures, mean and fitted curves
    GET /api/labels/KEY?axis=A&index=I      int8 bytes, the labels on plane I across axis A (0=L, 1=K, 2=H),
                                            C order; header X-Shape: "rows,cols"
    GET /api/intensity/KEY?axis=A&index=I   float32 little-endian bytes, log10 of the scan's volume
                                            averaged over all temperatures on that plane (NaN: not positive)
    GET /api/trajectory/KEY?voxel=l,k,h     {"voxel", "label", "temperatures", "intensity" (raw, T),
                                            "curve" (in the mean curves' units), "mean_curve", "fit_curve"}

Errors answer ``{"error": message}`` with the HTTP status of the cause (401 wrong key, 404 unknown
result, 422 a result without labels, 400 a bad index, 502 Tiled unreachable).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np

from .reader import TiledReader, ViewerError, voxel_curve

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page.html")
#: Seconds between the page's polls of a result that is not final yet.
POLL_SECONDS = 2.0


def _int_param(request, name: str) -> int:
    value = request.query_params.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ViewerError(400, f"query parameter {name!r} must be an integer; got {value!r}") from None


def make_app(tiled_uri: str, api_key: str | None, root: str = "xtec", *, poll_seconds: float = POLL_SECONDS,
             timeout: float = 60.0):
    """The viewer as a starlette app reading results under ``root`` of the Tiled server ``tiled_uri``.

    ``api_key`` is sent to Tiled as ``Authorization: Apikey ...`` on every request and never
    logged or sent to the browser; None reads as an anonymous user (a public server).
    """
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    headers = {"Authorization": f"Apikey {api_key}"} if api_key else {}
    # trust_env=False: a proxy from the environment must not see the key (Tiled is usually local).
    http = httpx.Client(base_url=tiled_uri.rstrip("/"), headers=headers, timeout=timeout, trust_env=False)
    reader = TiledReader(http, root)
    # Final results never change: their descriptions are kept (a few kB each), so a slice request
    # costs one Tiled read, not three.
    described: dict[str, dict] = {}
    lock = threading.Lock()

    def description(key: str, fresh: bool = False) -> dict:
        with lock:
            cached = described.get(key)
        if cached is not None and not fresh:
            return cached
        d = reader.result(key)
        if d["final"]:
            with lock:
                described[key] = d
        return d

    def volume_path(key: str) -> str:
        d = description(key)
        if d["volume"] is None:
            raise ViewerError(404, f"the scan volume of result {key} ({d['source'].get('path')!r}) cannot be read; "
                                   "the scan may have been deleted or moved")
        return d["volume"]["path"]

    def guarded(endpoint):
        def run(request):
            try:
                return endpoint(request)
            except ViewerError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status)
        return run

    def page(request):
        html = PAGE.read_text(encoding="utf-8").replace("/*XTEC_CONFIG*/null",
                                                        f'{{"mode": "live", "poll_seconds": {float(poll_seconds)}}}')
        return HTMLResponse(html)

    def results(request):
        return JSONResponse({"root": reader.root, "results": reader.list_results()})

    def result(request):
        return JSONResponse(description(request.path_params["key"], fresh=True))

    def binary(values: np.ndarray) -> Response:
        return Response(np.ascontiguousarray(values).tobytes(), media_type="application/octet-stream",
                        headers={"X-Shape": ",".join(map(str, values.shape))})

    def labels(request):
        key = request.path_params["key"]
        return binary(reader.labels_slice(key, _int_param(request, "axis"), _int_param(request, "index"))
                      .astype(np.int8))

    def intensity(request):
        key = request.path_params["key"]
        plane = reader.intensity_slice(volume_path(key), _int_param(request, "axis"), _int_param(request, "index"))
        return binary(plane.astype("<f4"))

    def trajectory(request):
        key = request.path_params["key"]
        text = request.query_params.get("voxel", "")
        try:
            voxel = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise ViewerError(400, f"voxel must be comma-separated indices like 3,4,5; got {text!r}") from None
        d = description(key)
        label = reader.label_at(key, voxel)
        raw = reader.trajectory(volume_path(key), voxel)
        row = label if label >= 0 else None
        return JSONResponse({
            "voxel": list(voxel), "label": label, "temperatures": d["temperatures"],
            "intensity": raw.tolist(), "curve": voxel_curve(raw, d), "units": d["curve_units"],
            "mean_curve": d["mean_curves"][row] if row is not None and d["mean_curves"] else None,
            "fit_curve": d["fit_curves"][row] if row is not None and d["fit_curves"] else None,
        })

    routes = [
        Route("/", page),
        Route("/api/results", guarded(results)),
        Route("/api/result/{key}", guarded(result)),
        Route("/api/labels/{key}", guarded(labels)),
        Route("/api/intensity/{key}", guarded(intensity)),
        Route("/api/trajectory/{key}", guarded(trajectory)),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        http.close()

    return Starlette(routes=routes, lifespan=lifespan)
