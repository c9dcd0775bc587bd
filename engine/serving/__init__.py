"""The engine's OpenAI-compatible HTTP server (`pilot serve`)."""

from engine.serving.api_server import RunningServer, ServerSettings, build_app, launch, serve, start_server
from engine.serving.async_engine import AsyncLLMEngine, EngineDeadError, EngineOverloadedError
from engine.serving.chat_template import ChatTemplate

__all__ = ["AsyncLLMEngine", "ChatTemplate", "EngineDeadError", "EngineOverloadedError", "RunningServer",
           "ServerSettings", "build_app", "launch", "serve", "start_server"]
