"""Tests on both stores: a module that imports `on_both_stores` runs each of its tests on
SQLite and on PostgreSQL (whose events are numbered in the database and come back through
its feed)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pulsar_rest.settings import Settings


@pytest.fixture(name="settings")
def on_both_stores(settings: Settings, database: str | None) -> Settings:
    return replace(settings, database=database)
