"""`pilot serve`: launch the engine a plan (or a bare engine config) describes, behind the
OpenAI-compatible HTTP server."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from planner.cli._common import console, fail

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def load_serving_config(path: Path) -> tuple[Any, dict]:
    """The engine config in `path`, and the plan's other fields (empty for a bare config).
    Raises ValueError naming the file and the field."""
    from pydantic import ValidationError

    from engine import EngineConfig

    if not path.is_file():
        raise ValueError(f"--config: no such file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"--config: {path} is not valid YAML/JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of engine fields or a plan")
    try:
        config = EngineConfig.from_file(path)
    except ValidationError as err:
        where = "engine." if isinstance(data.get("engine"), dict) else ""
        problems = "; ".join(f"{where}{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}"
                             + (f" (got {e['input']!r})" if "input" in e and e["loc"] else "")
                             for e in err.errors())
        raise ValueError(f"--config {path}: {problems}") from None
    plan = {k: v for k, v in data.items() if k != "engine"} if isinstance(data.get("engine"), dict) else {}
    return config, plan


def serve(
    config: Path = typer.Option(..., "--config", help="a plan from `pilot recommend`, or an engine "
                                                      "config file (YAML or JSON)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; loopback unless you mean otherwise"),
    port: int = typer.Option(8000, help="TCP port; 0 picks a free one"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PILOT_API_KEY",
                                          help="require 'Authorization: Bearer KEY' on /v1/*"),
    served_model_name: list[str] = typer.Option([], "--served-model-name",
                                                help="name clients send as `model` (repeatable); "
                                                     "default: the model path"),
    max_waiting_requests: int = typer.Option(256, "--max-waiting-requests",
                                             help="requests queued beyond the running batch; past "
                                                  "it, 429 with Retry-After"),
    max_body_bytes: int = typer.Option(4 * 1024 * 1024, "--max-body-bytes",
                                       help="largest request body accepted (413 past it)"),
    max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens",
                                                    help="longest prompt accepted; default: the "
                                                         "model's context length"),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template",
                                                 help="Jinja chat template; default: the model's own"),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
) -> None:
    """Serve a plan: OpenAI-compatible /v1/completions, /v1/chat/completions, /v1/models, plus
    /health and /metrics (Prometheus). Ctrl-C stops it."""
    from engine.model_config import CheckpointError
    from engine.serving import ServerSettings
    from engine.serving import serve as run_server

    if not 0 <= port <= 65535:
        fail(f"--port must be 0..65535, got {port}")
    if chat_template is not None and not chat_template.is_file():
        fail(f"--chat-template: no such file: {chat_template}")
    try:
        engine_config, plan = load_serving_config(config)
        settings = ServerSettings(
            host=host, port=port, api_key=api_key, served_model_names=list(served_model_name),
            max_waiting_requests=max_waiting_requests, max_body_bytes=max_body_bytes,
            max_prompt_tokens=max_prompt_tokens,
            chat_template=str(chat_template) if chat_template else None, log_level=log_level)
    except ValueError as err:
        fail(str(err).replace("max_waiting_requests", "--max-waiting-requests")
              .replace("max_body_bytes", "--max-body-bytes")
              .replace("max_prompt_tokens", "--max-prompt-tokens").replace("api_key", "--api-key"))
    _describe(engine_config, plan, settings)
    console.print(f"loading {engine_config.model} ...")
    try:
        run_server(engine_config, settings, on_ready=_ready)
    except (CheckpointError, ValueError, RuntimeError, OSError) as err:
        fail(f"{type(err).__name__}: {err}")


def _ready(url: str) -> None:
    # Printed on stdout and flushed: scripts and tests wait for this line.
    print(f"serving on {url}  (OpenAI base URL: {url}/v1; /health, /metrics)", flush=True)


def _describe(config: Any, plan: dict, settings: Any) -> None:
    if plan.get("replicas", 1) > 1:
        console.print(f"[yellow]note:[/yellow] the plan asks for {plan['replicas']} replicas; this "
                      "process serves one. Start one `pilot serve` per replica (each on its own "
                      "devices and port) behind a load balancer.")
    hardware = (plan.get("hardware") or {}).get("name")
    if hardware:
        console.print(f"plan for {hardware}: {config.model}, max_num_seqs={config.max_num_seqs}, "
                      f"quantization={config.quantization or 'none'}, "
                      f"tp={config.tensor_parallel_size}, dp={config.data_parallel_size}")
    if settings.host not in LOOPBACK and settings.api_key is None:
        console.print(f"[yellow]warning:[/yellow] listening on {settings.host} without --api-key: "
                      "anyone who can reach this port can use the model")
