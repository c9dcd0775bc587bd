"""GGUF files written the way llama.cpp's converter writes them, from a checkpoint made here and
a byte-level BPE tokenizer trained here: the round trip's starting point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from engine.gguf.reader import permute_rows

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
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


def write_gguf(model_dir: Path, tokenizer_json: Path, path: Path, qtype: str = "F32",
               architecture: str = "llama") -> Path:
    """The checkpoint in `model_dir` as a GGUF file: llama.cpp's tensor names, its q/k row order
    for `llama`, linear weights in `qtype` (norms and biases stay F32), the tokenizer's tokens,
    types and merges."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads(tokenizer_json.read_text())
    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    if "head_dim" in cfg:
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"[PAD{i}]" for i in range(cfg["vocab_size"] - len(tokens))]
    special = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)
    kind = GGMLQuantizationType[qtype]
    for name, values in load_file(str(model_dir / "model.safetensors")).items():
        values = values.astype(np.float32)
        if name in GLOBAL_NAMES:
            gguf_name = GLOBAL_NAMES[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{LAYER_NAMES[rest]}"
        if architecture == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads"] if "attn_q" in gguf_name else cfg["num_key_value_heads"]
            values = values[permute_rows(values.shape[0], heads)]
        if values.ndim == 2 and kind != GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, quants.quantize(values, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
