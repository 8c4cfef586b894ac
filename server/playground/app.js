// Press playground: a streaming client of the public API that draws every refinement pass.
// No build step and no dependencies: plain DOM, fetch and a ReadableStream reader for server-sent events.
"use strict";

const $ = (id) => document.getElementById(id);
const README_PUZZLE = "5....7.46....5.2.....1...38.53781.6...9.6...38...3..1..37..86529.5...48.1.6542..7";
// What tests (and the curious) can read: frames drawn, passes reported, the final text, errors.
const play = (window.pressPlayground = { frames: 0, passes: 0, finished: false, text: "", error: null });
let canvasLength = 0;
let controller = null;
let previous = [];
let chartPoints = [];
let started = 0;
let puzzles = [];
let images = []; // data: URLs of pasted, dropped or chosen images, sent as image_url parts in chat mode

// ------------------------------------------------------------------ helpers

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.authorization = "Bearer " + key;
  return h;
}

function plainError(status, body) {
  const e = body && body.error;
  if (!e) return `The server answered with status ${status}.`;
  let words = e.message || `The server answered with status ${status}.`;
  if (status === 401) words = "The server needs a valid API key (enter it in the API key field). " + words;
  if (e.param) words += ` [field: ${e.param}]`;
  return words;
}

function showError(message) {
  play.error = message || null;
  $("error").textContent = message;
  $("error").hidden = !message;
}

// ------------------------------------------------------------------ models

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) return showError(plainError(r.status, body));
    const select = $("model");
    const wanted = select.dataset.wanted || select.value;
    select.innerHTML = "";
    for (const m of body.data) {
      const o = document.createElement("option");
      o.value = o.textContent = m.id;
      o.dataset.canvas = m.canvas_length;
      select.appendChild(o);
    }
    if (wanted && [...select.options].some((o) => o.value === wanted)) select.value = wanted;
    canvasLength = +(select.selectedOptions[0]?.dataset.canvas || 0);
    showError("");
  } catch (err) {
    showError("Could not reach the server: " + err.message);
  }
}

// ------------------------------------------------------------------ sudoku board

function buildBoard() {
  const board = $("board");
  for (let i = 0; i < 81; i++) {
    const r = Math.floor(i / 9), c = i % 9;
    const cell = document.createElement("input");
    cell.type = "text";
    cell.inputMode = "numeric";
    cell.maxLength = 1;
    cell.setAttribute("aria-label", `Row ${r + 1}, column ${c + 1}`);
    if (c % 3 === 2 && c < 8) cell.classList.add("box-right");
    if (r % 3 === 2 && r < 8) cell.classList.add("box-bottom");
    cell.addEventListener("input", () => {
      cell.value = cell.value.replace(/[^1-9]/g, "");
      cell.classList.toggle("given", cell.value !== "");
    });
    cell.addEventListener("keydown", (ev) => {
      const moves = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -9, ArrowDown: 9 };
      if (ev.key in moves) {
        const next = board.children[i + moves[ev.key]];
        if (next) { next.focus(); ev.preventDefault(); }
      }
    });
    board.appendChild(cell);
  }
}

function cells() { return [...$("board").children]; }

function setBoard(puzzle) {
  cells().forEach((cell, i) => {
    const ch = puzzle[i] || ".";
    cell.value = /[1-9]/.test(ch) ? ch : "";
    cell.classList.toggle("given", cell.value !== "");
    cell.classList.remove("settled", "moving");
  });
  $("sudoku-result").textContent = "";
}

function boardPuzzle() {
  return cells().map((c) => (c.classList.contains("given") && /[1-9]/.test(c.value) ? c.value : ".")).join("");
}

function givensTemplate(puzzle) {
  // The answer as an infill template: givens and line breaks fixed, each blank a one-token hole.
  const template = [];
  for (let r = 0; r < 9; r++) {
    for (let c = 0; c < 9; c++) {
      const ch = puzzle[r * 9 + c];
      template.push(ch === "." ? { hole: 1 } : ch);
    }
    if (r < 8) template.push("\n");
  }
  return template;
}

