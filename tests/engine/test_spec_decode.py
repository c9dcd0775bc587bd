"""Speculative decoding: exactness of greedy output, the rejection rule, bookkeeping, errors."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.model_zoo import make_checkpoint
from engine.sampler import draw, row_probs
from engine.spec_decode import request_probs, verify
from planner.bench.training import BOS, stdlib_corpus


def _engine(target, draft=None, k=4, **kwargs) -> LLM:
    kwargs.setdefault("num_threads", 1)
    kwargs.setdefault("dtype", "float32")
    if draft is not None:
        kwargs.update(speculative_model=str(draft), num_speculative_tokens=k)
    return LLM(EngineConfig(model=str(target), **kwargs))


def _prompts(lengths=(64, 20, 130, 7, 64)) -> list[list[int]]:
    corpus = stdlib_corpus(8 << 20)
    return [[BOS] + corpus[-(i + 1) * 3000:-(i + 1) * 3000 + n].tolist() for i, n in enumerate(lengths)]


GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_output_equals_plain_greedy_in_a_batch(trained_pair, k):
    target, draft = trained_pair
    prompts = _prompts()
    plain = [o.token_ids for o in _engine(target).generate(prompts, GREEDY)]
    spec = _engine(target, draft, k=k)
    outs = spec.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == plain
    for o in outs:
        assert o.metrics.num_draft_tokens > 0 and o.metrics.acceptance_rate is not None
        assert 0 <= o.metrics.num_accepted_tokens <= o.metrics.num_draft_tokens
    # A trained pair agrees far more often than chance (1/320) would have it.
    accepted = sum(o.metrics.num_accepted_tokens for o in outs)
    assert accepted / sum(o.metrics.num_draft_tokens for o in outs) > 0.2
    bm = spec.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # lookahead blocks freed with their sequences


def test_greedy_exact_under_chunking_preemption_and_prefix_hits(trained_pair):
    target, draft = trained_pair
    shared = _prompts((80,))[0]
    prompts = [shared + [101, 102], shared + [103], *_prompts((50, 90, 33))]
    settings = dict(max_num_batched_tokens=24, num_kv_blocks=40, block_size=8, max_model_len=256)
    plain = [o.token_ids for o in _engine(target, **settings).generate(prompts, GREEDY)]
    spec = _engine(target, draft, k=3, **settings)
    outs = spec.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == plain
    assert sum(o.metrics.num_preemptions for o in outs) > 0  # the tiny cache forced some
    assert any(o.metrics.num_cached_prompt_tokens for o in outs)
    bm = spec.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    again = spec.generate(prompts[:1], GREEDY)[0]  # and the engine keeps serving
    assert again.token_ids == plain[0]


def test_an_untrained_draft_still_gives_exact_greedy_output(trained_pair, tmp_path):
    target, _ = trained_pair
    import json

    shape = tmp_path / "draft.json"
    cfg = json.loads((target / "config.json").read_text())
    shape.write_text(json.dumps({k: cfg[k] for k in ("vocab_size", "max_position_embeddings",
                                                      "bos_token_id", "eos_token_id")}))
    draft = make_checkpoint(str(shape), tmp_path / "random-draft", seed=1, dtype="float32")
    prompts = _prompts((30, 60))
    plain = [o.token_ids for o in _engine(target).generate(prompts, GREEDY)]
    outs = _engine(target, draft, k=2).generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == plain


def test_stop_conditions_cut_accepted_drafts(trained_pair):
    target, draft = trained_pair
    prompt = _prompts((40,))[0]
    plain = _engine(target).generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    stop = plain.token_ids[10]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop])
    out = _engine(target, draft, k=4).generate([prompt], params)[0]
    cut = plain.token_ids.index(stop) + 1
    assert out.token_ids == plain.token_ids[:cut] and out.finish_reason == "stop"
    for n in (1, 5, 13):
        limited = _engine(target, draft, k=4).generate(
            [prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
        assert limited.token_ids == plain.token_ids[:n] and limited.finish_reason == "length"


def test_sampled_requests_run_and_report_acceptance(trained_pair):
    target, draft = trained_pair
    llm = _engine(target, draft, k=3)
    stats = []
    llm.engine.add_step_observer(stats.append)
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=40, ignore_eos=True, seed=7)
    outs = llm.generate(_prompts((20, 50)), params)
    assert all(len(o.token_ids) == 40 and all(0 <= t < 320 for t in o.token_ids) for o in outs)
    assert sum(s.num_draft_tokens for s in stats) == sum(o.metrics.num_draft_tokens for o in outs)
    assert sum(s.num_accepted_tokens for s in stats) == sum(o.metrics.num_accepted_tokens for o in outs)
    # Same seed, same engine settings: the same tokens.
    again = _engine(target, draft, k=3).generate(_prompts((20, 50)), params)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]


# -- the rejection rule: output distributed as the target alone ----------------------------------

@pytest.mark.parametrize("k", [1, 2])
def test_rejection_rule_preserves_the_target_distribution(k):
    gen = torch.Generator().manual_seed(0)
    vocab = 6
    p = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04]] * (k + 1))
    q = torch.tensor([[0.05, 0.10, 0.45, 0.20, 0.10, 0.10]] * k)  # a poor draft
    params = SamplingParams(temperature=1.0)
    counts = torch.zeros(vocab)
    trials = 20000
    for _ in range(trials):
        drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
        out = verify(p.log(), drafts, q, params, gen)
        assert 1 <= len(out) <= k + 1
        counts[out[0]] += 1
    tv = 0.5 * (counts / trials - p[0]).abs().sum().item()
    assert tv < 0.02, f"first-token distribution off the target's by TV {tv:.3f}"


def test_one_call_gives_each_row_its_own_requests_distribution():
    """A step's sampled rows go through one call; each row must come out as its own request's
    distribution alone would, the unfiltered ones (which skip the sort) included."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
              SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=2.0, top_k=50),
              SamplingParams(temperature=0.5, top_k=3, top_p=0.9)]
    together = row_probs(logits, params)
    for i, request in enumerate(params):
        torch.testing.assert_close(together[i], request_probs(logits[i:i + 1], request)[0])
    torch.testing.assert_close(together[0], (logits[0] / 0.7).softmax(-1))
    assert (together[1] > 0).sum() == 5 and (together[4] > 0).sum() <= 3


