"""`pilot generate`: stream one completion from the engine to the terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from planner.cli._common import console, fail_error, resolve_model_option


def generate(
    model: Path = typer.Option(..., "--model", callback=resolve_model_option,
                               help="model directory (Hugging Face layout), .gguf file, or a name "
                                    "from `pilot models list`"),
    prompt: str = typer.Option(..., "--prompt", help="prompt text"),
    max_tokens: int = typer.Option(64, "--max-tokens"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_k: int = typer.Option(-1, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, help="per-request sampling seed"),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos"),
    quantization: Optional[str] = typer.Option(None, help="int8 or int4 weight-only"),
    speculative_model: Optional[Path] = typer.Option(None, "--speculative-model",
                                                     help="draft model directory"),
    num_speculative_tokens: int = typer.Option(4, "--num-speculative-tokens",
                                               help="drafts per step, with --speculative-model"),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="ranks per replica"),
    data_parallel_size: int = typer.Option(1, "--data-parallel-size", help="engine replicas"),
    torch_compile: bool = typer.Option(False, "--torch-compile", help="compile the decode step"),
) -> None:
    """Stream a completion to the terminal."""
    from pydantic import ValidationError

    from engine import LLM, EngineConfig, SamplingParams
    from engine.model_config import CheckpointError

    try:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                max_tokens=max_tokens, ignore_eos=ignore_eos)
        spec = ({} if speculative_model is None else
                {"speculative_model": str(speculative_model), "num_speculative_tokens": num_speculative_tokens})
        with console.status(f"loading {model}"):
            llm = LLM(EngineConfig(model=str(model), dtype=dtype, device=device,
                                   quantization=quantization, tensor_parallel_size=tensor_parallel_size,
                                   data_parallel_size=data_parallel_size, torch_compile=torch_compile,
                                   **spec))
        last = None
        with llm:
            for token in llm.stream(prompt, params):
                sys.stdout.write(token.text)
                sys.stdout.flush()
                last = token
    except (ValueError, ValidationError, CheckpointError, NotImplementedError) as err:
        fail_error(err)
    sys.stdout.write("\n")
    if last is not None:
        console.print(f"[dim]finish_reason={last.finish_reason}[/dim]")
