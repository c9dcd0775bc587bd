"""`import_gguf`: a GGUF file into the Hugging Face layout the engine loads (config.json,
safetensors, tokenizer.json, tokenizer_config.json with the chat template).

Weights are dequantized exactly (every GGUF value is representable in float32) and stored in the
chosen dtype; `pilot models quantize` then writes the engine's int8/int4 form where wanted. With
`keep_quantized`, a file whose matrices are all Q4_0/Q4_1 keeps them as they are, as the engine's
int4 in groups of 32 (the same layout: a scale and a min per 32 weights), which the engine then
runs without rounding anything again. Q8_0 has no such counterpart (the engine's int8 keeps one
scale per row, Q8_0 one per 32 weights) and is dequantized.
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
from engine.models.llama import checkpoint_shapes, linear_shapes
from engine.quantization import CHECKPOINT_FORMAT, QuantizedWeight, quantize

KEPT_TYPES = ("Q4_0", "Q4_1")  # block formats the engine's int4 (groups of 32) holds as they are


def import_gguf(path: str | Path, out: str | Path, dtype: str = "bfloat16", keep_quantized: bool = False) -> Path:
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
    linears: dict[str, tuple[int, int]] = {}
    if keep_quantized:
        linears = linear_shapes(ModelConfig.from_dict(cfg, str(source.path)))
        _check_kept_types(source, linears)
        cfg["quantization_config"] = {"quant_method": CHECKPOINT_FORMAT, "bits": 4, "group_size": 32}
    expected = checkpoint_shapes(ModelConfig.from_dict(cfg, str(source.path)))
    tokenizer = build_tokenizer(source.metadata, source.path)  # before writing: fail early
    write_checkpoint(_tensors(source, expected, DTYPES[dtype], linears), cfg, out)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(source.metadata), indent=2))
    generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def _check_kept_types(source: GGUFFile, linears: dict[str, tuple[int, int]]) -> None:
    matrices = [t for name, t in source.tensors.items() if source.hf_name(name).removesuffix(".weight") in linears]
    other = sorted({t.tensor_type.name for t in matrices if t.tensor_type.name not in KEPT_TYPES})
    if other:
        raise GGUFError(f"{source.path}: keep_quantized keeps {' and '.join(KEPT_TYPES)} matrices as int4; this "
                        f"file's matrices are also {', '.join(other)} (import it without keep_quantized)")


def _tensors(source: GGUFFile, expected: dict[str, tuple[int, ...]], dtype: torch.dtype,
             kept: dict[str, tuple[int, int]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor under its Hugging Face name, dequantized into `dtype`; the linear layers in
    `kept` (checked to be Q4 blocks) as the engine's int4 parts instead."""
    seen = set()
    for name, tensor in source.tensors.items():
        hf = source.hf_name(name)
        prefix = hf.removesuffix(".weight")
        if prefix in kept:
            q, scale, low_bound = source.q4_blocks(name)
            _check_shape(source, hf, q.shape, kept[prefix])
            weight = QuantizedWeight(torch.from_numpy(q.astype(np.int8)), torch.from_numpy(scale),
                                     torch.from_numpy(low_bound), 4, 32)
            seen.add(prefix)
            yield from weight.to_checkpoint(prefix).items()
            continue
        if hf not in expected:
            raise GGUFError(f"{source.path}: tensor {hf} is not part of this model's architecture")
        values = torch.from_numpy(np.array(source.dequantize(name, tensor), dtype=np.float32))
        _check_shape(source, hf, tuple(values.shape), expected[hf])
        if hf == "model.embed_tokens.weight" and "lm_head" in kept and "output.weight" not in source.tensors:
            # A tied head is a linear layer of its own in a quantized checkpoint: from the embedding.
            seen.add("lm_head")
            yield from quantize(values, "int4", 32).to_checkpoint("lm_head").items()
        seen.add(hf)
        yield hf, values.to(dtype)
    missing = [n for n in expected if n not in seen and n.rsplit(".", 1)[0] not in seen]
    if missing:
        raise GGUFError(f"{source.path}: missing tensor {missing[0]} (of {len(missing)})")


def _check_shape(source: GGUFFile, name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise GGUFError(f"{source.path}: tensor {name} has shape {tuple(shape)}, expected {expected} from the metadata")
