"""The deploy console in a real headless Chromium (Debian's), against real pulsar-rest
processes: sign-in through the fake GitHub, roles, deploy, kill, tail-first big logs, ANSI
colours and HTML as text, bounded line counts, following, filters, a busy environment, and
the Content-Security-Policy (no violation on any page of any test).

One browser and one server for the module (each test deploys an app of its
own, see APPS); a screenshot of each test is left in tests/artifacts/ (not committed)."""

from __future__ import annotations

import contextlib
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import psutil
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Page,
    Response,
    ViewportSize,
    expect,
    sync_playwright,
)

from pulsar_rest.web.console import CONTENT_SECURITY_POLICY
from tests.browser import ALICE_TOKEN, ARTIFACTS, BOB_TOKEN, Server, ThreadedGitHub, chromium
from tests.conftest import alive
from tests.serving import OPENER, TIMEOUT

VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
MAX_LINES = 10000  # taskview.js


# --- the browser, the servers, the pages ------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, shared by every test here; its processes (and playwright's
    driver) are left out of the check for processes left behind, and gone at the module's
    end, before other modules check theirs."""
    path = chromium()
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    with sync_playwright() as driver:
        BROWSER_PIDS.update(p.pid for p in me.children() if p.pid not in before)
        browser = driver.chromium.launch(executable_path=path)
        yield browser
        browser.close()
    # Chromium's crash handlers leave its tree (a double fork): with this process the
    # subreaper of the services' tasks, they are its children, and go with the browser.
    for proc in me.children():
        with contextlib.suppress(psutil.Error):
            if _chromiums(proc):
                proc.kill()
                proc.wait(TIMEOUT)


def _chromiums(proc: psutil.Process) -> bool:
    """One of chromium's own programs (its crash handler, say: /usr/lib/chromium/...)."""
    return Path(proc.exe()).parent.name == "chromium"


BROWSER_PIDS: set[int] = set()


@pytest.fixture(scope="module")
def github() -> Iterator[ThreadedGitHub]:
    threaded = ThreadedGitHub()
    threaded.fake.add_user("alice", ALICE_TOKEN)
    threaded.fake.add_user("bob", BOB_TOKEN)
    threaded.fake.add_member("acme", "bob")
    yield threaded
    threaded.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, github: ThreadedGitHub) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("console"), github.fake)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """conftest's check, less the browser's processes and the servers still serving (their
    tasks are checked: a test ends the tasks it started)."""
    yield
    left = []
    for proc in psutil.Process().children(recursive=True):
        try:
            mine = {proc.pid} | {parent.pid for parent in proc.parents()}
            browsers = _chromiums(proc)
        except psutil.Error:
            continue
        if proc.pid in Server.running or mine & BROWSER_PIDS or browsers or not alive(proc.pid):
            continue
        left.append(proc)
    for proc in left:
        proc.kill()
    assert not left, f"processes left behind: {left}"


class Console:
    """A page of the console and what it said: console errors and CSP violations."""

    def __init__(self, context: BrowserContext, name: str) -> None:
        self.context = context
        self.name = name
        self.messages: list[str] = []
        # Reported by the page itself too (not only as console text): a violation event.
        context.add_init_script(
            "document.addEventListener('securitypolicyviolation', e => "
            "console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI));"
        )
        self.page = context.new_page()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.messages.append(f"page error: {exc}"))

    def _console(self, message: ConsoleMessage) -> None:
        text = message.text
        if message.type == "error" and "favicon.ico" not in text:
            self.messages.append(text)

    def close(self) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        try:
            self.page.screenshot(path=ARTIFACTS / f"{self.name}.png")
        finally:
            self.context.close()
        csp = [m for m in self.messages if "Content Security Policy" in m or "CSP violation" in m]
        assert not csp, csp


def _name(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^\w.-]+", "_", request.node.name)


@pytest.fixture(scope="module")
def sessions(browser: Browser, server: Server, github: ThreadedGitHub) -> dict[str, Any]:
    """Signed-in browser states, one per login, made once (through the page's own link)."""
    states: dict[str, Any] = {}
    for login in ("alice", "bob"):
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        github.fake.approve_as = login
        page.goto(server.url)
        page.get_by_role("link", name="Sign in with GitHub").click()
        expect(page.locator("#who .login")).to_have_text(login)
        states[login] = context.storage_state()
        context.close()
    return states


