"""What serving costs: the same workload in process and through `pilot serve` (a server process,
its engine core in another, the client in this one), at several concurrencies, in one run.

    python tests/benchmarks/http_overhead.py                       # tiny, llama-110m, smollm2-135m
    python tests/benchmarks/http_overhead.py llama-110m --concurrency 16 --core-threads 1 2

Targets (issue 40): at concurrency 16, output throughput over HTTP >= 0.85x in process for
llama-110m and SmolLM2; ITL p50 <= 1.2x; TTFT p50 overhead <= 5 ms. `--core-threads` measures
the thread split: the engine core's torch threads, the rest of the cores left to the server.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from engine import EngineConfig
from engine.model_zoo import make_checkpoint
from planner.measure.http import OverHTTP
from planner.measure.profiler import InProcess
from planner.spec.workload import Workload


def model_path(name: str, root: str) -> str:
    if name == "smollm2-135m":
        from engine.hub import pull
        return str(pull(name))
    dtype = "float32" if name == "tiny" else "bfloat16"
    return str(make_checkpoint(name, f"{root}/{name}", seed=0, dtype=dtype))


def measure(measurer, workload: Workload, concurrency: int) -> tuple[float, float, float, float]:
    result = measurer.measure(workload, "concurrency", concurrency)
    itl = np.concatenate([r.latency.itl_s for r in result.requests])
    ttft = [r.latency.ttft_s for r in result.requests]
    tokens = sum(r.output_tokens for r in result.requests) / result.duration_s
    return float(np.median(ttft) * 1e3), float(np.median(itl) * 1e3), float(np.percentile(itl, 95) * 1e3), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=["tiny", "llama-110m", "smollm2-135m"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--core-threads", type=int, nargs="+", default=[os.cpu_count() or 1],
                        help="engine threads to try over HTTP (in process always uses every core)")
    parser.add_argument("--input-tokens", default="128")
    parser.add_argument("--output-tokens", default="64")
    parser.add_argument("--requests-per-client", type=int, default=3)
    args = parser.parse_args()
    root = tempfile.mkdtemp()
    print(f"{args.input_tokens} tokens in, {args.output_tokens} out (ignore_eos), "
          f"{args.requests_per_client} requests per client (at least 12); {os.cpu_count()} cores")
    print("| model | concurrency | path | TTFT p50 ms | ITL p50 ms | ITL p95 ms | output tok/s "
          "| TTFT +ms | ITL p50 x | tok/s x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        path = model_path(name, root)
        top = max(args.concurrency)
        base = EngineConfig(model=path, max_num_seqs=max(16, top), max_num_batched_tokens=2048)
        workloads = {c: Workload.from_flags(args.input_tokens, args.output_tokens, concurrency=c,
                                            num_requests=max(12, c * args.requests_per_client))
                     for c in args.concurrency}
        rows: dict[tuple[int, str], tuple[float, ...]] = {}
        paths = [("in process", InProcess, base)] + [
            (f"HTTP, core {t} thr", OverHTTP, base.model_copy(update={"num_threads": t}))
            for t in args.core_threads]
        for label, kind, config in paths:
            measurer = kind(config, workloads[args.concurrency[0]])
            try:
                for c in args.concurrency:
                    rows[c, label] = measure(measurer, workloads[c], c)
            finally:
                measurer.close()
        for c in args.concurrency:
            ref = rows[c, "in process"]
            for label, _, _ in paths:
                row = rows[c, label]
                ratios = ("", "", "") if label == "in process" else (
                    f"{row[0] - ref[0]:+.1f}", f"{row[1] / ref[1]:.2f}", f"{row[3] / ref[3]:.2f}")
                print(f"| {name} | {c} | {label} | {row[0]:.1f} | {row[1]:.2f} | {row[2]:.2f} "
                      f"| {row[3]:.0f} | {' | '.join(ratios)} |", flush=True)


if __name__ == "__main__":
    main()
