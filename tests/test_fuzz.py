"""A seeded, bounded fuzz of the whole HTTP API, beside the known bad inputs of test_errors.

Each seed sends the same requests on every run, made from `random.Random(seed)` alone (never
from an answer): every route and method, odd path segments (ids of real tasks, unknown,
huge, negative, unicode, percent-encoded slashes, dots and NUL, empty, very long), the query
parameters the API knows with odd values, headers (Content-Type and its charsets,
Last-Event-ID, Range, Accept, conditionals, Expect, Content-Encoding, Host) and bodies (JSON
of every shape, taskVariables with odd names and values, forms, multipart, bytes that are not
UTF-8). For each answer: no 5xx; a 4xx is the JSON envelope, but for the few answers HTTP
itself makes outside it (checked exactly, see `_http_answer`); a 2xx of a JSON route is JSON.
After them: the server answers /status, no waiter is left, and only the creations answered
200 made a task.

Every request goes on a connection of its own, so it can be replayed alone: a failure names
the seed, the request's index in `requests_for(seed)`, what was sent, the answer and the
server's error log lines.
"""

from __future__ import annotations

import base64
import collections
import gc
import gzip
import json
import logging
import random
import re
import time
import traceback
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode

import aiohttp
import pytest
from yarl import URL

from pulsar_rest.names import InvalidName, check_action
from pulsar_rest.tasks import TaskStatus
from pulsar_rest.web.app import MAX_BODY, RUN_BITS
from tests.conftest import (
    Client,
    ClientFactory,
    create,
    eventually,
    finished,
    follow,
    get_json,
    release,
    waiters,
)
from tests.test_errors import assert_envelope

# Two warnings of aiohttp that malformed multipart bodies cause, harmless where the server
# runs, which this suite's filterwarnings=error would turn into failures no deployment has: a
# malformed Content-Disposition (the field is then nameless: a 400), and the temporary file of
# a file part left for the garbage collector when a later part cannot be parsed.
pytestmark = [
    pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionHeader"),
    pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionParam"),
    pytest.mark.filterwarnings("ignore:Unclosed file <tempfile.SpooledTemporaryFile:ResourceWarning"),
]

SEEDS = (1, 2, 3)
PER_SEED = 500  # requests made by each seed
ANSWER_WITHIN = 5.0  # seconds: an answer slower than this is a failure (none waits on purpose)
LONG_POLL = 1.0  # the server's longest wait, a safety net: every wait asked for is 0 or a few ms

# The configuration repository (a plain directory): apps and their environments.
TARGETS: dict[str, tuple[str, ...]] = {"app": ("prod", "staging"), "shop": ("prod",), "web.v2": ("qa-1",)}
# Made before the fuzz, in this order, on a fresh data directory: ids 1 to 4.
SETUP = (("app", "prod", "ok"), ("app", "staging", "fail"), ("web.v2", "qa-1", "lines[3]"))
HELD = ("shop", "prod")  # task 4: waits at a gate until the end (or a fuzzed kill)
REAL_IDS = (1, 2, 3, 4)
# Event cursors of the first run of a fresh data directory start here.
CURSOR_BASE = 1 << RUN_BITS

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
PARAMS = (
    "timeout", "offset", "since", "limit", "page", "pageSize", "currentPage",
    "app", "env", "status", "queue", "stdout", "action", "task",
)  # fmt: skip
# The only task names that may start a task: the fake pulsar's `ok`, which ends at once.
OK_ACTIONS = ("ok", "ns:ok", "deploy:ok", "ok[]", "ok[a,b]", "ok[x=1,y/2@z+3-4.5]")
TINY_TIMEOUTS = ("0", "0.0", "0.001", "1e-3", "-0", "0e9", " 0 ", "0_0", "1e-400")
NUMBERS = (
    "0", "1", "2", "-1", "-0", "+1", "01", "1.5", "1e3", "1E-3", "nan", "NaN", "inf", "-inf",
    "Infinity", "1e309", "9" * 18, "9" * 19, "9" * 400, "", " ", " 1", "1 ", "0x10", "1_000",
    "\u0663", "\uff11", "\u00b2", "\u00bd", "true", "null", "[]", "1,2", "10**6",
)  # fmt: skip
QUEUE_WORDS = ("true", "false", "1", "0", "TRUE", "False", "yes", "", " true", "tru\u00e9")
QUEUE_VALUES: tuple[Any, ...] = (*QUEUE_WORDS, True, False, 1, 0, None, [], {"a": 1})
STATUSES = (*(s.value for s in TaskStatus), "RUNNING", "", "finished ", "\u00e9", "ok", "all")
GOOD_VARIABLES = ("FUZZ", "_", "a", "A1_b", "X" * 64, "DEPLOY_REF")
BAD_VARIABLES = (
    "", "1A", "A-B", "A B", "\u00e9", "X" * 65, "PATH", "HOME", "RUBYOPT", "RUBYLIB",
    "PULSAR_CONF_REPO", "LD_PRELOAD", "GEM_HOME", "BUNDLE_GEMFILE", "PULSAR_REST_PORT",
    "A\x00", "A=B", "$A",
)  # fmt: skip
GOOD_VALUES = ("", "1", "a b", "\u00e9", "\U0001f600", "$(id)", "`id`", "x\ny", "\u2028", "x" * 4096)
BAD_VALUES: tuple[Any, ...] = (1, 1.5, None, True, [], {}, "a\x00b", "x" * 4097, "\ud800", "\udfff")
ODD_KEYS = (
    "", " ", "ACTION", "Action", "action ", " action", "actions", "action\x00", "__proto__",
    "constructor", "taskvariables", "TaskVariables", "queue ", "\u00e9", "\U0001f600", "a" * 1000,
    "app", "env", "id", "status",
)  # fmt: skip
# Characters of odd text: URL delimiters, quotes, controls, non-ASCII digits, joiners, RTL.
ODD = (
    "aZ9_-.~ !\"#$%&'()*+,/:;<=>?@[\\]^`{|}\u00e9\u4e2d\U0001f600\u200b\u202e\u2028\ufeff"
    "\uff11\u00b2\u0663\u0301\x00\x07\x7f\t"
)
BAD_LEAD = "-. $;'\"`~|&<>(){}*?!#\u00e9\t[/:"
RAW_SEGMENTS = (
    "%2F", "%2f", "1%2F2", "%2E", "%2E%2E", "%2e%2e%2Fstatus", "%00", "1%00", "%25", "%FF", "%C3",
    "%ZZ", "%", "%%", "%2", "%C0%AF", "%EF%BF%BF", "%F4%90%80%80", ".", "..", "%7B%7D", "%20",
    "%09", "%0A", "%3F", "%23",
)  # fmt: skip
CHARSETS = (
    "utf-8", "UTF-8", "latin-1", "iso-8859-1", "ascii", "utf-16", "utf-32", "", '"utf-8"', "utf8",
    "cp500", "idna", "rot13", "base64", "unicode_escape", "undefined", "x-user-defined", "utf-8, latin-1",
)  # fmt: skip
CONTENT_TYPES = (
    "application/json", "APPLICATION/JSON", "application/json; foo=bar", "application/x-www-form-urlencoded",
    "multipart/form-data", "multipart/form-data; boundary=xx", "multipart/mixed; boundary=xx", "text/plain",
    "text/json", "application/json+x", "application/octet-stream", "*/*", "", ";", "garbage;;;==",
    "application/\u00e9", "application/json; charset",
)  # fmt: skip
ACCEPTS = (
    "application/json", "text/event-stream", "text/html", "*/*", "", "application/xml",
    "text/html;q=0.9, */*;q=0.1", "garbage/", "\u00e9/\u00e9", "application/json; charset=utf-16",
)  # fmt: skip
RANGES = (
    "bytes=0-10", "bytes=0-0", "bytes=-5", "bytes=5-", "bytes=0-", "bytes=1000000-", "bytes=5-2",
    "bytes=0-0,2-3", "bytes=", "garbage", "bytes=-0", "bytes=a-b", "items=1-2", "bytes=" + "9" * 40 + "-",
    "bytes=0-" + "9" * 40, "bytes=\u0663-", " bytes=1-2", "BYTES=1-2", "bytes=1-2 ", "bytes=--1",
)  # fmt: skip
ETAGS = ("*", '"x"', 'W/"x"', "garbage", "", '"a", "b"', 'W/"', '"unterminated')
DATES = ("Mon, 01 Jan 2001 00:00:00 GMT", "Fri, 01 Jan 2100 00:00:00 GMT", "garbage", "", "0", "Mon, 99 Foo")
EXPECTS = ("100-continue", "100-Continue", "foo", "200-ok", "100-continue, foo")
ENCODINGS = (
    "gzip",
    "gzip",
    "deflate",
    "deflate",
    "br",
    "zstd",
    "identity",
    "bogus",
    "GZIP",
    "gzip, identity",
)
HOSTS = (
    "localhost", "example.com", "example.com:8080", "[::1]:8001", "EXAMPLE.COM.", "a_b", "a..b", "",
    "a:99999", "a:b", "a:-1", "[::1]:x", "\u00e9.example", "\u00e9" * 80, "\u2028", "xn--", "a b", "a/b",
    "a@b", "[zz]", "1.2.3.4:0", ":80",
)  # fmt: skip
ACCEPT_ENCODINGS = ("gzip", "br", "identity;q=0", "*;q=0", "", "zstd", "gzip;q=abc")

