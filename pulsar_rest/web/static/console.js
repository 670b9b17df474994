// The deploy console: who is signed in, the live task list, one task's log, the deploy form.
// Plain ES modules, no build step. The URL's hash says what is shown (#task=12&app=web&...),
// so any view can be linked to, and Back works.
import { me, whoAmI, signOut, request, canWrite, Stream } from "./api.js";
import { $, el, hashParams, setHash } from "./util.js";
import { TaskList } from "./list.js";
import { TaskView } from "./taskview.js";
import { DeployForm } from "./form.js";

const list = new TaskList();
const view = new TaskView();
let events = null;
let seq = null; // the last event seen: where /events resumes after the tab was hidden

function notice(message, ...extra) {
  const box = $("notice");
  box.hidden = !message;
  box.replaceChildren(...(message ? [message, ...extra] : []));
}

function signInLink() {
  const next = location.pathname + location.search + location.hash;
  return el("a", { href: `login?next=${encodeURIComponent(next)}`, className: "signin" }, "Sign in with GitHub");
}

function showWho() {
  const who = $("who");
  if (!me.auth) {
    who.replaceChildren(el("span", { className: "muted" }, "authentication off"));
    return;
  }
  const role = me.roles.includes("write") ? "write" : me.roles.includes("read") ? "read" : "no role";
  const out = el("button", { type: "button", className: "small" }, "Sign out");
  out.addEventListener("click", async () => {
    try {
      await signOut();
    } finally {
      location.reload();
    }
  });
  who.replaceChildren(el("span", { className: "login" }, me.login), " ", el("span", { className: `role r-${role}` }, role), " ", out);
}

/** Follow /events: new tasks and changes, into the list, the task shown and the form. */
function followEvents(form) {
  const changed = (data) => {
    seq = data.seq;
    if (!data.task) return; // pruned from the history since
    list.upsert(data.task, data.event === "task.create");
    view.update(data.task);
    if (form) form.onTask(data.task);
  };
  events = new Stream(() => (seq === null ? "events" : `events?since=${seq}`), {
    "task.create": changed,
    "task.change": changed,
    // The stream's cursor is older than the server keeps (or the server restarted): list again.
    reset: (data) => {
      seq = data.seq;
      list.load().catch((err) => notice(err.message));
    },
    unauthorized: (data) => {
      events.stop();
      notice(data.message, " ", signInLink());
    },
  });
}

/** Show what the hash says: the list's filters and page, the task and the line. */
async function route() {
  if (list.fromHash()) await list.load();
  const params = hashParams();
  const id = Number(params.get("task")) || null;
  const at = params.has("at") ? Number(params.get("at")) : null;
  list.select(id);
  if (id === null) view.hide();
  else await view.show(id, at, list.get(id));
}

async function main() {
  if (!(await whoAmI())) {
    $("who").replaceChildren(signInLink());
    notice("Sign in to see and run the deploy tasks.");
    return;
  }
  showWho();
  if (!me.roles.includes("read")) {
    notice(`${me.login} may not see the tasks${me.why ? `: ${me.why}` : ""}.`);
    return;
  }
  $("app").hidden = false;
  let form = null;
  if (canWrite()) {
    form = new DeployForm(
      (task) => {
        list.upsert(task, true);
        setHash({ task: task.id, at: null }, true);
        route();
      },
      (id) => list.get(id),
    );
    form.init().catch((err) => notice(err.message));
  }
  // The event cursor before the list is read: nothing that happens in between is missed.
  const status = await request("status");
  seq = status.seq === undefined ? null : status.seq;
  list.fromHash();
  await list.load();
  followEvents(form);
  window.addEventListener("hashchange", () => route().catch((err) => notice(err.message)));
  setInterval(() => {
    list.tick();
    view.tick();
  }, 1000);
  await route();
}

main().catch((err) => notice(err.message));
