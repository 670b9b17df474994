// Talking to the service: JSON requests (with the CSRF token on changes), who the user is,
// and server-sent event streams that pause while the tab is hidden.
// Every URL is relative to the page, so the console works under a proxy's path prefix.

/** Who uses the page: GET me. Without authentication, everybody may do everything. */
export const me = { login: null, roles: ["read", "write"], csrfToken: null, auth: false, why: null };

export const canWrite = () => me.roles.includes("write");

/** An error answer of the service: its message, status, and the task it is about (a 409's). */
export class ApiError extends Error {
  constructor(status, message, taskId = null) {
    super(message);
    this.status = status;
    this.taskId = taskId;
  }
}

/** fetch() that answers the JSON body, or throws ApiError with the envelope's message. */
export async function request(url, { method = "GET", body, headers = {} } = {}) {
  const options = { method, headers: { Accept: "application/json", ...headers } };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["Content-Type"] = "application/json";
  }
  // A change made with the session cookie carries the session's CSRF token (the server
  // also checks that Origin is this service's: a browser sends it on a POST by itself).
  if (method !== "GET" && me.csrfToken) options.headers["X-CSRF-Token"] = me.csrfToken;
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new ApiError(0, `the service cannot be reached (${err.message})`);
  }
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    // not JSON: a proxy's error page, say
  }
  if (!response.ok) {
    const error = answer && answer.error;
    throw new ApiError(
      response.status,
      error ? error.message : `${response.status} ${response.statusText}`,
      error && error.taskId !== undefined ? error.taskId : null,
    );
  }
  return answer;
}

/** Who is signed in: false when nobody is (401), else the `me` object filled in. */
export async function whoAmI() {
  const response = await fetch("me", { headers: { Accept: "application/json" } });
  if (response.status === 401) return false;
  if (!response.ok) throw new ApiError(response.status, `GET me: ${response.status} ${response.statusText}`);
  Object.assign(me, await response.json());
  return true;
}

export async function signOut() {
  await request("logout", { method: "POST" });
}

/**
 * A server-sent event stream that is closed while the tab is hidden and opened again when it
 * is shown: a console left open in a background tab costs the server nothing.
 * `url()` is asked at each opening, so the stream resumes from the caller's cursor (an event
 * id or a byte offset); while open, EventSource itself resumes with Last-Event-ID.
 * `onShow()` may answer false to open nothing (the caller reloads instead).
 */
export class Stream {
  constructor(url, handlers, { onError = null, onShow = null } = {}) {
    this.url = url;
    this.handlers = handlers;
    this.onError = onError;
    this.onShow = onShow;
    this.source = null;
    this.stopped = false;
    this.retry = null;
    this.visibility = () => this.visibilityChanged();
    document.addEventListener("visibilitychange", this.visibility);
    if (!document.hidden) this.open();
  }

  open() {
    if (this.stopped || this.source) return;
    const source = new EventSource(this.url());
    for (const [name, handler] of Object.entries(this.handlers)) {
      source.addEventListener(name, (event) => {
        if (this.source === source) handler(JSON.parse(event.data), event);
      });
    }
    source.addEventListener("error", () => {
      if (this.source !== source) return;
      // CONNECTING: EventSource tries again by itself (Last-Event-ID). CLOSED: the server
      // refused (an error status); try again later from the caller's cursor.
      if (source.readyState === EventSource.CLOSED) {
        this.source = null;
        if (this.onError) this.onError();
        clearTimeout(this.retry);
        this.retry = setTimeout(() => this.open(), 3000);
      }
    });
    this.source = source;
  }

  close() {
    clearTimeout(this.retry);
    if (this.source) this.source.close();
    this.source = null;
  }

  /** For good: the stream is not opened again. */
  stop() {
    this.stopped = true;
    this.close();
    document.removeEventListener("visibilitychange", this.visibility);
  }

  async visibilityChanged() {
    if (document.hidden) {
      this.close();
      return;
    }
    if (this.onShow && !(await this.onShow())) return;
    this.open();
  }
}
