"""genserve: serve and fine-tune generative models behind an OpenAI-compatible API."""

__version__ = "0.1.0"
