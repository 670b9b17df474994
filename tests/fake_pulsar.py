#!/usr/bin/env python3
"""A stand-in for pulsar v1 in tests and demos: `fake_pulsar.py task APP ENV ACTION [...]`.

The task name picks the behaviour, with rake-style arguments: `gate[name]` waits for the
file $FAKE_PULSAR_DIR/name, `lines[100]` prints 100 lines, and so on (see BEHAVIOURS).
Only the standard library: it runs under any python3.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

OUT = sys.stdout


def say(text: str) -> None:
    OUT.write(text + "\n")
    OUT.flush()


def gate(name: str) -> None:
    """Block until the test creates the gate file: the test, not a clock, sets the pace."""
    path = Path(os.environ.get("FAKE_PULSAR_DIR", "."), name)
    while not path.exists():
        time.sleep(0.005)


def sleep_forever() -> None:
    while True:
        time.sleep(3600)


def ok(app: str, env: str, action: str, args: list[str]) -> int:
    say(f"Running {action} for {app} on {env}")
    say(f"Executed task {action} for {app} on {env}!")
    return 0


def deploy(app: str, env: str, action: str, args: list[str]) -> int:
    """The demo: a deploy that shows progress for a few seconds."""
    steps = ["checking out the code", "installing dependencies", "migrating", "restarting"]
    for step in steps:
        say(f"{app}/{env}: {step}...")
        time.sleep(float(args[0]) if args else 0.8)
    say(f"Deployed {app} on {env}!")
    return 0


def fail(app: str, env: str, action: str, args: list[str]) -> int:
    print("cap aborted: something broke", file=sys.stderr, flush=True)
    return int(args[0]) if args else 3


def pulsar_fail(app: str, env: str, action: str, args: list[str]) -> int:
    say("cap output before the failure")
    say(f"\x1b[31mFailed to execute task {action} for {app} on {env}.\x1b[0m")
    say("SSHKit::Runner::ExecuteError: Exception while executing on host local")
    return 0  # pulsar v1 exits 0 even when the task failed


def gated(app: str, env: str, action: str, args: list[str]) -> int:
    for name in args:
        say(f"waiting for {name}")
        gate(name)
        say(f"passed {name}")
    return ok(app, env, action, args)


def lines(app: str, env: str, action: str, args: list[str]) -> int:
    count = int(args[0])
    OUT.write("".join(f"line {i}\n" for i in range(1, count + 1)))
    OUT.flush()
    return ok(app, env, action, args)


def interleave(app: str, env: str, action: str, args: list[str]) -> int:
    """stdout and stderr in turns: merged at the pipe, their order is kept."""
    for i in range(1, 21):
        stream = sys.stdout if i % 2 else sys.stderr
        stream.write(f"{'out' if i % 2 else 'err'} {i}\n")
        stream.flush()
    return 0


def utf8(app: str, env: str, action: str, args: list[str]) -> int:
    """A character split across two writes (with a gate between), then bytes that are not UTF-8."""
    raw = sys.stdout.buffer
    raw.write(b"start " + "é".encode()[:1])
    raw.flush()
    gate(args[0])
    raw.write("é".encode()[1:] + b" end\n" + b"bad \xff\xfe bytes\n")
    raw.write("€".encode()[:2])  # cut short by the exit
    raw.flush()
    return 0


def split(app: str, env: str, action: str, args: list[str]) -> int:
    """A character cut between two stdout writes, with a stderr line between (gates between)."""
    out, err = sys.stdout.buffer, sys.stderr.buffer
    out.write(b"start " + "é".encode()[:1])
    out.flush()
    gate(args[0])
    err.write(b"E\n")
    err.flush()
    gate(args[1])
    out.write("é".encode()[1:] + b" end\n")
    out.flush()
    return 0


def stamps(app: str, env: str, action: str, args: list[str]) -> int:
    """For the benchmark: at each gate, a line with the time it is written (time.time())."""
    for name in args:
        say(f"waiting for {name}")
        gate(name)
        say(f"stamp {time.time():.6f}")
    return 0


def paced(app: str, env: str, action: str, args: list[str]) -> int:
    """For the benchmark: 100-byte lines "<time.time()> <number> x...", at about N bytes a
    second for S seconds (`paced[N,S]`), then the rate it could really write at and how long
    its writes waited (a reader that lags fills the pipe, and the writes wait)."""
    rate, seconds = int(args[0]), float(args[1])
    raw = sys.stdout.buffer
    per_tick = max(1, rate // 100 // 100)  # lines each 10 ms
    started = time.time()
    number = 0
    waited = 0.0
    while time.time() < started + seconds:
        chunk = []
        for _ in range(per_tick):
            head = f"{time.time():.6f} {number} "
            chunk.append(head + "x" * (99 - len(head)) + "\n")
            number += 1
        before = time.perf_counter()
        raw.write("".join(chunk).encode())
        raw.flush()
        waited += time.perf_counter() - before
        # The load's pace (a clock is what it is about), not a synchronisation.
        time.sleep(max(0.0, started + number / (per_tick * 100) - time.time()))
    elapsed = time.time() - started
    say(f"wrote {number * 100} bytes in {elapsed:.3f} s, {waited:.3f} s of it in writes")
    return 0


def bench_block() -> bytes:
    """64 KiB + 2 bytes: writes of it cut the two-byte "é" at every pipe read boundary."""
    return b"x" * 65535 + "é".encode() + b"\n"


def many_bytes(app: str, env: str, action: str, args: list[str]) -> int:
    """Write at least N bytes as fast as possible (whole blocks of bench_block())."""
    block = bench_block() * 16
    raw = sys.stdout.buffer
    for _ in range(-(-int(args[0]) // len(block))):
        raw.write(block)
    raw.flush()
    return 0


def record(app: str, env: str, action: str, args: list[str]) -> int:
    """Numbered lines, without end, each also appended to $FAKE_PULSAR_DIR/NAME once written
    to stdout: the record of what reached the pipe, to compare with what the server kept."""
    path = Path(os.environ.get("FAKE_PULSAR_DIR", "."), args[0])
    with path.open("ab", buffering=0) as written:
        for i in range(10_000_000):
            line = f"line {i:09} {'é' * 40}\n".encode()
            try:
                sys.stdout.buffer.write(line)
                sys.stdout.buffer.flush()
            except BrokenPipeError:
                return 1  # the reader is gone
            written.write(line)
    return 0


def show_env(app: str, env: str, action: str, args: list[str]) -> int:
    """The named environment variables as JSON (null for those not set)."""
    say(json.dumps({name: os.environ.get(name) for name in args}))
    return 0


def show_args(app: str, env: str, action: str, args: list[str]) -> int:
    say(json.dumps(sys.argv[1:]))
    return 0


def _child_ignoring_term(pid_file: str, new_session: bool) -> subprocess.Popen[bytes]:
    code = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({pid_file!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"os.rename({pid_file!r} + '.tmp', {pid_file!r})\n"
        "while True: time.sleep(3600)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        start_new_session=new_session,
        stdout=subprocess.DEVNULL if new_session else None,
    )


def grandchild(app: str, env: str, action: str, args: list[str]) -> int:
    """A child that ignores SIGTERM, in the task's process group; the parent waits forever."""
    pid_file = str(Path(os.environ.get("FAKE_PULSAR_DIR", "."), args[0]))
    _child_ignoring_term(pid_file, new_session=False)
    while not Path(pid_file).exists():
        time.sleep(0.005)
    say(f"grandchild {Path(pid_file).read_text()}")
    sleep_forever()
    return 0


