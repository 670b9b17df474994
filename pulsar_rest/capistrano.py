"""A pulsar-compatible runner on Capistrano, for machines without the pulsar gem.

    python -m pulsar_rest.capistrano task APP ENV TASK --conf-repo DIR

It builds the Capistrano run directory from the configuration repository exactly as pulsar
v1 does (see assemble()), runs `cap ENV TASK` there (an argv list, never a shell), prints
pulsar's closing lines, and removes the run directory, also when it is stopped by SIGTERM.
Unlike pulsar, it exits non-zero when the task failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

# Ruby block-buffers `puts` on a pipe; required first (RUBYOPT=-r, found through RUBYLIB,
# which takes a path with spaces), this makes its output line by line.
_SYNC_FEATURE = "pulsar_rest_sync"
_SYNC_RB = b"$stdout.sync = true\n$stderr.sync = true\n"


def assemble(conf: Path, app: str, env: str, run_dir: Path) -> Path:
    """Build pulsar's `cap/` directory from the configuration repository `conf`; return it.

    - cap/Capfile = apps/Capfile + apps/APP/Capfile (each if present), then a line that
      imports every recipes/**/*.rake of the repository;
    - cap/config/deploy.rb = apps/deploy.rb + apps/APP/deploy.rb (raw concatenation);
    - cap/config/deploy/ENV.rb = apps/APP/ENV.rb.
    """
    apps = conf / "apps"
    stage = apps / app / f"{env}.rb"
    if not stage.is_file():
        raise FileNotFoundError(f"no environment {env!r} for app {app!r} in {conf}")
    cap = run_dir / "cap"
    (cap / "config" / "deploy").mkdir(parents=True)
    # pulsar's line is Dir.glob("#{conf}/recipes/**/*.rake"): with the directory as the glob's
    # base instead, a path holding glob characters or quotes finds the same recipes.
    recipes = _ruby_string(str(conf.resolve() / "recipes"))
    capfile = _concat(apps / "Capfile", apps / app / "Capfile")
    line = f"Dir.glob('**/*.rake', base: {recipes}).each {{ |r| import File.join({recipes}, r) }}\n"
    capfile += line.encode("utf-8", "surrogateescape")
    (cap / "Capfile").write_bytes(capfile)
    (cap / "config" / "deploy.rb").write_bytes(_concat(apps / "deploy.rb", apps / app / "deploy.rb"))
    shutil.copyfile(stage, cap / "config" / "deploy" / f"{env}.rb")
    return cap


def _concat(*paths: Path) -> bytes:
    # Bytes, as pulsar concatenates them: a recipe need not be UTF-8 (a Latin-1 comment).
    parts = [path.read_bytes() for path in paths if path.is_file()]
    return b"".join(part if part.endswith(b"\n") else part + b"\n" for part in parts)


def _ruby_string(text: str) -> str:
    """`text` as a single-quoted Ruby string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def verdict(action: str, app: str, env: str, ok: bool) -> str:
    """pulsar's closing line (a deploy has its own wording)."""
    if action == "deploy":
        return f"Deployed {app} on {env}!" if ok else f"Failed to deploy {app} on {env}."
    return (
        f"Executed task {action} for {app} on {env}!"
        if ok
        else f"Failed to execute task {action} for {app} on {env}."
    )


def run(
    app: str, env: str, action: str, conf: Path, cap_bin: str = "cap", run_dir: Path | None = None
) -> int:
    try:
        if run_dir is None:
            run_dir = Path(tempfile.mkdtemp(prefix="pulsar-run-"))
        else:
            run_dir.mkdir(parents=True)  # its own: an existing one is an error
    except OSError as exc:
        print(f"pulsar: cannot make the run directory: {exc}", flush=True)
        print(verdict(action, app, env, ok=False), flush=True)
        return 2
    stopping: list[int] = []
    children: list[subprocess.Popen[bytes]] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)
        for child in children:  # cap has it too when the whole group is signalled, not always
            with contextlib.suppress(OSError):
                child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            cap = assemble(conf, app, env, run_dir)
            (run_dir / f"{_SYNC_FEATURE}.rb").write_bytes(_SYNC_RB)
        except OSError as exc:
            print(f"pulsar: {exc}", flush=True)
            print(verdict(action, app, env, ok=False), flush=True)
            return 2
        child_env = {
            **os.environ,
            "RUBYLIB": os.pathsep.join(filter(None, (str(run_dir), os.environ.get("RUBYLIB")))),
            "RUBYOPT": f"-r{_SYNC_FEATURE} {os.environ.get('RUBYOPT', '')}".strip(),
            "PULSAR_CONF_REPO": str(conf.resolve()),  # as pulsar's own setting is named
        }
        # Told to stop while the run directory was built: no task at all.
        code = 0 if stopping else _cap(cap_bin, env, action, cap, child_env, children, stopping)
        ok = code == 0 and not stopping
        print(verdict(action, app, env, ok), flush=True)
        if stopping:
            return 128 + stopping[0]
        return 0 if ok else (code if code > 0 else 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(run_dir, ignore_errors=True)


def _cap(
    cap_bin: str,
    env: str,
    action: str,
    cwd: Path,
    child_env: dict[str, str],
    children: list[subprocess.Popen[bytes]],
    stopping: list[int],
) -> int:
    """Run `cap ENV TASK` in `cwd` (listed in `children` while it runs); its exit code."""
    try:
        child = subprocess.Popen([cap_bin, env, action], cwd=cwd, env=child_env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        print(f"pulsar: cannot run {cap_bin}: {exc.strerror or exc}", flush=True)
        return 127
    children.append(child)
    if stopping:  # a SIGTERM between the start and the line above: cap must have it too
        child.send_signal(stopping[0])
    return child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pulsar", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    task = sub.add_parser("task", help="run a Capistrano task")
    task.add_argument("app")
    task.add_argument("env")
    task.add_argument("task")
    task.add_argument(
        "-c", "--conf-repo", required=True, type=Path, help="configuration repository (a directory)"
    )
    task.add_argument("--cap", default="cap", help="the cap executable")
    task.add_argument(
        "--run-dir", type=Path, help="the run directory to make (and remove); default: a temporary one"
    )
    args = parser.parse_args(argv)
    return run(args.app, args.env, args.task, args.conf_repo, args.cap, args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
