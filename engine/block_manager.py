"""`BlockManager`: hands out fixed-size KV-cache blocks and shares full blocks between prompts.

A block holds `block_size` consecutive tokens of one sequence. A full block is identified by a
hash of its tokens chained with the hash of the block before it, so two prompts with a common
prefix map to the same blocks. Freed blocks keep their contents and hash until they are reused
(least recently freed first), so a later request can still hit them.

Blocks never used yet are handed out first, in id order, and their bookkeeping is made as they
are: a CPU cache can hold millions of small blocks, and making them all up front took a second
per engine start and left the garbage collector millions of objects to walk.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = field(default=())


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        # The blocks handed out so far, ids 0..len-1; the rest are free and untouched.
        self.blocks: list[Block] = []
        # Blocks freed after use. Insertion order = order of freeing: the front is evicted first.
        self.free_blocks: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block: dict[int, int] = {}
        self.num_prefix_hits = 0
        self.num_prefix_queries = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + self.num_blocks - len(self.blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_touched_blocks(self) -> int:
        """Blocks ever written: the cache is allocated untouched, so these are its resident part."""
        return len(self.blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so that `seq` can hold its computed tokens plus `num_new_tokens`."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def match_prefix(self, seq: Sequence) -> None:
        """Give a sequence with no blocks the cached blocks of its longest known prefix.

        The last prompt token is always recomputed, so that the step produces its logits and
        never writes into a shared block.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self.num_prefix_queries += 1
        parent: int | None = None
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_hash = hash((parent, tokens))
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(block_hash)
            parent = block_hash
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        if seq.block_table:
            self.num_prefix_hits += 1
        # After a preemption the match can cover generated tokens: count only the prompt's.
        seq.metrics.num_cached_prompt_tokens = max(
            seq.metrics.num_cached_prompt_tokens, min(seq.num_computed_tokens, seq.num_prompt_tokens))

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, {self.num_free_blocks} free")
        for _ in range(needed):
            if len(self.blocks) < self.num_blocks:  # untouched blocks go first
                block_id = len(self.blocks)
                self.blocks.append(Block(block_id))
            else:
                block_id = next(iter(self.free_blocks))
                block = self.blocks[block_id]
                if block.block_hash is not None and self.hash_to_block.get(block.block_hash) == block_id:
                    del self.hash_to_block[block.block_hash]
                block.block_hash, block.token_ids = None, ()
            self._take(block_id)
            seq.block_table.append(block_id)

    def register_full_blocks(self, seq: Sequence) -> None:
        """Record hashes of blocks that became full of computed tokens, for later prefix hits."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None:
                parent = seq.block_hashes[-1] if seq.block_hashes else None
                tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
                block.block_hash = hash((parent, tokens))
                block.token_ids = tokens
                self.hash_to_block.setdefault(block.block_hash, block.block_id)
            seq.block_hashes.append(block.block_hash)

    def free(self, seq: Sequence) -> None:
        # Reverse order: a sequence's tail blocks are the least likely to be shared again.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> int:
        """Forget the contents of every free block, so no later prompt hits them (a benchmark
        starting cold); blocks in use keep theirs. Returns how many blocks were forgotten."""
        forgotten = 0
        for block_id in self.free_blocks:
            block = self.blocks[block_id]
            if block.block_hash is None:
                continue
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash, block.token_ids = None, ()
            forgotten += 1
        return forgotten

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.free_blocks.pop(block_id, None)  # absent when it was never used
        block.ref_count += 1
