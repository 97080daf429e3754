"""The KV block allocator and the scheduler over it, without a model: reference counts, prefix
hits, LRU eviction, hash collisions as misses, admission by blocks, preemption."""

from genserve.engine.kv_blocks import KVCacheManager
from genserve.engine.scheduler import Scheduler, SeqStatus
from genserve.engine.types import Request, SamplingParams
from tests.unit.test_scheduler import run_step as step

BASE = (None, False)  # the base model's namespace, unseeded


def tokens(n: int, first: int = 1) -> list[int]:
    return list(range(first, first + n))


def test_blocks_are_counted_and_freed() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, caching=False)
    assert kv.admit("a", BASE, tokens(9), cache_limit=8) == 0  # 3 blocks
    assert kv.stats().blocks_used == 3
    assert kv.grow("a", 12) and kv.stats().blocks_used == 3  # still in block 3
    assert kv.grow("a", 13) and kv.stats().blocks_used == 4
    kv.free("a")
    assert kv.stats().blocks_used == 0 and kv.pool.num_free == 8


def test_a_prefix_is_reused_and_shared_blocks_are_reference_counted() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = tokens(10)
    kv.admit("a", BASE, prompt, cache_limit=9)
    kv.register("a", prompt, 10)  # blocks 0..1 full and computed; block 2 is partial
    hit = kv.admit("b", BASE, prompt + [99], cache_limit=10)
    assert hit == 8
    shared = kv.tables["a"].blocks[:2]
    assert kv.tables["b"].blocks[:2] == shared
    assert [kv.pool.blocks[b].ref_count for b in shared] == [2, 2]
    kv.free("a")
    assert [kv.pool.blocks[b].ref_count for b in shared] == [1, 1]
    kv.free("b")
    # Freed, but still cached: the next identical prompt finds them.
    assert kv.admit("c", BASE, prompt, cache_limit=9) == 8
    assert kv.stats().hits == 16 and kv.stats().queries == 10 + 11 + 10


def test_the_last_token_and_other_namespaces_never_hit() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = tokens(8)
    kv.admit("a", BASE, prompt, cache_limit=7)
    kv.register("a", prompt, 8)
    kv.free("a")
    assert kv.admit("limit", BASE, prompt, cache_limit=7) == 4  # the 8th must be computed
    assert kv.admit("lora", ("adapter-1", False), prompt, cache_limit=7) == 0
    assert kv.admit("seeded", (None, True), prompt, cache_limit=7) == 0


def test_freed_cached_blocks_are_evicted_least_recent_first_and_only_when_needed() -> None:
    kv = KVCacheManager(num_blocks=5, block_size=2)
    for name, first in (("old", 100), ("new", 200)):
        kv.admit(name, BASE, tokens(4, first), cache_limit=3)
        kv.register(name, tokens(4, first), 4)
        kv.free(name)
    assert kv.pool.num_free == 5  # cached blocks count as free
    # 2 blocks: the never-used one, then the least recently freed: "old"'s last block (a
    # sequence's tail goes before its head, which other prompts are likelier to share).
    kv.admit("x", BASE, tokens(3, 300), cache_limit=0)
    assert kv.admit("new-again", BASE, tokens(4, 200) + [1], cache_limit=4) == 4  # + 1 block:
    # the last free one, "old"'s first. Nothing is left, so nothing more is admitted.
    assert kv.admit("y", BASE, tokens(1, 400), cache_limit=0) is None
    kv.free("x")
    kv.free("new-again")
    assert kv.admit("old-again", BASE, tokens(4, 100) + [1], cache_limit=4) == 0  # evicted
    kv.free("old-again")  # its 3 blocks came from the uncached ones, before any cached one
    assert kv.admit("new-3", BASE, tokens(4, 200) + [2], cache_limit=4) == 4  # still cached


def test_a_hash_collision_is_a_miss() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2, hash_fn=lambda _: 7)  # every key collides
    kv.admit("a", BASE, [1, 2, 3], cache_limit=2)
    kv.register("a", [1, 2, 3], 2)
    kv.free("a")
    assert kv.admit("b", BASE, [5, 6, 7], cache_limit=2) == 0  # same hash, other tokens
    assert kv.admit("c", BASE, [1, 2, 7], cache_limit=2) == 2  # same tokens: a hit