def open_console(
    browser: Browser, request: pytest.FixtureRequest, state: Any = None, **options: Any
) -> Iterator[Console]:
    options = {"viewport": VIEWPORT, **options}
    console = Console(browser.new_context(storage_state=state, **options), _name(request))
    yield console
    console.close()


@pytest.fixture
def alice(browser: Browser, sessions: dict[str, Any], request: pytest.FixtureRequest) -> Iterator[Page]:
    for console in open_console(browser, request, sessions["alice"]):
        yield console.page


@pytest.fixture
def bob(browser: Browser, sessions: dict[str, Any], request: pytest.FixtureRequest) -> Iterator[Page]:
    for console in open_console(browser, request, sessions["bob"]):
        yield console.page


def log_lines(page: Page) -> int:
    count: int = page.locator("#t-log .line").count()
    return count


def line(page: Page, text: str) -> Any:
    return page.locator("#t-log .line", has_text=text)


# --- sign-in and roles ------------------------------------------------------------------------


def test_sign_in_through_github_shows_login_and_role(
    browser: Browser, server: Server, github: ThreadedGitHub, request: pytest.FixtureRequest
) -> None:
    for console in open_console(browser, request):
        page = console.page
        page.goto(server.url + "#app=web")
        expect(page.get_by_role("button", name="Deploy")).to_be_hidden()
        github.fake.approve_as = "alice"
        page.get_by_role("link", name="Sign in with GitHub").click()
        expect(page.locator("#who .login")).to_have_text("alice")
        expect(page.locator("#who .role")).to_have_text("write")
        assert page.url.endswith("#app=web")  # back where the sign-in started
        expect(page.get_by_role("button", name="Deploy")).to_be_visible()
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("link", name="Sign in with GitHub")).to_be_visible()
        expect(page.get_by_role("button", name="Deploy")).to_be_hidden()


def test_a_read_only_user_sees_no_deploy_and_no_kill(server: Server, bob: Page) -> None:
    task = server.create("readonly", "hang")
    try:
        bob.goto(server.url + f"#task={task['id']}")
        expect(bob.locator("#who .role")).to_have_text("read")
        expect(line(bob, "hanging")).to_be_visible()
        expect(bob.locator("#t-status")).to_have_text("running")
        expect(bob.get_by_role("button", name="Kill")).to_have_count(0)
        expect(bob.get_by_role("button", name="Deploy")).to_have_count(0)
        expect(bob.locator("#deploy-box")).to_be_hidden()
    finally:
        server.api("POST", f"task/{task['id']}/kill")


# --- deploying, watching, killing -------------------------------------------------------------


def test_deploy_from_the_form_and_watch_the_lines_arrive(server: Server, alice: Page) -> None:
    alice.goto(server.url)
    alice.get_by_label("App", exact=True).select_option("web")
    alice.get_by_label("Environment", exact=True).select_option("staging")
    alice.get_by_label("Task", exact=True).fill("gate[go]")
    alice.get_by_role("button", name="Add variable").click()
    alice.get_by_label("Variable 1 name").fill("RELEASE")
    alice.get_by_label("Variable 1 value").fill("<b>v1</b>")
    alice.get_by_role("button", name="Deploy").click()
    expect(line(alice, "waiting for go")).to_be_visible()
    expect(alice.locator("#t-title")).to_contain_text("web/staging gate[go]")
    expect(alice.locator("#t-meta")).to_contain_text("RELEASE")
    task_id = int(alice.locator("#t-title").inner_text().split()[0].lstrip("#"))
    expect(alice.locator(f"#row-{task_id} .badge")).to_have_text("running")  # the list, live
    server.release("go")
    expect(line(alice, "passed go")).to_be_visible()
    expect(line(alice, "Executed task gate[go] for web on staging!")).to_be_visible()
    expect(alice.locator("#t-status")).to_have_text("finished")
    expect(alice.locator(f"#row-{task_id} .badge")).to_have_text("finished")
    expect(alice.locator("#t-meta")).to_contain_text("Exit code")
    # The task just run is offered again for that app, after deploy; then the tasks the
    # configuration repository describes.
    options = alice.locator("#f-tasks option")
    expect(options.first).to_have_attribute("value", "deploy")
    expect(alice.locator('#f-tasks option[value="gate[go]"]')).to_have_count(1)
    expect(options.last).to_have_attribute("value", "ops:restart")