# The route the server matches a path with (see `route_of`).
FIXED_ROUTES = {
    ("",): "index", ("status",): "status", ("apps",): "apps", ("tasks",): "tasks",
    ("tasks", "created"): "created", ("events",): "events", ("websocket",): "websocket",
}  # fmt: skip
TASK_ROUTES = ("log", "stdout", "stream", "output", "state", "kill")
JSON_ROUTES = {"status", "apps", "tasks", "created", "task", "output", "state", "kill", "create"}
FILE_ROUTES = {"index", "log", "stdout"}  # answered by aiohttp's FileResponse: Range, conditionals
# What each request is aimed at, and how often.
KINDS = {
    "create": 24, "task": 8, "log": 6, "stdout": 4, "output": 7, "state": 6, "kill": 6, "stream": 5,
    "created": 6, "tasks": 7, "events": 4, "websocket": 4, "status": 2, "apps": 2, "index": 4, "junk": 7,
}  # fmt: skip
# The query parameters each route reads.
ROUTE_PARAMS = {
    "create": ("action", "task", "queue", "stdout"), "created": ("since", "timeout"),
    "output": ("offset", "limit", "timeout"), "state": ("since", "timeout"), "stream": ("offset",),
    "events": ("since",), "websocket": ("since",),
    "tasks": ("page", "pageSize", "currentPage", "app", "env", "status"),
}  # fmt: skip
URL_MAX = 7500  # aiohttp refuses a request line over 8190 bytes before the app sees it
QUERY_MAX = 1500


@dataclass(frozen=True)
class Req:
    seed: int
    index: int
    method: str
    target: str  # path and query, percent-encoded exactly as sent
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    bare: bool  # no Content-Type at all (aiohttp's client would add application/octet-stream)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def has(self, *names: str) -> bool:
        return any(self.header(name) is not None for name in names)

    def __str__(self) -> str:
        body = "" if self.body is None else f"\n    body ({len(self.body)} bytes): {self.body[:300]!r}"
        bare = " (no Content-Type)" if self.bare else ""
        target = self.target if len(self.target) <= 300 else f"{self.target[:300]}... ({len(self.target)})"
        return (
            f"seed {self.seed}, request #{self.index}: {self.method} {target}\n"
            f"    headers{bare}: {[(k, v[:200]) for k, v in self.headers]}{body}"
        )