def escape(app: str, env: str, action: str, args: list[str]) -> int:
    """A daemon that leaves the process group, ignores SIGTERM, and outlives its parent."""
    pid_file = str(Path(os.environ.get("FAKE_PULSAR_DIR", "."), args[0]))
    _child_ignoring_term(pid_file, new_session=True)
    while not Path(pid_file).exists():
        time.sleep(0.005)
    say(f"daemon {Path(pid_file).read_text()}")
    return 0


def orphan(app: str, env: str, action: str, args: list[str]) -> int:
    """A child in a session of its own that exits at once and is never waited for: once
    this process has exited too, its zombie is whoever adopts it's to collect."""
    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        time.sleep(0.005)
    say(f"orphan {child.pid}")
    os._exit(0)  # no clean-up: it would collect the child


def colours(app: str, env: str, action: str, args: list[str]) -> int:
    """For the console: HTML that must stay text, then ANSI colours with an escape sequence
    cut between two writes (the gate between them makes two chunks of the stream)."""
    raw = sys.stdout.buffer
    raw.write(b"<img src=x onerror=document.title='pwned'><script>document.title='pwned'</script>\n")
    raw.write(b"plain \x1b[1mbold\x1b[0m \x1b[38;2;255;0;128mtruecolor\x1b[0m \x1b[38;5;208m256\x1b[0m\n")
    raw.write(b"before the colour \x1b")
    raw.flush()
    gate(args[0])
    raw.write(b"[31mred after the cut\x1b[0m and plain\n")
    raw.flush()
    return 0


