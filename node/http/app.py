"""The gateway's routes: health, metrics, status page, anonymize-stream, batch-prepare, STOW-RS.

`/api/` and `/dicomweb/` need `Authorization: Bearer <token>` (compared in constant time
with hmac.compare_digest); the rest is read-only and carries no PHI. Bodies are streamed
to data_dir/incoming/http and limited to [http] max_request_mb. Errors answer
`{"error": ...}` with a fixed text: never a value from the request or the data set.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from node import __version__, config, log, metrics, settle
from node.http import batches, page, stow, views
from node.http.body import BadBody, Part, TooLarge, media_type, read_json, remove, save_body, save_parts
from node.pipeline import CANNOT_DEIDENTIFY, Held, Pipeline, Rejected
from node.store import Store

#: Names batch-prepare accepts in Priority → (manifest Priority, queue priority).
PRIORITIES = {"STAT": ("STAT", 1), "HIGH": ("STAT", 1), "ROUTINE": ("ROUTINE", 0), "MEDIUM": ("ROUTINE", 0),
              "LOW": ("ROUTINE", -1)}
DICOM = "application/dicom"


@dataclass
class Context:
    """What the routes work with; built once by the supervisor."""

    settings: config.Settings
    pipeline: Pipeline  # the same pipeline (rules, key, store, spool, quarantine) as a C-STORE worker's
    store: Store
    token: str
    healthy: Callable[[], bool]  # the DICOM listeners are up
    batches: batches.Batches

    @property
    def http(self) -> config.HTTP:
        assert self.settings.http is not None
        return self.settings.http

    @property
    def incoming(self) -> Path:
        return self.settings.incoming_dir / "http"

    @property
    def limit(self) -> int:
        return self.http.max_request_mb * 1024 * 1024


class Refused(Exception):
    """A request answered with an error status and a fixed message (no value from the request)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def authorized(ctx: Context, request: Request) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), ctx.token.encode())


