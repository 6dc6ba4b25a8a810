// The page of `siglip serve`: plain JavaScript, no build step, nothing from other hosts.
// Everything that comes from the server (file names, labels, errors) reaches the page through
// textContent or attributes, never innerHTML: a file named <script> shows as text.
"use strict";

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("siglip-token") || "";
const thumbnails = new Map(); // "index/row" -> blob URL

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child); // strings become text nodes
  return node;
}

async function api(path, options = {}) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("token-form").hidden = false;
    $("token").focus();
    throw new Error("this server needs its access token");
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// 12.5 -> "00:00:12.5", as the CLI's tables write a video frame's time (core/video.time_code)
function timeCode(seconds) {
  const whole = Math.floor(seconds);
  const pad = (value) => String(value).padStart(2, "0");
  const fraction = (seconds - whole).toFixed(3).replace(/0+$/, "").replace(/\.$/, ""); // "0.5", "0", or "1" (rounded up)
  const tail = fraction.startsWith("0.") ? fraction.slice(1) : "";
  return `${pad(Math.floor(whole / 3600))}:${pad(Math.floor(whole / 60) % 60)}:${pad(whole % 60)}${tail}`;
}

function percent(score) {
  const value = score * 100;
  if (value >= 0.1 || value === 0) return value.toFixed(1) + "%";
  if (value >= 1e-4) return value.toPrecision(2) + "%";
  return value.toExponential(1) + "%";
}

function say(id, message, isError = false) {
  const node = $(id);
  node.textContent = message;
  node.classList.toggle("error", isError);
}

// ------------------------------------------------------------------ start
async function start() {
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromLink) {
    token = fromLink;
    sessionStorage.setItem("siglip-token", token);
    history.replaceState(null, "", location.pathname); // keep the token out of the address bar
  }
  try {
    const info = await (await api("/v1/info")).json();
    $("token-form").hidden = true;
    $("model").textContent = `${info.model} · ${info.dtype} on ${info.device}`;
    const choice = $("index-choice");
    choice.replaceChildren(...info.indexes.map((item) =>
      el("option", { value: String(item.index) }, `${item.path} (${item.images} images)`)));
    const none = info.indexes.length === 0;
    $("no-index").hidden = !none;
    $("search-form").hidden = none;
  } catch (error) {
    $("model").textContent = error.message;
  }
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value;
  sessionStorage.setItem("siglip-token", token);
  start();
});

// ------------------------------------------------------------------ search
function searchParams() {
  return { index: $("index-choice").value || "0", k: $("k").value, rows: "true" };
}

async function searchText(event) {
  event.preventDefault();
  const file = $("search-image").files[0];
  if (file && !$("query").value.trim()) return searchImage(file);
  const q = $("query").value.trim();
  if (!q) { say("search-status", "Type something to search for, or choose an image."); return; }
  await runSearch(() => api("/v1/search?" + new URLSearchParams({ q, ...searchParams() })), `“${q}”`);
}

async function searchImage(file) {
  const form = new FormData();
  form.append("image", file, file.name);
  for (const [key, value] of Object.entries(searchParams())) form.append(key, value);
  await runSearch(() => api("/v1/search", { method: "POST", body: form }), `images like ${file.name}`);
}

async function moreLike(row, name) {
  const params = new URLSearchParams({ like: String(row), ...searchParams() });
  await runSearch(() => api("/v1/search?" + params), `more like ${name}`);
}

async function runSearch(request, what) {
  say("search-status", `Searching ${what}…`);
  try {
    const [result] = await (await request()).json();
    if (result.error) throw new Error(result.error);
    showHits(result.results, what);
  } catch (error) {
    say("search-status", error.message, true);
  }
}

