"""The review server: the page, one filtered page of rows as JSON, row previews and verdicts.

Any web page the reviewer has open can send requests to a local server, so every request must name this
server in its ``Host`` header (a site whose name resolves to 127.0.0.1, DNS rebinding, does not), a browser
request must not come from another site (``Origin``, ``Sec-Fetch-Site``), and a verdict is read only from a
JSON body (a cross-site form cannot send one without the browser asking first). Errors are
``{"error": message}`` with a 4xx status for the client's mistakes; a failing request fails alone.
"""
from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import hdrs, web

from pipeline.local_server import known_host, same_origin
from pipeline.review.previews import PreviewError, Previews
from pipeline.review.table import Query, QueryError, ReviewTable

logger = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
SAME_SITE_FETCHES = frozenset({"same-origin", "none"})  # "none": typed into the address bar


@dataclass
class Review:
    """What the handlers share."""

    table: ReviewTable
    previews: Previews | None  # None: the table has no path column
    title: str
    extra_hosts: frozenset[str] = frozenset()  # Host names besides the listening address (its --host)


REVIEW = web.AppKey("review", Review)
THREADS = web.AppKey("threads", ThreadPoolExecutor)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def guard(request: web.Request, handler) -> web.StreamResponse:
    """Refuse requests that do not name this server, and browsers' requests from other sites; errors as JSON."""
    review = request.app[REVIEW]
    host = request.headers.get(hdrs.HOST, "")
    if not known_host(request, review.extra_hosts):
        return _error(400, f"the Host header {host!r} does not name this server; open it as http://127.0.0.1:<port>/")
    origin = request.headers.get(hdrs.ORIGIN)
    from_elsewhere = request.headers.get("Sec-Fetch-Site", "none") not in SAME_SITE_FETCHES
    foreign = origin is not None and not same_origin(origin, request, review.extra_hosts)
    if foreign or (from_elsewhere and request.path != "/"):
        return _error(403, "requests from other sites' pages are refused")  # a link to the page itself is fine
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)
    except Exception:  # noqa: BLE001 - logged; this request fails, the server keeps serving
        logger.exception("request %s %s failed", request.method, request.path)
        return _error(500, "internal error (see the server's log)")


async def page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE.read_text(encoding="utf-8"), content_type="text/html",
                        headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; "
                                                            "style-src 'unsafe-inline'; script-src 'unsafe-inline'"})


async def info(request: web.Request) -> web.Response:
    review = request.app[REVIEW]
    return web.json_response({"title": review.title, **review.table.info()})


async def rows(request: web.Request) -> web.Response:
    try:
        query = Query.from_params(request.query)
        return web.json_response(request.app[REVIEW].table.page(query))
    except QueryError as exc:
        return _error(400, str(exc))


def _row(request: web.Request, table: ReviewTable) -> dict[str, str]:
    """The cells of the row the URL names; 404 when there is none."""
    try:
        return table.row(int(request.match_info["row"]))
    except (ValueError, IndexError):
        raise web.HTTPNotFound(reason=f"no row {request.match_info['row']!r} (the table has {len(table)})") from None


async def preview(request: web.Request) -> web.Response:
    """The row's frame strip as JPEG, or 422 with the reason (an unreadable or refused video)."""
    review = request.app[REVIEW]
    if review.previews is None:
        return _error(404, "the table has no 'path' column, so rows have no videos")
    row = _row(request, review.table)
    loop = asyncio.get_running_loop()
    try:
        data = await loop.run_in_executor(request.app[THREADS], review.previews.strip, row)
    except PreviewError as exc:
        return _error(422, str(exc))
    return web.Response(body=data, content_type="image/jpeg")


async def mark(request: web.Request) -> web.Response:
    """Set or clear one row's verdict: ``{"row": 12, "review": "good" | "bad" | ""}`` as JSON."""
    if request.content_type != "application/json":
        return _error(415, "send the verdict as JSON with 'Content-Type: application/json'")
    try:
        body = json.loads(await request.read())
        row, verdict = body["row"], body["review"]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
        return _error(400, 'the body must be a JSON object {"row": <number>, "review": "good" | "bad" | ""}')
    table = request.app[REVIEW].table
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < len(table):
        return _error(400, f"row must be a row number below {len(table)}, not {row!r}")
    try:  # not in the preview threads, which may all be waiting on slow decodes
        when = await asyncio.to_thread(table.verdicts.mark, row, verdict)
    except ValueError as exc:
        return _error(400, str(exc))
    return web.json_response({"row": row, "review": verdict, "reviewed_at": when,
                              "reviews": table.verdicts.counts()})


async def _shut_down(app: web.Application) -> None:
    if app[REVIEW].previews is not None:
        app[REVIEW].previews.close()
    app[THREADS].shutdown(wait=False, cancel_futures=True)


def build_app(review: Review, threads: int) -> web.Application:
    """The application; ``threads`` make previews (most of them waiting on the decoder processes)."""
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app[REVIEW] = review
    app[THREADS] = ThreadPoolExecutor(threads, thread_name_prefix="review")
    app.router.add_get("/", page)
    app.router.add_get("/api/info", info)
    app.router.add_get("/api/rows", rows)
    app.router.add_get("/api/preview/{row}", preview)
    app.router.add_post("/api/review", mark)
    app.on_cleanup.append(_shut_down)
    return app
