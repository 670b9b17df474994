// One task: its state, its Kill button, and its log.
//
// The log opens tail first: the last TAIL bytes of GET task/ID/log (an HTTP suffix Range),
// cut to whole lines, then follows GET task/ID/stream (server-sent events) from the byte
// offset where that read ended. Offsets are bytes of the UTF-8 log, never characters: the
// stream's event ids are the next offset, and each line element keeps the offset of its
// first byte (its anchor, and where "Load earlier" reads back from).
//
// The page holds one contiguous part of the log, at most MAX_LINES lines. While following,
// lines beyond that are dropped from the top (a click on "Load earlier" away). While the
// user reads higher up nothing moves: once the cap is reached the view stops taking new
// output ("behind") until Follow loads the end again. Appends are batched per animation
// frame, so a task writing 100,000 lines a minute costs one DOM update per frame.
import { Ansi, colour } from "./ansi.js";
import { request, canWrite, Stream, ApiError } from "./api.js";
import { $, el, ACTIVE, label, badge, duration, ago, exact, ran, taskHref, size } from "./util.js";

export const TAIL = 1024 * 1024; // bytes read at first, and per "Load earlier"
export const MAX_LINES = 10000; // line elements in the page at most
const NEWLINE = 10;

/** Bytes of `text` in UTF-8, without encoding it (the stream's text is valid UTF-8). */
export function utf8Length(text) {
  let bytes = 0;
  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i);
    if (code < 0x80) bytes += 1;
    else if (code < 0x800) bytes += 2;
    else if (code >= 0xd800 && code <= 0xdbff) {
      bytes += 4; // a surrogate pair: one 4-byte character
      i++;
    } else bytes += 3;
  }
  return bytes;
}

/**
 * Whole lines of `bytes`, which start at byte `start` of the log: [{at, text}], and `end`,
 * the offset after the last byte used. Unless `aligned` (it starts a line), the part before
 * the first newline is dropped (a line cut by the range). With `whole`, a last unfinished
 * line is left out (the stream sends it). Cut at newlines, the bytes never split a
 * character, so one decode() is right; a line longer than the range is taken from its
 * first whole character.
 */
export function splitLines(bytes, start, aligned, whole) {
  let from = 0;
  if (!aligned) {
    const newline = bytes.indexOf(NEWLINE);
    if (newline >= 0) from = newline + 1;
    else while (from < bytes.length && (bytes[from] & 0xc0) === 0x80) from++;
  }
  let stop = bytes.length;
  if (whole) stop = Math.max(from, bytes.lastIndexOf(NEWLINE) + 1);
  const lines = [];
  const text = new TextDecoder().decode(bytes.subarray(from, stop));
  const pieces = text.split("\n");
  if (pieces[pieces.length - 1] === "") pieces.pop(); // after the last newline: nothing
  let at = start + from;
  let index = from;
  for (const piece of pieces) {
    lines.push({ at, text: piece });
    const newline = bytes.indexOf(NEWLINE, index);
    index = newline < 0 || newline >= stop ? stop : newline + 1;
    at = start + index;
  }
  return { lines, end: start + stop };
}

