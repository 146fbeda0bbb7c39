"""`search dashboard`: optuna-dashboard behind a small guard, safe to show a study to reviewers.

`optuna_dashboard.wsgi(storage)` is wrapped by `Guard`, a WSGI layer that refuses every method
but GET and HEAD with 403 unless writes are allowed, and checks an access token when one is
set. The storage itself is opened read-only by default (`open_storage_read_only`: SQLite in
`mode=ro`, PostgreSQL read-only sessions), so even a request the guard let through cannot
write, and the dashboard can never migrate the schema. The server binds to loopback unless
told otherwise.

A token is accepted as `Authorization: Bearer TOKEN`, an `X-Search-Token` header, or once as
`?token=TOKEN` in the address, which sets a cookie for the browser's later requests.
"""

from __future__ import annotations

import hmac
import http.cookies
import json
import logging
import socketserver
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from search import optuna_compat

logger = logging.getLogger(__name__)

TOKEN_ENV = "SEARCH_DASHBOARD_TOKEN"
_COOKIE = "search_dashboard_token"
_READ_METHODS = ("GET", "HEAD")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Guard:
    """A WSGI layer: read-only unless `allow_writes`, and an access token when `token` is set."""

    def __init__(self, app: WSGIApp, *, allow_writes: bool = False, token: str | None = None):
        if token is not None and not token:
            raise ValueError("token must be a non-empty string or None")
        self.app = app
        self.allow_writes = allow_writes
        self.token = token

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        extra_headers: list[tuple[str, str]] = []
        if self.token is not None:
            given, from_query = self._given_token(environ)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return _refuse(start_response, 401, "missing or wrong access token")
            if from_query:
                extra_headers.append(
                    ("Set-Cookie", f"{_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/")
                )
        if method not in _READ_METHODS and not self.allow_writes:
            return _refuse(
                start_response,
                403,
                f"read-only dashboard refuses {method}: start it with --allow-writes to change "
                "the study",
            )
        if not extra_headers:
            return self.app(environ, start_response)

        def with_cookie(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            return start_response(status, [*headers, *extra_headers], *args)

        return self.app(environ, with_cookie)

    @staticmethod
    def _given_token(environ: dict[str, Any]) -> tuple[str | None, bool]:
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        if environ.get("HTTP_X_SEARCH_TOKEN"):
            return str(environ["HTTP_X_SEARCH_TOKEN"]), False
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        if query.get("token"):
            return query["token"][0], True
        cookies = http.cookies.SimpleCookie(environ.get("HTTP_COOKIE", ""))
        if _COOKIE in cookies:
            return cookies[_COOKIE].value, False
        return None, False


def _refuse(start_response: StartResponse, code: int, reason: str) -> list[bytes]:
    body = json.dumps({"reason": reason}).encode()
    status = {401: "401 Unauthorized", 403: "403 Forbidden"}[code]
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def dashboard_app(
    storage: optuna.storages.BaseStorage, *, allow_writes: bool = False, token: str | None = None
) -> Guard:
    """optuna-dashboard on `storage` behind `Guard`."""
    import optuna_dashboard

    optuna_compat.show_long_attributes()  # every epoch's metrics, not the first 1,024 chars
    return Guard(optuna_dashboard.wsgi(storage), allow_writes=allow_writes, token=token)


def push_plots(study: optuna.Study) -> list[str]:
    """Save the service's learning-curve plot into the study, where the dashboard shows it
    (its "Plot" tab); needs a writable storage. Returns the graph ids."""
    from optuna_dashboard import save_plotly_graph_object

    from search.report import curves_figure

    return [save_plotly_graph_object(study, curves_figure(study), graph_object_id="search-curves")]


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


def make_dashboard_server(app: WSGIApp, host: str, port: int) -> WSGIServer:
    """A threaded stdlib WSGI server for `app` on `host:port` (port 0: a free one)."""
    return make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
