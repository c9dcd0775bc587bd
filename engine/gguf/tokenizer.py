"""A GGUF file's tokenizer as a Hugging Face `tokenizers` tokenizer, and its tokenizer_config
(chat template, BOS and EOS tokens).

GGUF stores byte-level BPE (`tokenizer.ggml.model = gpt2`) as the token list, token types and
merges, plus the name of the pre-tokenizer (`tokenizer.ggml.pre`). Each name stands for the
regular expressions llama.cpp splits text with before BPE (llama.cpp's llama-vocab.cpp, MIT),
rebuilt here as `tokenizers` pre-tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.gguf.reader import GGUFError

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split digits one by one first, pattern)
PRE_TOKENIZERS = {"default": (False, GPT2_PATTERN), "gpt-2": (False, GPT2_PATTERN),
                  "smollm": (True, GPT2_PATTERN), "llama-bpe": (False, LLAMA3_PATTERN),
                  "llama3": (False, LLAMA3_PATTERN), "qwen2": (False, QWEN2_PATTERN)}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types


def build_tokenizer(metadata: dict[str, Any], path: Path) -> Any:
    """The `tokenizers.Tokenizer` the metadata describes."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model={kind!r} is not supported; supported: gpt2 (byte-level BPE)")
    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
                        f"{', '.join(PRE_TOKENIZERS)}")
    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
    if not tokens or not merges:
        raise GGUFError(f"{path}: the tokenizer needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=pre in ("llama-bpe", "llama3")))
    digits, pattern = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    steps += [pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=types[i] == CONTROL, normalized=False)
               for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)]
    tokenizer.add_tokens(special)  # keeps their ids: each is already in the vocabulary
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], int(bos))])
    return tokenizer


def tokenizer_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: the chat template and the named special tokens."""
    tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False))}
    for key, name in (("bos_token", "tokenizer.ggml.bos_token_id"),
                      ("eos_token", "tokenizer.ggml.eos_token_id"),
                      ("unk_token", "tokenizer.ggml.unknown_token_id"),
                      ("pad_token", "tokenizer.ggml.padding_token_id")):
        index = metadata.get(name)
        if index is not None and 0 <= int(index) < len(tokens):
            config[key] = tokens[int(index)]
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = str(metadata["tokenizer.chat_template"])
    return config
