"""From a token to an identity and its role.

A GitHub token is asked of GitHub (who it is, then the grants' memberships) and the answer
reused for `ttl` seconds, keyed by the token's hash, never the token: a revoked token or a
removed member loses access within `ttl`. pulsar-rest's own tokens are looked up in the
store at every use, so a revoked one is refused at its next request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from pulsar_rest.auth.github import BadCredentials, GitHubClient, Membership
from pulsar_rest.auth.grants import Grant, GrantKind, Role
from pulsar_rest.auth.tokens import ApiToken, digest, is_ours
from pulsar_rest.tasks import utcnow

# Answers kept at most: beyond it, the expired go, then the oldest.
CACHE_SIZE = 10_000
# A token's "last used" is written at most this often: not a database write per request.
TOUCH_EVERY = timedelta(seconds=60)


class Unauthenticated(Exception):
    """The credentials are unknown, revoked or expired (a 401)."""


@dataclass(frozen=True)
class Identity:
    name: str  # "alice", "token:deploy-bot"; the client's address without authentication
    role: Role | None  # the strongest role held; None: known, but granted nothing
    why_not: str = ""  # why the role is not write (or none): for the 403's message

    def allows(self, needed: Role) -> bool:
        return self.role is not None and self.role.allows(needed)

    @property
    def roles(self) -> list[str]:
        return [role.value for role in Role if self.allows(role)]


class TokenStore(Protocol):
    async def find_token(self, token_digest: str) -> ApiToken | None: ...

    def token_used(self, token_digest: str, at: datetime) -> None: ...


@dataclass
class _Cached:
    until: float
    identity: Identity | None
    refusal: str = ""


class Authenticator:
    def __init__(
        self,
        *,
        store: TokenStore,
        github: GitHubClient | None,
        read: Sequence[Grant] = (),
        write: Sequence[Grant] = (),
        ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._github = github  # None: only pulsar-rest's own tokens (--auth-provider token)
        self._read = tuple(read)
        self._write = tuple(write)
        self.ttl = ttl
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._asking: dict[str, asyncio.Task[_Cached]] = {}

    async def identify(self, token: str) -> Identity:
        """The identity of `token`; Unauthenticated if nobody vouches for it, and
        GitHubUnavailable if GitHub cannot say now (never a guess)."""
        key = digest(token)
        if is_ours(token):
            return await self._our_token(key)
        if self._github is None:
            raise Unauthenticated("only tokens made by `pulsar-rest token create` are accepted here")
        cached = self._cache.get(key)
        if cached is None or cached.until <= self._clock():
            cached = await self._ask_once(key, token)
        if cached.identity is None:
            raise Unauthenticated(cached.refusal)
        return cached.identity

    async def _our_token(self, key: str) -> Identity:
        found = await self._store.find_token(key)
        now = utcnow()
        if found is None:
            raise Unauthenticated("unknown or revoked token")
        if found.expired(now):
            raise Unauthenticated(f"the token {found.name} has expired")
        if found.last_used_at is None or now - found.last_used_at >= TOUCH_EVERY:
            self._store.token_used(key, now)
        return Identity(found.identity, found.role)

    async def _ask_once(self, key: str, token: str) -> _Cached:
        # One question to GitHub per token at a time, shared by the page's streams and polls
        # that open together; a caller that gives up (a client gone) leaves it to the others.
        asking = self._asking.get(key)
        if asking is None:
            asking = asyncio.get_running_loop().create_task(self._ask(token))
            self._asking[key] = asking
            asking.add_done_callback(lambda done: self._settle(key, done))
        return await asyncio.shield(asking)

    def _settle(self, key: str, done: asyncio.Task[_Cached]) -> None:
        del self._asking[key]
        if not done.cancelled() and done.exception() is None:  # a failure is never kept
            self._keep(key, done.result())

    async def _ask(self, token: str) -> _Cached:
        assert self._github is not None
        until = self._clock() + self.ttl
        try:
            login = await self._github.login(token)
        except BadCredentials as exc:
            return _Cached(until, None, str(exc))
        found: dict[Role, list[str]] = {Role.WRITE: [], Role.READ: []}
        for role, grants in ((Role.WRITE, self._write), (Role.READ, self._read)):
            for grant in grants:
                membership = await self._check(grant, login, token)
                if membership.member:
                    why_not = "" if role is Role.WRITE else self._why_not(Role.WRITE, found[Role.WRITE])
                    return _Cached(until, Identity(login, role, why_not))
                if membership.why:
                    found[role].append(membership.why)
        why_not = self._why_not(Role.READ, found[Role.WRITE] + found[Role.READ])
        return _Cached(until, Identity(login, None, why_not))

    def _why_not(self, role: Role, findings: list[str]) -> str:
        grants = self._write + (self._read if role is Role.READ else ())
        if not grants:
            return f"nobody is granted {role} (--auth-{role})"
        granted = f"{role} is granted to {', '.join(str(grant) for grant in grants)}"
        return "; ".join([granted, *findings])

    async def _check(self, grant: Grant, login: str, token: str) -> Membership:
        assert self._github is not None
        if grant.kind is GrantKind.USER:
            return Membership(login.lower() == grant.name.lower())
        if grant.kind is GrantKind.ORG:
            return await self._github.org_membership(token, login, grant.org)
        return await self._github.team_membership(token, login, grant.org, grant.team)

    def _keep(self, key: str, answer: _Cached) -> None:
        if self.ttl <= 0:
            return
        if len(self._cache) >= CACHE_SIZE:
            now = self._clock()
            self._cache = {k: v for k, v in self._cache.items() if v.until > now}
            if len(self._cache) >= CACHE_SIZE:
                self._cache = dict(list(self._cache.items())[CACHE_SIZE // 2 :])
        self._cache[key] = answer
