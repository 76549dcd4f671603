// The page: pick or drop images, POST each to /v1/detect, show verdict, probability and
// a bar chart of block contributions. No framework, no external resource.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const MAX_PARALLEL = 3;
const MAX_WAITS = 900;  // retries of one file while the server answers 503: 30 min at the usual 2 s (a first start downloads the model)
const MAX_TIMEOUT_RETRIES = 1;  // a "took too long" 503 recurs for the same image
const queue = [];
let running = 0;
let waiting = 0;  // files waiting out a 503 before they are queued again
let infoGeneration = 0;  // a new key restarts the model-info poll; older polls stop
let threshold = 0.5;
let calibration = null;  // /v1/model's calibration block (null: plain sigmoid(logit) > threshold)
let maxFileBytes = null;  // from /v1/model: larger files are refused before uploading
let unsaved = 0;  // results not yet downloaded

const $ = (sel) => document.querySelector(sel);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function apiKey() {
  return $("#api-key").value.trim();
}

function keyProblem(key) {
  // Header values must be Latin-1; keys are printable ASCII in practice.
  return /^[\x20-\x7e]*$/.test(key) ? null : "An API key can only hold printable ASCII characters (no \u20ac, accents or spaces at the ends).";
}

function apiHeaders() {
  const key = apiKey();
  return key && !keyProblem(key) ? { "X-API-Key": key } : {};
}

// --- decideFromLogit: keep in step with rine/model/calibration.py (DecisionRule.decide) ---
// A head logit -> {probFake, isFake, verdict} as the server decides it, for a page that scores
// images itself. `cal` is /v1/model's `calibration` (null: uncalibrated, the reference's rule
// sigmoid(logit) > threshold); with it: c = scale * logit + offset, probFake = sigmoid(c),
// isFake = c > threshold_logit (or probFake > threshold where the cut is 0 or 1), and
// "uncertain" when probFake lies in [uncertain_low, uncertain_high].
function decideFromLogit(logit, cal, threshold) {
  const sigmoid = (x) => (x >= 0 ? 1 / (1 + Math.exp(-x)) : Math.exp(x) / (1 + Math.exp(x)));
  let probFake, isFake;
  if (!cal) {
    probFake = sigmoid(logit);
    isFake = probFake > threshold;
    return { probFake, isFake, verdict: isFake ? "synthetic" : "real" };
  }
  const c = cal.scale * logit + cal.offset;
  probFake = sigmoid(c);
  isFake = cal.threshold_logit === null ? probFake > cal.threshold : c > cal.threshold_logit;
  let verdict = isFake ? "synthetic" : "real";
  if (cal.uncertain_low !== null && probFake >= cal.uncertain_low && probFake <= cal.uncertain_high) {
    verdict = "uncertain";
  }
  return { probFake, isFake, verdict };
}
// --- end decideFromLogit ---

// What a verdict means, in words for the card and the screen reader.
const VERDICT_WORDS = {
  synthetic: "Synthetic",
  real: "Real",
  uncertain: "Uncertain: too close to call",
};

function percent(p) {
  return (p * 100).toFixed(1) + "%";
}

// A probability as shown to a person: never 0 % or 100 % (the model is never certain),
// and with more digits near the threshold, so that the number agrees with the verdict.
function shownProbability(p) {
  if (p > 0.999) return ">99.9%";
  if (p < 0.001) return "<0.1%";
  if (Math.abs(p - threshold) < 0.001) return (p * 100).toFixed(3) + "%";
  return percent(p);
}

// A threshold with the digits it needs (a strict false-positive target can put it at 99.98 %).
function thresholdText(p) {
  if (p > 0.999 || p < 0.001) return (p * 100).toPrecision(6).replace(/0+$/, "") + "%";
  return percent(p);
}

function calibrationText(cal) {
  if (!cal) return "";
  let text = cal.method ? ` The model was calibrated for this use (${cal.method === "threshold" ? "its threshold was set" : cal.method} on the owner's own images).` : "";
  if (cal.uncertain_low !== null) {
    text += ` Between ${thresholdText(cal.uncertain_low)} and ${thresholdText(cal.uncertain_high)} the verdict is "uncertain": ` +
      "a score that close to the threshold could go either way, so the image needs a human look.";
  }
  return text;
}

