"""GGUF files from a checkpoint made here and a byte-level BPE tokenizer trained here, written by
the engine's exporter (which llama.cpp reads back to the same greedy tokens: see
planner/bench/llamacpp.py): the round trip's starting point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_tokenizer(vocab_size: int, out: Path) -> Path:
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer) trained on the Python standard
    library's source and a few lines of CJK and emoji; returns its tokenizer.json."""
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [Path(os.__file__).read_text(), Path(json.__file__).read_text(),
            "你好，世界！日本語のテキスト。한국어 문장입니다. 😀🎉👍🏽 café naïve"] * 2
    tokenizer.train_from_iterator(text, trainer)
    path = out / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def write_gguf(model_dir: Path, tokenizer_json: Path, path: Path, qtype: str = "F32") -> Path:
    """The checkpoint in `model_dir` with this tokenizer, its chat template and <|im_start|> /
    <|im_end|> as BOS / EOS, exported as llama.cpp's converter writes a GGUF file (matrices in
    `qtype`)."""
    from engine.gguf.writer import export_gguf

    if (model_dir / "tokenizer.json").resolve() != tokenizer_json.resolve():
        shutil.copy(tokenizer_json, model_dir / "tokenizer.json")
    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(bos_token_id=vocab["<|im_start|>"], eos_token_id=vocab["<|im_end|>"])
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return export_gguf(model_dir, path, qtype)


def tiny_with_tokenizer(root: Path, dtype: str = "float32") -> Path:
    """The built-in tiny Llama with a trained byte-level BPE tokenizer: a model that takes text."""
    from engine.model_zoo import make_checkpoint

    model = make_checkpoint("tiny", root / "model", seed=0, dtype=dtype)
    shutil.copy(train_tokenizer(512, root), model / "tokenizer.json")
    return model
