"""pilot's inference engine. Never imports the planner."""

from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import InvalidRequestError, LLMEngine
from engine.observer import StepStats
from engine.sampling_params import SamplingParams
from engine.sequence import RequestMetrics, RequestOutput, StreamToken

__all__ = [
    "EngineConfig", "InvalidRequestError", "LLM", "LLMEngine", "RequestMetrics", "RequestOutput",
    "SamplingParams", "StepStats", "StreamToken",
]
