"""The audit trail: who signed in, who was refused and why, who created and killed which
task, from where and when. Kept by the store and written to the log `pulsar_rest.audit`;
never a token, a password, a cookie or an OAuth code (only what this module is given, and
its callers give names, addresses and reasons)."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from pulsar_rest.tasks import utcnow

log = logging.getLogger("pulsar_rest.audit")


class AuditAction(enum.StrEnum):
    SIGN_IN = "sign-in"  # a browser session began
    SIGN_OUT = "sign-out"
    DENIED = "denied"  # a request refused for who asked (401 or 403), with the reason
    CREATE = "create"  # a task was created
    KILL = "kill"  # a task's kill was asked for


@dataclass(frozen=True)
class AuditRecord:
    action: AuditAction
    who: str | None  # the identity, or None when nobody could be told
    remote: str | None  # the client's address
    detail: str = ""  # the reason of a denial, the task's app/env and action
    task_id: int | None = None
    at: datetime = field(default_factory=utcnow)
    id: int | None = None  # given by the store


class AuditStore(Protocol):
    def add_audit(self, record: AuditRecord) -> None:
        """Keep `record`, in order, soon."""

    async def audit_page(self, offset: int, limit: int) -> tuple[list[AuditRecord], int]:
        """Records newest first from `offset`, and how many there are in all."""


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Audit:
    def __init__(self, store: AuditStore) -> None:
        self._store = store

    def record(
        self,
        action: AuditAction,
        who: str | None,
        remote: str | None,
        detail: str = "",
        task_id: int | None = None,
    ) -> None:
        detail = _printable(detail)  # no line breaks to forge lines with, in the log or out of it
        self._store.add_audit(AuditRecord(action, who, remote, detail, task_id))
        log.info(
            "%s%s by %s from %s%s",
            action,
            "" if task_id is None else f" task {task_id}",
            who or "nobody",
            remote or "?",
            f": {detail}" if detail else "",
        )

    async def page(self, offset: int, limit: int) -> tuple[list[AuditRecord], int]:
        return await self._store.audit_page(offset, limit)