def test_a_block_matches_only_after_its_own_parent() -> None:
    """Same second block, other first block: the whole prefix differs, so no hit even when
    the hash function ignores the chain."""
    kv = KVCacheManager(num_blocks=8, block_size=2, hash_fn=lambda key: hash(key[2]))
    kv.admit("a", BASE, [1, 2, 3, 4, 0], cache_limit=4)
    kv.register("a", [1, 2, 3, 4, 0], 4)
    assert kv.admit("b", BASE, [9, 9, 3, 4, 0], cache_limit=4) == 0


# -- the scheduler over blocks ----------------------------------------------------------------
def req(rid: str, n: int, max_tokens: int = 4, first: int = 1, **params) -> Request:
    return Request(rid, tokens(n, first), SamplingParams(max_tokens=max_tokens, **params))


def test_a_small_pool_admits_many_short_requests_at_once() -> None:
    """2,048 tokens: static slots of 2,048 held one; blocks hold 8 prompts of 200 at once."""
    kv = KVCacheManager(num_blocks=2048 // 16, block_size=16)
    s = Scheduler(num_slots=32, token_budget=2048, aligned_chunks=False, kv=kv)
    seqs = [s.add(req(str(i), 200, first=1000 * i)) for i in range(8)]
    step(s)
    assert all(q.status is SeqStatus.RUNNING for q in seqs)


def test_a_repeated_prompt_prefills_only_its_uncached_tail() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=16)
    s = Scheduler(num_slots=4, token_budget=256, aligned_chunks=False, kv=kv)
    a = s.add(req("a", 100))
    step(s)
    s.finish(a)
    b = s.add(req("b", 100))
    out = step(s)
    assert [(c.start, c.end) for c in out.chunks] == [(96, 100)]
    assert b.num_cached == 96


def test_a_seeded_request_hits_only_at_chunk_boundaries() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4)
    s = Scheduler(num_slots=4, token_budget=12, aligned_chunks=False, kv=kv)  # chunk size 8
    a = s.add(req("a", 20, seed=1))
    while a.num_computed < 20:
        step(s)
    s.finish(a)
    b = s.add(req("b", 20, seed=2))
    step(s)
    # 16 = two whole chunks; the third chunk (16..20) was partial, so it was not registered.
    assert b.num_cached == 16
    unseeded = s.add(req("c", 20))
    step(s)
    assert unseeded.num_cached == 0  # the seeded path's blocks are not shared with it


def test_prompt_logprobs_requests_compute_every_row() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4)
    s = Scheduler(num_slots=4, token_budget=64, aligned_chunks=False, kv=kv)
    a = s.add(req("a", 20))
    step(s)
    s.finish(a)
    b = s.add(req("b", 20, prompt_logprobs=1))
    step(s)
    assert b.num_cached == 0
    c = s.add(req("c", 20))
    step(s)
    assert c.num_cached == 16


def test_decoding_out_of_blocks_preempts_the_newest_and_it_resumes_without_loss() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)  # 16 tokens in all
    s = Scheduler(num_slots=4, token_budget=64, aligned_chunks=False, kv=kv)
    old = s.add(req("old", 4, max_tokens=20))
    new = s.add(req("new", 4, max_tokens=20, first=50))
    emitted: dict[str, list[int]] = {"old": [], "new": []}
    counter = iter(range(1000, 2000))
    preempted = False
    for _ in range(40):
        out = s.schedule()
        for c in out.chunks:
            s.commit(c)
            if c.sample:
                tok = next(counter)
                c.seq.output_ids.append(tok)
                emitted[c.seq.request_id].append(tok)
        preempted = preempted or new.status is SeqStatus.WAITING and new.preemptions > 0
        for q in (old, new):
            if q.status is SeqStatus.RUNNING and len(q.output_ids) >= 6:
                s.finish(q)
        if not s.has_work:
            break
    assert preempted and new.preemptions >= 1 and old.preemptions == 0
    # Every token sampled was kept, in order, once: the stream has no gap and no repeat.
    assert new.output_ids == emitted["new"] and len(new.output_ids) == 6
    assert old.output_ids == emitted["old"] and len(old.output_ids) == 6
    assert kv.stats().blocks_used == 0