def build(ctx: Context) -> Starlette:
    """The ASGI application."""
    logger = log.get("http")

    def guarded(handler: Callable[[Context, Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            if not authorized(ctx, request):
                response: Response = error(401, "missing or invalid bearer token")
                response.headers["WWW-Authenticate"] = 'Bearer realm="telenode"'
                return response
            try:
                return await handler(ctx, request)
            except TooLarge:
                return error(413, f"request body larger than {ctx.http.max_request_mb} MB")
            except BadBody as exc:
                return error(400, str(exc))
            except Refused as exc:
                return error(exc.status, exc.message)
        return endpoint

    def plain(handler: Callable[[Context, Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await handler(ctx, request)
        return endpoint

    routes = [
        Route("/healthz", plain(healthz), methods=["GET"]),
        Route("/metrics", plain(metrics_text), methods=["GET"]),
        Route("/", plain(status_page), methods=["GET"]),
        Route("/api/anonymize-stream", guarded(anonymize_stream), methods=["POST"]),
        Route("/api/batch-prepare", guarded(batch_prepare), methods=["POST"]),
        Route("/api/batches/{batch_id}", guarded(batch_progress), methods=["GET"]),
        Route("/dicomweb/studies", guarded(stow_rs), methods=["POST"]),
        Route("/dicomweb/studies/{study}", guarded(stow_rs), methods=["POST"]),
    ]

    async def internal(request: Request, exc: Exception) -> Response:
        # The route's template, not the path: /dicomweb/studies/{study} carries an original UID.
        route = getattr(request.scope.get("route"), "path", "")
        logger.error("http_internal_error", route=route, reason=type(exc).__name__)
        return error(500, "internal error")

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, "not found")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return error(405, "method not allowed")

    return Starlette(routes=routes, exception_handlers={Exception: internal, 404: not_found, 405: not_allowed})


# -- no token ------------------------------------------------------------------------------------


async def healthz(ctx: Context, request: Request) -> Response:
    def check() -> bool:
        ctx.store.status()  # the store answers
        return ctx.healthy()

    try:
        ok = await run_in_threadpool(check)
    except Exception:
        ok = False
    return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)


async def metrics_text(ctx: Context, request: Request) -> Response:
    names = tuple(d.name for d in ctx.settings.destinations)
    waiting = partial(settle.waiting, ctx.settings.received_dir)
    body = await run_in_threadpool(metrics.exposition, metrics.QueueCollector(ctx.store.status, names, waiting))
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def status_page(ctx: Context, request: Request) -> Response:
    settings = ctx.settings
    snapshot = await run_in_threadpool(views.snapshot, ctx.store, settings.database, settings.quarantine_dir,
                                       tuple(d.name for d in settings.destinations))
    return HTMLResponse(page.render(snapshot, ae_title=settings.ae_title, version=__version__,
                                    refresh=ctx.http.page_refresh_seconds))


# -- /api/ -----------------------------------------------------------------------------------------


async def _upload(ctx: Context, request: Request) -> list[Part]:
    """The uploaded file(s): multipart/form-data (field `file`) or the body itself (application/dicom)."""
    kind, options = media_type(request.headers.get("content-type", ""))
    if kind.startswith("multipart/"):
        return await save_parts(request.stream(), options.get("boundary", ""), ctx.incoming, ctx.limit)
    if kind in (DICOM, "application/octet-stream"):
        return [await save_body(request.stream(), ctx.incoming, ctx.limit)]
    raise BadBody("send the file as multipart/form-data (field 'file') or application/dicom")


async def anonymize_stream(ctx: Context, request: Request) -> Response:
    parts = await _upload(ctx, request)
    if len(parts) == 1 and not parts[0].field_name:  # an application/dicom body
        chosen: Part | None = parts[0]
    else:
        chosen = next((p for p in parts if p.field_name == "file"), None)
    if chosen is None or chosen.path.stat().st_size == 0:
        remove(parts)
        return error(400, "no file: send it in the form field 'file' or as an application/dicom body")
    target = chosen.path.with_suffix(".out")
    logger = log.get("http")
    try:
        record = await run_in_threadpool(ctx.pipeline.stage, chosen.path, target)
    except Rejected as exc:  # comments name rules and tags, never values
        target.unlink(missing_ok=True)
        logger.warning("anonymize_stream_refused", status=f"0x{exc.status:04X}", reason=exc.comment)
        if exc.status == CANNOT_DEIDENTIFY:
            return error(422, exc.comment, quarantine_id=None)
        return error(400, f"not a DICOM file we can read: {exc.comment}")
    except Held as exc:
        logger.warning("anonymize_stream_quarantined", reason=exc.reason, quarantine_id=exc.quarantine_id)
        return error(422, exc.reason, quarantine_id=exc.quarantine_id)
    finally:
        remove(parts)
    logger.info("anonymize_stream", sop_instance_uid=record.pseudo_sop_instance_uid,
                study_instance_uid=record.pseudo_study_instance_uid)
    headers = {"X-Cloud-Study-Id": batches.cloud_study_id(record),
               "X-Processed-At": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return FileResponse(target, media_type=DICOM, headers=headers,
                        background=BackgroundTask(target.unlink, missing_ok=True))


async def batch_prepare(ctx: Context, request: Request) -> Response:
    prepared = _batch_request(ctx, await read_json(request.stream()))
    batch = await run_in_threadpool(ctx.batches.start, prepared)
    finished = await run_in_threadpool(batch.done.wait, ctx.http.batch_wait_seconds)
    if finished:
        return JSONResponse(batch.result())
    location = f"/api/batches/{batch.batch_id}"
    return JSONResponse({**batch.result(), **batch.progress(), "ProgressUrl": location}, status_code=202,
                        headers={"Location": location})


def _batch_request(ctx: Context, raw: Any) -> batches.Request:
    """Validate the JSON; the folder check comes last and answers 403 before 404."""
    if not isinstance(raw, dict) or not isinstance(raw.get("StudyDirectory"), str) or not raw["StudyDirectory"]:
        raise Refused(400, "StudyDirectory (a folder path) is required")
    priority = PRIORITIES.get(str(raw.get("Priority", "ROUTINE")).upper())
    if priority is None:
        raise Refused(400, "Priority must be ROUTINE or STAT")
    organization = raw.get("OrganizationId")
    if organization is not None and organization != ctx.settings.organization:
        raise Refused(400, "OrganizationId does not match this node's [anonymization] organization")
    wanted = raw.get("Destinations") or []
    known = {d.name for d in ctx.settings.destinations}
    if not isinstance(wanted, list) or not all(isinstance(d, str) and d in known for d in wanted):
        raise Refused(400, f"Destinations must name configured destinations ({', '.join(sorted(known))})")
    try:
        folder = batches.resolve_folder(raw["StudyDirectory"], ctx.http.allowed_roots)
    except batches.Outside:
        raise Refused(403, "StudyDirectory is outside the allowed roots") from None
    except batches.Missing:
        raise Refused(404, "StudyDirectory does not exist") from None
    return batches.Request(folder, priority[0], priority[1], tuple(dict.fromkeys(wanted)))


async def batch_progress(ctx: Context, request: Request) -> Response:
    found = ctx.batches.get(request.path_params["batch_id"])
    return JSONResponse(found) if found is not None else error(404, "no such batch")


# -- /dicomweb/ ------------------------------------------------------------------------------------


async def stow_rs(ctx: Context, request: Request) -> Response:
    kind, options = media_type(request.headers.get("content-type", ""))
    if kind != "multipart/related" or options.get("type", DICOM).lower() != DICOM:
        return error(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    started = time.perf_counter()
    parts = await save_parts(request.stream(), options.get("boundary", ""), ctx.incoming, ctx.limit)
    try:
        if not parts:
            return error(400, "no instances in the request")
        study = request.path_params.get("study", "")
        results = [await run_in_threadpool(stow.ingest, ctx.pipeline, part, study) for part in parts]
    finally:
        remove(parts)
    status, body = stow.response(results)
    log.get("http").info("stow_received", instances=len(results), stored=sum(1 for r in results if not r.status),
                         ms=round((time.perf_counter() - started) * 1000, 1))
    return JSONResponse(body, status_code=status, media_type=stow.MEDIA_TYPE)
