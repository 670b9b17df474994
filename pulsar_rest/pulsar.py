"""What pulsar-rest knows of pulsar itself: its command line and its closing lines."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# pulsar v1 ends with one of these lines (see ANCHORS.md); it exits 0 even on failure
# (nebulab/pulsar#52), so the line is what tells a failed deploy from a good one.
_SUCCESS = re.compile(r"^(Executed task \S+ for \S+ on \S+!|Deployed \S+ on \S+!)$")
_FAILURE = re.compile(r"^(Failed to execute task \S+ for \S+ on \S+\.|Failed to deploy \S+ on \S+\.)$")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# How many closing lines to look at: pulsar prints an error line after the failure line.
CLOSING_LINES = 20


def command(pulsar_bin: str, app: str, env: str, action: str, conf_repo: str | None) -> list[str]:
    """pulsar v1's `task` command as an argv list (never a shell string)."""
    argv = [pulsar_bin, "task", app, env, action]
    if conf_repo:
        argv += ["--conf-repo", conf_repo]
    return argv


def reported_failure(closing_lines: list[str]) -> bool:
    """True when the last of pulsar's verdict lines says the task failed."""
    for line in reversed(closing_lines):
        line = _ANSI.sub("", line).strip()
        if _FAILURE.match(line):
            return True
        if _SUCCESS.match(line):
            return False
    return False


def redact(value: str) -> str:
    """Hide credentials in a repository URL (https://user:token@host/..., https://token@host/...)."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if "@" not in parts.netloc or not parts.scheme:
        return value  # a path, `user/repo`, or scp-like `git@host:repo`: nothing secret
    user = parts.username or ""
    if parts.password is None and parts.scheme not in ("http", "https"):
        return value  # ssh://git@host/repo: a user name, not a secret
    shown = f"{user}:***" if parts.password is not None else "***"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{shown}@{host}"))
