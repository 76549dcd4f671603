// The page: pick or drop images, POST each to /v1/detect, show verdict, probability and
// a bar chart of block contributions. No framework, no external resource.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const MAX_PARALLEL = 3;
const queue = [];
let running = 0;

const $ = (sel) => document.querySelector(sel);

function apiHeaders() {
  const key = $("#api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function percent(p) {
  return (p * 100).toFixed(1) + "%";
}

async function loadModelInfo() {
  const el = $("#model");
  for (let attempt = 0; attempt < 60; attempt++) {
    try {
      const res = await fetch("/v1/model", { headers: apiHeaders() });
      if (res.ok) {
        const m = await res.json();
        el.textContent = `Model ${m.name} on ${m.backbone} (${m.n_blocks} blocks); verdict "synthetic" when the probability is above ${percent(m.threshold)}.`;
        return;
      }
      if (res.status === 401) {
        el.textContent = "This server needs an API key: enter it under \u201cAPI key\u201d below.";
        return;
      }
      el.textContent = "The model is loading…";
    } catch (e) {
      el.textContent = "Cannot reach the server.";
    }
    await new Promise((r) => setTimeout(r, 2000));
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

function showResult(card, r) {
  const status = card.querySelector(".status");
  if (r.error) {
    status.textContent = "Could not score this file: " + r.error;
    status.classList.add("error");
    card.dataset.state = "error";
    return;
  }
  status.hidden = true;
  const verdict = card.querySelector(".verdict");
  verdict.textContent = r.verdict === "synthetic" ? "Synthetic" : "Real";
  verdict.classList.add(r.verdict);
  verdict.dataset.verdict = r.verdict;
  verdict.hidden = false;
  const prob = card.querySelector(".prob");
  prob.dataset.prob = String(r.prob_fake);
  prob.replaceChildren("Probability of being synthetic: ");
  const strong = document.createElement("strong");
  strong.textContent = percent(r.prob_fake);
  prob.appendChild(strong);
  prob.hidden = false;
  if (r.block_importance && r.block_importance.length) {
    const fig = card.querySelector(".chart");
    fig.insertBefore(barChart(r.block_importance), fig.firstChild);
    fig.hidden = false;
  }
  card.dataset.state = "done";
}

async function score(file, card) {
  const body = new FormData();
  body.append("files", file, file.name);
  try {
    const res = await fetch("/v1/detect", { method: "POST", body, headers: apiHeaders() });
    let data = null;
    try { data = await res.json(); } catch (e) { /* not JSON: reported below */ }
    if (data && data.results && data.results.length) {
      showResult(card, data.results[0]);
    } else {
      const why = data && data.detail ? data.detail : `HTTP ${res.status}`;
      showResult(card, { error: res.status === 503 ? why + " (try again in a moment)" : why });
    }
  } catch (e) {
    showResult(card, { error: "network error: " + e.message });
  }
}

function pump() {
  while (running < MAX_PARALLEL && queue.length) {
    const [file, card] = queue.shift();
    running++;
    score(file, card).finally(() => { running--; pump(); });
  }
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
    queue.push([file, card]);
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
  loadModelInfo();
}

document.addEventListener("DOMContentLoaded", init);
