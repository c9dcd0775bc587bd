"""Engine benchmark: pilot vs Hugging Face transformers on the same checkpoint and machine.

Prints, per dtype: batch-1 decode tokens/s, offline throughput on a mixed-length workload, and
batch-1 achieved weight bandwidth against the machine's measured memory read bandwidth. Both
engines run in the same process, one after the other, so the ratios share the machine's state.
On a shared host the read bandwidth drifts with the neighbours (50-80 GB/s within minutes on
the 2-core development machine), so it is read just before every batch-1 run and each run is
set against its own reading; the table shows the medians.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from engine import LLM, EngineConfig, SamplingParams
from engine.model_config import ModelConfig
from engine.model_zoo import make_checkpoint

console = Console()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DtypeResult:
    dtype: str
    weight_bytes: int
    pilot_decode_tok_s: float
    pilot_offline_tok_s: float
    hf_decode_tok_s: float | None = None
    hf_offline_tok_s: float | None = None
    hf_offline_batch: int | None = None
    greedy_agreement: int | None = None  # leading greedy tokens identical to transformers'
    greedy_total: int | None = None
    # Each batch-1 run of pilot: (tokens/s, read bandwidth in GB/s measured just before it).
    decode_runs: list[tuple[float, float]] = field(default_factory=list)

    @property
    def achieved_gb_s(self) -> float:
        return self.weight_bytes * self.pilot_decode_tok_s / 1e9

    @property
    def read_bandwidth_gb_s(self) -> float:
        return statistics.median(bw for _, bw in self.decode_runs)

    @property
    def bandwidth_share(self) -> float:
        return statistics.median(self.weight_bytes * rate / 1e9 / bw for rate, bw in self.decode_runs)


@dataclass
class BenchReport:
    machine: str
    threads: int
    model: str
    results: list[DtypeResult] = field(default_factory=list)


class ReadBandwidth:
    """Best-of-N streaming read (a sum over a buffer far larger than the caches), in GB/s."""

    def __init__(self, size_bytes: int = 1 << 30) -> None:
        self.buffer = torch.ones(size_bytes // 4, dtype=torch.float32)

    def __call__(self, repeats: int = 3) -> float:
        self.buffer.sum()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.buffer.sum()
            best = min(best, time.perf_counter() - start)
        return self.buffer.numel() * 4 / best / 1e9


def decode_weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one decode step must read: every layer's weights and the LM head, not the embedding."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * (cfg.num_attention_heads * d) * 2 + h * (cfg.num_key_value_heads * d) * 2
    mlp = 3 * h * i * (cfg.num_experts_per_tok if cfg.is_moe else 1)
    params = cfg.num_hidden_layers * (attn + mlp + 2 * h) + h + cfg.vocab_size * h
    return params * torch.tensor([], dtype=dtype).element_size()


def offline_workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """`n` requests: prompt lengths 16..256 and output lengths 16..256, uniformly drawn."""
    rng = random.Random(seed)
    top = min(vocab, 32000)
    return [([rng.randrange(3, top) for _ in range(rng.randint(16, 256))], rng.randint(16, 256))
            for _ in range(n)]


def pilot_decode_once(llm: LLM, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    times = out.metrics.token_times
    return (len(times) - 1) / (times[-1] - times[0]), out.token_ids


def pilot_offline(llm: LLM, workload: list[tuple[list[int], int]]) -> float:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in workload]
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in workload], params, use_progress=True)
    elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / elapsed


def hf_decode_once(model, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    """Decode rate with the prefill subtracted: (N-1) tokens over t(N) - t(1)."""
    ids = torch.tensor([prompt])

    def run(n: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start, out

    t1, _ = run(1)
    tn, out = run(tokens)
    return (tokens - 1) / (tn - t1), out[0, len(prompt):].tolist()


def interleaved_decode(llm: LLM, hf, prompt: list[int], tokens: int, repeats: int,
                       bandwidth: ReadBandwidth
                       ) -> tuple[list[tuple[float, float]], float | None, list[int], list[int] | None]:
    """Alternate pilot and transformers runs so both see the same machine state. Returns pilot's
    runs as (tokens/s, read GB/s just before), transformers' median tokens/s, and both outputs."""
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate([prompt], warm)
    if hf is not None:
        hf_decode_once(hf, prompt, 8)
    ours, theirs, our_tokens, their_tokens = [], [], [], None
    for _ in range(repeats):
        read_gb_s = bandwidth()
        rate, our_tokens = pilot_decode_once(llm, prompt, tokens)
        ours.append((rate, read_gb_s))
        if hf is not None:
            rate, their_tokens = hf_decode_once(hf, prompt, tokens)
            theirs.append(rate)
    return ours, statistics.median(theirs) if theirs else None, our_tokens, their_tokens


def hf_offline(model, workload: list[tuple[list[int], int]], batch_size: int, pad_id: int) -> float:
    """Static batching: left-padded batches, each runs until its longest request is done."""
    useful, start = 0, time.perf_counter()
    for b in range(0, len(workload), batch_size):
        batch = workload[b:b + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        longest = max(m for _, m in batch)
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                       do_sample=False, pad_token_id=pad_id)
        useful += sum(m for _, m in batch)
    return useful / (time.perf_counter() - start)


