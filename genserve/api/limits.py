"""Bounds on what one request may ask of the server, as the wire schemas declare them.

Parameters that scale the engine's work per step are bounded here (issue 13); the slow work
kept off the event loop (tokenizing, templates, grammars) is genserve.runtime.limits.
"""

MAX_LOGIT_BIAS = 300  # entries per request, as OpenAI
MAX_STOP = 4  # stop sequences per request, as OpenAI
MAX_STOP_CHARS = 1024  # characters per stop sequence (OpenAI documents none)
