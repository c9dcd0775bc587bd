"""Streamed text on real tokenizers: the deltas a client receives add up to the full decode,
never end inside a character (CJK and emoji split over byte tokens, SentencePiece byte-fallback
tokens), and a stop string that spans token boundaries cuts the text without any of it being
streamed. SmolLM2's own tokenizer (byte-level BPE) and a Llama-style byte-fallback tokenizer
trained here are both checked, token by token, as the engine and the server run them."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from engine.serving.openai_serving import StopWatch
from engine.tokenizer import HFTokenizer, IncrementalDetokenizer

TEXTS = ["你好，世界！日本語のテキスト。한국어 문장입니다.", "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 here",
         "def f(x):\n\treturn os.path.join(x, 'a')  # ✓ done", "<|im_start|>user\nHi<|im_end|>\n",
         "café naïve résumé — “quoted” …", "  spaces   and\n\n\nnewlines"]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2) -> HFTokenizer:
    return HFTokenizer(smollm2 / "tokenizer.json")


@pytest.fixture(scope="module")
def byte_fallback_tokenizer(tmp_path_factory) -> HFTokenizer:
    """Llama 2's scheme: '▁' for spaces, and bytes <0x00>..<0xFF> for what the vocabulary lacks."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", *alphabet])
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog. " * 50], trainer)
    path = tmp_path_factory.mktemp("byte-fallback") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path)


def _stream(tokenizer: HFTokenizer, ids: list[int]) -> list[str]:
    """The text deltas of a request whose tokens arrive one a step, as the engine makes them,
    with the engine's full decode at the end."""
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.update(ids[:n]) for n in range(1, len(ids) + 1)]
    final = tokenizer.decode(ids)
    assert final.startswith(detok.text)
    return deltas + [final[len(detok.text):]]


def _cases(tokenizer: HFTokenizer) -> list[list[int]]:
    rng = random.Random(0)  # a model may emit any sequence: random ones too
    return [tokenizer.encode(t) for t in TEXTS] + [
        [rng.randrange(tokenizer.vocab_size) for _ in range(40)] for _ in range(100)]


@pytest.mark.parametrize("which", ["smollm2_tokenizer", "byte_fallback_tokenizer"])
def test_deltas_add_up_to_the_text_and_never_split_a_character(request, which):
    tokenizer = request.getfixturevalue(which)
    split = 0
    for ids in _cases(tokenizer):
        deltas, full = _stream(tokenizer, ids), tokenizer.decode(ids)
        assert "".join(deltas) == full
        # Whatever was sent mid-stream is where the whole decode has it: a character that
        # spans tokens is held back until whole, never sent as replacement characters.
        sent = ""
        for delta in deltas:
            sent += delta
            assert full.startswith(sent)
        split += sum(1 for d in deltas[:-1] if d == "")
    assert split > 0  # some characters did span tokens (and were held back until whole)


@pytest.mark.parametrize("which", ["smollm2_tokenizer", "byte_fallback_tokenizer"])
def test_a_stop_string_spanning_tokens_cuts_the_text_and_is_never_sent(request, which):
    tokenizer = request.getfixturevalue(which)
    spanning = 0
    for text in TEXTS:
        ids = tokenizer.encode(text)
        full = tokenizer.decode(ids)
        ends = [len(tokenizer.decode(ids[:n])) for n in range(1, len(ids))]  # token boundaries
        for boundary in ends[2::5]:
            if not 2 <= boundary <= len(full) - 2:
                continue
            stop = full[boundary - 2:boundary + 2]  # two characters each side of a boundary
            spanning += 1
            watch, sent, stopped = StopWatch([stop, "never there"]), [], False
            detok = IncrementalDetokenizer(tokenizer)
            for n in range(1, len(ids) + 1):
                detok.update(ids[:n])
                text_now = tokenizer.decode(ids) if n == len(ids) else detok.text
                delta, stopped = watch.update(text_now, n == len(ids))
                sent.append(delta)
                if stopped:
                    break
            assert stopped and "".join(sent) == full[:full.index(stop)], (stop, sent)
    assert spanning >= 5


def test_smollm2_streams_over_http_the_text_it_answers_whole(smollm2, smollm2_tokenizer):
    """The served path end to end on the real model, its tokenizer and its chat template."""
    import openai

    from engine import EngineConfig
    from engine.serving import start_server

    config = EngineConfig(model=str(smollm2), dtype="float32", num_threads=2, max_num_seqs=2)
    with start_server(config) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        ask = {"model": str(smollm2), "max_tokens": 40, "temperature": 0,
               "messages": [{"role": "user", "content": "Say hello in Chinese and in French, with an emoji."}]}
        text = client.chat.completions.create(**ask).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or ""
                           for c in client.chat.completions.create(**ask, stream=True) if c.choices)
        assert streamed == text and len(text) > 20
        ids = smollm2_tokenizer.encode(text)
        boundary = len(smollm2_tokenizer.decode(ids[:len(ids) // 2]))
        stop = text[boundary - 2:boundary + 2]  # spans a token boundary
        cut = "".join(c.choices[0].delta.content or ""
                      for c in client.chat.completions.create(**ask, stream=True, stop=stop) if c.choices)
        assert cut == text[:text.index(stop)]
