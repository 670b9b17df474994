"""pulsar-rest's own API tokens, for bots and CI: made by `pulsar-rest token create`, shown
once, kept only as a hash."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from pulsar_rest.auth.grants import Role

# A recognisable prefix lets secret scanners (GitHub's among them) find a leaked token.
PREFIX = "prt_"


def new_token() -> str:
    """A new random token: 256 bits."""
    return PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    """What is kept of a token, and what caches are keyed by: never the token itself. The
    token is random and long, so a plain SHA-256 is enough (no password stretching)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def is_ours(token: str) -> bool:
    return token.startswith(PREFIX)


@dataclass(frozen=True)
class ApiToken:
    name: str
    role: Role
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None

    @property
    def identity(self) -> str:
        return f"token:{self.name}"

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at
