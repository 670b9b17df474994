"""The configuration repository as pulsar reads it: which apps and environments it has."""

from __future__ import annotations

from pathlib import Path

# Entries of apps/ that are shared files, not apps (pulsar v1's rule).
_SHARED = {"Capfile", "deploy.rb"}


class UnknownTarget(LookupError):
    """The repository has no such app, or no such environment for it."""


def apps(conf: Path) -> dict[str, list[str]]:
    """`{app: [environments]}`, sorted, as `pulsar list` shows them: the entries of apps/
    but Capfile and deploy.rb; an app's environments are its *.rb files but deploy.rb."""
    root = conf / "apps"
    found: dict[str, list[str]] = {}
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name in _SHARED or not entry.is_dir():
            continue
        found[entry.name] = sorted(
            path.stem for path in entry.glob("*.rb") if path.name != "deploy.rb" and path.is_file()
        )
    return found


def check(conf: Path, app: str, env: str) -> None:
    known = apps(conf)
    if app not in known:
        raise UnknownTarget(
            f"the configuration repository has no app {app!r} (it has: {', '.join(known) or 'none'})"
        )
    if env not in known[app]:
        raise UnknownTarget(
            f"app {app!r} has no environment {env!r} (it has: {', '.join(known[app]) or 'none'})"
        )
