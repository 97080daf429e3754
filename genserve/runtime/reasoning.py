"""Reasoning models' thinking, apart from their answer: `<think>...</think>` (Qwen3, QwQ,
DeepSeek-R1 and its distills, SmolLM3) becomes chat's `reasoning_content` / `reasoning` (vLLM's
fields) and the rest the message's content, streamed or not.

Where the thinking starts is read from the prompt, not guessed from the output: a template whose
generation prompt opens `<think>` itself (DeepSeek-R1's) has the output begin inside the
thinking; otherwise there is thinking only if the output opens the tag (Qwen3's, which with
`enable_thinking: false` closes an empty one in the prompt, so the output is all answer). Text
that may be the start of a tag is held back until the next piece tells.

A grammar on the answer (response_format, vLLM's structured outputs, tool calls) waits for the
thinking, as vLLM's does with a reasoning parser (`think_first`): the model thinks freely, and
the grammar constrains what follows the closing tag, or all of the output where the prompt
closed the thinking.
"""

from __future__ import annotations

from dataclasses import dataclass

from genserve.engine.types import GRAMMAR, GrammarSpec, ThinkFirst

OPEN, CLOSE = "<think>", "</think>"
MODES = ("auto", "none", "think")
# vLLM's --reasoning-parser names for the same tags.
ALIASES = {"deepseek_r1": "think", "qwen3": "think"}


def active(template: str | None, mode: str) -> bool:
    """Whether a model's answers are split: `think` always, `auto` where the chat template
    knows the closing tag (it renders or strips earlier thinking), `none` never."""
    mode = ALIASES.get(mode, mode)
    if mode == "auto":
        return template is not None and CLOSE in template
    return mode == "think"


def opened_by(prompt_tail: str) -> bool:
    """Whether the prompt's end opens the thinking (the output then begins inside it)."""
    return prompt_tail.rstrip().endswith(OPEN)


def closed_by(prompt_tail: str) -> bool:
    """Whether the prompt's end closes the thinking (Qwen3's `enable_thinking: false`)."""
    return prompt_tail.rstrip().endswith(CLOSE)


def think_first(
    prompt_tail: str, spec: GrammarSpec | None, open_id: int | None, end_id: int | None
) -> ThinkFirst | None:
    """How a reasoning model's grammar waits for its thinking; None: it applies from the first
    token, as on any model. `open_id`/`end_id`: the tags' token ids, None where a tag is not
    one token (a tag of several tokens cannot switch the grammar on at a token boundary)."""
    if spec is None or end_id is None or closed_by(prompt_tail) or spells_thinking(spec):
        return None
    if opened_by(prompt_tail):
        return ThinkFirst(end_id)
    # The model may open the thinking itself: its first token is the opening tag, or the answer.
    return None if open_id is None else ThinkFirst(end_id, open_id)


def spells_thinking(spec: GrammarSpec) -> bool:
    """A caller's own grammar that writes the closing tag (its token, `</think>` in Lark)
    constrains the thinking too, so it applies from the first token."""
    return spec.kind == GRAMMAR and CLOSE in (spec.text or "")


@dataclass(slots=True)
class ReasoningSplitter:
    """One choice's text -> (thinking, answer) pieces, as it arrives."""

    inside: bool  # within the thinking now
    undecided: bool = True  # no output seen yet that says whether it opens the thinking
    done: bool = False  # the thinking closed: the rest is answer
    # Whitespace right after a tag is the template's (or the model's habit), not the text's.
    trim_thinking: bool = True
    trim_answer: bool = True
    held: str = ""

    @classmethod
    def for_prompt(cls, prompt_tail: str) -> ReasoningSplitter:
        return cls(inside=opened_by(prompt_tail))

    def feed(self, text: str) -> tuple[str, str]:
        buf, self.held = self.held + text, ""
        if self.done:
            return "", self._answer(buf)
        if self.undecided:
            buf = self._open(buf)
            if self.undecided:  # still a prefix of the tag: wait
                self.held = buf
                return "", ""
        if not self.inside:
            self.done = True
            return "", self._answer(buf)
        return self._thinking(buf)

    def finish(self) -> tuple[str, str]:
        """What was held when the output ended: thinking if it never closed, else answer."""
        rest, self.held = self.held, ""
        if self.done or (self.undecided and not self.inside):
            return "", self._answer(rest)
        return rest, ""

    def _open(self, buf: str) -> str:
        """At the output's start: an opening tag (written by the model, or again after the
        prompt's) is dropped and the thinking begins; anything else decides it is not one."""
        lead = buf.lstrip()
        if OPEN.startswith(lead):
            return buf  # nothing yet, or part of the tag
        self.undecided = False
        if lead.startswith(OPEN):
            self.inside = True
            return lead[len(OPEN) :]
        # An answer from the first character (no thinking at all) keeps its whitespace.
        self.trim_answer = self.inside
        return buf

    def _thinking(self, buf: str) -> tuple[str, str]:
        end = buf.find(CLOSE)
        if end >= 0:
            self.done = True
            return self._thought(buf[:end]), self._answer(buf[end + len(CLOSE) :])
        keep = _partial_suffix(buf, CLOSE)
        self.held = buf[len(buf) - keep :] if keep else ""
        return self._thought(buf[: len(buf) - keep]), ""

    def _thought(self, text: str) -> str:
        if self.trim_thinking:
            text = text.lstrip()
            self.trim_thinking = not text
        return text

    def _answer(self, text: str) -> str:
        if self.trim_answer:
            text = text.lstrip()
            self.trim_answer = not text
        return text


def _partial_suffix(text: str, tag: str) -> int:
    """How many trailing characters of `text` could begin `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def split(text: str, prompt_tail: str) -> tuple[str, str]:
    """A whole answer at once: (thinking, answer)."""
    s = ReasoningSplitter.for_prompt(prompt_tail)
    thinking, answer = s.feed(text)
    more_thinking, more_answer = s.finish()
    return thinking + more_thinking, answer + more_answer
