"""Prefill of short prompts, row by row through the decode kernel against the prefill path (a
script, not a test):

    python tests/benchmarks/prefill_rows.py [tiny h256 h512 llama-110m ...] [--quant int4]

A step of prompts averaging up to `ROW_BY_ROW_MEAN_PREFILL` tokens is attended row by row and,
on the CPU, runs the fused decode layers; otherwise each prompt is attended in a call of its own
and the layers run op by op. For each shape (`pilot bench fit`'s reference models) and burst of
prompts, one engine times the prompts' one step both ways, in alternating rounds (the host's
speed moves within minutes), and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from engine import LLM, SamplingParams, rules
from engine.model_zoo import make_checkpoint
from planner.bench.fit import REFERENCE_MODELS

BURSTS = [(1, 16), (1, 64), (1, 128), (1, 256), (4, 16), (12, 16), (12, 32), (4, 64), (16, 64), (8, 128)]


def time_step(llm: LLM, count: int, length: int, rng: random.Random, repeats: int) -> list[float]:
    once = SamplingParams(max_tokens=1, temperature=0)  # the prompts' step, and nothing after
    times = []
    for _ in range(repeats):
        prompts = [[rng.randrange(3, 500) for _ in range(length)] for _ in range(count)]
        start = time.perf_counter()
        llm.generate(prompts, once)
        times.append(time.perf_counter() - start)
    return times[2:]  # the first two warm the path's buffers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="*", default=["tiny", "h256", "h512", "llama-110m"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quant", default=None, choices=["int8", "int4"])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    default = rules.ROW_BY_ROW_MEAN_PREFILL
    print(f"{'shape':<11} {'prompts':>9} {'prefill path':>13} {'row by row':>11} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            spec = Path(tmp) / f"{shape}.json"
            spec.write_text(json.dumps(REFERENCE_MODELS[shape]))
            model = make_checkpoint(spec, Path(tmp) / shape, seed=0, dtype="float32")
            group = min(64, REFERENCE_MODELS[shape]["hidden_size"] // 2)
            llm = LLM(model=str(model), dtype=args.dtype, quantization=args.quant,
                      quantization_group_size=group, max_num_seqs=64, enable_prefix_caching=False)
            rng = random.Random(0)
            for count, length in BURSTS:
                if length > llm.engine.max_model_len:
                    continue
                times: dict[int, list[float]] = {0: [], 10**9: []}
                for _ in range(args.rounds):
                    for mean in times:  # 0: every prompt through the prefill path
                        rules.ROW_BY_ROW_MEAN_PREFILL = mean
                        times[mean] += time_step(llm, count, length, rng, repeats=8)
                rules.ROW_BY_ROW_MEAN_PREFILL = default
                path, rows = (statistics.median(times[m]) * 1e3 for m in (0, 10**9))
                taken = "rows" if length <= default else "path"
                print(f"{shape:<11} {count:>3} x {length:<4} {path:>10.2f} ms {rows:>8.2f} ms "
                      f"{rows / path:>6.2f}  (the engine takes: {taken})", flush=True)
            llm.close()


if __name__ == "__main__":
    main()
