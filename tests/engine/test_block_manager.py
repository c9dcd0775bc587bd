"""Unit tests of `engine.block_manager.BlockManager`, driven with real `Sequence` objects.

No model is involved: "computing" tokens means allocating their blocks, advancing
`num_computed_tokens` and registering the blocks that became full, as the scheduler does after a
step.
"""

from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 4  # block size used throughout


def make_seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=8), arrival_time=0.0)


def compute(bm: BlockManager, seq: Sequence, n: int | None = None) -> None:
    """Allocate and "compute" the next `n` uncomputed tokens (all of them by default)."""
    n = seq.num_uncomputed_tokens if n is None else n
    bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.register_full_blocks(seq)


def admit(bm: BlockManager, seq: Sequence) -> None:
    """What the scheduler does with a new sequence: reuse cached blocks, compute the rest."""
    bm.match_prefix(seq)
    compute(bm, seq)


def assert_consistent(bm: BlockManager, live: list[Sequence]) -> None:
    """Ref counts equal the number of live block tables holding each block; free list agrees."""
    refs = [0] * bm.num_blocks
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table), "a block repeats in one table"
        for b in seq.block_table:
            refs[b] += 1
    assert [blk.ref_count for blk in bm.blocks] == refs[:len(bm.blocks)]
    assert not any(refs[len(bm.blocks):]), "a block in use was never handed out"
    assert set(bm.free_blocks) == {i for i, r in enumerate(refs[:len(bm.blocks)]) if r == 0}
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    for block_hash, block_id in bm.hash_to_block.items():
        assert bm.blocks[block_id].block_hash == block_hash


# -- allocation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 5, 8, 9, 15, 16, 17])
def test_allocation_is_ceil_of_tokens_over_block_size(num_tokens):
    bm = BlockManager(num_blocks=10, block_size=BS)
    seq = make_seq(list(range(100, 100 + num_tokens)))
    expected = -(-num_tokens // BS)
    assert bm.blocks_needed(seq, num_tokens) == expected
    bm.allocate(seq, num_tokens)
    assert len(seq.block_table) == expected
    assert len(set(seq.block_table)) == expected
    assert bm.num_free_blocks == 10 - expected
    assert bm.num_used_blocks == expected
    assert_consistent(bm, [seq])


def test_allocation_grows_incrementally_with_chunks_and_decodes():
    bm = BlockManager(num_blocks=10, block_size=BS)
    seq = make_seq(list(range(10)))
    compute(bm, seq, 3)
    assert len(seq.block_table) == 1
    compute(bm, seq, 3)  # 6 tokens
    assert len(seq.block_table) == 2
    compute(bm, seq, 4)  # 10 tokens
    assert len(seq.block_table) == 3
    table = list(seq.block_table)
    # Decoding: one token at a time; a new block only when the previous one is full.
    for total in range(11, 20):
        seq.token_ids.append(7)
        needed = bm.blocks_needed(seq, 1)
        assert needed == (1 if (total - 1) % BS == 0 else 0), total
        compute(bm, seq, 1)
        assert len(seq.block_table) == -(-total // BS)
    assert seq.block_table[:3] == table  # existing blocks never move
    assert bm.blocks_needed(seq, 0) == 0
    assert_consistent(bm, [seq])


def test_allocate_without_enough_blocks_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=BS)
    seq = make_seq(list(range(13)))  # needs 4 blocks
    assert not bm.can_allocate(seq, 13)
    assert bm.can_allocate(seq, 12)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(seq, 13)
    assert seq.block_table == []
    assert bm.num_free_blocks == 3
    assert_consistent(bm, [])


def test_touched_blocks_count_each_block_once_as_first_written():
    """The resident part of an untouched cache: a freed block reused, or a prefix hit, adds none."""
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    first = make_seq(list(range(9)), "a")  # 3 blocks
    admit(bm, first)
    assert bm.num_touched_blocks == 3
    bm.free(first)
    again = make_seq(list(range(100, 107)), "b")  # 2 blocks: the free list's front, never written
    admit(bm, again)
    assert bm.num_touched_blocks == 5
    bm.free(again)
    for i in range(4):  # 8 blocks in all: the last 5 never written before, then old ones again
        admit(bm, make_seq(list(range(200 + 10 * i, 208 + 10 * i)), f"c{i}"))
    assert bm.num_touched_blocks == 10


def test_num_blocks_must_be_positive():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=BS)


