"""Request lifecycle: scheduling, batching, detokenizing. Plain Python, no torch import."""