def route_of(target: str) -> str:
    """The route aiohttp matches `target` with: segments decoded one by one (a %2F stays in
    its segment), a {placeholder} matches a non-empty segment without braces."""
    segments = tuple(unquote(s) for s in target.partition("?")[0].split("/")[1:])
    if segments in FIXED_ROUTES:
        return FIXED_ROUTES[segments]

    def dynamic(segment: str) -> bool:
        return bool(segment) and "{" not in segment and "}" not in segment

    if len(segments) == 3 and segments[0] == "task" and dynamic(segments[1]) and segments[2] in TASK_ROUTES:
        return segments[2]
    if len(segments) == 2 and segments[0] == "task" and dynamic(segments[1]):
        return "task"
    if len(segments) == 2 and all(dynamic(s) for s in segments):
        return "create"
    return "none"


class Fuzzer:
    """Makes the requests of one seed: from the seed alone, never from an answer."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)

    def requests(self, count: int) -> list[Req]:
        return [self.request(i) for i in range(count)]

    # -- text --------------------------------------------------------------------------

    def text(self, low: int = 0, high: int = 12) -> str:
        return "".join(self.rng.choice(ODD) for _ in range(self.rng.randint(low, high)))

    def header_text(self, low: int = 0, high: int = 12) -> str:
        # No control characters: the client refuses CR, LF and NUL, the server's parser the rest.
        return "".join(c for c in self.text(low, high) if c >= " " and c != "\x7f")

    def encoded(self, text: str) -> str:
        safe = self.rng.choice(("", "", ":@!$&'()*+,;="))
        return quote(text, safe=safe)

    # -- path --------------------------------------------------------------------------

    def id_segment(self) -> str:
        rng = self.rng
        r = rng.random()
        if r < 0.4:
            return str(rng.choice(REAL_IDS))
        if r < 0.55:
            return str(rng.randint(5, 40))  # made by the fuzz, or not (yet)
        match rng.randrange(12):
            case 0:
                return str(rng.randint(41, 10**6))
            case 1:
                return str(10**18 - 1)
            case 2:
                return "9" * rng.randint(19, 60)
            case 3:
                return rng.choice(("-1", "+1", "01", "0", "1.0", "1e3", "0x1", "%201", "1%20", "-0"))
            case 4:
                return self.encoded(rng.choice(("\uff11", "\u00b2", "\u0663", "\u00bd", "1\u0301")))
            case 5:
                return self.encoded(self.text(1, 12))
            case 6 | 7:
                return rng.choice(RAW_SEGMENTS)
            case 8:
                return str(rng.choice(REAL_IDS)) + rng.choice(RAW_SEGMENTS)
            case 9:
                return ""
            case 10:
                return rng.choice(("1", "a", "%41")) * rng.randint(1000, 1600)
            case _:
                return self.encoded("\u00e9" * rng.randint(100, 600))

    def name_segment(self, known: tuple[str, ...]) -> str:
        rng = self.rng
        if known and rng.random() < 0.6:
            return rng.choice(known)
        match rng.randrange(8):
            case 0:
                return rng.choice(("nope", "x.y-z_1", "A", "0", "a" * 100, "task", "tasks"))
            case 1:
                return rng.choice(("a" * 101, ".hidden", "-dash", "a..b", "_x", "a%20b", "a+b"))
            case 2:
                return self.encoded(self.text(1, 10))
            case 3:
                return rng.choice(RAW_SEGMENTS)
            case 4:
                return ""
            case 5:
                return self.encoded("\u00e9" * rng.randint(1, 300))
            case 6:
                return rng.choice(tuple(TARGETS)) + rng.choice(RAW_SEGMENTS)
            case _:
                return "x" * rng.randint(200, 3000)

    def path(self, kind: str) -> str:
        rng = self.rng
        if kind == "create":
            app = self.name_segment(tuple(TARGETS))
            envs = TARGETS.get(app, ())
            env = self.name_segment(envs if envs else tuple(e for es in TARGETS.values() for e in es))
            return f"/{app}/{env}"
        if kind in ("task", *TASK_ROUTES):
            task = f"/task/{self.id_segment()}"
            return task if kind == "task" else f"{task}/{kind}"
        if kind == "junk":
            words = ("task", "tasks", "created", "log", "x", "status", "kill", "", "%2F", "..")
            segments = [
                rng.choice(words) if rng.random() < 0.6 else self.id_segment()
                for _ in range(rng.randint(0, 5))
            ]
            return "/" + "/".join(segments) + rng.choice(("", "", "/", "//"))
        return next("/" + "/".join(segments) for segments, name in FIXED_ROUTES.items() if name == kind)

    # -- query -------------------------------------------------------------------------

    def cursor(self) -> str:
        rng = self.rng
        return rng.choice(
            (
                str(CURSOR_BASE + rng.randint(-5, 60)),
                str(CURSOR_BASE + rng.randint(0, 20)),
                "0",
                str(CURSOR_BASE - 10**6),
                str(CURSOR_BASE * 2),
                str(rng.randint(0, 200)),
                rng.choice(NUMBERS),
            )
        )

    def action_text(self) -> str:
        """A task name: `ok` (which ends at once) or one that can start nothing."""
        rng = self.rng
        if rng.random() < 0.45:
            return rng.choice(OK_ACTIONS)
        match rng.randrange(6):
            case 0:
                value = rng.choice(BAD_LEAD) + self.text(0, 10)
            case 1:
                value = rng.choice(OK_ACTIONS) + rng.choice(
                    (" ", ";id", "$(id)", "\n", "\x00", "[", "]", "[a b]", "\u00e9", "`id`", "|x", "]]")
                )
            case 2:
                value = "ok" * rng.randint(101, 300)
            case 3:
                value = ""
            case 4:
                value = rng.choice(("ok[$(id)]", "-v", "ok[" + "a" * 501 + "]", "ok[a]b", "ok[a][b]"))
            case _:
                value = self.text(1, 20) + " "
        try:
            check_action(value)
        except InvalidName:
            return value
        raise AssertionError(f"the fuzz made a task name that could start a task: {value!r}")

    def param_value(self, key: str) -> str:
        rng = self.rng
        if rng.random() < 0.15:
            return self.text()
        match key:
            case "timeout":
                return rng.choice((*NUMBERS, *TINY_TIMEOUTS))
            case "offset":
                return rng.choice((str(rng.randint(0, 120)), "0", str(2**40), *NUMBERS[:12]))
            case "limit":
                return rng.choice(
                    (str(rng.randint(1, 100)), "1", "0", str(2**20), str(2**20 + 1), *NUMBERS[:12])
                )
            case "since":
                return self.cursor()
            case "page" | "pageSize" | "currentPage":
                return rng.choice(("1", "2", "50", "1000", "1001", str(10**17), *NUMBERS))
            case "app" | "env":
                return unquote(self.name_segment((*TARGETS, "prod", "staging")))
            case "status":
                return rng.choice(STATUSES)
            case "queue" | "stdout":
                return rng.choice(QUEUE_WORDS)
            case "action" | "task":
                return self.action_text()
            case _:
                return self.text()

    def query(self, kind: str, method: str) -> str:
        """The query string: (raw piece, decoded key) pairs, as the server decodes them."""
        rng = self.rng
        pieces: list[tuple[str, str | None, str | None]] = []  # raw, key, value (None: raw junk)
        for _ in range(rng.choice((0, 0, 1, 1, 2, 3, 4, 6))):
            r = rng.random()
            if r < 0.85:
                own = ROUTE_PARAMS.get(kind, ())
                key = rng.choice(own) if own and rng.random() < 0.7 else rng.choice(PARAMS)
            elif r < 0.93:
                key = rng.choice((self.text(1, 8), "Timeout", "timeout ", "TIMEOUT", "since[]", "a"))
            else:
                junk = rng.choice(("&&", "=", "=x", "%FF=%FF", "a=%ZZ", "%", "a=b=c", ";", "+=+", "%00=%00"))
                pieces.append((junk, None, None))
                continue
            for _ in range(2 if rng.random() < 0.1 else 1):  # sometimes a repeated key
                value = self.param_value(key)
                raw_value = quote(value, safe="")
                raw = (
                    quote(key, safe="")
                    if not value and rng.random() < 0.3
                    else f"{quote(key, safe='')}={raw_value}"
                )
                pieces.append((raw, key, value))
        while len("&".join(raw for raw, _, _ in pieces)) > QUERY_MAX:
            pieces.pop()
        if method in ("GET", "HEAD"):
            pieces = self.no_wait(pieces)
        return "&".join(raw for raw, _, _ in pieces)

    def no_wait(
        self, pieces: list[tuple[str, str | None, str | None]]
    ) -> list[tuple[str, str | None, str | None]]:
        """The first `timeout` (the one the server reads) is made 0 or a few ms if it would
        wait longer; one is added if there is none. Invalid ones stay (a 400)."""
        tiny = self.rng.choice(TINY_TIMEOUTS)
        for i, (_, key, value) in enumerate(pieces):
            if key == "timeout" and value is not None:
                try:
                    seconds = float(value)
                except ValueError:
                    return pieces
                if 0 <= seconds < float("inf") and seconds > 0.01:
                    pieces[i] = (f"timeout={quote(tiny, safe='')}", "timeout", tiny)
                return pieces
        return [(f"timeout={quote(tiny, safe='')}", "timeout", tiny), *pieces]

    # -- bodies ------------------------------------------------------------------------

    def json_value(self, depth: int, strings: bool = True) -> Any:
        rng = self.rng
        choice = rng.randrange(10 if depth > 0 else 7)
        if not strings and choice in (4, 5, 6):
            choice = 2
        match choice:
            case 0:
                return None
            case 1:
                return rng.random() < 0.5
            case 2:
                return rng.choice((0, -1, 2**63, 10**30, -(10**40), 7))
            case 3:
                return rng.choice((0.5, 1e308, -0.0, float("nan"), float("inf"), -float("inf")))
            case 4:
                return self.text()
            case 5:
                return rng.choice(("\ud800", "\udfff\ud800", "\x00", "", "\u2028"))
            case 6:
                return "x" * rng.randint(100, 3000)
            case 7:
                return [self.json_value(depth - 1) for _ in range(rng.randint(0, 4))]
            case 8:
                return {self.text(0, 6): self.json_value(depth - 1) for _ in range(rng.randint(0, 4))}
            case _:
                return [{rng.choice(ODD_KEYS): self.json_value(depth - 1)} for _ in range(rng.randint(1, 3))]

    def variables(self) -> Any:
        rng = self.rng
        r = rng.random()
        if r < 0.1:
            return self.json_value(2)  # not an object (or one of odd values)
        if r < 0.13:
            return {f"V{i}": "x" for i in range(101)}
        chosen: dict[str, Any] = {}
        for _ in range(rng.randint(0, 4)):
            name = (
                rng.choice(GOOD_VARIABLES)
                if rng.random() < 0.6
                else rng.choice((*BAD_VARIABLES, self.text()))
            )
            chosen[name] = rng.choice(GOOD_VALUES) if rng.random() < 0.7 else rng.choice(BAD_VALUES)
        return chosen

    def action_value(self) -> Any:
        return self.action_text() if self.rng.random() < 0.88 else self.json_value(2, strings=False)

    def json_object(self) -> dict[str, Any]:
        rng = self.rng
        body: dict[str, Any] = {}
        if rng.random() < 0.85:
            body["action"] = self.action_value()
        if rng.random() < 0.15:
            body["task"] = body["action"] if "action" in body and rng.random() < 0.5 else self.action_value()
        if rng.random() < 0.3:
            body["queue"] = rng.choice(QUEUE_VALUES)
        if rng.random() < 0.35:
            body["taskVariables"] = self.variables()
        for _ in range(rng.choice((0, 0, 0, 1, 2, 3))):
            body[rng.choice(ODD_KEYS)] = self.json_value(3)
        return body

    def dumps(self, value: Any) -> bytes:
        # A lone surrogate with ensure_ascii=False makes bytes that are not UTF-8: a case too.
        return json.dumps(value, ensure_ascii=self.rng.random() < 0.5).encode("utf-8", "surrogatepass")

    def raw_json(self) -> bytes:
        rng = self.rng
        ok = json.dumps(rng.choice(OK_ACTIONS))
        return rng.choice(
            (
                f'{{"action": {ok}, "action": "-x"}}'.encode(),
                f'{{"action": "-x", "action": {ok}}}'.encode(),
                f'{{"action": {ok},}}'.encode(),
                b'{"action": NaN}',
                b'{"action": 1e400}',
                b'{"action": 1' + b"0" * 5000 + b"}",
                f'\ufeff{{"action": {ok}}}'.encode(),
                f'{{"action": {ok}}} trailing'.encode(),
                b'{"action": "\\ud800"}',
                f'{{"action": {ok}, "taskVariables": {{"FUZZ": "\\udfff"}}}}'.encode(),
                b"",
                b"null",
                b"[]",
                b'"ok"',
                b"-",
                b'{"a":',
                b'\xff\xfe{"action":"ok"}',
                b'{"action": "ok\xff"}',
                b'{"action": "ok", "x": "\xc3"}',
                f'{{"action": {ok}, "x": {"[" * 900}{"]" * 900}}}'.encode(),
                f'{{"action": {ok}, "x": {"[" * 3000}{"]" * 3000}}}'.encode(),
                b'{"taskVariables": {"FUZZ": "x"}}',
                json.dumps({"action": rng.choice(OK_ACTIONS)}).encode("utf-16"),
            )
        )

    def form(self) -> bytes:
        rng = self.rng
        pairs: list[tuple[str, str]] = []
        for _ in range(rng.randint(0, 4)):
            key = rng.choice(
                ("action", "action", "task", "queue", "app", "env", "taskVariables", *ODD_KEYS[:8])
            )
            if key in ("action", "task"):
                value = self.action_text()
            elif key == "queue":
                value = rng.choice(QUEUE_WORDS)
            else:
                value = self.text()
            pairs.append((key, value))
        encoding = rng.choice(("utf-8", "utf-8", "latin-1"))
        body = urlencode(pairs, encoding=encoding, errors="replace").encode()
        if rng.random() < 0.25:
            junk = rng.choice((b"\xff", b"%FF", b"%", b"=", b"&&", b";", b"%C3", b"\x00", b"a=\xc3(", b"%ZZ"))
            at = rng.randint(0, len(body))
            body = body[:at] + junk + body[at:]
        return body

    def multipart(self) -> tuple[bytes, str]:
        rng = self.rng
        boundary = rng.choice(("xx", f"----fuzz{rng.randint(0, 10**9)}", "b" * 70, "a'b(c)", "=?x"))
        chunks: list[bytes] = []
        if rng.random() < 0.05:
            chunks.append(b"preamble\r\n")
        for _ in range(rng.randint(0, 4)):
            name = rng.choice(("action", "action", "task", "queue", "taskVariables", "x", ""))
            value = (self.action_text() if name in ("action", "task") else self.text()).encode(
                "utf-8", "replace"
            )
            headers = [f'Content-Disposition: form-data; name="{name}"']
            r = rng.random()
            if r < 0.05:
                headers[0] += '; filename="f.txt"'
            elif r < 0.1:
                headers[0] = rng.choice(
                    ("Content-Disposition: attachment", "Content-Disposition: form-data; name*=x")
                )
            elif r < 0.13:
                headers = []
            if rng.random() < 0.15:
                headers.append(f"Content-Type: text/plain; charset={rng.choice(CHARSETS)}")
            if rng.random() < 0.2:
                cte = rng.choice(
                    ("base64", "quoted-printable", "binary", "8bit", "7bit", "bogus", "x-uue", "BASE64")
                )
                headers.append(f"Content-Transfer-Encoding: {cte}")
                if cte.lower() == "base64" and rng.random() < 0.7:
                    value = base64.b64encode(value)
            if rng.random() < 0.08:
                enc = rng.choice(("gzip", "deflate", "identity", "br"))
                headers.append(f"Content-Encoding: {enc}")
                if enc == "gzip" and rng.random() < 0.5:
                    value = gzip.compress(value, mtime=0)
            if rng.random() < 0.05:
                headers.append(
                    rng.choice(("bad header line", "X: \xe9", ": empty name", "Content-Length: 999"))
                )
            if rng.random() < 0.04:
                headers.append("Content-Type: multipart/mixed; boundary=yy")
                value = b"--yy\r\n\r\nx\r\n--yy--"
            head = "".join(f"{h}\r\n" for h in headers).encode("utf-8", "replace")
            chunks.append(f"--{boundary}\r\n".encode() + head + b"\r\n" + value + b"\r\n")
        if rng.random() < 0.93:
            chunks.append(f"--{boundary}--\r\n".encode())
        content_type = rng.choice(
            (
                f"multipart/form-data; boundary={boundary}",
                f"multipart/form-data; boundary={boundary}",
                f'multipart/form-data; boundary="{boundary}"',
                "multipart/form-data",
                "multipart/form-data; boundary=other",
                f"multipart/form-data; boundary={boundary}; charset={rng.choice(CHARSETS)}",
            )
        )
        return b"".join(chunks), content_type

    def body(self) -> tuple[bytes | None, str | None]:
        """A body and the Content-Type that would fit it."""
        rng = self.rng
        kind = rng.choices(
            ("none", "object", "json", "raw", "form", "multipart", "bytes", "big"),
            (22, 30, 6, 8, 12, 12, 6, 2),
        )[0]
        match kind:
            case "none":
                return None, None
            case "object":
                return self.dumps(self.json_object()), "application/json"
            case "json":
                return self.dumps(self.json_value(4)), "application/json"
            case "raw":
                return self.raw_json(), "application/json"
            case "form":
                return self.form(), "application/x-www-form-urlencoded"
            case "multipart":
                return self.multipart()
            case "bytes":
                return rng.randbytes(rng.randint(1, 200)), rng.choice(CONTENT_TYPES)
            case _:
                size = rng.choice((MAX_BODY - 100, MAX_BODY - 7, MAX_BODY, MAX_BODY + 1, 100_000))
                if rng.random() < 0.5:
                    return b"action=" + b"x" * (size - 7), "application/x-www-form-urlencoded"
                return b'{"action": "' + b"x" * (size - 14) + b'"}', "application/json"

    # -- headers -----------------------------------------------------------------------

    def websocket_headers(self) -> list[tuple[str, str]]:
        rng = self.rng
        headers = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(rng.randbytes(16)).decode(),
        }
        if rng.random() < 0.4:
            name = rng.choice(tuple(headers))
            if rng.random() < 0.4:
                del headers[name]
            else:
                headers[name] = rng.choice(
                    ("", "8", "h2c", "short", "WebSocket", "keep-alive", self.header_text())
                )
        if rng.random() < 0.2:
            headers["Sec-WebSocket-Protocol"] = rng.choice(("chat", "", "a, b", self.header_text()))
        return list(headers.items())

    def headers(
        self, kind: str, body: bytes | None, fits: str | None
    ) -> tuple[list[tuple[str, str]], bool, bytes | None]:
        rng = self.rng
        headers: list[tuple[str, str]] = []
        bare = False
        if body is not None:
            r = rng.random()
            if r < 0.7 and fits is not None:
                charset = f"; charset={rng.choice(CHARSETS)}" if rng.random() < 0.2 else ""
                headers.append(("Content-Type", fits + charset))
            elif r < 0.9:
                headers.append(("Content-Type", rng.choice(CONTENT_TYPES)))
            else:
                bare = True
            if rng.random() < (0.2 if kind == "create" else 0.03):
                encoding = rng.choice(ENCODINGS)
                headers.append(("Content-Encoding", encoding))
                if rng.random() < 0.5:
                    if encoding.lower() == "gzip":
                        body = gzip.compress(body, mtime=0)
                    elif encoding == "deflate":
                        body = zlib.compress(body)
        elif rng.random() < 0.1:
            headers.append(("Content-Type", rng.choice(CONTENT_TYPES)))
        if rng.random() < 0.25:
            headers.append(("Accept", rng.choice(ACCEPTS)))
        if rng.random() < (0.5 if kind in ("events", "stream", "websocket") else 0.08):
            value = self.cursor() if rng.random() < 0.7 else self.header_text(0, 8)
            headers.append(("Last-Event-ID", value))
        if rng.random() < (0.5 if kind in FILE_ROUTES else 0.08):
            headers.append(("Range", rng.choice(RANGES)))
        if kind in FILE_ROUTES and rng.random() < 0.3:
            name = rng.choice(
                ("If-Match", "If-None-Match", "If-Range", "If-Modified-Since", "If-Unmodified-Since")
            )
            headers.append((name, rng.choice(ETAGS if "Match" in name else DATES + ETAGS[:3])))
        if rng.random() < 0.03:
            headers.append(("Expect", rng.choice(EXPECTS)))
        if rng.random() < (0.15 if kind in ("create", "tasks") else 0.03):  # the two that show URLs
            headers.append(("Host", rng.choice(HOSTS)))
        if rng.random() < 0.04:
            headers.append(("Accept-Encoding", rng.choice(ACCEPT_ENCODINGS)))
        if rng.random() < 0.05:
            name = rng.choice(
                ("Cookie", "Origin", "X-Forwarded-For", "User-Agent", "Authorization", "X-\u00e9")
            )
            headers.append((name.encode("ascii", "ignore").decode() or "X", self.header_text(0, 30)))
        if kind == "websocket" and rng.random() < 0.5:
            headers += self.websocket_headers()
        return headers, bare, body

    # -- a request ---------------------------------------------------------------------

    def request(self, index: int) -> Req:
        rng = self.rng
        kind = rng.choices(tuple(KINDS), tuple(KINDS.values()))[0]
        if kind == "create" and rng.random() < 0.3:
            return self.clean_create(index)
        natural = {"create": "POST", "kill": rng.choice(("GET", "POST"))}.get(kind, "GET")
        method = natural if rng.random() < 0.72 else rng.choice(METHODS)
        path = self.path(kind)
        query = self.query(kind, method)
        target = path + ("?" + query if query or rng.random() < 0.05 else "")
        if len(target) > URL_MAX:
            target = path[: URL_MAX - len(query) - 1] + "?" + query
        body, fits = (
            self.body() if method in ("POST", "PUT", "PATCH") or rng.random() < 0.05 else (None, None)
        )
        headers, bare, body = self.headers(kind, body, fits)
        return Req(self.seed, index, method, target, tuple(headers), body, bare)

    def clean_create(self, index: int) -> Req:
        """A creation that may well succeed (an `ok` for an app and environment of the
        repository), its headers fuzzed as any other's: the path to a task is walked too."""
        rng = self.rng
        app = rng.choice(tuple(TARGETS))
        target = f"/{app}/{rng.choice(TARGETS[app])}"
        fields: dict[str, Any] = {"action": rng.choice(OK_ACTIONS)}
        if rng.random() < 0.3:
            fields["queue"] = rng.choice(("true", "1", "false"))
        body: bytes | None
        where = rng.choice(("json", "json", "form", "query"))
        if where == "json":
            if rng.random() < 0.3:
                fields["taskVariables"] = {rng.choice(GOOD_VARIABLES): rng.choice(GOOD_VALUES)}
            body, fits = self.dumps(fields), "application/json"
        elif where == "form":
            body, fits = urlencode(fields).encode(), "application/x-www-form-urlencoded"
        else:
            body, fits, target = None, None, f"{target}?{urlencode(fields)}"
        headers, bare, body = self.headers("create", body, fits)
        return Req(self.seed, index, "POST", target, tuple(headers), body, bare)


