"""Settings: one frozen object built at the edge from the command line, a YAML file and
`PULSAR_REST_*` environment variables (in that order of precedence), then passed down."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from pulsar_rest import __version__
from pulsar_rest.auth.grants import Grant, GrantError, parse_grants

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
    # PostgreSQL instead of SQLite in data_dir; its address may hold a password.
    database: str | None = field(default=None, repr=False)
    ssl_key: Path | None = None
    ssl_cert: Path | None = None
    ssl_pfx: Path | None = None
    ssl_passphrase: Path | None = None
    ssl_min_version: str = "1.2"
    allow_anonymous: bool = False
    auth_read: tuple[Grant, ...] = ()
    auth_write: tuple[Grant, ...] = ()
    auth_provider: str = "github"
    auth_method: str = "user"
    auth_username: str | None = None
    # Secrets are never shown: repr=False keeps them out of logs and tracebacks.
    auth_password: str | None = field(default=None, repr=False)
    auth_password_file: Path | None = None
    auth_cache_ttl: float = 300.0
    github_url: str = "https://github.com"
    github_api_url: str = "https://api.github.com"
    oauth_client_id: str | None = None
    oauth_client_secret_file: Path | None = None
    oauth_client_secret: str | None = field(default=None, repr=False)
    session_key_file: Path | None = None
    session_max_age: float = 12 * 3600.0
    public_url: str | None = None
    pulsar_bin: str = "pulsar"
    long_poll_timeout: float = 30.0
    kill_grace: float = 10.0
    keepalive: float = 15.0
    shutdown_grace: float = 30.0
    retain_tasks: int | None = None
    retain_days: float | None = None
    max_running: int | None = None
    access_log: bool = False
    log_format: str = "text"
    debug: bool = False

    @property
    def tls(self) -> bool:
        return bool(self.ssl_pfx or self.ssl_key or self.ssl_cert)

    @property
    def auth(self) -> bool:
        """Authentication is on: any grant, or pulsar-rest's own tokens alone."""
        return bool(self.auth_read or self.auth_write) or self.auth_provider == "token"

    @property
    def browser_sign_in(self) -> bool:
        return self.oauth_client_id is not None


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


def _url(value: object) -> str:
    text = _text(value)
    if not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", text):
        raise ValueError("must be an http:// or https:// address")
    return text.rstrip("/")


def _database(value: object) -> str:
    text = _text(value)
    if not re.fullmatch(r"postgres(ql)?://\S*", text):
        raise ValueError("must be a postgresql:// address")
    return text


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
    _Option(
        "database",
        _database,
        "keep the history in PostgreSQL (postgresql://USER@HOST/DB), not SQLite in --data-dir",
        "URL",
    ),
    _Option("ssl-key", _path, "TLS private key (PEM); use with --ssl-cert", "FILE"),
    _Option("ssl-cert", _path, "TLS certificate (PEM), a CA chain may follow it in the file", "FILE"),
    _Option("ssl-pfx", _path, "TLS key and certificate as PKCS#12; overrides --ssl-key/--ssl-cert", "FILE"),
    _Option("ssl-passphrase", _path, "file holding the passphrase of the key or PKCS#12 file", "FILE"),
    _Option("ssl-min-version", _choice("1.2", "1.3"), "lowest TLS version accepted", "1.2|1.3"),
    _Option("auth-read", _text, "who may see tasks: comma-separated LOGIN, ORG or ORG/TEAM", "LIST"),
    _Option("auth-write", _text, "who may also create and kill them (write implies read)", "LIST"),
    _Option(
        "auth-method",
        _choice("user", "org", "team"),
        "how a grant without a user:, org: or team: prefix is read",
        "user|org|team",
    ),
    _Option(
        "auth-provider",
        _choice("github", "token"),
        "github: GitHub vouches for users; token: only tokens of `pulsar-rest token create`",
        "github|token",
    ),
    _Option("auth-username", _text, "GitHub account that asks membership questions users cannot", "USER"),
    _Option("auth-password", _text, "its personal access token (rather --auth-password-file)", "TOKEN"),
    _Option("auth-password-file", _path, "file holding that personal access token", "FILE"),
    # At least a second: a stream asks again at most this often, and GitHub has a rate limit.
    _Option("auth-cache-ttl", _seconds(1, 86400), "seconds an answer of GitHub is reused", "SECONDS"),
    _Option("allow-anonymous", _bool, "without authentication, listen on other addresses than loopback"),
    _Option("github-url", _url, "GitHub's web address (its OAuth pages)", "URL"),
    _Option("github-api-url", _url, "GitHub's API (GitHub Enterprise: https://HOST/api/v3)", "URL"),
    _Option("oauth-client-id", _text, "client id of a GitHub OAuth app: browser sign-in", "ID"),
    _Option("oauth-client-secret-file", _path, "file holding that OAuth app's client secret", "FILE"),
    _Option(
        "session-key-file",
        _path,
        "browser session keys, one per line, the first for new sessions (default: made once in --data-dir)",
        "FILE",
    ),
    _Option("session-max-age", _seconds(60, 30 * 86400), "longest life of a browser session", "SECONDS"),
    _Option("public-url", _url, "where users reach this service (behind a proxy: its https address)", "URL"),
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
    _Option(
        "log-format", _choice("text", "json"), "json: one object a line, for log collectors", "text|json"
    ),
    _Option("debug", _bool, "debug logging, and tracebacks in 500 answers"),
)


