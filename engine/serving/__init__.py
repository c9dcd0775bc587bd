"""The engine's OpenAI-compatible HTTP server (`pilot serve`)."""

from engine.serving.api_server import RunningServer, ServerSettings, build_app, launch, serve, start_server
from engine.serving.async_engine import AsyncLLMEngine, EngineDeadError, EngineOverloadedError

__all__ = ["AsyncLLMEngine", "EngineDeadError", "EngineOverloadedError", "RunningServer",
           "ServerSettings", "build_app", "launch", "serve", "start_server"]
