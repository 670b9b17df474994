"""The configuration repository kept by pulsar-rest with GitPython: commits, branches, fetches."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from pulsar_rest.confrepo import ConfigRepo, RepoUnavailable, described_tasks
from tests.conftest import ClientFactory, create, eventually, finished, get_json, git, post_json, release
from tests.test_capistrano import needs_cap


async def test_tasks_run_with_a_commit_of_the_branch(
    make_client: ClientFactory, conf_git: Path, tmp_path: Path
) -> None:
    client = await make_client(config_repo=str(conf_git), config_branch="deploy", config_fetch_interval=0)
    first = git(conf_git, "rev-parse", "HEAD")
    assert await (await client.get("/apps")).json() == {"example": ["production", "staging"]}
    task = await finished(client, (await create(client, "args", app="example", env="production"))["id"])
    assert task["confCommit"] == first
    tree = Path(json.loads(task["output"].splitlines()[0])[-1])
    assert tree == tmp_path / "data" / "conf" / "trees" / first
    assert (tree / "apps" / "example" / "production.rb").is_file()

    # A new commit with a new environment: the next task sees it, the old tree stays whole.
    (conf_git / "apps" / "example" / "qa.rb").write_text("server 'localhost'\n")
    git(conf_git, "add", ".")
    git(conf_git, "commit", "-qm", "qa")
    second = git(conf_git, "rev-parse", "HEAD")
    assert (await (await client.get("/apps")).json())["example"] == ["production", "qa", "staging"]
    qa = await finished(client, (await create(client, "ok", app="example", env="qa"))["id"])
    assert qa["confCommit"] == second and qa["status"] == "finished"
    assert (tree / "apps" / "example" / "production.rb").is_file()
    assert not (tree / "apps" / "example" / "qa.rb").exists()


async def test_fetches_are_throttled(make_client: ClientFactory, conf_git: Path) -> None:
    client = await make_client(config_repo=str(conf_git), config_branch="deploy", config_fetch_interval=3600)
    first = git(conf_git, "rev-parse", "HEAD")
    git(conf_git, "commit", "-q", "--allow-empty", "-m", "later")
    task = await finished(client, (await create(client, "ok", app="example", env="staging"))["id"])
    assert task["confCommit"] == first  # the last fetch is recent enough


async def test_a_missing_branch_is_unavailable(conf_git: Path, tmp_path: Path) -> None:
    # At start, the command turns this into its one-line error (see test_cli).
    with pytest.raises(RepoUnavailable, match="branch nope"):
        await ConfigRepo(str(conf_git), "nope", tmp_path / "kept").current()


async def test_the_tasks_the_recipes_describe_are_offered(make_client: ClientFactory, conf_git: Path) -> None:
    client = await make_client(config_repo=str(conf_git), config_branch="deploy", config_fetch_interval=0)
    tasks = (await get_json(client, "/tasks/available"))["tasks"]
    assert tasks == ["demo:chatter", "demo:fail", "demo:hang", "demo:progress"]
    assert (await get_json(await make_client(), "/tasks/available", expect=503))["error"]["status"] == 503


def test_described_tasks_are_read_with_their_namespaces(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes" / "ops"
    recipes.mkdir(parents=True)
    (recipes / "db.rake").write_text(
        "# a comment: task :commented\n"
        "namespace :db do\n"
        "  desc 'Back up'\n"
        "  task :backup do\n"
        "    on roles(:db) do\n"
        "      execute :true\n"
        "    end\n"
        "  end\n"
        "\n"
        "  task :undescribed do\n"
        "  end\n"
        "  namespace :replica do\n"
        '    desc "Promote"\n'
        "    task :promote do\n"
        "    end\n"
        "  end\n"
        "\n"
        "  desc 'Vacuum'\n"
        "  task :vacuum\n"
        "end\n"
        "desc 'At the top'\n"
        "task :top\n"
    )
    (recipes / "notes.txt").write_text("desc 'x'\ntask :not_a_recipe\n")
    assert described_tasks(tmp_path) == ["db:backup", "db:replica:promote", "db:vacuum", "top"]
    assert described_tasks(tmp_path / "nowhere") == []


async def test_a_repository_gone_later_is_a_503(make_client: ClientFactory, conf_git: Path) -> None:
    client = await make_client(config_repo=str(conf_git), config_branch="deploy", config_fetch_interval=0)
    shutil.rmtree(conf_git)
    resp = await client.post("/example/production", json={"action": "ok"})
    assert resp.status == 503
    assert "configuration repository" in (await resp.json())["error"]["message"]
    assert (await client.get("/apps")).status == 503


@needs_cap
async def test_real_cap_from_a_git_configuration_repository(
    make_client: ClientFactory, conf_git: Path, tmp_path: Path
) -> None:
    client = await make_client(
        pulsar_bin=str(tmp_path / "no-pulsar"), config_repo=str(conf_git), config_branch="deploy"
    )
    resp = await client.post(
        "/example/staging",
        json={"action": "demo:progress", "taskVariables": {"DEMO_STEPS": "2", "DEMO_PAUSE": "0"}},
    )
    done = await finished(client, (await resp.json())["taskId"])
    assert done["status"] == "finished", done["output"]
    assert done["confCommit"] == git(conf_git, "rev-parse", "HEAD")
    assert "step 2 of 2 on staging" in done["output"]


async def test_a_queued_task_takes_its_turn_with_the_end_while_it_fetches(
    make_client: ClientFactory, conf_git: Path, gates: Path
) -> None:
    # A fetch before each task: the second task's start takes a while.
    client = await make_client(
        config_repo=str(conf_git), config_branch="deploy", config_fetch_interval=0, max_running=1
    )
    path = "/example/production"
    first = await create(client, "gate[t1]", app="example", env="production")
    second = (await post_json(client, path, action="gate[t2]", queue=True))["task"]
    third = (await post_json(client, path, action="ok", queue=True))["task"]
    release(gates, "t1")
    await finished(client, first["id"])
    # As soon as the first is seen ended, the second holds the app and environment and
    # counts as running, though its start is still under way: no request slips in between.
    assert (await get_json(client, f"/task/{second['id']}"))["status"] in ("created", "running")
    assert (await post_json(client, path, 409, action="ok"))["error"]["taskId"] == second["id"]
    busy = await post_json(client, "/example/staging", 503, action="ok")
    assert "--max-running" in busy["error"]["message"]
    assert (await get_json(client, f"/task/{third['id']}"))["status"] == "queued"
    release(gates, "t2")
    assert [(await finished(client, t["id"]))["status"] for t in (second, third)] == ["finished", "finished"]


async def test_a_fetch_given_up_by_its_caller_is_shared_not_repeated(
    conf_git: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = ConfigRepo(str(conf_git), "deploy", tmp_path / "kept", interval=0)
    updates: list[str] = []
    update = repo._update

    def counted() -> tuple[Path, str]:
        updates.append("fetch")
        return update()

    monkeypatch.setattr(repo, "_update", counted)
    gone = asyncio.create_task(repo.current())
    await eventually(lambda: bool(updates), what="the fetch")
    gone.cancel()  # a client that went away
    tree, sha = await repo.current()  # waits for the fetch under way
    assert updates == ["fetch"]
    assert sha == git(conf_git, "rev-parse", "HEAD") and (tree / "apps").is_dir()
    assert gone.cancelled()
