"""A client of the pulsar-rest API, for the terminal and CI (`pulsar-rest run|logs|tasks|
kill|apps`): every call retried with back-off while the server cannot be reached, output
followed by byte offset, so a dropped connection or a restart of the server loses no byte
and repeats none."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

# Back-off between attempts while the server cannot be reached: from the first to the
# longest wait, doubling.
FIRST_RETRY = 0.5
LONGEST_RETRY = 10.0
# How long one long-poll may wait at the server, and how long beyond it the answer may take.
POLL = 30.0
SLACK = 15.0
# What a task is once it has ended, and the exit code each gives.
EXIT_CODES = {"finished": 0, "failed": 1, "killed": 2, "interrupted": 2}
ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


class ClientError(Exception):
    """The command cannot go on: `code` is its exit code, the message one line for the user."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


AUTH_REFUSED = 4
UNREACHABLE = 5
USAGE = 64


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


class Api:
    def __init__(
        self,
        url: str,
        token: str | None,
        ca_cert: Path | None = None,
        retry_for: float = 120.0,
        say: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.url = URL(url.rstrip("/") + "/")
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"  # a header, never the URL
        self._ssl = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True
        self._retry_for = retry_for
        self._say = say
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self._session = aiohttp.ClientSession(
            headers=self._headers, connector=aiohttp.TCPConnector(ssl=self._ssl), trust_env=True
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bool = False,
        wait: float = 0.0,
        idempotent: bool = True,
    ) -> Answer:
        """One request, tried again with back-off while the server cannot be reached or
        answers 502, 503 or 504 (a server stopping, a proxy in front of one that restarts,
        GitHub out of reach), for up to `retry_for` seconds, saying each time why. A 401
        or 403 is a ClientError with code 4; other refusals are answered, for the caller.
        Not `idempotent` (a create): tried again only when it surely did not reach the
        server (no connection, or pulsar-rest's own 503 saying to try later): never made
        twice."""
        assert self._session is not None
        url = self.url.join(URL(path.lstrip("/")))
        timeout = aiohttp.ClientTimeout(total=wait + SLACK, connect=10)
        started = time.monotonic()
        pause = FIRST_RETRY
        attempt = 0
        while True:
            attempt += 1
            reason = ""
            try:
                async with self._session.request(
                    method, url, params=params, json=json_body, headers=headers, timeout=timeout
                ) as resp:
                    body: Any = await resp.read() if raw else await _json(resp)
                    answer = Answer(resp.status, body, dict(resp.headers))
                if answer.status in (401, 403):
                    raise ClientError(AUTH_REFUSED, _message(answer))
                if not _passing(answer) or (not idempotent and not _ours(answer)):
                    return answer
                reason = f"{answer.status}: {_message(answer)}"
            except aiohttp.ClientConnectorCertificateError as exc:
                raise ClientError(
                    UNREACHABLE,
                    f"{self.url}: its TLS certificate is not trusted ({exc.certificate_error}); "
                    "give --ca-cert FILE for a private CA",
                ) from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                if not idempotent and not isinstance(exc, aiohttp.ClientConnectorError):
                    raise ClientError(
                        UNREACHABLE,
                        f"{self.url}: the answer was lost ({_describe(exc)}): the task may have been "
                        "created; see pulsar-rest tasks",
                    ) from None
                reason = _describe(exc)
            waited = time.monotonic() - started
            if waited + pause > self._retry_for:
                raise ClientError(
                    UNREACHABLE,
                    f"{self.url} cannot be reached ({reason}) after {attempt} tries in {waited:.0f}s",
                )
            self._say(f"waiting for the server ({reason}): trying again in {pause:g}s")
            await asyncio.sleep(pause)  # back-off between attempts, not a synchronisation
            pause = min(pause * 2, LONGEST_RETRY)


async def _json(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return {"error": {"message": text.strip()[:200] or resp.reason}}


def _message(answer: Answer) -> str:
    body = answer.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))
    return f"HTTP {answer.status}"


def _passing(answer: Answer) -> bool:
    """An answer that says to try again: a proxy's 502 or 504 (the server restarting behind
    it), a 503 of a proxy, or pulsar-rest's 503 with Retry-After (stopping, too busy, its
    configuration repository or GitHub out of reach). A 503 without it is for good."""
    if answer.status in (502, 504):
        return True
    return answer.status == 503 and ("Retry-After" in answer.headers or not _ours(answer))


def _ours(answer: Answer) -> bool:
    """The answer is pulsar-rest's own (its error envelope), not a proxy's."""
    return isinstance(answer.body, dict) and answer.body.get("ok") is False and "error" in answer.body


def _describe(exc: BaseException) -> str:
    """What went wrong, in words."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer was cut short"
    if isinstance(exc, aiohttp.ClientOSError):
        return exc.strerror or "a network error"
    return type(exc).__name__


def check(answer: Answer) -> Any:
    """The answer's body, or a ClientError with the server's message for a refusal."""
    if answer.status >= 400:
        code = UNREACHABLE if answer.status >= 500 else USAGE
        raise ClientError(code, _message(answer))
    return answer.body


def task_path(task_id: int, rest: str = "") -> str:
    return f"task/{task_id}{rest}"


def target_path(app: str, env: str) -> str:
    return f"{quote(app, safe='')}/{quote(env, safe='')}"
