"""The access log (--access-log): aiohttp's, without the secrets a URL may carry (the OAuth
code and state of a sign-in, a token someone put in a query string)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

# Query parameters whose values never reach the log.
SECRET_PARAMS = frozenset({"code", "state", "access_token", "token"})


def shown(request: web.BaseRequest) -> str:
    """The request's path and query, with secret values replaced by ***."""
    if not request.query:
        return request.path
    query = "&".join(
        f"{key}={'***' if key in SECRET_PARAMS else value}" for key, value in request.query.items()
    )
    return f"{request.path}?{query}"


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.3fs',
            request.remote,
            request.method,
            shown(request),
            *request.version,
            response.status,
            response.body_length,
            time,
        )