def test_kill_from_the_button(server: Server, alice: Page) -> None:
    task = server.create("kill", "hang")
    alice.goto(server.url + f"#task={task['id']}")
    expect(line(alice, "hanging")).to_be_visible()
    asked: list[str] = []

    def confirm(dialog: Dialog) -> None:
        asked.append(dialog.message)
        dialog.accept()

    alice.once("dialog", confirm)
    alice.get_by_role("button", name="Kill").click()
    expect(alice.locator("#t-result")).to_contain_text("was killed")
    expect(alice.locator("#t-status")).to_have_text("killed")
    expect(alice.locator("#t-meta")).to_contain_text("Killed by")
    expect(alice.locator("#t-meta")).to_contain_text("alice")
    expect(alice.get_by_role("button", name="Kill")).to_be_hidden()
    assert asked == [f"Kill task #{task['id']} kill/prod hang?"]


# Counts the page's EventSources that are not closed (the page's own streams).
_COUNT_STREAMS = """
const Real = window.EventSource;
const sources = [];
window.EventSource = class extends Real {
  constructor(...args) { super(...args); sources.push(this); }
};
window.openStreams = () => sources.filter((s) => s.readyState !== Real.CLOSED).length;
"""
_SET_HIDDEN = """hidden => {
  Object.defineProperty(document, "hidden", { configurable: true, get: () => hidden });
  Object.defineProperty(document, "visibilityState", {
    configurable: true, get: () => (hidden ? "hidden" : "visible"),
  });
  document.dispatchEvent(new Event("visibilitychange"));
}"""


def test_a_hidden_tab_streams_nothing_and_catches_up_when_shown(server: Server, alice: Page) -> None:
    task = server.create("hidden", "gate[more]")
    alice.add_init_script(_COUNT_STREAMS)
    alice.goto(server.url + f"#task={task['id']}")
    expect(line(alice, "waiting for more")).to_be_visible()
    alice.wait_for_function("window.openStreams() === 2")  # the list's and the task's
    alice.evaluate(_SET_HIDDEN, True)
    alice.wait_for_function("window.openStreams() === 0")
    server.release("more")
    assert server.ended(task["id"])["status"] == "finished"
    expect(line(alice, "passed more")).to_have_count(0)  # nothing came while hidden
    alice.evaluate(_SET_HIDDEN, False)
    expect(line(alice, "passed more")).to_be_visible()  # caught up from its offset
    expect(alice.locator("#t-status")).to_have_text("finished")
    expect(alice.locator(f"#row-{task['id']} .badge")).to_have_text("finished")


def test_busy_names_the_holder_offers_to_queue_and_goes_away(server: Server, alice: Page) -> None:
    holder = server.create("busy", "hang")
    alice.goto(server.url)
    alice.get_by_label("App", exact=True).select_option("busy")
    alice.get_by_role("button", name="Deploy").click()
    result = alice.locator("#f-result")
    busy = f"busy/prod is busy with task #{holder['id']} busy/prod hang, started by alice"
    expect(result).to_contain_text(busy)
    alice.get_by_role("button", name="Queue after it").click()
    expect(alice.locator("#t-status")).to_have_text("queued")
    expect(alice.locator("#t-queued")).to_contain_text(f"waits for #{holder['id']} busy/prod hang")
    alice.once("dialog", lambda dialog: dialog.accept())
    alice.get_by_role("button", name="Kill").click()  # a queued task can be killed
    expect(alice.locator("#t-status")).to_have_text("killed")
    alice.get_by_role("button", name="Deploy").click()
    expect(result).to_contain_text("is busy with task")
    server.api("POST", f"task/{holder['id']}/kill")
    expect(result).not_to_contain_text("is busy with")  # its cause has gone: so has the message
    expect(result).to_contain_text("the environment is free")


