"""The KV cache as fixed-size blocks: a free list, reference counts, per-sequence block tables,
and automatic prefix caching. Plain Python, testable without a model.

The runner stores keys and values in a pool of `num_blocks` blocks of `block_size` positions;
a sequence's position p lives in block `table[p // block_size]` at offset `p % block_size`.

Prefix caching: once a block is full and its keys/values computed, it is registered under a
hash of (namespace, every token up to and including the block). A new sequence walks its
prompt block by block and reuses every registered block it finds, so it prefills only the
rest. A freed block keeps its keys/values and its registration until the pool needs the block
for something else (least recently freed first). The namespace keeps apart what must never be
shared: each LoRA adapter's blocks (an adapter changes keys and values), and blocks computed
on the batch-invariant path (seeded requests) from the others, whose numbers may depend on
their batch.

Lanes: the pool is also seen as `lanes` runs of `lane_blocks` consecutive blocks, one per slot
(the last blocks may belong to none). A sequence running in slot s takes the blocks of lane s,
in order, wherever they are free, so that its cache is one contiguous run of positions the
runner reads as a view; every batched decode of such sequences then reads lanes side by side,
with no copy (a gather of every decode's blocks cost about 15% of a 32-stream step). Where a
lane's block is held by another sequence, or the sequence starts with cached blocks of another
lane, it takes any block (from the lanes' tails first) and the runner gathers its blocks.

A sequence's last, partial block is cached too when it ends (its computed tokens, under the
hash of the full blocks before it): a chat's next turn, which resends the same text and more,
then computes only what is new, not up to a block's worth of the old turn again. That block is
never shared (its next owner writes past those tokens): the new sequence takes it over where
it is the next block of its lane and free, else gets a copy of its rows (a BlockCopy the
runner applies before the step).

A hash only finds a candidate: a block matches when its own tokens equal the sequence's and
its parent is the block the walk just matched (identified by a registration number that is
never reused), so by induction the whole prefix is equal and a hash collision is a miss.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from genserve.engine.types import BlockCopy

DEFAULT_BLOCK_SIZE = 16
NO_PARENT = -1

HashFn = Callable[[Hashable], int]


@dataclass(frozen=True, slots=True)
class PagedShape:
    """The block pool a paged runner allocates, and how many sequences may run at once."""

    max_seqs: int
    num_blocks: int
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.max_seqs < 1 or self.num_blocks < 1 or self.block_size < 1:
            raise ValueError("a paged KV cache needs a sequence, a block and a token per block")


def lane_blocks(num_blocks: int, lanes: int) -> int:
    """Blocks in each slot's lane (see the module's docstring); 0 without lanes."""
    return num_blocks // lanes if lanes > 0 else 0


@dataclass(frozen=True, slots=True)
class BlockKey:
    """What a registered block holds: checked on every hit, so a collision is a miss."""

    namespace: Hashable
    tokens: tuple[int, ...]  # this block's own tokens (fewer than a block's: a partial tail)
    parent: int  # the registration number of the block before it (NO_PARENT for the first)
    serial: int  # this registration's number; never reused, even after eviction


@dataclass(slots=True)
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None
    key: BlockKey | None = None
    freed_at: int = 0  # when its last reference was dropped (for choosing a lane to reuse)


@dataclass(slots=True)
class SeqBlocks:
    """One sequence's block table and how far its blocks are registered."""

    namespace: Hashable
    blocks: list[int] = field(default_factory=list)
    lane: int | None = None  # the slot's lane it takes new blocks from, while they are free
    num_registered: int = 0  # blocks [0, num_registered) are in the prefix cache
    last_serial: int = NO_PARENT  # serial of block num_registered - 1
    chain_hash: int = 0  # hash of the prefix through block num_registered - 1


@dataclass(frozen=True, slots=True)
class CacheStats:
    blocks_used: int  # held by a sequence (a freed cached block is not used: it may be evicted)
    blocks_total: int
    queries: int  # prompt tokens looked up in the prefix cache
    hits: int  # of those, tokens found


