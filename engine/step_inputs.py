"""A step's model inputs: the scheduled tokens, their positions and the attention metadata that
reads and writes the paged KV cache through the sequences' block tables.

The runner builds its target's inputs with a `StepInputBuilder` and hands the same builder to
the draft proposer: the draft shares the block tables, so both attend the same way.
"""

from __future__ import annotations

import torch

from engine.layers.attention import AttentionMetadata, DecodeGroup, DecodeKernelArgs, PrefillSpan
from engine.rules import continues_row_by_row, prefills_row_by_row
from engine.scheduler import ScheduledSequence

# Most context tokens gathered for one decode group: keeps one layer's gathered keys and values
# for the group (fp32, 8 MiB each at 256 kv features) within the last-level cache of a small CPU.
DECODE_GROUP_TOKENS = 8192


class StepInputBuilder:
    """Builds a step's inputs on `device` for a cache of `block_size`-token blocks; attention
    computes in `attn_dtype`, and decode rows read the block cache in place through
    `decode_backend`'s kernel ("cpu", "triton"), or through gathered copies when it is None."""

    def __init__(self, block_size: int, device: torch.device, attn_dtype: torch.dtype,
                 decode_backend: str | None) -> None:
        self.block_size = block_size
        self.device = device
        self.attn_dtype = attn_dtype
        self.decode_backend = decode_backend

    def _additive(self, blocked: torch.Tensor) -> torch.Tensor:
        return torch.zeros(blocked.shape, dtype=self.attn_dtype, device=self.device).masked_fill_(
            blocked, float("-inf"))

    def build(self, items: list[ScheduledSequence]
              ) -> tuple[list[int], torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(the order the items' rows run in, input ids, positions, attention metadata)."""
        # Decodes, and short continuations of a context (speculative verification, a draft
        # catching up), are attended row by row from the block cache, each token reading its
        # own prefix; prompts and longer chunks go through the prefill path, unless they are
        # short enough to go row by row too.
        prefilling = [it for it in items if not it.is_decode]
        short = self.decode_backend is not None and prefills_row_by_row(
            len(prefilling), sum(it.num_new_tokens for it in prefilling))
        decodes = sorted((i for i, it in enumerate(items) if short or _row_by_row(it)),
                         key=lambda i: items[i].context_len)
        prefills = [i for i, it in enumerate(items) if not (short or _row_by_row(it))]
        order = decodes + prefills
        bs, dev = self.block_size, self.device
        row_items = [idx for idx in decodes for _ in range(items[idx].num_new_tokens)]
        decode_ctx = [p + 1 for idx in decodes for p in range(items[idx].start, items[idx].context_len)]

        # Built as Python lists and converted once: a dozen small tensor ops here cost more than
        # a batch-1 decode step's attention.
        token_ids: list[int] = []
        position_list: list[int] = []
        slot_list: list[int] = []
        for idx in order:
            it = items[idx]
            table = it.seq.block_table
            token_ids.extend(it.token_ids)
            position_list.extend(range(it.start, it.context_len))
            slot_list.extend(table[p // bs] * bs + p % bs for p in range(it.start, it.context_len))
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
        positions = torch.tensor(position_list, dtype=torch.long, device=dev)
        meta = AttentionMetadata(slot_mapping=torch.tensor(slot_list, dtype=torch.long, device=dev),
                                 num_decode_tokens=len(row_items), compute_dtype=self.attn_dtype)

        def block_tables(indices: list[int]) -> torch.Tensor:
            tables = [items[idx].seq.block_table for idx in indices]
            width = max(len(t) for t in tables)
            return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=dev)

        def context_slots(indices: list[int]) -> torch.Tensor:  # [N, width * bs]
            return (block_tables(indices).unsqueeze(-1) * bs + torch.arange(bs, device=dev)).flatten(1)

        if decodes and self.decode_backend is not None:
            meta.decode_kernel = DecodeKernelArgs(
                block_tables=block_tables(row_items), context_lens=torch.tensor(decode_ctx, device=dev),
                max_context=max(decode_ctx), block_size=bs, backend=self.decode_backend)
            decode_groups = []
        else:
            decode_groups = _decode_groups(decode_ctx)
        for first, last in decode_groups:
            ctx = decode_ctx[first:last]
            longest = max(ctx)
            slots = context_slots(row_items[first:last])[:, :longest].contiguous()  # one layout: one compiled graph
            group = DecodeGroup(start=first, context_slots=slots)
            if min(ctx) != longest:
                lens = torch.tensor(ctx, device=dev)
                padded = torch.arange(longest, device=dev) >= lens.unsqueeze(1)
                group.mask = self._additive(padded).view(len(ctx), 1, 1, longest)
                # Masked, but must still read written memory: NaN * 0 would poison the output.
                group.context_slots = torch.where(padded, slots[:, :1], slots)
            meta.decode_groups.append(group)

        start = len(row_items)
        for idx in prefills:
            it = items[idx]
            span = PrefillSpan(start=start, length=it.num_new_tokens)
            if it.start > 0:
                span.context_slots = context_slots([idx])[0, :it.context_len]
                keys = torch.arange(it.context_len, device=dev)
                queries = torch.arange(it.start, it.context_len, device=dev)
                span.mask = self._additive(keys.unsqueeze(0) > queries.unsqueeze(1))
            meta.prefills.append(span)
            start += it.num_new_tokens
        return order, input_ids, positions, meta


def _row_by_row(item: ScheduledSequence) -> bool:
    return continues_row_by_row(item.start, item.num_new_tokens)


def _decode_groups(context_lens: list[int]) -> list[tuple[int, int]]:
    """Split context lengths (mostly ascending) into [first, last) runs of at most
    DECODE_GROUP_TOKENS tokens once padded to the run's longest."""
    groups, first, longest = [], 0, 0
    for i, length in enumerate(context_lens):
        longest = max(longest, length)
        if i > first and (i - first + 1) * longest > DECODE_GROUP_TOKENS:
            groups.append((first, i))
            first, longest = i, length
    if context_lens:
        groups.append((first, len(context_lens)))
    return groups