# --- big logs ---------------------------------------------------------------------------------


def test_a_50_mb_log_opens_at_its_end_and_loads_earlier(server: Server, alice: Page) -> None:
    task = server.ended(server.create("big", "biglog[50]")["id"])
    assert task["outputSize"] > 50 * 1024 * 1024
    ranges: list[str] = []

    def answered(response: Response) -> None:
        if "/log" in response.url:
            ranges.append(response.headers.get("content-range", ""))

    alice.on("response", answered)
    started = time.monotonic()
    alice.goto(server.url + f"#task={task['id']}")
    expect(line(alice, "the last line")).to_be_visible(timeout=10_000)
    took = time.monotonic() - started
    print(f"a 50 MB log showed its last line {took:.2f} s after the page was asked for")
    # Only the tail was read: the last MiB, by a suffix range.
    first = ranges[0]
    start, _, total = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", first).groups()  # type: ignore[union-attr]
    assert int(total) == task["outputSize"] and int(total) - int(start) == 1024 * 1024
    assert log_lines(alice) <= MAX_LINES
    top = alice.locator("#t-log .line").first
    earliest, at = top.inner_text(), int(top.get_attribute("data-at") or 0)
    alice.get_by_role("button", name=re.compile("Load earlier")).click()
    expect(alice.locator("#t-log .line").first).not_to_have_text(earliest)
    assert log_lines(alice) <= MAX_LINES
    assert len(ranges) == 2 and ranges[1] == f"bytes {at - 1024 * 1024}-{at - 1}/{total}"
    follow = alice.get_by_role("button", name="Follow", exact=True)
    expect(follow).to_be_visible()  # off the end now
    follow.click()
    expect(line(alice, "the last line")).to_be_visible()


def test_200000_lines_keep_the_page_bounded_and_searchable(server: Server, alice: Page) -> None:
    task = server.create("flood", "flood[flood,200000]")
    alice.goto(server.url + f"#task={task['id']}")
    expect(alice.locator("#t-status")).to_have_text("running")
    server.release("flood")
    expect(line(alice, "flood done")).to_be_visible(timeout=20_000)
    expect(alice.locator("#t-status")).to_have_text("finished")
    assert log_lines(alice) == MAX_LINES  # the last 10,000 of 200,001
    expect(alice.locator("#t-log .line").first).to_contain_text("flood 190001")
    alice.get_by_label("Search").fill("flood 199990")
    expect(alice.locator("#t-hits")).to_have_text("1 of 1")
    expect(alice.locator("#t-log .line.current")).to_be_in_viewport()
    before = sum(len(f"flood {n}\n") for n in range(190001)) / 1024 / 1024
    expect(alice.get_by_role("button", name=f"Load earlier ({before:.1f} MiB before)")).to_be_visible()


def test_scrolling_up_stops_following_and_follow_resumes(server: Server, alice: Page) -> None:
    task = server.create("follow", "flood[one,3000,two,500]")
    alice.goto(server.url + f"#task={task['id']}")
    expect(alice.locator("#t-status")).to_have_text("running")
    server.release("one")
    expect(line(alice, "flood 2999")).to_be_visible()
    expect(alice.get_by_role("button", name="Following")).to_have_attribute("aria-pressed", "true")
    log = alice.locator("#t-log")
    log.hover()
    alice.mouse.wheel(0, -2000)
    expect(alice.get_by_role("button", name="Follow", exact=True)).to_have_attribute("aria-pressed", "false")
    top = log.evaluate("log => log.scrollTop")
    server.release("two")
    expect(line(alice, "flood done")).to_be_attached()
    assert log.evaluate("log => log.scrollTop") == top  # new lines did not move the view
    expect(line(alice, "flood done")).not_to_be_in_viewport()
    alice.get_by_role("button", name="Follow", exact=True).click()
    expect(line(alice, "flood done")).to_be_in_viewport()


