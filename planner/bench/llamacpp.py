"""`pilot bench llamacpp`: the engine against llama.cpp, the engine a CPU user would otherwise
pick, on the same weights at each precision: bf16 against a BF16 GGUF, int8 against Q8_0, int4
(groups of 32, scale and min) against Q4_1. The GGUF files are exported from the model the
engine loads (`engine/gguf/writer.py`), so both run the same weights, and the greedy tokens of
each pair are compared as a check that they do.

llama.cpp comes from `llama-cpp-python` (built from its sdist: `pip install llama-cpp-python`,
about 8 minutes on 2 cores), which is not a dependency of pilot.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from rich.table import Table

from engine import LLM, EngineConfig, SamplingParams
from planner.bench.engine import _machine_name, console

# name -> (engine settings, GGUF type llama.cpp runs)
PRECISIONS: dict[str, tuple[dict[str, Any], str]] = {
    "bf16": ({"dtype": "bfloat16"}, "BF16"),
    "int8": ({"dtype": "bfloat16", "quantization": "int8"}, "Q8_0"),
    "int4": ({"dtype": "bfloat16", "quantization": "int4", "quantization_group_size": 32}, "Q4_1"),
}
PROMPT_TOKENS = 128
AGREEMENT_TOKENS = 32
INSTALL = "pip install llama-cpp-python (builds llama.cpp from source, about 8 minutes on 2 cores)"


@dataclass
class PairResult:
    precision: str
    gguf_type: str
    pilot_decode_tok_s: float
    llamacpp_decode_tok_s: float
    pilot_prefill_tok_s: float
    llamacpp_prefill_tok_s: float
    greedy_equal: int  # of AGREEMENT_TOKENS

    @property
    def ratio(self) -> float:
        return self.pilot_decode_tok_s / self.llamacpp_decode_tok_s


def _prompt(vocab_size: int) -> list[int]:
    # Ordinary ids past the specials at the start of a BPE vocabulary.
    return [300 + (i * 37) % (vocab_size - 300) for i in range(PROMPT_TOKENS)]


def _pilot_run(llm: LLM, prompt: list[int], tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True))
    total = time.perf_counter() - start
    return len(prompt) / prefill, tokens / max(total - prefill, 1e-9)


def _llamacpp_run(model: Any, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
    """Prefill and greedy decode rates of one llama.cpp run, and the tokens it chose."""
    model.reset()
    start = time.perf_counter()
    model.eval(prompt)
    prefill = time.perf_counter() - start
    out: list[int] = []
    start = time.perf_counter()
    for _ in range(tokens):
        out.append(int(model.sample(temp=0.0)))
        model.eval([out[-1]])
    return len(prompt) / prefill, tokens / (time.perf_counter() - start), out


def run_llamacpp_benchmark(model_dir: Path, precisions: list[str], workdir: Path, threads: int = 2,
                           decode_tokens: int = 128, repeats: int = 3,
                           json_out: Path | None = None) -> list[PairResult]:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ValueError(f"llama.cpp is not installed: {INSTALL}") from None
    from engine.gguf import export_gguf

    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"--precisions: unknown {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    saved_threads = torch.get_num_threads()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("exporting and measuring", total=len(precisions))
        for name in precisions:
            settings, gguf_type = PRECISIONS[name]
            progress.update(task, description=f"{name}: exporting {gguf_type}")
            path = export_gguf(model_dir, workdir / f"{model_dir.name}-{gguf_type}.gguf", gguf_type)
            llm = LLM(EngineConfig(model=str(model_dir), num_threads=threads, **settings))
            prompt = _prompt(llm.engine.model_config.vocab_size)
            peer = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                         n_ctx=PROMPT_TOKENS + decode_tokens + 64, n_batch=PROMPT_TOKENS, verbose=False)
            progress.update(task, description=f"{name}: measuring")
            # The best of `repeats` runs each, interleaved: a slow spell of the host hits both alike.
            ours_runs, theirs_runs = [], []
            for _ in range(repeats):
                ours_runs.append(_pilot_run(llm, prompt, decode_tokens))
                theirs_runs.append(_llamacpp_run(peer, prompt, decode_tokens)[:2])
            ours = llm.generate([prompt], SamplingParams(max_tokens=AGREEMENT_TOKENS, temperature=0,
                                                         ignore_eos=True))[0].token_ids
            theirs = _llamacpp_run(peer, prompt, AGREEMENT_TOKENS)[2]
            equal = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), AGREEMENT_TOKENS)
            results.append(PairResult(name, gguf_type, max(r[1] for r in ours_runs), max(r[1] for r in theirs_runs),
                                      max(r[0] for r in ours_runs), max(r[0] for r in theirs_runs), equal))
            llm.close()
            del peer
            progress.advance(task)
    torch.set_num_threads(saved_threads)
    if json_out is not None:
        json_out.write_text(json.dumps({"machine": _machine_name(), "threads": threads, "model": str(model_dir),
                                        "prompt_tokens": PROMPT_TOKENS, "decode_tokens": decode_tokens,
                                        "results": [asdict(r) | {"ratio": r.ratio} for r in results]}, indent=2))
    return results


def print_llamacpp_report(results: list[PairResult], threads: int, model: str) -> None:
    table = Table(title=f"pilot engine vs llama.cpp — {model}, {_machine_name()}, {threads} threads, "
                        f"batch 1, {PROMPT_TOKENS}-token prompt")
    for column in ("precision", "llama.cpp file", "decode tok/s pilot", "llama.cpp", "ratio",
                   "prefill tok/s pilot", "llama.cpp", f"greedy tokens equal (of {AGREEMENT_TOKENS})"):
        table.add_column(column, justify="left" if column in ("precision", "llama.cpp file") else "right")
    for r in results:
        table.add_row(r.precision, r.gguf_type, f"{r.pilot_decode_tok_s:.1f}", f"{r.llamacpp_decode_tok_s:.1f}",
                      f"{r.ratio:.2f}x", f"{r.pilot_prefill_tok_s:.0f}", f"{r.llamacpp_prefill_tok_s:.0f}",
                      str(r.greedy_equal))
    console.print(table)
    console.print("target: a ratio >= 1.00x at each precision. Greedy tokens agree until the two "
                  "quantizations round differently (int8 per channel against Q8_0's blocks of 32).")
