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

A hash only finds a candidate: a block matches when its own tokens equal the sequence's and
its parent is the block the walk just matched (identified by a registration number that is
never reused), so by induction the whole prefix is equal and a hash collision is a miss.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

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


@dataclass(frozen=True, slots=True)
class BlockKey:
    """What a registered block holds: checked on every hit, so a collision is a miss."""

    namespace: Hashable
    tokens: tuple[int, ...]  # this block's own tokens
    parent: int  # the registration number of the block before it (NO_PARENT for the first)
    serial: int  # this registration's number; never reused, even after eviction


@dataclass(slots=True)
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None
    key: BlockKey | None = None


@dataclass(slots=True)
class SeqBlocks:
    """One sequence's block table and how far its blocks are registered."""

    namespace: Hashable
    blocks: list[int] = field(default_factory=list)
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

    def __init__(self, num_blocks: int, block_size: int, hash_fn: HashFn = hash) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a block pool needs at least one block of at least one token")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_fn = hash_fn
        self._plain: list[int] = list(range(num_blocks - 1, -1, -1))  # free, nothing cached
        # Free but still registered, least recently freed first: evicted in this order.
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._index: dict[int, int] = {}  # hash -> block id
        self._serial = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: never used, or cached and evictable."""
        return len(self._plain) + len(self._cached)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"{n} KV blocks asked for, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._plain:
                bid = self._plain.pop()
            else:
                bid, _ = self._cached.popitem(last=False)
                self._forget(self.blocks[bid])
            self.blocks[bid].ref_count = 1
            out.append(bid)
        return out

    def share(self, bid: int) -> None:
        """One more sequence reads this (cached) block."""
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self._cached[bid]
        block.ref_count += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each; the last blocks of a sequence are freed first so that
        they are evicted before its earlier ones (a prefix is only useful from its start)."""
        for bid in reversed(blocks):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is not None:
                    self._cached[bid] = None
                else:
                    self._plain.append(bid)

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
                self._plain.append(block.id)

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
    ) -> None:
        self.pool = BlockPool(num_blocks, block_size, hash_fn)
        self.block_size = block_size
        self.caching = caching
        self.tables: dict[str, SeqBlocks] = {}
        self.queries = 0
        self.hits = 0

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
        self, seq_id: str, namespace: Hashable, tokens: Sequence[int], cache_limit: int
    ) -> int | None:
        """Give a sequence blocks for all of `tokens`, reusing cached ones for at most
        `cache_limit` tokens of them. Returns how many tokens came from the cache, or None (and
        nothing held) when the pool cannot hold it now."""
        hit = self.cached_prefix(namespace, tokens, cache_limit)
        idle_hits = sum(1 for b in hit if self.pool.blocks[b].ref_count == 0)
        needed = self.blocks_for(len(tokens)) - len(hit)
        if needed > self.pool.num_free - idle_hits:
            return None
        for bid in hit:  # first, so that allocating cannot evict them
            self.pool.share(bid)
        entry = SeqBlocks(namespace, hit + self.pool.allocate(needed))
        self._adopt(entry, hit)
        self.tables[seq_id] = entry
        if cache_limit > 0:
            self.queries += len(tokens)
            self.hits += len(hit) * self.block_size
        return len(hit) * self.block_size

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
        entry.blocks.extend(self.pool.allocate(needed))
        return True

    def unregistered(self, seq_id: str, num_tokens: int) -> bool:
        """Whether [0, num_tokens) completes a block not yet registered (cheap: most decode
        steps complete none, and then the tokens need not even be listed)."""
        entry = self.tables.get(seq_id)
        return self.caching and entry is not None and num_tokens // self.block_size > (
            entry.num_registered
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

    def free(self, seq_id: str) -> None:
        entry = self.tables.pop(seq_id, None)
        if entry is not None:
            self.pool.release(entry.blocks)

    def table(self, seq_id: str) -> tuple[int, ...]:
        return tuple(self.tables[seq_id].blocks)
