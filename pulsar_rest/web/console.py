"""The console: the page at `/`, its static files under `/_static/`, and the headers that
keep a browser from doing with them anything the page does not mean.

The files are the package's (no CDN, no build step): `static/index.html`, ES modules, one
stylesheet, an icon, and the vendored ansi_up. They are open to all, as the page is: it
asks its user to sign in. Every answer of the service carries a Content-Security-Policy
that allows this origin's scripts and styles only (no inline script, no inline style, no
plugin, no framing) and `X-Content-Type-Options: nosniff`, so that nothing served here,
a task's log included, is ever run as something else.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from pulsar_rest.web.errors import ApiError

STATIC = Path(__file__).parent / "static"
INDEX_HTML = STATIC / "index.html"
PREFIX = "/_static/"  # "_": no app may be named so, so POST /{app}/{env} never clashes with it

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",  # scripts, styles, fetches, EventSource: this origin only
        "base-uri 'none'",  # no <base> may redirect the page's relative URLs
        "object-src 'none'",
        "frame-ancestors 'none'",  # no other site may frame the Kill button (clickjacking)
        "form-action 'self'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # Links in a task's output (OSC 8) do not tell other sites which task was looked at.
    "Referrer-Policy": "same-origin",
}

_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    "": "text/plain",  # vendor/README, vendor/LICENSE
}
# Revalidated on every load (a 304 when unchanged, by ETag and Last-Modified): the URLs carry
# no version, and an upgraded server must never run with last version's modules.
_CACHE = {"Cache-Control": "no-cache"}


def _files() -> dict[str, tuple[Path, str]]:
    """What may be served, by its path under PREFIX: the files of the static directory with a
    known type, found once; nothing else (no path from a request ever reaches the disk)."""
    found = {}
    for path in sorted(STATIC.rglob("*")):
        kind = _TYPES.get(path.suffix)
        if path.is_file() and kind is not None and path != INDEX_HTML:
            found[path.relative_to(STATIC).as_posix()] = (path, kind)
    return found


FILES = _files()


class ConsoleFile(web.FileResponse):
    """One of the console's files, whose content type is set as its answer goes out (see
    on_prepare): aiohttp's own answers (a 416 for a Range it cannot serve, a 304) keep theirs."""

    def __init__(self, path: Path, content_type: str) -> None:
        super().__init__(path, headers=_CACHE)
        self.file_type = content_type


async def index(request: web.Request) -> web.FileResponse:
    return ConsoleFile(INDEX_HTML, "text/html; charset=utf-8")


async def static_file(request: web.Request) -> web.FileResponse:
    """One of the console's files, with its content type."""
    name = request.match_info["path"]
    found = FILES.get(name)
    if found is None:
        raise ApiError(404, f"no such file: {PREFIX}{name[:100]}")
    path, kind = found
    return ConsoleFile(path, kind if kind.startswith("image/") else kind + "; charset=utf-8")


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the security headers on every answer, and a console file's type."""
    await security_headers(request, response)
    if isinstance(response, ConsoleFile) and response.status in (200, 206):
        response.headers["Content-Type"] = response.file_type


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer (streams and errors too) gets the headers, unless
    its handler set its own."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