function checkSudoku(puzzle, answer) {
  const digits = answer.replace(/[^1-9]/g, "");
  if (digits.length !== 81) return `Not solved: the answer has ${digits.length} digits, not 81.`;
  for (let i = 0; i < 81; i++) {
    if (puzzle[i] !== "." && puzzle[i] !== digits[i]) return `Not solved: a given changed (row ${Math.floor(i / 9) + 1}).`;
  }
  const groups = [];
  for (let k = 0; k < 9; k++) {
    groups.push([...Array(9).keys()].map((j) => k * 9 + j));
    groups.push([...Array(9).keys()].map((j) => j * 9 + k));
    const br = Math.floor(k / 3) * 3, bc = (k % 3) * 3;
    groups.push([...Array(9).keys()].map((j) => (br + Math.floor(j / 3)) * 9 + bc + (j % 3)));
  }
  for (const g of groups) {
    if (new Set(g.map((i) => digits[i])).size !== 9) return "Not solved: a row, column or box repeats a digit.";
  }
  return "";
}

function drawBoardFromTokens(tokens, accepted) {
  // The answer canvas is nine lines of nine digits: position r*10 + c is row r, column c.
  const board = cells();
  for (let r = 0; r < 9; r++) {
    for (let c = 0; c < 9; c++) {
      const cell = board[r * 9 + c];
      if (cell.classList.contains("given")) continue;
      const p = r * 10 + c;
      const tok = tokens[p] || "";
      cell.value = /^[1-9]$/.test(tok) ? tok : "";
      cell.classList.toggle("moving", !!accepted[p]);
      cell.classList.toggle("settled", !accepted[p] && previous[p] === tok);
    }
  }
}

// ------------------------------------------------------------------ drawing

function drawDraft(draft) {
  const grid = $("canvas");
  const tokens = draft.tokens || [];
  const accepted = draft.accepted || [];
  const fixed = new Set(draft.fixed || []);
  while (grid.children.length < tokens.length) {
    const span = document.createElement("span");
    span.className = "cell noise";
    grid.appendChild(span);
  }
  while (grid.children.length > tokens.length) grid.lastChild.remove();
  tokens.forEach((tok, p) => {
    const span = grid.children[p];
    let kind = "noise";
    if (fixed.has(p)) kind = "fixed";
    else if (accepted[p]) kind = "accepted";
    else if (previous[p] === tok) kind = "stable";
    span.className = "cell " + kind;
    span.textContent = tok.replace(/\n/g, "⏎") || "·";
    span.title = `position ${p}: ${JSON.stringify(tok)} (${kind})`;
  });
  if ($("mode").value === "sudoku") drawBoardFromTokens(tokens, accepted);
  previous = tokens;
  $("pass-info").textContent =
    `— canvas ${draft.canvas_index}, pass ${draft.pass_index + 1}, accepted ${(100 * draft.accepted_fraction).toFixed(1)}%, ` +
    `mean entropy ${draft.mean_entropy.toFixed(3)}`;
  chartPoints.push([draft.accepted_fraction, draft.mean_entropy]);
  drawChart();
  play.frames += 1;
  if (play.firstDraftMs === undefined) play.firstDraftMs = performance.now() - started;
}

function drawChart() {
  const n = chartPoints.length;
  const maxEntropy = Math.max(1e-6, ...chartPoints.map((p) => p[1]));
  const x = (i) => (n <= 1 ? 0 : (300 * i) / (n - 1)).toFixed(1);
  $("chart-accepted").setAttribute("points", chartPoints.map((p, i) => `${x(i)},${(78 - 76 * p[0]).toFixed(1)}`).join(" "));
  $("chart-entropy").setAttribute("points", chartPoints.map((p, i) => `${x(i)},${(78 - (76 * p[1]) / maxEntropy).toFixed(1)}`).join(" "));
}