def test_line_links_open_the_task_at_that_line(server: Server, alice: Page, browser: Browser) -> None:
    task = server.ended(server.create("lines", "lines[3000]")["id"])
    alice.goto(server.url + f"#task={task['id']}")
    expect(line(alice, "Executed task")).to_be_visible()
    link = line(alice, "line 1234").first.locator("a.ln")
    expect(link).to_have_text("")  # the number is a CSS counter, not text copied with the log
    expect(alice.locator("#t-log")).to_have_class(re.compile("numbered"))  # from line 1
    assert alice.locator("#t-log").evaluate("log => log.style.counterReset") == "line 0"
    href = link.get_attribute("href")
    assert href is not None and re.fullmatch(rf"#task={task['id']}&at=\d+", href)
    alice.goto(server.url + "#")  # away, then to the link as someone it was sent to would
    expect(alice.locator("#placeholder")).to_be_visible()
    alice.goto(server.url + href)
    target = alice.locator("#t-log .line.target")
    expect(target).to_have_text(re.compile(r"^line 1234$"))
    expect(target).to_be_in_viewport()


# --- what is shown as text, and in colour -----------------------------------------------------


def test_html_stays_text_and_ansi_colours_render_across_chunks(server: Server, alice: Page) -> None:
    task = server.create("colours", "colours[cut]")
    alice.goto(server.url + f"#task={task['id']}")
    expect(line(alice, "plain bold truecolor 256")).to_be_visible()
    server.release("cut")
    red = alice.locator("#t-log span.ansi-red-fg", has_text="red after the cut")
    expect(red).to_be_visible()
    expect(line(alice, "before the colour red after the cut and plain")).to_be_visible()
    # Rendered, not only classed: the computed colours (style-src 'self' allows no inline style).
    assert red.evaluate("s => getComputedStyle(s).color") == "rgb(224, 82, 76)"
    truecolor = alice.locator("#t-log .t span", has_text="truecolor")
    assert truecolor.evaluate("s => getComputedStyle(s).color") == "rgb(255, 0, 128)"
    assert alice.locator("#t-log .t span", has_text="256").evaluate("s => getComputedStyle(s).color") == (
        "rgb(255, 135, 0)"
    )
    bold = alice.locator("#t-log .t span", has_text="bold")
    assert bold.evaluate("s => getComputedStyle(s).fontWeight") == "700"
    # The HTML in the output is text: no element made of it, no script run.
    expect(line(alice, "<img src=x onerror=document.title='pwned'><script>")).to_be_visible()
    expect(alice.locator("#t-log img, #t-log script")).to_have_count(0)
    assert alice.title() == "pulsar-rest"
    server.ended(task["id"])


def test_html_in_names_is_text(server: Server, alice: Page) -> None:
    """App, task and creator names cannot hold HTML on this server (they are checked), but
    the page does not count on it: a list answer that holds some is shown as text."""
    evil = "<img src=x onerror=document.title='pwned'>"

    def answer(route: Any) -> None:
        response = route.fetch()
        body = response.json()
        body["ids"] = [999999] + body["ids"]
        body["tasks"]["999999"] = {
            "id": 999999, "status": "failed", "app": evil, "env": "prod", "action": f"deploy{evil}",
            "createdBy": evil, "createdAt": "2024-01-01T00:00:00.000Z", "startedAt": None,
            "finishedAt": None, "exitCode": 1, "taskVariables": [evil], "outputSize": 0,
        }  # fmt: skip
        route.fulfill(response=response, json=body)

    alice.route(re.compile(r"/tasks\?.*page=1"), answer)
    alice.goto(server.url)
    row = alice.locator("#row-999999")
    expect(row).to_contain_text(f"{evil}/prod deploy{evil}")
    expect(alice.locator("#tasks img")).to_have_count(0)
    assert alice.title() == "pulsar-rest"


# --- the list ---------------------------------------------------------------------------------


