// Small helpers: building elements (text only: never HTML from data), times, the URL hash.

/** An element with attributes and children; strings become text nodes, never markup. */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "className") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

export const $ = (id) => document.getElementById(id);

/** Statuses of a task that has not ended: it may still be killed. */
export const ACTIVE = new Set(["queued", "created", "running"]);

export const label = (task) => `#${task.id} ${task.app}/${task.env} ${task.action}`;

const units = [
  [86400, "d"],
  [3600, "h"],
  [60, "min"],
  [1, "s"],
];

/** "2 h 5 min", "12 s": the two largest units. */
export function duration(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  const parts = [];
  for (const [size, unit] of units) {
    if (seconds >= size || (unit === "s" && parts.length === 0)) {
      parts.push(`${Math.floor(seconds / size)} ${unit}`);
      seconds %= size;
      if (parts.length === 2) break;
    }
  }
  return parts.join(" ");
}

/** "3 min ago" from an ISO time. */
export function ago(iso) {
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  return seconds < 5 ? "just now" : `${duration(seconds).split(" ").slice(0, 2).join(" ")} ago`;
}

/** The exact local time, for a title. */
export const exact = (iso) => new Date(iso).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });

/** How long a task ran, or has run so far; null before it started. */
export function ran(task) {
  if (!task.startedAt) return null;
  const end = task.finishedAt ? Date.parse(task.finishedAt) : Date.now();
  return (end - Date.parse(task.startedAt)) / 1000;
}

/** The URL hash as parameters: `#task=12&app=web` (filters, the task, a line). */
export function hashParams() {
  return new URLSearchParams(location.hash.slice(1));
}

/** Change some parameters of the hash (null removes one); `push` makes a history entry. */
export function setHash(changes, push = false) {
  const params = hashParams();
  for (const [name, value] of Object.entries(changes)) {
    if (value === null || value === undefined || value === "") params.delete(name);
    else params.set(name, String(value));
  }
  const hash = params.toString();
  const url = hash ? `#${hash}` : location.pathname + location.search;
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}

/** A link to a task that keeps the list's filters. */
export function taskHref(id, extra = {}) {
  const params = hashParams();
  params.delete("at");
  params.set("task", String(id));
  for (const [name, value] of Object.entries(extra)) params.set(name, String(value));
  return `#${params.toString()}`;
}

/** The status badge: colour and text (never colour alone). */
export function badge(status) {
  return el("span", { className: `badge s-${status}` }, status);
}

/** Bytes as "1.2 MiB". */
export function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KiB", "MiB", "GiB"];
  let value = bytes;
  let unit = "B";
  for (const next of units) {
    if (value < 1024) break;
    value /= 1024;
    unit = next;
  }
  return `${value.toFixed(1)} ${unit}`;
}
