"""Loaded at start-up by every Python process of the test's second Ray node (its raylet's
PYTHONPATH names this folder): replicas, tasks, and the training worker they start. Records
each path those processes open, list, create or connect to (Python's audit events) under the
folders named in GENSERVE_AUDIT_WATCH, one line per event in GENSERVE_AUDIT_DIR/<pid>.log.
Only tests use it; genserve never imports it."""

import os
import sys

EVENTS = frozenset(
    ("open", "os.listdir", "os.scandir", "os.mkdir", "os.rename", "os.remove", "os.rmdir",
     "shutil.copyfile", "shutil.copytree", "sqlite3.connect")
)  # fmt: skip


def _install(log_dir: str, watch: tuple[str, ...]) -> None:
    out = open(os.path.join(log_dir, f"{os.getpid()}.log"), "a", buffering=1)  # noqa: SIM115

    def hook(event: str, args: tuple) -> None:
        if event not in EVENTS or not args or isinstance(args[0], int) or args[0] is None:
            return
        try:
            path = os.path.abspath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if path.startswith(watch):
            out.write(f"{event}\t{path}\n")

    sys.addaudithook(hook)


if os.environ.get("GENSERVE_AUDIT_DIR") and os.environ.get("GENSERVE_AUDIT_WATCH"):
    _install(
        os.environ["GENSERVE_AUDIT_DIR"],
        tuple(os.environ["GENSERVE_AUDIT_WATCH"].split(os.pathsep)),
    )
