"""The metrics port of a gateway or worker: `/metrics` (Prometheus text format, from
prometheus-client's own WSGI app) and any pages the process adds (the gateway's fleet
page), served by prometheus-client's threading WSGI server in a thread of its own.

Routes run in that thread: a route that reads the process's asyncio state asks the
event loop for it (`on_loop`) instead of reading structures the loop is changing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@dataclass(frozen=True)
class Page:
    """A route: the response body and its content type."""

    content_type: str
    body: Callable[[], bytes]


def json_page(fn: Callable[[], object]) -> Page:
    return Page("application/json", lambda: json.dumps(fn(), separators=(",", ":")).encode())


def on_loop(
    loop: asyncio.AbstractEventLoop, fn: Callable[[], Awaitable[Any]], timeout_s: float = 2.0
) -> Any:
    """Run `fn()` on the process's event loop from the HTTP thread; its result."""
    return asyncio.run_coroutine_threadsafe(fn(), loop).result(timeout_s)  # type: ignore[arg-type]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds: not worth a log line each


class MetricsServer:
    """`/metrics` plus `pages` on host:port (port 0 picks one), until `stop()`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        pages: Mapping[str, Page] | None = None,
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._pages = dict(pages or {})
        self._server = make_server(
            host, port, self._app, ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics(environ, start_response)  # type: ignore[no-any-return]
        page = self._pages.get(path)
        if page is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found; try /metrics\n"]
        try:
            body = page.body()
        except Exception:  # a page must never take the metrics port down
            log.exception("page %s failed", path)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"internal error; see the server log\n"]
        start_response(
            "200 OK",
            [("Content-Type", page.content_type), ("Cache-Control", "no-store")],
        )
        return [body]
