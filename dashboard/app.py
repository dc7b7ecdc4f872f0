"""The dashboard's web server: the page, its script, plotly.js and `/api/run` (the run's view as JSON).

Read-only by construction: every route is a GET of the page's own files or of `view.run_view`, which
only reads the run folder. The page polls `/api/run` every second with the ETag of its last copy,
so an unchanged run costs a 304 and no redraw.

Access: bound to loopback by default, where only the Host header is checked (a web page elsewhere
cannot reach the dashboard by pointing a DNS name at 127.0.0.1). Binding any other address needs a
token, and then every request must carry it: `Authorization: Bearer T`, or `?token=T` once, which
sets an HttpOnly cookie and redirects to the same URL without the token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from dashboard.view import run_view

STATIC = Path(__file__).with_name("static")
COOKIE = "fedssl_dashboard_token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SECURITY_HEADERS = {
    # everything the page loads comes from this server: no CDN, no inline script
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class DashboardError(RuntimeError):
    """A dashboard that must not start (no run folder, an exposed address without a token)."""


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve on a non-loopback address without a token: the run's sites, privacy spent
    and errors would be readable by anyone who can reach the address."""
    if not is_loopback(host) and not token:
        raise DashboardError(f"--host {host} exposes the dashboard beyond this machine: give --token T "
                             "(every request must then carry it), or keep the default 127.0.0.1")


def plotly_js() -> Path:
    """plotly.min.js as shipped inside the `plotly` Python package (served locally: no CDN)."""
    path = Path(str(files("plotly") / "package_data" / "plotly.min.js"))
    if not path.is_file():
        raise DashboardError(f"plotly.min.js not found at {path}: reinstall the `plotly` package")
    return path


def create_app(run_dir: str | Path, token: str | None = None, allowed_hosts: list[str] | None = None) -> Starlette:
    """The dashboard of the run folder `run_dir`; with `token`, every request must carry it."""
    run_dir = Path(run_dir)
    chart_library = plotly_js()

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def run(request: Request) -> Response:  # plain def: Starlette reads the files in its thread pool
        view = run_view(run_dir)
        unchanged = {k: v for k, v in view.items() if k != "now"}  # `now` alone does not change the page
        etag = '"' + hashlib.sha256(json.dumps(unchanged, sort_keys=True).encode()).hexdigest()[:32] + '"'
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return JSONResponse(view, headers=headers)

    async def plotly(request: Request) -> Response:
        return FileResponse(chart_library, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    routes = [
        Route("/", page),
        Route("/api/run", run),
        Route("/vendor/plotly.min.js", plotly),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    hosts = ["*"] if token else (allowed_hosts or [*LOOPBACK_NAMES, "[::1]"])
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=hosts), Middleware(SecurityHeaders)]
    if token:
        middleware.append(Middleware(TokenGate, token=token))
    return Starlette(routes=routes, middleware=middleware)


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      *((k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items())]
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


class TokenGate:
    """Lets a request through only with the token (header, cookie, or `?token=` once)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token

    def matches(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        bearer = request.headers.get("authorization", "")
        if self.matches(bearer.removeprefix("Bearer ").strip() if bearer.startswith("Bearer ") else None) \
                or self.matches(request.cookies.get(COOKIE)):
            await self.app(scope, receive, send)
            return
        if self.matches(request.query_params.get("token")):  # the link given once: keep it in a cookie instead
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        else:
            response = PlainTextResponse("401: this dashboard needs its token (open it with ?token=T)",
                                         status_code=401)
        await response(scope, receive, send)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8050, token: str | None = None) -> None:
    """Serve the dashboard of `run_dir` until Ctrl-C; the socket is bound here, so a port in use or a
    bad address fails as an OSError with one line instead of uvicorn's exit."""
    import uvicorn

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DashboardError(f"{run_dir} is not a folder: give the run folder of `fedssl simulate --out` or the "
                             "ServerApp's run-dir" + ("" if run_dir.exists() else " (once the run has created it)"))
    check_exposure(host, token)
    app = create_app(run_dir, token, allowed_hosts=[*LOOPBACK_NAMES, "[::1]", host])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    # listening before the address is printed: a browser opened on it at once waits in the backlog
    # until uvicorn accepts, instead of being refused while uvicorn starts (seen on a busy machine)
    sock.listen()
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"dashboard of {run_dir.resolve()} on http://{shown}:{bound}/"
          + (" (open it once with ?token=T)" if token else "") + "; Ctrl-C to stop", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
