"""The edges a review found: odd settings, a TLS passphrase file that is not one, a Ctrl-C
while the command loads, run and configuration directories with odd names, repositories with
odd contents. Each is a clear answer, never a traceback, a wrong branch or a lost task."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pulsar_rest import capistrano, confrepo
from pulsar_rest.settings import SettingsError, load_settings
from tests.conftest import DEMO, git
from tests.serving import ROOT, TIMEOUT, command, environ
from tests.test_capistrano import needs_cap


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args), cwd=ROOT, env=environ(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip


def _one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    for word in words:
        assert word in done.stderr


# -- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--data-dir", "--log-dir", "--ssl-key"])
def test_the_home_of_an_unknown_user_is_one_line(tmp_path: Path, flag: str) -> None:
    done = _run("--port", "0", "--data-dir", str(tmp_path / "d"), flag, "~nosuchuser/x")
    _one_line_error(done, flag, "home directory of an unknown user")


@pytest.mark.parametrize("key", ["data-dir", "log-dir", "host", "ssl-key"])
def test_a_nul_in_a_file_setting_is_one_line(tmp_path: Path, key: str) -> None:
    config = tmp_path / "c.yml"
    config.write_text(f'{key}: "a\\0b"\n')
    _one_line_error(_run("--config", str(config)), key, "NUL")


@pytest.mark.parametrize("value", ["1.10", "0123", "yes"])
def test_a_text_setting_that_yaml_reads_as_something_else_is_refused(tmp_path: Path, value: str) -> None:
    # Unquoted, YAML reads 1.10 as the number 1.1: the branch 1.1 would be deployed.
    config = tmp_path / "c.yml"
    config.write_text(f"config-branch: {value}\n")
    with pytest.raises(SettingsError, match=r"must be text .*quotes"):
        load_settings(["--config", str(config)], {})
    config.write_text(f'config-branch: "{value}"\n')
    assert load_settings(["--config", str(config)], {}).config_branch == value


@pytest.mark.parametrize("value", ["!Hunter2secret", "*Hunter2secret", "'Hunter2secret"])
def test_a_yaml_error_says_where_never_what(tmp_path: Path, value: str) -> None:
    config = tmp_path / "c.yml"
    config.write_text(f"auth-username: me\nauth-password: {value}\n")
    done = _run("--config", str(config))
    _one_line_error(done, "is not valid YAML at line ")
    assert "Hunter2secret" not in done.stdout + done.stderr


def test_a_passphrase_file_that_is_not_one_is_one_line(tmp_path: Path) -> None:
    key = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(ROOT / "bin" / "ssl" / "pulsar.local.key"), "-aes256",
         "-passout", "pass:right", "-out", str(key)],
        check=True, capture_output=True,
    )  # fmt: skip
    wrong = tmp_path / "some-other-file"  # --ssl-passphrase naming the wrong file
    wrong.write_text("x" * 2048)
    cert = ROOT / "bin" / "ssl" / "pulsar.local.crt"
    done = _run("--port", "0", "--ssl-key", str(key), "--ssl-cert", str(cert), "--ssl-passphrase", str(wrong))
    _one_line_error(done, "--ssl-passphrase", "1,024 bytes")


def test_ctrl_c_while_the_command_loads_is_quiet(tmp_path: Path) -> None:
    # -X importtime reports each import as it ends: once one of aiohttp's has, the command is
    # still loading, and the SIGINT lands there.
    argv = [sys.executable, "-X", "importtime", *command("--port", "0", "--data-dir", str(tmp_path))[1:]]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=environ(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.search(r"\|\s+aiohttp\.", line):
            proc.send_signal(signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, "".join(seen[-5:]) + rest
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest


# -- the built-in runner -----------------------------------------------------------------


def _runner(conf: Path, action: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEMO_STEPS": "1", "DEMO_PAUSE": "0"}
    return subprocess.run(
        [sys.executable, "-m", "pulsar_rest.capistrano", "task", "example", "staging", action,
         "--conf-repo", str(conf), *extra],
        env=env, capture_output=True, text=True, timeout=TIMEOUT * 2, check=False,
    )  # fmt: skip


@needs_cap
@pytest.mark.parametrize("name", ["data dir", "data[1]", 'conf"q', "it's"])
def test_odd_directory_names_run_the_same_task(tmp_path: Path, name: str) -> None:
    conf = tmp_path / name / "conf"
    shutil.copytree(DEMO, conf)
    done = _runner(conf, "demo:progress", "--run-dir", str(tmp_path / name / "runs" / "1"))
    assert done.returncode == 0, done.stdout[-500:] + done.stderr[-500:]
    assert "step 1 of 1" in done.stdout
    assert done.stdout.rstrip().endswith("Executed task demo:progress for example on staging!")


@needs_cap
def test_a_recipe_that_is_not_utf8_runs(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(DEMO, conf)
    with (conf / "apps" / "example" / "deploy.rb").open("ab") as deploy:
        deploy.write("# Déploiement\n".encode("latin-1"))  # Ruby takes it; it is no UTF-8
    done = _runner(conf, "demo:progress")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-500:]


@needs_cap
def test_a_sigterm_before_cap_starts_runs_no_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(DEMO, conf)
    marker = tmp_path / "ran"
    (conf / "recipes" / "mark.rake").write_text(f'task :mark do\n  File.write("{marker}", "x")\nend\n')
    assemble = capistrano.assemble

    def assemble_then_stop(conf: Path, app: str, env: str, run_dir: Path) -> Path:
        os.kill(os.getpid(), signal.SIGTERM)  # a kill while the run directory is built
        return assemble(conf, app, env, run_dir)

    monkeypatch.setattr(capistrano, "assemble", assemble_then_stop)
    assert capistrano.run("example", "staging", "mark", conf) == 128 + signal.SIGTERM
    assert not marker.exists(), "the task ran after the runner was told to stop"


def test_an_existing_run_directory_is_a_message_and_a_verdict(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    done = _runner(DEMO, "demo:progress", "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-300:]
    assert "cannot make the run directory" in done.stdout
    assert done.stdout.rstrip().endswith("Failed to execute task demo:progress for example on staging.")


# -- the configuration repository ------------------------------------------------------


async def test_a_link_to_an_absolute_path_is_kept_as_pulsar_keeps_it(conf_git: Path, tmp_path: Path) -> None:
    (conf_git / "recipes" / "shared").symlink_to(tmp_path)
    git(conf_git, "add", "-A")
    git(conf_git, "commit", "-qm", "link")
    tree, _ = await confrepo.ConfigRepo(str(conf_git), "deploy", tmp_path / "kept").current()
    assert os.readlink(tree / "recipes" / "shared") == str(tmp_path)
    assert not [p for p in (tmp_path / "kept" / "trees").iterdir() if p.name.startswith(".")]


async def test_a_broken_copy_of_the_repository_is_made_again(conf_git: Path, tmp_path: Path) -> None:
    clone = tmp_path / "kept" / "repo.git"
    clone.mkdir(parents=True)
    (clone / "HEAD").write_text("ref: refs/heads/deploy\n")  # a `git init` cut short by a crash
    tree, sha = await confrepo.ConfigRepo(str(conf_git), "deploy", tmp_path / "kept").current()
    assert (tree / "apps" / "example" / "production.rb").is_file() and sha is not None and len(sha) == 40


@pytest.mark.parametrize("source", ["/nonexistent/conf", "someorg/pulsar-conf"])
def test_an_unreachable_repository_says_why(tmp_path: Path, source: str) -> None:
    done = _run("--port", "0", "--data-dir", str(tmp_path / "d"), "--config-repo", source)
    _one_line_error(done)
    reason = done.stderr.rsplit("branch master: ", 1)[1]
    assert reason.startswith(("fatal:", "ssh:", "ERROR")) and not reason.rstrip().endswith("'"), reason


def test_hidden_entries_are_neither_apps_nor_environments(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(DEMO, conf)
    (conf / "apps" / ".archived").mkdir()
    (conf / "apps" / ".archived" / "production.rb").touch()
    (conf / "apps" / "example" / ".production.rb").touch()
    assert confrepo.apps(conf) == {"example": ["production", "staging"]}


def test_a_stop_while_the_first_fetch_hangs_does_not_wait_for_it(tmp_path: Path) -> None:
    # A git server that takes the connection and never answers (a firewall, a dead host).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/conf.git"
        log = tmp_path / "logs" / "pulsar-rest.log"
        proc = subprocess.Popen(
            command("--port", "0", "--data-dir", str(tmp_path / "d"), "--log-dir", str(log.parent),
                    "--config-repo", url),
            cwd=ROOT, env=environ(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        silent.settimeout(TIMEOUT)
        connection, _ = silent.accept()  # git is fetching: the start waits for it
        with connection:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=TIMEOUT)  # not git's 60 s
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err
    assert log.read_text().rstrip().endswith("stopped while starting")
