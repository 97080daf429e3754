// One request to /v1/chat/completions or /v1/completions, streamed or not, as a sequence of
// pieces: {index, text, tokens, finish}, plus {usage} when the server reports it.

import { request, sse } from "./api.js";

const TOP = 5; // alternatives shown per token

export function endpoint(mode) {
  return mode === "chat" ? "/v1/chat/completions" : "/v1/completions";
}

/**
 * The request body. `messages` (chat) excludes the system prompt, which goes first when set;
 * `prompt` is the completion prompt. `seed` null means the server picks.
 */
export function requestBody({ mode, model, system, messages, prompt, sampling, seed, stream, probs, n, tools }) {
  const body = { model, ...sampling, ...(mode === "chat" && tools ? tools : {}) };
  if (n && n > 1) body.n = n;
  if (seed !== null && seed !== undefined) body.seed = seed;
  if (mode === "chat") {
    body.messages = system ? [{ role: "system", content: system }, ...messages] : messages;
    if (probs) Object.assign(body, { logprobs: true, top_logprobs: TOP });
  } else {
    body.prompt = prompt;
    if (probs) body.logprobs = TOP;
  }
  if (stream) Object.assign(body, { stream: true, stream_options: { include_usage: true } });
  return body;
}

function byProbability(a, b) {
  return b.logprob - a.logprob;
}

/** Chat's `logprobs.content` or the legacy completions columns -> [{token, logprob, top}]. */
export function tokensOf(logprobs, mode) {
  if (!logprobs) return [];
  if (mode === "chat") {
    return (logprobs.content || []).map((e) => ({
      token: e.token,
      logprob: e.logprob,
      top: (e.top_logprobs || []).map((t) => ({ token: t.token, logprob: t.logprob })),
    }));
  }
  const tokens = logprobs.tokens || [];
  return tokens.map((token, i) => ({
    token,
    logprob: (logprobs.token_logprobs || [])[i],
    top: Object.entries((logprobs.top_logprobs || [])[i] || {})
      .map(([t, logprob]) => ({ token: t, logprob }))
      .sort(byProbability),
  }));
}

function pieceOf(choice, mode, streamed) {
  let text;
  if (mode === "chat") text = streamed ? choice.delta?.content : choice.message?.content;
  else text = choice.text;
  const message = streamed ? choice.delta : choice.message;
  return {
    index: choice.index ?? 0,
    calls: (mode === "chat" && message?.tool_calls) || null,
    text: text || "",
    tokens: tokensOf(choice.logprobs, mode),
    finish: choice.finish_reason || null,
  };
}

/** POST the body and yield its pieces as they come (SSE) or all at once (JSON). */
export async function* generate(mode, body, signal) {
  const response = await request(endpoint(mode), { method: "POST", json: body, signal });
  if (!body.stream) {
    const result = await response.json();
    for (const choice of result.choices || []) yield pieceOf(choice, mode, false);
    if (result.usage) yield { usage: result.usage };
    return;
  }
  for await (const chunk of sse(response)) {
    for (const choice of chunk.choices || []) yield pieceOf(choice, mode, true);
    if (chunk.usage) yield { usage: chunk.usage };
  }
}