def requests_for(seed: int) -> list[Req]:
    """The requests of one seed, the same on every run: `requests_for(seed)[i]` replays one."""
    return Fuzzer(seed).requests(PER_SEED)


# -- the answers ---------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    content_type: str
    headers: Mapping[str, str]
    body: bytes | None  # None for a stream (not read)


def _http_answer(req: Req, answer: Answer, route: str) -> list[str] | None:
    """The answers HTTP itself makes outside the envelope, each checked exactly: a Range
    that cannot be satisfied (416) or a failed precondition (412) on a file, an unknown
    expectation (417), a body whose Content-Encoding cannot be decoded (400, aiohttp's
    parser answers it before the app sees the request). None if `answer` is none of them."""
    status, body = answer.status, answer.body or b""
    file_get = route in FILE_ROUTES and req.method in ("GET", "HEAD")
    if status == 416 and file_get and req.header("Range") is not None:
        wanted = "text/plain" if route in ("log", "stdout") else "application/octet-stream"
        found = []
        if not re.fullmatch(r"bytes \*/\d+", answer.headers.get("Content-Range", "")):
            found.append(
                f"a 416 without Content-Range: bytes */SIZE ({answer.headers.get('Content-Range')!r})"
            )
        if answer.content_type != wanted or body:
            found.append(f"a 416 that is not an empty {wanted}")
        return found
    if status == 412 and file_get and req.has("If-Match", "If-Unmodified-Since"):
        return [] if not body and answer.headers.get("Content-Length") == "0" else ["a 412 with a body"]
    if status == 304 and file_get and req.has("If-None-Match", "If-Modified-Since"):
        return [] if not body else ["a 304 with a body"]
    expect = req.header("Expect")
    if status == 417 and expect is not None and expect.lower() != "100-continue":
        wanted_body = b"" if req.method == "HEAD" else f"Unknown Expect: {expect}".encode()
        ok = answer.content_type == "text/plain" and body == wanted_body
        return [] if ok else ["a 417 that is not aiohttp's text/plain 'Unknown Expect'"]
    encoding = (req.header("Content-Encoding") or "").lower()
    if (
        status == 400
        and answer.content_type == "text/plain"
        and encoding in ("gzip", "deflate", "br", "zstd")
    ):
        ok = body.startswith(b"Can not decode content-encoding: ") or body == b"deflate"
        return [] if ok else ["a text/plain 400 that is not aiohttp's content-encoding error"]
    return None


