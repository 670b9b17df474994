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

from pulsar_rest.auth.github import BadCredentials, GitHubClient, GitHubUnavailable, Membership
from pulsar_rest.auth.grants import Grant, GrantKind, Role
from pulsar_rest.auth.tokens import ApiToken, digest, is_ours
from pulsar_rest.tasks import utcnow

# Answers kept at most, each kind: beyond it, the expired go, then the oldest. Refusals are
# kept apart, so a flood of made-up tokens never pushes out the answers of real users.
CACHE_SIZE = 10_000
# A token's "last used" is written at most this often: not a database write per request.
TOUCH_EVERY = timedelta(seconds=60)
# Tokens never seen before asked of GitHub at once; more wait (a flood of made-up tokens
# must not take every connection, nor GitHub's patience with this server).
LOOKUPS = 8
# The longest one identification may take, all its pages of teams included.
LOOKUP_TIMEOUT = 15.0
# How long an answer is kept when GitHub refused to say something (it may have been a
# passing refusal), and how often pulsar-rest's own tokens are looked up again by a stream.
UNSURE_TTL = 10.0
OWN_TOKEN_RECHECK = 1.0


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


@dataclass(frozen=True)
class Verdict:
    """An identity, and until when (on the authenticator's clock) it holds without asking."""

    identity: Identity
    until: float


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
        self._refused: dict[str, _Cached] = {}
        self._asking: dict[str, asyncio.Task[_Cached]] = {}
        self._lookups = asyncio.Semaphore(LOOKUPS)

    def clock(self) -> float:
        return self._clock()

    async def identify(self, token: str) -> Identity:
        """The identity of `token`; Unauthenticated if nobody vouches for it, and
        GitHubUnavailable if GitHub cannot say now (never a guess)."""
        verdict = await self.verdict(token)
        assert verdict is not None
        return verdict.identity

    async def verdict(self, token: str, cached_only: bool = False) -> Verdict | None:
        """The identity of `token` and until when it holds; with `cached_only`, None rather
        than asking GitHub about a token it has not answered for lately."""
        key = digest(token)
        if is_ours(token):
            identity = await self._our_token(key)
            return Verdict(identity, self._clock() + min(self.ttl, OWN_TOKEN_RECHECK))
        if self._github is None:
            raise Unauthenticated("only tokens made by `pulsar-rest token create` are accepted here")
        cached = self._cache.get(key) or self._refused.get(key)
        if cached is None or cached.until <= self._clock():
            if cached_only:
                return None
            cached = await self._ask_once(key, token)
        if cached.identity is None:
            raise Unauthenticated(cached.refusal)
        return Verdict(cached.identity, cached.until)

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
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                async with self._lookups:
                    return await self._decide(token)
        except TimeoutError:
            raise GitHubUnavailable(f"GitHub did not say who this is within {LOOKUP_TIMEOUT:g}s") from None

    async def _decide(self, token: str) -> _Cached:
        assert self._github is not None
        until = self._clock() + self.ttl
        try:
            login = await self._github.login(token)
        except BadCredentials as exc:
            return _Cached(until, None, str(exc))
        found: dict[Role, list[str]] = {Role.WRITE: [], Role.READ: []}
        unsure = False
        for role, grants in ((Role.WRITE, self._write), (Role.READ, self._read)):
            for grant in grants:
                membership = await self._check(grant, login, token)
                if membership.member:
                    why_not = "" if role is Role.WRITE else self._why_not(Role.WRITE, found[Role.WRITE])
                    return _Cached(self._until(until, unsure), Identity(login, role, why_not))
                unsure = unsure or not membership.sure
                if membership.why:
                    found[role].append(membership.why)
        why_not = self._why_not(Role.READ, found[Role.WRITE] + found[Role.READ])
        return _Cached(self._until(until, unsure), Identity(login, None, why_not))

    def _until(self, until: float, unsure: bool) -> float:
        """A decision GitHub would not quite give is kept a short time only."""
        return min(until, self._clock() + UNSURE_TTL) if unsure else until

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
        kept = self._cache if answer.identity is not None else self._refused
        if len(kept) >= CACHE_SIZE:
            now = self._clock()
            fresh = {k: v for k, v in kept.items() if v.until > now}
            if len(fresh) >= CACHE_SIZE:
                fresh = dict(list(fresh.items())[CACHE_SIZE // 2 :])
            kept.clear()
            kept.update(fresh)
        kept[key] = answer
