// The moderators' page: sign in once (the key goes in a header, the server answers with an
// HttpOnly cookie), then follow /api/v1/events with EventSource. Everything shown is set with
// textContent or checked attributes: event data is untrusted.
"use strict";
(function () {
  const KINDS = ["match", "action_sent", "action_skipped", "dead_letter", "bad_blob"];
  const DID = /^did:(plc|web):[A-Za-z0-9._:%-]{1,2000}$/;
  const RKEY = /^[A-Za-z0-9._~:-]{1,512}$/;
  const MAX_ROWS = 500;
  const $ = (id) => document.getElementById(id);
  let source = null;
  let lastId = null;
  let paused = false;
  const rows = new Map(); // uri + cid -> row

  function postLink(data) {
    if (!DID.test(data.did || "") || !RKEY.test(data.rkey || "")) return null;
    return "https://bsky.app/profile/" + data.did + "/post/" + data.rkey;
  }

  function cell(tr, text) {
    const td = document.createElement("td");
    td.textContent = text == null ? "" : String(text);
    tr.appendChild(td);
    return td;
  }

  function rowFor(data) {
    const key = (data.uri || "") + " " + (data.cid || "");
    let tr = rows.get(key);
    if (tr) return tr;
    tr = document.createElement("tr");
    tr.dataset.uri = data.uri || "";
    cell(tr, data.time);
    cell(tr, data.rule);
    cell(tr, data.distance);
    const post = cell(tr, "");
    const href = postLink(data);
    if (href) {
      const a = document.createElement("a");
      a.href = href; a.textContent = "post"; a.target = "_blank"; a.rel = "noopener noreferrer";
      post.appendChild(a);
    }
    cell(tr, data.did);
    const actions = cell(tr, ""); actions.className = "actions";
    const image = cell(tr, "");
    if (typeof data.thumb === "string" && /^https?:\/\//.test(data.thumb)) {
      const img = document.createElement("img");
      img.className = "thumb blurred"; img.alt = "blurred match (click to show)";
      img.referrerPolicy = "no-referrer";
      img.src = data.thumb;
      img.addEventListener("click", () => img.classList.toggle("blurred"));
      const box = document.createElement("div");
      box.className = "thumbbox";
      box.appendChild(img);
      image.appendChild(box);
    }
    const body = $("rows");
    body.insertBefore(tr, body.firstChild);
    rows.set(key, tr);
    while (body.children.length > MAX_ROWS) {
      const old = body.lastChild;
      for (const [k, v] of rows) if (v === old) rows.delete(k);
      body.removeChild(old);
    }
    return tr;
  }

  function addAction(data, skipped) {
    const tr = rowFor(data);
    const span = document.createElement("div");
    span.textContent = skipped ? data.action + " (skipped: " + data.reason + ")" : data.action;
    if (skipped) span.className = "skipped";
    tr.querySelector(".actions").appendChild(span);
  }

  function count(kind) {
    const el = $("n-" + kind);
    el.textContent = String(Number(el.textContent) + 1);
  }

  function onEvent(kind, message) {
    lastId = message.lastEventId || lastId;
    let data;
    try { data = JSON.parse(message.data); } catch (e) { return; }
    count(kind);
    if (kind === "match") rowFor(data);
    else if (kind === "action_sent") addAction(data, false);
    else if (kind === "action_skipped") addAction(data, true);
  }

  function connect() {
    const url = "/api/v1/events" + (lastId ? "?last_event_id=" + encodeURIComponent(lastId) : "");
    source = new EventSource(url);
    for (const kind of KINDS) source.addEventListener(kind, (m) => onEvent(kind, m));
    source.addEventListener("retention", () => { $("status").textContent = "some events fell out of retention"; });
    source.onopen = () => { $("status").textContent = "live"; };
    source.onerror = () => { $("status").textContent = "reconnecting…"; };
  }

  $("pause").addEventListener("click", () => {
    paused = !paused;
    $("pause").textContent = paused ? "Resume" : "Pause";
    if (paused) { source.close(); $("status").textContent = "paused"; }
    else connect();
  });

  function showLive() {
    $("signin").hidden = true;
    $("live").hidden = false;
    connect();
  }

  $("signin").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("key").value;
    $("key").value = "";
    const answer = await fetch("/api/v1/session", {
      method: "POST", headers: { "X-API-Key": key }, credentials: "same-origin",
    });
    if (answer.ok) showLive();
    else $("signin-error").textContent = "not signed in (" + answer.status + ")";
  });

  fetch("/api/v1/logs?limit=1", { credentials: "same-origin" }).then((answer) => {
    if (answer.ok) showLive(); else $("signin").hidden = false;
  }, () => { $("signin").hidden = false; });
})();
