"""Named model shapes and seeded random checkpoints in Hugging Face layout.

Nothing can be downloaded from a model hub here, so tests and benchmarks make their own
checkpoints: the real architecture and tensor names, random weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.model_config import CheckpointError, ModelConfig
from engine.models.llama import checkpoint_shapes

_LLAMA_BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "attention_bias": False, "initializer_range": 0.02, "bos_token_id": 256, "eos_token_id": 257,
}

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {**_LLAMA_BASE, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 512},
    "llama-110m": {**_LLAMA_BASE, "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048,
                   "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
                   "max_position_embeddings": 2048},
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
        "use_sliding_window": False, "initializer_range": 0.02,
        "bos_token_id": 151643, "eos_token_id": 151643},
    "llama-3.2-1b": {
        **_LLAMA_BASE, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "bos_token_id": 128000, "eos_token_id": 128001},
    "mixtral-tiny": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
        "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.0,
        "initializer_range": 0.02, "bos_token_id": 256, "eos_token_id": 257},
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shape_config(shape: str | Path) -> dict[str, Any]:
    """A named shape, or a JSON file of config fields (layered over the tiny Llama defaults)."""
    if str(shape) in SHAPES:
        return dict(SHAPES[str(shape)])
    path = Path(shape)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise CheckpointError(f"shape file not found: {path}")
        try:
            fields = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(fields, dict):
            raise CheckpointError(f"{path}: expected a JSON object of config fields")
        return {**SHAPES["tiny"], **fields}
    raise CheckpointError(f"unknown shape {str(shape)!r}; known: {', '.join(SHAPES)} (or a .json file)")


def make_checkpoint(shape: str | Path, out: str | Path, seed: int = 0, dtype: str = "bfloat16",
                    max_shard_bytes: int = 2 * 1024**3, init_std: float | None = None) -> Path:
    """Write config.json and seeded random safetensors weights for `shape` into `out`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg = shape_config(shape)
    cfg["torch_dtype"] = dtype
    # Weights in the engine's layout: for an architecture it builds only.
    model_config = ModelConfig.from_dict(cfg, source=str(shape)).require_runnable(str(shape))
    std = init_std if init_std is not None else float(cfg.get("initializer_range", 0.02))
    generator = torch.Generator().manual_seed(seed)

    torch_dtype = DTYPES[dtype]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, size in checkpoint_shapes(model_config).items():
            if name.endswith("norm.weight"):
                tensor = 1.0 + 0.1 * torch.randn(size, generator=generator)
            elif name.endswith(".bias"):
                tensor = 0.1 * torch.randn(size, generator=generator)
            else:
                tensor = std * torch.randn(size, generator=generator)
            yield name, tensor.to(torch_dtype)

    return write_checkpoint(tensors(), cfg, out, max_shard_bytes)


def write_checkpoint(tensors: Iterable[tuple[str, torch.Tensor]], cfg: dict[str, Any],
                     out: str | Path, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write named tensors and config.json into `out` in Hugging Face layout: one
    model.safetensors, or shards of at most `max_shard_bytes` with an index."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard_bytes and shard_bytes + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor.contiguous()
        shard_bytes += nbytes

    for stale in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata={"format": "pt"})
            for name, tensor in shard.items():
                weight_map[name] = fname
                total += tensor.numel() * tensor.element_size()
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
