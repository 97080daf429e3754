// Fine-tuning: upload a JSONL file, start a job, watch its events and loss, try the new model.

import { getJSON, postJSON, request } from "./api.js";
import { drawLoss } from "./chart.js";
import { loadModels } from "./settings.js";

const $ = (id) => document.getElementById(id);
const JOB_KEY = "genserve.job";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1000;
const MAX_PAGES = 20; // events pages fetched per poll when catching up

let watch = null; // {id, events: Map(id -> event), stopped}

function showError(message) {
  const box = $("ft-error");
  box.hidden = !message;
  box.textContent = message || "";
}

async function upload(file) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  return (await request("/v1/files", { method: "POST", body: form })).json();
}

async function start(event) {
  event.preventDefault();
  showError(null);
  const button = $("ft-start");
  button.disabled = true;
  try {
    const file = $("ft-file").files[0];
    if (!file) throw new Error("Choose a JSONL file first.");
    const uploaded = await upload(file);
    const body = { model: $("ft-model").value, training_file: uploaded.id };
    const suffix = $("ft-suffix").value.trim();
    if (suffix) body.suffix = suffix;
    const epochs = Number($("ft-epochs").value);
    if (epochs > 0) body.hyperparameters = { n_epochs: Math.round(epochs) };
    follow(await postJSON("/v1/fine_tuning/jobs", body));
  } catch (e) {
    showError(e.status === 404 && !e.code
      ? `This server has no fine-tuning API (${e.message}).`
      : e.message);
  } finally {
    button.disabled = false;
  }
}