def default_model_dir() -> Path:
    path = Path(os.environ.get("PILOT_CACHE", Path.home() / ".cache" / "pilot")) / "models" / "llama-110m"
    if not (path / "config.json").is_file():
        with console.status(f"making llama-110m at {path}"):
            make_checkpoint("llama-110m", path, seed=0, dtype="bfloat16")
    return path


def run_engine_benchmark(model: Path | None = None, dtypes: list[str] | None = None,
                         decode_tokens: int = 128, num_requests: int = 64, with_hf: bool = True,
                         hf_batch_sizes: tuple[int, ...] = (16, 64), repeats: int = 5,
                         json_out: Path | None = None) -> BenchReport:
    dtypes = dtypes or ["float32", "bfloat16"]
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"dtypes: unknown dtype {dt!r}; choose from {', '.join(DTYPES)}")
    model_dir = Path(model) if model is not None else default_model_dir()
    cfg = ModelConfig.from_dir(model_dir)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    report = BenchReport(machine=_machine_name(), threads=threads, model=str(model_dir))
    prompt = offline_workload(1, cfg.vocab_size, seed=1)[0][0][:32]
    workload = offline_workload(num_requests, cfg.vocab_size)
    bandwidth = ReadBandwidth()

    for dt in dtypes:
        console.rule(f"{dt}")
        llm = LLM(EngineConfig(model=str(model_dir), dtype=dt, max_num_seqs=num_requests))
        hf = None
        if with_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dt]).eval()
        with torch.inference_mode(), console.status(f"batch-1 decode, pilot and transformers alternating ({dt})"):
            runs, theirs, our_tokens, their_tokens = interleaved_decode(
                llm, hf, prompt, decode_tokens, repeats, bandwidth)
        result = DtypeResult(dt, decode_weight_bytes(cfg, DTYPES[dt]),
                             statistics.median(rate for rate, _ in runs), 0.0, hf_decode_tok_s=theirs,
                             decode_runs=runs)
        if their_tokens is not None:
            result.greedy_total = len(our_tokens)
            result.greedy_agreement = next(
                (i for i, (a, b) in enumerate(zip(our_tokens, their_tokens)) if a != b), len(our_tokens))
        result.pilot_offline_tok_s = pilot_offline(llm, workload)
        del llm
        if hf is not None:
            with torch.inference_mode():
                best = None
                for bsz in hf_batch_sizes:
                    with console.status(f"transformers static batching, batch {bsz} ({dt})"):
                        rate = hf_offline(hf, workload, bsz, pad_id=0)
                    if best is None or rate > best[0]:
                        best = (rate, bsz)
                result.hf_offline_tok_s, result.hf_offline_batch = best
            del hf
        report.results.append(result)
    print_report(report)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(
            {**asdict(report), "results": [{**asdict(r), "achieved_gb_s": r.achieved_gb_s,
                                             "read_bandwidth_gb_s": r.read_bandwidth_gb_s,
                                             "bandwidth_share": r.bandwidth_share}
                                            for r in report.results]}, indent=2))
    return report


def print_report(report: BenchReport) -> None:
    table = Table(title=f"pilot engine vs transformers — {report.machine}, {report.threads} threads")
    for col in ("dtype", "metric", "pilot", "transformers", "ratio", "target"):
        table.add_column(col, justify="right" if col not in ("dtype", "metric") else "left")
    for r in report.results:
        ratio = (r.pilot_decode_tok_s / r.hf_decode_tok_s) if r.hf_decode_tok_s else None
        table.add_row(r.dtype, "batch-1 decode tok/s", f"{r.pilot_decode_tok_s:.1f}",
                      _fmt(r.hf_decode_tok_s), _fmt(ratio, "x", 2), ">= 1.5x")
        ratio = (r.pilot_offline_tok_s / r.hf_offline_tok_s) if r.hf_offline_tok_s else None
        hf_note = f" (batch {r.hf_offline_batch})" if r.hf_offline_batch else ""
        table.add_row(r.dtype, "offline tok/s, mixed lengths", f"{r.pilot_offline_tok_s:.1f}",
                      _fmt(r.hf_offline_tok_s) + hf_note, _fmt(ratio, "x", 2), ">= 3x")
        table.add_row(r.dtype, "batch-1 weight bandwidth GB/s", f"{r.achieved_gb_s:.1f}",
                      f"{r.read_bandwidth_gb_s:.1f} (read bw)", f"{r.bandwidth_share:.0%}", ">= 60%")
        shares = sorted(r.weight_bytes * rate / 1e9 / bw for rate, bw in r.decode_runs)
        table.add_row(r.dtype, "  per run: tok/s @ read GB/s",
                      ", ".join(f"{rate:.0f}@{bw:.0f}" for rate, bw in r.decode_runs), "",
                      f"{shares[0]:.0%}-{shares[-1]:.0%}", "")
        if r.greedy_agreement is not None:
            # Exact in float32; in half precision the two round differently and drift apart.
            table.add_row(r.dtype, "greedy tokens equal to transformers'",
                          f"{r.greedy_agreement}/{r.greedy_total}", "", "",
                          "all" if r.dtype == "float32" else "-")
    console.print(table)


def _fmt(value: float | None, suffix: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _machine_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
