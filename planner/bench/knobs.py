"""Serving-knob benchmark: what each engine knob does to speed on this machine, in one run.

- Weight-only quantization: batch-1 decode tokens/s of int8 and int4 against the same
  checkpoint in bf16 (the engines take turns, so every ratio shares the machine's state), with
  the weight bytes a step reads and the rate it reads them at.
- Speculative decoding: batch-1 decode tokens/s of the `pilot models train` target with its
  draft at several k against the target alone, on standard-library text, with the acceptance
  rate.
- Parallelism: offline throughput on the engine benchmark's 64-request workload, and batch-1
  decode, with the machine's threads split over N data-parallel replicas or N tensor-parallel
  ranks, against one process holding them all.
- torch.compile: batch-1 decode with the decode step compiled by Inductor against the engine's
  own kernels, and what the compilation cost.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from engine import LLM, EngineConfig, Linear, SamplingParams
from planner.bench.engine import _machine_name, default_model_dir, offline_workload
from planner.bench.training import BOS, stdlib_corpus, train_pair

console = Console()
TARGETS = {"int8": 1.5, "int4": 1.8}  # batch-1 speed-up over bf16
SPEC_TARGET = 1.8  # batch-1 speed-up of target + draft over the target alone


@dataclass
class QuantRow:
    quantization: str  # "bf16" for the baseline
    weight_bytes: int  # read by one decode step: every linear incl. the LM head
    runs: list[float] = field(default_factory=list)  # tokens/s per run

    @property
    def tok_s(self) -> float:
        return statistics.median(self.runs)


@dataclass
class SpecRow:
    num_speculative_tokens: int  # 0: the target alone
    runs: list[float] = field(default_factory=list)  # tokens/s per (prompt, repeat)
    acceptance: list[float] = field(default_factory=list)  # per run

    @property
    def tok_s(self) -> float:
        return statistics.median(self.runs)

    @property
    def acceptance_rate(self) -> float | None:
        return statistics.mean(self.acceptance) if self.acceptance else None


@dataclass
class ParallelRow:
    replicas: int  # data_parallel_size
    ranks: int  # tensor_parallel_size
    threads_each: int
    tok_s: float  # offline workload
    batch1_tok_s: float


@dataclass
class CompileRow:
    engine: str  # "engine kernels" | "torch.compile"
    warmup_s: float  # first short generation: compilation for torch.compile
    runs: list[float] = field(default_factory=list)  # batch-1 tokens/s per run

    @property
    def tok_s(self) -> float:
        return statistics.median(self.runs)


@dataclass
class KnobsReport:
    machine: str
    model: str
    group_size: int
    rows: list[QuantRow] = field(default_factory=list)
    pair: str | None = None
    spec_rows: list[SpecRow] = field(default_factory=list)
    parallel_rows: list[ParallelRow] = field(default_factory=list)
    compile_rows: list[CompileRow] = field(default_factory=list)


def linear_weight_bytes(llm: LLM) -> int:
    return sum(m.weight_bytes() for m in llm.engine.runner.model.modules() if isinstance(m, Linear))


def default_pair_dir() -> Path:
    import os

    path = Path(os.environ.get("PILOT_CACHE", Path.home() / ".cache" / "pilot")) / "models" / "pair"
    if not (path / "target" / "config.json").is_file() or not (path / "draft" / "config.json").is_file():
        console.print(f"training a target/draft pair into {path} (pilot models train, ~5 min)")
        train_pair(path)
    return path


def run_spec_benchmark(report: KnobsReport, pair: Path, ks: tuple[int, ...] = (2, 4, 6),
                       num_prompts: int = 4, decode_tokens: int = 128, repeats: int = 2) -> None:
    # Prompts from the standard library's source: the training text, which models this small
    # are far from memorising; every engine gets the same prompts.
    corpus = stdlib_corpus(8 << 20)
    prompts = [[BOS] + corpus[-(i + 1) * 4000:-(i + 1) * 4000 + 96].tolist() for i in range(num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    report.pair = str(pair)
    engines = {}
    for k in (0, *ks):
        with console.status(f"loading the target{' alone' if not k else f' with its draft, k={k}'}"):
            extra = {} if not k else dict(speculative_model=str(pair / "draft"), num_speculative_tokens=k)
            engines[k] = LLM(EngineConfig(model=str(pair / "target"), dtype="float32", max_num_seqs=1,
                                          max_model_len=1024, **extra))
        engines[k].generate([prompts[0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        report.spec_rows.append(SpecRow(k))
    with torch.inference_mode(), console.status("speculative decoding, batch 1, engines taking turns"):
        for _ in range(repeats):
            for prompt in prompts:
                for row in report.spec_rows:
                    out = engines[row.num_speculative_tokens].generate([prompt], params)[0]
                    times = out.metrics.token_times
                    # Tokens arrive in bursts under speculation: rate over the whole decode.
                    row.runs.append((len(out.token_ids) - 1) / (times[-1] - times[0]))
                    if out.metrics.acceptance_rate is not None:
                        row.acceptance.append(out.metrics.acceptance_rate)


def run_parallel_benchmark(report: KnobsReport, model_dir: Path, num_requests: int = 64,
                           layouts: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2)),
                           decode_tokens: int = 128) -> None:
    """`layouts`: (data_parallel_size, tensor_parallel_size) pairs; the first is the baseline."""
    import os

    threads = os.cpu_count() or 1
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    workload = offline_workload(num_requests, vocab)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in workload]
    single = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    for dp, tp in layouts:
        config = EngineConfig(model=str(model_dir), dtype="bfloat16", max_num_seqs=num_requests,
                              data_parallel_size=dp, tensor_parallel_size=tp, num_threads=threads)
        each = max(1, threads // (dp * tp))
        with console.status(f"{dp} replica(s) x {tp} rank(s) x {each} thread(s): offline, batch 1"):
            with LLM(config) as llm:
                llm.generate([workload[0][0]], SamplingParams(temperature=0, max_tokens=4))
                start = time.perf_counter()
                outs = llm.generate([p for p, _ in workload], params)
                elapsed = time.perf_counter() - start
                times = llm.generate([workload[0][0][:32]], single)[0].metrics.token_times
        report.parallel_rows.append(ParallelRow(
            dp, tp, each, sum(len(o.token_ids) for o in outs) / elapsed,
            (len(times) - 1) / (times[-1] - times[0])))


def run_compile_benchmark(report: KnobsReport, model_dir: Path, decode_tokens: int = 128,
                          repeats: int = 3) -> None:
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompt = offline_workload(1, vocab, seed=1)[0][0][:32]
    params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    engines = {}
    for name, compiled in (("engine kernels", False), ("torch.compile", True)):
        with console.status(f"batch-1 decode: {name} (compiling takes a minute or more)"
                            if compiled else f"batch-1 decode: {name}"):
            engines[name] = LLM(EngineConfig(model=str(model_dir), dtype="bfloat16", max_num_seqs=1,
                                             max_model_len=512, torch_compile=compiled))
            start = time.perf_counter()
            engines[name].generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            report.compile_rows.append(CompileRow(name, time.perf_counter() - start))
    with console.status("batch-1 decode, eager and compiled taking turns"):
        for _ in range(repeats):
            for row in report.compile_rows:
                times = engines[row.engine].generate([prompt], params)[0].metrics.token_times
                row.runs.append((len(times) - 1) / (times[-1] - times[0]))


def run_knobs_benchmark(model: Path | None = None, methods: tuple[str, ...] = ("int8", "int4"),
                        group_size: int = 128, decode_tokens: int = 128, repeats: int = 5,
                        json_out: Path | None = None, pair: Path | None = None,
                        with_spec: bool = True, with_parallel: bool = True,
                        with_compile: bool = True, num_requests: int = 64) -> KnobsReport:
    model_dir = Path(model) if model is not None else default_model_dir()
    report = KnobsReport(_machine_name(), str(model_dir), group_size)
    engines: dict[str, LLM] = {}
    for name in ("bf16", *methods):
        with console.status(f"loading {name}"):
            # Batch 1 only: a small KV cache keeps three engines in memory at once.
            engines[name] = LLM(EngineConfig(
                model=str(model_dir), dtype="bfloat16", max_num_seqs=1, max_model_len=512,
                quantization=None if name == "bf16" else name, quantization_group_size=group_size))
        report.rows.append(QuantRow(name, linear_weight_bytes(engines[name])))
    vocab = engines["bf16"].engine.model_config.vocab_size
    prompt = offline_workload(1, vocab, seed=1)[0][0][:32]
    params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    with torch.inference_mode(), console.status("batch-1 decode, the engines taking turns"):
        for llm in engines.values():
            llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        for _ in range(repeats):
            for row in report.rows:
                times = engines[row.quantization].generate([prompt], params)[0].metrics.token_times
                row.runs.append((len(times) - 1) / (times[-1] - times[0]))
    del engines
    if with_spec:
        run_spec_benchmark(report, Path(pair) if pair is not None else default_pair_dir(),
                           decode_tokens=decode_tokens)
    if with_parallel:
        run_parallel_benchmark(report, model_dir, num_requests=num_requests, decode_tokens=decode_tokens)
    if with_compile:
        run_compile_benchmark(report, model_dir, decode_tokens=decode_tokens)
    print_report(report)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(
            {**asdict(report), "rows": [{**asdict(r), "tok_s": r.tok_s} for r in report.rows],
             "spec_rows": [{**asdict(r), "tok_s": r.tok_s, "acceptance_rate": r.acceptance_rate}
                           for r in report.spec_rows],
             "compile_rows": [{**asdict(r), "tok_s": r.tok_s} for r in report.compile_rows]}, indent=2))
    return report


def print_report(report: KnobsReport) -> None:
    table = Table(title=f"weight-only quantization, batch-1 decode — {report.machine}")
    for col in ("weights", "tok/s", "vs bf16", "target", "MB/step", "GB/s"):
        table.add_column(col, justify="left" if col == "weights" else "right")
    base = report.rows[0].tok_s
    for row in report.rows:
        label = row.quantization + (f" (group {report.group_size})" if row.quantization == "int4" else "")
        target = TARGETS.get(row.quantization)
        table.add_row(label, f"{row.tok_s:.1f}", f"{row.tok_s / base:.2f}x",
                      f">= {target}x" if target else "-", f"{row.weight_bytes / 1e6:.0f}",
                      f"{row.weight_bytes * row.tok_s / 1e9:.1f}")
    console.print(table)
    if report.spec_rows:
        table = Table(title=f"speculative decoding, batch 1, trained pair — {report.machine}")
        for col in ("engine", "tok/s", "vs target alone", "target", "acceptance"):
            table.add_column(col, justify="left" if col == "engine" else "right")
        base = report.spec_rows[0].tok_s
        for spec in report.spec_rows:
            k, rate = spec.num_speculative_tokens, spec.acceptance_rate
            table.add_row("target alone" if not k else f"target + draft, k={k}", f"{spec.tok_s:.1f}",
                          f"{spec.tok_s / base:.2f}x", f">= {SPEC_TARGET}x" if k else "-",
                          "-" if rate is None else f"{rate:.0%}")
        console.print(table)
    if report.parallel_rows:
        table = Table(title=f"data and tensor parallelism, same threads in all — {report.machine}")
        for col in ("replicas x ranks x threads", "offline tok/s", "vs one process",
                    "batch-1 tok/s", "vs one process "):
            table.add_column(col, justify="left" if col.startswith("replicas") else "right")
        base = report.parallel_rows[0]
        for par in report.parallel_rows:
            table.add_row(f"{par.replicas} x {par.ranks} x {par.threads_each}", f"{par.tok_s:.1f}",
                          f"{par.tok_s / base.tok_s:.2f}x", f"{par.batch1_tok_s:.1f}",
                          f"{par.batch1_tok_s / base.batch1_tok_s:.2f}x")
        console.print(table)
    if report.compile_rows:
        table = Table(title=f"torch.compile of the decode step, batch 1, bf16 — {report.machine}")
        for col in ("engine", "tok/s", "vs engine kernels", "first call (s)"):
            table.add_column(col, justify="left" if col == "engine" else "right")
        base = report.compile_rows[0].tok_s
        for row in report.compile_rows:
            table.add_row(row.engine, f"{row.tok_s:.1f}", f"{row.tok_s / base:.2f}x", f"{row.warmup_s:.1f}")
        console.print(table)
