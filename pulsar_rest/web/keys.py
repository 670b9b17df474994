"""Typed keys of everything the application holds."""

from __future__ import annotations

from aiohttp import web

from pulsar_rest.events import EventBus
from pulsar_rest.service import TaskService
from pulsar_rest.settings import Settings
from pulsar_rest.web.present import AnswerCache

SETTINGS = web.AppKey("settings", Settings)
BUS = web.AppKey("bus", EventBus)
SERVICE = web.AppKey("service", TaskService)
ANSWERS = web.AppKey("answers", AnswerCache)