def showcase(app: str, env: str, action: str, args: list[str]) -> int:
    """Capistrano-like coloured output, for the README's picture."""
    green, blue, yellow, grey, bold, off = (
        "\x1b[32m",
        "\x1b[34m",
        "\x1b[33m",
        "\x1b[90m",
        "\x1b[1m",
        "\x1b[0m",
    )
    steps = [
        ("git:wrapper", "mkdir -p /tmp/pulsar"),
        ("git:check", "git ls-remote git@github.com:acme/shop.git HEAD"),
        ("deploy:check:directories", "mkdir -p /srv/shop/shared /srv/shop/releases"),
        ("git:create_release", "git archive main | tar -x -f - -C /srv/shop/releases/20240611"),
        ("bundler:install", "bundle install --deployment --quiet"),
        ("deploy:assets:precompile", "rake assets:precompile"),
        ("deploy:migrate", "rake db:migrate"),
        ("deploy:symlink:release", "ln -sfn /srv/shop/releases/20240611 /srv/shop/current"),
        ("puma:restart", "systemctl restart shop"),
    ]
    say(f"{bold}Running {action} for {app} on {env}{off}")
    for minute, (name, command) in enumerate(steps):
        say(f"{grey}00:{minute:02}{off} {blue}{name}{off}")
        for host in ("web1", "web2"):
            say(f"      01 {command}")
            say(f"    {green}✔ 01 deploy@{host}.{env}{off} {grey}0.{minute + 1}4s{off}")
    say(f"{yellow}WARN{off} assets: 2 files larger than 500 KiB")
    say(f"{green}{bold}Executed task {action} for {app} on {env}!{off}")
    return 0


def big_log(app: str, env: str, action: str, args: list[str]) -> int:
    """About N MiB of numbered lines, then "the last line"."""
    raw = sys.stdout.buffer
    total = int(args[0]) * 1024 * 1024
    written = number = 0
    while written < total:
        numbers = range(number, number + 20000)
        block = "".join(f"line {n:08} of a big log, padded to be a little longer\n" for n in numbers)
        number += 20000
        raw.write(block.encode())
        written += len(block)
    raw.write(b"the last line\n")
    raw.flush()
    return 0


def flood(app: str, env: str, action: str, args: list[str]) -> int:
    """Pairs GATE,N: after each gate, N numbered lines written in many pieces; then "flood done"."""
    raw = sys.stdout.buffer
    number = 0
    for name, count in zip(args[::2], args[1::2], strict=True):
        gate(name)
        end = number + int(count)
        for start in range(number, end, 2000):
            raw.write("".join(f"flood {n}\n" for n in range(start, min(end, start + 2000))).encode())
            raw.flush()
        number = end
    raw.write(b"flood done\n")
    raw.flush()
    return 0


def hang(app: str, env: str, action: str, args: list[str]) -> int:
    say("hanging")
    sleep_forever()
    return 0


def ignore_term(app: str, env: str, action: str, args: list[str]) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    say("ignoring SIGTERM")
    sleep_forever()
    return 0


def term_exit(app: str, env: str, action: str, args: list[str]) -> int:
    """Handles SIGTERM as cap does: exits 128 + 15."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(143))
    say("exits on SIGTERM")
    sleep_forever()
    return 0


BEHAVIOURS: dict[str, Callable[[str, str, str, list[str]], int]] = {
    "ok": ok,
    "deploy": deploy,
    "fail": fail,
    "pulsar-fail": pulsar_fail,
    "gate": gated,
    "lines": lines,
    "interleave": interleave,
    "utf8": utf8,
    "split": split,
    "args": show_args,
    "env": show_env,
    "record": record,
    "stamps": stamps,
    "bytes": many_bytes,
    "paced": paced,
    "grandchild": grandchild,
    "escape": escape,
    "orphan": orphan,
    "hang": hang,
    "colours": colours,
    "biglog": big_log,
    "showcase": showcase,
    "flood": flood,
    "ignore-term": ignore_term,
    "term-exit": term_exit,
}


def main() -> int:
    argv = sys.argv[1:]
    if len(argv) < 4 or argv[0] != "task":
        print("usage: fake_pulsar.py task APP ENV TASK [--conf-repo REPO]", file=sys.stderr)
        return 64
    app, env, action = argv[1:4]
    match = re.fullmatch(r"([^\[]+)(?:\[(.*)\])?", action)
    assert match is not None
    name, raw_args = match.group(1), match.group(2)
    args = raw_args.split(",") if raw_args else []
    behaviour = BEHAVIOURS.get(name.split(":")[-1])
    if behaviour is None:
        print(f"fake pulsar: no task {name}", file=sys.stderr)
        return 1
    return behaviour(app, env, action, args)


if __name__ == "__main__":
    sys.exit(main())
