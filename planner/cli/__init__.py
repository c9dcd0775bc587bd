"""`pilot`: a thin typer layer over library functions (the tests call those directly)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from planner.store.database import Store

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="pilot: profile, fit, recommend and serve LLM deployments.")
models_app = typer.Typer(no_args_is_help=True, help="Make and inspect model checkpoints.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratio tables.")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)


def _fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def open_store(db: str | None) -> Store:
    """The store at `--db`, or exit 2 naming the flag and the URL."""
    from planner.store.database import Store

    try:
        return Store(db)
    except ValueError as err:
        _fail(str(err))


@models_app.command("make")
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
        _fail(str(err))
    console.print(f"wrote {shape} checkpoint to {path}")


@models_app.command("quantize")
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
        _fail(str(err))
    console.print(f"wrote {method} checkpoint to {path}")


@models_app.command("train")
def models_train(
    out: Path = typer.Option(..., "--out", help="directory; the pair goes to OUT/target and OUT/draft"),
    seconds: float = typer.Option(300.0, help="wall-clock training budget for both models"),
    seed: int = typer.Option(0, help="random seed"),
) -> None:
    """Train a byte-level target and a much smaller draft on the Python standard library's source."""
    from planner.bench.training import train_pair

    if seconds <= 0:
        _fail(f"seconds must be positive, got {seconds}")
    try:
        target, draft = train_pair(out, seconds=seconds, seed=seed)
    except (OSError, ValueError) as err:
        _fail(str(err))
    for name, result in (("target", target), ("draft", draft)):
        console.print(f"{name}: {result.steps} steps in {result.seconds:.0f} s, "
                      f"loss {result.final_loss:.3f} nats/byte -> {result.path}")


@models_app.command("list")
def models_list() -> None:
    """Named shapes that `pilot models make` knows."""
    from engine.model_zoo import SHAPES

    for name, cfg in SHAPES.items():
        print(f"{name:14s} {cfg['model_type']:8s} hidden={cfg['hidden_size']} layers={cfg['num_hidden_layers']} "
              f"heads={cfg['num_attention_heads']}/{cfg['num_key_value_heads']} vocab={cfg['vocab_size']}")


@app.command()
def generate(
    model: Path = typer.Option(..., "--model", help="model directory (Hugging Face layout)"),
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
        _fail(str(err))
    sys.stdout.write("\n")
    if last is not None:
        console.print(f"[dim]finish_reason={last.finish_reason}[/dim]")


@bench_app.command("engine")
def bench_engine(
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint; default: make llama-110m"),
    dtypes: str = typer.Option("float32,bfloat16", help="comma-separated dtypes to measure"),
    decode_tokens: int = typer.Option(128, help="tokens generated in the batch-1 measurement"),
    num_requests: int = typer.Option(64, help="requests in the offline workload"),
    skip_hf: bool = typer.Option(False, "--skip-hf", help="do not run the transformers baseline"),
    out: Optional[Path] = typer.Option(None, help="also write the results as JSON here"),
) -> None:
    """Engine vs transformers: batch-1 decode, offline throughput, achieved bandwidth."""
    from engine.model_config import CheckpointError
    from planner.bench.engine import run_engine_benchmark

    try:
        run_engine_benchmark(model=model, dtypes=[d.strip() for d in dtypes.split(",") if d.strip()],
                             decode_tokens=decode_tokens, num_requests=num_requests,
                             with_hf=not skip_hf, json_out=out)
    except (ValueError, CheckpointError) as err:
        _fail(str(err))


@bench_app.command("knobs")
def bench_knobs(
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint; default: make llama-110m"),
    group_size: int = typer.Option(128, help="int4 group size"),
    decode_tokens: int = typer.Option(128, help="tokens generated per batch-1 run"),
    repeats: int = typer.Option(5, help="runs per engine (medians shown)"),
    pair: Optional[Path] = typer.Option(None, "--pair", help="`pilot models train` output for the "
                                        "speculative-decoding rows; default: train one (~5 min)"),
    skip_spec: bool = typer.Option(False, "--skip-spec", help="leave out speculative decoding"),
    skip_parallel: bool = typer.Option(False, "--skip-parallel",
                                       help="leave out data and tensor parallelism"),
    skip_compile: bool = typer.Option(False, "--skip-compile", help="leave out torch.compile"),
    num_requests: int = typer.Option(64, help="requests in the data-parallel offline workload"),
    out: Optional[Path] = typer.Option(None, help="also write the results as JSON here"),
) -> None:
    """What each serving knob does to speed here: int8/int4 against bf16 and speculative
    decoding against the target alone at batch 1; data-parallel replicas and tensor-parallel
    ranks against one process; torch.compile against the engine's kernels."""
    from engine.model_config import CheckpointError
    from planner.bench.knobs import run_knobs_benchmark

    try:
        run_knobs_benchmark(model=model, group_size=group_size, decode_tokens=decode_tokens,
                            repeats=repeats, json_out=out, pair=pair, with_spec=not skip_spec,
                            with_parallel=not skip_parallel, with_compile=not skip_compile,
                            num_requests=num_requests)
    except (ValueError, CheckpointError) as err:
        _fail(str(err))


@app.command()
def quickstart(
    workdir: Path = typer.Option(Path("pilot-quickstart"), help="where the model, store and plan go"),
    budget: str = typer.Option("45s", help="time for the profiling step"),
    slo: str = typer.Option("ttft_p95<=1s,itl_p95<=200ms", help="targets the plan must meet"),
    concurrency: int = typer.Option(4, help="clients in flight the plan must serve"),
) -> None:
    """The main job end to end on the built-in default: make a small model, profile it into a
    SQLite store in WORKDIR, fit the cost model, recommend a plan under example SLOs, launch the
    plan and verify it."""
    import yaml

    from engine import LLM, EngineConfig, SamplingParams
    from engine.model_zoo import make_checkpoint
    from planner.spec.search_space import SearchSpace

    model_dir = workdir / "models" / "tiny"
    console.rule("[bold]1/5 model")
    with console.status("making the built-in tiny model"):
        make_checkpoint("tiny", model_dir, seed=0, dtype="float32")
    llm = LLM(EngineConfig(model=str(model_dir), dtype="float32"))
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=48, ignore_eos=True)
    console.print(f"{model_dir}: a Llama-shaped model with random weights (its text is noise)")
    outputs = llm.generate(["Hello, pilot!"] * 8, params, use_progress=True)
    tokens = sum(len(o.token_ids) for o in outputs)
    console.print(f"generated {tokens} tokens for {len(outputs)} requests; first: {outputs[0].text!r}")
    llm.close()
    db = f"sqlite:///{(workdir / 'pilot.db').resolve()}"
    console.rule("[bold]2/5 profile")
    console.print(f"measuring engine configurations for {budget} into {db} (run again to continue)")
    # The built-in CPU space, with int4 groups the tiny model's 64 features can hold.
    space = SearchSpace.from_file("cpu")
    space = space.model_copy(update={"fixed": {**space.fixed, "quantization_group_size": 32}})
    space_file = workdir / "space.yaml"
    space_file.write_text(yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False))
    isl, osl = "16:64", "8:32"
    cli_profile.profile(model=model_dir, space=str(space_file), workload=None, isl=isl, osl=osl,
                        num_requests=8, draft=None, slo=slo, budget=budget, repeats=1, via="engine", again=None,
                        sitting=2, db=db)
    cli_profile.runs_list(db=db, limit=10)
    console.rule("[bold]3/5 fit")
    cli_fit.fit(db=db, folds=3, as_json=False, plot=None)
    console.rule("[bold]4/5 recommend, 5/5 verify")
    plan_file = workdir / "plan.yaml"
    verified = None
    try:
        verified = cli_recommend.recommend(
            model=model_dir, slo=slo, rate=None, concurrency=concurrency, workload=None, isl=isl,
            osl=osl, num_requests=32, hardware=None, max_devices=1, space=str(space_file), trials=60,
            objective="cost", confidence=0.8, draft=None, out=plan_file, plot=workdir / "pareto.png",
            verify=True, via="http", repeats=3, fallbacks=2, explore=0, host="now", as_json=False, seed=0, db=db)
    except cli_recommend.VerifyMissed as missed:  # measured and missed: the summary says so
        verified = missed.verified
    except typer.Exit as stop:
        if stop.exit_code:
            console.print("[red]no plan met the example targets[/red]; try looser --slo")
            raise
    if verified is not None:
        _quickstart_summary(workdir, plan_file, db, verified)