def test_slot_maps_positions_through_the_block_table():
    bm = BlockManager(num_blocks=8, block_size=BS)
    filler = make_seq(list(range(8)), "filler")
    compute(bm, filler)  # takes blocks 0 and 1, so the next table is not the identity
    seq = make_seq(list(range(50, 59)))
    compute(bm, seq)
    for pos in range(9):
        block = seq.block_table[pos // BS]
        assert bm.slot(seq, pos) == block * BS + pos % BS
    assert bm.slot(seq, 0) != 0


# -- freeing ------------------------------------------------------------------------------------


def test_free_returns_every_block_and_resets_the_sequence():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = make_seq(list(range(10)), "a"), make_seq(list(range(20, 27)), "b")
    compute(bm, a)
    compute(bm, b)
    assert bm.num_free_blocks == 6 - 3 - 2
    bm.free(a)
    assert a.block_table == [] and a.block_hashes == [] and a.num_computed_tokens == 0
    assert bm.num_free_blocks == 6 - 2
    assert_consistent(bm, [b])
    bm.free(b)
    assert bm.num_free_blocks == 6
    assert all(blk.ref_count == 0 for blk in bm.blocks)


# -- prefix caching -----------------------------------------------------------------------------


def test_shared_prompt_prefix_shares_full_blocks_with_ref_counts():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefix = list(range(100, 110))  # 2 full blocks + 2 tokens
    a = make_seq(prefix + [1, 2, 3], "a")
    admit(bm, a)
    assert bm.num_prefix_queries == 1 and bm.num_prefix_hits == 0
    assert len(a.block_hashes) == 3  # 13 computed tokens: 3 full blocks registered

    b = make_seq(prefix + [9, 9, 9, 9, 9], "b")
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2]
    assert b.num_computed_tokens == 8
    assert b.metrics.num_cached_prompt_tokens == 8
    assert bm.num_prefix_hits == 1 and bm.num_prefix_queries == 2
    for block_id in a.block_table[:2]:
        assert bm.blocks[block_id].ref_count == 2
    assert bm.blocks[a.block_table[2]].ref_count == 1

    used_before = bm.num_used_blocks
    compute(bm, b)  # 15 tokens: 2 shared + 2 own blocks
    assert len(b.block_table) == 4
    assert bm.num_used_blocks == used_before + 2
    assert not set(b.block_table[2:]) & set(a.block_table)
    assert_consistent(bm, [a, b])

    # Freeing one owner keeps the shared blocks in use for the other.
    bm.free(a)
    for block_id in b.block_table[:2]:
        assert bm.blocks[block_id].ref_count == 1
        assert block_id not in bm.free_blocks
    assert_consistent(bm, [b])
    bm.free(b)
    assert bm.num_free_blocks == bm.num_blocks
    assert_consistent(bm, [])


@pytest.mark.parametrize("length", range(1, 14))
def test_last_prompt_token_is_never_served_from_cache(length):
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(200, 200 + length))
    admit(bm, make_seq(tokens, "a"))  # registers every full block of the same prompt
    b = make_seq(tokens, "b")
    bm.match_prefix(b)
    assert b.num_computed_tokens <= b.num_tokens - 1
    assert b.num_computed_tokens == ((length - 1) // BS) * BS
    assert b.num_uncomputed_tokens >= 1
    assert len(b.block_table) == b.num_computed_tokens // BS


def test_hash_chaining_same_block_content_elsewhere_does_not_hit():
    bm = BlockManager(num_blocks=32, block_size=BS)
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    a = make_seq(x + y + [0], "a")
    admit(bm, a)
    assert len(bm.hash_to_block) == 2

    # `y` alone at position 0 (a different parent) and `y` after `z` (a different prefix).
    for tokens in (y + x + [0], z + y + [0], y + y + [0]):
        seq = make_seq(tokens, "miss")
        bm.match_prefix(seq)
        assert seq.block_table == [], tokens
        assert seq.num_computed_tokens == 0
    assert bm.num_prefix_hits == 0

    # Matching stops at the first block that differs, even if a later block's content matches.
    c = make_seq(x + z + y + [0], "c")
    bm.match_prefix(c)
    assert c.block_table == a.block_table[:1]
    assert c.num_computed_tokens == BS
    # The full prefix chain hits both blocks.
    d = make_seq(x + y + z, "d")
    bm.match_prefix(d)
    assert d.block_table == a.block_table[:2]
    assert bm.num_prefix_hits == 2


def test_blocks_with_generated_tokens_are_registered_and_hittable():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq([1, 2, 3, 4, 5, 6], "a")
    admit(bm, a)
    assert len(a.block_hashes) == 1
    for t in (70, 71, 72):  # decode fills the second block
        a.token_ids.append(t)
        compute(bm, a, 1)
    assert len(a.block_hashes) == 2
    b = make_seq([1, 2, 3, 4, 5, 6, 70, 71, 72, 73], "b")
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2]


def test_freed_blocks_stay_hittable_until_evicted():
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(300, 310))
    a = make_seq(tokens, "a")
    admit(bm, a)
    cached = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 8  # freed blocks count as free...
    b = make_seq(tokens + [1], "b")
    bm.match_prefix(b)  # ...but still hit
    assert b.block_table == cached
    assert b.num_computed_tokens == 8
    assert bm.num_free_blocks == 6  # hit blocks leave the free list
    assert all(bm.blocks[i].ref_count == 1 for i in cached)
    assert_consistent(bm, [b])


