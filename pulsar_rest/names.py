"""Validation of the names that reach pulsar's command line."""

from __future__ import annotations

import re

# App and environment names become file names in the configuration repository
# (apps/APP/ENV.rb): no path separators, no leading dot or dash.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# Capistrano task names: namespaces with ':', then optional rake-style arguments
# `task[a,b]`. pulsar v1 runs cap through a shell, so nothing a shell would interpret
# (spaces, quotes, $, ;, ~, ...) may pass, and a leading dash would be read as an option.
_ACTION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}(\[[A-Za-z0-9_.,:/@=+-]{0,500}\])?")


class InvalidName(ValueError):
    pass


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:80] + "...")


def check_name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value) or ".." in value:
        raise InvalidName(
            f"invalid {kind} name {_shown(value)}: use letters, digits, '-', '_' and '.', "
            "starting with a letter or digit (at most 100 characters)"
        )
    return value


def check_action(value: str) -> str:
    if not _ACTION.fullmatch(value):
        raise InvalidName(
            f"invalid task name {_shown(value)}: use letters, digits, '-', '_', '.', ':' "
            "and rake-style arguments like task[a,b]"
        )
    return value