def _quickstart_summary(workdir: Path, plan_file: Path, db: str, verified: tuple[Any, list[Any]]) -> None:
    from planner.search.plan import Plan
    from planner.store.database import Store

    plan, store = Plan.from_file(plan_file), Store(db)
    chosen, attempts = verified
    launched = sum(len(r.run_ids) for a in attempts for r in a.launches)
    held, profiled = chosen.held, len(store.runs()) - launched
    verdict = ("held" if held else "held on two launches, but by too little to count on"
               if chosen.too_little_room else "did NOT hold")
    console.rule("[bold]summary")
    console.print(
        f"pilot measured {profiled} runs of the engine on this machine, learned how long "
        f"its steps take, and searched for the cheapest configuration that serves {plan.load.value:g} "
        f"clients at once within {', '.join(plan.slos)}.\n"
        f"  plan:      {plan_file} (quantization={plan.engine.quantization or 'none'}, "
        f"max_num_seqs={plan.engine.max_num_seqs}, data_parallel_size={plan.engine.data_parallel_size})\n"
        f"  cost:      ${plan.cost.per_million_output_tokens_usd:.4f} per million output tokens at "
        f"${plan.cost.per_hour_usd:.2f}/h\n"
        f"  verified:  launched with pilot serve and measured over HTTP here, {len(chosen.deciding.run_ids)} "
        f"runs; every SLO {verdict} (medians of the runs)"
        + (f"; plan #{chosen.rank}, after {chosen.rank - 1} the model ranked higher missed" if chosen.rank > 1 else "")
        + "\n"
        f"  picture:   {workdir / 'pareto.png'} (cost against latency of every configuration scored)\n"
        f"  next:      pilot serve --config {plan_file} (OpenAI API on http://127.0.0.1:8000/v1), "
        f"then pilot bench serve --profile sweep --slo \"{','.join(plan.slos)}\"; "
        f"optuna-dashboard {db} browses the search")


# The measurement and fitting commands live in their own modules; importing them registers
# them on `app`.
from planner.cli import bench_serve as cli_bench_serve
from planner.cli import fit as cli_fit
from planner.cli import profile as cli_profile
from planner.cli import recommend as cli_recommend
from planner.cli import serve as cli_serve  # noqa: E402


def main() -> None:
    app()


if __name__ == "__main__":
    main()

