"""ASGI middleware of our own: counting every response by route and status (``qserve_http_requests_total``,
``qserve_errors_total``). Auth, body size and admission are in ``auth.py`` and ``limits.py``."""

from __future__ import annotations

from server.errors import error_type
from server.metrics import ServerMetrics


class CountRequests:
    """Pure ASGI middleware counting responses by route and status (no body buffering,
    so streaming and client-disconnect detection are untouched)."""

    def __init__(self, app, metrics: ServerMetrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.requests.labels(route, str(status)).inc()
                if status >= 400:
                    self.metrics.errors.labels(error_type(status), str(status)).inc()
            await send(message)

        return await self.app(scope, receive, send_counted)