def _envelope(req: Req, answer: Answer) -> list[str]:
    status = answer.status
    if answer.content_type != "application/json":
        return [f"a {status} that is not JSON ({answer.content_type})"]
    if req.method == "HEAD":
        return ["a HEAD answer with a body"] if answer.body else []
    try:
        decoded = json.loads(answer.body or b"")
    except ValueError:
        return [f"a {status} whose body is not JSON"]
    if not isinstance(decoded, dict) or not isinstance(decoded.get("error"), dict):
        return [f"a {status} that is not the envelope"]
    error = dict(decoded["error"])
    found = []
    if status == 409 and "taskId" in error:
        # The deploy in the way: the one documented member beyond the envelope's own.
        holder = error.pop("taskId")
        if not isinstance(holder, int) or f"busy with task {holder} " not in str(error.get("message")):
            found.append(f"a 409 whose taskId {holder!r} is not the task its message names")
    try:
        assert_envelope({**decoded, "error": error}, status)
    except AssertionError as exc:
        found.append(f"not the envelope: {str(exc).splitlines()[0]}")
    if status == 405 and "Allow" not in answer.headers:
        found.append("a 405 without Allow")
    return found


def problems(req: Req, answer: Answer) -> list[str]:
    """What is wrong with `answer` to `req`: nothing, when all is well."""
    status, route = answer.status, route_of(req.target)
    if status >= 500:
        return [f"a {status}"]
    known = _http_answer(req, answer, route)
    if known is not None:
        return known
    if 400 <= status < 500:
        return _envelope(req, answer)
    if status == 101:
        upgrade = answer.headers.get("Upgrade", "").lower()
        return [] if route == "websocket" and upgrade == "websocket" else ["a 101 that is no WebSocket"]
    if not 200 <= status < 300:
        return [f"an unexpected {status}"]
    if route in JSON_ROUTES:
        if req.method == "HEAD":
            return []
        if answer.content_type != "application/json":
            return [f"a {status} of a JSON route that is {answer.content_type}"]
        try:
            json.loads(answer.body or b"")
        except ValueError:
            return [f"a {status} of a JSON route whose body is not JSON"]
        return []
    if route in ("events", "stream"):
        return (
            [] if answer.content_type == "text/event-stream" else ["a stream that is not text/event-stream"]
        )
    return [] if route in FILE_ROUTES else [f"a {status} of no route ({route})"]


