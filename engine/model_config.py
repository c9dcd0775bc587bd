"""The architecture of a checkpoint, read from its Hugging Face `config.json`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ROPE_REQUIRED_FIELDS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file or tensor."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    # A pre-quantized checkpoint (`pilot models quantize`): ("int8" | "int4", group size).
    quantization: tuple[str, int] | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: unsupported model_type {model_type!r}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings"):
            if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
                raise CheckpointError(f"{source}: {key} must be a positive integer, got {cfg.get(key)!r}")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise CheckpointError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        rope_scaling = cfg.get("rope_scaling") or None
        # transformers 5 moved rope settings into `rope_parameters`.
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or rope_theta <= 0:
            raise CheckpointError(f"{source}: rope_theta must be a positive number, got {rope_theta!r}")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        max_positions = cfg["max_position_embeddings"]
        window = _sliding_window(cfg)
        if window is not None and window < max_positions:
            # Sliding-window attention is not implemented; within the window, full attention is
            # exactly what the model computes, so the context is capped there.
            logger.warning("%s: sliding_window=%d: context capped at %d tokens", source, window, window)
            max_positions = window
        config = cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias; Llama declares it with `attention_bias`.
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=rope_scaling,
            num_local_experts=int(cfg.get("num_local_experts", 0) or 0),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0) or 0),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_tuple(cfg.get("eos_token_id")),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            quantization=_quantization(cfg.get("quantization_config"), source),
            raw=dict(cfg),
        )
        if config.rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointError(
                f"{source}: unsupported rope_scaling type {config.rope_type!r}; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        missing = [k for k in ROPE_REQUIRED_FIELDS.get(config.rope_type, ())
                   if isinstance(config.rope_scaling.get(k), bool)
                   or not isinstance(config.rope_scaling.get(k), (int, float))]
        if missing:
            raise CheckpointError(
                f"{source}: rope_scaling type {config.rope_type!r} needs numeric {', '.join(missing)}")
        if config.is_moe and not 0 < config.num_experts_per_tok <= config.num_local_experts:
            raise CheckpointError(
                f"{source}: num_experts_per_tok={config.num_experts_per_tok} must be in "
                f"1..num_local_experts={config.num_local_experts}"
            )
        return config

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise CheckpointError(f"model directory not found: {model_dir}")
        if not path.is_file():
            raise CheckpointError(f"missing file: {path}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
        return cls.from_dict(cfg, source=str(path))


def _quantization(spec: Any, source: str) -> tuple[str, int] | None:
    if spec is None:
        return None
    method = spec.get("quant_method") if isinstance(spec, dict) else None
    if method != "pilot":
        raise CheckpointError(f"{source}: unsupported quantization_config quant_method {method!r}; "
                              "only checkpoints written by `pilot models quantize` ('pilot') load")
    bits, group = spec.get("bits"), spec.get("group_size")
    if bits not in (4, 8) or not isinstance(group, int) or group <= 0:
        raise CheckpointError(f"{source}: quantization_config needs bits 4 or 8 and a positive "
                              f"group_size, got bits={bits!r}, group_size={group!r}")
    return f"int{bits}", group


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    window = cfg.get("sliding_window")
    if cfg.get("model_type") == "qwen2" and (
            not cfg.get("use_sliding_window")
            or cfg.get("max_window_layers", 0) >= cfg["num_hidden_layers"]):
        return None
    return int(window) if isinstance(window, int) and window > 0 else None


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
