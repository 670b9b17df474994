// The task list: one page of GET tasks (filtered by app, env, status and creator, newest
// first; the history may hold 100,000 tasks and the page never loads them all), kept live
// by the /events stream. The filters and the page are in the URL's hash, so a filtered view
// can be shared; the hash is the one source of truth (see console.js).
import { request } from "./api.js";
import { $, el, badge, label, ago, exact, duration, ran, hashParams, setHash, taskHref } from "./util.js";

export const FILTERS = ["app", "env", "status", "createdBy"];
const PAGE_SIZE = 50;

export class TaskList {
  constructor() {
    this.tasks = new Map(); // id -> summary, of the tasks shown
    this.ids = []; // shown, newest first
    this.total = 0;
    this.page = 1;
    this.pages = 1;
    this.filters = {};
    this.selected = null;
    this.loading = null;
    const form = $("filters");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const changes = { page: null };
      for (const name of FILTERS) changes[name] = form.elements[name].value.trim();
      setHash(changes, true);
      window.dispatchEvent(new HashChangeEvent("hashchange"));
    });
    form.addEventListener("reset", () => {
      const changes = { page: null };
      for (const name of FILTERS) changes[name] = null;
      setHash(changes, true);
      window.dispatchEvent(new HashChangeEvent("hashchange"));
    });
    $("prev").addEventListener("click", () => this.goPage(this.page - 1));
    $("next").addEventListener("click", () => this.goPage(this.page + 1));
  }

  goPage(page) {
    setHash({ page: page > 1 ? page : null }, true);
    window.dispatchEvent(new HashChangeEvent("hashchange"));
  }

  /** The filters and page the hash says; true if they differ from those shown. */
  fromHash() {
    const params = hashParams();
    const filters = {};
    for (const name of FILTERS) if (params.get(name)) filters[name] = params.get(name);
    const page = Math.max(1, Number(params.get("page")) || 1);
    const changed = JSON.stringify(filters) !== JSON.stringify(this.filters) || page !== this.page;
    this.filters = filters;
    this.page = page;
    const form = $("filters");
    for (const name of FILTERS) form.elements[name].value = filters[name] || "";
    return changed;
  }

  async load() {
    const query = new URLSearchParams({ ...this.filters, page: this.page, pageSize: PAGE_SIZE, output: "false" });
    const loading = (this.loading = request(`tasks?${query}`));
    const answer = await loading;
    if (loading !== this.loading) return; // a newer load went out meanwhile
    this.tasks = new Map(answer.ids.map((id) => [id, answer.tasks[id]]));
    this.ids = answer.ids;
    this.total = answer.total;
    this.pages = answer.pages;
    this.render();
  }

  matches(task) {
    return FILTERS.every((name) => !this.filters[name] || this.filters[name] === (name === "status" ? task.status : task[name]));
  }

  get(id) {
    return this.tasks.get(id) || null;
  }

  /** A task from the event stream: a new one goes on top of the first page, a known one changes in place. */
  upsert(task, created) {
    if (this.tasks.has(task.id)) {
      this.tasks.set(task.id, task);
      const row = $(`row-${task.id}`);
      if (row) row.replaceWith(this.row(task));
      return;
    }
    if (!created || !this.matches(task)) return;
    this.total++;
    if (this.page !== 1) {
      this.info();
      return;
    }
    this.tasks.set(task.id, task);
    this.ids = [task.id, ...this.ids];
    if (this.ids.length > PAGE_SIZE) this.tasks.delete(this.ids.pop());
    this.render();
  }

  select(id) {
    this.selected = id;
    for (const row of $("tasks").querySelectorAll("[aria-current]")) row.removeAttribute("aria-current");
    const row = $(`row-${id}`);
    if (row) row.firstElementChild.setAttribute("aria-current", "true");
  }

  render() {
    const list = $("tasks");
    list.replaceChildren(...this.ids.map((id) => this.row(this.tasks.get(id))));
    if (!this.ids.length) list.append(el("li", { className: "empty" }, "No task matches."));
    this.info();
  }

  info() {
    $("total").textContent = `(${this.total})`;
    this.pages = Math.max(1, Math.ceil(this.total / PAGE_SIZE));
    $("pageinfo").textContent = `page ${this.page} of ${this.pages}`;
    $("prev").disabled = this.page <= 1;
    $("next").disabled = this.page >= this.pages;
  }

  row(task) {
    // Text only: an app, a task or a creator named like HTML is shown as typed.
    const seconds = ran(task);
    const link = el(
      "a",
      { href: taskHref(task.id), className: "row", "aria-current": task.id === this.selected ? "true" : null },
      el("span", { className: "id" }, `#${task.id}`),
      el("span", { className: "what" }, `${task.app}/${task.env}`, el("span", { className: "action" }, ` ${task.action}`)),
      badge(task.status),
      el("span", { className: "by" }, task.createdBy || ""),
      el(
        "span",
        { className: "times" },
        el("span", { className: "took", dataset: { id: task.id }, title: "how long it ran" }, seconds === null ? "" : duration(seconds)),
        el("time", { className: "when", datetime: task.createdAt, title: exact(task.createdAt) }, ago(task.createdAt)),
      ),
    );
    link.setAttribute("aria-label", `${label(task)}, ${task.status}`);
    return el("li", { id: `row-${task.id}` }, link);
  }

  /** Once a second: relative times and running durations. */
  tick() {
    for (const took of $("tasks").querySelectorAll(".took")) {
      const task = this.tasks.get(Number(took.dataset.id));
      if (task && task.startedAt && !task.finishedAt) took.textContent = duration(ran(task));
    }
    for (const when of $("tasks").querySelectorAll(".when")) when.textContent = ago(when.getAttribute("datetime"));
  }
}