function showStats(finish, usage) {
  const dl = $("stats");
  dl.innerHTML = "";
  const rows = [];
  if (finish) {
    rows.push(["finish reason", finish.reason]);
    if (finish.diffusion) {
      rows.push(["canvases", finish.diffusion.canvases], ["passes", finish.diffusion.passes],
        ["tokens per forward", finish.diffusion.tokens_per_forward]);
      const best = finish.diffusion.best_of;
      if (best) rows.push(["answer", `candidate ${best.chosen + 1} of ${best.candidates.length}, the best by the verification passes`]);
    }
  }
  if (usage) rows.push(["prompt tokens", usage.prompt_tokens], ["completion tokens", usage.completion_tokens]);
  if (play.firstDraftMs !== undefined) rows.push(["time to first draft", `${play.firstDraftMs.toFixed(0)} ms`]);
  rows.push(["total time", `${(performance.now() - started).toFixed(0)} ms`]);
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = String(v);
    dl.append(dt, dd);
  }
}

// ------------------------------------------------------------------ settings <-> link

const FIELDS = { model: "model", mode: "mode", effort: "effort", steps: "steps", temperature: "temperature",
  seed: "seed", max_tokens: "max-tokens", stop: "stop", prompt: "prompt" };

function shareLink() {
  const q = new URLSearchParams();
  for (const [name, id] of Object.entries(FIELDS)) if ($(id).value !== "") q.set(name, $(id).value);
  q.set("drafts", $("drafts").checked ? "1" : "0");
  if ($("mode").value === "sudoku") {
    q.set("puzzle", boardPuzzle());
    if ($("givens-fixed").checked) q.set("fixed", "1");
  }
  const url = `${location.origin}${location.pathname}?${q}`;
  $("share-url").value = url;
  history.replaceState(null, "", url);
  return url;
}

function readLink() {
  const q = new URLSearchParams(location.search);
  for (const [name, id] of Object.entries(FIELDS)) if (q.has(name)) $(id).value = q.get(name);
  if (q.has("model")) $("model").dataset.wanted = q.get("model");
  if (q.has("drafts")) $("drafts").checked = q.get("drafts") === "1";
  if (q.has("fixed")) $("givens-fixed").checked = q.get("fixed") === "1";
  setBoard(q.get("puzzle") || README_PUZZLE);
}

function showMode() {
  const sudoku = $("mode").value === "sudoku";
  $("sudoku-input").hidden = !sudoku;
  $("text-input").hidden = sudoku;
}

// ------------------------------------------------------------------ running

function requestBody(mode) {
  const body = { model: $("model").value, stream: true,
    stream_options: { include_usage: true, include_drafts: $("drafts").checked, include_draft_tokens: true } };
  const num = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  if (num("steps") !== undefined) body.denoising_steps = num("steps");
  if (num("temperature") !== undefined) body.temperature = num("temperature");
  if (num("seed") !== undefined) body.seed = num("seed");
  if (num("max-tokens") !== undefined) body.max_tokens = num("max-tokens");
  if ($("stop").value) body.stop = $("stop").value;
  if ($("effort").value) body.reasoning_effort = $("effort").value;
  if (mode === "completion") body.prompt = $("prompt").value;
  else if (mode === "sudoku") {
    const puzzle = boardPuzzle();
    body.messages = [{ role: "user", content: puzzle }];
    if ($("givens-fixed").checked) body.infill = { template: givensTemplate(puzzle) };
  } else if (images.length) {
    const parts = [{ type: "text", text: $("prompt").value }];
    for (const url of images) parts.push({ type: "image_url", image_url: { url } });
    body.messages = [{ role: "user", content: parts }];
  } else body.messages = [{ role: "user", content: $("prompt").value }];
  return body;
}

// ------------------------------------------------------------------ images

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addImages(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    images.push(await readAsDataURL(file));
  }
  drawImages();
}

function drawImages() {
  const list = $("image-list");
  list.innerHTML = "";
  images.forEach((url, i) => {
    const item = document.createElement("li");
    const img = document.createElement("img");
    img.src = url;
    img.alt = `image ${i + 1}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove image ${i + 1}`);
    remove.addEventListener("click", () => { images.splice(i, 1); drawImages(); });
    item.append(img, remove);
    list.append(item);
  });
  play.images = images.length;
}

function imageFiles(transfer) {
  if (!transfer) return [];
  const files = [...(transfer.files || [])];
  if (files.length) return files;
  return [...(transfer.items || [])].filter((it) => it.kind === "file").map((it) => it.getAsFile()).filter(Boolean);
}

