"""pilot's inference engine. Never imports the planner.

The package is lazy (PEP 562): `import engine.scheduler` loads the scheduler and what it needs,
not torch or the model code; each name below is imported from its module on first use.

The planner uses the engine through these modules only, and nothing deeper:

- `engine` (this package: the names in `__all__`)
- `engine.config`, `engine.model_config`
- `engine.scheduler`, `engine.block_manager`, `engine.sequence`, `engine.sampling_params`,
  `engine.observer`
- `engine.rules` (the rules the planner predicts by: attention paths, KV blocks, drafts,
  sharding and quantization schemes)
- `engine.device`, `engine.model_zoo`, `engine.quantize_checkpoint`, `engine.serving`

`engine.config`, `engine.model_config`, `engine.scheduler`, `engine.block_manager`,
`engine.sequence`, `engine.sampling_params`, `engine.observer` and `engine.rules` import
without torch.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.layers.linear import Linear
    from engine.layers.rotary import rope_inv_freq
    from engine.llm import LLM
    from engine.llm_engine import InvalidRequestError, LLMEngine
    from engine.loader import safetensors_files
    from engine.models.llama import checkpoint_shapes
    from engine.observer import StepStats
    from engine.parallel.data_parallel import replica_configs
    from engine.sampling_params import SamplingParams
    from engine.sequence import RequestMetrics, RequestOutput, StreamToken

# Exported name -> the module that defines it.
_EXPORTS = {
    "EngineConfig": "engine.config",
    "InvalidRequestError": "engine.llm_engine",
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "RequestMetrics": "engine.sequence",
    "RequestOutput": "engine.sequence",
    "SamplingParams": "engine.sampling_params",
    "StepStats": "engine.observer",
    "StreamToken": "engine.sequence",
    # What the planner needs from deeper in the engine.
    "Linear": "engine.layers.linear",
    "checkpoint_shapes": "engine.models.llama",
    "replica_configs": "engine.parallel.data_parallel",
    "rope_inv_freq": "engine.layers.rotary",
    "safetensors_files": "engine.loader",  # whether a directory holds weights to launch
}

__all__ = [
    "EngineConfig", "InvalidRequestError", "LLM", "LLMEngine", "RequestMetrics", "RequestOutput",
    "SamplingParams", "StepStats", "StreamToken",
    "Linear", "checkpoint_shapes", "replica_configs", "rope_inv_freq", "safetensors_files",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
