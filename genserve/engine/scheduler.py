"""Continuous batching: who runs this step, and how many of their tokens.

Plain Python, testable without a model. The KV cache is a pool of blocks (engine/kv_blocks.py):
a sequence is admitted when blocks for all its tokens fit (blocks found in the prefix cache are
reused, and its prefill starts after them), and it takes one more block each time its decode
crosses a block boundary. When none is free, the newest running sequence is preempted: its
blocks are freed and it is recomputed later, its stream going on where it stopped. Every step
spends a token budget: first one token for every decoding sequence (latency of running streams
comes first), then prefill chunks for sequences still reading their prompt, then new sequences
from the waiting queue while slots (a bound on sequences at once) and blocks are free.

Background requests (the Batch API's, Request.priority) come last at every stage: their prefill
gets what interactive prefill leaves of the budget, and they are admitted only while more than
`reserved_slots` slots are free, so an interactive request always finds a slot that batch work
cannot hold, and never waits in the queue behind it; and a step that reads an interactive prompt
leaves the background rows out (see schedule()).
"""

from __future__ import annotations

import enum
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from genserve.engine.kv_blocks import KVCacheManager
from genserve.engine.types import BlockCopy, Request, RequestTimes

# Blocks per slot when no pool is given (unit tests of batching alone): never the bound.
UNBOUNDED_BLOCKS_PER_SLOT = 4096


class QueueFullError(Exception):
    """The engine is at capacity (running + waiting); the API answers 429."""


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    request: Request
    slot: int = -1
    num_computed: int = 0  # tokens whose keys/values are in the cache
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_cached: int | None = None  # prompt tokens the prefix cache served at first admission
    preemptions: int = 0
    # When it entered the queue, was first admitted, and got its first token (engine clock):
    # its phases for /metrics, taken once each, never per token.
    queued_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    first_token_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def times(self, now: float) -> RequestTimes:
        """Its phases as it ends at `now` (one never scheduled, or without a token, has spent
        nothing in the phases it did not reach)."""
        scheduled = self.scheduled_at or now
        first = self.first_token_at or now
        return RequestTimes(scheduled - self.queued_at, first - scheduled, now - first)

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        prompt = self.request.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        return (prompt + self.output_ids)[start:end]


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Tokens [start, end) of `seq` run this step; `sample` when a new token follows them."""

    seq: Sequence
    start: int
    end: int
    sample: bool  # fixed when scheduled: the chunk reaches the sequence's last token

    @classmethod
    def of(cls, seq: Sequence, start: int, end: int) -> ScheduledChunk:
        return cls(seq, start, end, end == seq.num_tokens)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    copies: tuple[BlockCopy, ...] = ()  # KV rows to copy before the chunks run

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)


class SlotPool:
    """Free slots. A slot is also a lane of the KV block pool (engine/kv_blocks.py): which one
    a sequence takes decides whether its cache is one contiguous run."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = set(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def free_slots(self) -> set[int]:
        return self._free

    def take(self, slot: int | None = None) -> int:
        """`slot`, or the lowest free one (the live slots stay packed at the front)."""
        slot = min(self._free) if slot is None else slot
        self._free.remove(slot)
        return slot

    def give(self, slot: int) -> None:
        self._free.add(slot)


