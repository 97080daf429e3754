// The playground: a chat (the conversation so far is resent each turn) or a single completion,
// streamed token by token.

import { generate, requestBody } from "./generate.js";
import * as settings from "./settings.js";
import { appendText } from "./tokens.js";

const $ = (id) => document.getElementById(id);

let history = []; // chat turns: {role, content}
let controller = null;

function message(role, label) {
  const article = document.createElement("article");
  article.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = label;
  const text = document.createElement("div");
  text.className = "text";
  const meta = document.createElement("small");
  meta.className = "meta";
  article.append(who, text, meta);
  $("transcript").append(article);
  return { article, text, meta };
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

function describeRun({ seed, usage, finish, started }) {
  const parts = [`seed ${seed}`];
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  if (finish) parts.push(`finish: ${finish}`);
  parts.push(`${((performance.now() - started) / 1000).toFixed(1)} s`);
  return parts.join(" · ");
}

/** Streamed tool-call deltas (index, id and name first, then argument fragments) -> calls. */
function addCalls(calls, deltas) {
  for (const d of deltas) {
    if (d.id) calls[d.index] = { id: d.id, type: "function", function: { name: d.function.name, arguments: "" } };
    calls[d.index].function.arguments += d.function?.arguments || "";
  }
}

/** The calls as JSON (arguments parsed where they parse) in a <pre> under the reply. */
function showCalls(view, calls) {
  let pre = view.article.querySelector("pre.tool-calls");
  if (!pre) {
    pre = document.createElement("pre");
    pre.className = "tool-calls";
    view.text.after(pre);
  }
  const shown = calls.map((c) => {
    let args = c.function.arguments;
    try { args = JSON.parse(args); } catch { /* still streaming */ }
    return { name: c.function.name, arguments: args };
  });
  pre.textContent = JSON.stringify(shown, null, 2);
}

/** Stream one reply into `view`; returns {text, calls}, or null if it failed. */
async function streamInto(view, mode, body) {
  const run = { seed: body.seed, usage: null, finish: null, started: performance.now() };
  let received = "";
  const calls = [];
  let chunks = 0;
  view.article.dataset.state = "streaming";
  controller = new AbortController();
  try {
    for await (const piece of generate(mode, body, controller.signal)) {
      if (piece.usage) { run.usage = piece.usage; continue; }
      if (piece.finish) run.finish = piece.finish;
      if (piece.calls) { addCalls(calls, piece.calls); showCalls(view, calls); }
      if (!piece.text) continue;
      received += piece.text;
      appendText(view.text, piece.text, piece.tokens, settings.showProbs());
      view.article.dataset.chunks = String(++chunks);
      $("transcript").scrollTop = $("transcript").scrollHeight;
    }
    view.article.dataset.state = "done";
  } catch (e) {
    view.article.dataset.state = e.name === "AbortError" ? "stopped" : "error";
    if (e.name !== "AbortError") {
      view.meta.classList.add("error");
      view.meta.textContent = e.message;
      return null;
    }
    run.finish = "stopped";
  } finally {
    controller = null;
  }
  view.meta.textContent = describeRun(run);
  return { text: received, calls };
}

async function send() {
  const prompt = $("prompt");
  const text = prompt.value;
  if (!text.trim() || controller) return;
  const mode = settings.mode();
  const common = {
    mode,
    model: settings.model(),
    sampling: settings.sampling(),
    seed: settings.nextSeed(),
    stream: true,
    probs: settings.showProbs(),
  };
  busy(true);
  try {
    if (mode === "chat") {
      message("user", "You").text.textContent = text;
      history.push({ role: "user", content: text });
      prompt.value = "";
      const view = message("assistant", common.model);
      let tools;
      try {
        tools = settings.tools();
      } catch (e) {
        view.meta.classList.add("error");
        view.meta.textContent = e.message;
        history.pop();
        return;
      }
      const body = requestBody({ ...common, system: settings.systemPrompt(), messages: history, tools });
      const reply = await streamInto(view, mode, body);
      if (reply === null) history.pop(); // a failed turn is shown but not resent
      else if (reply.calls.length) history.push({ role: "assistant", content: reply.text || null, tool_calls: reply.calls });
      else history.push({ role: "assistant", content: reply.text });
    } else {
      const view = message("assistant completion", common.model);
      const echo = document.createElement("span");
      echo.className = "prompt-echo";
      echo.textContent = text;
      view.text.append(echo);
      await streamInto(view, mode, requestBody({ ...common, prompt: text }));
    }
  } finally {
    busy(false);
  }
}

export function initPlay() {
  $("play-form").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("play-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("clear").addEventListener("click", () => {
    controller?.abort();
    history = [];
    $("transcript").replaceChildren();
    $("prompt").focus();
  });
}
