"""The reviewer's page (``GET /review/``): the queue, one result as the test tool shows it, and the decisions.

The page itself holds no patient data and needs no token: it asks for the reviewer's bearer token
(kept in the page's memory only, never in web storage a script could read) and reads everything through
the reviewer routes (``inference.review.routes``) with it, so each view and decision is the reviewer's in the audit
trail.
"""

REVIEW_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Review before release</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;background:#111;color:#eee}
table{border-collapse:collapse;margin:.5em 0}td,th{border-bottom:1px solid #444;padding:.3em .8em;text-align:left}
tr.item{cursor:pointer}tr.item:hover{background:#223}.overdue{color:#f66;font-weight:bold}
img{max-width:32%;margin:.2em;border:1px solid #333}button{margin:.3em;padding:.4em 1em}
#message{min-height:1.5em;color:#fc6}textarea{width:30em;height:3em}.hidden{display:none}
</style></head><body>
<h1>Results awaiting review</h1>
<p><label>Bearer token <input id="token" type="password" size="40"></label> <button id="load">Load queue</button>
<span id="summary"></span></p>
<div id="message" role="status"></div>
<table id="queue"><thead><tr><th>Study</th><th>Command</th><th>Model</th><th>Held since</th><th>Status</th>
</tr></thead><tbody></tbody></table>
<section id="result" class="hidden">
<h2 id="title"></h2><p>Model: <span id="model"></span> &middot; <span id="status"></span></p>
<div id="images"></div><div id="tables"></div>
<p><button id="accept">Accept and release</button></p>
<p><textarea id="reason" placeholder="Why it is rejected"></textarea><br><button id="reject">Reject</button></p>
<p><label>Corrected DICOM SEG <input id="seg" type="file" accept=".dcm,application/dicom"></label>
<button id="correct">Upload correction</button></p>
</section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let current = null;
function headers(extra) {
  const token = $("token").value.trim();
  return Object.assign(token ? {"Authorization": "Bearer " + token} : {}, extra || {});
}
async function call(path, options) {
  const response = await fetch(path, Object.assign({headers: headers()}, options || {}));
  const body = (response.headers.get("Content-Type") || "").includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error(response.status + ": " + (body && body.error ? body.error : response.statusText));
  return body;
}
function say(text) { $("message").textContent = text; }
function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; }
async function loadQueue() {
  try {
    const data = await call("/reviews");
    const body = $("queue").tBodies[0];
    body.replaceChildren();
    for (const item of data.reviews) {
      const row = body.insertRow();
      row.className = "item"; row.dataset.uid = item.uid;
      cell(row, item.study_uid || "-"); cell(row, item.command);
      cell(row, [item.model.family, item.model.version].filter(Boolean).join(" ") || "-");
      cell(row, new Date(item.held * 1000).toISOString());
      cell(row, item.overdue ? item.status + " (overdue)" : item.status, item.overdue ? "overdue" : "");
      row.addEventListener("click", () => openResult(item.uid));
    }
    $("summary").textContent = data.awaiting + " awaiting, " + data.overdue + " overdue";
  } catch (error) { say(error.message); }
}
async function openResult(uid) {
  delete $("images").dataset.loaded;
  try {
    const data = await call("/reviews/" + uid);
    current = uid;
    $("result").classList.remove("hidden");
    $("title").textContent = "Study " + (data.review.study_uid || "-") + " (job " + uid + ")";
    $("model").textContent = data.model;
    $("status").textContent = data.review.status + (data.review.overdue ? " (overdue)" : "");
    $("tables").replaceChildren();
    for (const table of data.tables) {
      const caption = document.createElement("h3"); caption.textContent = table.title;
      const element = document.createElement("table"); element.className = "volumes";
      for (const row of table.rows) {
        const tr = element.insertRow(); cell(tr, row.name); cell(tr, row.value); cell(tr, row.unit);
      }
      $("tables").append(caption, element);
    }
    $("images").replaceChildren();
    for (const link of data.images) {
      const response = await fetch(link, {headers: headers()});
      const img = document.createElement("img");
      img.alt = "result image"; img.src = URL.createObjectURL(await response.blob());
      await img.decode();
      $("images").appendChild(img);
    }
    $("images").dataset.loaded = "true";
  } catch (error) { say(error.message); }
}
async function decide(path, options, done) {
  try {
    const data = await call("/reviews/" + current + "/" + path, Object.assign({method: "POST"}, options));
    say(done + ": " + data.review.status + " by " + data.review.decided_by);
    $("status").textContent = data.review.status;
    await loadQueue();
  } catch (error) { say(error.message); }
}
$("load").addEventListener("click", loadQueue);
$("accept").addEventListener("click", () => decide("accept", {}, "Accepted"));
$("reject").addEventListener("click", () => decide("reject", {headers: headers({"Content-Type": "application/json"}),
  body: JSON.stringify({reason: $("reason").value})}, "Rejected"));
$("correct").addEventListener("click", () => {
  const form = new FormData();
  if (!$("seg").files.length) { say("choose the corrected DICOM SEG first"); return; }
  form.append("file", $("seg").files[0]);
  decide("correct", {body: form}, "Correction uploaded");
});
</script></body></html>
"""
