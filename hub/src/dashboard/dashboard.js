"use strict";
// The dashboard page: polls the hub's JSON every few seconds and draws it. Every value
// goes in through textContent (never as HTML). Requests go to location.origin: the page
// may have been opened at a URL carrying credentials, which fetch() refuses.
(function () {
  const POLL_MS = 3000;
  const $ = (id) => document.getElementById(id);
  const api = (path) => location.origin + path;
  let polling = true;

  function when(ms) {
    return ms == null ? "–" : new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function text(id, value) {
    const el = $(id);
    el.textContent = value == null ? "–" : String(value);
    el.dataset.value = value == null ? "" : String(value);
  }

  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = !message;
  }

  function cell(row, value, cls) {
    const td = document.createElement("td");
    td.textContent = value == null ? "" : String(value);
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function rows(id, items, fill) {
    const body = $(id);
    body.replaceChildren();
    for (const item of items) {
      const tr = document.createElement("tr");
      fill(tr, item);
      body.appendChild(tr);
    }
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(name, attrs) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    return el;
  }

  // One series as an area and a line over the last ten minutes, scaled to its maximum.
  function chart(id, series, key) {
    const el = $(id);
    el.replaceChildren();
    const W = 600, H = 160, TOP = 14;
    const values = series.map((p) => p[key]);
    const max = Math.max(1, ...values);
    el.dataset.points = String(values.length);
    el.dataset.sum = String(values.reduce((a, b) => a + b, 0));
    el.dataset.max = String(max);
    el.appendChild(svg("line", { x1: 0, y1: H - 0.5, x2: W, y2: H - 0.5, class: "axis" }));
    const label = svg("text", { x: 4, y: 11 });
    label.textContent = "max " + max;
    el.appendChild(label);
    if (values.length < 2) return;
    const x = (i) => (i * W) / (values.length - 1);
    const y = (v) => H - (v * (H - TOP)) / max;
    const pts = values.map((v, i) => x(i).toFixed(1) + "," + y(v).toFixed(1));
    el.appendChild(svg("polygon", { points: "0," + H + " " + pts.join(" ") + " " + W + "," + H, class: "area" }));
    el.appendChild(svg("polyline", { points: pts.join(" "), class: "line" }));
  }

  function render(o) {
    text("hub-id", o.hub_id);
    text("operator", o.operator);
    text("updated", when(o.now_ms));
    const f = o.fleet;
    text("devices", f.devices);
    text("enrolled", f.enrolled);
    text("revoked-devices", f.revoked_devices);
    text("apps", f.apps);
    text("operators", f.operators);
    text("tokens-device", f.tokens_live.device);
    text("tokens-access", f.tokens_live.access);
    const r = o.revocation;
    text("revocation-entries", r.entries);
    const hb = $("heartbeat-age");
    hb.textContent = r.heartbeat_age_s == null ? "none yet" : r.heartbeat_age_s + " s ago";
    hb.dataset.value = r.heartbeat_age_s == null ? "" : String(r.heartbeat_age_s);
    hb.dataset.fresh = String(r.fresh);
    hb.title = "heartbeat every " + r.heartbeat_s + " s";
    text("issued-total", o.totals.issued);
    text("refused-total", o.totals.refused);
    for (const s of document.querySelectorAll(".sample-s")) s.textContent = String(o.sample_s);
    chart("chart-issued", o.series, "issued");
    chart("chart-refused", o.series, "refused");
    text("quarantine-count", o.quarantines.length);
    rows("quarantines", o.quarantines, (tr, q) => {
      tr.dataset.client = q.client;
      tr.dataset.untilMs = String(q.until_ms);
      cell(tr, q.client);
      cell(tr, when(q.until_ms) + " (in " + Math.max(0, Math.round((q.until_ms - o.now_ms) / 1000)) + " s)");
    });
    rows("alerts", o.alerts, (tr, a) => {
      tr.dataset.kind = a.outcome;
      tr.dataset.client = a.target;
      cell(tr, when(a.at_ms));
      cell(tr, a.outcome + (a.count > 1 ? " ×" + a.count : ""));
      cell(tr, a.target);
      cell(tr, a.reason, "reason");
    });
    rows("revocations", o.revocations, (tr, e) => {
      tr.dataset.target = e.target;
      tr.dataset.outcome = e.outcome;
      tr.dataset.actor = e.actor;
      cell(tr, when(e.at_ms));
      cell(tr, e.actor);
      cell(tr, e.target);
      cell(tr, e.outcome);
      cell(tr, e.reason, "reason");
    });
    document.body.dataset.loaded = "true";
  }

  async function getJson(path) {
    const response = await fetch(api(path), { credentials: "same-origin", cache: "no-store" });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (response.status === 401 || response.status === 403) {
      polling = false;
      const reason = body && body.error ? body.error : response.statusText;
      throw new Error(response.status + ": " + reason + (response.status === 401 ? " (reload the page to log in again)" : ""));
    }
    if (!body) throw new Error("the hub answered " + response.status);
    return { status: response.status, body };
  }

  async function poll() {
    try {
      const { status, body } = await getJson("/dashboard/api/overview");
      if (status !== 200) throw new Error(body.error || "the hub answered " + status);
      render(body);
      showError("");
    } catch (e) {
      showError(String(e.message || e));
    }
    if (polling) setTimeout(poll, POLL_MS);
  }

  function definitions(parent, pairs) {
    const dl = document.createElement("dl");
    for (const [k, v] of pairs) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v == null ? "–" : String(v);
      dl.append(dt, dd);
    }
    parent.appendChild(dl);
  }

  function table(parent, title, id, headers, items, fill) {
    const h = document.createElement("h3");
    h.textContent = title + " (" + items.length + ")";
    parent.appendChild(h);
    const t = document.createElement("table");
    const head = document.createElement("tr");
    for (const name of headers) {
      const th = document.createElement("th");
      th.textContent = name;
      head.appendChild(th);
    }
    const thead = document.createElement("thead");
    thead.appendChild(head);
    const body = document.createElement("tbody");
    body.id = id;
    for (const item of items) {
      const tr = document.createElement("tr");
      fill(tr, item);
      body.appendChild(tr);
    }
    t.append(thead, body);
    parent.appendChild(t);
  }

  const secs = (s) => (s == null ? null : when(s * 1000));

  async function showDevice(id) {
    const out = $("device-result");
    out.replaceChildren();
    out.dataset.id = id;
    out.dataset.found = "";
    if (!id) return;
    try {
      const { status, body } = await getJson("/dashboard/api/device?id=" + encodeURIComponent(id));
      if (status !== 200) throw new Error(body.error || "the hub answered " + status);
      out.dataset.found = String(body.found);
      const c = body.record;
      if (!c) {
        const p = document.createElement("p");
        p.textContent = "No client " + id + " is registered (its audit events are below, if any).";
        out.appendChild(p);
      } else {
        out.dataset.kind = c.kind;
        out.dataset.revoked = String(c.revoked_at != null);
        definitions(out, [
          ["id", c.id], ["kind", c.kind], ["role", c.role], ["groups", c.groups.join(", ") || "none"],
          ["registered", secs(c.created_at)], ["enrolled", secs(c.enrolled_at)],
          ["revoked", c.revoked_at == null ? "no" : secs(c.revoked_at)],
          ["quarantined until", body.quarantined_until_ms == null ? "not quarantined" : when(body.quarantined_until_ms)],
        ]);
      }
      const tokenRow = (tr, t) => {
        tr.dataset.cti = t.cti;
        tr.dataset.kind = t.kind;
        tr.dataset.revoked = String(t.revoked_with_client);
        cell(tr, t.kind); cell(tr, t.subject); cell(tr, t.audience); cell(tr, t.scope);
        cell(tr, secs(t.issued_at)); cell(tr, secs(t.expires_at));
        cell(tr, t.revoked_with_client ? "revoked (client revoked whole)" : "unexpired");
      };
      const tokenHeaders = ["kind", "subject", "audience", "scope", "issued", "expires", "state"];
      table(out, "Unexpired tokens issued to it", "device-tokens", tokenHeaders, body.tokens, tokenRow);
      table(out, "Unexpired access tokens for it", "device-access-tokens", tokenHeaders, body.access_tokens_for_it, tokenRow);
      const eventRow = (tr, e) => {
        tr.dataset.action = e.action;
        tr.dataset.outcome = e.outcome;
        cell(tr, when(e.at_ms)); cell(tr, e.actor); cell(tr, e.action); cell(tr, e.target);
        cell(tr, e.outcome + (e.count > 1 ? " ×" + e.count : "")); cell(tr, e.reason, "reason");
      };
      const eventHeaders = ["when", "actor", "action", "target", "outcome", "reason"];
      table(out, "Revocations", "device-revocations", eventHeaders, body.revocations, eventRow);
      table(out, "Audit events", "device-events", eventHeaders, body.events, eventRow);
      out.dataset.loaded = "true";
    } catch (e) {
      const p = document.createElement("p");
      p.className = "error";
      p.textContent = String(e.message || e);
      out.appendChild(p);
    }
  }

  $("device-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const id = $("device-id").value.trim();
    history.replaceState(null, "", "#device=" + encodeURIComponent(id));
    showDevice(id);
  });

  const wanted = /^#device=(.*)$/.exec(location.hash);
  if (wanted) {
    const id = decodeURIComponent(wanted[1]);
    $("device-id").value = id;
    showDevice(id);
  }
  poll();
})();
