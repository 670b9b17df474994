"""`pulsar-rest run|logs|tasks|kill|apps`: deploy and follow from a terminal or CI.

Exit codes mirror the task: 0 finished, 1 failed, 2 killed or interrupted, 3 --timeout
reached (the task goes on), 4 authentication or authorisation refused, 5 the server could
not be reached after retries, 64 usage errors (also a request the server refuses as
invalid: an unknown app, a deploy in the way), 130 detached by Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from pulsar_rest.client import ANSI, EXIT_CODES, POLL, USAGE, Api, ClientError, check, target_path, task_path
from pulsar_rest.settings import without_values

COMMANDS = ("run", "logs", "tasks", "kill", "apps")
TIMEOUT_REACHED = 3
DETACHED = 130
# Bytes read back at a time to find the last lines of a log (--tail).
TAIL_BLOCK = 64 * 1024


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs: Any) -> None:
        # No abbreviations: `--token SECRET` must not pass for `--token-file SECRET`.
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ClientError(
            USAGE, f"{without_values(message)} (see pulsar-rest {self.prog.split()[-1]} --help)"
        )


def _parser() -> argparse.ArgumentParser:
    server = _Parser(add_help=False)
    server.add_argument("--url", help="the server (env PULSAR_REST_URL; default http://127.0.0.1:8001)")
    server.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding the token (env PULSAR_REST_TOKEN: never a token on the command line)",
    )
    server.add_argument("--ca-cert", type=Path, metavar="FILE", help="CA certificate of a private CA (TLS)")
    server.add_argument("--retry-for", type=float, default=120.0, metavar="SECONDS", help=argparse.SUPPRESS)
    follow = _Parser(add_help=False)
    follow.add_argument("--timeout", type=float, metavar="SECONDS", help="stop waiting after it (exit 3)")
    follow.add_argument("--no-color", action="store_true", help="no ANSI colours (also NO_COLOR)")
    follow.add_argument(
        "--kill-on-interrupt", action="store_true", help="Ctrl-C kills the task (else detaches)"
    )
    follow.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    parser = _Parser(
        prog="pulsar-rest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", parents=[server, follow], help="start a task (and follow it)")
    run.add_argument("app")
    run.add_argument("env")
    run.add_argument("task")
    run.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="a task variable")
    run.add_argument("--queue", action="store_true", help="queue behind the deploy in the way")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--follow", action="store_true", help="print its output live, exit with its result")
    mode.add_argument("--wait", action="store_true", help="wait for its end silently, exit with its result")
    logs = commands.add_parser("logs", parents=[server, follow], help="print a task's output")
    logs.add_argument("id", type=int)
    logs.add_argument("--follow", action="store_true", help="and what follows, until it ends")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    tasks = commands.add_parser("tasks", parents=[server], help="list tasks, newest first")
    tasks.add_argument("--app")
    tasks.add_argument("--env")
    tasks.add_argument("--status")
    tasks.add_argument("--mine", action="store_true", help="only those you started")
    tasks.add_argument("--limit", type=int, default=20, metavar="N")
    tasks.add_argument("--json", action="store_true", help="JSON, for scripts")
    kill = commands.add_parser("kill", parents=[server], help="stop a task")
    kill.add_argument("id", type=int)
    apps = commands.add_parser("apps", parents=[server], help="the apps and their environments")
    apps.add_argument("--json", action="store_true", help="JSON, for scripts")
    return parser


def main(argv: Sequence[str]) -> int:
    try:
        args = _parser().parse_args(list(argv))
        return asyncio.run(_main(args))
    except ClientError as exc:
        print(f"pulsar-rest: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return DETACHED


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        try:
            return args.token_file.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise ClientError(USAGE, f"cannot read --token-file {args.token_file}: {exc}") from None
    return os.environ.get("PULSAR_REST_TOKEN") or None


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, line: str) -> None:
        if not self.quiet:
            print(f"pulsar-rest: {line}", file=sys.stderr, flush=True)


async def _main(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("PULSAR_REST_URL") or "http://127.0.0.1:8001"
    say = Progress(getattr(args, "quiet", False))
    async with Api(url, _token(args), args.ca_cert, args.retry_for, say) as api:
        if args.command == "apps":
            return await _apps(api, args)
        if args.command == "tasks":
            return await _tasks(api, args)
        if args.command == "kill":
            task = check(await api.call("POST", task_path(args.id, "/kill"), wait=POLL))
            print(f"task {task['id']}: {task['status']}")
            return 0
        return await _follow_command(api, args, say)


async def _apps(api: Api, args: argparse.Namespace) -> int:
    found: dict[str, list[str]] = check(await api.call("GET", "apps"))
    if args.json:
        print(json.dumps(found, indent=2))
    for app, envs in found.items():
        if not args.json:
            print(f"{app}: {', '.join(envs)}")  # as `pulsar list` prints them
    return 0


async def _tasks(api: Api, args: argparse.Namespace) -> int:
    params = {"output": "false", "pageSize": str(max(1, min(args.limit, 1000)))}
    for key in ("app", "env", "status"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    if args.mine:
        me = check(await api.call("GET", "me"))
        if not me.get("login"):
            raise ClientError(USAGE, "--mine: the server runs without authentication, nobody is anyone")
        params["createdBy"] = me["login"]
    listed = check(await api.call("GET", "tasks", params=params))
    tasks = [listed["tasks"][str(task_id)] for task_id in listed["ids"]]
    if args.json:
        print(json.dumps(tasks, indent=2))
        return 0
    rows = [("ID", "APP/ENV", "TASK", "STATUS", "BY", "CREATED")]
    rows += [
        (
            str(t["id"]),
            f"{t['app']}/{t['env']}",
            t["action"],
            t["status"],
            t["createdBy"] or "",
            t["createdAt"][:19],
        )
        for t in tasks
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


async def _follow_command(api: Api, args: argparse.Namespace, say: Progress) -> int:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    if args.command == "run":
        body: dict[str, Any] = {"action": args.task, "queue": args.queue}
        variables = dict(_variable(item) for item in args.var)
        if variables:
            body["taskVariables"] = variables
        where = target_path(args.app, args.env)
        created = check(await api.call("POST", where, json_body=body, idempotent=False))
        task = created["task"]
        print(
            f"task {task['id']}: {created['url']}", file=sys.stderr if args.follow else sys.stdout, flush=True
        )
        if not (args.follow or args.wait):
            return 0
        offset: int | None = 0 if args.follow else None
    else:
        task = check(await api.call("GET", task_path(args.id)))
        offset = await _tail_start(api, task, args.tail) if args.tail is not None else 0
        if not args.follow:
            await _print_until(api, task, offset, _writer(args), say, deadline, follow=False)
            return 0
    color = _writer(args)
    loop = asyncio.get_running_loop()
    following = asyncio.ensure_future(_print_until(api, task, offset, color, say, deadline, follow=True))
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    stop = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait([following, stop], return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        stop.cancel()
    if following.done():
        ended = following.result()
        if ended is None:
            say(f"--timeout reached: task {task['id']} goes on (pulsar-rest logs {task['id']} --follow)")
            return TIMEOUT_REACHED
        return _exit_code(ended, say)
    following.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await following
    if args.kill_on_interrupt:
        say(f"killing task {task['id']}")
        killed = check(await api.call("POST", task_path(task["id"], "/kill"), wait=POLL))
        return _exit_code(killed, say)
    say(f"detached: task {task['id']} goes on; follow it again with: pulsar-rest logs {task['id']} --follow")
    return DETACHED


def _variable(item: str) -> tuple[str, str]:
    name, equals, value = item.partition("=")
    if not equals or not name:
        raise ClientError(USAGE, f"--var {item.split('=')[0]!r}: give NAME=VALUE")
    return name, value


def _exit_code(task: dict[str, Any], say: Progress) -> int:
    code = EXIT_CODES.get(task["status"], 1)
    detail = f"exit code {task['exitCode']}" if task.get("exitCode") is not None else task.get("signal") or ""
    say(f"task {task['id']} {task['status']}" + (f" ({detail})" if detail else ""))
    return code


class Writer:
    """Output to stdout as bytes, its ANSI escapes removed unless colours pass through."""

    def __init__(self, stream: BinaryIO, color: bool) -> None:
        self._stream = stream
        self._color = color

    def write(self, data: bytes) -> None:
        self._stream.write(data if self._color else ANSI.sub(b"", data))
        self._stream.flush()


def _writer(args: argparse.Namespace) -> Writer:
    color = sys.stdout.isatty() and not args.no_color and not os.environ.get("NO_COLOR")
    return Writer(sys.stdout.buffer, color)


async def _tail_start(api: Api, task: dict[str, Any], lines: int) -> int:
    """The byte offset where the last `lines` lines of the task's output begin: read back
    from the end a block at a time until there are enough."""
    size: int = task["outputSize"]
    if lines <= 0:
        return size
    begin, data = size, b""
    while begin > 0:
        end, begin = begin, max(0, begin - TAIL_BLOCK)
        headers = {"Range": f"bytes={begin}-{end - 1}"}
        data = check(await api.call("GET", task_path(task["id"], "/log"), headers=headers, raw=True)) + data
        if data.removesuffix(b"\n").count(b"\n") >= lines:
            break
    body = data.removesuffix(b"\n")  # the last line's own newline is no line before it
    cut = len(body)
    for _ in range(lines):
        cut = body.rfind(b"\n", 0, cut)
        if cut < 0:
            return begin
    return begin + cut + 1


async def _print_until(
    api: Api,
    task: dict[str, Any],
    offset: int | None,
    out: Writer,
    say: Progress,
    deadline: float | None,
    follow: bool,
) -> dict[str, Any] | None:
    """Print the output from `offset` (None: print nothing, only wait) until the task has
    ended and all of it is printed, or (without `follow`) until what there is now; the task
    at its end, or None at the deadline."""
    task_id = task["id"]
    status = task["status"]
    if status not in EXIT_CODES:
        say(
            f"task {task_id} {status}"
            + (": waiting for its end" if offset is None else ": following its output")
        )
    position = offset or 0
    while True:
        wait = POLL if follow else 0.0
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - time.monotonic()))
        params = {"offset": str(position), "timeout": f"{wait:g}"}
        answer = check(await api.call("GET", task_path(task_id, "/output"), params=params, wait=wait))
        following = answer["nextOffset"]
        if offset is not None and following > position:
            text: str = answer["output"]
            data = text.encode()
            if len(data) != following - position:  # not valid UTF-8 as the log has it: its bytes
                data = check(
                    await api.call(
                        "GET",
                        task_path(task_id, "/log"),
                        headers={"Range": f"bytes={position}-{following - 1}"},
                        raw=True,
                    )
                )
            out.write(data)
        position = following
        current = answer["task"]
        if current["status"] != status:
            status = current["status"]
            if status not in EXIT_CODES:
                say(f"task {task_id} {status}")
        if answer["complete"] or (not follow and not answer["changed"]):
            if answer["complete"]:
                return dict(current)
            return None if follow else dict(current)
        if deadline is not None and time.monotonic() >= deadline:
            return None
