"""`pulsar-rest token create|list|revoke`: pulsar-rest's own API tokens, for bots and CI.

They work on the data directory of the server (`--data-dir`, or the `--config` file's; its
PostgreSQL with `--database`),
also while it runs: a token made now works at once, a revoked one is refused at its next
request. A new token is printed once, alone on stdout; the database keeps only its hash.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NoReturn

from pulsar_rest.auth.grants import Role
from pulsar_rest.auth.tokens import ApiToken
from pulsar_rest.names import InvalidName
from pulsar_rest.pgstore import PgTokenAdmin
from pulsar_rest.settings import SettingsError, load_settings, without_values
from pulsar_rest.store import StoreError, TokenAdmin, TokenExists
from pulsar_rest.tasks import utcnow


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        # One line, and the flags' names only, as the server's own settings do.
        raise SettingsError(f"{without_values(message)} (see pulsar-rest token --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pulsar-rest token",
        description="API tokens of pulsar-rest, for bots and CI (Authorization: Bearer TOKEN).",
    )
    where = _Parser(add_help=False)
    where.add_argument("--data-dir", metavar="DIR", help="the server's data directory")
    where.add_argument("--database", metavar="URL", help="the servers' PostgreSQL (postgresql://...)")
    where.add_argument("--config", metavar="FILE", help="the server's YAML settings (for its data directory)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="create|list|revoke")
    create = commands.add_parser("create", parents=[where], help="make a token and print it (once)")
    create.add_argument("name", help="what it is for: letters, digits, '.', '_', '-'")
    create.add_argument("--role", required=True, choices=[role.value for role in Role])
    create.add_argument(
        "--expires", metavar="DAYS", type=float, help="days it is valid (default: until revoked)"
    )
    listing = commands.add_parser("list", parents=[where], help="the tokens (never their values)")
    listing.add_argument("--json", action="store_true", help="as JSON, for scripts")
    revoke = commands.add_parser("revoke", parents=[where], help="refuse a token from its next request on")
    revoke.add_argument("name")
    return parser


def main(argv: Sequence[str]) -> int:
    try:
        args = _parser().parse_args(list(argv))
        server_args = [
            arg
            for flag, value in (
                ("--data-dir", args.data_dir),
                ("--database", args.database),
                ("--config", args.config),
            )
            if value is not None
            for arg in (flag, value)
        ]
        settings = load_settings(server_args)
        admin: TokenAdmin | PgTokenAdmin = (
            TokenAdmin(settings.data_dir) if settings.database is None else PgTokenAdmin(settings.database)
        )
        try:
            return _run(admin, args)
        finally:
            admin.close()
    except (SettingsError, StoreError, TokenExists, InvalidName) as exc:
        print(f"pulsar-rest token: {exc}", file=sys.stderr)
        return 2


def _run(admin: TokenAdmin | PgTokenAdmin, args: argparse.Namespace) -> int:
    if args.command == "create":
        if args.expires is not None and not 0 < args.expires <= 36500:
            raise SettingsError("--expires must be between 0 and 36500 days")
        expires = None if args.expires is None else utcnow() + timedelta(days=args.expires)
        token = admin.create(args.name, Role(args.role), expires)
        print(token)
        until = "until revoked" if expires is None else f"until {_day(expires)}"
        print(f"token {args.name} ({args.role}, {until}): shown this once, keep it now", file=sys.stderr)
        return 0
    if args.command == "revoke":
        if not admin.revoke(args.name):
            print(f"pulsar-rest token: no token named {args.name!r}", file=sys.stderr)
            return 1
        print(f"token {args.name} revoked", file=sys.stderr)
        return 0
    tokens = admin.tokens()
    if args.json:
        print(json.dumps([_json(token) for token in tokens], indent=2))
    else:
        rows = [("NAME", "ROLE", "CREATED", "EXPIRES", "LAST USED")]
        rows += [
            (
                t.name,
                t.role.value,
                _day(t.created_at),
                _day(t.expires_at, "never"),
                _day(t.last_used_at, "never"),
            )
            for t in tokens
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _day(moment: datetime | None, missing: str = "") -> str:
    return missing if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


def _json(token: ApiToken) -> dict[str, object]:
    def iso(moment: datetime | None) -> str | None:
        return None if moment is None else moment.isoformat()

    return {
        "name": token.name,
        "role": token.role.value,
        "createdAt": iso(token.created_at),
        "expiresAt": iso(token.expires_at),
        "lastUsedAt": iso(token.last_used_at),
    }
