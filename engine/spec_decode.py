"""Speculative decoding: a draft model proposes tokens, the target verifies them in one pass.

Each decode step verifies, per sequence, the last sampled token plus k drafts: the target's
k + 1 output distributions decide how many drafts stand (the standard rejection rule: keep
draft d with probability min(1, p(d) / q(d)), otherwise resample from max(p - q, 0)
normalised, and after k kept drafts sample one more token from p), so every step yields between
1 and k + 1 tokens distributed exactly as the target alone would produce them. Greedy requests
keep drafts while they equal the target's argmax, which reproduces plain greedy decoding token
for token.

The draft shares the target's block tables (its own KV cache, same block ids and slots), so a
preempted or finished sequence frees both at once; rejected positions are simply recomputed.
After each step the `DraftProposer` catches the draft up on the tokens it has not seen (the
prompt, or the last accepted tokens) and proposes the next k. It is handed the draft (whose
layers hold the draft's KV cache), the runner's step-input builder (the block tables' slots and
attention metadata, as the target's steps get them) and the runner's default generator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.rules import draft_budget
from engine.sampler import draw, row_probs
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence
from engine.sequence import Sequence

if TYPE_CHECKING:
    from engine.models.llama import LlamaForCausalLM
    from engine.step_inputs import StepInputBuilder


def request_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, vocab] logits -> the distributions this request samples from (temperature, top-k/p)."""
    return row_probs(logits, [params] * logits.shape[0])


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return draw(probs.unsqueeze(0), [generator])[0]


def verify(target_logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
           params: SamplingParams, generator: torch.Generator,
           target_probs: torch.Tensor | None = None) -> list[int]:
    """target_logits: [k + 1, vocab] at the last token and each draft (`target_probs`: their
    distributions under `params`, if already computed). Returns the accepted drafts followed by
    one token from the target (a correction, or a bonus after all k)."""
    if params.greedy:
        best = target_logits.argmax(dim=-1).tolist()
        out = []
        for i, d in enumerate(drafts):
            if d != best[i]:
                break
            out.append(d)
        return out + [best[len(out)]]
    assert draft_probs is not None, "sampled drafts need the draft's probabilities"
    p = request_probs(target_logits, params) if target_probs is None else target_probs
    # Every draft's two probabilities and its uniform in three reads, not three per draft.
    index = torch.arange(len(drafts), device=p.device)
    chosen = torch.tensor(drafts, device=p.device)
    p_draft, q_draft = p[index, chosen].tolist(), draft_probs[index, chosen].tolist()
    uniforms = torch.rand(len(drafts), generator=generator, device=p.device).tolist()
    out = []
    for i, d in enumerate(drafts):
        if uniforms[i] * q_draft[i] <= p_draft[i]:  # u < p/q without dividing by 0
            out.append(d)
            continue
        residual = (p[i] - draft_probs[i]).clamp_min_(0)
        total = residual.sum()
        return out + [_draw(residual / total if total > 0 else p[i], generator)]
    return out + [_draw(p[len(drafts)], generator)]


class DraftProposer:
    """Runs the draft model on the runner's block tables and proposes k tokens per sequence:
    `inputs` builds its steps, `generator` draws for sampled requests without a seed."""

    def __init__(self, draft: LlamaForCausalLM, inputs: StepInputBuilder, generator: torch.Generator,
                 k: int, max_model_len: int) -> None:
        self.draft = draft
        self.inputs = inputs
        self.generator = generator
        self.k = k
        self.max_model_len = max_model_len

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence]) -> None:
        """Set `spec_token_ids` (and `draft_probs` for sampled requests) on each sequence."""
        budget = {id(s): self._budget(s) for s in seqs}
        active = [s for s in seqs if budget[id(s)] > 0]
        for s in active:
            s.spec_token_ids, s.draft_probs = [], None
        probs: dict[int, list[torch.Tensor]] = {id(s): [] for s in active}
        for j in range(self.k):
            active = [s for s in active if budget[id(s)] > j]
            if not active:
                break
            # First round: every token the draft has not seen; then one draft at a time.
            items = [ScheduledSequence(s, s.num_tokens - s.num_draft_computed, s.num_draft_computed)
                     if j == 0 else
                     ScheduledSequence(s, 1, s.num_tokens - 1 + j, spec_token_ids=s.spec_token_ids)
                     for s in active]
            order, input_ids, positions, meta = self.inputs.build(items)
            hidden = self.draft(input_ids, positions, meta)
            rows, row = [], 0
            for idx in order:
                row += items[idx].num_new_tokens
                rows.append((idx, row - 1))
            logits = self.draft.compute_logits(hidden[[r for _, r in rows]])
            seqs_in_rows = [items[idx].seq for idx, _ in rows]
            greedy = [i for i, seq in enumerate(seqs_in_rows) if seq.params.greedy]
            sampled = [i for i, seq in enumerate(seqs_in_rows) if not seq.params.greedy]
            if greedy:
                for i, token in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
                    seqs_in_rows[i].spec_token_ids.append(token)
            if sampled:
                q_rows = row_probs(logits[sampled], [seqs_in_rows[i].params for i in sampled])
                picks = draw(q_rows, [seqs_in_rows[i].generator or self.generator for i in sampled])
                for n, (i, token) in enumerate(zip(sampled, picks)):
                    seqs_in_rows[i].spec_token_ids.append(token)
                    probs[id(seqs_in_rows[i])].append(q_rows[n])
        for s in seqs:
            if budget[id(s)] > 0:
                s.num_draft_computed = s.num_tokens - 1 + len(s.spec_token_ids)
                if probs[id(s)]:
                    s.draft_probs = torch.stack(probs[id(s)])

    def _budget(self, seq: Sequence) -> int:
        return draft_budget(seq, self.k, self.max_model_len)
