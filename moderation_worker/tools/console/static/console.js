// moderation-worker console. Plain DOM, no frameworks, CSP-safe (no inline code).
// Comment texts are hostile input: every API value reaches the DOM through
// textContent / setAttribute / createElement, never through HTML parsing.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SVGNS = "http://www.w3.org/2000/svg";
  const finite = (x) => typeof x === "number" && Number.isFinite(x);
  const fmt = (x, d) => (finite(x) ? x.toFixed(d) : "–");
  const query = (path, params) => path + "?" + new URLSearchParams(params).toString();
  const state = {
    classifier: null, curve: null, appliedTimer: null, opTimer: null,
    proposed: null,      // threshold being considered (slider/number)
    touched: false,      // once the user moved the threshold, polls stop resetting it
    opSeq: 0,            // drops out-of-order operating-point answers
    lastRows: "",        // skip re-rendering an unchanged stream table
    queue: [], selected: 0, labelling: false,
    queueDirty: false,   // a label was sent since the last queue load
    labelled: new Set(), // "classifier\0id": labels travel via Kafka, the queue may lag
  };
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  const setMsg = (node, text, isError) => {
    node.textContent = text;
    node.classList.toggle("error", !!isError);
  };
  const fail = (node) => (e) => setMsg(node, "error: " + e.message, true);
  // "hateful" reads better than "positive" for the hate classifier.
  const words = () => (state.classifier === "hate" ? ["hateful", "not hateful"] : ["positive", "negative"]);
  class AuthError extends Error {}
  async function api(path, body) {
    const headers = { Accept: "application/json" };
    const opts = { credentials: "same-origin", headers };
    if (body !== undefined) {
      Object.assign(opts, { method: "POST", body: JSON.stringify(body) });
      headers["Content-Type"] = "application/json";
    }
    const res = await fetch(path, opts);
    if (res.status === 401) {
      $("banner").textContent = "session expired or wrong token — open the URL with ?token=… again";
      $("banner").hidden = false;
      throw new AuthError("session expired or wrong token (401)");
    }
    const data = await res.json().catch(() => null); // proxies may answer with HTML
    if (!res.ok) throw new Error((data && data.error) || `HTTP ${res.status}`);
    return data;
  }
  // A setTimeout chain, not setInterval: a slow backend never gets overlapping
  // polls. Stops on 401, since only a fresh login link can fix that.
  function every(ms, fn, errNode) {
    const tick = () => fn().then(() => setTimeout(tick, ms), (e) => {
      fail(errNode)(e);
      if (!(e instanceof AuthError)) setTimeout(tick, ms);
    });
    tick();
  }
  function textCell(tag, text) {
    const missing = text === null || text === undefined;
    const n = el(tag, missing ? "text missing" : "text", missing ? "(no text)" : text);
    if (!missing) n.setAttribute("title", String(text)); // full text on hover; CSS cuts it
    return n;
  }
  function shortTime(s) {
    const d = new Date(s);
    return Number.isNaN(d.getTime()) ? String(s ?? "") : d.toLocaleTimeString([], { hour12: false });
  }

  // ---- header + live stream -------------------------------------------------
  function fillClassifiers(list) {
    const sel = $("classifier");
    if (Array.from(sel.options, (o) => o.value).join("\0") === list.join("\0")) return;
    sel.replaceChildren(...list.map((c) => { const o = el("option", null, c); o.value = c; return o; }));
    if (list.includes(state.classifier)) sel.value = state.classifier;
    else if (list.length) selectClassifier(list[0]);
  }
  function miniTable(head, rows) {
    const t = el("table", "mini"), tr = el("tr");
    tr.append(...head.map((h) => el("th", null, h)));
    t.append(tr, ...rows.map((cells) => {
      const r = el("tr");
      r.append(...cells.map((c, i) => el("td", i ? "num" : null, c)));
      return r;
    }));
    return t;
  }
  function renderRates(rates) {
    $("rates").replaceChildren(
      el("p", "small muted", `per minute, last ${rates.window_s ?? "?"} s`),
      miniTable(["classifier", "/min", "flagged/min"], Object.entries(rates.per_classifier || {})
        .map(([c, r]) => [c, fmt(r && r.per_min, 1), fmt(r && r.flagged_per_min, 1)])),
      miniTable(["community", "/min"], Object.entries(rates.per_community || {}).map(([c, v]) => [c, fmt(v, 1)])));
  }
  const renderList = (ul, entries) => ul.replaceChildren(...entries.map((t) => el("li", null, t)));
  function renderOverview(ov) {
    $("user").textContent = ov.user ?? "?";
    fillClassifiers(ov.classifiers || []);
    renderRates(ov.rates || {});
    renderList($("dead-letters"), Object.entries(ov.dead_letters || {}).map(([k, v]) => `${k}: ${v}`));
    $("verdicts-seen").textContent = String(ov.verdicts_seen ?? "–");
    renderList($("partitions"), Object.entries(ov.partitions || {}).map(([p, v]) => `partition ${p}: version ${v}`));
    $("policy").textContent = JSON.stringify(ov.policy ?? null, null, 2);
  }
  function renderStream(rows) {
    const key = JSON.stringify(rows);
    if (key === state.lastRows) return; // keeps the user's text selection stable
    state.lastRows = key;
    $("stream-empty").hidden = rows.length > 0;
    $("stream-rows").replaceChildren(...rows.map((r) => {
      const shadow = r.mode === "shadow";
      const tr = el("tr", "verdict-row" + (r.flagged ? " flagged" : "") + (shadow ? " shadow" : ""));
      tr.setAttribute("data-id", String(r.id));
      const time = el("td", "time", shortTime(r.scored_at)), id = el("td", "id", r.id);
      time.setAttribute("title", String(r.scored_at ?? ""));
      id.setAttribute("title", String(r.id));
      tr.append(time, id, textCell("td", r.text), el("td", "num", fmt(r.p, 3)),
        el("td", "decision", (r.flagged ? "flagged" : "not flagged") + (shadow ? " (shadow)" : "")),
        el("td", null, `${fmt(r.threshold, 2)} ${r.threshold_source ?? ""}`.trim()),
        el("td", "num", r.control_version ?? "–"));
      return tr;
    }));
  }
  async function loadRecent() {
    const c = state.classifier;
    if (!c) return; // not known until the first overview arrives
    const rec = await api(query("/api/recent", { classifier: c, n: 50 }));
    if (c === state.classifier) renderStream(rec.rows || []);
  }
  async function pollStream() {
    renderOverview(await api("/api/overview"));
    await loadRecent();
    setMsg($("status"), "updated " + new Date().toLocaleTimeString([], { hour12: false }), false);
  }

  // ---- operating point: charts, slider, publish -----------------------------
  const G = { L: 36, T: 8, W: 204, H: 184 }; // plot box inside viewBox 0 0 250 228
  // Index of the curve point whose threshold is closest to t (-1 if none).
  function nearest(ths, t, len) {
    if (!Array.isArray(ths) || !finite(t)) return -1;
    let best = -1, dist = Infinity;
    for (let i = 0; i < Math.min(ths.length, len); i++)
      if (finite(ths[i]) && Math.abs(ths[i] - t) < dist) [dist, best] = [Math.abs(ths[i] - t), i];
    return best;
  }
  function drawChart(svg, xs, ys, ths, xName, yName, diagonal) {
    const X = (v) => (G.L + v * G.W).toFixed(1);
    const Y = (v) => (G.T + (1 - v) * G.H).toFixed(1);
    const kids = [];
    for (let i = 0; i <= 5; i++) {
      const v = i / 5;
      kids.push(svgEl("line", { x1: X(v), y1: Y(0), x2: X(v), y2: Y(1), class: "grid" }),
        svgEl("line", { x1: X(0), y1: Y(v), x2: X(1), y2: Y(v), class: "grid" }),
        svgEl("text", { x: X(v), y: +Y(0) + 11, class: "tick", "text-anchor": "middle" }, v.toFixed(1)),
        svgEl("text", { x: +X(0) - 4, y: +Y(v) + 3, class: "tick", "text-anchor": "end" }, v.toFixed(1)));
    }
    kids.push(svgEl("rect", { x: X(0), y: Y(1), width: G.W, height: G.H, class: "frame" }),
      svgEl("text", { x: X(0.5), y: 226, class: "axis-label", "text-anchor": "middle" }, xName),
      svgEl("text", { x: 10, y: Y(0.5), class: "axis-label", "text-anchor": "middle",
        transform: `rotate(-90 10 ${Y(0.5)})` }, yName));
    if (diagonal) kids.push(svgEl("line", { x1: X(0), y1: Y(0), x2: X(1), y2: Y(1), class: "chance" }));
    if (Array.isArray(xs) && Array.isArray(ys)) {
      const len = Math.min(xs.length, ys.length), pts = [];
      for (let i = 0; i < len; i++) if (finite(xs[i]) && finite(ys[i])) pts.push(`${X(xs[i])},${Y(ys[i])}`);
      kids.push(svgEl("polyline", { points: pts.join(" "), class: "curve" }));
      const marks = [["current", "in force", state.curve.threshold], ["proposed", "proposed", state.proposed]];
      for (const [cls, name, t] of marks) {
        const i = nearest(ths, t, len);
        if (i < 0 || !finite(xs[i]) || !finite(ys[i])) continue;
        const c = svgEl("circle", { cx: X(xs[i]), cy: Y(ys[i]), r: cls === "current" ? 6 : 3.5, class: cls });
        c.append(svgEl("title", {}, `${name} ${fmt(t, 2)}: ${xName} ${fmt(xs[i], 3)}, ${yName} ${fmt(ys[i], 3)}`));
        kids.push(c);
      }
    }
    svg.replaceChildren(...kids);
  }
  function drawCharts() {
    const cv = state.curve || {}, roc = cv.roc || {}, pr = cv.pr || {};
    drawChart($("roc"), roc.fpr, roc.tpr, roc.thresholds, "false-positive rate", "true-positive rate", true);
    drawChart($("pr"), pr.recall, pr.precision, pr.thresholds, "recall", "precision", false);
  }
  async function loadCurve() {
    const c = state.classifier;
    if (!c) return;
    const cv = await api(query("/api/curve", { classifier: c }));
    if (c !== state.classifier) return;
    state.curve = cv;
    $("in-force").textContent = `in force: ${fmt(cv.threshold, 2)} (${cv.threshold_source ?? "?"})`;
    const note = $("curve-note");
    note.hidden = !!(cv.roc && cv.pr);
    note.textContent = `label some comments below to see the curve (${cv.labelled ?? 0} labelled)`;
    if (!state.touched && finite(cv.threshold)) setProposed(cv.threshold, null);
    else if (state.proposed === null) setProposed(Number($("threshold-input").value), null);
    drawCharts();
    scheduleOp(); // the labelled set and rates moved on: refresh the numbers too
  }
  // from: which input the value came from, so we never rewrite a field mid-typing.
  function setProposed(v, from) {
    state.proposed = v;
    if (from !== "range") $("threshold-input").value = String(v);
    if (from !== "number") { $("threshold-value").value = String(v); markNumber(true); }
    if (state.curve) drawCharts();
    scheduleOp();
  }
  function scheduleOp() { // debounced: a dragged slider fires dozens of events
    clearTimeout(state.opTimer);
    state.opTimer = setTimeout(() => loadOp().catch(fail($("op-status"))), 150);
  }
  async function loadOp() {
    const c = state.classifier, t = state.proposed;
    if (!c || !finite(t)) return;
    const seq = ++state.opSeq;
    const op = await api(query("/api/operating-point", { classifier: c, threshold: String(t) }));
    if (seq !== state.opSeq || c !== state.classifier) return;
    const share = finite(op.flag_share) ? (op.flag_share * 100).toFixed(1) + "%" : "–";
    const out = { precision: fmt(op.precision, 3), recall: fmt(op.recall, 3), fpr: fmt(op.fpr, 3),
      flags: fmt(op.flags_per_hour, 1), share, verdicts: fmt(op.verdicts_per_hour, 1),
      labelled: String(op.labelled ?? "–") };
    for (const [k, v] of Object.entries(out)) $("op-" + k).textContent = v;
    setMsg($("op-status"), `at threshold ${fmt(op.threshold, 2)}`, false);
  }
  function markNumber(ok) {
    $("threshold-value").classList.toggle("invalid", !ok);
    $("threshold-value").setAttribute("aria-invalid", String(!ok));
    $("publish").disabled = !ok; // never publish a value other than the one shown
  }
  function onNumberInput(e) {
    const raw = e.target.value, v = Number(raw);
    const ok = raw !== "" && finite(v) && v >= 0 && v <= 1;
    state.touched = true; // even half-typed: the curve poll must not overwrite it
    markNumber(ok);
    if (ok) setProposed(v, "number");
  }
  async function publish() {
    const st = $("publish-status"), wait = $("publish-waiting"), btn = $("publish");
    const c = state.classifier, t = state.proposed;
    if (!c || !finite(t)) return;
    clearTimeout(state.appliedTimer); // a newer publish supersedes the old wait
    wait.textContent = "";
    btn.disabled = true;
    setMsg(st, "publishing…", false);
    try {
      const res = await api("/api/threshold", {
        classifier: c, threshold: t, community: $("community").value.trim() || null,
        reason: $("reason").value.trim(),
      });
      setMsg(st, `published ${res.key} at offset ${res.offset}; waiting for workers…`, false);
      waitApplied(res.target_version, Date.now());
    } catch (e) { setMsg(st, "publish failed: " + e.message, true); }
    btn.disabled = false;
  }
  // Workers pick the control record up asynchronously; poll until every
  // partition the console sees reports the new version.
  function waitApplied(version, started) {
    const st = $("publish-status"), wait = $("publish-waiting");
    const tick = async () => {
      try {
        const a = await api(query("/api/applied", { version }));
        const waiting = (a.waiting || []).join(", ");
        wait.textContent = !a.applied && waiting ? `(partitions still behind: ${waiting})` : "";
        if (a.applied) {
          setMsg(st, `applied by every partition (version ${version})`, false);
          return loadCurve().catch(fail($("op-status"))); // "in force" moved
        }
        if (Date.now() - started > 300000) {
          return setMsg(st, `not applied after 5 minutes (version ${version})`, true);
        }
      } catch (e) {
        setMsg(st, "could not check whether it was applied: " + e.message, true);
        if (e instanceof AuthError) return;
      }
      state.appliedTimer = setTimeout(tick, 500);
    };
    state.appliedTimer = setTimeout(tick, 500);
  }

  // ---- review queue ---------------------------------------------------------
  const labelKey = (id) => `${state.classifier}\0${id}`;
  async function loadQueue(replace) {
    const c = state.classifier;
    if (!c) return;
    const res = await api(query("/api/queue", { classifier: c, n: 20 }));
    if (c !== state.classifier) return;
    const fresh = (res.items || []).filter((it) => !state.labelled.has(labelKey(it.id)));
    const selId = state.queue[state.selected] && state.queue[state.selected].id;
    // Top up: keep the current order and append unseen items; "replace" reloads.
    const have = new Set(replace ? [] : state.queue.map((it) => it.id));
    state.queue = (replace ? [] : state.queue).concat(fresh.filter((it) => !have.has(it.id)))
      .slice(0, Math.max(20, state.queue.length));
    state.selected = Math.max(0, state.queue.findIndex((it) => it.id === selId));
    state.queueDirty = false;
    renderQueue();
  }
  function renderQueue() {
    $("queue").replaceChildren(...state.queue.map((it, i) => {
      const li = el("li", "queue-item" + (i === state.selected ? " selected" : ""));
      li.setAttribute("data-id", String(it.id));
      if (i === state.selected) li.setAttribute("aria-current", "true");
      const why = String(it.why ?? ""), meta = el("div", "meta");
      meta.append(el("span", "id", it.id), el("span", "p", "p " + fmt(it.p, 3)),
        el("span", "thr", "threshold " + fmt(it.threshold, 2)),
        el("span", "why why-" + why.replace(/[^a-z0-9_-]/gi, ""), why));
      li.append(textCell("div", it.text), meta);
      li.addEventListener("click", () => select(i));
      return li;
    }));
    const empty = state.queue.length === 0;
    $("queue-empty").hidden = !empty;
    $("label-yes").disabled = $("label-no").disabled = empty;
  }
  function select(i) {
    if (!state.queue.length) return;
    state.selected = Math.max(0, Math.min(state.queue.length - 1, i));
    renderQueue();
    const cur = $("queue").children[state.selected];
    if (cur) cur.scrollIntoView({ block: "nearest" });
  }
  async function label(value) {
    const it = state.queue[state.selected];
    if (!it || state.labelling) return; // one label at a time: no double-sends on key repeat
    state.labelling = true;
    const [pos, neg] = words();
    try {
      const res = await api("/api/label", { id: it.id, classifier: state.classifier, label: value });
      state.labelled.add(labelKey(it.id));
      const i = state.queue.indexOf(it); // the selection may have moved meanwhile (j/k)
      if (i >= 0) state.queue.splice(i, 1);
      if (i >= 0 && i < state.selected) state.selected--;
      state.selected = Math.min(state.selected, Math.max(0, state.queue.length - 1));
      state.queueDirty = true;
      setMsg($("label-status"), `labelled ${it.id} as ${value ? pos : neg} (offset ${res.offset})`, false);
      renderQueue();
    } catch (e) { setMsg($("label-status"), `could not label ${it.id}: ${e.message}`, true); }
    state.labelling = false;
  }
  // Only when empty or after labelling, so items never move under the moderator.
  async function queueTick() {
    if (state.queue.length === 0) await loadQueue(true);
    else if (state.queueDirty) await loadQueue(false);
  }

  // ---- wiring ---------------------------------------------------------------
  function updateWords() {
    const [pos, neg] = words();
    $("label-yes").textContent = `${pos} (h)`;
    $("label-no").textContent = `${neg} (n)`;
    for (const [sel, w] of [[".pos-word", pos], [".neg-word", neg]]) {
      document.querySelectorAll(sel).forEach((n) => { n.textContent = w; });
    }
  }
  function selectClassifier(c) {
    $("classifier").value = c;
    Object.assign(state, { classifier: c, curve: null, touched: false, proposed: null, lastRows: "",
      queue: [], selected: 0 });
    $("stream-rows").replaceChildren(); setMsg($("label-status"), "", false); // old classifier's
    updateWords(); renderQueue(); drawCharts();
    loadRecent().catch(fail($("status")));
    loadCurve().catch(fail($("op-status")));
    loadQueue(true).catch(fail($("label-status")));
  }
  function onKey(e) {
    if (e.ctrlKey || e.metaKey || e.altKey || e.defaultPrevented) return;
    const t = e.target;
    if (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName))) return;
    const act = { h: () => label(1), y: () => label(1), n: () => label(0),
      j: () => select(state.selected + 1), k: () => select(state.selected - 1),
      r: () => loadQueue(true).catch(fail($("label-status"))) }[e.key.toLowerCase()];
    if (act) { e.preventDefault(); act(); }
  }
  function init() {
    $("classifier").addEventListener("change", (e) => selectClassifier(e.target.value));
    $("threshold-input").addEventListener("input", (e) => {
      state.touched = true; // from now on polls leave the proposal alone
      setProposed(Number(e.target.value), "range");
    });
    $("threshold-value").addEventListener("input", onNumberInput);
    $("threshold-reset").addEventListener("click", () => {
      state.touched = false;
      if (state.curve && finite(state.curve.threshold)) setProposed(state.curve.threshold, null);
    });
    $("publish").addEventListener("click", publish);
    $("label-yes").addEventListener("click", () => label(1));
    $("label-no").addEventListener("click", () => label(0));
    $("queue-reload").addEventListener("click", () => loadQueue(true).catch(fail($("label-status"))));
    document.addEventListener("keydown", onKey);
    updateWords(); renderQueue(); drawCharts();
    every(1000, pollStream, $("status")); // first overview also picks the classifier
    every(5000, loadCurve, $("op-status"));
    every(5000, queueTick, $("label-status"));
  }
  init();
})();