async def send(session: aiohttp.ClientSession, root: str, req: Req) -> Answer:
    kwargs: dict[str, Any] = {"timeout": aiohttp.ClientTimeout(total=ANSWER_WITHIN)}
    if req.body is not None:
        kwargs["data"] = req.body
    if req.bare:
        kwargs["skip_auto_headers"] = ("Content-Type",)
    url = URL(root + req.target, encoded=True)
    async with session.request(req.method, url, headers=list(req.headers), **kwargs) as resp:
        if resp.status == 101 or resp.content_type == "text/event-stream":
            resp.close()  # a stream: its status and headers are the answer; closing ends it
            return Answer(resp.status, resp.content_type, resp.headers, None)
        return Answer(resp.status, resp.content_type, resp.headers, await resp.read())


def describe(record: logging.LogRecord) -> str:
    line = f"{record.name} {record.levelname}: {record.getMessage()}"
    if record.exc_info and record.exc_info[1] is not None:
        line += " | " + " ".join(traceback.format_exception_only(record.exc_info[1])[-1].split())
    return line


@dataclass
class Failure:
    req: Req | None
    answer: Answer | None
    found: list[str]
    logs: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"- {'; '.join(self.found)}"]
        if self.req is not None:
            lines.append(f"  {self.req}")
        if self.answer is not None:
            body = "(a stream, not read)" if self.answer.body is None else repr(self.answer.body[:400])
            lines.append(f"    -> {self.answer.status} {self.answer.content_type}: {body}")
        lines += [f"    server log: {line}" for line in self.logs]
        return "\n".join(lines)


