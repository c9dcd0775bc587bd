"""`pilot models make|quantize|train|import|export|pull|list`: checkpoints to serve, profile and benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from planner.cli._common import console, fail, fail_error, resolve_model_option

app = typer.Typer(no_args_is_help=True, help="Make and inspect model checkpoints.")


@app.command("make")
def models_make(
    shape: str = typer.Argument(..., help="named shape (tiny, llama-110m, qwen2.5-0.5b, llama-3.2-1b, "
                                          "mixtral-tiny) or a JSON file of config fields"),
    out: Path = typer.Option(..., "--out", help="directory to write config.json + safetensors into"),
    seed: int = typer.Option(0, help="random seed for the weights"),
    dtype: str = typer.Option("bfloat16", help="float32, bfloat16 or float16"),
) -> None:
    """Write a seeded random-init checkpoint in Hugging Face layout."""
    from engine.model_config import CheckpointError
    from engine.model_zoo import make_checkpoint

    try:
        with console.status(f"writing {shape} to {out}"):
            path = make_checkpoint(shape, out, seed=seed, dtype=dtype)
    except (CheckpointError, ValueError) as err:
        fail_error(err)
    console.print(f"wrote {shape} checkpoint to {path}")


@app.command("quantize")
def models_quantize(
    model: Path = typer.Option(..., "--model", help="float checkpoint directory"),
    out: Path = typer.Option(..., "--out", help="directory for the quantized copy"),
    method: str = typer.Option("int8", help="int8 (per output channel) or int4 (grouped)"),
    group_size: int = typer.Option(128, help="int4: input features per scale and min"),
) -> None:
    """Write a weight-only quantized copy of a checkpoint, which the engine loads as it is."""
    from engine.model_config import CheckpointError
    from engine.quantize_checkpoint import quantize_checkpoint

    try:
        with console.status(f"quantizing {model} to {method}"):
            path = quantize_checkpoint(model, out, method, group_size)
    except (CheckpointError, ValueError) as err:
        fail_error(err)
    console.print(f"wrote {method} checkpoint to {path}")


@app.command("train")
def models_train(
    out: Path = typer.Option(..., "--out", help="directory; the pair goes to OUT/target and OUT/draft"),
    seconds: float = typer.Option(300.0, help="wall-clock training budget for both models"),
    seed: int = typer.Option(0, help="random seed"),
) -> None:
    """Train a byte-level target and a much smaller draft on the Python standard library's source."""
    from planner.bench.training import train_pair

    if seconds <= 0:
        fail(f"seconds must be positive, got {seconds}")
    try:
        target, draft = train_pair(out, seconds=seconds, seed=seed)
    except (OSError, ValueError) as err:
        fail_error(err)
    for name, result in (("target", target), ("draft", draft)):
        console.print(f"{name}: {result.steps} steps in {result.seconds:.0f} s, "
                      f"loss {result.final_loss:.3f} nats/byte -> {result.path}")


@app.command("import")
def models_import(
    gguf: Path = typer.Argument(..., help="a GGUF file (llama.cpp's format)"),
    out: Path = typer.Option(..., "--out", help="directory to write the Hugging Face layout into"),
    dtype: str = typer.Option("bfloat16", help="float32, bfloat16 or float16 for the dequantized weights"),
    keep_quantized: bool = typer.Option(False, "--keep-quantized", help="keep Q4_0/Q4_1 matrices as "
                                        "they are, as the engine's int4 in groups of 32 (a file of "
                                        "other matrix types is refused)"),
) -> None:
    """Import a GGUF file: its weights (dequantized, or with --keep-quantized its 4-bit blocks as
    int4), tokenizer and chat template, in the layout the engine loads."""
    from engine.gguf import import_gguf
    from engine.model_config import CheckpointError

    try:
        with console.status(f"importing {gguf}"):
            path = import_gguf(gguf, out, dtype, keep_quantized=keep_quantized)
    except (CheckpointError, ValueError) as err:
        fail_error(err)
    console.print(f"imported {gguf} to {path}")


@app.command("export")
def models_export(
    model: Path = typer.Option(..., "--model", callback=resolve_model_option,
                               help="a float llama or qwen2 model (directory, .gguf or name)"),
    out: Path = typer.Option(..., "--out", help="the GGUF file to write"),
    qtype: str = typer.Option("BF16", "--qtype", help="F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1"),
) -> None:
    """Write a model as a GGUF file that llama.cpp runs (the same weights the engine runs)."""
    from engine.gguf import GGUFError, export_gguf

    try:
        with console.status(f"exporting {model} as {qtype}"):
            path = export_gguf(model, out, qtype)
    except (GGUFError, ValueError) as err:
        fail_error(err)
    console.print(f"wrote {path}")


@app.command("pull")
def models_pull(
    name: str = typer.Argument(..., help="a name from `pilot models list`, or ORG/NAME on the Hugging Face hub"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="default: $PILOT_MODEL_CACHE or "
                                             "~/.cache/pilot/models"),
) -> None:
    """Fetch a pretrained model into the cache; `--model NAME` then works wherever a model
    directory does."""
    from engine.hub import PullError, pull

    try:
        with console.status(f"pulling {name}") as status:
            path = pull(name, cache_dir, say=lambda message: status.update(message))
    except PullError as err:
        fail(str(err))
    console.print(f"{name}: {path}")


@app.command("list")
def models_list() -> None:
    """Named shapes that `pilot models make` knows, and pretrained models `pilot models pull` knows."""
    from engine.hub import CATALOG, cache_dir
    from engine.model_zoo import SHAPES

    print("shapes (pilot models make SHAPE --out DIR; random weights):")
    for name, cfg in SHAPES.items():
        print(f"  {name:14s} {cfg['model_type']:8s} hidden={cfg['hidden_size']} layers={cfg['num_hidden_layers']} "
              f"heads={cfg['num_attention_heads']}/{cfg['num_key_value_heads']} vocab={cfg['vocab_size']}")
    print(f"pretrained (pilot models pull NAME, or --model NAME; cache {cache_dir()}):")
    for name, model in CATALOG.items():
        state = "pulled" if (cache_dir() / name / "config.json").is_file() else f"{model.size_mb} MB download"
        print(f"  {name:20s} {model.licence:22s} {state:18s} {model.description}")