def test_one_draw_per_generator_keeps_each_rows_distribution_and_each_seed():
    """Rows sharing a generator take their noise in one call: every row must still follow its
    own distribution, and a row with its own seed must draw what it draws alone."""
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.0, 0.1, 0.3, 0.6], [0.25, 0.25, 0.25, 0.25]])
    shared = torch.Generator().manual_seed(0)
    counts = torch.zeros(3, 4)
    trials = 6000
    for t in range(trials):
        own, alone = torch.Generator().manual_seed(t), torch.Generator().manual_seed(t)
        tokens = draw(probs, [shared, own, shared])
        assert tokens[1] == draw(probs[1:2], [alone])[0]
        for row, token in enumerate(tokens):
            counts[row, token] += 1
    tv = 0.5 * (counts / trials - probs).abs().sum(dim=1)
    assert (tv < 0.03).all(), f"rows off their distributions by TV {tv.tolist()}"
    assert counts[0, 3] == 0 and counts[1, 0] == 0  # a zero-probability token is never drawn


def test_greedy_verification_keeps_drafts_while_they_match():
    logits = torch.full((4, 10), -5.0)
    for i, best in enumerate([3, 7, 1, 9]):
        logits[i, best] = 5.0
    params = SamplingParams(temperature=0)
    gen = torch.Generator()
    assert verify(logits, [3, 7, 1], None, params, gen) == [3, 7, 1, 9]  # all kept, then a bonus
    assert verify(logits, [3, 2, 1], None, params, gen) == [3, 7]  # corrected at the miss
    assert verify(logits, [0, 7, 1], None, params, gen) == [3]


def test_draft_must_share_the_vocabulary(trained_pair, tmp_path):
    target, _ = trained_pair
    other = make_checkpoint("tiny", tmp_path / "tiny", seed=0, dtype="float32")  # vocab 512
    with pytest.raises(ValueError, match="vocab_size=512.*320"):
        _engine(target, other)


def test_greedy_exact_on_the_pytorch_paths(trained_pair, pytorch_paths):
    """Kernels off: verification rows go through the grouped PyTorch decode attention."""
    target, draft = trained_pair
    prompts = _prompts((40, 9, 75))
    plain = [o.token_ids for o in _engine(target).generate(prompts, GREEDY)]
    spec = _engine(target, draft, k=3)
    assert spec.engine.runner.model.decode_layers is None
    assert [o.token_ids for o in spec.generate(prompts, GREEDY)] == plain
