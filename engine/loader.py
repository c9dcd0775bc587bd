"""Load a Hugging Face layout directory (safetensors only) into the engine's model."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.model_config import CheckpointError, ModelConfig
from engine.models.llama import LlamaForCausalLM, checkpoint_shapes

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


def _open(path: Path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def _tensor_names(path: Path) -> list[str]:
    with _open(path) as f:
        return list(f.keys())


def load_model(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
               max_positions: int) -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    files = safetensors_files(model_dir)
    expected = checkpoint_shapes(config)
    missing = [name for name in expected if name not in files]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{model_dir}: missing tensor {', '.join(missing[:3])}{more}")

    with torch.device(device):
        model = LlamaForCausalLM(config, max_positions, dtype)
    model.to(dtype)
    with ExitStack() as stack:
        handles = {path: stack.enter_context(_open(path)) for path in set(files.values())}

        def get(name: str) -> torch.Tensor:
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
            if not tensor.is_floating_point():
                raise CheckpointError(f"{model_dir}: tensor {name} has dtype {tensor.dtype}, expected a float")
            return tensor.to(device=device, dtype=dtype)

        model.load_hf_weights(get)
    for module in model.modules():
        if hasattr(module, "pack"):
            module.pack()
    return model.eval()
