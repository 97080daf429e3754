"""The garbage collector and the long-lived objects of a serving process.

A process that has imported torch and transformers holds ~400k objects that live as long as
it does (modules, functions, the model's modules). Python's full collection walks all of them:
418-458 ms per `gc.collect()` in a server's processes on a 2-core EPYC, a pause every stream
feels when an automatic one lands between two decode steps, and the same walk ran again at
interpreter exit (~2 s), in each of a server's three processes, one after the other, on
SIGTERM.

`settle()` once a process has started: freeze what is alive (`gc.freeze`: the collector never
walks it again). `before_exit()` as it leaves, so the exit's own collections walk nothing.
"""

from __future__ import annotations

import gc


def settle(collect: bool = True) -> None:
    """After start-up: free its garbage (unless told it has none worth a walk), then keep the
    collector off the survivors for good."""
    if collect:
        gc.collect()
    gc.freeze()


def before_exit() -> None:
    """Everything is about to be freed with the process: no collection walks it first."""
    gc.freeze()
