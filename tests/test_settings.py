"""Settings: flags over the --config file over PULSAR_REST_* variables over defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pulsar_rest.settings import Settings, SettingsError, default_data_dir, load_settings


def write(tmp_path: Path, text: str, name: str = "pulsar-rest.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    settings = load_settings([], {})
    # The default data dir comes from the environment given (XDG_STATE_HOME), none here.
    assert settings == Settings(data_dir=Path.home() / ".local" / "state" / "pulsar-rest")
    assert (settings.host, settings.port, settings.ssl_min_version) == ("127.0.0.1", 8001, "1.2")
    assert not settings.tls


@pytest.mark.parametrize(
    ("sources", "port"),
    [
        ({"env"}, 1001),
        ({"env", "file"}, 1002),
        ({"env", "file", "flag"}, 1003),
        ({"file", "flag"}, 1003),
        ({"env", "flag"}, 1003),
        ({"file"}, 1002),
    ],
)
def test_precedence(tmp_path: Path, sources: set[str], port: int) -> None:
    argv: list[str] = ["--config", write(tmp_path, "port: 1002\nhost: 0.0.0.0\nallow-anonymous: true\n")]
    if "flag" in sources:
        argv += ["--port", "1003"]
    env = {"PULSAR_REST_PORT": "1001", "PULSAR_REST_KILL_GRACE": "3"} if "env" in sources else {}
    if "file" not in sources:
        argv = argv[2:]
    settings = load_settings(argv, env)
    assert settings.port == port
    # The other settings come from wherever they are given, each on its own.
    assert settings.host == ("0.0.0.0" if "file" in sources else "127.0.0.1")
    assert settings.kill_grace == (3.0 if "env" in sources else Settings().kill_grace)


def test_each_setting_from_its_variable(tmp_path: Path) -> None:
    env = {
        "PULSAR_REST_HOST": "::1",
        "PULSAR_REST_PORT": "0",
        "PULSAR_REST_CONFIG_REPO": "git@example:conf.git",
        "PULSAR_REST_LOG_DIR": str(tmp_path / "logs"),
        "PULSAR_REST_DATA_DIR": str(tmp_path / "data"),
        "PULSAR_REST_SSL_PFX": str(tmp_path / "a.pfx"),
        "PULSAR_REST_SSL_PASSPHRASE": str(tmp_path / "pass"),
        "PULSAR_REST_SSL_MIN_VERSION": "1.3",
        "PULSAR_REST_PULSAR_BIN": "/opt/pulsar",
        "PULSAR_REST_LONG_POLL_TIMEOUT": "2.5",
        "PULSAR_REST_KILL_GRACE": "0",
        "PULSAR_REST_KEEPALIVE": "0.5",
        "PULSAR_REST_DEBUG": "yes",
        "PULSAR_REST_UNRELATED": "ignored",
    }
    assert load_settings([], env) == Settings(
        host="::1",
        port=0,
        config_repo="git@example:conf.git",
        log_dir=tmp_path / "logs",
        data_dir=tmp_path / "data",
        ssl_pfx=tmp_path / "a.pfx",
        ssl_passphrase=tmp_path / "pass",
        ssl_min_version="1.3",
        pulsar_bin="/opt/pulsar",
        long_poll_timeout=2.5,
        kill_grace=0.0,
        keepalive=0.5,
        debug=True,
    )


def test_data_dir_defaults_to_xdg_state_home(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    assert load_settings([], env).data_dir == tmp_path / "state" / "pulsar-rest"
    assert default_data_dir(env) == tmp_path / "state" / "pulsar-rest"
    env["PULSAR_REST_DATA_DIR"] = str(tmp_path / "env")
    assert load_settings([], env).data_dir == tmp_path / "env"
    assert load_settings(["--data-dir", str(tmp_path / "flag")], env).data_dir == tmp_path / "flag"


def test_switch_false_in_the_file_wins_over_the_variable(tmp_path: Path) -> None:
    env = {"PULSAR_REST_DEBUG": "true"}
    assert load_settings([], env).debug is True
    assert load_settings(["--config", write(tmp_path, "debug: false\n")], env).debug is False
    assert load_settings(["--config", write(tmp_path, "debug: false\n"), "--debug"], env).debug is True


@pytest.mark.parametrize("key", ["config-repo", "config_repo"])
def test_file_keys_with_dashes_or_underscores(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, f"{key}: https://git.example/conf.git\nlong_poll_timeout: 7\nkill-grace: 2\n")
    settings = load_settings(["--config", path], {})
    assert settings.config_repo == "https://git.example/conf.git"
    assert (settings.long_poll_timeout, settings.kill_grace) == (7.0, 2.0)


def test_empty_file_and_null_values_change_nothing(tmp_path: Path) -> None:
    assert load_settings(["--config", write(tmp_path, "")], {}) == load_settings([], {})
    env = {"PULSAR_REST_PORT": "1001"}
    assert load_settings(["--config", write(tmp_path, "port:\n")], env).port == 1001


def test_config_file_named_by_variable(tmp_path: Path) -> None:
    env = {"PULSAR_REST_CONFIG": write(tmp_path, "port: 1002\n"), "PULSAR_REST_PORT": "1001"}
    assert load_settings([], env).port == 1002
    # --config wins over PULSAR_REST_CONFIG.
    other = write(tmp_path, "port: 1004\n", name="other.yaml")
    assert load_settings(["--config", other], env).port == 1004


def test_paths_expand_the_home_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = load_settings(["--ssl-key", "~/k.pem", "--ssl-cert", "~/c.pem"], {})
    assert (settings.ssl_key, settings.ssl_cert) == (tmp_path / "k.pem", tmp_path / "c.pem")
    assert settings.tls


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PULSAR_REST_PORT", "http", "PULSAR_REST_PORT: 'http' must be a whole number"),
        ("PULSAR_REST_PORT", "70000", "PULSAR_REST_PORT: '70000' must be between 0 and 65535"),
        ("PULSAR_REST_LONG_POLL_TIMEOUT", "0", "PULSAR_REST_LONG_POLL_TIMEOUT: '0' must be between"),
        ("PULSAR_REST_KILL_GRACE", "nan", "PULSAR_REST_KILL_GRACE: 'nan' must be between"),
        ("PULSAR_REST_DEBUG", "maybe", "PULSAR_REST_DEBUG: 'maybe' must be true or false"),
        ("PULSAR_REST_SSL_MIN_VERSION", "1.1", "PULSAR_REST_SSL_MIN_VERSION: '1.1' must be one of 1.2, 1.3"),
        ("PULSAR_REST_HOST", " ", "PULSAR_REST_HOST: ' ' must not be empty"),
    ],
)
def test_invalid_variable_is_named(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings([], {name: value})
    assert str(caught.value).startswith(message)


def test_invalid_file_value_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port: true\n")
    with pytest.raises(SettingsError, match=f"^port in {path}: True must be a whole number$"):
        load_settings(["--config", path], {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port: [1\n", "is not valid YAML"),
        ("- port\n", "must hold a mapping of settings"),
        ("prot: 1\n", "unknown setting 'prot'"),
        ("config: other.yaml\n", "unknown setting 'config'"),
    ],
)
def test_unusable_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError, match=f"^--config {path}.*{message}"):
        load_settings(["--config", path], {})


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=f"^cannot read --config {tmp_path / 'none.yaml'}: "):
        load_settings([], {"PULSAR_REST_CONFIG": str(tmp_path / "none.yaml")})


SECRET = "s3cret-Pa55"


@pytest.mark.parametrize(
    "how",
    ["flag", "variable", "file", "file-key", "empty", "yaml-error", "with-username", "with-bad-port"],
)
def test_password_never_in_an_error(tmp_path: Path, how: str) -> None:
    argv: list[str] = []
    env: dict[str, str] = {}
    if how == "flag":
        argv = ["--auth-password", SECRET]
    elif how == "variable":
        env = {"PULSAR_REST_AUTH_PASSWORD": SECRET}
    elif how == "file":
        argv = ["--config", write(tmp_path, f"auth-password: {SECRET}\n")]
    elif how == "file-key":
        argv = ["--config", write(tmp_path, f"auth_password: [{SECRET}]\n")]
    elif how == "empty":
        argv = ["--auth-password", " "]
    elif how == "yaml-error":
        argv = ["--config", write(tmp_path, f'auth-password: "{SECRET}\n')]
    elif how == "with-username":
        argv = ["--auth-username", "deployer", "--auth-password", SECRET, "--auth-method", "nope"]
    else:
        argv = ["--auth-password", SECRET, "--port", "abc"]
    with pytest.raises(SettingsError) as caught:
        load_settings(argv, env)
    message = str(caught.value)
    assert "\n" not in message
    assert SECRET not in message
    if how == "empty":
        assert message == "--auth-password: *** must not be empty"


def test_password_not_in_the_settings_repr() -> None:
    settings = Settings(auth_password=SECRET)
    assert SECRET not in repr(settings)
    assert SECRET not in str(dataclasses.replace(settings, port=1))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ssl-key", "k.pem"], "--ssl-key and --ssl-cert go together"),
        (["--ssl-cert", "c.pem"], "--ssl-key and --ssl-cert go together"),
        (["--ssl-passphrase", "p"], "--ssl-passphrase needs --ssl-key/--ssl-cert or --ssl-pfx"),
        (["--auth-provider", "gitlab"], "--auth-provider: 'gitlab' must be one of github, token"),
        (["--auth-method", "token"], "--auth-method: 'token' must be one of user, org, team"),
        (["--port"], "argument --port: expected one argument (see --help)"),
        (["--prot", "1"], "unrecognized arguments: --prot (see --help)"),
        (["--ssl"], "unrecognized arguments: --ssl (see --help)"),  # no abbreviations
    ],
)
def test_invalid_combinations_and_flags(argv: list[str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(argv, {})
    assert str(caught.value).startswith(message)


def test_pfx_with_key_and_cert_is_accepted() -> None:
    settings = load_settings(["--ssl-pfx", "a.pfx", "--ssl-key", "k.pem"], {})
    assert settings.ssl_pfx == Path("a.pfx") and settings.tls


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().port = 1  # type: ignore[misc]


@pytest.mark.parametrize("secret", ["s3cret", "-s3cret", "--s3cr3t"])
def test_mistyped_flag_does_not_echo_its_value(secret: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(["--auth-pasword", secret, "--prot=99"], environ={})
    assert "s3cr" not in str(caught.value) and "99" not in str(caught.value)
    assert "--auth-pasword" in str(caught.value) and "--prot" in str(caught.value)


def test_grants_follow_the_method_unless_prefixed(tmp_path: Path) -> None:
    settings = load_settings(
        [
            "--auth-write",
            "deployers-org, user:alice",
            "--auth-read",
            "acme, team:acme/ops",
            "--auth-method",
            "org",
        ],
        {},
    )
    assert [str(g) for g in settings.auth_write] == ["org:deployers-org", "user:alice"]
    assert [str(g) for g in settings.auth_read] == ["org:acme", "team:acme/ops"]
    assert settings.auth
    teams = load_settings([], {"PULSAR_REST_AUTH_WRITE": "acme/deployers", "PULSAR_REST_AUTH_METHOD": "team"})
    assert [str(g) for g in teams.auth_write] == ["team:acme/deployers"]
    from_file = load_settings(["--config", write(tmp_path, 'auth-read: "bob"\n')], {})
    assert [str(g) for g in from_file.auth_read] == ["user:bob"]


def test_our_tokens_alone_turn_authentication_on() -> None:
    settings = load_settings(["--auth-provider", "token", "--host", "0.0.0.0"], {})
    assert settings.auth and not settings.auth_write


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_open_on_loopback_without_authentication(host: str) -> None:
    assert not load_settings(["--host", host], {}).auth


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "deploy.example.com"])
def test_open_elsewhere_only_when_asked(host: str) -> None:
    with pytest.raises(SettingsError, match=f"--host {host}: without authentication .* --allow-anonymous"):
        load_settings(["--host", host], {})
    assert load_settings(["--host", host, "--allow-anonymous"], {}).allow_anonymous
    assert load_settings(["--host", host, "--auth-write", "alice"], {}).auth


def test_secrets_from_files_are_read_and_never_shown(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text(f"{SECRET}\n")
    client_secret = tmp_path / "client-secret"
    client_secret.write_text(f"  {SECRET}-oauth \n")
    settings = load_settings(
        [
            "--auth-write", "alice", "--auth-username", "bot", "--auth-password-file", str(password),
            "--oauth-client-id", "Iv1.abc", "--oauth-client-secret-file", str(client_secret),
        ],
        {},
    )  # fmt: skip
    assert settings.auth_password == SECRET and settings.oauth_client_secret == f"{SECRET}-oauth"
    assert SECRET not in repr(settings)
    with pytest.raises(SettingsError, match="give one"):
        load_settings(["--auth-password", "x", "--auth-password-file", str(password)], {})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SettingsError, match=f"--auth-password-file {empty} is empty"):
        load_settings(["--auth-username", "bot", "--auth-password-file", str(empty)], {})


@pytest.mark.parametrize("value", ["github.example.com", "ftp://x", "https://", "https://a b"])
def test_github_urls_must_be_http_addresses(value: str) -> None:
    with pytest.raises(SettingsError, match="must be an http:// or https:// address"):
        load_settings(["--github-api-url", value], {})


def test_github_enterprise_urls_lose_their_trailing_slash() -> None:
    settings = load_settings(["--github-api-url", "https://ghe.example.com/api/v3/"], {})
    assert settings.github_api_url == "https://ghe.example.com/api/v3"
