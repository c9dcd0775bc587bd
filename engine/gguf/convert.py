"""`import_gguf`: a GGUF file into the Hugging Face layout the engine loads (config.json,
safetensors, tokenizer.json, tokenizer_config.json with the chat template).

Weights are dequantized exactly (every GGUF value is representable in float32) and stored in the
chosen dtype; `pilot models quantize` then writes the engine's int8/int4 form where wanted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from engine.gguf.reader import GGUFError, GGUFFile
from engine.gguf.tokenizer import build_tokenizer, tokenizer_config
from engine.model_config import ModelConfig
from engine.model_zoo import DTYPES, write_checkpoint
from engine.models.llama import checkpoint_shapes


def import_gguf(path: str | Path, out: str | Path, dtype: str = "bfloat16") -> Path:
    """Write the model in the GGUF file at `path` into `out`; returns `out`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    source = GGUFFile.open(path)
    out = Path(out)
    if out.resolve() == source.path.parent.resolve() and (out / "config.json").exists():
        raise ValueError(f"out: {out} already holds a model; import into a new directory")
    cfg = source.config()
    cfg["torch_dtype"] = dtype
    cfg["gguf_source"] = {"file": source.path.name, "tensor_types": source.tensor_types(),
                          "name": source.metadata.get("general.name", ""),
                          "pre": source.metadata.get("tokenizer.ggml.pre", "default")}
    expected = checkpoint_shapes(ModelConfig.from_dict(cfg, str(source.path)))
    tokenizer = build_tokenizer(source.metadata, source.path)  # before writing: fail early
    write_checkpoint(_tensors(source, expected, DTYPES[dtype]), cfg, out)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(source.metadata), indent=2))
    generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def _tensors(source: GGUFFile, expected: dict[str, tuple[int, ...]],
             dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    seen = set()
    for name, values in source.weights():
        if name not in expected:
            raise GGUFError(f"{source.path}: tensor {name} is not part of this model's architecture")
        if tuple(values.shape) != expected[name]:
            raise GGUFError(f"{source.path}: tensor {name} has shape {tuple(values.shape)}, "
                            f"expected {expected[name]} from the metadata")
        seen.add(name)
        yield name, torch.from_numpy(np.array(values, dtype=np.float32)).to(dtype)
    missing = [n for n in expected if n not in seen]
    if missing:
        raise GGUFError(f"{source.path}: missing tensor {missing[0]} (of {len(missing)})")