function showHits(hits, what) {
  const index = $("index-choice").value || "0";
  say("search-status", hits.length ? `${hits.length} results for ${what}` : `Nothing found for ${what}`);
  const items = hits.map((hit) => {
    const score = hit.score !== null ? percent(hit.score) : `cosine ${hit.cosine.toFixed(3)}`;
    const picture = el("div", { class: "thumb" });
    if (hit.kind === "image" && hit.row !== undefined) loadThumbnail(picture, index, hit.row, hit.path);
    else picture.append(el("span", { class: "text-row" }, hit.path));
    const meta = el("div", { class: "meta" },
      el("span", { class: "score", title: hit.score !== null ? "SigLIP's probability that the image matches the text" : "cosine similarity" }, `${hit.rank}. ${score}`),
      el("span", { class: "name", title: hit.path }, ...splitName(hit.path)));
    if (hit.time !== undefined && hit.time >= 0) {
      meta.append(el("span", { class: "time", title: "the frame's time in the video" }, timeCode(hit.time)));
    }
    if (hit.kind === "image" && hit.row !== undefined) {
      meta.append(el("button", { type: "button", class: "secondary", "aria-label": `More like ${hit.path}`,
        onclick: () => moreLike(hit.row, hit.path) }, "More like this"));
    }
    return el("li", { class: "hit" }, picture, meta);
  });
  $("results").replaceChildren(...items);
}

function splitName(path) {
  // the folder dim, the file name plain; together they read as the whole path
  const cut = path.lastIndexOf("/") + 1;
  return cut > 0 ? [el("span", { class: "dim" }, path.slice(0, cut)), path.slice(cut)] : [path];
}

async function loadThumbnail(holder, index, row, name) {
  const key = `${index}/${row}`;
  try {
    if (!thumbnails.has(key)) {
      const blob = await (await api(`/v1/thumbnail/${index}/${row}`)).blob();
      thumbnails.set(key, URL.createObjectURL(blob));
    }
    holder.append(el("img", { src: thumbnails.get(key), alt: name, loading: "lazy" }));
  } catch (error) {
    holder.append(el("span", { class: "text-row dim" }, "no preview"));
  }
}

$("search-form").addEventListener("submit", searchText);
$("search-image").addEventListener("change", () => {
  const file = $("search-image").files[0];
  if (file) { $("query").value = ""; searchImage(file); }
});

// ------------------------------------------------------------------ classify
async function classify(files) {
  const labels = $("labels").value;
  if (!files.length) { say("classify-status", "Choose or drop one or more images."); return; }
  const form = new FormData();
  for (const file of files) form.append("image", file, file.name);
  form.append("labels", labels);
  say("classify-status", `Classifying ${files.length} image${files.length > 1 ? "s" : ""}…`);
  try {
    const records = await (await api("/v1/classify", { method: "POST", body: form })).json();
    $("classified").replaceChildren(...records.map(scoreTable));
    say("classify-status", "Scores are SigLIP's per-label probabilities; they do not sum to 100%.");
  } catch (error) {
    say("classify-status", error.message, true);
  }
}

function scoreTable(record) {
  // a video's frame: its time code; a video's summary: its frames, each label at its best frame
  const title = record.summary === "video" ? `${record.path} · ${record.frames} frames, best of each label`
    : record.time !== undefined ? `${record.path} · ${timeCode(record.time)}` : record.path;
  const block = el("div", { class: "scores" }, el("h3", {}, title));
  if (record.error) { block.append(el("p", { class: "status error" }, record.error)); return block; }
  const rows = record.labels.map((item) => {
    const bar = el("div", { class: "bar" });
    bar.style.width = `${Math.max(0.5, item.score * 100)}%`;
    const label = record.summary === "video" ? `${item.label} (at ${timeCode(item.time)})` : item.label;
    return el("tr", {}, el("td", {}, label), el("td", { class: "num" }, percent(item.score)), el("td", { class: "bar-cell" }, bar));
  });
  block.append(el("table", {}, el("tbody", {}, ...rows)));
  return block;
}

$("classify-form").addEventListener("submit", (event) => {
  event.preventDefault();
  classify([...$("classify-images").files]);
});

// ------------------------------------------------------------------ drag and drop
function dropZone(form, onFiles) {
  form.addEventListener("dragover", (event) => { event.preventDefault(); form.classList.add("over"); });
  form.addEventListener("dragleave", () => form.classList.remove("over"));
  form.addEventListener("drop", (event) => {
    event.preventDefault();
    form.classList.remove("over");
    const files = [...event.dataTransfer.files].filter((file) => /^(image|video)\//.test(file.type) || !file.type);
    if (files.length) onFiles(files);
  });
}
dropZone($("search-form"), (files) => { $("query").value = ""; searchImage(files[0]); });
dropZone($("classify-form"), (files) => classify(files));

start();
