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
  const SVG_NS = "http://www.w3.org/2000/svg";
  const COUNTS = ["pending", "delayed", "claimed", "completed", "dead"];
  const numbers = new Intl.NumberFormat("en-US");

  const $ = (id) => document.getElementById(id);

  class NeedToken extends Error {}

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
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function api(method, path, body) {
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
    });
    if (response.status === 401) throw new NeedToken("token needed");
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const message = data && typeof data.error === "string" ? data.error : `HTTP ${response.status}`;
      throw new Error(message);
    }
    return data;
  }

  // --- status line and token form ----------------------------------------------------------

  let lastOk = null;

  function setStatus(kind, text) {
    const node = $("status");
    node.className = `status ${kind}`;
    setText(node, text);
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

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    $("login").hidden = true;
    refresh();
  });

  // --- polling -------------------------------------------------------------------------------

  let timer = null;
  let inFlight = false;

  function schedule() {
    clearTimeout(timer);
    if ($("login").hidden) timer = setTimeout(refresh, POLL_MS);
  }

  async function refresh() {
    if (inFlight) return;
    inFlight = true;
    const hadToken = Boolean(token());
    try {
      const data = await api("GET", "ui/overview");
      $("content").hidden = false;
      render(data);
      lastOk = new Date();
      setStatus("ok", `live · updated ${fmtClock(lastOk)}`);
    } catch (error) {
      if (error instanceof NeedToken) {
        askForToken(hadToken);
      } else {
        const since = lastOk ? ` · showing data from ${fmtClock(lastOk)}` : "";
        setStatus("error", `broker unreachable: ${error.message}${since}`);
      }
    } finally {
      inFlight = false;
      schedule();
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && $("login").hidden) refresh();
  });

  // --- requeue ---------------------------------------------------------------------------------

  async function requeue(button, topic, jobId) {
    button.disabled = true;
    setText(button, "Requeuing…");
    try {
      await api("POST", `topics/${encodeURIComponent(topic)}/requeue`, { job_ids: [jobId] });
      setText(button, "Requeued");
      await refresh();
    } catch (error) {
      button.disabled = false;
      setText(button, "Requeue");
      if (error instanceof NeedToken) askForToken(true);
      else setStatus("error", `requeue of ${jobId} failed: ${error.message}`);
    }
  }

  // --- rendering: brokers --------------------------------------------------------------------

  function pill(text, kind) {
    return el("span", { class: `pill ${kind}` }, text);
  }

  function renderBrokers(data) {
    const me = data.broker;
    const rec = data.record;
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
        el("span", { class: "sep" }, `heartbeat ${fmtAge(rec.heartbeat_age)} ago`),
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
      const n = topic.counts[name];
      setText(cell, fmtCount(n));
      setClass(cell, "zero", n === 0);
      setClass(cell, "alert", name === "dead" && n > 0);
    }
    setText(row.querySelector('[data-field="oldest"]'), fmtAge(topic.oldest_pending_age));
    drawChart(row.querySelector("svg.spark"), topic.rates, window, { width: 180, height: 34, axes: false });
  }

  // --- rendering: one card per topic -------------------------------------------------------------

  function table(kind, headings) {
    const head = el("tr", {});
    for (const [text, cls] of headings) head.append(el("th", { class: cls || null }, text));
    return el("table", { class: `jobs ${kind}`, "data-list": kind }, el("thead", {}, head), el("tbody", {}));
  }

  function createCard(topic) {
    const card = el("section", { class: "card topic", id: `topic-${topic.name}`, "data-topic": topic.name });
    const head = el(
      "div",
      { class: "card-head" },
      el("h2", {}, el("span", { class: "muted" }, "topic "), topic.name),
      el("span", { class: "rates-now", "data-field": "rates-now" }),
    );
    const chart = newChart(640, 140, "big");
    chart.setAttribute("aria-label", `enqueue and completion rates of ${topic.name}`);
    card.append(
      head,
      el("div", { class: "chart-wrap" }, chart),
      el("h3", {}, "Claimed ", el("span", { class: "badge", "data-field": "claimed-count" })),
      table("claimed", [
        ["Job"],
        ["Worker"],
        ["Attempts", "num"],
        ["Lease left", "num"],
        ["Claimed for", "num"],
        ["Payload"],
      ]),
      el("p", { class: "empty", "data-empty": "claimed" }, "No job is claimed."),
      el("p", { class: "more", "data-more": "claimed" }),
      el("h3", {}, "Dead ", el("span", { class: "badge", "data-field": "dead-count" })),
      table("dead", [["Job"], ["Last error"], ["Attempts", "num"], ["Died", "num"], ["Payload"], [""]]),
      el("p", { class: "empty", "data-empty": "dead" }, "No dead jobs."),
      el("p", { class: "more", "data-more": "dead" }),
    );
    return card;
  }

  function createClaimedRow(job) {
    return el(
      "tr",
      { "data-job": job.id },
      el("td", { class: "id" }, el("code", {}, job.id)),
      el("td", { "data-field": "worker" }),
      el("td", { class: "num", "data-field": "attempts" }),
      el("td", { class: "num", "data-field": "lease" }),
      el("td", { class: "num", "data-field": "claimed-for" }),
      el("td", { class: "payload" }, el("code", { "data-field": "payload" })),
    );
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

  function updateList(card, kind, jobs, more, create, update) {
    const list = card.querySelector(`[data-list="${kind}"]`);
    syncChildren(list.tBodies[0], jobs, (j) => j.id, create, update);
    list.hidden = jobs.length === 0;
    card.querySelector(`[data-empty="${kind}"]`).hidden = jobs.length > 0;
    const moreNode = card.querySelector(`[data-more="${kind}"]`);
    moreNode.hidden = more === 0;
    setText(moreNode, more ? `… and ${fmtCount(more)} more not listed` : "");
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
    updateList(card, "claimed", topic.claimed, topic.claimed_more, createClaimedRow, updateClaimedRow);
    updateList(card, "dead", topic.dead, topic.dead_more, createDeadRow(topic.name), updateDeadRow);
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
    const hiddenTopics = data.topics_total - data.topics.length;
    $("more-topics").hidden = hiddenTopics <= 0;
    setText($("more-topics"), hiddenTopics > 0 ? `… and ${fmtCount(hiddenTopics)} more topics not shown` : "");
    syncChildren($("details"), data.topics, (t) => t.name, createCard, (card, t) => updateCard(card, t, window));
  }

  refresh();
})();