def without_values(message: str) -> str:
    """argparse's message, with only the flags' names of what it did not recognise: a
    mistyped --auth-pasword (or --token) must not print the secret after it, whatever it
    looks like, so what follows a flag without "=" is skipped."""
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return message
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
    return prefix + (" ".join(flags) or "(values without a flag)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: start-up errors are one line everywhere.
        raise SettingsError(f"{without_values(message)} (see --help)")


def _parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = _Parser(
        prog="pulsar-rest",
        description="Run pulsar deployment tasks over HTTP.",
        epilog=(
            "Precedence: command-line flags, then the --config file, then environment "
            "variables, then defaults. The file's keys are the flags' names "
            "(config-repo or config_repo). API tokens for bots and CI: pulsar-rest token --help. "
            "A SQLite history into PostgreSQL: pulsar-rest migrate --help."
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
            shown = "***" if opt.attr in ("auth_password", "database") else repr(raw)
            raise SettingsError(f"{source}: {shown} {exc}") from None
    values.setdefault("data_dir", default_data_dir(environ))
    for key in ("auth_read", "auth_write"):
        if key in values:
            try:
                values[key] = parse_grants(values[key], values.get("auth_method", "user"))
            except GrantError as exc:
                raise SettingsError(f"--{key.replace('_', '-')}: {exc}") from None
    if "auth_password_file" in values:
        if "auth_password" in values:
            raise SettingsError("--auth-password and --auth-password-file: give one")
        values["auth_password"] = _secret_file(values["auth_password_file"], "--auth-password-file")
    if "oauth_client_secret_file" in values:
        values["oauth_client_secret"] = _secret_file(
            values["oauth_client_secret_file"], "--oauth-client-secret-file"
        )
    settings = Settings(**values)
    _check(settings)
    return settings


def _secret_file(path: Path, flag: str) -> str:
    """The secret in `path`: its first line. Never quoted in an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{flag} {path} is not UTF-8 text") from None
    secret = text.strip().split("\n")[0].strip() if text.strip() else ""
    if not secret:
        raise SettingsError(f"{flag} {path} is empty")
    return secret


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _check(s: Settings) -> None:
    if s.auth_provider == "token" and (s.auth_read or s.auth_write):
        raise SettingsError(
            "--auth-read/--auth-write name GitHub identities: --auth-provider token takes none "
            "(each token carries its role)"
        )
    if bool(s.auth_username) != bool(s.auth_password):
        raise SettingsError("--auth-username and --auth-password (or --auth-password-file) go together")
    if bool(s.oauth_client_id) != bool(s.oauth_client_secret):
        raise SettingsError("--oauth-client-id and --oauth-client-secret-file go together")
    if s.oauth_client_id and (s.auth_provider != "github" or not s.auth):
        raise SettingsError("--oauth-client-id: browser sign-in needs --auth-read or --auth-write grants")
    if not s.auth and not s.allow_anonymous and not is_loopback(s.host):
        raise SettingsError(
            f"--host {s.host}: without authentication pulsar-rest listens on loopback only; give "
            "--auth-write/--auth-read grants (or --auth-provider token), or --allow-anonymous to let "
            "anyone who reaches the port deploy"
        )
    if not s.ssl_pfx and bool(s.ssl_key) != bool(s.ssl_cert):
        raise SettingsError("--ssl-key and --ssl-cert go together (or use --ssl-pfx)")
    if s.ssl_passphrase and not s.tls:
        raise SettingsError("--ssl-passphrase needs --ssl-key/--ssl-cert or --ssl-pfx")
