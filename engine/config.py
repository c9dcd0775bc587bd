"""`EngineConfig`: the engine's settings, and the schema of the serving config file.

Field names follow vLLM's where one exists, so a plan written by the planner reads like a vLLM
command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DType = Literal["auto", "float32", "bfloat16", "float16"]


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(description="Hugging Face layout directory: config.json + *.safetensors")
    tokenizer: str | None = Field(None, description="directory with tokenizer.json; default: model")
    dtype: DType = "auto"
    device: str = Field("auto", description="'cpu', 'cuda', 'cuda:N' or 'auto'")
    seed: int = 0

    max_model_len: int | None = Field(None, gt=0, description="default: the model's context length")
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int = Field(2048, gt=0)
    block_size: int = Field(16, gt=0)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"

    kv_cache_memory_bytes: int | None = Field(
        None, gt=0, description="KV-cache budget in bytes; default: derived from free memory"
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    num_kv_blocks: int | None = Field(
        None, gt=0, description="exact number of KV blocks; overrides the memory budget"
    )
    num_threads: int | None = Field(None, gt=0, description="CPU threads; default: the CPUs this process "
                                                            "may use (affinity, a container's CPU quota)")

    quantization: Literal["int8", "int4", "fp8"] | None = Field(
        None, description="weight-only: int8 per output channel, int4 in groups; default: as the "
                          "checkpoint (a directory from `pilot models quantize`) or none. fp8 "
                          "(weights and activations) is for plans served by vLLM or SGLang on GPUs")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="fp8: one byte a cached key or value (plans served by vLLM or SGLang)")
    quantization_group_size: int = Field(
        128, gt=0, description="int4: input features sharing one scale and min")
    speculative_model: str | None = Field(
        None, description="draft model directory (same tokenizer) for speculative decoding")
    num_speculative_tokens: int | None = Field(None, gt=0, description="drafts verified per step")
    data_parallel_size: int = Field(
        1, gt=0, description="independent engine replicas behind one front, threads divided")
    torch_compile: bool = Field(
        False, description="run decode steps through torch.compile (Inductor) in place of the "
                           "engine's own CPU kernels; prefill steps stay eager")
    tensor_parallel_size: int = Field(
        1, gt=0, description="ranks each holding a shard of every layer (torch.distributed: gloo on "
                             "the CPU, NCCL on CUDA); must divide the heads, KV heads and MLP width")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_speculative(self) -> "EngineConfig":
        if (self.speculative_model is None) != (self.num_speculative_tokens is None):
            raise ValueError(
                "speculative_model and num_speculative_tokens must be set together "
                f"(got speculative_model={self.speculative_model!r}, "
                f"num_speculative_tokens={self.num_speculative_tokens!r})"
            )
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> "EngineConfig":
        """Load YAML or JSON. A plan file keeps the engine settings under an `engine:` key."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
        if "engine" in data and isinstance(data["engine"], dict):
            data = data["engine"]
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
