"""The configuration repository: which apps and environments it has (as pulsar reads it),
and, when it is a git repository, its clone, kept up to date with GitPython."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import git

from pulsar_rest.pulsar import redact as pulsar_redact

# Entries of apps/ that are shared files, not apps (pulsar v1's rule).
_SHARED = {"Capfile", "deploy.rb"}


class UnknownTarget(LookupError):
    """The repository has no such app, or no such environment for it."""


_NAMESPACE = re.compile(r"^(\s*)namespace\s+:?['\"]?(\w+)")
_TASK = re.compile(r"^(\s*)task\s+:?['\"]?([\w-]+)")
_DESC = re.compile(r"^\s*desc\s")


def described_tasks(conf: Path) -> list[str]:
    """The tasks of the recipes (recipes/**/*.rake and *.rb) that have a description, with
    their namespaces, sorted: what `cap -T` lists, read from the files (no Ruby runs). For
    suggestions only: a recipe written unusually may be missed."""
    found: set[str] = set()
    for path in sorted((conf / "recipes").rglob("*")) if (conf / "recipes").is_dir() else []:
        if path.suffix not in (".rake", ".rb") or not path.is_file():
            continue
        spaces: list[tuple[int, str]] = []  # the open namespaces, by indentation
        described = False
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            indent = len(line) - len(line.lstrip())
            if line.strip() == "end" and spaces and indent == spaces[-1][0]:
                spaces.pop()  # the namespace's own end
                continue
            while spaces and indent <= spaces[-1][0]:
                spaces.pop()  # a line at a namespace's level or above: it has ended
            if namespace := _NAMESPACE.match(line):
                spaces.append((len(namespace.group(1)), namespace.group(2)))
            elif task := _TASK.match(line):
                if described:
                    found.add(":".join([*(name for _, name in spaces), task.group(2)]))
                described = False
            elif _DESC.match(line):
                described = True
    return sorted(found)


def apps(conf: Path) -> dict[str, list[str]]:
    """`{app: [environments]}`, sorted, as `pulsar list` shows them: the entries of apps/
    but Capfile and deploy.rb; an app's environments are its *.rb files but deploy.rb. Like
    Ruby's Dir[] that pulsar uses, hidden entries (a leading dot) are not seen."""
    root = conf / "apps"
    found: dict[str, list[str]] = {}
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name in _SHARED or entry.name.startswith(".") or not entry.is_dir():
            continue
        found[entry.name] = sorted(
            path.stem
            for path in entry.glob("*.rb")
            if path.name != "deploy.rb" and not path.name.startswith(".") and path.is_file()
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


class RepoUnavailable(RuntimeError):
    """The configuration repository cannot be reached or has no such branch."""


# git never prompts (there is no terminal to answer it) and ssh never asks either.
_GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o ConnectTimeout=15",
}
# Exported trees kept (one per commit that ran): the 20 most recently used, and any used in
# the last day (a task may still run on it); older ones are removed.
_KEEP_TREES = 20
_KEEP_USED_WITHIN = 86400.0


def resolve(source: str) -> str:
    """pulsar's rules: an existing path as it is, `user/repo` as GitHub's, else a git URL."""
    path = Path(source).expanduser()
    if path.exists():
        return str(path.resolve())
    if re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", source):
        return f"git@github.com:{source}.git"
    return source