function megabytes(n) {
  return (n / (1024 * 1024)).toFixed(1).replace(/\.0$/, "") + " MB";
}

function sizeRefusal(size, limit) {
  let a = megabytes(size), b = megabytes(limit);
  if (a === b) { a += ` (${size} bytes)`; b += ` (${limit} bytes)`; }
  return `this file is ${a}; this server takes images of at most ${b}`;
}

function announce(text) {
  $("#announce").textContent = text;
}

async function loadModelInfo() {
  const el = $("#model");
  const generation = ++infoGeneration;
  const problem = keyProblem(apiKey());
  $("#key-problem").textContent = problem || "";
  if (problem) return;
  for (let attempt = 0; generation === infoGeneration; attempt++) {
    try {
      const res = await fetch("/v1/model", { headers: apiHeaders() });
      if (generation !== infoGeneration) return;
      if (res.ok) {
        const m = await res.json();
        threshold = m.threshold;
        calibration = m.calibration || null;
        maxFileBytes = m.max_file_bytes || null;
        el.textContent = `Model ${m.name} on ${m.backbone} (${m.n_blocks} blocks); verdict "synthetic" when the probability is above ${thresholdText(m.threshold)}.` + calibrationText(calibration);
        return;
      }
      if (res.status === 401) {
        el.textContent = apiKey()
          ? "The API key was rejected: check it under \u201cAPI key\u201d below."
          : "This server needs an API key: enter it under \u201cAPI key\u201d below.";
        $("details.key").open = true;
        return;
      }
      let reason = null;
      try { reason = (await res.json()).reason; } catch (e) { /* not JSON */ }
      if (res.status === 503 && reason === "failed") {
        el.textContent = "The model failed to load: see the server's log.";
        return;
      }
      if (res.status === 503) {
        el.textContent = "The model is loading\u2026 (the first start can take a few minutes; files you choose now are scored when it is ready)";
      } else {
        el.textContent = `The server answered HTTP ${res.status} for the model information (see its log); trying again\u2026`;
      }
    } catch (e) {
      if (generation !== infoGeneration) return;
      el.textContent = "Cannot reach the server; trying again\u2026";
    }
    await sleep(Math.min(10000, 2000 * 1.25 ** attempt));
  }
}

