"""Load a Hugging Face layout directory (safetensors only) into the engine's model."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.model_config import CheckpointError, ModelConfig
from engine.models.llama import LlamaForCausalLM, checkpoint_shapes, linear_shapes
from engine.parallel.distributed import TensorParallel
from engine.quantization import DEFAULT_GROUP_SIZE, QuantizedWeight, quantize
from engine.rules import check_scheme

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def safetensors_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the file that holds it."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path}: not a safetensors index ({err!r})") from err
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: weight_map must be a JSON object")
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for fname in sorted(set(weight_map.values())):
            if not (model_dir / fname).is_file():
                raise CheckpointError(f"missing file: {model_dir / fname} (listed in {index_path})")
            held = set(_tensor_names(model_dir / fname))
            for name, listed in weight_map.items():
                if listed == fname and name not in held:
                    raise CheckpointError(f"{index_path}: {name} is listed in {fname}, which does not hold it")
        return files
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        other = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = f"; found {', '.join(other)}, but only safetensors are loaded" if other else ""
        raise CheckpointError(f"missing file: {single} (or {INDEX_FILE}){hint}")
    return {name: single for name in _tensor_names(single)}


def open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def _tensor_names(path: Path) -> list[str]:
    with open_safetensors(path) as f:
        return list(f.keys())


def load_model(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
               max_positions: int, quantization: str | None = None,
               group_size: int = DEFAULT_GROUP_SIZE, tp: TensorParallel = TensorParallel(),
               portable: bool = False) -> LlamaForCausalLM:
    """Build the model and load its weights (this rank's shard of them under tensor
    parallelism). `quantization` ("int8" | "int4") quantizes a float checkpoint's linear layers
    at load, each whole before it is sharded, so every shard holds exactly the weights a single
    process would; a pre-quantized checkpoint loads as it was written. `portable` keeps every
    linear layer in PyTorch's own layouts, so that torch.compile can trace the model."""
    model_dir = Path(model_dir)
    config.require_runnable(str(model_dir / "config.json"))  # a plannable-only architecture
    if config.quantization is not None and quantization not in (None, config.quantization[0]):
        raise CheckpointError(f"{model_dir} is quantized as {config.quantization[0]}; "
                              f"quantization={quantization!r} asks for another scheme")
    files = safetensors_files(model_dir)
    try:
        expected = checkpoint_shapes(config)
    except ValueError as err:
        raise CheckpointError(f"{model_dir}: {err}") from err
    missing = [name for name in expected if name not in files]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{model_dir}: missing tensor {', '.join(missing[:3])}{more}")

    with torch.device(device):
        model = LlamaForCausalLM(config, max_positions, dtype, tp, portable)
    model.to(dtype)
    with ExitStack() as stack:
        handles = {path: stack.enter_context(open_safetensors(path)) for path in set(files.values())}

        def raw(name: str) -> torch.Tensor:
            if name not in expected:
                raise CheckpointError(f"{model_dir}: unexpected tensor requested: {name}")
            try:
                tensor = handles[files[name]].get_tensor(name)
            except SafetensorError as err:
                raise CheckpointError(f"{files[name]}: cannot read tensor {name} ({err})") from err
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(
                    f"{model_dir}: tensor {name} has shape {tuple(tensor.shape)}, "
                    f"expected {expected[name]} from config.json")
            integer = name.endswith(".qweight")
            if integer != (not tensor.is_floating_point()):
                raise CheckpointError(f"{model_dir}: tensor {name} has dtype {tensor.dtype}, "
                                      f"expected {'an 8-bit integer' if integer else 'a float'}")
            return tensor

        def get(name: str) -> torch.Tensor:
            return raw(name).to(device=device, dtype=dtype)

        linears = linear_shapes(config)

        def get_linear(prefix: str) -> torch.Tensor | QuantizedWeight:
            if config.quantization is None:
                tied = prefix == "lm_head" and config.tie_word_embeddings
                weight = get("model.embed_tokens.weight" if tied else prefix + ".weight")
                if quantization is None:
                    return weight
                try:
                    return quantize(weight, quantization, group_size)
                except ValueError as err:
                    raise ValueError(f"{err} (quantizing {model_dir})") from err
            method, stored_group = config.quantization
            bits, group = check_scheme(method, stored_group, linears[prefix][1])
            mins = raw(prefix + ".mins") if bits == 4 else None
            return QuantizedWeight.from_checkpoint(raw(prefix + ".qweight"), raw(prefix + ".scales"),
                                                   mins, bits, group)

        model.load_hf_weights(get, get_linear)
    for module in model.modules():
        if hasattr(module, "pack"):
            module.pack()
    return model.eval()
