// Text with per-token probabilities: each token a span whose title lists its probability and
// the alternatives the model weighed; the more surprising the token, the redder its tint.

function percent(logprob) {
  if (logprob === null || logprob === undefined) return "?";
  const p = Math.exp(logprob);
  if (p >= 0.999) return "100%";
  if (p < 0.001) return "<0.1%";
  return `${(p * 100).toFixed(p < 0.1 ? 1 : 0)}%`;
}

function shown(token) {
  return JSON.stringify(token); // makes spaces and newlines visible
}

/** "tok" 52% | alternatives: "a" 52%, "b" 10%, ... */
export function describe(entry) {
  const head = `${shown(entry.token)}  p = ${percent(entry.logprob)}  (logprob ${Number(entry.logprob).toFixed(3)})`;
  if (!entry.top.length) return head;
  const alts = entry.top.map((t) => `  ${shown(t.token)}  ${percent(t.logprob)}`).join("\n");
  return `${head}\nTop alternatives:\n${alts}`;
}

function tokenSpan(text, entries) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  const p = Math.min(...entries.map((e) => Math.exp(e.logprob ?? 0)));
  span.style.setProperty("--p", p.toFixed(3));
  span.dataset.p = p.toFixed(4);
  span.title = entries.map(describe).join("\n\n");
  return span;
}

/**
 * Append a piece of generated text. The text itself is what is shown (it is exact, where a
 * token's own spelling may be half a character); when its tokens spell it exactly, one span
 * per token, otherwise one span for the piece carrying every token's description.
 */
export function appendText(container, text, tokens, withProbs) {
  if (!text) return;
  if (!withProbs || !tokens.length) {
    container.append(text);
    return;
  }
  if (tokens.length > 1 && tokens.map((t) => t.token).join("") === text) {
    container.append(...tokens.map((t) => tokenSpan(t.token, [t])));
    return;
  }
  container.append(tokenSpan(text, tokens));
}
