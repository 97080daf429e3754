"""API keys, hashed at rest and compared in constant time, with per-key rate limits.

Keys come from GENSERVE_API_KEYS (plaintext in the environment, hashed at start and then
forgotten) or from a key file written by `genserve keys`, which holds only SHA-256 hashes.
Every key belongs to a project (its tenant: files, jobs and fine-tuned models are scoped to
it) and has a role (`admin` keys also manage the shared base models). Routes read who calls
them as one typed Principal, from `principal(request)`.
API keys are long random tokens, so a fast hash is the right tool (as for GitHub tokens):
a slow password hash guards low-entropy secrets, which these are not.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import re
import secrets
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from genserve.api.errors import APIError
from genserve.config import hash_key

KEY_PREFIX = "gs-"
ROLES = ("admin", "member")
WINDOW_S = 60.0  # rate limits count per minute, in a sliding window
DEFAULT_PROJECT = "default"  # unauthenticated callers, key-file keys made before projects
PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_project(project: str) -> str:
    if not PROJECT_NAME.match(project):
        raise ValueError(
            f"project {project!r} must be 1-64 letters, digits, '.', '_' or '-' (not first)"
        )
    return project


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return role


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for: the project its objects belong to, and what it may manage."""

    key_id: str
    project: str
    role: str

    def __post_init__(self) -> None:
        check_project(self.project)
        check_role(self.role)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# Without keys (loopback only) the one caller runs the server: it is its admin.
