"""The architecture of a checkpoint, read from its Hugging Face `config.json`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The architectures the engine builds and loads (engine/models/llama.py).
ENGINE_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")
# The ones the planner can price: a plan needs only config.json's shapes, so an architecture
# whose layers the roofline covers is plannable before the engine runs it (Qwen3 adds per-head
# q/k norms, too small to cost anything, but which the engine does not implement).
PLANNABLE_MODEL_TYPES = (*ENGINE_MODEL_TYPES, "qwen3")
# What every config.json must give, each a positive integer; the other fields have defaults.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings")
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
    def runnable(self) -> bool:
        """Whether the engine can build this architecture; the others are for planning only."""
        return self.model_type in ENGINE_MODEL_TYPES

    def require_runnable(self, source: str) -> ModelConfig:
        """This config, or a CheckpointError naming `source` and its model_type where the
        engine cannot build the model (every engine entry point asks before loading)."""
        if not self.runnable:
            raise CheckpointError(
                f"{source}: model_type {self.model_type!r} can be planned from its config.json, but "
                f"the engine cannot run it yet; the engine runs: {', '.join(ENGINE_MODEL_TYPES)}")
        return self

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Read a config.json's fields: any model_type in PLANNABLE_MODEL_TYPES (the engine
        checks `runnable` before it builds one); a missing or unusable field is a
        CheckpointError naming it and `source`."""
        model_type = cfg.get("model_type")
        if model_type not in PLANNABLE_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: unsupported model_type {model_type!r}; "
                f"supported: {', '.join(PLANNABLE_MODEL_TYPES)}"
            )
        for key in SIZE_FIELDS:
            _int_field(cfg, key, source)
        heads = cfg["num_attention_heads"]
        # Absent (or null) in older configs: one KV head per query head (no grouping).
        kv_heads = _int_field(cfg, "num_key_value_heads", source, default=heads)
        if heads % kv_heads:
            raise CheckpointError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        # An explicit head_dim may make the query width differ from hidden_size (Qwen3-32B:
        # 64 x 128 = 8192 against 5120); without one, the heads split hidden_size evenly.
        head_dim = _int_field(cfg, "head_dim", source, default=0)
        if not head_dim:
            if cfg["hidden_size"] % heads:
                raise CheckpointError(
                    f"{source}: hidden_size={cfg['hidden_size']} is not a multiple of "
                    f"num_attention_heads={heads}, and there is no head_dim to say how wide a head is")
            head_dim = cfg["hidden_size"] // heads
        rope_scaling = cfg.get("rope_scaling") or None
        if rope_scaling is not None and not isinstance(rope_scaling, dict):
            raise CheckpointError(f"{source}: rope_scaling must be a JSON object or null, got {rope_scaling!r}")
        # transformers 5 moved rope settings into `rope_parameters`.
        rope_params = cfg.get("rope_parameters") or {}
        if not isinstance(rope_params, dict):
            raise CheckpointError(f"{source}: rope_parameters must be a JSON object, got {rope_params!r}")
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
            rms_norm_eps=_positive_number(cfg, "rms_norm_eps", source, default=1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias; Llama declares it with `attention_bias`.
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=rope_scaling,
            num_local_experts=_int_field(cfg, "num_local_experts", source, default=0, least=0),
            num_experts_per_tok=_int_field(cfg, "num_experts_per_tok", source, default=0, least=0),
            bos_token_id=_int_field(cfg, "bos_token_id", source, default=None, least=0),
            eos_token_ids=_token_ids(cfg, "eos_token_id", source),
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

    @classmethod
    def for_engine(cls, model_dir: str | Path) -> ModelConfig:
        """`from_dir` for a model the engine will build: a plannable-only type is refused."""
        return cls.from_dir(model_dir).require_runnable(str(Path(model_dir) / "config.json"))


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
    # Qwen2 and Qwen3 keep a sliding_window that only use_sliding_window switches on.
    if cfg.get("model_type") in ("qwen2", "qwen3") and (
            not cfg.get("use_sliding_window")
            or (cfg.get("max_window_layers") or 0) >= cfg["num_hidden_layers"]):
        return None
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


_REQUIRED = object()


def _int_field(cfg: dict[str, Any], key: str, source: str, default: Any = _REQUIRED,
               least: int = 1) -> Any:
    """cfg[key], an integer >= `least`; `default` where it is absent or null, if one is given."""
    value = cfg.get(key)
    if value is None and default is not _REQUIRED:
        return default
    what = "a positive integer" if least == 1 else f"an integer >= {least}"
    if key not in cfg:
        raise CheckpointError(f"{source}: missing field {key} ({what})")
    # JSON true is an int to Python; a config that says `"hidden_size": true` is broken.
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise CheckpointError(f"{source}: {key} must be {what}, got {value!r}")
    return value


def _positive_number(cfg: dict[str, Any], key: str, source: str, default: float) -> float:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise CheckpointError(f"{source}: {key} must be a positive number, got {value!r}")
    return float(value)


def _token_ids(cfg: dict[str, Any], key: str, source: str) -> tuple[int, ...]:
    """A token id or a list of them (Llama 3.1 ends on any of three)."""
    value = cfg.get(key)
    values = [] if value is None else value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise CheckpointError(f"{source}: {key} must be a token id or a list of them, got {value!r}")
    return tuple(values)
