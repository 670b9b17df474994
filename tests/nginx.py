"""Debian's nginx on loopback, with the project's site (config/nginx.conf) as the tests
run it: all its files in a temporary directory, in front of pulsar-rest on loopback ports."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import ROOT, TIMEOUT

SITE = ROOT / "config" / "nginx.conf"
# The development certificate: valid for localhost and 127.0.0.1, its own CA.
CERT = ROOT / "bin" / "ssl" / "pulsar.local.crt"
KEY = ROOT / "bin" / "ssl" / "pulsar.local.key"


def tool(name: str, package: str) -> str:
    """The path of `name`; a failure naming the Debian package when it is missing."""
    # /usr/sbin holds nginx and is not on every user's PATH.
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install {package} (.ci/run installs it)")
    return path


# nginx's own configuration around the site, as Debian's /etc/nginx/nginx.conf has it
# (copied: the test never reads /etc/nginx), with an admin's broad gzip_types on top. The
# site must hold against them: its TLS 1.3 only over the older versions allowed around it,
# its unbuffered, ungzipped streams over gzip.
NGINX_MAIN = """\
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 64; }}
http {{
    ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers on;
    gzip on;
    gzip_types text/plain application/json text/event-stream;
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # Only here: ignore pulsar-rest's own X-Accel-Buffering, so that what keeps the streams
    # unbuffered in these tests is the site's configuration alone.
    proxy_ignore_headers X-Accel-Buffering;
{site}
}}
"""


def substitute(text: str, pattern: str, replacement: str, count: int = 1) -> str:
    """`text` with `pattern` (each line) replaced, which must match `count` times: a site
    that changed shape fails here rather than being tested with its placeholders."""
    new, made = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert made == count, f"{pattern!r} matched {made} times in {SITE}, not {count}"
    return new


def site_with_dev_cert(text: str) -> str:
    text = substitute(text, r"^(\s*ssl_certificate)\s+\S+;", rf"\1 {CERT};")
    return substitute(text, r"^(\s*ssl_certificate_key)\s+\S+;", rf"\1 {KEY};")


def site_on_loopback(https: int, http: int, upstream: int) -> str:
    """The site with the development certificate, listening on loopback ports of this test
    (IPv4 only: IPv6 may be off where tests run), proxying to pulsar-rest on `upstream`."""
    site = site_with_dev_cert(SITE.read_text())
    site = substitute(site, r"^(\s*)listen\s+443\b([^;]*);", rf"\1listen 127.0.0.1:{https}\2;")
    site = substitute(site, r"^(\s*)listen\s+80\b([^;]*);", rf"\1listen 127.0.0.1:{http}\2;")
    site = substitute(site, r"^\s*listen\s+\[::\]:\d+[^;]*;\n", "", count=2)
    return substitute(site, r"^(\s*server\s+127\.0\.0\.1):8001\b", rf"\g<1>:{upstream}")


def main_config(tmp: Path, site: str) -> Path:
    """nginx's configuration, all of its files under `tmp`, around `site`."""
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / name).mkdir(exist_ok=True)
    path = tmp / "nginx.conf"
    path.write_text(NGINX_MAIN.format(tmp=tmp, site=site))
    return path


def nginx_argv(nginx: str, tmp: Path, config: Path) -> list[str]:
    # -p and -e: nginx's prefix and its first error log, before it reads the configuration,
    # would otherwise be Debian's /usr/share/nginx and /var/log/nginx.
    return [nginx, "-p", f"{tmp}/", "-e", str(tmp / "error.log"), "-c", str(config)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_accepting(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited ({proc.returncode}): {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx is not listening on {port}: {log.read_text()}") from None
            time.sleep(0.01)


@contextlib.contextmanager
def nginx_running(tmp: Path, site: str, https: int) -> Iterator[None]:
    """Debian's nginx with `site` (all its files under `tmp`), accepting on `https`, until
    the block ends; then stopped, with no error in its log."""
    nginx = tool("nginx", "nginx")
    config = main_config(tmp, site)
    errors = tmp / "error.log"
    proc = subprocess.Popen(
        nginx_argv(nginx, tmp, config),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_accepting(https, proc, errors)
        yield
    finally:
        proc.terminate()  # nginx's fast shutdown: it closes the open streams too
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 0, errors.read_text()
    assert "[emerg]" not in errors.read_text() and "[alert]" not in errors.read_text(), errors.read_text()