LOCAL_PRINCIPAL = Principal("local", DEFAULT_PROJECT, "admin")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str  # short public id, shown by `genserve keys list`
    name: str
    hash: str
    created: int
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (prompt + completion) per minute
    revoked: bool = False
    # Records written before projects existed load into `default` as members: they shared
    # everything then, and `default` is where the migrated rows are.
    project: str = DEFAULT_PROJECT
    role: str = "member"

    def __post_init__(self) -> None:
        check_project(self.project)
        check_role(self.role)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyFile:
    """The key file: a JSON list of KeyRecords, rewritten atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[KeyRecord]:
        if not self.path.exists():
            return []
        return [KeyRecord(**r) for r in json.loads(self.path.read_text())]

    def save(self, records: list[KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-")
        with os.fdopen(fd, "w") as f:
            json.dump([asdict(r) for r in records], f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def create(
        self,
        name: str,
        rpm: int | None,
        tpm: int | None,
        project: str = DEFAULT_PROJECT,
        role: str = "member",
    ) -> tuple[str, KeyRecord]:
        key = new_key()
        record = KeyRecord(
            secrets.token_hex(4), name, hash_key(key), int(time.time()), rpm, tpm,
            project=project, role=role,
        )  # fmt: skip
        self.save([*self.load(), record])
        return key, record

    def revoke(self, key_id: str) -> KeyRecord:
        records = self.load()
        for i, r in enumerate(records):
            if r.id == key_id:
                records[i] = replace(r, revoked=True)
                self.save(records)
                return records[i]
        raise KeyError(key_id)


@dataclass(slots=True)
class Window:
    """What one key spent in the last minute: request times and (time, tokens) pairs, oldest
    first. Each leaves the window WINDOW_S after it was counted."""

    requests: deque = field(default_factory=deque)
    tokens: deque = field(default_factory=deque)

    def trim(self, now: float) -> None:
        while self.requests and now - self.requests[0] >= WINDOW_S:
            self.requests.popleft()
        while self.tokens and now - self.tokens[0][0] >= WINDOW_S:
            self.tokens.popleft()

    def token_sum(self) -> int:
        return sum(n for _, n in self.tokens)

    def requests_reset(self, now: float) -> float:
        """Seconds until every request counted has left: the limit back to its initial state
        (OpenAI's x-ratelimit-reset-requests)."""
        return WINDOW_S - (now - self.requests[-1]) if self.requests else 0.0

    def tokens_reset(self, now: float) -> float:
        return WINDOW_S - (now - self.tokens[-1][0]) if self.tokens else 0.0

    def requests_room(self, now: float, rpm: int) -> float:
        """Seconds until fewer than `rpm` requests are counted: a 429's Retry-After. The
        oldest one's leaving is enough, unless the key file lowered `rpm` meanwhile."""
        over = len(self.requests) - rpm
        return WINDOW_S - (now - self.requests[over]) if over >= 0 else 0.0

    def tokens_room(self, now: float, tpm: int) -> float:
        """Seconds until fewer than `tpm` tokens are counted: when the oldest entries, as many
        as it takes, have left (the oldest alone may not be enough)."""
        left, last_out = self.token_sum(), None
        for t, n in self.tokens:
            if left < tpm:
                break
            left, last_out = left - n, t
        return 0.0 if last_out is None else WINDOW_S - (now - last_out)


@dataclass(frozen=True, slots=True)
class Caller:
    principal: Principal
    record: KeyRecord | None  # None for keys from the environment (no limits)

    @property
    def key_id(self) -> str:
        return self.principal.key_id


def env_principal(key: str, role: str) -> Principal:
    """An environment key is its own project, named by its hash so that reordering
    GENSERVE_API_KEYS never moves data between keys (and the name reveals nothing)."""
    return hashed_principal(hash_key(key), role)


def hashed_principal(digest: str, role: str) -> Principal:
    """The same from the key's hash alone (keys passed hashed, as to Ray replicas)."""
    return Principal(f"env-{digest[:8]}", f"key-{digest[:12]}", role)


class KeyStore:
    """Verifies bearer tokens and enforces per-key limits. Reloads the key file when it
    changes, so `genserve keys revoke` takes effect on a running server. A key that is in
    the environment and in the key file takes its project and role from the file."""

    def __init__(
        self, env_keys: tuple[str, ...], key_file: Path | None, admin_keys: tuple[str, ...] = (),
        hashes: tuple[tuple[str, str], ...] = (),  # (SHA-256 hex, role): keys passed hashed
    ) -> None:  # fmt: skip
        self._env = {hash_key(k): env_principal(k, "member") for k in env_keys}
        self._env |= {hash_key(k): env_principal(k, "admin") for k in admin_keys}
        self._env |= {digest: hashed_principal(digest, role) for digest, role in hashes}
        self._file = KeyFile(key_file) if key_file else None
        self._mtime: float | None = None
        self._records: list[KeyRecord] = []
        self._windows: dict[str, Window] = {}
        self._reload()

    def _reload(self) -> None:
        if self._file is None:
            return
        mtime = self._file.path.stat().st_mtime if self._file.path.exists() else None
        if mtime != self._mtime:
            self._records, self._mtime = self._file.load(), mtime

    def verify(self, authorization: str | None) -> Caller:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise invalid_key("You didn't provide an API key. Pass it as `Authorization: Bearer`.")
        digest = hash_key(token.strip())
        self._reload()
        caller = None
        # Compare against every key, always, in constant time: no early exit to time.
        for h, principal in self._env.items():
            if hmac.compare_digest(h, digest):
                caller = Caller(principal, None)
        for r in self._records:
            if hmac.compare_digest(r.hash, digest) and not r.revoked:
                caller = Caller(Principal(r.id, r.project, r.role), r)
        if caller is None:
            raise invalid_key("Incorrect API key provided.")
        return caller

    def admit(self, caller: Caller) -> dict[str, str]:
        """Count a request against the key's limits; 429 with Retry-After when over."""
        r = caller.record
        if r is None or (r.rpm is None and r.tpm is None):
            return {}
        now = time.monotonic()
        w = self._windows.setdefault(r.id, Window())
        w.trim(now)
        if r.rpm is not None and len(w.requests) >= r.rpm:
            raise over_limit(
                "requests", r.rpm, w.requests_room(now, r.rpm), limit_headers(r, w, now)
            )
        if r.tpm is not None and w.token_sum() >= r.tpm:
            raise over_limit("tokens", r.tpm, w.tokens_room(now, r.tpm), limit_headers(r, w, now))
        w.requests.append(now)
        return limit_headers(r, w, now)

    def spend(self, caller: Caller | None, tokens: int) -> None:
        if caller is not None and caller.record is not None and caller.record.tpm is not None:
            self._windows.setdefault(caller.key_id, Window()).tokens.append(
                (time.monotonic(), tokens)
            )


def limit_headers(r: KeyRecord, w: Window, now: float) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for a key's window as of `now`."""
    h = {}
    if r.rpm is not None:
        h["x-ratelimit-limit-requests"] = str(r.rpm)
        h["x-ratelimit-remaining-requests"] = str(max(r.rpm - len(w.requests), 0))
        h["x-ratelimit-reset-requests"] = duration(w.requests_reset(now))
    if r.tpm is not None:
        h["x-ratelimit-limit-tokens"] = str(r.tpm)
        h["x-ratelimit-remaining-tokens"] = str(max(r.tpm - w.token_sum(), 0))
        h["x-ratelimit-reset-tokens"] = duration(w.tokens_reset(now))
    return h


def duration(seconds: float) -> str:
    """OpenAI's format for a reset time: "20ms", "1s", "54.2s", "6m0s" (to the millisecond)."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def principal(request: Any) -> Principal:
    """Who calls: set by the edge middleware from the key; the local admin without keys."""
    caller = request.scope.get("state", {}).get("caller")
    if caller is not None:
        return caller.principal
    if request.app.state.edge.keys is None:
        return LOCAL_PRINCIPAL
    # An exempt route that reaches for tenant data: a bug, answered as a missing key.
    raise invalid_key("You didn't provide an API key. Pass it as `Authorization: Bearer`.")


def require_admin(request: Any, what: str) -> Principal:
    """403 in OpenAI's shape unless the key is an admin key."""
    who = principal(request)
    if not who.is_admin:
        raise APIError(
            403,
            f"You have insufficient permissions to {what}: this needs an admin key "
            "(`genserve keys create --role admin` or GENSERVE_ADMIN_KEYS).",
            code="insufficient_permissions",
            error_type="invalid_request_error",
        )
    return who


def invalid_key(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key")


def over_limit(what: str, limit: int, wait_s: float, headers: dict[str, str]) -> APIError:
    retry = max(1, math.ceil(wait_s))
    return APIError(
        429,
        f"Rate limit reached: {limit} {what} per minute for this key. Retry in {retry}s.",
        code="rate_limit_exceeded",
        headers={**headers, "Retry-After": str(retry)},
    )
