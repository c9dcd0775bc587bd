"""The engine core in a process of its own, and the front that talks to it.

`engine_core` runs one `LLMEngine` (scheduling and the model) in a child process and sends one
message per step carrying every request's new tokens; `client` starts one core per data-parallel
replica, tokenizes and validates requests, routes them, and turns the tokens back into text. The
server's event loop reads the cores directly, so HTTP, tokenization and detokenization never wait
on a step and a step never waits on them (the split vLLM's v1 engine makes).
"""

from engine.core.client import EngineCoreClient, EngineCoreDiedError

__all__ = ["EngineCoreClient", "EngineCoreDiedError"]
