"""`pilot models quantize`: write a pre-quantized copy of a float checkpoint.

The copy keeps the Hugging Face layout: config.json gains a `quantization_config`
({"quant_method": "pilot", "bits": 8 | 4, "group_size": G}), every quantizable linear weight
`X.weight` becomes `X.qweight` (int8; int4 two to a byte along the inputs, low nibble first),
`X.scales` and, for int4, `X.mins` (float32, one per output row and group); everything else is
copied as it was. The engine loads it without re-quantizing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from engine.loader import open_safetensors, safetensors_files
from engine.model_config import CheckpointError, ModelConfig
from engine.model_zoo import write_checkpoint
from engine.models.llama import checkpoint_shapes, linear_shapes
from engine.quantization import CHECKPOINT_FORMAT, quantize
from engine.rules import METHODS, check_scheme

# Files beside the weights that a quantized copy keeps.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def quantize_checkpoint(model: str | Path, out: str | Path, method: str, group_size: int = 128) -> Path:
    model, out = Path(model), Path(out)
    if method not in METHODS:
        raise ValueError(f"method: unknown quantization {method!r}; choose from {', '.join(METHODS)}")
    config = ModelConfig.for_engine(model)
    if config.quantization is not None:
        raise CheckpointError(f"{model} is already quantized ({config.quantization[0]})")
    if out.resolve() == model.resolve():
        raise ValueError(f"out: {out} is the source directory; write the quantized copy elsewhere")
    linears = linear_shapes(config)
    for prefix, (_, in_features) in linears.items():
        try:
            check_scheme(method, group_size, in_features)
        except ValueError as err:
            raise ValueError(f"{err} ({prefix})") from err
    expected = checkpoint_shapes(config)
    files = safetensors_files(model)
    missing = [name for name in expected if name not in files]
    if missing:
        raise CheckpointError(f"{model}: missing tensor {missing[0]}")

    with ExitStack() as stack:
        handles = {path: stack.enter_context(open_safetensors(path)) for path in set(files.values())}

        def read(name: str) -> torch.Tensor:
            tensor = handles[files[name]].get_tensor(name)
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(f"{model}: tensor {name} has shape {tuple(tensor.shape)}, "
                                      f"expected {expected[name]}")
            return tensor

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name in expected:
                prefix = name.removesuffix(".weight")
                if prefix not in linears:
                    yield name, read(name)
            for prefix in linears:
                source = ("model.embed_tokens.weight" if prefix == "lm_head" and config.tie_word_embeddings
                          else prefix + ".weight")
                yield from quantize(read(source), method, group_size).to_checkpoint(prefix).items()

        cfg = dict(config.raw)
        cfg["quantization_config"] = {"quant_method": CHECKPOINT_FORMAT, "bits": METHODS[method],
                                      "group_size": group_size}
        write_checkpoint(tensors(), cfg, out)
    for name in SIDE_FILES:
        if (model / name).is_file():
            shutil.copy2(model / name, out / name)
    return out