def test_an_unloaded_adapters_blocks_are_never_reused() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    lora = ("my-adapter", False)
    for name, ns in (("a", lora), ("b", BASE)):
        kv.admit(name, ns, [1, 2, 3], cache_limit=2)
        kv.register(name, [1, 2, 3], 2)
        kv.free(name)
    kv.forget_adapter("my-adapter")
    assert kv.admit("lora-again", lora, [1, 2, 3], cache_limit=2) == 0
    assert kv.admit("base-again", BASE, [1, 2, 3], cache_limit=2) == 2
    assert kv.pool.num_free == 8 - 4


def test_a_sequence_takes_its_lanes_blocks_in_order_while_they_are_free() -> None:
    """4 lanes of 4 blocks (one per slot): a sequence's cache is one run in its slot's lane;
    a block of the lane held by another sequence sends it elsewhere, and a sequence without
    a lane takes the lanes' last blocks first."""
    kv = KVCacheManager(num_blocks=16, block_size=2, caching=False, lanes=4)
    assert kv.admit("a", BASE, tokens(3), cache_limit=0, lane=1) == 0
    assert kv.tables["a"].blocks == [4, 5]
    assert kv.grow("a", 7) and kv.tables["a"].blocks == [4, 5, 6, 7]
    assert kv.grow("a", 9) and kv.tables["a"].blocks[4] not in range(4, 8)  # outgrew it
    kv.admit("x", BASE, tokens(2), cache_limit=0)  # no lane: a lane's last block
    assert kv.tables["x"].blocks[0] % 4 == 3
    taken = kv.tables["x"].blocks[0]
    lane = taken // 4
    kv.admit("b", BASE, tokens(8), cache_limit=0, lane=lane)
    assert kv.tables["b"].blocks[:3] == [4 * lane, 4 * lane + 1, 4 * lane + 2]
    assert kv.tables["b"].blocks[3] != taken  # held by x: any other free block


def test_a_chats_next_turn_goes_back_to_the_lane_that_caches_its_history() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4, lanes=4)
    s = Scheduler(num_slots=4, token_budget=128, aligned_chunks=False, kv=kv)
    other = s.add(req("other", 10, first=500))  # takes slot 0
    first = s.add(req("turn1", 40))  # slot 1, lane 1: blocks 16..25
    step(s)
    assert first.slot == 1 and kv.tables["turn1"].blocks == list(range(16, 26))
    s.finish(first)
    s.finish(other)
    # Slot 0 is free and lowest, but lane 1 starts with this chat's cached history.
    nxt = s.add(req("turn2", 60))
    step(s)
    assert nxt.slot == 1 and nxt.num_cached == 40
    assert kv.tables["turn2"].blocks == list(range(16, 31))
    # A new conversation takes a lane whose first block caches nothing (2), not lane 0's
    # cached prompt nor lane 1 (held).
    new = s.add(req("new", 8, first=900))
    step(s)
    assert new.slot == 2


def test_a_finished_sequences_partial_block_is_reused_through_a_copy() -> None:
    """a computed 10 tokens (blocks of 4: two full, 2 tokens in a third). b resends them and
    more: it reuses both full blocks and a's 2 tail tokens, copied into a block of its own
    (the source is held until the copy is made, then cached again)."""
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = tokens(10)
    kv.admit("a", BASE, first, cache_limit=9)
    kv.register("a", first, 10)
    a_tail = kv.tables["a"].blocks[2]
    kv.free("a", computed=10, tail=first[8:])
    assert kv.admit("b", BASE, tokens(14), cache_limit=13) == 10
    b = kv.tables["b"].blocks
    (copy,) = kv.take_copies()
    assert (copy.src, copy.dst, copy.rows) == (a_tail, b[2], 2) and b[2] != a_tail
    assert kv.pool.blocks[a_tail].ref_count == 1  # held for the copy
    kv.copied([copy])
    assert kv.pool.blocks[a_tail].ref_count == 0 and kv.pool.is_free(a_tail)
    assert kv.take_copies() == ()
    # Other tokens after the same full blocks: no tail; a limit short of it: no tail either.
    assert kv.admit("c", BASE, tokens(8) + [99, 98, 97], cache_limit=10) == 8
    assert kv.admit("d", BASE, tokens(14), cache_limit=9) == 8
    assert kv.take_copies() == ()


