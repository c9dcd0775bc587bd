"""How each serving engine schedules a step, as far as the engine's own `Scheduler` can follow.

vLLM and TensorRT-LLM put prefill chunks into decode steps. SGLang does so only with
`--enable-mixed-chunk`, which it drops under speculative decoding and which means nothing
without chunked prefill; otherwise it runs a step of prefills or a step of decodes, prefills
first (`SchedulerConfig.prefill_first`). The exported commands and the predictions both read
the rule here, so the plan's prediction is for the schedule its command starts."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.scheduler import SchedulerConfig


def sglang_mixes_chunks(config: EngineConfig) -> bool:
    """Whether SGLang started for `config` gets `--enable-mixed-chunk`."""
    return config.enable_chunked_prefill and config.speculative_model is None


def prefill_first(backend: str, config: EngineConfig | None = None) -> bool:
    """Whether `backend` runs prefill-only steps ahead of decodes; `config` None: its defaults."""
    if backend != "sglang":
        return False
    return config is None or not sglang_mixes_chunks(config)


def scheduler_config(backend: str, config: EngineConfig, max_model_len: int) -> SchedulerConfig:
    """The engine scheduler set the way `backend` serves `config`."""
    scheduler = SchedulerConfig.for_engine(config, max_model_len)
    scheduler.prefill_first = prefill_first(backend, config)
    return scheduler
