"""Typed keys of everything the application holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from pulsar_rest.audit import Audit
from pulsar_rest.confrepo import ConfigRepo
from pulsar_rest.events import EventBus
from pulsar_rest.metrics import Metrics
from pulsar_rest.service import TaskService
from pulsar_rest.settings import Settings
from pulsar_rest.store import TaskStore
from pulsar_rest.web.fanout import Messages
from pulsar_rest.web.present import AnswerCache

SETTINGS = web.AppKey("settings", Settings)
BUS = web.AppKey("bus", EventBus)
SERVICE = web.AppKey("service", TaskService)
ANSWERS = web.AppKey("answers", AnswerCache)
AUDIT = web.AppKey("audit", Audit)
# The store by its interface: SQLite now, PostgreSQL later (issue 15) behind the same one.
STORE: web.AppKey[TaskStore] = web.AppKey("store")
METRICS = web.AppKey("metrics", Metrics)
# Messages shared by the followers of a task: SSE output events (with the offset after
# them), and the bodies of `output?offset=` answers.
STREAM_MESSAGES: web.AppKey[Messages[tuple[bytes, int]]] = web.AppKey("stream_messages")
OUTPUT_ANSWERS: web.AppKey[Messages[bytes]] = web.AppKey("output_answers")
CONF: web.AppKey[ConfigRepo | None] = web.AppKey("conf")  # None: no configuration repository

if TYPE_CHECKING:  # they import these keys
    from pulsar_rest.web.auth import Gatekeeper, Rule
    from pulsar_rest.web.signin import SignIn

GATEKEEPER: web.AppKey[Gatekeeper] = web.AppKey("gatekeeper")
RULES: web.AppKey[dict[AbstractRoute, Rule]] = web.AppKey("rules")  # each route's access
# The first segments of the routes of two segments or more: no app may be named so.
RESERVED: web.AppKey[frozenset[str]] = web.AppKey("reserved")
SIGN_IN: web.AppKey[SignIn] = web.AppKey("sign_in")