class ConfigRepo:
    """The configuration repository, kept by pulsar-rest: fetched with GitPython (at most
    every `interval` seconds), each commit that runs exported to a tree of its own, so a
    running task never sees its files change. A plain directory (not a git repository) is
    used as it is, and has no commit."""

    def __init__(self, source: str, branch: str, root: Path, interval: float = 5.0, timeout: float = 60.0):
        self.url = resolve(source)
        self.branch = branch
        self._root = root
        self._interval = interval
        self._timeout = timeout
        self._fetching: asyncio.Task[tuple[Path, str]] | None = None
        self._fetched_at = -1e18
        self._current: tuple[Path, str | None] | None = None
        self.fetches = 0
        self.failures = 0
        self.last_error: str | None = None  # why the last fetch failed; None when it worked
        local = Path(self.url)
        self.plain_dir = (
            local if local.is_dir() and not (local / ".git").exists() and not _is_bare(local) else None
        )

    @property
    def shown_url(self) -> str:
        """The URL without the credentials it may hold: for logs and messages."""
        return pulsar_redact(self.url)

    async def current(self) -> tuple[Path, str | None]:
        """The tree to run with and its commit (None for a plain directory), fetched first
        unless that was done less than `interval` seconds ago."""
        if self.plain_dir is not None:
            return self.plain_dir, None
        loop = asyncio.get_running_loop()
        if self._current is not None and loop.time() - self._fetched_at < self._interval:
            return self._current
        # One fetch at a time, whoever waits for it: a caller that gives up (a client gone)
        # leaves it running, and the next caller waits for that one instead of starting another.
        if self._fetching is None:
            self._fetching = loop.create_task(self._fetch())
            self._fetching.add_done_callback(_retrieve)
        return await asyncio.shield(self._fetching)

    async def _fetch(self) -> tuple[Path, str]:
        self.fetches += 1
        try:
            self._current = await asyncio.to_thread(self._update)
        except RepoUnavailable as exc:
            self.failures += 1
            self.last_error = str(exc)
            raise
        finally:
            self._fetching = None
        self.last_error = None
        self._fetched_at = asyncio.get_running_loop().time()
        return self._current

    def _update(self) -> tuple[Path, str]:
        try:
            # Closed after each use: GitPython keeps `git cat-file` processes open otherwise.
            with self._repo() as repo:
                refspec = f"+refs/heads/{self.branch}:refs/remotes/origin/{self.branch}"
                repo.git.fetch("--quiet", "--no-tags", "origin", refspec, kill_after_timeout=self._timeout)
                sha = repo.commit(f"refs/remotes/origin/{self.branch}").hexsha
                return self._export(repo, sha), sha
        except git.GitCommandError as exc:
            raise RepoUnavailable(
                f"configuration repository {self.shown_url}, branch {self.branch}: "
                f"{pulsar_redact(_git_reason(exc))}"
            ) from None
        # OSError: our disk (full, unwritable); TarError: a file its commit cannot give us.
        except (git.GitError, git.BadName, ValueError, OSError, tarfile.TarError) as exc:
            raise RepoUnavailable(f"configuration repository {self.shown_url}: {exc}") from None

    def _repo(self) -> git.Repo:
        path = self._root / "repo.git"
        try:
            repo = git.Repo(path)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            # Never made, or half made by a crash: it is only our copy, made again.
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            repo = git.Repo.init(path, bare=True)
        repo.git.update_environment(**_GIT_ENV)
        if "origin" not in [remote.name for remote in repo.remotes]:
            repo.create_remote("origin", self.url)
        elif repo.remotes.origin.url != self.url:
            repo.remotes.origin.set_url(self.url)
        return repo

    def _export(self, repo: git.Repo, sha: str) -> Path:
        trees = self._root / "trees"
        tree = trees / sha
        if tree.is_dir():
            os.utime(tree)  # used now: see _KEEP_USED_WITHIN
            return tree
        trees.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{sha}.", dir=trees))
        archive = io.BytesIO()
        repo.archive(archive, treeish=sha, format="tar")
        archive.seek(0)
        try:
            with tarfile.open(fileobj=archive) as tar:
                # "tar", not "data": a link to an absolute path is the repository's own
                # business (pulsar's clone keeps it); nothing is written outside the tree.
                tar.extractall(building, filter="tar")
            building.rename(tree)  # whole or not at all
        except (OSError, tarfile.TarError):
            shutil.rmtree(building, ignore_errors=True)
            if not tree.is_dir():
                raise
            # Exported meanwhile (another server sharing the data directory): the same files.
        old = sorted((p for p in trees.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_mtime)
        for stale in old[:-_KEEP_TREES]:
            if time.time() - _mtime(stale) > _KEEP_USED_WITHIN:
                shutil.rmtree(stale, ignore_errors=True)
        return tree


def _git_reason(exc: git.GitCommandError) -> str:
    """git's own reason, from what it printed: its first fatal or error line."""
    raw = exc.stderr if isinstance(exc.stderr, str) else ""
    lines = [line.strip().removeprefix("stderr: ").strip("'").strip() for line in raw.splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if line.lower().startswith(("fatal:", "error:", "ssh:", "remote:")):
            return line
    return lines[0] if lines else f"git failed (exit {exc.status})"


def _retrieve(fetch: asyncio.Task[tuple[Path, str]]) -> None:
    # Its failure reaches whoever awaits it; with nobody left waiting, it is not an error
    # of the event loop ("exception never retrieved"): the next caller fetches again.
    if not fetch.cancelled():
        fetch.exception()


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _is_bare(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir()
