"""Roles and the grants that give them: `user:alice`, `org:acme`, `team:acme/deployers`."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Role(enum.StrEnum):
    READ = "read"  # see tasks, apps, output, logs; follow them
    WRITE = "write"  # also create and kill tasks (and read the audit)

    def allows(self, needed: Role) -> bool:
        """Write implies read."""
        return self is Role.WRITE or needed is Role.READ


class GrantKind(enum.StrEnum):
    USER = "user"
    ORG = "org"
    TEAM = "team"


# GitHub's own rules: logins and organisations are letters, digits and single hyphens;
# team slugs are lower-case words with hyphens, underscores or dots.
_LOGIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})"
_SLUG = r"[A-Za-z0-9._-]{1,100}"
_SHAPES = {
    GrantKind.USER: re.compile(_LOGIN),
    GrantKind.ORG: re.compile(_LOGIN),
    GrantKind.TEAM: re.compile(rf"{_LOGIN}/{_SLUG}"),
}


class GrantError(ValueError):
    pass


@dataclass(frozen=True)
class Grant:
    kind: GrantKind
    name: str  # the login, the organisation, or ORG/TEAM-SLUG

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def org(self) -> str:
        return self.name.split("/")[0]

    @property
    def team(self) -> str:
        return self.name.split("/")[1]


def parse_grants(text: str, method: str) -> tuple[Grant, ...]:
    """Comma-separated grants; each read as `method` says (user, org or team) unless it
    names its kind itself (`team:acme/deployers`), which wins."""
    grants: list[Grant] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        kind_text, colon, name = item.partition(":")
        if not colon:
            kind_text, name = method, item
        try:
            kind = GrantKind(kind_text)
        except ValueError:
            raise GrantError(f"{item!r}: the kind must be user, org or team") from None
        if not _SHAPES[kind].fullmatch(name):
            shape = (
                "ORG/TEAM"
                if kind is GrantKind.TEAM
                else "a GitHub login"
                if kind is GrantKind.USER
                else "ORG"
            )
            raise GrantError(f"{item!r} is not a {kind} grant (expected {shape})")
        grants.append(Grant(kind, name))
    return tuple(grants)
