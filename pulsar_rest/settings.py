"""Settings: one frozen object built at the edge from the command line, a YAML file and
`PULSAR_REST_*` environment variables (in that order of precedence), then passed down."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from pulsar_rest import __version__

ENV_PREFIX = "PULSAR_REST_"


def default_data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where task history and output live unless --data-dir says otherwise (XDG state)."""
    state = environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "pulsar-rest"


class SettingsError(ValueError):
    """A setting is missing, malformed or not supported: the message is one line for the user."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8001
    config_repo: str | None = None
    config_branch: str = "master"
    config_fetch_interval: float = 5.0
    log_dir: Path | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    ssl_key: Path | None = None
    ssl_cert: Path | None = None
    ssl_pfx: Path | None = None
    ssl_passphrase: Path | None = None
    ssl_min_version: str = "1.2"
    auth_username: str | None = None
    # Never shown: repr=False keeps it out of logs and tracebacks.
    auth_password: str | None = field(default=None, repr=False)
    auth_provider: str = "github"
    auth_method: str = "user"
    pulsar_bin: str = "pulsar"
    long_poll_timeout: float = 30.0
    kill_grace: float = 10.0
    keepalive: float = 15.0
    shutdown_grace: float = 30.0
    retain_tasks: int | None = None
    retain_days: float | None = None
    max_running: int | None = None
    access_log: bool = False
    debug: bool = False

    @property
    def tls(self) -> bool:
        return bool(self.ssl_pfx or self.ssl_key or self.ssl_cert)


def _text(value: object) -> str:
    # Only text: YAML reads `branch: 1.10` as the number 1.1, which names another branch.
    if not isinstance(value, str):
        raise ValueError("must be text (in the --config file, put it in quotes)")
    text = value.strip()
    if not text:
        raise ValueError("must not be empty")
    if "\0" in text:
        raise ValueError("must not hold a NUL character")
    return text


def _path(value: object) -> Path:
    try:
        return Path(_text(value)).expanduser()
    except RuntimeError:  # ~user of a user this machine does not know
        raise ValueError("names the home directory of an unknown user") from None


def _port(value: object) -> int:
    port = _int(value)
    if not 0 <= port <= 65535:
        raise ValueError("must be between 0 and 65535")
    return port


def _int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("must be a whole number")
    try:
        return int(str(value))
    except ValueError:
        raise ValueError("must be a whole number") from None


def _count(value: object) -> int:
    count = _int(value)
    if count < 0:
        raise ValueError("must be 0 or more")
    return count


def _positive(value: object) -> int:
    count = _int(value)
    if count < 1:
        raise ValueError("must be 1 or more")
    return count


def _seconds(low: float, high: float, unit: str = "seconds") -> Callable[[object], float]:
    def parse(value: object) -> float:
        try:
            number = float(str(value))
        except ValueError:
            raise ValueError(f"must be a number of {unit}") from None
        if not low <= number <= high:
            raise ValueError(f"must be between {low:g} and {high:g} {unit}")
        return number

    return parse


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _choice(*allowed: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip()
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return parse


@dataclass(frozen=True)
class _Option:
    flag: str  # without the leading dashes
    parse: Callable[[object], Any]
    help: str
    metavar: str | None = None  # None: a switch without a value

    @property
    def attr(self) -> str:
        return self.flag.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.attr.upper()


_OPTIONS: tuple[_Option, ...] = (
    _Option("host", _text, "address to listen on", "ADDR"),
    _Option("port", _port, "port to listen on (0: any free port)", "PORT"),
    _Option("config-repo", _text, "pulsar configuration repository, passed as --conf-repo", "REPO"),
    _Option("config-branch", _text, "branch of the configuration repository", "BRANCH"),
    _Option(
        "config-fetch-interval",
        _seconds(0, 3600),
        "fetch the repository at most this often (seconds)",
        "SECONDS",
    ),
    _Option("log-dir", _path, "directory for pulsar-rest.log, created if missing (default: stdout)", "DIR"),
    _Option("data-dir", _path, "directory for task history and output, created if missing", "DIR"),
    _Option("ssl-key", _path, "TLS private key (PEM); use with --ssl-cert", "FILE"),
    _Option("ssl-cert", _path, "TLS certificate (PEM), a CA chain may follow it in the file", "FILE"),
    _Option("ssl-pfx", _path, "TLS key and certificate as PKCS#12; overrides --ssl-key/--ssl-cert", "FILE"),
    _Option("ssl-passphrase", _path, "file holding the passphrase of the key or PKCS#12 file", "FILE"),
    _Option("ssl-min-version", _choice("1.2", "1.3"), "lowest TLS version accepted", "1.2|1.3"),
    _Option("auth-username", _text, "user name for the authentication provider (not available yet)", "USER"),
    _Option(
        "auth-password", _text, "password for the authentication provider (not available yet)", "PASSWORD"
    ),
    _Option("auth-provider", _text, "authentication provider", "NAME"),
    _Option("auth-method", _text, "authentication method", "METHOD"),
    _Option("pulsar-bin", _text, "the pulsar executable", "PATH"),
    _Option("long-poll-timeout", _seconds(0.001, 3600), "longest wait of a long-poll", "SECONDS"),
    _Option("kill-grace", _seconds(0, 3600), "seconds between SIGTERM and SIGKILL on a kill", "SECONDS"),
    _Option("keepalive", _seconds(0.01, 3600), "seconds between keep-alive messages on streams", "SECONDS"),
    _Option("shutdown-grace", _seconds(0, 86400), "on SIGTERM, seconds running tasks get to end", "SECONDS"),
    _Option("retain-tasks", _count, "ended tasks kept in the history, newest first (default: all)", "N"),
    _Option(
        "retain-days",
        _seconds(0, 36500, "days"),
        "days an ended task is kept in the history (default: for ever)",
        "DAYS",
    ),
    _Option(
        "max-running",
        _positive,
        "tasks running at once, beyond which creations get 503 (default: no limit)",
        "N",
    ),
    _Option("access-log", _bool, "log every HTTP request (a proxy in front usually does)"),
    _Option("debug", _bool, "debug logging, and tracebacks in 500 answers"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: start-up errors are one line everywhere.
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            # Only the flags' names: a mistyped --auth-pasword must not print the password
            # after it, whatever it looks like, so what follows a flag without "=" is skipped.
            flags: list[str] = []
            value_next = False
            for arg in message[len(prefix) :].split():
                if value_next:
                    value_next = False
                    continue
                name = arg.split("=")[0]
                if re.fullmatch(r"--[a-z][a-z-]*", name):
                    flags.append(name)
                value_next = arg.startswith("-") and "=" not in arg
            message = prefix + (" ".join(flags) or "(values without a flag)")
        raise SettingsError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = _Parser(
        prog="pulsar-rest",
        description="Run pulsar deployment tasks over HTTP.",
        epilog=(
            "Precedence: command-line flags, then the --config file, then environment "
            "variables, then defaults. The file's keys are the flags' names "
            "(config-repo or config_repo)."
        ),
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"pulsar-rest {__version__}")
    parser.add_argument(
        "--config", metavar="FILE", help=f"YAML file with these settings (env {ENV_PREFIX}CONFIG)"
    )
    for opt in _OPTIONS:
        default = getattr(defaults, opt.attr)
        shown = "" if default is None or opt.metavar is None else f"; default {default}"
        help_text = f"{opt.help} (env {opt.env}{shown})"
        if opt.metavar is None:
            parser.add_argument(f"--{opt.flag}", action="store_const", const=True, help=help_text)
        else:
            parser.add_argument(f"--{opt.flag}", metavar=opt.metavar, help=help_text)
    return parser


def _read_file(path: Path) -> dict[str, object]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"--config {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        # Where, never what: YAML's messages quote the text they choke on, a password maybe.
        mark = getattr(exc, "problem_mark", None)
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        raise SettingsError(f"--config {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path} must hold a mapping of settings")
    known = {opt.flag for opt in _OPTIONS}
    values: dict[str, object] = {}
    for key, value in data.items():
        flag = str(key).replace("_", "-")
        if flag not in known:
            raise SettingsError(f"--config {path}: unknown setting {key!r}")
        if value is not None:
            values[flag] = value
    return values


def load_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from `argv` (without the program name) and `environ`."""
    environ = os.environ if environ is None else environ
    args = vars(_parser().parse_args(list(argv)))
    config_file = args.get("config") or environ.get(f"{ENV_PREFIX}CONFIG")
    from_file = _read_file(Path(config_file)) if config_file else {}

    values: dict[str, Any] = {}
    for opt in _OPTIONS:
        if opt.attr in args:
            raw, source = args[opt.attr], f"--{opt.flag}"
        elif opt.flag in from_file:
            raw, source = from_file[opt.flag], f"{opt.flag} in {config_file}"
        elif opt.env in environ:
            raw, source = environ[opt.env], opt.env
        else:
            continue
        try:
            values[opt.attr] = opt.parse(raw)
        except ValueError as exc:
            shown = "***" if opt.attr == "auth_password" else repr(raw)
            raise SettingsError(f"{source}: {shown} {exc}") from None
    values.setdefault("data_dir", default_data_dir(environ))
    settings = Settings(**values)
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    if s.auth_username or s.auth_password:
        raise SettingsError(
            "--auth-username/--auth-password: authentication is not available in this "
            "version yet; start without them (and keep the service on a trusted network)"
        )
    if s.auth_provider != "github":
        raise SettingsError(f"--auth-provider {s.auth_provider}: the only provider is github")
    if s.auth_method != "user":
        raise SettingsError(f"--auth-method {s.auth_method}: the only method is user")
    if not s.ssl_pfx and bool(s.ssl_key) != bool(s.ssl_cert):
        raise SettingsError("--ssl-key and --ssl-cert go together (or use --ssl-pfx)")
    if s.ssl_passphrase and not s.tls:
        raise SettingsError("--ssl-passphrase needs --ssl-key/--ssl-cert or --ssl-pfx")