def test_a_chats_next_turn_takes_its_lanes_partial_block_over_without_a_copy() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, lanes=2)  # lanes of 8 blocks
    s = Scheduler(num_slots=2, token_budget=64, aligned_chunks=False, kv=kv)
    turn1 = s.add(req("turn1", 10))
    step(s)
    assert kv.tables["turn1"].blocks == [0, 1, 2]
    s.finish(turn1)
    turn2 = s.add(req("turn2", 20))
    out = step(s)
    assert turn2.num_cached == 10 and out.copies == ()
    assert [(c.start, c.end) for c in out.chunks] == [(10, 20)]
    assert kv.tables["turn2"].blocks == [0, 1, 2, 3, 4]  # block 2 taken over in place
    # A seeded request's path reuses whole chunks only: it leaves no partial block.
    s.finish(turn2)
    seeded = s.add(req("seeded", 10, seed=3))
    while seeded.num_computed < 10:
        step(s)
    s.finish(seeded)
    again = s.add(req("again", 12, seed=3))
    step(s)
    assert again.num_cached == 0


def test_a_prefix_cached_in_another_lane_is_copied_into_the_sequences_own() -> None:
    """b shares a's 3-block prompt while a still runs in lane 0. Read where it lies, b's blocks
    would not be one run (no decode.c step for any batch holding b); it gets the first blocks
    of its own lane instead, filled by one copy from a's, whose blocks are held until the copy
    is made. The partial tail after them is copied too, and b's own blocks are one run."""
    kv = KVCacheManager(num_blocks=32, block_size=4, lanes=4)  # lanes of 8 blocks
    prompt = tokens(14)  # 3 full blocks, 2 tokens in a fourth
    kv.admit("a", BASE, prompt, cache_limit=13, lane=0)
    kv.register("a", prompt, 14)
    assert kv.tables["a"].blocks == [0, 1, 2, 3]
    assert kv.admit("b", BASE, prompt + [99, 98], cache_limit=15, lane=2) == 12
    b = kv.tables["b"].blocks
    assert b == [16, 17, 18, 19]  # lane 2 from its start: one run
    (copy,) = kv.take_copies()
    assert (copy.src, copy.dst, copy.rows, copy.blocks) == (0, 16, 12, 3)
    assert [kv.pool.blocks[i].ref_count for i in (0, 1, 2)] == [2, 2, 2]  # a's, and the copy's
    kv.copied([copy])
    assert [kv.pool.blocks[i].ref_count for i in (0, 1, 2)] == [1, 1, 1]
    # b's next full block registers after a's prefix: a third prompt finds a's blocks and b's.
    longer = prompt + [99, 98, 97, 96, 95, 94]
    assert kv.grow("b", 20) and kv.tables["b"].blocks == [16, 17, 18, 19, 20]
    kv.register("b", longer, 20)
    kv.free("a")
    assert kv.admit("c", BASE, longer + [1], cache_limit=20, lane=1) == 20
    assert kv.tables["c"].blocks[:5] == list(range(8, 13))
    copies = kv.take_copies()
    assert [(c.src, c.dst, c.blocks) for c in copies] == [(0, 8, 3), (19, 11, 2)]


def test_a_prefix_stays_where_it_lies_when_the_lane_is_not_free() -> None:
    kv = KVCacheManager(num_blocks=32, block_size=4, lanes=4)
    prompt = tokens(12)
    kv.admit("a", BASE, prompt, cache_limit=11, lane=0)
    kv.register("a", prompt, 12)
    kv.admit("x", BASE, tokens(4, 500), cache_limit=0)  # no lane: a lane's last block
    kv.admit("squatter", BASE, tokens(4, 900), cache_limit=0, lane=3)  # holds block 24
    assert kv.admit("b", BASE, prompt + [7], cache_limit=12, lane=3) == 12
    assert kv.tables["b"].blocks[:3] == [0, 1, 2] and kv.take_copies() == ()  # read in lane 0
