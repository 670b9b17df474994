"""GitHub, asked who a token is and what they belong to, and the OAuth code exchange.

Every call is time-boxed and made once: a GitHub that is down, slow, failing or rate
limiting us is a `GitHubUnavailable` (the service answers 503, never lets anyone in), and
no call is retried in a loop (a rate limit is only made worse by retries).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

log = logging.getLogger(__name__)

# Longest wait for one answer of GitHub: a hung GitHub is a 503, not a hung request.
TIMEOUT = 5.0
# A user in more teams than this is not looked through further (10,000 teams).
MAX_PAGES = 100
# GitHub's answers are small (a page of 100 teams is some 100 KiB): more is not GitHub.
MAX_BODY = 4 * 1024 * 1024
_RATE_LIMITED = re.compile(r"rate limit|abuse", re.IGNORECASE)
_ACCEPT = "application/vnd.github+json"


class GitHubUnavailable(RuntimeError):
    """GitHub cannot answer now; `retry_after` (seconds) when it said when it will."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BadCredentials(LookupError):
    """GitHub does not know the token (or the OAuth code)."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # the JSON body, or None
    headers: CIMultiDictProxy[str]

    @property
    def message(self) -> str:
        return str(self.body.get("message", "")) if isinstance(self.body, dict) else ""


@dataclass(frozen=True)
class Teams:
    found: set[tuple[str, str]]  # (org, slug), lower case
    partial: bool  # GitHub left out some organisations' teams (SAML single sign-on)


@dataclass(frozen=True)
class Membership:
    """What GitHub says of a user in an organisation or a team."""

    member: bool
    why: str = ""  # when not a member, in words for the user
    sure: bool = True  # False: GitHub would not say (it may say next time)


def _segment(text: str) -> str:
    return quote(text, safe="")


class GitHubClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        web_url: str,
        api_url: str,
        service_login: str | None = None,
        service_token: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self._session = session
        self._web_url = web_url.rstrip("/")
        # Paths are joined under the API's own path: GitHub Enterprise's /api/v3 stays.
        self._api_url = api_url.rstrip("/")
        self._service = (service_login, service_token) if service_login and service_token else None
        self._timeout = aiohttp.ClientTimeout(total=TIMEOUT if timeout is None else timeout)
        self.calls = 0  # answers asked of GitHub, for the metrics and the tests
        self.failures = 0

    async def _get(
        self, path: str, token: str | None, params: Mapping[str, str] | None = None, *, service: bool = False
    ) -> Answer:
        headers = {"Accept": _ACCEPT, "X-GitHub-Api-Version": "2022-11-28"}
        if service:
            assert self._service is not None
            headers["Authorization"] = aiohttp.encode_basic_auth(*self._service)
        else:
            headers["Authorization"] = f"token {token}"
        return await self._call("GET", URL(self._api_url + path), headers=headers, params=params)

    async def _call(self, method: str, url: URL, **kwargs: Any) -> Answer:
        self.calls += 1
        try:
            async with self._session.request(
                method, url, timeout=self._timeout, allow_redirects=False, **kwargs
            ) as resp:
                raw = await resp.content.read(MAX_BODY + 1)
                headers = CIMultiDictProxy(CIMultiDict(resp.headers))  # names in any case
                status = resp.status
        except TimeoutError:
            self.failures += 1
            raise GitHubUnavailable(f"GitHub did not answer within {self._timeout.total:g}s") from None
        except aiohttp.ClientError as exc:
            self.failures += 1
            raise GitHubUnavailable(f"GitHub cannot be reached ({type(exc).__name__})") from None
        if len(raw) > MAX_BODY:
            self.failures += 1
            raise GitHubUnavailable(f"GitHub's answer was over {MAX_BODY // 1024} KiB")
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        answer = Answer(status, body, headers)
        if status >= 500:
            self.failures += 1
            raise GitHubUnavailable(f"GitHub answered {status}")
        if status == 429 or (
            status == 403
            and (
                headers.get("X-RateLimit-Remaining") == "0"
                or "Retry-After" in headers
                or _RATE_LIMITED.search(answer.message)  # GitHub's secondary rate limits
            )
        ):
            self.failures += 1
            raise GitHubUnavailable("GitHub's rate limit is reached", _retry_after(headers))
        return answer

    async def login(self, token: str) -> str:
        """Whose token this is; BadCredentials if GitHub does not know it."""
        answer = await self._get("/user", token)
        if answer.status == 401:
            raise BadCredentials("GitHub does not know this token (revoked, expired or mistyped)")
        if answer.status != 200 or not isinstance(answer.body, dict) or "login" not in answer.body:
            raise GitHubUnavailable(f"GitHub answered {answer.status} to who a token is")
        return str(answer.body["login"])

    async def org_membership(self, token: str, login: str, org: str) -> Membership:
        """Is `login` an active member of `org`? Asked with the user's token (private
        members are seen, a pending invitation is no membership); when GitHub refuses the
        user's token (scope, SAML, an OAuth app's restrictions), with the service account."""
        answer = await self._get(f"/user/memberships/orgs/{_segment(org)}", token)
        if answer.status == 200 and isinstance(answer.body, dict):
            if answer.body.get("state") == "active":
                return Membership(True)
            return Membership(False, f"{login}'s membership of {org} is pending (invitation not accepted)")
        if answer.status == 404:
            return Membership(False, f"{login} is not a member of {org}")
        if self._service is not None:
            asked = await self._get(f"/orgs/{_segment(org)}/members/{_segment(login)}", None, service=True)
            if asked.status == 204:
                return Membership(True)
            if asked.status == 404:
                return Membership(False, f"{login} is not a member of {org}")
            return Membership(
                False, f"the account of --auth-username cannot see the members of {org}", sure=False
            )
        return Membership(False, _refused(answer, f"whether {login} is a member of {org}", org), sure=False)

    async def team_membership(self, token: str, login: str, org: str, team: str) -> Membership:
        """Is `login` in `org`/`team`? The user's teams, every page of them; when GitHub
        refuses the user's token, or leaves out the teams of organisations that enforce SAML
        single sign-on the token is not authorised for, the service account asks the team."""
        teams = await self.teams(token)
        if teams is not None and (org.lower(), team.lower()) in teams.found:
            return Membership(True)
        if teams is not None and not teams.partial:
            return Membership(False, f"{login} is not a member of {org}/{team}")
        if self._service is not None:
            path = f"/orgs/{_segment(org)}/teams/{_segment(team)}/memberships/{_segment(login)}"
            asked = await self._get(path, None, service=True)
            if asked.status == 200 and isinstance(asked.body, dict) and asked.body.get("state") == "active":
                return Membership(True)
            return Membership(False, f"{login} is not a member of {org}/{team}")
        if teams is not None:  # partial: GitHub left some organisations out
            return Membership(
                False,
                f"GitHub would not say whether {login} is in {org}/{team}: an organisation enforces "
                f"SAML single sign-on; authorise the token (or the OAuth app) for {org} on GitHub",
                sure=False,
            )
        return Membership(
            False, f"GitHub refused to list {login}'s teams (the token needs the read:org scope)", sure=False
        )

    async def teams(self, token: str) -> Teams | None:
        """The user's teams as (org, slug), lower case, following every page; None when
        GitHub refuses to list them with this token."""
        found: set[tuple[str, str]] = set()
        partial = False
        params: Mapping[str, str] | None = {"per_page": "100"}
        path = "/user/teams"
        for _ in range(MAX_PAGES):
            answer = await self._get(path, token, params)
            if answer.status != 200 or not isinstance(answer.body, list):
                return None
            # SAML single sign-on: the teams of organisations the token is not authorised
            # for are left out, which GitHub says in this header.
            partial = partial or answer.headers.get("X-GitHub-SSO", "").startswith("partial-results")
            for team in answer.body:
                if isinstance(team, dict) and isinstance(team.get("organization"), dict):
                    found.add(
                        (
                            str(team["organization"].get("login", "")).lower(),
                            str(team.get("slug", "")).lower(),
                        )
                    )
            following = _next_link(answer.headers.get("Link", ""))
            if following is None:
                break
            # The next page's URL, taken as a path and query under our API URL: a Link to
            # another host is never followed with the user's token.
            url = URL(following)
            api = URL(self._api_url)
            if (url.scheme, url.host, url.port) != (api.scheme, api.host, api.port):
                log.warning("GitHub's next page of teams is on another host: not followed")
                break
            path = url.path[len(api.path.rstrip("/")) :]
            params = dict(url.query)
        return Teams(found, partial)

    async def exchange_code(self, client_id: str, client_secret: str, code: str, redirect_uri: str) -> str:
        """The OAuth web flow's last step: the code GitHub gave the browser, for a token."""
        answer = await self._call(
            "POST",
            URL(self._web_url + "/login/oauth/access_token"),
            headers={"Accept": "application/json"},
            data={
                "client_id": client_id,
                "client_secret": client_secret,
                "code": code,
                "redirect_uri": redirect_uri,
            },
        )
        body = answer.body if isinstance(answer.body, dict) else {}
        token = body.get("access_token")
        if answer.status == 200 and isinstance(token, str) and token:
            return token
        error = str(body.get("error", f"status {answer.status}"))
        if error == "incorrect_client_credentials":
            raise GitHubUnavailable("GitHub refused the OAuth app's credentials (--oauth-client-id/secret)")
        raise BadCredentials(f"GitHub refused the sign-in code ({error})")


def _retry_after(headers: CIMultiDictProxy[str]) -> int:
    if "Retry-After" in headers and headers["Retry-After"].isdigit():
        return int(headers["Retry-After"])
    reset = headers.get("X-RateLimit-Reset", "")
    if reset.isdigit():
        return max(1, int(reset) - int(time.time()))
    return 60


def _next_link(link: str) -> str | None:
    for part in link.split(","):
        url, _, rest = part.partition(";")
        if 'rel="next"' in rest.replace(" ", ""):
            return url.strip().strip("<>")
    return None


def _refused(answer: Answer, question: str, org: str) -> str:
    if "SAML" in answer.message:
        return (
            f"GitHub would not say {question}: the organisation enforces SAML single sign-on; "
            f"authorise the token (or the OAuth app) for {org} on GitHub"
        )
    return f"GitHub would not say {question} ({answer.status}: the token needs the read:org scope)"
