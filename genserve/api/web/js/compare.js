// Compare: one prompt sampled k times side by side. k separate requests (n=1) run in parallel:
// each with its own random seed (k different samples), or all with one seed (k identical
// samples, the same on every run). With n=k and one seed the server derives a seed per choice
// index, so those samples would differ from each other; k requests show reproducibility.

import { generate, requestBody } from "./generate.js";
import * as settings from "./settings.js";
import { appendText } from "./tokens.js";

const $ = (id) => document.getElementById(id);
const MAX_K = 8;

function seedMode() {
  return document.querySelector('input[name="seed-mode"]:checked').value;
}

function card(i, seed) {
  const li = document.createElement("li");
  li.className = "sample";
  li.dataset.state = "streaming";
  li.innerHTML = "<header><strong></strong><span class=\"seed\"></span><span class=\"verdict\"></span></header><div class=\"text\"></div>";
  li.querySelector("strong").textContent = `Sample ${i + 1}`;
  li.querySelector(".seed").textContent = `seed ${seed}`;
  li.setAttribute("aria-label", `Sample ${i + 1}, seed ${seed}`);
  $("compare-grid").append(li);
  return li;
}

/** Run one sample into its card; resolves to its text, or null on failure. */
async function sample(li, body, mode) {
  const out = li.querySelector(".text");
  let text = "";
  try {
    for await (const piece of generate(mode, body)) {
      if (!piece.text) continue;
      text += piece.text;
      appendText(out, piece.text, piece.tokens, body.logprobs !== undefined);
    }
    li.dataset.state = "done";
    li.dataset.text = text; // exactly what was generated, for comparing
    return text;
  } catch (e) {
    li.dataset.state = "error";
    out.textContent = e.message;
    out.classList.add("error");
    return null;
  }
}

function judge(cards, texts) {
  const summary = $("compare-summary");
  if (texts.some((t) => t === null)) {
    summary.dataset.verdict = "error";
    summary.textContent = "Some samples failed (see the cards).";
    return;
  }
  const distinct = new Set(texts).size;
  cards.forEach((li, i) => {
    const verdict = li.querySelector(".verdict");
    if (i === 0) return;
    const same = texts[i] === texts[0];
    verdict.textContent = same ? "same as 1" : "differs from 1";
    verdict.className = `verdict ${same ? "same" : "differs"}`;
  });
  summary.dataset.verdict = distinct === 1 ? "identical" : "different";
  summary.dataset.distinct = String(distinct);
  summary.textContent = distinct === 1
    ? `${texts.length} samples, all identical: same seed, same output.`
    : `${texts.length} samples, ${distinct} distinct.`;
}

async function run() {
  const k = Math.min(MAX_K, Math.max(2, Math.round(Number($("compare-k").value) || 4)));
  const fixed = seedMode() === "fixed";
  const seeds = fixed
    ? Array(k).fill(settings.fixedSeed())
    : Array.from({ length: k }, settings.randomSeed);
  const mode = settings.mode();
  const prompt = $("compare-prompt").value;
  const common = {
    mode,
    model: settings.model(),
    sampling: settings.sampling(),
    stream: $("compare-stream").checked,
    probs: settings.showProbs(),
    system: settings.systemPrompt(),
    messages: [{ role: "user", content: prompt }],
    prompt,
  };
  const summary = $("compare-summary");
  summary.dataset.state = "running";
  summary.removeAttribute("data-verdict");
  summary.textContent = `Sampling ${k} times${fixed ? ` with seed ${seeds[0]}` : " with random seeds"}…`;
  $("compare-grid").replaceChildren();
  $("token-detail").textContent = "";
  const cards = seeds.map((seed, i) => card(i, seed));
  const texts = await Promise.all(
    cards.map((li, i) => sample(li, requestBody({ ...common, seed: seeds[i] }), mode)),
  );
  judge(cards, texts);
  summary.dataset.state = "done";
}

function showToken(e) {
  const tok = e.target.closest(".tok");
  if (tok) $("token-detail").textContent = tok.title;
}

export function initCompare() {
  $("compare-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const button = $("compare-run");
    button.disabled = true;
    try {
      await run();
    } finally {
      button.disabled = false;
    }
  });
  $("compare-prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("compare-form").requestSubmit();
    }
  });
  $("compare-grid").addEventListener("mouseover", showToken);
  $("compare-grid").addEventListener("click", showToken);
}
