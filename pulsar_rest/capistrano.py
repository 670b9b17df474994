"""A pulsar-compatible runner on Capistrano, for machines without the pulsar gem.

    python -m pulsar_rest.capistrano task APP ENV TASK --conf-repo DIR

It builds the Capistrano run directory from the configuration repository exactly as pulsar
v1 does (see assemble()), runs `cap ENV TASK` there (an argv list, never a shell), prints
pulsar's closing lines, and removes the run directory, also when it is stopped by SIGTERM.
Unlike pulsar, it exits non-zero when the task failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

# Ruby block-buffers `puts` on a pipe; required first, this makes its output line by line.
_SYNC_RB = "$stdout.sync = true\n$stderr.sync = true\n"


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
    capfile = _concat(apps / "Capfile", apps / app / "Capfile")
    capfile += f'Dir.glob("{conf.resolve()}/recipes/**/*.rake").each {{ |r| import r }}\n'
    (cap / "Capfile").write_text(capfile)
    (cap / "config" / "deploy.rb").write_text(_concat(apps / "deploy.rb", apps / app / "deploy.rb"))
    shutil.copyfile(stage, cap / "config" / "deploy" / f"{env}.rb")
    return cap


def _concat(*paths: Path) -> str:
    parts = [path.read_text() for path in paths if path.is_file()]
    return "".join(part if part.endswith("\n") else part + "\n" for part in parts)


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
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="pulsar-run-"))
    else:
        run_dir.mkdir(parents=True)  # its own: an existing one is an error
    stopping: list[int] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)  # cap is in our process group: it has the signal too

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            cap = assemble(conf, app, env, run_dir)
        except OSError as exc:
            print(f"pulsar: {exc}", flush=True)
            print(verdict(action, app, env, ok=False), flush=True)
            return 2
        sync = run_dir / "sync.rb"
        sync.write_text(_SYNC_RB)
        child_env = {
            **os.environ,
            "RUBYOPT": f"-r{sync} {os.environ.get('RUBYOPT', '')}".strip(),
            "PULSAR_CONF_REPO": str(conf.resolve()),  # as pulsar's own setting is named
        }
        try:
            code = subprocess.call([cap_bin, env, action], cwd=cap, env=child_env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            print(f"pulsar: cannot run {cap_bin}: {exc.strerror or exc}", flush=True)
            code = 127
        ok = code == 0 and not stopping
        print(verdict(action, app, env, ok), flush=True)
        if stopping:
            return 128 + stopping[0]
        return 0 if ok else (code if code > 0 else 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(run_dir, ignore_errors=True)


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
