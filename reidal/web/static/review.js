/* reidal pair review: one static page, plain JavaScript, no build step.
 *
 * What the page guarantees about answers:
 * - Every answer gets a request id (batch id + pair id + a random nonce) the moment it is
 *   given, and is kept in localStorage with it until the server confirmed it. Resending it
 *   (after a lost response, a network outage or a reload) reuses that request id, so the
 *   server stores it once.
 * - An answer is shown as saved only after the server said so; until then it is "saving".
 * - Answers and undos are sent one at a time, in the order given, so "answer, undo,
 *   answer again" reaches the server in that order.
 * - When the server cannot be reached the page says so, keeps everything and retries with
 *   a growing delay (at once when the browser reports being online again).
 */
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;
  const STORE_KEY = "reidal.review.v1";
  const NAME_KEY = "reidal.annotator";
  const GUARD_MS = 250;        // input ignored this long after a new pair shows (double clicks)
  const FIRST_RETRY_MS = 1000;
  const MAX_RETRY_MS = 15000;
  const REQUEST_TIMEOUT_MS = 60000;
  const WORDS = { SAME: "Same", DIFFERENT: "Different", UNSURE: "Unsure" };

  // ------------------------------------------------------------------ persistent state

  function loadStore() {
    try {
      const s = JSON.parse(localStorage.getItem(STORE_KEY) || "null");
      if (s && typeof s.sessions === "object" && Array.isArray(s.outbox)) return s;
    } catch (e) { /* a damaged entry starts afresh */ }
    return { sessions: {}, outbox: [] };
  }

  const store = loadStore();

  function save() {
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify(store));
    } catch (e) {
      showAlert("This browser does not let the page keep answers (local storage is full or " +
                "disabled): do not reload until every answer shows as saved.");
    }
    document.body.dataset.outbox = String(store.outbox.length);
  }

  function session(cid) {
    if (!store.sessions[cid]) {
      store.sessions[cid] = { batch_id: null, batch_request: null, budget: "", records: [] };
    }
    return store.sessions[cid];
  }

  function annotator() { return (localStorage.getItem(NAME_KEY) || "").trim(); }

  function nonce() {
    const bytes = new Uint8Array(8);
    crypto.getRandomValues(bytes);  // works on plain http too, unlike crypto.randomUUID
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // ------------------------------------------------------------------ what is on screen

  const view = {
    name: "", token: 0, cid: null, mode: null, scope: null, batch: null, pairs: [],
    index: -1, shownAt: 0, accepting: false, collection: null, identities: null,
    title: "",
  };

  function showView(id) {
    for (const el of document.querySelectorAll("main > section.view")) el.hidden = el.id !== id;
    view.name = id;
    view.token += 1;
    return view.token;
  }

  function stale(token) { return token !== view.token; }

  function announce(text, kind) {
    const el = $("status");
    el.textContent = text;
    el.dataset.kind = kind || "";
  }

  function showAlert(text) {
    const el = $("alert");
    el.textContent = text;
    el.hidden = !text;
  }

  function setNav(cid, current) {
    const nav = $("nav");
    nav.hidden = !cid;
    if (!cid) return;
    $("nav-review").href = `#/c/${enc(cid)}/review`;
    $("nav-summary").href = `#/c/${enc(cid)}/summary`;
    $("panel-summary").href = `#/c/${enc(cid)}/summary`;
    for (const [id, name] of [["nav-review", "review"], ["nav-summary", "summary"]]) {
      if (name === current) $(id).setAttribute("aria-current", "page");
      else $(id).removeAttribute("aria-current");
    }
  }

  function focusHeading(id) {
    const h = $(id);
    h.tabIndex = -1;
    h.focus({ preventScroll: true });
  }

  function pct(x) {
    return `${(100 * x).toLocaleString(undefined, { maximumFractionDigits: 3 })} %`;
  }
  function num(x) { return Number(x).toLocaleString(); }
  function imageUrl(cid, iid) { return `api/images/${enc(cid)}/${enc(iid)}`; }

  // ------------------------------------------------------------------ talking to the server

  class ApiError extends Error {
    constructor(status, code, message, retryable) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryable = retryable;
    }
  }

  // Access tokens: when the gRPC server checks them, each person signs in once with their
  // own; the review server keeps it (an HttpOnly session cookie names it), never the page.
  // pinned: the annotator name the token records answers as ("" when the name is free):
  // the gRPC server refuses any other, so the page fills it in and does not let it change.
  const auth = { required: false, signedIn: true, pinned: "" };

  function learnSession(s) {
    auth.required = Boolean(s.auth_required);
    auth.signedIn = Boolean(s.signed_in) || !s.auth_required;
    auth.pinned = (s.signed_in && s.pinned_annotator) || "";
  }

  async function api(method, path, body) {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), REQUEST_TIMEOUT_MS);
    let resp;
    try {
      resp = await fetch(path, {
        method, cache: "no-store", signal: ctrl.signal,
        headers: body === undefined ? {} : { "Content-Type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new ApiError(0, "NETWORK", "the review server cannot be reached", true);
    } finally {
      clearTimeout(timer);
    }
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (resp.status === 401 && path !== "api/session") {
      // Not signed in (or the session was forgotten by a restart): keep whatever was being
      // sent (retryable) and ask for the token again. The server evidently wants one even
      // if the first session check did not get through, so ask for it (else every route
      // would run into the 401 again and route again).
      auth.required = true;
      auth.signedIn = false;
      if (view.name !== "view-token") setTimeout(route, 0);
      throw new ApiError(401, "UNAUTHENTICATED", "sign in with your access token", true);
    }
    if (!resp.ok) {
      const err = (data && data.error) || {};
      const retryable = typeof err.retryable === "boolean" ? err.retryable
        : [0, 429, 502, 503, 504].includes(resp.status);
      throw new ApiError(resp.status, err.code || `HTTP_${resp.status}`,
                         err.message || resp.statusText || "request failed", retryable);
    }
    if (data === null) throw new ApiError(resp.status, "BAD_RESPONSE", "empty response", true);
    return data;
  }

  let wake = null;  // resolves the current retry wait early (browser back online)

  function pause(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() { clearTimeout(timer); wake = null; resolve(); }
      wake = done;
    });
  }

  function offlineText(delay, what) {
    return `Connection to the server lost: ${what}. Retrying in ${Math.round(delay / 1000)} s.`;
  }

  /** A read (or an idempotent write) retried until it works or is refused. */
  async function fetchRetry(method, path, body, what) {
    let delay = FIRST_RETRY_MS;
    for (;;) {
      try {
        const data = await api(method, path, body);
        if ($("status").dataset.kind === "offline") announce("Connection back.", "");
        return data;
      } catch (err) {
        if (!err.retryable) throw err;
        announce(offlineText(delay, what || "waiting for the server"), "offline");
        await pause(delay);
        delay = Math.min(delay * 2, MAX_RETRY_MS);
      }
    }
  }

  // ------------------------------------------------------------------ the outbox

  let pumping = false;

  function findRecord(cid, rid) {
    return session(cid).records.find((r) => r.rid === rid) || null;
  }

  async function perform(op) {
    const r = findRecord(op.cid, op.rid);
    if (!r) return;
    if (op.kind === "answer") {
      r.sent = true;
      save();
      const body = { label: r.label, annotator_id: r.annotator_id, request_id: r.rid,
                     started_at: r.started_at, ended_at: r.ended_at };
      if (r.pair_id) Object.assign(body, { batch_id: r.batch_id, pair_id: r.pair_id });
      else Object.assign(body, { image_a: r.image_a, image_b: r.image_b });
      const data = await api("POST", `api/collections/${enc(op.cid)}/answers`, body);
      r.status = "saved";
      r.answer_id = data.answer_id;
      if (op.cid === view.cid) renderCollection(data.collection);
      announce(`Saved: ${WORDS[r.label]} (${describe(r)}).`, "saved");
      if (data.contradictions.length) {
        showAlert(`Your answer (${describe(r)}) contradicts earlier answers: ` +
                  `${data.contradictions[0].explanation}. The summary lists it for a re-check.`);
      }
    } else if (op.kind === "undo") {
      if (r.answer_id) {
        const data = await api("POST", `api/collections/${enc(op.cid)}/undo`,
                               { answer_id: r.answer_id, actor: annotator(),
                                 batch_id: r.batch_id || "" });
        if (op.cid === view.cid) renderCollection(data.collection);
      }
      r.status = "undone";
      r.undoing = false;
      announce(`Undone: ${describe(r)}.`, "saved");
    }
  }

  function refuse(op, err) {
    const r = findRecord(op.cid, op.rid);
    if (!r) return;
    if (op.kind === "answer") {
      r.status = "failed";
      r.error = err.message;
      showAlert(`The server refused the answer (${describe(r)}): ${err.message}`);
    } else {
      r.undoing = false;
      showAlert(`The server refused to undo (${describe(r)}): ${err.message}`);
    }
  }

  async function pump() {
    if (pumping) return;
    pumping = true;
    let delay = FIRST_RETRY_MS;
    let troubled = false;
    try {
      while (store.outbox.length) {
        const op = store.outbox[0];
        try {
          await perform(op);
          store.outbox.shift();
          delay = FIRST_RETRY_MS;
        } catch (err) {
          if (!(err instanceof ApiError) || !err.retryable) {
            refuse(op, err instanceof ApiError ? err : { message: String(err) });
            store.outbox.shift();
          } else {
            troubled = true;
            const waiting = store.outbox.length;
            announce(offlineText(delay, `${waiting} change${waiting === 1 ? " is" : "s are"} ` +
                                 "kept in this page and will be sent"), "offline");
            save();
            refresh();
            await pause(delay);
            delay = Math.min(delay * 2, MAX_RETRY_MS);
            continue;
          }
        }
        save();
        refresh();
      }
      if (troubled) announce("Connection back: every answer is saved.", "saved");
    } finally {
      pumping = false;
      save();
      refresh();
    }
  }

  window.addEventListener("online", () => { if (wake) wake(); });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && wake) wake();
  });

  // ------------------------------------------------------------------ review: pairs

  function keyOf(p) { return p.pair_id ? `pair:${p.pair_id}` : `img:${p.image_a}|${p.image_b}`; }

  function scopeRecords() {
    if (!view.cid || !view.scope) return [];
    return session(view.cid).records.filter((r) => r.scope === view.scope);
  }

  /** The answer that counts for a pair on this page (pending or saved, not being undone). */
  function currentRecord(key) {
    const rs = scopeRecords().filter((r) => r.key === key);
    for (let i = rs.length - 1; i >= 0; i -= 1) {
      const r = rs[i];
      if ((r.status === "pending" || r.status === "saved") && !r.undoing) return r;
    }
    return null;
  }

  function isDone(p) {
    const key = keyOf(p);
    if (currentRecord(key)) return true;
    if (scopeRecords().some((r) => r.key === key)) return false;  // answered here, then undone
    return Boolean(p.answered);
  }

  function describe(r) {
    if (r.pair_id && view.pairs.length) {
      const i = view.pairs.findIndex((p) => p.pair_id === r.pair_id);
      if (i >= 0 && r.scope === view.scope) return `pair ${i + 1}`;
    }
    return `${r.image_a} × ${r.image_b}`;
  }

  function showNext() {
    const i = view.pairs.findIndex((p) => !isDone(p));
    if (i < 0) showPanel();
    else showPair(i);
  }

  const panes = {};

  function showPair(i) {
    const p = view.pairs[i];
    view.index = i;
    view.shownAt = Date.now();
    view.accepting = false;
    const box = $("pair");
    box.hidden = false;
    $("batch-panel").hidden = true;
    box.dataset.pairId = p.pair_id || "";
    box.dataset.imageA = p.image_a;
    box.dataset.imageB = p.image_b;
    box.dataset.key = keyOf(p);
    box.removeAttribute("data-accepting");
    for (const side of ["a", "b"]) {
      const iid = side === "a" ? p.image_a : p.image_b;
      $(`id-${side}`).textContent = iid;
      $(`viewport-${side}`).setAttribute("aria-label",
                                         `Image ${side.toUpperCase()}: ${iid} (zoomable)`);
      panes[side].show(imageUrl(view.cid, iid), `Image ${side.toUpperCase()}: ${iid}`);
    }
    $("similarity").textContent =
      typeof p.similarity === "number" ? p.similarity.toFixed(3) : "—";
    $("why").textContent = p.why || "";
    $("current-answer-row").hidden = !p.current;
    $("current-answer").textContent = p.current || "";
    const token = view.token;
    setTimeout(() => {
      if (stale(token) || view.index !== i) return;
      view.accepting = true;
      box.dataset.accepting = "true";
    }, GUARD_MS);
    const next = view.pairs.find((q, j) => j > i && !isDone(q));
    if (next) {  // fetch the next pair's images while this one is looked at
      for (const iid of [next.image_a, next.image_b]) new Image().src = imageUrl(view.cid, iid);
    }
    refresh();
  }

  function showPanel() {
    view.index = -1;
    view.accepting = false;
    $("pair").removeAttribute("data-accepting");
    $("pair").hidden = true;
    $("batch-panel").hidden = false;
    refresh();
  }

  function answer(label) {
    if (view.name !== "view-review" || view.index < 0 || !view.accepting) return;
    const p = view.pairs[view.index];
    const key = keyOf(p);
    if (currentRecord(key)) return;
    const now = Date.now();
    const r = {
      rid: p.pair_id ? `${view.batch.batch_id}:${p.pair_id}:${nonce()}` : `recheck:${nonce()}`,
      key, scope: view.scope, batch_id: p.pair_id ? view.batch.batch_id : "",
      pair_id: p.pair_id || "", image_a: p.image_a, image_b: p.image_b, label,
      annotator_id: annotator(), started_at: view.shownAt, ended_at: now,
      status: "pending", sent: false, undoing: false, answer_id: null,
    };
    session(view.cid).records.push(r);
    store.outbox.push({ kind: "answer", cid: view.cid, rid: r.rid });
    save();
    announce(`${WORDS[label]} (${describe(r)}): saving…`, "");
    showNext();
    pump();
  }

  function undo() {
    if (view.name !== "view-review") return;
    const rs = scopeRecords();
    let r = null;
    for (let i = rs.length - 1; i >= 0 && !r; i -= 1) {
      if ((rs[i].status === "pending" || rs[i].status === "saved") && !rs[i].undoing) r = rs[i];
    }
    if (!r) {
      announce("Nothing to undo.", "");
      return;
    }
    const queued = store.outbox.findIndex((op) => op.kind === "answer" && op.rid === r.rid);
    if (queued >= 0 && !r.sent) {
      // never left the page (perform marks it sent before its first request goes out):
      // nothing to delete on the server
      store.outbox.splice(queued, 1);
      r.status = "undone";
      announce(`Undone: ${describe(r)}.`, "saved");
    } else {
      r.undoing = true;
      store.outbox.push({ kind: "undo", cid: view.cid, rid: r.rid });
      announce(`Undoing ${describe(r)}…`, "");
    }
    save();
    const i = view.pairs.findIndex((p) => keyOf(p) === r.key);
    if (i >= 0) showPair(i);
    else refresh();
    pump();
  }

  // ------------------------------------------------------------------ review: chrome

  function renderCollection(c) {
    if (!c || c.collection_id !== view.cid) return;
    view.collection = c;
    $("budget").textContent =
      `Budget used: ${pct(c.budget_used)} (${num(c.pairs_asked)} of ${num(c.total_pairs)} ` +
      `pairs asked) · ${num(c.answer_count)} answers · cycle ${c.cycle}`;
  }

  function refresh() {
    document.body.dataset.outbox = String(store.outbox.length);
    if (view.name !== "view-review") return;
    const records = scopeRecords();
    const n = view.pairs.length;
    const done = view.pairs.filter(isDone).length;
    const saved = view.pairs.filter((p) => {
      const r = currentRecord(keyOf(p));
      return r ? r.status === "saved" : Boolean(p.answered);
    }).length;
    const pending = done - saved;
    $("log-title").textContent = view.mode === "recheck" ? "Your answers in this re-check"
      : "Your answers in this batch";
    const label = view.mode === "recheck" ? view.title
      : view.batch ? `Batch ${view.batch.cycle}` : "No batch yet";
    let text = `${label}: ${done} of ${n} answered, ${saved} saved`;
    if (pending > 0) text += `, ${pending} saving`;
    if (view.index >= 0) text += ` · showing pair ${view.index + 1}`;
    $("batch-progress").textContent = n ? text : label;
    $("batch-bar").max = Math.max(n, 1);
    $("batch-bar").value = done;

    const log = $("answer-log");
    log.replaceChildren(...records.map((r) => {
      const li = document.createElement("li");
      const state = r.undoing ? "pending" : r.status;
      li.dataset.state = state;
      li.dataset.key = r.key;
      li.dataset.label = r.label;
      const what = { pending: r.undoing ? "undoing…" : "saving…", saved: "saved",
                     undone: "undone", failed: "refused" }[state];
      li.textContent = `${describe(r)}: ${WORDS[r.label]} — ${what}`;
      return li;
    }));
    $("btn-undo").disabled = !records.some(
      (r) => (r.status === "pending" || r.status === "saved") && !r.undoing);

    const waiting = store.outbox.filter((op) => op.cid === view.cid).length;
    const form = $("batch-form");
    let panel;
    if (view.mode === "recheck") {
      form.hidden = true;
      panel = n ? "Every pair of this contradiction has an answer from you now. The summary " +
                  "shows whether it is resolved." : "This contradiction has no pairs left.";
    } else {
      form.hidden = false;
      const b = view.batch;
      if (!b) panel = "No batch yet: ask the server for the pairs that matter most now.";
      else if (!b.pairs.length) panel = `Nothing to ask in this batch: ${b.reason_text}`;
      else panel = `Batch ${b.cycle} is done: all ${n} pairs answered.`;
      $("btn-next-batch").textContent = b ? "Next batch" : "Get pairs";
    }
    if (waiting) panel += ` Waiting for ${waiting} change${waiting === 1 ? "" : "s"} to be saved.`;
    $("batch-panel-text").textContent = panel;
    $("btn-next-batch").disabled = waiting > 0 || batchRequesting;
  }

  // ------------------------------------------------------------------ review: batches

  let batchRequesting = false;

  function setBatch(batch) {
    view.batch = batch;
    view.pairs = batch ? batch.pairs : [];
    view.scope = batch ? `batch:${batch.batch_id}` : null;
    showNext();
  }

  async function requestBatch() {
    if (view.mode !== "batch" || batchRequesting) return;
    const cid = view.cid;
    const token = view.token;
    if (store.outbox.some((op) => op.cid === cid)) return;
    const s = session(cid);
    s.budget = $("budget-input").value.trim();
    if (!s.batch_request) s.batch_request = nonce();  // one cycle even if clicked twice or reloaded
    save();
    const budget = s.budget === "" ? null : Number(s.budget);
    if (budget !== null && !(budget > 0)) {
      showAlert("Pairs per batch must be a positive number (or empty for the default).");
      s.batch_request = null;
      save();
      return;
    }
    batchRequesting = true;
    refresh();
    announce("Choosing the next pairs…", "");
    try {
      const data = await fetchRetry("POST", `api/collections/${enc(cid)}/batch`,
                                    { budget, request_id: s.batch_request }, "asking for pairs");
      s.batch_id = data.batch.batch_id;
      s.batch_request = null;
      // answers of earlier batches are on the server: keep only what is still in flight
      s.records = s.records.filter((r) => r.status === "pending" || r.undoing);
      save();
      if (stale(token)) return;
      renderCollection(data.collection);
      showAlert("");
      announce(`Batch ${data.batch.cycle}: ${data.batch.pairs.length} pairs ` +
               `(${data.batch.reason_text}).`, "");
      setBatch(data.batch);
    } catch (err) {
      s.batch_request = null;
      save();
      showAlert(`Could not get pairs: ${err.message}`);
    } finally {
      batchRequesting = false;
      refresh();
    }
  }

  async function openReview(cid) {
    const token = showView("view-review");
    Object.assign(view, { cid, mode: "batch", batch: null, pairs: [], scope: null, index: -1,
                          collection: null });
    setNav(cid, "review");
    document.title = `Review ${cid} · reidal`;
    $("review-title").textContent = `Same animal? · ${cid}`;
    $("budget").textContent = "";
    const s = session(cid);
    $("budget-input").value = s.budget || "";
    $("pair").hidden = true;
    $("batch-panel").hidden = true;
    refresh();
    focusHeading("review-title");
    try {
      const c = await fetchRetry("GET", `api/collections/${enc(cid)}`, undefined, "loading");
      if (stale(token)) return;
      renderCollection(c);
      if (s.batch_id) {
        const data = await fetchRetry("GET",
                                      `api/collections/${enc(cid)}/batches/${enc(s.batch_id)}`,
                                      undefined, "loading the batch");
        if (stale(token)) return;
        setBatch(data.batch);
      } else {
        setBatch(null);
      }
      if (s.batch_request) requestBatch();  // reloaded while a batch was being chosen
    } catch (err) {
      if (stale(token)) return;
      if (err.status === 404 && s.batch_id) {
        s.batch_id = null;
        save();
        setBatch(null);
      }
      showAlert(`Could not open ${cid}: ${err.message}`);
    }
  }

  // ------------------------------------------------------------------ re-check

  async function openRecheck(cid, k) {
    const token = showView("view-review");
    Object.assign(view, { cid, mode: "recheck", batch: null, pairs: [], index: -1,
                          scope: `recheck:${nonce()}`, title: `Re-check ${k + 1}` });
    setNav(cid, "");
    document.title = `Re-check · ${cid} · reidal`;
    $("review-title").textContent = `Re-check contradiction ${k + 1} · ${cid}`;
    $("pair").hidden = true;
    $("batch-panel").hidden = true;
    refresh();
    focusHeading("review-title");
    try {
      const data = view.identities && view.identities.collection_id === cid ? view.identities
        : await fetchRetry("GET", `api/collections/${enc(cid)}/identities`, undefined, "loading");
      if (stale(token)) return;
      renderCollection(data.collection);
      const c = data.contradictions[k];
      if (!c) {
        showAlert("This contradiction is no longer there (resolved in the meantime).");
        showPanel();
        return;
      }
      const seen = new Set();
      for (const a of c.answers) {
        const key = `${a.image_a}|${a.image_b}`;
        if (seen.has(key)) continue;
        seen.add(key);
        view.pairs.push({
          image_a: a.image_a, image_b: a.image_b, similarity: null, answered: false,
          why: `Part of a contradiction: ${c.explanation}`,
          current: `${WORDS[a.label] || a.label} by ${a.annotator_id || "unknown"}` +
                   (a.answer_id === c.dropped_answer_id ? " (not applied: the older answer)" : ""),
        });
      }
      showNext();
    } catch (err) {
      if (!stale(token)) showAlert(`Could not load the contradiction: ${err.message}`);
    }
  }

  // ------------------------------------------------------------------ summary

  function thumb(cid, iid) {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = `Image ${iid}`;
    img.src = imageUrl(cid, iid);
    const cap = document.createElement("span");
    cap.textContent = iid;
    li.append(img, cap);
    return li;
  }

  async function openSummary(cid) {
    const token = showView("view-summary");
    Object.assign(view, { cid, mode: null, scope: null, index: -1 });
    setNav(cid, "summary");
    document.title = `Summary ${cid} · reidal`;
    $("summary-title").textContent = `Summary · ${cid}`;
    $("summary-stats").textContent = "Loading the identities…";
    $("contradiction-list").replaceChildren();
    $("identity-list").replaceChildren();
    $("singletons").hidden = true;
    focusHeading("summary-title");
    let data;
    try {
      data = await fetchRetry("GET", `api/collections/${enc(cid)}/identities`, undefined,
                              "loading the identities");
    } catch (err) {
      if (!stale(token)) showAlert(`Could not load the identities: ${err.message}`);
      return;
    }
    if (stale(token)) return;
    view.identities = data;
    const ids = data.identities;
    const multi = ids.filter((x) => x.size > 1);
    const singles = ids.filter((x) => x.size === 1);
    const images = ids.reduce((n, x) => n + x.size, 0);
    const c = data.collection;
    $("summary-stats").textContent =
      `${num(ids.length)} identities (${num(multi.length)} with more than one image) over ` +
      `${num(images)} images · ${num(data.applied_answers)} answers applied · ` +
      `${num(data.contradictions.length)} contradiction(s) · budget used ${pct(c.budget_used)} ` +
      `· cycle ${data.cycle}`;

    $("no-contradictions").hidden = data.contradictions.length > 0;
    $("contradiction-list").replaceChildren(...data.contradictions.map((con, k) => {
      const li = document.createElement("li");
      const p = document.createElement("p");
      p.textContent = con.explanation;
      const ul = document.createElement("ul");
      for (const a of con.answers) {
        const item = document.createElement("li");
        item.textContent = `${a.image_a} × ${a.image_b}: ${WORDS[a.label] || a.label} by ` +
          `${a.annotator_id || "unknown"}` +
          (a.answer_id === con.dropped_answer_id ? " (not applied)" : "");
        ul.append(item);
      }
      const link = document.createElement("a");
      link.className = "button primary";
      link.href = `#/c/${enc(cid)}/recheck/${k}`;
      link.textContent = `Re-check these ${con.answers.length} pairs`;
      li.append(p, ul, link);
      return li;
    }));

    const frag = document.createDocumentFragment();
    for (const x of multi) {
      const art = document.createElement("article");
      art.className = "identity";
      art.dataset.identityId = x.identity_id;
      art.dataset.size = String(x.size);
      const h = document.createElement("h3");
      h.textContent = `${x.identity_id} · ${x.size} images`;
      const p = document.createElement("p");
      p.className = "muted";
      p.textContent = `${x.same_answers} same answer(s), ${x.different_answers} different` +
        (x.names.length ? ` · names: ${x.names.join(", ")}` : " · new individual") +
        (x.name_conflict ? " · names disagree" : "");
      const grid = document.createElement("ul");
      grid.className = "grid";
      grid.setAttribute("aria-label", `Images of ${x.identity_id}`);
      grid.append(...x.image_ids.map((iid) => thumb(cid, iid)));
      art.append(h, p, grid);
      frag.append(art);
    }
    $("identity-list").replaceChildren(frag);
    $("singletons").hidden = singles.length === 0;
    $("singletons-title").textContent =
      `${num(singles.length)} identities with a single image (show)`;
    $("singleton-grid").replaceChildren(...singles.map((x) => {
      const li = thumb(cid, x.image_ids[0]);
      li.dataset.identityId = x.identity_id;
      return li;
    }));
  }

  // ------------------------------------------------------------------ collections, name

  async function openCollections() {
    const token = showView("view-collections");
    Object.assign(view, { cid: null, mode: null, scope: null, index: -1 });
    setNav(null);
    document.title = "reidal · pair review";
    focusHeading("collections-title");
    const list = $("collection-list");
    try {
      const data = await fetchRetry("GET", "api/collections", undefined, "loading");
      if (stale(token)) return;
      list.replaceChildren(...data.collections.map((c) => {
        const li = document.createElement("li");
        const a = document.createElement("a");
        a.href = `#/c/${enc(c.collection_id)}/review`;
        const title = document.createElement("strong");
        title.textContent = c.collection_id;
        const meta = document.createElement("span");
        meta.textContent = (c.species ? `${c.species} · ` : "") +
          `${num(c.image_count)} images · ` +
          `${num(c.answer_count)} answers · budget used ${pct(c.budget_used)}`;
        a.append(title, meta);
        li.append(a);
        return li;
      }));
      if (!data.collections.length) {
        const li = document.createElement("li");
        li.textContent = "No collections yet: create one with `reidal collection create` " +
                         "and add images with `reidal ingest`.";
        list.append(li);
      }
    } catch (err) {
      if (!stale(token)) showAlert(`Could not list the collections: ${err.message}`);
    }
  }

  function openName() {
    showView("view-name");
    setNav(null);
    $("who").hidden = true;
    const input = $("name-input");
    input.readOnly = Boolean(auth.pinned);
    input.value = auth.pinned || annotator();
    $("name-pinned").hidden = !auth.pinned;
    if (auth.pinned) $("name-submit").focus();
    else input.focus();
  }

  function openToken(message) {
    showView("view-token");
    setNav(null);
    $("token-error").textContent = message || "";
    $("token-error").hidden = !message;
    $("token-input").value = "";
    $("token-input").focus();
  }

  async function signIn(token) {
    try {
      learnSession(await api("POST", "api/session", { token }));
      route();
      if (wake) wake();  // answers waiting for the sign-in go now
    } catch (err) {
      openToken(err.status === 401 || err.status === 403 ? "That token was refused."
                : `Could not sign in: ${err.message}`);
    }
  }

  // ------------------------------------------------------------------ routing, input

  function route() {
    showAlert("");
    if ($("status").dataset.kind !== "offline") announce("", "");
    // With tokens the person signs in first: only then is it known whether their token
    // pins the name (which is then shown, read-only, instead of asked for).
    if (auth.required && !auth.signedIn) {
      openToken();
      return;
    }
    const name = annotator();
    $("who").hidden = !name;
    $("who-name").textContent = name;
    $("change-name").hidden = Boolean(auth.pinned);
    if (!name || (auth.pinned && name !== auth.pinned)) {
      openName();
      return;
    }
    const m = (location.hash || "").match(/^#\/c\/([^/]+)\/(review|summary|recheck)(?:\/(\d+))?$/);
    if (!m) {
      openCollections();
      return;
    }
    const cid = decodeURIComponent(m[1]);
    if (m[2] === "review") openReview(cid);
    else if (m[2] === "summary") openSummary(cid);
    else openRecheck(cid, Number(m[3] || 0));
  }

  function typing(target) {
    if (!target || !target.tagName) return false;
    return ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName) || target.isContentEditable;
  }

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || typing(e.target)) return;
    if (view.name !== "view-review") return;
    const k = e.key.toLowerCase();
    const labels = { s: "SAME", d: "DIFFERENT", u: "UNSURE" };
    if (labels[k] || k === "z" || k === "n") {
      e.preventDefault();
      if (e.repeat) return;  // a held key answers once
      if (labels[k]) answer(labels[k]);
      else if (k === "z") undo();
      else if (!$("batch-panel").hidden && !$("batch-form").hidden) requestBatch();
    }
  });

  for (const btn of document.querySelectorAll("button.answer")) {
    btn.addEventListener("click", () => answer(btn.dataset.label));
  }
  $("btn-undo").addEventListener("click", undo);
  $("batch-form").addEventListener("submit", (e) => { e.preventDefault(); requestBatch(); });
  $("name-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const name = auth.pinned || $("name-input").value.trim();
    if (!name) return;
    localStorage.setItem(NAME_KEY, name);
    route();
  });
  $("change-name").addEventListener("click", openName);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("token-input").value.trim();
    if (token) signIn(token);
  });
  window.addEventListener("hashchange", route);

  // ------------------------------------------------------------------ zoom and pan

  class ZoomPane {
    constructor(viewport, img) {
      this.vp = viewport;
      this.img = img;
      this.pointers = new Map();
      this.reset();
      img.addEventListener("load", () => { viewport.dataset.state = "loaded"; });
      img.addEventListener("error", () => { viewport.dataset.state = "error"; });
      viewport.addEventListener("wheel", (e) => {
        e.preventDefault();
        const r = viewport.getBoundingClientRect();
        this.zoomAt(e.deltaY < 0 ? 1.25 : 0.8, e.clientX - r.left, e.clientY - r.top);
      }, { passive: false });
      viewport.addEventListener("pointerdown", (e) => {
        viewport.setPointerCapture(e.pointerId);
        this.pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
        viewport.classList.add("dragging");
      });
      viewport.addEventListener("pointermove", (e) => {
        const prev = this.pointers.get(e.pointerId);
        if (!prev) return;
        const cur = { x: e.clientX, y: e.clientY };
        if (this.pointers.size === 1) {
          this.pan(cur.x - prev.x, cur.y - prev.y);
        } else if (this.pointers.size === 2) {  // pinch: zoom by the change of distance
          const other = [...this.pointers].find(([id]) => id !== e.pointerId)[1];
          const before = Math.hypot(prev.x - other.x, prev.y - other.y);
          const after = Math.hypot(cur.x - other.x, cur.y - other.y);
          const r = viewport.getBoundingClientRect();
          if (before > 0) {
            this.zoomAt(after / before, (cur.x + other.x) / 2 - r.left,
                        (cur.y + other.y) / 2 - r.top);
          }
        }
        this.pointers.set(e.pointerId, cur);
      });
      const end = (e) => {
        this.pointers.delete(e.pointerId);
        if (!this.pointers.size) viewport.classList.remove("dragging");
      };
      viewport.addEventListener("pointerup", end);
      viewport.addEventListener("pointercancel", end);
      viewport.addEventListener("dblclick", (e) => {
        const r = viewport.getBoundingClientRect();
        if (this.s > 1) this.reset();
        else this.zoomAt(2.5, e.clientX - r.left, e.clientY - r.top);
      });
      viewport.addEventListener("keydown", (e) => {
        if (e.ctrlKey || e.metaKey || e.altKey) return;
        const step = 40;
        const moves = { ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step],
                        ArrowDown: [0, -step] };
        if (e.key === "+" || e.key === "=") this.zoomCentre(1.25);
        else if (e.key === "-" || e.key === "_") this.zoomCentre(0.8);
        else if (e.key === "0") this.reset();
        else if (moves[e.key]) this.pan(...moves[e.key]);
        else return;
        e.preventDefault();
      });
    }

    show(url, alt) {
      this.reset();
      this.img.alt = alt;
      if (this.img.getAttribute("src") !== url) {
        this.vp.dataset.state = "loading";
        this.img.src = url;
      }
    }

    reset() { this.s = 1; this.x = 0; this.y = 0; this.apply(); }

    zoomCentre(f) { this.zoomAt(f, this.vp.clientWidth / 2, this.vp.clientHeight / 2); }

    zoomAt(f, cx, cy) {
      const s = Math.min(8, Math.max(1, this.s * f));
      const k = s / this.s;
      this.x = cx - (cx - this.x) * k;
      this.y = cy - (cy - this.y) * k;
      this.s = s;
      this.clamp();
      this.apply();
    }

    pan(dx, dy) { this.x += dx; this.y += dy; this.clamp(); this.apply(); }

    clamp() {
      const w = this.vp.clientWidth;
      const h = this.vp.clientHeight;
      this.x = Math.min(0, Math.max(w - w * this.s, this.x));
      this.y = Math.min(0, Math.max(h - h * this.s, this.y));
    }

    apply() { this.img.style.transform = `translate(${this.x}px, ${this.y}px) scale(${this.s})`; }
  }

  panes.a = new ZoomPane($("viewport-a"), $("img-a"));
  panes.b = new ZoomPane($("viewport-b"), $("img-b"));
  for (const btn of document.querySelectorAll("button[data-zoom]")) {
    btn.addEventListener("click", () => {
      const pane = panes[btn.dataset.pane];
      if (btn.dataset.zoom === "in") pane.zoomCentre(1.25);
      else if (btn.dataset.zoom === "out") pane.zoomCentre(0.8);
      else pane.reset();
    });
  }

  // ------------------------------------------------------------------ start

  save();
  api("GET", "api/session").then(learnSession).catch(() => {}).finally(() => {
    route();
    pump();  // answers a closed or reloaded page had not sent yet
  });
})();
