"""`export_gguf`: a float checkpoint in the Hugging Face layout written as llama.cpp's converter
writes it (tensor names, the q/k row order of `llama`, the byte-level BPE tokenizer), so that
llama.cpp runs exactly the weights the engine runs, at the precision asked for."""

from __future__ import annotations

import json
from pathlib import Path

from engine.gguf.reader import _GLOBAL_TENSORS, _LAYER_TENSORS, GGUFError, permute_rows
from engine.model_config import ModelConfig

# Hugging Face name -> GGUF name: the reader's tables, inverted.
_LAYER = {hf: gguf for gguf, hf in _LAYER_TENSORS.items()}
_GLOBAL = {hf: gguf for gguf, hf in _GLOBAL_TENSORS.items()}
EXPORT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
CONTROL, NORMAL = 3, 1


def export_gguf(model_dir: str | Path, out: str | Path, qtype: str = "BF16") -> Path:
    """Write the model in `model_dir` (float weights, tokenizer.json) to the GGUF file `out`:
    matrices in `qtype`, norms and biases in F32."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, quants
    from safetensors.torch import load_file

    from engine.loader import safetensors_files

    model_dir, out = Path(model_dir), Path(out)
    if qtype not in EXPORT_TYPES:
        raise GGUFError(f"qtype: {qtype!r} is not one of {', '.join(EXPORT_TYPES)}")
    config = ModelConfig.for_engine(model_dir)
    if config.quantization is not None or config.is_moe or config.model_type not in ("llama", "qwen2"):
        raise GGUFError(f"{model_dir}: only float llama and qwen2 checkpoints are exported")
    if config.rope_scaling:
        raise GGUFError(f"{model_dir}: rope scaling is not exported")
    raw = config.raw
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise GGUFError(f"{model_dir}: no tokenizer.json to export")
    writer = GGUFWriter(str(out), config.model_type)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_file_type(LlamaFileType.ALL_F32 if qtype == "F32" else LlamaFileType[f"MOSTLY_{qtype}"])
    _add_tokenizer(writer, json.loads(tokenizer_file.read_text()), raw, config.vocab_size)
    template = _chat_template(model_dir)
    if template:
        writer.add_chat_template(template)
    kind = GGMLQuantizationType[qtype]
    files = safetensors_files(model_dir)
    for path in sorted(set(files.values())):
        for name, values in load_file(str(path)).items():
            values = values.float().numpy()
            gguf_name = _gguf_name(name)
            if config.model_type == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
                heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
                values = values[permute_rows(values.shape[0], heads)]
            if values.ndim == 2 and kind != GGMLQuantizationType.F32:
                writer.add_tensor(gguf_name, quants.quantize(values, kind), raw_dtype=kind)
            else:
                writer.add_tensor(gguf_name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _gguf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER:
        return f"blk.{parts[2]}.{_LAYER[parts[3]]}"
    raise GGUFError(f"tensor {name} has no GGUF counterpart")


def _add_tokenizer(writer, tokenizer: dict, raw: dict, vocab_size: int) -> None:
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFError(f"tokenizer.json: a {model.get('type')} model; only byte-level BPE is exported")
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    for added in tokenizer.get("added_tokens", []):
        if added["id"] >= len(tokens):
            tokens += [f"[PAD{i}]" for i in range(len(tokens), added["id"])] + [added["content"]]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    special = {a["content"] for a in tokenizer.get("added_tokens", []) if a.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(raw.get("gguf_source", {}).get("pre", "default"))
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if t in special else NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        if isinstance(raw.get(key), int):
            add(raw[key])


def _chat_template(model_dir: Path) -> str | None:
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    template = json.loads(config_file.read_text()).get("chat_template")
    return template if isinstance(template, str) else None