def report(seed: int, failures: list[Failure], count: int) -> str:
    kinds = collections.Counter(re.split(r" \(|: | while ", f.found[0])[0] for f in failures)
    shown = "\n".join(str(f) for f in failures[:30])
    more = f"\n... and {len(failures) - 30} more" if len(failures) > 30 else ""
    summary = ", ".join(f"{n} x {kind}" for kind, n in kinds.most_common())
    return f"seed {seed}: {len(failures)} of {count} requests went wrong ({summary}):\n{shown}{more}"


# -- the test ------------------------------------------------------------------------------


def config_repo(root: Path) -> Path:
    apps = root / "apps"
    apps.mkdir(parents=True)
    (apps / "Capfile").write_text("")
    (apps / "deploy.rb").write_text("")
    for app, envs in TARGETS.items():
        (apps / app).mkdir()
        (apps / app / "deploy.rb").write_text("")
        for env in envs:
            (apps / app / f"{env}.rb").write_text("")
    return root


async def setup_tasks(client: Client, gate: str) -> None:
    made = [await create(client, action, app, env) for app, env, action in SETUP]
    for task in made:
        await finished(client, task["id"])
    held = await create(client, f"gate[{gate}]", *HELD)
    await follow(client, held["id"], lambda t: f"waiting for {gate}" in t["output"])
    assert [*(t["id"] for t in made), held["id"]] == list(REAL_IDS)