def test_eviction_takes_least_recently_freed_first_and_removes_the_hash():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8], "a")
    d = make_seq([11, 12, 13, 14, 15, 16, 17, 18], "d")
    admit(bm, a)
    admit(bm, d)
    a_hashes, d_hashes = list(a.block_hashes), list(d.block_hashes)
    a_blocks, d_blocks = list(a.block_table), list(d.block_table)
    assert bm.num_free_blocks == 0 and len(bm.hash_to_block) == 4
    bm.free(a)  # freed first -> evicted first
    bm.free(d)

    e = make_seq([90, 91, 92, 93, 94, 95, 96, 97], "e")
    bm.allocate(e, 8)
    assert sorted(e.block_table) == sorted(a_blocks)
    for h in a_hashes:
        assert h not in bm.hash_to_block
    for blk in a_blocks:
        assert bm.blocks[blk].block_hash is None
    for h in d_hashes:
        assert h in bm.hash_to_block

    again_a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a2")
    bm.match_prefix(again_a)
    assert again_a.block_table == [] and again_a.num_computed_tokens == 0
    again_d = make_seq([11, 12, 13, 14, 15, 16, 17, 18, 19], "d2")
    bm.match_prefix(again_d)
    assert again_d.block_table == d_blocks
    assert_consistent(bm, [e, again_d])


def test_evicted_block_rewritten_with_other_content_does_not_hit_old_prefix():
    bm = BlockManager(num_blocks=2, block_size=BS)
    a = make_seq([1, 2, 3, 4, 5], "a")
    admit(bm, a)
    bm.free(a)
    c = make_seq([40, 41, 42, 43, 44, 45, 46, 47], "c")  # takes both blocks
    admit(bm, c)
    bm.free(c)
    b = make_seq([1, 2, 3, 4, 5], "b")
    bm.match_prefix(b)
    assert b.block_table == []
    c2 = make_seq([40, 41, 42, 43, 44, 45, 46, 47, 48], "c2")
    bm.match_prefix(c2)
    assert len(c2.block_table) == 2
    assert_consistent(bm, [c2])


def test_identical_prompts_computed_concurrently_then_freed_do_not_leak():
    # Both compute the same prompt before either registers, so two blocks carry one hash.
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = make_seq([1, 2, 3, 4, 5], "a"), make_seq([1, 2, 3, 4, 5], "b")
    bm.match_prefix(a)
    bm.match_prefix(b)
    bm.allocate(a, 5)
    bm.allocate(b, 5)
    for s in (a, b):
        s.num_computed_tokens = 5
        bm.register_full_blocks(s)
    assert bm.blocks[a.block_table[0]].block_hash == bm.blocks[b.block_table[0]].block_hash
    assert_consistent(bm, [a, b])
    bm.free(a)
    bm.free(b)
    # Reuse every block; the hash index must never point at a block with other content.
    filler = make_seq(list(range(60, 84)), "f")
    compute(bm, filler)
    assert bm.num_free_blocks == 0
    assert_consistent(bm, [filler])
    bm.free(filler)
    c = make_seq([1, 2, 3, 4, 5], "c")
    bm.match_prefix(c)
    assert c.block_table == []
    assert bm.num_free_blocks == 6


def test_prefix_caching_disabled_never_shares():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    tokens = list(range(500, 512))
    a = make_seq(tokens, "a")
    admit(bm, a)
    assert a.block_hashes == [] and bm.hash_to_block == {}
    b = make_seq(tokens, "b")
    bm.match_prefix(b)
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert b.metrics.num_cached_prompt_tokens == 0
    compute(bm, b)
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_prefix_hits == 0
    assert_consistent(bm, [a, b])
    bm.free(a)
    c = make_seq(tokens, "c")
    bm.match_prefix(c)  # not even freed blocks are reused
    assert c.block_table == []
    bm.free(b)
    assert bm.num_free_blocks == 16


# -- no leaks under a random workload -----------------------------------------------------------


@pytest.mark.parametrize("caching", [True, False])
def test_random_workload_keeps_ref_counts_consistent_and_leaks_nothing(caching):
    rng = random.Random(1234)
    bm = BlockManager(num_blocks=40, block_size=BS, enable_prefix_caching=caching)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(3, 14))] for _ in range(4)]
    live: list[Sequence] = []
    hits_possible = 0
    for i in range(300):
        if live and (rng.random() < 0.4 or bm.num_free_blocks < 8):
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        elif live and rng.random() < 0.5:
            seq = rng.choice(live)  # decode one token
            seq.token_ids.append(rng.randrange(50))
            if bm.can_allocate(seq, 1):
                compute(bm, seq, 1)
            else:
                seq.token_ids.pop()
        else:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 9))]
            seq = make_seq(tokens, f"s{i}")
            bm.match_prefix(seq)
            assert seq.num_computed_tokens <= seq.num_tokens - 1
            assert seq.num_computed_tokens == len(seq.block_table) * BS
            if bm.can_allocate(seq, seq.num_uncomputed_tokens):
                compute(bm, seq)
                live.append(seq)
                hits_possible += 1
            else:
                bm.free(seq)
        assert_consistent(bm, live)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks
    assert all(blk.ref_count == 0 for blk in bm.blocks)
    assert hits_possible > 50
    if caching:
        assert bm.num_prefix_hits > 0
    else:
        assert bm.num_prefix_hits == 0