const escapeAttribute = (s) => s.replace(/&/g, "&amp;").replace(/"/g, "&quot;");

export class TaskView {
  constructor() {
    this.section = $("task");
    this.log = $("t-log");
    this.generation = 0; // bumped at each show(): answers for a task no longer shown are dropped
    this.task = null;
    this.stream = null;
    this.frame = null;
    $("t-kill").addEventListener("click", () => this.kill());
    $("t-follow").addEventListener("click", () => this.follow());
    $("t-earlier").addEventListener("click", () => this.loadEarlier());
    $("t-search").addEventListener("input", () => this.search(0));
    $("t-search").addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        this.search(event.shiftKey ? -1 : 1);
      }
    });
    // Scrolling up stops following; back at the end, it follows again. A wheel turn up is
    // taken at once: a frame's append must not pull the user back down meanwhile.
    this.log.addEventListener("scroll", () => this.scrolled());
    this.log.addEventListener("wheel", (event) => {
      if (event.deltaY < 0 && this.following) this.setFollowing(false);
    });
    this.log.addEventListener("keydown", (event) => {
      if (["ArrowUp", "PageUp", "Home"].includes(event.key) && this.following) this.setFollowing(false);
    });
  }

  get id() {
    return this.task ? this.task.id : null;
  }

  /** Open task `id` (with `known`, its summary from the list), at byte `at` when a line link says so. */
  async show(id, at = null, known = null) {
    if (this.task && this.task.id === id && at === null) return;
    this.close();
    const generation = ++this.generation;
    this.task = known || { id, app: "", env: "", action: "", status: "", createdAt: null };
    this.target = at;
    $("placeholder").hidden = true;
    this.section.hidden = false;
    this.clearLog();
    $("t-result").replaceChildren();
    $("t-search").value = "";
    $("t-hits").textContent = "";
    $("t-raw").href = `task/${id}/log`;
    $("t-download").href = `task/${id}/log`;
    $("t-download").setAttribute("download", `task-${id}.log`);
    this.render();
    try {
      await this.loadTail(generation, at);
    } catch (err) {
      if (generation === this.generation) this.note(err.message);
      return;
    }
    if (generation === this.generation) this.openStream();
  }

  close() {
    this.generation++;
    if (this.stream) this.stream.stop();
    this.stream = null;
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = null;
    this.task = null;
  }

  hide() {
    this.close();
    this.section.hidden = true;
    $("placeholder").hidden = false;
  }

  clearLog() {
    this.log.replaceChildren();
    this.first = 0; // offset of the first line in the page
    this.end = 0; // offset after the last byte in the page
    this.next = 0; // offset the stream goes on from (ahead of `end` by what waits for a frame)
    this.firstLine = null; // number of the first line, once known (the log read from its start)
    this.open = null; // the last line element while its line is unfinished
    this.queue = [];
    this.skipped = 0;
    this.ansi = new Ansi();
    this.behind = false;
    this.hits = [];
    this.hit = -1;
    this.setFollowing(true);
    this.note(null);
    this.numbering();
  }

  // --- reading ----------------------------------------------------------------------------

  /** GET task/ID/log with a Range: {start, bytes}; an empty log answers 416 or an empty 200. */
  async readRange(range) {
    const response = await fetch(`task/${this.task.id}/log`, { headers: { Range: `bytes=${range}` } });
    if (response.status === 416) return { start: 0, bytes: new Uint8Array(0) };
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        message = (await response.json()).error.message;
      } catch {
        // not the JSON envelope
      }
      throw new ApiError(response.status, message);
    }
    const bytes = new Uint8Array(await response.arrayBuffer());
    const found = /^bytes (\d+)-/.exec(response.headers.get("Content-Range") || "");
    return { start: response.status === 206 && found ? Number(found[1]) : 0, bytes };
  }

  async loadTail(generation, at) {
    // A line link further back than the tail reads from a little before its line instead.
    const range = at === null ? `-${TAIL}` : `${Math.max(0, at - 64 * 1024)}-${Math.max(0, at - 64 * 1024) + TAIL - 1}`;
    const { start, bytes } = await this.readRange(range);
    if (generation !== this.generation) return;
    const { lines, end } = splitLines(bytes, start, start === 0, true);
    this.first = lines.length ? lines[0].at : end;
    this.end = this.next = end;
    if (start === 0) this.firstLine = 1;
    // Only the last MAX_LINES lines get elements; the others are a "Load earlier" away.
    const shown = lines.slice(-MAX_LINES);
    if (this.firstLine !== null) this.firstLine += lines.length - shown.length;
    if (shown.length) this.first = shown[0].at;
    this.log.append(this.build(shown, this.ansi));
    this.numbering();
    if (at !== null) this.goTo(at);
    else this.toEnd();
    this.earlierButton();
  }

  /** A fragment of line elements; `lines` are {at, text} (or {at, html} already converted). */
  build(lines, ansi) {
    const prefix = escapeAttribute(taskHref(this.task.id));
    const parts = lines.map(
      ({ at, text, html }) =>
        // tabindex -1: ten thousand links would make the page's tab order useless.
        `<div class="line" data-at="${at}"><a class="ln" href="${prefix}&amp;at=${at}" tabindex="-1" title="link to this line"></a>` +
        `<span class="t">${html !== undefined ? html : ansi.ansi_to_html(text)}</span></div>`,
    );
    const template = document.createElement("template");
    template.innerHTML = parts.join(""); // ansi_up escaped the text; offsets are numbers
    colour(template.content);
    return template.content;
  }

  openStream() {
    if (this.behind) return;
    const id = this.task.id;
    // Also for an ended task: the stream sends what is left after the tail, then `end`.
    this.stream = new Stream(
      () => `task/${id}/stream?offset=${this.next}`,
      {
        state: (summary) => this.update(summary),
        output: (data, event) => this.received(data, event),
        end: (summary) => {
          this.update(summary);
          this.stream.stop();
        },
        gone: (data) => {
          this.note(data.message);
          this.stream.stop();
        },
        unauthorized: (data) => {
          this.note(data.message);
          this.stream.stop();
        },
      },
      {
        onError: () => this.note("the output stream was cut: trying again"),
        // Back in a visible tab: catch up from the offset, or, if more than a tail was
        // written meanwhile and the view follows, load the end again.
        onShow: async () => {
          if (!this.following) return true;
          const response = await fetch(`task/${id}/log`, { method: "HEAD" });
          const length = Number(response.headers.get("Content-Length") || 0);
          if (response.ok && length - this.next > TAIL) {
            this.reload();
            return false;
          }
          return true;
        },
      },
    );
  }

  received(data, event) {
    if (data.offset !== this.next) {
      this.reload(); // not where this view stands: read the end again rather than guess
      return;
    }
    this.note(null);
    this.next = Number(event.lastEventId);
    if (this.behind) return;
    this.queue.push(data.output);
    if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
  }

  /** Add what the stream sent since the last frame. */
  flush() {
    this.frame = null;
    if (!this.queue.length || !this.task) return;
    const text = this.queue.join("");
    this.queue = [];
    const pieces = text.split("\n");
    const finished = pieces[pieces.length - 1] === ""; // the text ended with a newline
    if (finished) pieces.pop();
    const newLines = pieces.length - (this.open ? 1 : 0);
    if (!this.following && this.log.childElementCount + newLines > MAX_LINES) {
      this.goBehind();
      return;
    }
    // Lines that would be dropped at once are counted, not rendered (their colours too).
    const keepFrom = Math.max(0, pieces.length - MAX_LINES - 1);
    let at = this.end;
    const lines = [];
    let skipped = 0;
    pieces.forEach((piece, index) => {
      const bytes = utf8Length(piece);
      if (index === 0 && this.open) {
        this.open.lastElementChild.insertAdjacentHTML("beforeend", this.ansi.ansi_to_html(piece));
        colour(this.open);
      } else if (index < keepFrom) {
        skipped++;
      } else {
        lines.push({ at, html: this.ansi.ansi_to_html(piece) });
      }
      at += bytes + (index < pieces.length - 1 || finished ? 1 : 0);
    });
    this.end = at;
    if (lines.length) this.log.append(this.build(lines, this.ansi));
    this.open = finished ? null : this.log.lastElementChild;
    this.trim(skipped);
    if (this.following) this.toEnd();
    if (this.hits.length) this.search(0);
  }

  /** Drop lines from the top beyond MAX_LINES (plus `skipped` that never had an element). */
  trim(skipped) {
    const excess = this.log.childElementCount - MAX_LINES;
    if (excess > 0) {
      const range = document.createRange();
      range.setStartBefore(this.log.firstElementChild);
      range.setEndAfter(this.log.children[excess - 1]);
      range.deleteContents();
    }
    const dropped = Math.max(0, excess) + skipped;
    if (dropped && this.firstLine !== null) this.firstLine += dropped;
    if (this.log.firstElementChild) this.first = Number(this.log.firstElementChild.dataset.at);
    else this.first = this.end;
    if (dropped) {
      this.numbering();
      this.earlierButton();
    }
  }

  async loadEarlier() {
    if (this.first <= 0) return;
    const generation = this.generation;
    const from = Math.max(0, this.first - TAIL);
    let part;
    try {
      part = await this.readRange(`${from}-${this.first - 1}`);
    } catch (err) {
      this.note(err.message);
      return;
    }
    if (generation !== this.generation) return;
    const { lines } = splitLines(part.bytes, part.start, part.start === 0, false);
    const shown = lines.slice(-MAX_LINES);
    if (!shown.length) return;
    const known = this.firstLine;
    // Colours set before this part are unknown: a fresh converter.
    const fragment = this.build(shown, new Ansi());
    const height = this.log.scrollHeight;
    this.setFollowing(false);
    this.log.prepend(fragment);
    this.log.scrollTop += this.log.scrollHeight - height; // what was on screen stays there
    this.first = shown[0].at;
    if (part.start === 0 && shown.length === lines.length) this.firstLine = 1;
    else this.firstLine = known === null ? null : known - shown.length;
    // Over the cap: the end goes (Follow reads it again).
    const excess = this.log.childElementCount - MAX_LINES;
    if (excess > 0) {
      const range = document.createRange();
      const cut = this.log.children[this.log.childElementCount - excess];
      this.end = Number(cut.dataset.at);
      range.setStartBefore(cut);
      range.setEndAfter(this.log.lastElementChild);
      range.deleteContents();
      this.open = null;
      this.goBehind();
    }
    this.numbering();
    this.earlierButton();
    if ($("t-search").value) this.search(0);
  }

  /** Stop taking output: the view is full and the user reads elsewhere. */
  goBehind() {
    this.behind = true;
    this.queue = [];
    if (this.stream) this.stream.stop();
    this.stream = null;
    this.note("Later output is not shown here: Follow shows the end (or use the raw log).");
  }

  reload() {
    const at = null;
    const id = this.task.id;
    const task = this.task;
    this.task = null; // so that show() does not take it for the task already shown
    this.show(id, at, task);
  }

  // --- following and finding ----------------------------------------------------------------

  setFollowing(on) {
    this.following = on;
    const button = $("t-follow");
    button.setAttribute("aria-pressed", String(on));
    button.classList.toggle("on", on);
    button.textContent = on ? "Following" : "Follow";
  }

  follow() {
    if (this.behind) {
      this.reload();
      return;
    }
    this.setFollowing(true);
    this.toEnd();
  }

  scrolled() {
    if (this.programmatic) {
      this.programmatic = false;
      return;
    }
    const atEnd = this.log.scrollTop + this.log.clientHeight >= this.log.scrollHeight - 4;
    if (!atEnd && this.following) this.setFollowing(false);
    else if (atEnd && !this.following && !this.behind && this.log.scrollTop > 0) this.setFollowing(true);
  }

  toEnd() {
    const bottom = this.log.scrollHeight - this.log.clientHeight;
    if (Math.abs(this.log.scrollTop - bottom) > 1) {
      this.programmatic = true; // the scroll event this causes is not the user's
      this.log.scrollTop = bottom;
    }
  }

  /** Scroll to the line holding byte `at`, and mark it. */
  goTo(at) {
    let target = null;
    for (const line of this.log.children) {
      if (Number(line.dataset.at) > at) break;
      target = line;
    }
    if (!target) return;
    this.setFollowing(false);
    for (const old of this.log.querySelectorAll(".target")) old.classList.remove("target");
    target.classList.add("target");
    target.scrollIntoView({ block: "center" });
  }

  /** Find the search box's text in the loaded lines; `step` 1/-1 moves to the next/previous hit. */
  search(step) {
    const query = $("t-search").value.toLowerCase();
    for (const line of this.hits) line.classList.remove("hit", "current");
    this.hits = [];
    if (!query) {
      $("t-hits").textContent = "";
      return;
    }
    for (const line of this.log.children) {
      if (line.lastElementChild.textContent.toLowerCase().includes(query)) {
        line.classList.add("hit");
        this.hits.push(line);
      }
    }
    if (!this.hits.length) {
      this.hit = -1;
      $("t-hits").textContent = "no match in the loaded lines";
      return;
    }
    if (step === 0 && this.hit < 0) step = 1;
    this.hit = (Math.max(this.hit, -1) + step + this.hits.length) % this.hits.length;
    if (step === 0) this.hit = Math.min(this.hit, this.hits.length - 1);
    const current = this.hits[this.hit];
    current.classList.add("current");
    $("t-hits").textContent = `${this.hit + 1} of ${this.hits.length}`;
    if (step !== 0 || !this.following) {
      this.setFollowing(false);
      current.scrollIntoView({ block: "center" });
    }
  }

  numbering() {
    const known = this.firstLine !== null;
    this.log.classList.toggle("numbered", known);
    // Through the CSSOM: the policy forbids style attributes, not this.
    this.log.style.counterReset = known ? `line ${this.firstLine - 1}` : "";
  }

  earlierButton() {
    const button = $("t-earlier");
    button.hidden = this.first <= 0;
    button.textContent = `Load earlier (${size(this.first)} before)`;
  }

  note(message) {
    const note = $("t-note");
    note.hidden = !message;
    note.textContent = message || "";
  }

  // --- the task's state -----------------------------------------------------------------------

  /** A newer summary of the shown task (from its stream or the list's events). */
  update(task) {
    if (!this.task || task.id !== this.task.id) return;
    this.task = { ...this.task, ...task };
    this.render();
  }

  render() {
    const task = this.task;
    $("t-title").textContent = task.app ? label(task) : `#${task.id}`;
    $("t-status").replaceWith(Object.assign(badge(task.status || "…"), { id: "t-status" }));
    $("t-kill").hidden = !(canWrite() && ACTIVE.has(task.status));
    const rows = [];
    const item = (name, ...value) => rows.push(el("dt", {}, name), el("dd", {}, ...value));
    if (task.createdAt) {
      item("Created", el("time", { datetime: task.createdAt, title: exact(task.createdAt) }, ago(task.createdAt)),
        task.createdBy ? ` by ${task.createdBy}` : "");
    }
    if (task.startedAt) item("Started", el("time", { datetime: task.startedAt, title: exact(task.startedAt) }, ago(task.startedAt)));
    const seconds = ran(task);
    if (seconds !== null) item(task.finishedAt ? "Ran" : "Running for", el("span", { className: "ticking" }, duration(seconds)));
    if (task.exitCode !== null && task.exitCode !== undefined) item("Exit code", String(task.exitCode));
    if (task.signal) item("Signal", task.signal);
    if (task.killedBy) item("Killed by", task.killedBy + (task.killSignal ? ` (${task.killSignal})` : ""));
    if (task.confCommit) item("Configuration", el("code", { title: task.confCommit }, task.confCommit.slice(0, 12)));
    if (task.taskVariables && task.taskVariables.length) item("Variables", task.taskVariables.join(", "));
    if (task.outputSize !== undefined) item("Output", size(task.outputSize));
    $("t-meta").replaceChildren(...rows);
    this.queued();
  }

  /** A queued task says what it waits for: the task that holds its app and environment. */
  async queued() {
    const line = $("t-queued");
    const task = this.task;
    if (task.status !== "queued") {
      line.hidden = true;
      return;
    }
    line.hidden = false;
    if (line.dataset.task === String(task.id) && line.textContent) return;
    line.dataset.task = String(task.id);
    line.textContent = `Queued: waits for the running task of ${task.app}/${task.env}.`;
    try {
      const query = new URLSearchParams({ app: task.app, env: task.env, output: "false", pageSize: "20" });
      const answer = await request(`tasks?${query}`);
      const holder = answer.ids.map((id) => answer.tasks[id]).find((t) => t.status === "running" || t.status === "created");
      if (holder && this.task && this.task.id === task.id) {
        line.replaceChildren(
          "Queued: waits for ",
          el("a", { href: taskHref(holder.id) }, label(holder)),
          holder.createdBy ? `, started by ${holder.createdBy}.` : ".",
        );
      }
    } catch {
      // the plain sentence stays
    }
  }

  /** Once a second: the running time. */
  tick() {
    if (!this.task || !this.task.startedAt || this.task.finishedAt) return;
    const ticking = this.section.querySelector(".ticking");
    if (ticking) ticking.textContent = duration(ran(this.task));
  }

  async kill() {
    const task = this.task;
    if (!window.confirm(`Kill task ${label(task)}?`)) return;
    const button = $("t-kill");
    const result = $("t-result");
    button.disabled = true;
    result.className = "result";
    result.textContent = `Killing ${label(task)}…`;
    try {
      const answer = await request(`task/${task.id}/kill`, { method: "POST" });
      this.update(answer);
      const how = answer.killSignal ? ` (${answer.killSignal})` : "";
      result.textContent = ACTIVE.has(answer.status)
        ? `Kill sent to ${label(task)}: it has not ended yet.`
        : `${label(task)} was killed${how}: ${answer.status}.`;
    } catch (err) {
      result.className = "result error";
      result.textContent = `Kill failed: ${err.message}`;
    } finally {
      button.disabled = false;
    }
  }
}