class BlockPool:
    """Blocks, their reference counts and the prefix cache's index."""

    def __init__(
        self, num_blocks: int, block_size: int, hash_fn: HashFn = hash, lane_blocks: int = 0
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a block pool needs at least one block of at least one token")
        self.block_size = block_size
        self.lane_blocks = lane_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_fn = hash_fn
        # Free with nothing cached: a set, and a heap of (order, id) for taking any one (its
        # stale entries, for blocks since taken by id, are skipped and dropped when popped).
        self._plain: set[int] = set(range(num_blocks))
        self._heap = [(self._order(b), b) for b in range(num_blocks)]
        heapq.heapify(self._heap)
        # Free but still registered, least recently freed first: evicted in this order.
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._index: dict[int, int] = {}  # hash -> block id
        self._serial = 0
        self._clock = 0

    def _order(self, bid: int) -> tuple[int, int]:
        """Which free block a sequence without a lane takes first: blocks outside every lane,
        then the lanes' last blocks (the ones a lane's own sequence needs last). Without lanes,
        the lowest id."""
        if not self.lane_blocks:
            return (0, bid)
        lane, column = divmod(bid, self.lane_blocks)
        return (-column, lane)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: never used, or cached and evictable."""
        return len(self._plain) + len(self._cached)

    def allocate(self, n: int, wanted: Sequence[int] = ()) -> list[int]:
        """`n` blocks; the i-th is `wanted[i]` where that one is free (cached or not)."""
        if n > self.num_free:
            raise MemoryError(f"{n} KV blocks asked for, {self.num_free} free")
        out = []
        for i in range(n):
            want = wanted[i] if i < len(wanted) else None
            bid = want if want is not None and self.is_free(want) else self._any_free()
            self._take(bid)
            out.append(bid)
        return out

    def is_free(self, bid: int) -> bool:
        return bid in self._plain or bid in self._cached

    def _any_free(self) -> int:
        while self._plain:
            _, bid = heapq.heappop(self._heap)
            if bid in self._plain:
                return bid
        return next(iter(self._cached))  # the least recently freed

    def _take(self, bid: int) -> None:
        block = self.blocks[bid]
        if bid in self._plain:
            self._plain.discard(bid)
        else:
            del self._cached[bid]
            self._forget(block)
        block.ref_count = 1
        if len(self._heap) > 2 * len(self.blocks):  # stale entries of blocks taken by id
            self._heap = [(self._order(b), b) for b in self._plain]
            heapq.heapify(self._heap)

    def _free_plain(self, bid: int) -> None:
        self._plain.add(bid)
        heapq.heappush(self._heap, (self._order(bid), bid))

    def share(self, bid: int) -> None:
        """One more sequence reads this (cached) block."""
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self._cached[bid]
        block.ref_count += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each; the last blocks of a sequence are freed first so that
        they are evicted before its earlier ones (a prefix is only useful from its start)."""
        self._clock += 1
        for bid in reversed(blocks):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                block.freed_at = self._clock
                if block.key is not None:
                    self._cached[bid] = None
                else:
                    self._free_plain(bid)

    def lookup(self, chain_hash: int, key: BlockKey) -> Block | None:
        """The registered block for this prefix, or None; `key.serial` is not compared."""
        bid = self._index.get(chain_hash)
        if bid is None:
            return None
        found = self.blocks[bid].key
        if found is None or (found.namespace, found.tokens, found.parent) != (
            key.namespace, key.tokens, key.parent
        ):  # fmt: skip
            return None  # a hash collision (or a stale entry): a miss, never wrong tokens
        return self.blocks[bid]

    def lookup_tail(self, chain_hash: int, namespace: Hashable, parent: int) -> Block | None:
        """The partial block cached after this prefix (see the module's docstring), or None;
        the caller checks that its tokens start the sequence's next ones."""
        bid = self._index.get(chain_hash)
        if bid is None:
            return None
        found = self.blocks[bid].key
        if found is None or (found.namespace, found.parent) != (namespace, parent):
            return None
        return self.blocks[bid]

    def register(self, bid: int, chain_hash: int, key: BlockKey) -> int:
        """Index a full, computed block; returns its serial. Where another block already holds
        the hash, that one stays indexed and this block serves only its own sequence."""
        self._serial += 1
        block = self.blocks[bid]
        block.key = BlockKey(key.namespace, key.tokens, key.parent, self._serial)
        block.hash = chain_hash
        self._index.setdefault(chain_hash, bid)
        return self._serial

    def forget_where(self, match: Callable[[Hashable], bool]) -> None:
        """Unregister every block whose namespace matches (an adapter unloaded or replaced:
        its keys/values must never serve a later adapter of the same name)."""
        for block in self.blocks:
            if block.key is None or not match(block.key.namespace):
                continue
            self._forget(block)
            if block.ref_count == 0:
                del self._cached[block.id]
                self._free_plain(block.id)

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self._index.get(block.hash) == block.id:
            del self._index[block.hash]
        block.hash, block.key = None, None


class KVCacheManager:
    """Block tables of running sequences over one BlockPool, and the prefix cache's counters."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        caching: bool = True,
        hash_fn: HashFn = hash,
        lanes: int = 0,  # one per slot: see the module's docstring; 0, none
    ) -> None:
        self.lane_blocks = lane_blocks(num_blocks, lanes)
        self.pool = BlockPool(num_blocks, block_size, hash_fn, self.lane_blocks)
        self.block_size = block_size
        self.caching = caching
        self.tables: dict[str, SeqBlocks] = {}
        self.queries = 0
        self.hits = 0
        self._copies: list[BlockCopy] = []  # for the next step; their sources held until done

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def stats(self) -> CacheStats:
        used = self.pool.num_blocks - self.pool.num_free
        return CacheStats(used, self.pool.num_blocks, self.queries, self.hits)

    def cached_prefix(self, namespace: Hashable, tokens: Sequence[int], limit: int) -> list[int]:
        """Blocks of the longest registered prefix of `tokens`, at most `limit` tokens long."""
        if not self.caching:
            return []
        bs, found, parent, chain = self.block_size, [], NO_PARENT, 0
        for i in range(limit // bs):
            own = tuple(tokens[i * bs : (i + 1) * bs])
            chain = self.pool.hash_fn((chain, namespace, own))
            block = self.pool.lookup(chain, BlockKey(namespace, own, parent, 0))
            if block is None:
                break
            found.append(block.id)
            parent = block.key.serial
        return found

    def admit(
        self,
        seq_id: str,
        namespace: Hashable,
        tokens: Sequence[int],
        cache_limit: int,
        lane: int | None = None,
        hit: list[int] | None = None,
    ) -> int | None:
        """Give a sequence blocks for all of `tokens`, reusing cached ones for at most
        `cache_limit` tokens of them (`hit`: cached_prefix's answer, when already asked), new
        ones from `lane` where free. Returns how many tokens came from the cache, or None (and
        nothing held) when the pool cannot hold it now."""
        if hit is None:
            hit = self.cached_prefix(namespace, tokens, cache_limit)
        tail = self._tail(namespace, tokens, hit, cache_limit)
        held = [*hit, tail.id] if tail is not None else hit
        idle = sum(1 for b in held if self.pool.blocks[b].ref_count == 0)
        room = self.pool.num_free - idle
        # Copied into its lane when the pool has room for the copies too, else read as is.
        moved = self._movable(hit, lane) and self.blocks_for(len(tokens)) <= room
        kept = 0 if moved else len(hit)  # the hit's blocks that become the sequence's own
        needed = self.blocks_for(len(tokens)) - kept
        if needed > room:
            return None
        for bid in hit:  # first, so that allocating cannot evict them
            self.pool.share(bid)
        entry = SeqBlocks(namespace, list(hit[:kept]), lane=lane if self.lane_blocks else None)
        run = self._lane_run(entry, needed)
        at = len(hit) - kept  # where the tail's block is in `run`
        reused = 0
        if tail is not None:
            reused = len(tail.key.tokens)
            if not (len(run) > at and run[at] == tail.id and tail.ref_count == 0):
                self.pool.share(tail.id)  # read by a copy: not evicted before it is made
        entry.blocks += self.pool.allocate(needed, run)
        if moved:
            self._copies += self._block_runs(hit, entry.blocks[: len(hit)])
        if tail is not None and entry.blocks[len(hit)] != tail.id:
            self._copies.append(BlockCopy(tail.id, entry.blocks[len(hit)], reused))
        self._adopt(entry, hit)
        self.tables[seq_id] = entry
        cached = len(hit) * self.block_size + reused
        if cache_limit > 0:
            self.queries += len(tokens)
            self.hits += cached
        return cached

    def _movable(self, hit: list[int], lane: int | None) -> bool:
        """Whether a cached prefix from elsewhere (another lane: a shared system prompt another
        slot computed) is copied into the first blocks of this sequence's own lane, where
        they are free, rather than read where it lies. Read there, the sequence's blocks are
        not one run for its whole life, and no step that holds it may take decode.c's path
        (which reads each sequence as one run): one stream beside another that shares its
        prompt decoded 2.7x slower. A copy costs a memcpy of the prefix's keys and values."""
        if not hit or lane is None or not self.lane_blocks or len(hit) >= self.lane_blocks:
            return False
        first = lane * self.lane_blocks
        own = range(first, first + len(hit))
        if list(hit) == list(own):
            return False  # already there (a chat's next turn in its home lane)
        return all(self.pool.is_free(b) and b not in hit for b in own)

    def _block_runs(self, src: Sequence[int], dst: Sequence[int]) -> list[BlockCopy]:
        """Copies of whole blocks src[i] -> dst[i], consecutive ones on both sides as one
        (a prefix computed in one lane is one run there: one copy per cache tensor)."""
        runs: list[tuple[int, int, int]] = []  # (src, dst, blocks)
        for s, d in zip(src, dst, strict=True):
            if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((s, d, 1))
        return [BlockCopy(s, d, n * self.block_size, n) for s, d, n in runs]

    def _tail(
        self, namespace: Hashable, tokens: Sequence[int], hit: list[int], limit: int
    ) -> Block | None:
        """The cached partial block that continues `hit` with the sequence's next tokens,
        within `limit`; None without one."""
        if not self.caching:
            return None
        parent, chain = NO_PARENT, 0
        if hit:
            last = self.pool.blocks[hit[-1]]
            parent, chain = last.key.serial, last.hash
        block = self.pool.lookup_tail(self._tail_hash(chain, namespace), namespace, parent)
        if block is None:
            return None
        start, own = len(hit) * self.block_size, block.key.tokens
        if start + len(own) > limit or tuple(tokens[start : start + len(own)]) != own:
            return None
        return block

    def _tail_hash(self, chain: int, namespace: Hashable) -> int:
        return self.pool.hash_fn((chain, namespace, "partial"))

    def take_copies(self) -> tuple[BlockCopy, ...]:
        """The copies the next step must make first (see BlockCopy)."""
        copies, self._copies = tuple(self._copies), []
        return copies

    def copied(self, copies: Sequence[BlockCopy]) -> None:
        """Those copies are made (or their step failed): their sources may be evicted again."""
        self.pool.release([b for c in copies for b in c.sources()])

    def _lane_run(self, entry: SeqBlocks, n: int) -> list[int]:
        """The blocks that keep the sequence one contiguous run in its lane, for its next `n`
        blocks; empty when it is not one (started elsewhere, or outgrew its lane)."""
        if entry.lane is None:
            return []
        first, have = entry.lane * self.lane_blocks, len(entry.blocks)
        if entry.blocks != list(range(first, first + have)):
            return []
        return list(range(first + have, first + min(have + n, self.lane_blocks)))

    def home_lane(self, hit: Sequence[int]) -> int | None:
        """The lane whose first blocks are exactly this cached prefix: a sequence continuing
        it there (a chat's next turn) stays one contiguous run."""
        if not self.lane_blocks or not hit or hit[0] % self.lane_blocks:
            return None
        lane = hit[0] // self.lane_blocks
        first = lane * self.lane_blocks
        return lane if list(hit) == list(range(first, first + len(hit))) else None

    def lane_staleness(self, lane: int) -> tuple[int, int]:
        """How cheaply a new sequence may take this lane (lower first): a lane whose first
        block caches nothing costs no cached prefix, else the one freed longest ago; one whose
        first block another sequence holds, last."""
        block = self.pool.blocks[lane * self.lane_blocks]
        if not self.pool.is_free(block.id):
            return (2, 0)  # held by another sequence: this one could not run as one run
        return (0, 0) if block.key is None else (1, block.freed_at)

    def _adopt(self, entry: SeqBlocks, hit: list[int]) -> None:
        """The reused blocks count as registered: the chain continues from the last one."""
        if not hit:
            return
        last = self.pool.blocks[hit[-1]]
        entry.num_registered = len(hit)
        entry.last_serial = last.key.serial
        entry.chain_hash = last.hash

    def grow(self, seq_id: str, num_tokens: int) -> bool:
        """Room for `num_tokens` positions in the sequence's table; False when the pool is out
        of blocks (nothing changed then)."""
        entry = self.tables[seq_id]
        needed = self.blocks_for(num_tokens) - len(entry.blocks)
        if needed <= 0:
            return True
        if needed > self.pool.num_free:
            return False
        entry.blocks.extend(self.pool.allocate(needed, self._lane_run(entry, needed)))
        return True

    def unregistered(self, seq_id: str, num_tokens: int) -> bool:
        """Whether [0, num_tokens) completes a block not yet registered (cheap: most decode
        steps complete none, and then the tokens need not even be listed)."""
        entry = self.tables.get(seq_id)
        return (
            self.caching
            and entry is not None
            and num_tokens // self.block_size > entry.num_registered
        )

    def register(self, seq_id: str, tokens: Sequence[int], num_tokens: int) -> None:
        """Tokens [0, num_tokens) of the sequence are computed: index its full blocks."""
        entry = self.tables.get(seq_id)
        if not self.caching or entry is None:
            return
        bs = self.block_size
        for i in range(entry.num_registered, num_tokens // bs):
            own = tuple(tokens[i * bs : (i + 1) * bs])
            chain = self.pool.hash_fn((entry.chain_hash, entry.namespace, own))
            key = BlockKey(entry.namespace, own, entry.last_serial, 0)
            entry.last_serial = self.pool.register(entry.blocks[i], chain, key)
            entry.chain_hash = chain
            entry.num_registered = i + 1

    def forget_adapter(self, adapter: str) -> None:
        """Cached blocks of this adapter are not reused any more (namespaces are
        (adapter, invariant) pairs, see Scheduler.namespace)."""
        self.pool.forget_where(lambda ns: isinstance(ns, tuple) and ns[:1] == (adapter,))

    def free(self, seq_id: str, computed: int = 0, tail: Sequence[int] = ()) -> None:
        """Drop a sequence's blocks. `tail`: its tokens after its last full block, all of
        them computed (`computed` tokens in all); that partial block stays cached too."""
        entry = self.tables.pop(seq_id, None)
        if entry is None:
            return
        index = entry.num_registered
        if (
            self.caching
            and 0 < len(tail) == computed - index * self.block_size < self.block_size
            and index < len(entry.blocks)
        ):
            key = BlockKey(entry.namespace, tuple(tail), entry.last_serial, 0)
            self.pool.register(
                entry.blocks[index], self._tail_hash(entry.chain_hash, entry.namespace), key
            )
        self.pool.release(entry.blocks)

    def table(self, seq_id: str) -> tuple[int, ...]:
        return tuple(self.tables[seq_id].blocks)