def test_filters_are_in_the_url(server: Server, alice: Page) -> None:
    for app in ("api", "web"):
        server.ended(server.create(app, "ok")["id"])
    failed = server.ended(server.create("api", "fail")["id"])
    asked: list[str] = []
    alice.on("request", lambda r: asked.append(r.url) if "/tasks?" in r.url else None)
    alice.goto(server.url + "#app=api&status=failed")
    expect(alice.locator(f"#row-{failed['id']}")).to_be_visible()
    expect(alice.locator("#tasks li")).to_have_count(1)
    expect(alice.get_by_label("Filter by app")).to_have_value("api")
    assert any("app=api" in url and "status=failed" in url and "output=false" in url for url in asked)
    alice.get_by_label("Filter by status").select_option("finished")
    alice.get_by_role("button", name="Filter", exact=True).click()
    expect(alice.locator("#tasks .badge").first).to_have_text("finished")
    assert "status=finished" in alice.url and "app=api" in alice.url
    alice.get_by_role("button", name="Clear").click()
    expect(alice.locator("#tasks li").first).to_be_visible()
    assert "status=" not in alice.url


# --- the page as served -----------------------------------------------------------------------


def _get(url: str, **headers: str) -> tuple[int, Message, bytes]:
    """Status, headers (names in any case) and body."""
    try:
        with OPENER.open(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


def test_the_page_and_its_files_are_served_with_their_types_and_the_policy(server: Server) -> None:
    status, headers, body = _get(server.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert b"<script>" not in body and b"<style" not in body and b"style=" not in body  # nothing inline
    for path, kind in {
        "console.js": "text/javascript",
        "taskview.js": "text/javascript",
        "vendor/ansi_up.js": "text/javascript",
        "console.css": "text/css",
        "favicon.svg": "image/svg+xml",
        "vendor/LICENSE": "text/plain",
    }.items():
        status, headers, _ = _get(f"{server.url}_static/{path}")
        assert status == 200, path
        assert headers["Content-Type"].split(";")[0] == kind, path
        assert headers["Cache-Control"] == "no-cache" and "ETag" in headers
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    # A Range past the end is aiohttp's 416, without the file's type (there is no body).
    status, headers, _ = _get(f"{server.url}_static/console.js", Range="bytes=999999-")
    assert status == 416 and headers["Content-Type"] == "application/octet-stream"
    for missing in ("nothing.js", "../routes.py", "%2e%2e/routes.py", "index.html"):
        assert _get(f"{server.url}_static/{missing}")[0] == 404, missing
    # The API's answers carry the policy too (a log opened in a tab runs nothing).
    assert _get(server.url + "status")[1]["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


def test_without_authentication_everything_is_shown_and_typed_names_deploy(
    browser: Browser, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """No sign-in, no configuration repository (pulsar's own): App and Environment are typed.
    On a phone-sized screen, with the keyboard alone."""
    srv = Server(tmp_path / "open", conf=False)
    try:
        for console in open_console(browser, request, viewport={"width": 375, "height": 740}, has_touch=True):
            page = console.page
            page.goto(srv.url)
            expect(page.locator("#who")).to_have_text("authentication off")
            page.get_by_label("App", exact=True).fill("shop")
            page.get_by_label("Environment", exact=True).fill("prod")
            page.get_by_label("Task", exact=True).fill("ok")
            page.keyboard.press("Enter")  # the keyboard alone submits the form
            expect(line(page, "Executed task ok for shop on prod!")).to_be_visible()
            expect(page.locator("#t-status")).to_have_text("finished")
            # Nothing wider than the screen.
            assert page.evaluate("document.documentElement.scrollWidth") <= 375
    finally:
        srv.stop()


@pytest.mark.skipif("CONSOLE_SCREENSHOT" not in os.environ, reason="set CONSOLE_SCREENSHOT=PATH to make it")
def test_readme_screenshot(server: Server, alice: Page) -> None:
    """The README's picture: CONSOLE_SCREENSHOT=docs/console.png scripts/test -k screenshot."""
    for app, action in (("api", "fail"), ("lines", "lines[40]"), ("web", "ok")):
        server.ended(server.create(app, action)["id"])
    running = server.create("readonly", "hang")
    task = server.ended(server.create("web", "showcase", env="staging")["id"])
    alice.goto(server.url + f"#task={task['id']}")
    expect(line(alice, "Executed task showcase")).to_be_visible()
    alice.screenshot(path=os.environ["CONSOLE_SCREENSHOT"])
    server.api("POST", f"task/{running['id']}/kill")