/** Events newest first, page by page, until one we already have (or the first). */
async function newEvents(id, known) {
  const fresh = [];
  let after = null;
  for (let page = 0; page < MAX_PAGES; page++) {
    const query = new URLSearchParams({ limit: "100" });
    if (after) query.set("after", after);
    const list = await getJSON(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?${query}`);
    const data = list.data || [];
    const unseen = data.filter((e) => !known.has(e.id));
    fresh.push(...unseen);
    if (!list.has_more || !data.length || unseen.length < data.length) break;
    after = data[data.length - 1].id;
  }
  return fresh.reverse(); // oldest first
}

function eventItem(e) {
  const li = document.createElement("li");
  li.dataset.level = e.level || "info";
  li.dataset.type = e.type || "message";
  const time = new Date((e.created_at || 0) * 1000).toLocaleTimeString();
  li.textContent = `${time}  ${e.message}`;
  return li;
}

function lossPoints(events) {
  const byStep = new Map();
  for (const e of events) {
    const d = e.data;
    if (e.type !== "metrics" || !d || !Number.isFinite(d.step)) continue;
    const point = byStep.get(d.step) || { step: d.step, train: NaN, valid: NaN };
    if (Number.isFinite(d.train_loss)) point.train = d.train_loss;
    if (Number.isFinite(d.valid_loss)) point.valid = d.valid_loss;
    byStep.set(d.step, point);
  }
  return [...byStep.values()].sort((a, b) => a.step - b.step);
}

function renderJob(job) {
  $("ft-job").hidden = false;
  $("ft-job-id").textContent = job.id;
  const status = $("ft-status");
  status.textContent = job.status.replace("_", " ");
  status.dataset.status = job.status;
  $("ft-result").textContent = job.fine_tuned_model || (job.error?.message ? `error: ${job.error.message}` : "—");
  $("ft-tokens").textContent = job.trained_tokens ?? "—";
  $("ft-cancel").disabled = TERMINAL.has(job.status);
  $("ft-try").disabled = job.status !== "succeeded";
  $("ft-try").dataset.model = job.fine_tuned_model || "";
  $("ft-eval").disabled = job.status !== "succeeded";
}

function renderEvents(fresh) {
  for (const e of fresh) watch.events.set(e.id, e);
  if (fresh.length) {
    const list = $("ft-events");
    list.append(...fresh.map(eventItem));
    list.scrollTop = list.scrollHeight;
  }
  drawLoss($("ft-chart"), lossPoints(watch.events.values()));
}

async function poll(current) {
  while (!current.stopped) {
    let job;
    try {
      job = await getJSON(`/v1/fine_tuning/jobs/${encodeURIComponent(current.id)}`);
      renderJob(job);
      renderEvents(await newEvents(current.id, current.events));
      showError(null);
    } catch (e) {
      if (e.status === 404) { // gone (say, another server's data dir): stop watching it
        sessionStorage.removeItem(JOB_KEY);
        $("ft-job").hidden = true;
        break;
      }
      showError(e.message);
    }
    if (job && TERMINAL.has(job.status)) {
      if (job.status === "succeeded") await loadModels();
      $("ft-job").dataset.done = job.status;
      break;
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

/** Watch `job` (an object with at least `id`) until it ends. */
export function follow(job) {
  if (watch) watch.stopped = true;
  watch = { id: job.id, events: new Map(), stopped: false };
  sessionStorage.setItem(JOB_KEY, job.id);
  $("ft-events").replaceChildren();
  delete $("ft-job").dataset.done;
  if (job.status) renderJob(job);
  drawLoss($("ft-chart"), []);
  poll(watch);
}

async function cancel() {
  if (!watch) return;
  try {
    renderJob(await postJSON(`/v1/fine_tuning/jobs/${encodeURIComponent(watch.id)}/cancel`, {}));
  } catch (e) {
    showError(e.message);
  }
}

function tryModel() {
  const id = $("ft-try").dataset.model;
  if (!id) return;
  $("model").value = id;
  $("model").dispatchEvent(new Event("change"));
  location.hash = "#play";
  $("prompt").focus();
}

// -- evaluate a finished model on a file: one Batch API batch ---------------------------------
const BATCH_DONE = new Set(["completed", "failed", "expired", "cancelled"]);
const EVAL_MAX_TOKENS = 128; // answers to grade are short; a batch line of the file may set its own

/** A test file's lines -> batch request lines for `model`. A chat example ({messages}) loses
 * its last assistant message (the answer to compare with); a batch line keeps its body. */
export function batchLines(text, model) {
  const out = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    if (!raw.trim()) return;
    let item;
    try {
      item = JSON.parse(raw);
    } catch {
      throw new Error(`line ${i + 1} is not JSON`);
    }
    if (item.body && item.custom_id) {
      out.push({ ...item, method: "POST", url: "/v1/chat/completions", body: { ...item.body, model } });
      return;
    }
    const messages = [...(item.messages || [])];
    if (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
    if (!messages.length) throw new Error(`line ${i + 1} has no messages to answer`);
    out.push({
      custom_id: `line-${i + 1}`, method: "POST", url: "/v1/chat/completions",
      body: { model, messages, max_tokens: EVAL_MAX_TOKENS },
    });
  });
  if (!out.length) throw new Error("the file holds no examples");
  return out.map((x) => JSON.stringify(x)).join("\n") + "\n";
}

function evalStatus(batch) {
  const c = batch.request_counts || { completed: 0, failed: 0, total: 0 };
  const errors = (batch.errors?.data || []).map((e) => (e.line ? `line ${e.line}: ` : "") + e.message);
  $("ft-eval-status").textContent =
    `batch ${batch.status}: ${c.completed} done, ${c.failed} failed of ${c.total}` +
    (errors.length ? ` (${errors.join("; ")})` : "");
  $("ft-eval").dataset.status = batch.status;
}

async function evaluate() {
  const model = $("ft-try").dataset.model;
  const file = $("ft-eval-file").files[0];
  showError(null);
  $("ft-eval-download").hidden = true;
  try {
    if (!file) throw new Error("Choose a test file first.");
    const lines = batchLines(await file.text(), model);
    const form = new FormData();
    form.append("purpose", "batch");
    form.append("file", new Blob([lines], { type: "application/jsonl" }), `eval-${file.name}`);
    const uploaded = await (await request("/v1/files", { method: "POST", body: form })).json();
    let batch = await postJSON("/v1/batches", {
      input_file_id: uploaded.id, endpoint: "/v1/chat/completions", completion_window: "24h",
      metadata: { evaluates: model },
    });
    while (!BATCH_DONE.has(batch.status)) {
      evalStatus(batch);
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      batch = await getJSON(`/v1/batches/${encodeURIComponent(batch.id)}`);
    }
    evalStatus(batch);
    const download = $("ft-eval-download");
    download.dataset.file = batch.output_file_id || "";
    download.hidden = !batch.output_file_id;
  } catch (e) {
    showError(e.message);
  }
}

async function downloadResults() {
  const id = $("ft-eval-download").dataset.file;
  if (!id) return;
  const blob = await (await request(`/v1/files/${encodeURIComponent(id)}/content`)).blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${id}.jsonl`;
  link.click();
  URL.revokeObjectURL(link.href);
}

export function initFinetune() {
  $("ft-eval-start").addEventListener("click", evaluate);
  $("ft-eval-download").addEventListener("click", downloadResults);
  $("ft-form").addEventListener("submit", start);
  $("ft-cancel").addEventListener("click", cancel);
  $("ft-try").addEventListener("click", tryModel);
  const resume = sessionStorage.getItem(JOB_KEY);
  if (resume) follow({ id: resume });
}
