// simplequeue status page: polls GET /ui/overview and draws it.
//
// Every piece of data (topic names, job ids, payloads, errors, worker ids)
// reaches the DOM through textContent or setAttribute, never as markup: this
// file never hands a string to the HTML parser. The bearer token, when the broker wants one,
// lives in sessionStorage (this tab only) and travels in a header, never in
// a URL.
"use strict";

(() => {
  // Paths are relative to the page, so that it also works behind a proxy
  // that serves the broker under a prefix.
  const TOKEN_KEY = "simplequeue.token";
  const POLL_MS = 2000;
  const CALL_TIMEOUT_MS = 10000; // a call of the API the page gives up on
  const ACT_REFRESH_WAIT_MS = 3000; // an action says what it did after its refresh, or this
  const SVG_NS = "http://www.w3.org/2000/svg";
  const COUNTS = ["pending", "delayed", "claimed", "completed", "dead", "cancelled"];
  const SETTINGS = ["rate", "burst", "max_claimed", "lease", "max_attempts"];
  const numbers = new Intl.NumberFormat("en-US");

  const $ = (id) => document.getElementById(id);
  const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  class NeedToken extends Error {}

  // An error status: the broker's message, its reason (where the status alone
  // does not tell it), and whether the answer was replayed (see call()).
  class CallFailed extends Error {
    constructor(message, reason, replayed) {
      super(message);
      this.reason = reason;
      this.replayed = replayed;
    }
  }

  // --- DOM helpers -------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  // Only touch text that changed, so that a selection (say, a job id being
  // copied) survives the next refresh.
  function setText(node, text) {
    const value = String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function setClass(node, name, on) {
    node.classList.toggle(name, Boolean(on));
  }

  // Keyed rows: reuse the row of each key, add new ones, drop the rest, in order.
  function syncChildren(parent, items, keyOf, create, update) {
    const existing = new Map();
    for (const child of Array.from(parent.children)) existing.set(child.dataset.key, child);
    let previous = null;
    for (const item of items) {
      const key = String(keyOf(item));
      let node = existing.get(key);
      if (node) {
        existing.delete(key);
      } else {
        node = create(item);
        node.dataset.key = key;
      }
      const wanted = previous ? previous.nextSibling : parent.firstChild;
      if (wanted !== node) parent.insertBefore(node, wanted);
      update(node, item); // in the document already, so that it can measure itself
      previous = node;
    }
    for (const node of existing.values()) node.remove();
  }

  // --- formatting ------------------------------------------------------------------------

  function fmtCount(n) {
    return numbers.format(n);
  }

  function fmtAge(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function fmtRate(r) {
    if (Number.isInteger(r)) return numbers.format(r);
    if (r < 10) return r.toFixed(1);
    return numbers.format(Math.round(r));
  }

  function fmtClock(date) {
    return date.toLocaleTimeString("en-GB", { hour12: false });
  }

  // --- talking to the broker -----------------------------------------------------------

  function token() {
    const t = sessionStorage.getItem(TOKEN_KEY);
    return t !== null && SENDABLE.test(t) ? t : null; // one kept from before: asked again
  }

  // The answer, and whether it was replayed: a broker standing in for the
  // topic's owner served the request again after a try the owner may have
  // done without answering in time (Simplequeue-Replayed: 1). An action that
  // then answers it found nothing to do may have done it itself, at that try.
  async function call(method, path, body) {
    const headers = {};
    const t = token();
    if (t) headers.Authorization = `Bearer ${t}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
      signal: AbortSignal.timeout(CALL_TIMEOUT_MS), // a stalled call ends, and the polls after it run
    });
    if (response.status === 401) throw new NeedToken("token needed");
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    const replayed = response.headers.get("Simplequeue-Replayed") === "1";
    if (!response.ok) {
      const message = data && typeof data.error === "string" ? data.error : `HTTP ${response.status}`;
      throw new CallFailed(message, data ? data.reason : undefined, replayed);
    }
    return { data, replayed };
  }

  async function api(method, path, body) {
    return (await call(method, path, body)).data;
  }

  // A job's status now, or null when it cannot be looked up: what a replayed
  // action's empty answer is checked against, as the SDK does.
  async function statusOf(topic, jobId) {
    if (isStep(jobId)) return null;
    try {
      return (await api("GET", topicPath(topic, `jobs/${encodeURIComponent(jobId)}`))).status;
    } catch (_) {
      return null;
    }
  }

  // --- status line and token form ----------------------------------------------------------

  let lastOk = null;

  // The state ("live", "broker unreachable: ...") is a live region, said when
  // it changes; `updated` (the time of the last poll) is not.
  function setStatus(kind, text, updated = "") {
    const node = $("status");
    node.className = `status ${kind}`;
    setText($("state"), text);
    setText($("updated"), updated);
  }

  function askForToken(refused) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("content").hidden = true;
    $("login").hidden = false;
    setText($("login-error"), refused ? "That token was refused. Try again." : "");
    setStatus("warn", "token needed");
    $("token").value = "";
    $("token").focus();
  }

  // A header carries ISO-8859-1 only: fetch() refuses any other character
  // before sending, which would read as "broker unreachable" for ever.
  const SENDABLE = /^[\x20-\x7e\xa0-\xff]+$/;

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    if (!SENDABLE.test(value)) {
      setText($("login-error"), "That token has a character a browser cannot send (a curly quote?). Try again.");
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    $("login").hidden = true;
    refresh();
  });

  // --- polling -------------------------------------------------------------------------------

  let timer = null;
  let polls = Promise.resolve(); // the last refresh asked for: they run one after another

  function schedule() {
    clearTimeout(timer);
    if ($("login").hidden) timer = setTimeout(() => refresh(), POLL_MS);
  }

  // A refresh runs after the one in flight, not instead of it: an action's own
  // refresh must see the action. `fresh`: a topic just acted on, which the
  // broker reads again rather than answering from what it read a moment ago.
  function refresh(fresh) {
    polls = polls.then(() => poll(fresh));
    return polls;
  }

  async function poll(fresh) {
    const hadToken = Boolean(token());
    try {
      const params = new URLSearchParams();
      if (fresh) params.set("fresh", fresh);
      if (prefix) params.set("prefix", prefix);
      const query = params.toString() ? `?${params}` : "";
      const data = await api("GET", `ui/overview${query}`);
      $("content").hidden = false;
      // Asked before the filter changed: the refresh the change asked for follows.
      if (data.prefix === prefix) render(data);
      lastOk = new Date();
      setStatus("ok", "live", `· updated ${fmtClock(lastOk)}`);
    } catch (error) {
      if (error instanceof NeedToken) {
        askForToken(hadToken);
      } else {
        const since = lastOk ? `· showing data from ${fmtClock(lastOk)}` : "";
        setStatus("error", `broker unreachable: ${error.message}`, since);
      }
    } finally {
      schedule();
    }
  }

  // --- the topic filter: the topics whose names start with what is typed ------------------
  // Kept in the page's address (?prefix=), so that a reload or a link keeps it.

  const PREFIX_RE = /^[A-Za-z0-9_-]{0,128}$/;
  let prefix = new URLSearchParams(location.search).get("prefix") || "";
  if (!PREFIX_RE.test(prefix)) prefix = "";
  $("topic-filter").value = prefix;

  $("topic-filter").addEventListener("input", () => {
    const typed = $("topic-filter").value.trim();
    const valid = PREFIX_RE.test(typed);
    $("topic-filter").setAttribute("aria-invalid", String(!valid));
    $("filter-error").hidden = valid;
    setText($("filter-error"), valid ? "" : "A topic's name has only letters, digits, _ and -: no topic starts with that.");
    if (!valid || typed === prefix) return;
    prefix = typed;
    const search = prefix ? `?prefix=${encodeURIComponent(prefix)}` : "";
    history.replaceState(null, "", `${location.pathname}${search}`);
    refresh();
  });

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && $("login").hidden) refresh();
  });

  // --- actions: every one is a call of the public API ---------------------------------------

  function topicPath(topic, rest) {
    return `topics/${encodeURIComponent(topic)}/${rest}`;
  }

  // "." and ".." (or %2E%2E) in a path are steps to a browser, which fetch()
  // resolves away: topics/t/jobs/.. asks for topics/t/. A job id or an older
  // schedule's name can be one; the SDK and the CLI reach them, the page cannot.
  function isStep(segment) {
    return segment === "." || segment === "..";
  }

  function unreachable(what) {
    return `${what} cannot be reached from the page (a browser takes it for a step in the path): use the SDK or the CLI.`;
  }

  // Runs `request` for a button: disabled meanwhile, `busy` as its text; then the
  // page refreshes. A failure is said on the card (or asks for the token).
  async function act(button, busy, request, card) {
    const idle = button.textContent;
    button.disabled = true;
    setText(button, busy);
    try {
      const answer = await request();
      button.disabled = false;
      setText(button, idle);
      // What it did is drawn before it is said, unless a poll before it stalls.
      await Promise.race([refresh(card.dataset.topic), pause(ACT_REFRESH_WAIT_MS)]);
      return answer;
    } catch (error) {
      button.disabled = false;
      setText(button, idle);
      if (error instanceof NeedToken) askForToken(true);
      else say(card, `${idle} failed: ${error.message}`, true);
      return undefined;
    }
  }

  function say(card, text, bad) {
    const node = card.querySelector('[data-field="message"]');
    setText(node, text);
    setClass(node, "alert", bad);
  }

  // What a replayed action that answered it did nothing can say: what it did
  // if the job is now as that action leaves it, else that it is not known.
  async function replayedOutcome(topic, jobId, leaves, done, verb) {
    const status = await statusOf(topic, jobId);
    if (status === leaves) return done;
    const now = status === null ? "" : ` (it is ${status} now)`;
    return `Whether ${jobId} was ${verb} is not known: the broker answered a second try${now}.`;
  }

  async function requeue(button, topic, jobId) {
    const card = button.closest("section.topic");
    const answer = await act(button, "Requeuing…", () =>
      call("POST", topicPath(topic, "requeue"), { job_ids: [jobId] }), card);
    if (!answer) return;
    if (answer.data.requeued.length) say(card, `Requeued ${jobId}.`, false);
    else if (answer.replayed) say(card, await replayedOutcome(topic, jobId, "pending", `Requeued ${jobId}.`, "requeued"), false);
    else say(card, `${jobId} was not dead any more.`, false);
  }

  async function cancelJob(button, card, topic, jobId) {
    const answer = await act(button, "Cancelling…", () =>
      call("POST", topicPath(topic, "cancel"), { job_ids: [jobId] }), card);
    if (!answer) return;
    if (answer.data.cancelled.length) say(card, `Cancelled ${jobId}.`, false);
    else if (answer.replayed) say(card, await replayedOutcome(topic, jobId, "cancelled", `Cancelled ${jobId}.`, "cancelled"), false);
    else say(card, `${jobId} had finished already.`, false);
    if (card.querySelector('[data-field="found"]').dataset.job === jobId) await findJob(card, topic, jobId);
  }

  // What Requeue all or Purge all did: how many jobs; replayed, how many the
  // second try did, since which the first did (if any) is not known.
  function didAll(verb, ids, replayed) {
    const jobs = `${fmtCount(ids.length)} job${ids.length === 1 ? "" : "s"}`;
    if (replayed) return `${verb} ${jobs} at a second try; the first may have ${verb.toLowerCase()} others.`;
    return ids.length ? `${verb} ${jobs}.` : "Nothing was dead.";
  }

  // Destructive: the first click arms the button, the second (within 5 s) acts.
  function armed(button, armedText, run) {
    const idle = button.textContent;
    let timer = null;
    button.addEventListener("click", async () => {
      if (button.dataset.armed !== "1") {
        button.dataset.armed = "1";
        setText(button, armedText);
        timer = setTimeout(() => {
          button.dataset.armed = "";
          setText(button, idle);
        }, 5000);
        return;
      }
      clearTimeout(timer);
      button.dataset.armed = "";
      setText(button, idle);
      await run();
    });
  }

  // --- find a job ------------------------------------------------------------------------------

  function field(name, value) {
    return [el("dt", {}, name), el("dd", { "data-found": name }, value)];
  }

  async function findJob(card, topic, jobId) {
    const box = card.querySelector('[data-field="found"]');
    box.hidden = false;
    box.dataset.job = jobId;
    if (isStep(jobId)) {
      box.replaceChildren(el("p", { class: "alert", "data-found": "error" }, unreachable(`Job ${jobId}`)));
      return;
    }
    try {
      const job = await api("GET", topicPath(topic, `jobs/${encodeURIComponent(jobId)}`));
      const list = el("dl", {});
      const rows = [
        ["id", job.id],
        ["status", job.status],
        ["attempts", job.attempts ?? "—"],
        ["payload", job.payload === undefined || job.payload === null ? "—" : JSON.stringify(job.payload)],
        ["result", job.result === undefined || job.result === null ? "—" : JSON.stringify(job.result)],
        ["last error", job.last_error ?? "—"],
      ];
      for (const [name, value] of rows) list.append(...field(name, value));
      const children = [list];
      if (["pending", "delayed", "claimed"].includes(job.status)) {
        const button = el("button", { type: "button", "data-action": "cancel-found" }, "Cancel job");
        armed(button, "Click again to cancel", () => cancelJob(button, card, topic, job.id));
        children.push(button);
      }
      box.replaceChildren(...children);
    } catch (error) {
      if (error instanceof NeedToken) {
        askForToken(true);
        return;
      }
      box.replaceChildren(el("p", { class: "alert", "data-found": "error" }, error.message));
    }
  }

  // --- schedules and settings ------------------------------------------------------------------

  function parsePayload(text) {
    try {
      return JSON.parse(text);
    } catch (_) {
      return text; // as the CLI does: JSON, or else the text itself
    }
  }

  function numberOrNull(text, name) {
    const value = text.trim();
    if (value === "") return null; // removes the setting
    const n = Number(value);
    if (!Number.isFinite(n)) throw new Error(`${name} is not a number`);
    return n;
  }

  async function saveSchedule(form, card, topic) {
    const get = (name) => form.elements.namedItem(name).value.trim();
    const body = { payload: parsePayload(form.elements.namedItem("payload").value) };
    try {
      const every = numberOrNull(get("every"), "every");
      if (every !== null) body.every = every;
    } catch (error) {
      say(card, error.message, true);
      return;
    }
    if (get("cron")) body.cron = get("cron");
    if (get("tz")) body.tz = get("tz");
    const name = get("name");
    const button = form.querySelector("button");
    const made = await act(button, "Saving…", () =>
      api("PUT", topicPath(topic, `schedules/${encodeURIComponent(name)}`), body), card);
    if (made) {
      form.reset();
      say(card, `Schedule ${made.name} saved: next in ${fmtAge(made.next_at - Date.now() / 1000)}.`, false);
    }
  }

  // Whether the operator changed a settings field from what the page last showed.
  function edited(input) {
    return input.value.trim() !== (input.dataset.shown ?? "");
  }

  // Only the fields changed here are sent: the others keep what they are now,
  // which may be a colleague's change the form has not shown yet.
  async function saveSettings(form, card, topic) {
    const body = {};
    try {
      for (const name of SETTINGS) {
        const input = form.elements.namedItem(name);
        if (edited(input)) body[name] = numberOrNull(input.value, name);
      }
      if (body.rate === null) body.burst = null; // a burst is its rate's: it goes with it
    } catch (error) {
      say(card, error.message, true);
      return;
    }
    if (Object.keys(body).length === 0) {
      say(card, "No setting changed.", false);
      return;
    }
    const button = form.querySelector("button");
    const saved = await act(button, "Saving…", () => api("PUT", topicPath(topic, "settings"), body), card);
    if (saved) {
      fillSettings(form, saved, true);
      say(card, "Settings saved.", false);
    }
  }

  // Each field shows the topic's setting, unless the operator is in it or has
  // changed it (and not saved); `all` after a save: every field.
  function fillSettings(form, settings, all = false) {
    if (!settings) return;
    for (const name of SETTINGS) {
      const input = form.elements.namedItem(name);
      if (!all && (edited(input) || input === document.activeElement)) continue;
      const value = settings[name] === null || settings[name] === undefined ? "" : String(settings[name]);
      input.dataset.shown = value;
      if (input.value !== value) input.value = value;
    }
  }

  // --- rendering: brokers --------------------------------------------------------------------

  function pill(text, kind) {
    return el("span", { class: `pill ${kind}` }, text);
  }

  let brokersShown = ""; // what the broker lines were drawn from, less the heartbeat's age

  function renderBrokers(data) {
    const me = data.broker;
    const rec = data.record;
    const heartbeat = rec ? `heartbeat ${fmtAge(rec.heartbeat_age)} ago` : "";
    const shown = JSON.stringify([me, rec && { ...rec, heartbeat_age: null }]);
    if (shown === brokersShown) { // nothing new: the lines stay, only the age moves
      const age = $("brokers").querySelector('[data-field="heartbeat"]');
      if (age) setText(age, heartbeat);
      return;
    }
    brokersShown = shown;
    const mine = el(
      "div",
      { class: "broker", "data-role": "this-broker" },
      el("span", { class: "label" }, "this broker"),
      el("code", { "data-field": "broker-id" }, me.id),
      el("span", { class: "sep" }, "epoch"),
      el("span", { "data-field": "broker-epoch" }, me.epoch),
      pill(me.active ? "active" : "standby", me.active ? "good" : "muted"),
    );
    const record = el("div", { class: "broker", "data-role": "broker-json" });
    record.append(el("span", { class: "label" }, "broker.json"));
    if (!rec) {
      record.append(el("span", { class: "muted" }, "no record yet"));
    } else {
      record.append(
        el("code", { "data-field": "active-id" }, rec.broker_id),
        el("span", { class: "sep" }, "epoch"),
        el("span", { "data-field": "active-epoch" }, rec.epoch),
        el("span", { class: "sep" }, "at"),
        el("code", {}, rec.url),
        el("span", { class: "sep", "data-field": "heartbeat" }, heartbeat),
      );
      if (rec.stale) record.append(pill("stale", "bad"));
    }
    $("brokers").replaceChildren(mine, record);
  }

  // --- rendering: charts -----------------------------------------------------------------------

  function niceMax(value) {
    if (value <= 1) return 1;
    const p = 10 ** Math.floor(Math.log10(value));
    for (const m of [1, 2, 5, 10]) if (value <= m * p) return m * p;
    return 10 * p;
  }

  // points: [{ago, span, enqueued, completed}], oldest first; time runs left to right.
  function drawChart(node, points, window, opts) {
    const { width, height, axes } = opts;
    const pad = axes ? { l: 44, r: 8, t: 8, b: 20 } : { l: 1, r: 1, t: 3, b: 2 };
    const w = width - pad.l - pad.r;
    const h = height - pad.t - pad.b;
    const oldest = points.length ? points[0].ago + points[0].span : 0;
    const range = Math.min(window, Math.max(60, oldest));
    let top = 0;
    for (const p of points) top = Math.max(top, p.enqueued, p.completed);
    top = niceMax(top);
    const x = (ago) => pad.l + w - (Math.min(ago, range) / range) * w;
    const y = (rate) => pad.t + h - (rate / top) * h;
    const children = [];
    if (axes) {
      for (const frac of [0, 0.5, 1]) {
        const yy = y(top * frac);
        children.push(svg("line", { class: "grid", x1: pad.l, x2: pad.l + w, y1: yy, y2: yy }));
        const label = svg("text", { class: "tick", x: pad.l - 6, y: yy + 4, "text-anchor": "end" });
        label.textContent = `${fmtRate(top * frac)}/s`;
        children.push(label);
      }
      const minutes = range / 60;
      const step = minutes <= 2 ? 0.5 : minutes <= 5 ? 1 : 2;
      for (let m = 0; m <= minutes + 1e-9; m += step) {
        const tick = svg("text", {
          class: "tick",
          x: x(m * 60),
          y: height - 4,
          "text-anchor": m === 0 ? "end" : m + step > minutes + 1e-9 ? "start" : "middle",
        });
        tick.textContent = m === 0 ? "now" : `-${m < 1 ? `${m * 60}s` : `${m}m`}`;
        children.push(tick);
      }
    } else {
      children.push(svg("line", { class: "base", x1: pad.l, x2: pad.l + w, y1: y(0), y2: y(0) }));
    }
    for (const series of ["enqueued", "completed"]) {
      if (points.length === 0) continue;
      // Each point is the rate over [ago + span, ago]: draw it as a step.
      let d = "";
      for (const p of points) {
        const x0 = x(p.ago + p.span).toFixed(1);
        const x1 = x(p.ago).toFixed(1);
        const yy = y(p[series]).toFixed(1);
        d += `${d ? "L" : "M"}${x0},${yy}L${x1},${yy}`;
      }
      children.push(svg("path", { class: `line ${series}`, d }));
    }
    if (points.length === 0 && axes) {
      const note = svg("text", { class: "note", x: pad.l + w / 2, y: pad.t + h / 2, "text-anchor": "middle" });
      note.textContent = "collecting samples…";
      children.push(note);
    }
    node.replaceChildren(...children);
  }

  function newChart(width, height, extraClass) {
    return svg("svg", {
      class: `chart ${extraClass}`,
      viewBox: `0 0 ${width} ${height}`,
      width,
      height,
      role: "img",
    });
  }

  // --- rendering: the topics table -----------------------------------------------------------

  function createTopicRow(topic) {
    const link = el("a", { href: `#topic-${topic.name}` }, topic.name);
    const row = el("tr", { "data-topic": topic.name }, el("td", { class: "name" }, link));
    for (const name of COUNTS) row.append(el("td", { class: "num", "data-count": name }));
    row.append(el("td", { class: "num", "data-field": "oldest" }));
    const spark = newChart(180, 34, "spark");
    spark.setAttribute("aria-label", `enqueue and completion rates of ${topic.name}`);
    row.append(el("td", { class: "chart-col" }, spark));
    return row;
  }

  function updateTopicRow(row, topic, window) {
    if (topic.error) {  // this topic could not be read: say why, keep the others
      for (const name of COUNTS) setText(row.querySelector(`[data-count="${name}"]`), "—");
      const cell = row.querySelector('[data-field="oldest"]');
      setText(cell, topic.error);
      setClass(cell, "alert", true);
      return;
    }
    for (const name of COUNTS) {
      const cell = row.querySelector(`[data-count="${name}"]`);
      const n = topic.counts[name] ?? 0; // an answer may leave out a zero
      setText(cell, fmtCount(n));
      setClass(cell, "zero", n === 0);
      setClass(cell, "alert", name === "dead" && n > 0);
    }
    const oldest = row.querySelector('[data-field="oldest"]');
    setText(oldest, fmtAge(topic.oldest_pending_age));
    setClass(oldest, "alert", false); // read again after an error: no longer one
    drawChart(row.querySelector("svg.spark"), topic.rates, window, { width: 180, height: 34, axes: false });
  }

  // --- rendering: one card per topic -------------------------------------------------------------

  function table(kind, headings) {
    const head = el("tr", {});
    for (const [text, cls] of headings) head.append(el("th", { class: cls || null }, text));
    return el("table", { class: `jobs ${kind}`, "data-list": kind }, el("thead", {}, head), el("tbody", {}));
  }

  function input(name, label, attrs) {
    return el(
      "label",
      { class: "field" },
      el("span", {}, label),
      el("input", { name, type: "text", autocomplete: "off", spellcheck: "false", ...attrs }),
    );
  }

  function createCard(topic) {
    const name = topic.name;
    const card = el("section", { class: "card topic", id: `topic-${name}`, "data-topic": name });
    const head = el(
      "div",
      { class: "card-head" },
      el("h2", {}, el("span", { class: "muted" }, "topic "), name),
      el("span", { class: "rates-now", "data-field": "rates-now" }),
    );
    const chart = newChart(640, 140, "big");
    chart.setAttribute("aria-label", `enqueue and completion rates of ${name}`);

    const find = el(
      "form",
      { class: "inline", "data-form": "find", method: "post", action: "" },
      input("job_id", "Find a job", { placeholder: "job id", required: "" }),
      el("button", { type: "submit" }, "Find"),
    );
    find.addEventListener("submit", (event) => {
      event.preventDefault();
      const jobId = find.elements.namedItem("job_id").value.trim();
      if (jobId) findJob(card, name, jobId);
    });

    const requeueAll = el("button", { type: "button", "data-action": "requeue-all" }, "Requeue all");
    requeueAll.addEventListener("click", async () => {
      const answer = await act(requeueAll, "Requeuing…", () => call("POST", topicPath(name, "requeue"), {}), card);
      if (answer) say(card, didAll("Requeued", answer.data.requeued, answer.replayed), false);
    });
    const purgeAll = el("button", { type: "button", "data-action": "purge-all" }, "Purge all");
    armed(purgeAll, "Click again to purge", async () => {
      const answer = await act(purgeAll, "Purging…", () => call("DELETE", topicPath(name, "dead"), {}), card);
      if (answer) say(card, didAll("Purged", answer.data.purged, answer.replayed), false);
    });

    const scheduleForm = el(
      "form",
      { class: "inline wrap", "data-form": "schedule", method: "post", action: "" },
      input("name", "Name", { required: "", placeholder: "nightly-report", size: "14" }),
      input("every", "Every (s)", { placeholder: "60", size: "6", inputmode: "numeric" }),
      input("cron", "or cron", { placeholder: "*/5 * * * *", size: "12" }),
      input("tz", "Time zone", { placeholder: "UTC", size: "12" }),
      input("payload", "Payload (JSON)", { placeholder: '{"report": "daily"}', size: "24" }),
      el("button", { type: "submit" }, "Save schedule"),
    );
    scheduleForm.addEventListener("submit", (event) => {
      event.preventDefault();
      saveSchedule(scheduleForm, card, name);
    });

    const settingsForm = el(
      "form",
      { class: "inline wrap", "data-form": "settings", method: "post", action: "" },
      input("rate", "Rate (claims/s)", { size: "7", inputmode: "decimal" }),
      input("burst", "Burst", { size: "5", inputmode: "numeric" }),
      input("max_claimed", "Max claimed", { size: "6", inputmode: "numeric" }),
      input("lease", "Lease (s)", { size: "6", inputmode: "decimal" }),
      input("max_attempts", "Max attempts", { size: "5", inputmode: "numeric" }),
      el("button", { type: "submit" }, "Save settings"),
    );
    settingsForm.addEventListener("submit", (event) => {
      event.preventDefault();
      saveSettings(settingsForm, card, name);
    });

    card.append(
      head,
      el("div", { class: "chart-wrap" }, chart),
      el("p", { class: "message", "data-field": "message", role: "status" }),
      find,
      el("div", { class: "found", "data-field": "found", hidden: "" }),
      el("h3", {}, "Claimed ", el("span", { class: "badge", "data-field": "claimed-count" })),
      table("claimed", [
        ["Job"],
        ["Worker"],
        ["Attempts", "num"],
        ["Lease left", "num"],
        ["Claimed for", "num"],
        ["Payload"],
        [""],
      ]),
      el("p", { class: "empty", "data-empty": "claimed" }, "No job is claimed."),
      el("p", { class: "more", "data-more": "claimed" }),
      el(
        "div",
        { class: "section-head" },
        el("h3", {}, "Dead ", el("span", { class: "badge", "data-field": "dead-count" })),
        el("span", { class: "actions", "data-field": "dead-actions" }, requeueAll, purgeAll),
      ),
      table("dead", [["Job"], ["Last error"], ["Attempts", "num"], ["Died", "num"], ["Payload"], [""]]),
      el("p", { class: "empty", "data-empty": "dead" }, "No dead jobs."),
      el("p", { class: "more", "data-more": "dead" }),
      el("h3", {}, "Schedules ", el("span", { class: "badge", "data-field": "schedule-count" })),
      table("schedules", [["Name"], ["When"], ["Next", "num"], ["Last fired", "num"], ["Last job"], ["Payload"], [""]]),
      el("p", { class: "empty", "data-empty": "schedules" }, "No schedules."),
      scheduleForm,
      el("h3", {}, "Settings"),
      settingsForm,
      el("p", { class: "hint" }, "Limits hold across every worker and broker; an empty field has no limit (or the broker's default)."),
    );
    return card;
  }

  function createClaimedRow(card, topicName) {
    return (job) => {
      const button = el("button", { type: "button", "data-action": "cancel" }, "Cancel");
      // Cancelling cannot be undone: a second click confirms, as for purging.
      armed(button, "Click again to cancel", () => cancelJob(button, card, topicName, job.id));
      return el(
        "tr",
        { "data-job": job.id },
        el("td", { class: "id" }, el("code", {}, job.id)),
        el("td", { "data-field": "worker" }),
        el("td", { class: "num", "data-field": "attempts" }),
        el("td", { class: "num", "data-field": "lease" }),
        el("td", { class: "num", "data-field": "claimed-for" }),
        el("td", { class: "payload" }, el("code", { "data-field": "payload" })),
        el("td", { class: "action" }, button),
      );
    };
  }

  function createScheduleRow(card, topicName) {
    return (schedule) => {
      const button = el("button", { type: "button", "data-action": "unschedule" }, "Delete");
      const path = topicPath(topicName, `schedules/${encodeURIComponent(schedule.name)}`);
      armed(button, "Click again to delete", async () => {
        if (isStep(schedule.name)) {
          say(card, unreachable(`Schedule ${schedule.name}`), true);
          return;
        }
        const done = await act(button, "Deleting…", async () => {
          try {
            return await call("DELETE", path);
          } catch (error) {
            // A second try finds none when the first deleted it: done, as the SDK takes it.
            if (error instanceof CallFailed && error.replayed && error.reason === "no_schedule") return {};
            throw error;
          }
        }, card);
        if (done) say(card, `Deleted schedule ${schedule.name}.`, false);
      });
      return el(
        "tr",
        { "data-schedule": schedule.name },
        el("td", { class: "id" }, el("code", {}, schedule.name)),
        el("td", { "data-field": "when" }),
        el("td", { class: "num", "data-field": "next" }),
        el("td", { class: "num", "data-field": "last" }),
        el("td", { class: "id" }, el("code", { "data-field": "last-job" })),
        el("td", { class: "payload" }, el("code", { "data-field": "payload" })),
        el("td", { class: "action" }, button),
      );
    };
  }

  function updateScheduleRow(row, schedule) {
    setText(row.querySelector('[data-field="when"]'), schedule.when);
    setText(row.querySelector('[data-field="next"]'), `in ${fmtAge(schedule.next_in)}`);
    const last = row.querySelector('[data-field="last"]');
    setText(last, schedule.last_fired_ago == null ? "never" : `${fmtAge(schedule.last_fired_ago)} ago`);
    last.title = schedule.last_error ?? "";
    setClass(last, "alert", Boolean(schedule.last_error));
    setText(row.querySelector('[data-field="last-job"]'), schedule.last_job_id ?? "—");
    const payload = row.querySelector('[data-field="payload"]');
    setText(payload, schedule.payload);
    payload.title = schedule.payload;
  }

  function updateClaimedRow(row, job) {
    setText(row.querySelector('[data-field="worker"]'), job.worker ?? "—");
    setText(row.querySelector('[data-field="attempts"]'), job.attempts ?? "—");
    const lease = row.querySelector('[data-field="lease"]');
    setText(lease, job.lease_left > 0 ? fmtAge(job.lease_left) : "expired");
    setClass(lease, "alert", job.lease_left <= 5);
    setText(row.querySelector('[data-field="claimed-for"]'), fmtAge(job.claimed_for));
    const payload = row.querySelector('[data-field="payload"]');
    setText(payload, job.payload);
    payload.title = job.payload;
  }

  function createDeadRow(topicName) {
    return (job) => {
      const button = el("button", { type: "button", class: "requeue", "data-action": "requeue" }, "Requeue");
      button.addEventListener("click", () => requeue(button, topicName, job.id));
      return el(
        "tr",
        { "data-job": job.id },
        el("td", { class: "id" }, el("code", {}, job.id)),
        el("td", { class: "error" }, el("span", { "data-field": "error" })),
        el("td", { class: "num", "data-field": "attempts" }),
        el("td", { class: "num", "data-field": "died" }),
        el("td", { class: "payload" }, el("code", { "data-field": "payload" })),
        el("td", { class: "action" }, button),
      );
    };
  }

  function updateDeadRow(row, job) {
    const error = row.querySelector('[data-field="error"]');
    setText(error, job.last_error ?? "—");
    error.title = job.last_error ?? "";
    setText(row.querySelector('[data-field="attempts"]'), job.attempts ?? "—");
    setText(row.querySelector('[data-field="died"]'), job.died_ago == null ? "—" : `${fmtAge(job.died_ago)} ago`);
    const payload = row.querySelector('[data-field="payload"]');
    setText(payload, job.payload);
    payload.title = job.payload;
  }

  // Jobs not listed are said, and why when it is the overview's bound of all
  // its topics together (not the topic's own): none listed is not "none".
  function updateList(card, kind, jobs, more, cut, create, update) {
    const list = card.querySelector(`[data-list="${kind}"]`);
    syncChildren(list.tBodies[0], jobs, (j) => j.id, create, update);
    list.hidden = jobs.length === 0;
    card.querySelector(`[data-empty="${kind}"]`).hidden = jobs.length > 0 || more > 0;
    const moreNode = card.querySelector(`[data-more="${kind}"]`);
    moreNode.hidden = more === 0;
    let text = "";
    if (more) {
      text = jobs.length ? `… and ${fmtCount(more)} more not listed` : `${fmtCount(more)} not listed`;
      if (cut) text += " (each overview reads and lists a bounded amount of jobs and bytes, of all topics together)";
    }
    setText(moreNode, text);
  }

  function updateCard(card, topic, window) {
    card.hidden = Boolean(topic.error);
    if (topic.error) return;
    const c = topic.counts;
    setText(card.querySelector('[data-field="claimed-count"]'), fmtCount(c.claimed));
    setText(card.querySelector('[data-field="dead-count"]'), fmtCount(c.dead));
    const last = topic.rates[topic.rates.length - 1];
    setText(
      card.querySelector('[data-field="rates-now"]'),
      last ? `now ${fmtRate(last.enqueued)}/s enqueued · ${fmtRate(last.completed)}/s completed` : "",
    );
    // As wide as the card, drawn at its real size: no stretched text.
    const chart = card.querySelector("svg.big");
    const width = Math.max(360, Math.floor(chart.parentNode.clientWidth || 640));
    if (chart.getAttribute("width") !== String(width)) {
      chart.setAttribute("width", width);
      chart.setAttribute("viewBox", `0 0 ${width} 140`);
    }
    drawChart(chart, topic.rates, window, { width, height: 140, axes: true });
    const cut = Boolean(topic.listing_cut);
    updateList(card, "claimed", topic.claimed, topic.claimed_more, cut, createClaimedRow(card, topic.name), updateClaimedRow);
    updateList(card, "dead", topic.dead, topic.dead_more, cut, createDeadRow(topic.name), updateDeadRow);
    card.querySelector('[data-field="dead-actions"]').hidden = c.dead === 0;
    const schedules = topic.schedules || [];
    setText(card.querySelector('[data-field="schedule-count"]'), fmtCount(schedules.length));
    const list = card.querySelector('[data-list="schedules"]');
    syncChildren(list.tBodies[0], schedules, (s) => s.name, createScheduleRow(card, topic.name), updateScheduleRow);
    list.hidden = schedules.length === 0;
    card.querySelector('[data-empty="schedules"]').hidden = schedules.length > 0;
    fillSettings(card.querySelector('[data-form="settings"]'), topic.settings);
  }

  // --- rendering: everything -------------------------------------------------------------------

  function render(data) {
    renderBrokers(data);
    const window = data.window;
    syncChildren(
      $("topics").tBodies[0],
      data.topics,
      (t) => t.name,
      createTopicRow,
      (row, t) => updateTopicRow(row, t, window),
    );
    $("no-topics").hidden = data.topics.length > 0;
    setText($("no-topics"), data.prefix ? `No topic's name starts with “${data.prefix}”.` : "No topics yet: enqueue a job to create one.");
    const hiddenTopics = data.topics_total - data.topics.length;
    $("more-topics").hidden = hiddenTopics <= 0;
    const which = data.prefix ? ` starting with “${data.prefix}”` : "";
    setText($("more-topics"), hiddenTopics > 0 ? `… and ${fmtCount(hiddenTopics)} more ${hiddenTopics === 1 ? "topic" : "topics"}${which} not shown: type more of a name above` : "");
    // The store's topics could not be listed (an outage): those shown are the
    // last listing's and those this broker holds.
    const failed = data.listing_failed;
    $("listing-failed").hidden = !failed;
    setText($("listing-failed"), failed ? `The store's topics could not be listed (${failed}): showing those listed before and those this broker holds.` : "");
    syncChildren($("details"), data.topics, (t) => t.name, createCard, (card, t) => updateCard(card, t, window));
  }

  refresh();
})();