function barChart(values) {
  const n = values.length;
  const w = Math.max(160, n * 14), h = 70, pad = 14;
  const bw = (w - 2) / n;
  const max = Math.max(...values, 1e-9);
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h + pad}`);
  svg.setAttribute("width", String(w));
  svg.setAttribute("role", "img");
  const top = values.map((v, i) => [v, i]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  svg.setAttribute("aria-label", "Block contributions; largest: " +
    top.map(([v, i]) => `block ${i + 1} ${percent(v)}`).join(", "));
  values.forEach((v, i) => {
    const bh = Math.max(1, (v / max) * (h - 4));
    const rect = document.createElementNS(SVG_NS, "rect");
    rect.setAttribute("class", "bar");
    rect.setAttribute("x", String(1 + i * bw + bw * 0.1));
    rect.setAttribute("y", String(h - bh));
    rect.setAttribute("width", String(bw * 0.8));
    rect.setAttribute("height", String(bh));
    const title = document.createElementNS(SVG_NS, "title");
    title.textContent = `block ${i + 1}: ${percent(v)}`;
    rect.appendChild(title);
    svg.appendChild(rect);
  });
  const axis = document.createElementNS(SVG_NS, "line");
  axis.setAttribute("class", "axis");
  axis.setAttribute("x1", "0"); axis.setAttribute("x2", String(w));
  axis.setAttribute("y1", String(h)); axis.setAttribute("y2", String(h));
  svg.appendChild(axis);
  for (const [i, anchor] of [[0, "start"], [n - 1, "end"]]) {
    const t = document.createElementNS(SVG_NS, "text");
    t.setAttribute("x", String(anchor === "start" ? 1 : w - 1));
    t.setAttribute("y", String(h + pad - 2));
    t.setAttribute("text-anchor", anchor);
    t.textContent = `block ${i + 1}`;
    svg.appendChild(t);
  }
  return svg;
}

// A record's `stability` (rine detect --stability, form field stability=true) in words.
function stabilityText(st) {
  const n = Object.keys(st.conditions).length;
  const spread = (st.spread * 100).toFixed(1);
  if (st.flips > 0) {
    const reason = st.reason.charAt(0).toUpperCase() + st.reason.slice(1);
    return `${reason}. Under the ${n} re-saves checked the probability moves by up to ${spread} points: ` +
      "treat this answer as uncertain.";
  }
  if (n === 0) return "Stability could not be checked: " + st.reason + ".";
  return `Stable: none of the ${n} everyday re-saves checked (JPEG 90 and 70, 1080 px, WebP) changes this answer; ` +
    `the probability moves by up to ${spread} points.`;
}

function showResult(card, r) {
  const status = card.querySelector(".status");
  const name = card.dataset.name;
  card.result = r;
  unsaved++;
  $("#download").hidden = false;
  if (r.error) {
    status.textContent = "Could not score this file: " + r.error;
    status.classList.add("error");
    card.dataset.state = "error";
    announce(`${name}: could not be scored: ${r.error}`);
    return;
  }
  status.hidden = true;
  const verdict = card.querySelector(".verdict");
  verdict.textContent = VERDICT_WORDS[r.verdict] || (r.is_fake ? "Synthetic" : "Real");
  const unstable = r.stability && r.stability.flips > 0;
  if (unstable) {
    verdict.textContent = "Uncertain: an ordinary re-save would change this answer";
    verdict.title = r.stability.reason;
  } else if (r.verdict === "uncertain") {
    verdict.title = "The score is too close to the threshold to call: look at this image yourself, or get a second opinion.";
  }
  verdict.classList.add(r.verdict);
  verdict.dataset.verdict = r.verdict;
  verdict.hidden = false;
  const prob = card.querySelector(".prob");
  prob.dataset.prob = String(r.prob_fake);
  if (r.threshold !== undefined && r.threshold !== null) prob.dataset.threshold = String(r.threshold);
  prob.replaceChildren("Probability of being synthetic: ");
  const strong = document.createElement("strong");
  strong.textContent = shownProbability(r.prob_fake);
  prob.appendChild(strong);
  prob.hidden = false;
  let said = `${name}: ${verdict.textContent}, probability of being synthetic ${strong.textContent}`;
  if (r.stability) {
    const st = card.querySelector(".stability");
    st.textContent = stabilityText(r.stability);
    st.dataset.flips = String(r.stability.flips);
    st.hidden = false;
    said += ". " + st.textContent;
  }
  announce(said);
  if (r.block_importance && r.block_importance.length) {
    const fig = card.querySelector(".chart");
    fig.insertBefore(barChart(r.block_importance), fig.firstChild);
    fig.hidden = false;
  }
  const prov = card.querySelector(".provenance");
  if (prov) prov.hidden = !renderProvenance(prov, r, !!r.client_side);  // provenance.js
  card.dataset.state = "done";
}

async function score(file, card, waits, timeouts) {
  if (window.rineClientSide && window.rineClientSide.active()) {
    // client_side.js: nothing uploaded, so no stability check (it runs on the server only)
    const show = !$("#stability").checked ? showResult : (c, r) => {
      showResult(c, r);
      if (r.error) return;
      const st = c.querySelector(".stability");
      st.textContent = "Stability not checked: it runs on the server only, and this image was scored in your browser.";
      st.hidden = false;
    };
    return window.rineClientSide.score(file, card, show);
  }
  if (maxFileBytes !== null && file.size > maxFileBytes) {
    showResult(card, { error: sizeRefusal(file.size, maxFileBytes) });
    return;
  }
  const body = new FormData();
  body.append("files", file, file.name);
  if ($("#stability").checked) body.append("stability", "true");
  try {
    const res = await fetch("/v1/detect", { method: "POST", body, headers: apiHeaders() });
    let data = null;
    try { data = await res.json(); } catch (e) { /* not JSON: reported below */ }
    if (data && data.results && data.results.length) {
      showResult(card, data.results[0]);
      return;
    }
    const why = data && data.detail ? data.detail : `HTTP ${res.status}`;
    const reason = data && data.reason;
    const timedOut = reason === "timeout";
    // Waiting for a loading or busy server is counted apart from timeouts, which recur.
    const retry = reason === "failed" ? false : timedOut ? timeouts < MAX_TIMEOUT_RETRIES : waits < MAX_WAITS;
    if (res.status === 503 && retry) {
      // The model is loading or the server is busy: wait as it asks, then try again.
      const seconds = Math.max(1, Number(res.headers.get("Retry-After")) || 2);
      card.querySelector(".status").textContent = `Waiting for the server (${why})\u2026`;
      waiting++;
      const next = timedOut ? [waits, timeouts + 1] : [waits + 1, timeouts];
      setTimeout(() => { waiting--; queue.push([file, card, ...next]); pump(); }, seconds * 1000);
      return;
    }
    showResult(card, { error: why });
  } catch (e) {
    showResult(card, { error: "network error: " + e.message });
  }
}

function pump() {
  while (running < MAX_PARALLEL && queue.length) {
    const [file, card, waits, timeouts] = queue.shift();
    running++;
    score(file, card, waits, timeouts).finally(() => { running--; pump(); });
  }
}

function csvField(value, isText) {
  let text = value === null || value === undefined ? "" : String(value);
  // File names come from third parties: a cell starting with = + - @ would run as a
  // spreadsheet formula (numbers, which may start with -, are written as they are).
  if (isText && /^[=+\-@\t\r]/.test(text)) text = "'" + text;
  return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
}

function downloadResults() {
  const rows = [["name", "verdict", "prob_fake", "logit", "error"]];
  const cards = Array.from(document.querySelectorAll("#results .card")).filter((c) => c.result);
  const withStability = cards.some((c) => c.result.stability);
  if (withStability) rows[0].push("stability_flips", "stability_spread", "stability_reason");
  for (const card of cards) {
    const r = card.result;
    const row = [card.dataset.name, r.verdict, r.prob_fake, r.logit, r.error];
    if (withStability) {
      const st = r.stability || {};
      row.push(st.flips, st.spread, st.reason);
    }
    rows.push(row);
  }
  // name, verdict, prob_fake, logit, error[, flips, spread, reason]: text cells are guarded
  const text = [true, true, false, false, true, false, false, true];
  const csv = rows.map((row) => row.map((v, i) => csvField(v, text[i])).join(",")).join("\r\n") + "\r\n";
  const url = URL.createObjectURL(new Blob([csv], { type: "text/csv" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = "rine-results.csv";
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
  unsaved = 0;
}

function addFiles(files) {
  const list = $("#results");
  for (const file of files) {
    const card = $("#card-template").content.firstElementChild.cloneNode(true);
    card.dataset.name = file.name;
    card.dataset.state = "pending";
    card.querySelector(".name").textContent = file.name;
    const img = card.querySelector(".thumb");
    const url = URL.createObjectURL(file);
    img.src = url;
    img.alt = "Thumbnail of " + file.name;
    img.addEventListener("load", () => URL.revokeObjectURL(url), { once: true });
    img.addEventListener("error", () => { URL.revokeObjectURL(url); img.hidden = true; }, { once: true });
    list.appendChild(card);
    queue.push([file, card, 0, 0]);
  }
  $("#empty").hidden = list.children.length > 0;
  pump();
}

function init() {
  const input = $("#file-input");
  input.addEventListener("change", () => {
    addFiles(Array.from(input.files));
    input.value = "";
  });
  const zone = $("#dropzone");
  for (const ev of ["dragenter", "dragover"]) {
    zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    zone.addEventListener(ev, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    addFiles(Array.from(e.dataTransfer.files));
  });
  // A file dropped outside the zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("#api-key").addEventListener("change", loadModelInfo);
  $("#download").addEventListener("click", downloadResults);
  // Leaving the page loses what it shows: ask first while files are scored or not saved.
  window.addEventListener("beforeunload", (e) => {
    if (running || queue.length || waiting || unsaved) { e.preventDefault(); e.returnValue = ""; }
  });
  loadModelInfo();
}

document.addEventListener("DOMContentLoaded", init);
