"""Tokenizers: the byte-level default, tokenizer.json through `tokenizers`, incremental text."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine import LLM, EngineConfig, SamplingParams
from engine.model_zoo import make_checkpoint
from engine.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer

TEXT = "Hello, wörld! Ünïcödé ✓ — naïve café. " * 20


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """The tiny random model plus a byte-level BPE tokenizer trained here on local text."""
    model_dir = make_checkpoint("tiny", tmp_path_factory.mktemp("bpe"), seed=0, dtype="float32")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(model_dir / "tokenizer.json"))
    assert tok.get_vocab_size() <= 512  # fits the tiny model's vocabulary
    return model_dir


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer(bos_token_id=256)
    ids = tok.encode("héllo ✓")
    assert ids[0] == 256 and all(0 <= t < 256 for t in ids[1:])
    assert tok.decode(ids) == "héllo ✓"


def test_byte_tokenizer_without_bos():
    assert ByteTokenizer(None).encode("ab") == [97, 98]


def test_incremental_detokenizer_never_splits_a_character():
    tok = ByteTokenizer(None)
    ids = tok.encode("aé✓b")  # 1 + 2 + 3 + 1 bytes
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.update(ids[:n]) for n in range(1, len(ids) + 1)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "aé✓b" == detok.text
    assert deltas[1] == "" and deltas[2] == "é"  # waits for the second byte of é


def test_engine_uses_tokenizer_json(bpe_model):
    llm = LLM(EngineConfig(model=str(bpe_model), dtype="float32", num_threads=1))
    assert isinstance(llm.tokenizer, HFTokenizer)
    reference = Tokenizer.from_file(str(bpe_model / "tokenizer.json"))
    prompt = "Hello, wörld! café"
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert out.prompt_token_ids == reference.encode(prompt).ids
    assert len(out.prompt_token_ids) < len(prompt.encode())  # merges happened: not bytes
    assert out.text == reference.decode(out.token_ids)


def test_streamed_text_equals_generated_text(bpe_model):
    llm = LLM(EngineConfig(model=str(bpe_model), dtype="float32", num_threads=1))
    params = SamplingParams(temperature=0.9, seed=3, max_tokens=24, ignore_eos=True)
    [out] = llm.generate(["naïve ✓"], params)
    pieces = list(llm.stream("naïve ✓", params))
    assert [p.token_id for p in pieces] == out.token_ids
    assert "".join(p.text for p in pieces) == out.text
    assert pieces[-1].finish_reason == "length"