async function run(ev) {
  ev.preventDefault();
  const mode = $("mode").value;
  const chat = mode !== "completion";
  Object.assign(play, { frames: 0, passes: 0, finished: false, text: "", error: null, firstDraftMs: undefined });
  previous = [];
  chartPoints = [];
  $("answer").textContent = "";
  $("stats").innerHTML = "";
  $("canvas").innerHTML = "";
  $("sudoku-result").textContent = "";
  $("sudoku-result").className = "";
  showError("");
  const puzzle = boardPuzzle();
  if (mode === "sudoku") cells().forEach((c) => { if (!c.classList.contains("given")) c.value = ""; });
  controller = new AbortController();
  $("run").disabled = true;
  $("cancel").disabled = false;
  started = performance.now();
  let finish = null, usage = null;
  try {
    const r = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(mode)), signal: controller.signal });
    if (!r.ok) {
      let body = null;
      try { body = await r.json(); } catch (_) { /* not JSON */ }
      showError(plainError(r.status, body));
      return;
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r/g, "");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) !== -1) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const obj = JSON.parse(data);
          if (obj.error) { showError(plainError(500, obj)); continue; }
          if (obj.usage) usage = obj.usage;
          for (const choice of obj.choices || []) {
            if (choice.index !== 0) continue;
            // best_of (reasoning effort high) streams every candidate's drafts: the canvas follows the first.
            if (choice.draft && !choice.draft.candidate) drawDraft(choice.draft);
            const text = chat ? choice.delta && choice.delta.content : choice.text;
            if (text) { play.text += text; $("answer").textContent = play.text; }
            if (choice.finish_reason) {
              finish = { reason: choice.finish_reason, diffusion: choice.diffusion };
              play.passes = choice.diffusion ? choice.diffusion.passes : 0;
            }
          }
        }
      }
    }
    if (mode === "sudoku") {
      const problem = checkSudoku(puzzle, play.text);
      $("sudoku-result").textContent = problem || "Solved: every row, column and box holds 1-9, and the givens are kept.";
      $("sudoku-result").className = problem ? "bad" : "ok";
      const digits = play.text.replace(/[^1-9]/g, "");
      cells().forEach((c, i) => { if (!c.classList.contains("given")) c.value = digits[i] || ""; c.classList.remove("moving"); });
    }
    showStats(finish, usage);
  } catch (err) {
    if (err.name === "AbortError") showError("Stopped.");
    else showError("The request failed: " + err.message);
  } finally {
    play.finished = true;
    $("run").disabled = false;
    $("cancel").disabled = true;
  }
}

// ------------------------------------------------------------------ start

async function loadPuzzles() {
  try {
    const r = await fetch("/playground/puzzles.json");
    puzzles = (await r.json()).puzzles;
  } catch (_) {
    puzzles = [README_PUZZLE];
  }
}

buildBoard();
readLink();
showMode();
$("mode").addEventListener("change", showMode);
$("image-file").addEventListener("change", (ev) => { addImages([...ev.target.files]); ev.target.value = ""; });
$("prompt").addEventListener("paste", (ev) => {
  const files = imageFiles(ev.clipboardData);
  if (files.length) { ev.preventDefault(); addImages(files); }
});
const dropZone = $("text-input");
dropZone.addEventListener("dragover", (ev) => { ev.preventDefault(); dropZone.classList.add("dragging"); });
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (ev) => {
  ev.preventDefault();
  dropZone.classList.remove("dragging");
  addImages(imageFiles(ev.dataTransfer));
});
$("controls").addEventListener("submit", run);
$("cancel").addEventListener("click", () => controller && controller.abort());
$("share").addEventListener("click", shareLink);
$("random-puzzle").addEventListener("click", () => setBoard(puzzles[Math.floor(Math.random() * puzzles.length)] || README_PUZZLE));
$("clear-board").addEventListener("click", () => setBoard(""));
$("api-key").addEventListener("change", loadModels);
$("model").addEventListener("change", () => { canvasLength = +($("model").selectedOptions[0]?.dataset.canvas || 0); });
loadPuzzles();
play.ready = loadModels().then(() => { play.loaded = true; });