@pytest.mark.parametrize("seed", SEEDS)
async def test_fuzz(
    seed: int, make_client: ClientFactory, gates: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(config_repo=str(config_repo(tmp_path / "conf")), long_poll_timeout=LONG_POLL)
    gate = f"fuzz{seed}"
    await setup_tasks(client, gate)
    root = str(client.make_url("/")).rstrip("/")
    reqs = requests_for(seed)
    failures: list[Failure] = []
    statuses: collections.Counter[int] = collections.Counter()
    outside: collections.Counter[str] = collections.Counter()  # 4xx answers HTTP makes, not the app
    answered: set[int] = set()  # ids of the tasks whose creation was answered 200
    during: dict[int, int] = {}  # log record -> the request sent when it was logged
    logged: set[int] = set()  # the log records shown with a failed request
    started = time.monotonic()
    # A connection for each request: none depends on the one before, each can be replayed alone.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for req in reqs:
            before = len(caplog.records)
            answer: Answer | None = None
            try:
                answer = await send(session, root, req)
            except aiohttp.ClientResponseError as exc:  # what came back is no HTTP answer
                found = [f"an answer the client cannot read: {exc.message.splitlines()[0]}"]
            except (aiohttp.ClientError, TimeoutError) as exc:
                found = [f"no answer: {exc!r}"]
            else:
                statuses[answer.status] += 1
                found = problems(req, answer)
                if not found and answer.status >= 400 and answer.content_type != "application/json":
                    outside[f"{answer.status} {answer.content_type}"] += 1
                if (
                    not found
                    and answer.status == 200
                    and req.method == "POST"
                    and route_of(req.target) == "create"
                ):
                    answered.add(json.loads(answer.body or b"")["taskId"])
            errors = [
                i for i in range(before, len(caplog.records)) if caplog.records[i].levelno >= logging.ERROR
            ]
            during.update((i, req.index) for i in errors)
            if found:
                logged.update(errors)
                failures.append(Failure(req, answer, found, [describe(caplog.records[i]) for i in errors]))
    elapsed = time.monotonic() - started

    # The server still answers; then every task ends (the held one let go) and nothing waits.
    resp = await client.get("/status")
    if resp.status != 200:
        failures.append(Failure(None, None, [f"GET /status answered {resp.status} after the fuzz"]))
    release(gates, gate)
    listing = await get_json(client, "/tasks", pageSize=1000)
    for task_id in reversed(listing["ids"]):
        await finished(client, task_id)
    await eventually(lambda: waiters(client) == 0, timeout=5, what="no waiter left")
    assert (await get_json(client, "/status"))["waiters"] == 0

    # Only the creations answered 200 made a task.
    unexplained = sorted(set(listing["ids"]) - answered - set(REAL_IDS))
    if listing["total"] != len(REAL_IDS) + len(answered) or unexplained:
        tasks = listing["tasks"]
        shown = [
            (i, tasks[str(i)]["app"], tasks[str(i)]["env"], tasks[str(i)]["action"]) for i in unexplained
        ]
        failures.append(
            Failure(
                None, None, [f"{listing['total']} tasks, {len(answered)} creations answered 200 ({shown})"]
            )
        )
    # And an error the server logged went with a failed request.
    for i, record in enumerate(caplog.records):
        if i not in logged and record.levelno >= logging.ERROR and record.name.startswith("pulsar_rest"):
            when = f" while request #{during[i]} was sent" if i in during else ""
            failures.append(Failure(None, None, [f"an error logged by the server{when}"], [describe(record)]))

    gc.collect()  # what the requests left for the collector goes now, under this test's filters
    print(f"seed {seed}: {len(reqs)} requests in {elapsed:.1f} s, {len(answered)} tasks made")
    print(f"  statuses {sorted(statuses.items())}; outside the envelope, as HTTP has it: {dict(outside)}")
    assert not failures, report(seed, failures, len(reqs))


def test_requests_are_the_same_on_every_run() -> None:
    """A seed makes the same requests each time (a failure names one by its index), and no
    request names a task that could start anything but `ok`."""
    first, again = requests_for(SEEDS[0]), requests_for(SEEDS[0])
    assert first == again
    assert sum(len(requests_for(seed)) for seed in SEEDS) == 1500
    kinds = {route_of(req.target) for seed in SEEDS for req in requests_for(seed)}
    assert kinds >= {*JSON_ROUTES, *FILE_ROUTES, "events", "stream", "websocket", "none"}
    assert {req.method for req in first} == set(METHODS)
    for action in OK_ACTIONS:  # valid names, all of the fake pulsar's `ok`
        check_action(action)
        assert action.partition("[")[0].split(":")[-1] == "ok"
