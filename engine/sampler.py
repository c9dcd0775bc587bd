"""Turn logits into next tokens: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits: [N, vocab] float32, one row per sequence. Returns one token id per row."""
    greedy = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not random_rows:
        return greedy.tolist()
    tokens = greedy.tolist()
    probs = row_probs(logits[random_rows], [params[i] for i in random_rows])
    for i, token in zip(random_rows, draw(probs, [generators[i] for i in random_rows])):
        tokens[i] = token
    return tokens


def row_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[n, vocab] logits -> each row's distribution under its own request's parameters: one
    call for every sampled row of a step (plain sampling, each draft round, verification),
    where a call per sequence cost more than the draft's forward pass."""
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    return filtered_probs(logits / temps.unsqueeze(1), [p.top_k for p in params], [p.top_p for p in params])


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
    """One token from each row of `probs` [N, vocab], row i drawn with `generators[i]`.

    An exponential race (argmax of p / E, E ~ Exp(1)) is a draw from p. Rows that share a
    generator (every request without its own seed shares the engine's) take their noise in one
    call: a call per row cost eight drafted sequences about what the draft's layers take. A
    request with its own seed reads its own generator exactly as when it runs alone."""
    tokens = [0] * probs.shape[0]
    by_generator: dict[int, list[int]] = {}
    for i, generator in enumerate(generators):
        by_generator.setdefault(id(generator), []).append(i)
    for rows in by_generator.values():
        generator = generators[rows[0]]
        block = probs if len(rows) == probs.shape[0] else probs[rows]
        noise = torch.empty_like(block).exponential_(generator=generator)
        for i, token in zip(rows, (block / noise).argmax(dim=-1).tolist()):
            tokens[i] = token
    return tokens


def filtered_probs(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Softmax over each row's top-k, then top-p, tokens (temperature already applied)."""
    vocab = logits.shape[-1]
    if all(k < 0 or k >= vocab for k in top_ks) and all(p >= 1.0 for p in top_ps):
        # Nothing to cut: the sort and scatter below cost a drafted sequence more than its pass.
        return logits.softmax(dim=-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.tensor([vocab if k < 0 else min(k, vocab) for k in top_ks], device=logits.device)
    drop = ranks >= k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if any(p < 1.0 for p in top_ps):
        probs = sorted_logits.softmax(dim=-1)
        top_p = torch.tensor(top_ps, device=logits.device).unsqueeze(1)
        # Keep the smallest prefix whose mass reaches top_p; the top token always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return filtered.softmax(dim=-1)
