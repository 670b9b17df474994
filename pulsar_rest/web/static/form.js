// The deploy form: app and environment from GET apps, the task (deploy first, then the
// tasks this user ran before for that app), variables as name/value rows, "Queue if busy".
// A 409 names the task that holds the app and environment and offers to queue behind it;
// that message goes once the holder has ended.
import { request, me } from "./api.js";
import { $, el, ACTIVE, label, ago } from "./util.js";

export class DeployForm {
  constructor(onCreated, lookup) {
    this.onCreated = onCreated; // called with the new task's id
    this.lookup = lookup; // id -> summary, if the list has it
    this.busy = null; // the task in the way of the last deploy, while the message shows
    this.apps = null;
    this.form = $("deploy-form");
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit($("f-queue").checked);
    });
    $("f-add-var").addEventListener("click", () => this.addVariable().querySelector("input").focus());
  }

  async init() {
    $("deploy-box").hidden = false;
    try {
      this.apps = await request("apps");
    } catch (err) {
      // No configuration repository (pulsar's own): names are typed, not chosen.
      this.apps = null;
      for (const id of ["f-app", "f-env"]) {
        const select = $(id);
        select.replaceWith(el("input", { id, name: select.name, required: true, spellcheck: "false" }));
      }
      $("f-app").addEventListener("change", () => this.suggest());
      this.suggest();
      return;
    }
    const appSelect = $("f-app");
    appSelect.replaceChildren(...Object.keys(this.apps).sort().map((app) => el("option", {}, app)));
    appSelect.addEventListener("change", () => this.environments());
    this.environments();
  }

  environments() {
    const app = $("f-app").value;
    const envs = (this.apps && this.apps[app]) || [];
    $("f-env").replaceChildren(...envs.map((env) => el("option", {}, env)));
    this.suggest();
  }

  /** The task's datalist: deploy first, then the tasks this user ran for the app (newest
   * first), then the tasks the configuration repository describes. */
  async suggest() {
    const app = $("f-app").value;
    const names = ["deploy"];
    if (app) {
      const query = new URLSearchParams({ app, pageSize: "200", output: "false" });
      if (me.login) query.set("createdBy", me.login);
      try {
        const answer = await request(`tasks?${query}`);
        for (const id of answer.ids) {
          const action = answer.tasks[id].action;
          if (!names.includes(action)) names.push(action);
        }
      } catch {
        // suggestions only
      }
    }
    if (this.described === undefined) {
      try {
        this.described = (await request("tasks/available")).tasks;
      } catch {
        this.described = []; // no configuration repository here: suggestions only
      }
    }
    for (const name of this.described) if (!names.includes(name)) names.push(name);
    if ($("f-app").value !== app) return;
    $("f-tasks").replaceChildren(...names.map((name) => el("option", { value: name })));
  }

  addVariable(name = "", value = "") {
    const rows = $("f-vars");
    const number = rows.childElementCount + 1;
    const row = el(
      "div",
      { className: "var" },
      el("input", { "aria-label": `Variable ${number} name`, placeholder: "NAME", value: name, spellcheck: "false", className: "var-name" }),
      el("input", { "aria-label": `Variable ${number} value`, placeholder: "value", value, spellcheck: "false", className: "var-value" }),
      el("button", { type: "button", className: "small", "aria-label": `Remove variable ${number}` }, "×"),
    );
    row.lastElementChild.addEventListener("click", () => row.remove());
    rows.append(row);
    return row;
  }

  variables() {
    const found = {};
    for (const row of $("f-vars").children) {
      const name = row.querySelector(".var-name").value.trim();
      if (name) found[name] = row.querySelector(".var-value").value;
    }
    return found;
  }

  async submit(queue) {
    const app = $("f-app").value.trim();
    const env = $("f-env").value.trim();
    const action = $("f-task").value.trim();
    const result = $("f-result");
    const button = $("f-deploy");
    this.busy = null;
    button.disabled = true;
    result.className = "result";
    result.textContent = `Starting ${action} of ${app} on ${env}…`;
    try {
      const answer = await request(`${encodeURIComponent(app)}/${encodeURIComponent(env)}`, {
        method: "POST",
        body: { action, queue, taskVariables: this.variables() },
      });
      const task = answer.task;
      result.textContent = `Started ${label(task)}${task.status === "queued" ? " (queued)" : ""}.`;
      this.onCreated(task);
      this.suggest(); // the task just run is offered again
    } catch (err) {
      result.className = "result error";
      if (err.status === 409 && err.taskId !== null) await this.showBusy(err, app, env);
      else result.textContent = err.message;
    } finally {
      button.disabled = false;
    }
  }

  /** Who holds the app and environment, and a button to queue behind them. */
  async showBusy(err, app, env) {
    const result = $("f-result");
    let holder = this.lookup(err.taskId);
    if (!holder) {
      try {
        const query = new URLSearchParams({ app, env, pageSize: "20", output: "false" });
        const answer = await request(`tasks?${query}`);
        holder = answer.tasks[err.taskId] || null;
      } catch {
        holder = null;
      }
    }
    this.busy = { taskId: err.taskId };
    const what = holder ? label(holder) : `#${err.taskId}`;
    const who = holder && holder.createdBy ? `, started by ${holder.createdBy} ${ago(holder.createdAt)}` : "";
    const queue = el("button", { type: "button", className: "small" }, "Queue after it");
    queue.addEventListener("click", () => this.submit(true));
    result.replaceChildren(
      `${app}/${env} is busy with task `,
      el("a", { href: `#task=${err.taskId}` }, what),
      `${who}. `,
      queue,
    );
  }

  /** A task changed: the busy message goes once its holder has ended. */
  onTask(task) {
    if (this.busy && task.id === this.busy.taskId && !ACTIVE.has(task.status)) {
      this.busy = null;
      $("f-result").className = "result";
      $("f-result").textContent = `${label(task)} has ended (${task.status}): the environment is free.`;
    }
  }
}
