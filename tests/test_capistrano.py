"""Real deploys: pulsar's assembly of a Capistrano run, the configuration repository's apps,
task variables, and real `cap` runs through the HTTP API (Debian's capistrano package)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from pulsar_rest import capistrano, confrepo
from tests.conftest import DEMO, Client, ClientFactory, alive, eventually, finished, follow

CAP = shutil.which("cap")
IN_CI = os.environ.get("CI") == "true"
needs_cap = pytest.mark.skipif(
    CAP is None and not IN_CI,
    reason="Capistrano is not installed: apt-get install capistrano (CI installs it)",
)


def test_ci_has_capistrano() -> None:
    """In CI the integration tests below must run, never be skipped."""
    if IN_CI:
        assert CAP is not None, "CI=true but no cap: .ci/run installs Debian's capistrano"


def _conf(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    (conf / "apps" / "shop").mkdir(parents=True)
    (conf / "recipes" / "more").mkdir(parents=True)
    (conf / "apps" / "Capfile").write_text("# shared capfile")  # no newline at the end
    (conf / "apps" / "deploy.rb").write_text("set :shared, 1\n")
    (conf / "apps" / "shop" / "Capfile").write_text("# shop capfile\n")
    (conf / "apps" / "shop" / "deploy.rb").write_text("set :app, 'shop'\n")
    (conf / "apps" / "shop" / "production.rb").write_text("server 'a'\n")
    (conf / "apps" / "shop" / "staging.rb").write_text("server 'b'\n")
    (conf / "apps" / "blog").mkdir()
    (conf / "apps" / "blog" / "production.rb").write_text("server 'c'\n")
    (conf / "apps" / "blog" / "notes.txt").write_text("not an environment\n")
    return conf


def test_assembly_follows_pulsar(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    cap = capistrano.assemble(conf, "shop", "production", tmp_path / "run")
    assert (cap / "Capfile").read_text() == (
        "# shared capfile\n# shop capfile\n"
        f"Dir.glob('**/*.rake', base: '{conf.resolve()}/recipes').each "
        f"{{ |r| import File.join('{conf.resolve()}/recipes', r) }}\n"
    )
    assert (cap / "config" / "deploy.rb").read_text() == "set :shared, 1\nset :app, 'shop'\n"
    assert (cap / "config" / "deploy" / "production.rb").read_text() == "server 'a'\n"
    assert sorted(p.name for p in (cap / "config" / "deploy").iterdir()) == ["production.rb"]
    # An app without its own Capfile and deploy.rb gets the shared ones only.
    blog = capistrano.assemble(conf, "blog", "production", tmp_path / "run2")
    assert (blog / "config" / "deploy.rb").read_text() == "set :shared, 1\n"
    with pytest.raises(FileNotFoundError):
        capistrano.assemble(conf, "shop", "qa", tmp_path / "run3")


def test_apps_as_pulsar_list_defines_them(tmp_path: Path) -> None:
    assert confrepo.apps(_conf(tmp_path)) == {"blog": ["production"], "shop": ["production", "staging"]}
    assert confrepo.apps(DEMO) == {"example": ["production", "staging"]}
    assert confrepo.apps(tmp_path / "nothing") == {}


def test_verdict_lines_are_pulsars() -> None:
    assert capistrano.verdict("deploy", "a", "e", True) == "Deployed a on e!"
    assert capistrano.verdict("deploy", "a", "e", False) == "Failed to deploy a on e."
    assert (
        capistrano.verdict("db:migrate", "a", "e", False) == "Failed to execute task db:migrate for a on e."
    )


async def test_get_apps_and_404_for_what_the_repository_lacks(make_client: ClientFactory) -> None:
    client = await make_client(config_repo=str(DEMO))
    resp = await client.get("/apps")
    assert resp.status == 200
    assert await resp.json() == {"example": ["production", "staging"]}
    for path, words in (("/nope/production", "no app 'nope'"), ("/example/qa", "no environment 'qa'")):
        resp = await client.post(path, json={"action": "deploy"})
        assert resp.status == 404
        assert words in (await resp.json())["error"]["message"]
    assert (await (await client.get("/tasks")).json())["total"] == 0  # nothing was started


async def test_apps_without_a_local_repository_is_a_503(client: Client) -> None:
    resp = await client.get("/apps")
    assert resp.status == 503
    assert "configuration repository" in (await resp.json())["error"]["message"]


async def test_task_variables_reach_the_task_and_only_their_names_show(client: Client) -> None:
    resp = await client.post(
        "/shop/prod",
        json={"action": "env[RELEASE,TOKEN,UNSET]", "taskVariables": {"RELEASE": "v1.2", "TOKEN": "s3cret"}},
    )
    assert resp.status == 200
    task = await finished(client, (await resp.json())["taskId"])
    assert json.loads(task["output"]) == {"RELEASE": "v1.2", "TOKEN": "s3cret", "UNSET": None}
    assert task["taskVariables"] == ["RELEASE", "TOKEN"]
    assert "s3cret" not in json.dumps({k: v for k, v in task.items() if k != "output"})


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        (["A"], "must be an object"),
        ({"1A": "x"}, "not a variable name"),
        ({"A-B": "x"}, "not a variable name"),
        ({"PATH": "/tmp"}, "cannot be set"),
        ({"LD_PRELOAD": "x"}, "cannot be set"),
        ({"PULSAR_REST_RUN": "x"}, "cannot be set"),
        ({"A": 1}, "must be a string"),
        ({"A": "x\u0000y"}, "must be a string"),
    ],
)
async def test_bad_task_variables_are_a_400(client: Client, variables: Any, words: str) -> None:
    resp = await client.post("/shop/prod", json={"action": "ok", "taskVariables": variables})
    assert resp.status == 400
    assert words in (await resp.json())["error"]["message"]


# -- real Capistrano --------------------------------------------------------------------------


@pytest.fixture
async def cap_client(make_client: ClientFactory, tmp_path: Path) -> Client:
    """pulsar-rest without pulsar: its own runner, real cap, the demo repository."""
    return await make_client(pulsar_bin=str(tmp_path / "no-pulsar-here"), config_repo=str(DEMO), kill_grace=2)


async def _run(client: Client, action: str, stdout: bool = False, **variables: str) -> dict[str, Any]:
    body = {"action": action, "taskVariables": variables, "stdout": stdout}
    resp = await client.post("/example/production", json=body)
    assert resp.status == 200, await resp.text()
    task: dict[str, Any] = (await resp.json())["task"]
    return task


@needs_cap
async def test_cap_task_succeeds_with_output_line_by_line(cap_client: Client) -> None:
    task = await _run(cap_client, "demo:progress", DEMO_STEPS="3", DEMO_PAUSE="0.3")
    assert task["command"][1:4] == ["-m", "pulsar_rest.capistrano", "task"]
    live = await follow(cap_client, task["id"], lambda t: "step 1 of 3" in t["output"])
    assert live["status"] == "running"  # output arrives while cap runs, not at its end
    done = await finished(cap_client, task["id"])
    assert done["status"] == "finished" and done["exitCode"] == 0
    assert "step 3 of 3 on production" in done["output"]
    assert done["output"].rstrip().endswith("Executed task demo:progress for example on production!")


@needs_cap
async def test_the_demo_s_big_log(cap_client: Client) -> None:
    done = await finished(cap_client, (await _run(cap_client, "demo:chatter", DEMO_LINES="3000"))["id"])
    assert done["status"] == "finished"
    assert "line 1 of 3000: all is well\n" in done["output"]
    assert "line 3000 of 3000: all is well\n" in done["output"]


@needs_cap
async def test_cap_task_failure_is_failed(cap_client: Client) -> None:
    done = await finished(cap_client, (await _run(cap_client, "demo:fail"))["id"])
    assert done["status"] == "failed" and done["exitCode"] != 0
    assert "Failed to execute task demo:fail for example on production." in done["output"]


@needs_cap
async def test_cap_kill_leaves_no_process_and_no_run_directory(
    cap_client: Client, make_client: ClientFactory, tmp_path: Path
) -> None:
    task = await _run(cap_client, "demo:hang")
    await follow(cap_client, task["id"], lambda t: "hanging" in t["output"])
    leader = psutil.Process(task["pid"])

    def sleeping() -> bool:  # cap's command, started right after its "hanging" line
        return any("sleep" in " ".join(p.cmdline()) for p in leader.children(recursive=True))

    await eventually(sleeping, what="cap's sleep")
    tree = [leader, *leader.children(recursive=True)]
    run_dir = tmp_path / "data" / "runs" / str(task["id"])
    assert (run_dir / "cap" / "Capfile").exists()
    killed = await (await cap_client.post(f"/task/{task['id']}/kill")).json()
    assert killed["status"] == "killed"
    # The runner exits 128 + 15 after passing SIGTERM on to cap: killSignal says so plainly.
    assert (killed["exitCode"], killed["signal"], killed["killSignal"]) == (143, None, "SIGTERM")
    assert not [p for p in tree if alive(p.pid)]
    assert not run_dir.exists()


@pytest.fixture
def local_repo(tmp_path: Path) -> tuple[Path, str]:
    """A git repository with one commit: the application to deploy, and its commit."""
    repo = tmp_path / "app"
    repo.mkdir()
    (repo / "index.html").write_text("hello\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "first"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    return repo, head.stdout.strip()


@needs_cap
async def test_cap_deploys_a_local_repository(
    cap_client: Client, tmp_path: Path, local_repo: tuple[Path, str]
) -> None:
    repo, head = local_repo
    root = tmp_path / "deployed"
    task = await _run(cap_client, "deploy", stdout=True, DEMO_REPO=str(repo), DEMO_DEPLOY_ROOT=str(root))
    done = await finished(cap_client, task["id"])
    assert done["status"] == "finished", done["output"]
    # What a chat bot parses for the deployed revision, in cap's stdout kept apart.
    stdout = await (await cap_client.get(f"/task/{task['id']}/stdout")).text()
    assert f'echo "{head}" > REVISION' in stdout
    assert stdout.rstrip().endswith("Deployed example on production!")
    assert done["output"].rstrip().endswith("Deployed example on production!")
    current = root / "example" / "production" / "current"
    assert (current / "index.html").read_text() == "hello\n"
    assert (current / "REVISION").read_text().strip() == head