class Scheduler:
    def __init__(
        self,
        num_slots: int,
        token_budget: int,
        aligned_chunks: bool = True,
        kv: KVCacheManager | None = None,
        reserved_slots: int | None = None,
    ) -> None:
        if token_budget < num_slots + 1:
            raise ValueError("token_budget must exceed num_slots (every slot decodes each step)")
        # Slots bound how many sequences run at once (and name a static cache's row for the
        # runners that keep one); blocks bound the tokens they hold.
        self.slots = SlotPool(num_slots)
        self.kv = kv or KVCacheManager(num_slots * UNBOUNDED_BLOCKS_PER_SLOT, caching=False)
        # Slots background work never takes. By default it gets a quarter (at least one): on a
        # CPU every row costs step time, and the step a call's prompt waits behind is its TTFT.
        default = num_slots - max(1, num_slots // 4)
        self.reserved_slots = default if reserved_slots is None else reserved_slots
        if not 0 <= self.reserved_slots <= num_slots:
            raise ValueError("reserved_slots must be in [0, num_slots]")
        self.token_budget = token_budget
        # Prompts are cut at fixed multiples of chunk_size, never where the budget happens to
        # run out: the same prompt then runs as the same chunks whatever else is in flight,
        # which keeps seeded outputs identical alone or under load. A chunk always fits in
        # what the decodes leave of the budget.
        self.chunk_size = token_budget - num_slots
        # Off (without --deterministic): only seeded requests' prompts are cut at the fixed
        # boundaries; the others fill the budget.
        self.aligned_chunks = aligned_chunks
        # A seeded request reuses cached blocks only up to a chunk boundary: its next chunk
        # then starts where it would have without the cache, and sees the same keys/values.
        self.invariant_unit = math.lcm(self.chunk_size, self.kv.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preempted = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> Sequence:
        # The queue's bound is enforced where requests arrive (AsyncEngine.open), on the event
        # loop, so that a full queue is a 429 there and never an error on the engine thread.
        seq = Sequence(request)
        self.waiting.append(seq)
        return seq

    def schedule(self) -> SchedulerOutput:
        budget = self.token_budget
        chunks: list[ScheduledChunk] = []
        # A step that reads an interactive prompt carries no background rows: its time is that
        # call's time to first token. The background sequences skip one step, nothing more
        # (their state and their seeded draws do not depend on when they run).
        hold = self._interactive_prompt_due()
        runnable = [s for s in self.running if not (hold and s.request.background)]
        for seq in [s for s in runnable if s.num_computed == s.num_tokens - 1]:
            if seq.status is not SeqStatus.RUNNING:  # preempted for an older one's block
                continue
            if len(chunks) < budget and self._room_for_decode(seq):
                chunks.append(ScheduledChunk.of(seq, seq.num_computed, seq.num_tokens))
        budget -= len(chunks)
        # Interactive prompts first (a stable sort: arrival order within a priority).
        for seq in sorted(runnable, key=lambda s: s.request.priority):
            if seq.status is not SeqStatus.RUNNING:  # preempted above
                continue
            if seq.num_computed < seq.num_tokens - 1 and self._fits(seq, budget):
                budget -= self._prefill(seq, budget, chunks)
        while (seq := self._next_waiting(hold)) is not None and self._fits(seq, budget):
            if not self._admit(seq):
                break  # its blocks do not fit yet: it keeps its place in the queue
            budget -= self._prefill(seq, budget, chunks)
        # Sequences of one adapter side by side: the model applies each adapter to one
        # contiguous block of rows (views, no gathers). Rows are independent, so the order
        # changes no result.
        chunks.sort(key=lambda c: c.seq.request.adapter or "")
        return SchedulerOutput(tuple(chunks), self.kv.take_copies())

    def _next_waiting(self, hold: bool = False) -> Sequence | None:
        """The fairest interactive sequence, else (unless `hold`) the oldest background one
        while more slots than the reserve are free; None when nothing may start now."""
        if not self.slots.num_free:
            return None
        first = self._fairest([s for s in self.waiting if not s.request.background])
        if first is not None:
            return first
        if not hold and self.waiting and self.slots.num_free > self.reserved_slots:
            return self.waiting[0]
        return None

    def _fairest(self, candidates: list[Sequence]) -> Sequence | None:
        """The oldest sequence of the tenant that runs the fewest now: one project's burst
        (n=16, best_of, a flood of calls) waits behind the others' first calls instead of
        taking every slot and step before them. With one tenant this is plain FIFO."""
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        load = Counter(s.request.tenant for s in self.running)
        return min(candidates, key=lambda s: load[s.request.tenant])  # min keeps the oldest

    def _interactive_prompt_due(self) -> bool:
        """An interactive prompt is being read, or one waits for a free slot."""
        for seq in self.running:
            if not seq.request.background and seq.num_computed < seq.num_tokens - 1:
                return True
        return self.slots.num_free > 0 and any(not s.request.background for s in self.waiting)

    def _room_for_decode(self, seq: Sequence) -> bool:
        """A block for the decode's position, preempting the newest sequences (background
        work first) until one is free; False when `seq` itself was preempted."""
        while not self.kv.grow(seq.request_id, seq.num_tokens):
            background = [s for s in self.running if s.request.background]
            victim = (background or self.running)[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it goes back to the head of the queue and is
        recomputed (prompt and output so far) when readmitted, then continues where it was."""
        self.running.remove(seq)
        self.slots.give(seq.slot)
        self._free_blocks(seq)
        seq.slot, seq.num_computed, seq.status = -1, 0, SeqStatus.WAITING
        seq.preemptions += 1
        self.num_preempted += 1
        self.waiting.appendleft(seq)

    def _admit(self, seq: Sequence) -> bool:
        """Blocks for every token the sequence has (cached ones reused), then a slot."""
        tokens = seq.token_slice(0, seq.num_tokens)
        namespace, limit = self.namespace(seq), self._cache_limit(seq)
        hit = self.kv.cached_prefix(namespace, tokens, limit)
        slot = self._pick_slot(hit)
        cached = self.kv.admit(seq.request_id, namespace, tokens, limit, lane=slot, hit=hit)
        if cached is None:
            return False
        self.waiting.remove(seq)
        seq.num_computed = cached
        if seq.num_cached is None:  # what the client is told: its first admission's
            seq.num_cached = cached
            seq.scheduled_at = time.monotonic()  # vLLM's queue time ends at the first too
        seq.slot = self.slots.take(slot)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return True

    def _pick_slot(self, hit: list[int]) -> int:
        """The lane that already starts with this prefix (a chat's next turn), else the lowest
        free one whose first block caches nothing, else the one whose cache is stalest: a new
        sequence overwrites its lane's cached blocks as it grows."""
        free = self.slots.free_slots()
        home = self.kv.home_lane(hit)
        if home in free:
            return home
        if not self.kv.lane_blocks:
            return min(free)
        return min(free, key=lambda s: (self.kv.lane_staleness(s), s))

    def namespace(self, seq: Sequence) -> tuple[str | None, bool]:
        """Who may share this sequence's cached blocks: the same adapter, on the same path
        (batch-invariant or not: their keys/values may differ in the last bits)."""
        return (seq.request.adapter, self._invariant(seq))

    def _invariant(self, seq: Sequence) -> bool:
        return self.aligned_chunks or seq.request.params.reproducible

    def _cache_limit(self, seq: Sequence) -> int:
        """Tokens the cache may serve: never the last (its logits are needed), none when every
        prompt row's logits are (prompt logprobs), whole chunks for a seeded request."""
        if seq.request.params.prompt_logprobs is not None:
            return 0
        limit = seq.num_tokens - 1
        if self._invariant(seq):
            limit -= limit % self.invariant_unit
        return limit

    def _chunk_end(self, seq: Sequence, budget: int) -> int:
        if not self._invariant(seq):
            return min(seq.num_tokens, seq.num_computed + budget)
        return min(seq.num_tokens, (seq.num_computed // self.chunk_size + 1) * self.chunk_size)

    def _fits(self, seq: Sequence, budget: int) -> bool:
        # Before admission, a cache hit may shorten the chunk; the uncached chunk is the
        # bound, so that admitting never asks for more than the budget left.
        return budget > 0 and self._chunk_end(seq, budget) - seq.num_computed <= budget

    def _prefill(self, seq: Sequence, budget: int, chunks: list[ScheduledChunk]) -> int:
        end = self._chunk_end(seq, budget)
        chunks.append(ScheduledChunk.of(seq, seq.num_computed, end))
        return end - seq.num_computed

    def commit(self, chunk: ScheduledChunk) -> None:
        """The chunk's keys/values are now in the cache; its full blocks become shareable."""
        seq = chunk.seq
        seq.num_computed = chunk.end
        if seq.status is not SeqStatus.RUNNING:
            return
        upto = chunk.end
        if self._invariant(seq):
            # Only blocks computed in whole fixed chunks: a later sequence with this prefix
            # computes exactly these chunks when it does not hit the cache.
            size = self.chunk_size
            whole = chunk.start % size == 0 and chunk.end - chunk.start == size
            upto = chunk.end if whole else 0
        if upto and self.kv.unregistered(seq.request_id, upto):
            self.kv.register(seq.request_id, seq.token_slice(0, upto), upto)

    def _free_blocks(self, seq: Sequence) -> None:
        """Its blocks go back to the pool; the computed tokens of its last, partial block stay
        cached with them (a chat's next turn resends them), except on the batch-invariant
        path, which reuses only whole chunks."""
        computed = seq.num_computed
        whole = computed - computed % self.kv.block_size
        keep = not self._invariant(seq) and seq.request.params.prompt_logprobs is None
        tail = seq.token_slice(whole, computed) if keep else []
        self.kv.free(seq.request_id, computed, tail)

    def block_table(self, seq: Sequence) -> tuple[int, ...]:
        return self.kv.table(seq.request_id)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) and free its slot and blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.slots.give(seq.slot)
            self._free_blocks(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
