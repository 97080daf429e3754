// The settings column: API key, model picker, mode, system prompt, sampling knobs, seed lock.

import { getJSON, getKey, setKey } from "./api.js";

const $ = (id) => document.getElementById(id);
const MODEL_KEY = "genserve.model";

export function randomSeed() {
  // 31 bits: a positive integer every client and server handles the same way
  return crypto.getRandomValues(new Uint32Array(1))[0] >>> 1;
}

function readSeed() {
  const raw = $("seed").value.trim();
  if (raw === "") return null;
  const seed = Number(raw);
  return Number.isSafeInteger(seed) && seed >= 0 ? seed : null;
}

/** The seed for the next run: the locked one, or a fresh one (written back so it can be locked). */
export function nextSeed() {
  const seed = $("seed-lock").checked ? readSeed() : null;
  if (seed !== null) return seed;
  const fresh = randomSeed();
  $("seed").value = String(fresh);
  return fresh;
}

/** One seed for every sample: the field's, or a new one written into it. */
export function fixedSeed() {
  const seed = readSeed();
  if (seed !== null) return seed;
  const fresh = randomSeed();
  $("seed").value = String(fresh);
  return fresh;
}

export function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

export const EXAMPLE_TOOLS = [
  {
    type: "function",
    function: {
      name: "get_weather",
      description: "The current weather in a city.",
      parameters: {
        type: "object",
        properties: {
          city: { type: "string", maxLength: 40 },
          unit: { enum: ["celsius", "fahrenheit"] },
        },
        required: ["city", "unit"],
        additionalProperties: false,
      },
    },
  },
];

/** {tools, tool_choice} for a chat body, or null when tools are off; throws on bad JSON. */
export function tools() {
  if (!$("use-tools").checked) return null;
  let parsed;
  try {
    parsed = JSON.parse($("tools").value);
  } catch (e) {
    throw new Error(`Tools are not valid JSON: ${e.message}`);
  }
  return { tools: parsed, tool_choice: $("tool-choice").value };
}

export function model() {
  return $("model").value;
}

export function systemPrompt() {
  return $("system").value.trim();
}

export function showProbs() {
  return $("show-probs").checked;
}

function numberOf(id, fallback) {
  const value = Number($(id).value);
  return Number.isFinite(value) && $(id).value !== "" ? value : fallback;
}

/** Sampling fields of a request body (top_k is vLLM's extra body field; 0 leaves it off). */
export function sampling() {
  const body = {
    temperature: numberOf("temperature", 1),
    top_p: numberOf("top-p", 1),
    max_tokens: Math.max(1, Math.round(numberOf("max-tokens", 64))),
  };
  const topK = Math.round(numberOf("top-k", 0));
  if (topK > 0) body.top_k = topK;
  return body;
}

function option(card) {
  const opt = document.createElement("option");
  opt.value = card.id;
  opt.textContent = card.id;
  if (card.parent) opt.title = `fine-tuned from ${card.parent}`;
  return opt;
}

function fillPicker(select, groups, wanted) {
  select.replaceChildren();
  for (const [label, cards] of groups) {
    if (!cards.length) continue;
    const group = document.createElement("optgroup");
    group.label = label;
    group.append(...cards.map(option));
    select.append(group);
  }
  const ids = groups.flatMap(([, cards]) => cards.map((c) => c.id));
  if (wanted && ids.includes(wanted)) select.value = wanted;
}

/** GET /v1/models into both pickers: base and fine-tuned (cards with `parent`) in groups. */
export async function loadModels(select = null) {
  const list = await getJSON("/v1/models");
  const all = (list.data || []).slice().sort((a, b) => a.id.localeCompare(b.id));
  // Embeddings models cannot chat or complete: left out, so the picker opens on a generative one.
  const cards = all.filter((c) => c.kind !== "embed");
  const base = cards.filter((c) => !c.parent);
  const tuned = cards.filter((c) => c.parent);
  const wanted = select || $("model").value || sessionStorage.getItem(MODEL_KEY);
  fillPicker($("model"), [["Base models", base], ["Fine-tuned", tuned]], wanted);
  fillPicker($("ft-model"), [["Base models", base]], $("ft-model").value);
  sessionStorage.setItem(MODEL_KEY, $("model").value);
  return cards;
}

function bindRange(id, digits) {
  const input = $(id);
  const out = $(`${id}-out`);
  const show = () => { out.value = Number(input.value).toFixed(digits); };
  input.addEventListener("input", show);
  show();
}

function syncMode() {
  const chat = mode() === "chat";
  for (const el of document.querySelectorAll(".chat-only")) el.hidden = !chat;
  $("prompt").labels[0].textContent = chat ? "Message" : "Prompt";
  document.body.dataset.mode = mode();
}

/** Wire the column up; `onError(message|null)` reports model-list failures. */
export function initSettings(onError) {
  const key = $("api-key");
  key.value = getKey();
  const reload = () => loadModels().then(() => onError(null), (e) => onError(e.message));
  const useKey = () => { setKey(key.value.trim()); reload(); };
  key.addEventListener("change", useKey);
  $("key-form").addEventListener("submit", (e) => { e.preventDefault(); useKey(); });
  $("refresh-models").addEventListener("click", reload);
  $("model").addEventListener("change", () => sessionStorage.setItem(MODEL_KEY, model()));
  if (!$("tools").value) $("tools").value = JSON.stringify(EXAMPLE_TOOLS, null, 2);
  bindRange("temperature", 2);
  bindRange("top-p", 2);
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", syncMode);
  }
  $("settings-form").addEventListener("submit", (e) => e.preventDefault());
  syncMode();
  return reload();
}
