"""What a weight quantization costs in quality: the model's perplexity on held-out real text
(ShareGPT replies no workload sends) under int8 and int4 at each group size, beside the
unquantized model's on the same text, as llama.cpp's perplexity tables compare its formats.
On request also llama.cpp's own block formats (GGUF Q8_0, Q5_x, Q4_x): the model written to
each, read back and run unquantized, which is what a user holding such a file would run.

Both run with float32 activations through the engine's kernels on this host, so the loss is that
of what it serves here: the weights', and on AVX2 without AVX-512, where the quantized linears
multiply integers, the rounding of activations to int8 as well. Measured once per model and
scheme, and stored; `pilot recommend --max-quality-loss` reads them.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from sqlalchemy import select

from engine import LLM, EngineConfig
from engine.gguf import export_gguf, import_gguf
from engine.model_config import ModelConfig
from planner.spec.dataset import heldout_texts
from planner.spec.search_space import quantizable
from planner.store.database import QualityRow, Store, fingerprint
from planner.store.records import model_row

DATASET = "sharegpt-heldout"
TEXTS, TEXT_TOKENS = 16, 256  # 4k predicted tokens: a 1% difference is well above the noise
SCHEMES: tuple[tuple[str, int], ...] = (("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128))
GGUF_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # blocks of 32 weights, each with its scale
GGUF_PREFIX = "gguf-"  # a GGUF format's row: quantization "gguf-Q4_0", group 32
Say = Callable[[str], None]


@dataclass(frozen=True)
class Quality:
    quantization: str
    group_size: int
    perplexity: float
    reference_perplexity: float
    tokens: int

    @property
    def loss(self) -> float:
        """Relative perplexity increase over the unquantized model (0.02 = 2%)."""
        return self.perplexity / self.reference_perplexity - 1

    @classmethod
    def from_row(cls, row: QualityRow) -> Quality:
        return cls(row.quantization, row.group_size, row.perplexity, row.reference_perplexity, row.tokens)

    @property
    def scheme(self) -> str:
        if self.quantization.startswith(GGUF_PREFIX):
            return f"GGUF {self.quantization.removeprefix(GGUF_PREFIX)}"
        return f"int4 g{self.group_size}" if self.quantization == "int4" else self.quantization

    @property
    def in_engine(self) -> bool:
        """Whether the engine runs this scheme (int8/int4), rather than a GGUF format it reads."""
        return not self.quantization.startswith(GGUF_PREFIX)


def perplexity(llm: LLM, texts: list[list[int]]) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of every token after the first, and their count."""
    total, count = 0.0, 0
    for ids in texts:
        logits = llm.score(ids).float()
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
        total, count = total + float(nll), count + len(ids) - 1
    return math.exp(total / count), count


def valid_schemes(model_dir: str) -> list[tuple[str, int]]:
    """The schemes every linear layer of this model can hold (int4 groups dividing its inputs)."""
    cfg = ModelConfig.from_dir(model_dir)
    return [(method, group) for method, group in SCHEMES
            if quantizable(cfg, EngineConfig(model=model_dir, **_settings(method, group)))]


def valid_gguf_types(model_dir: str) -> list[str]:
    """The GGUF block formats this model's matrices fit (every row a whole number of blocks of
    32); none for what `export_gguf` cannot write."""
    cfg = ModelConfig.from_dir(model_dir)
    rows = (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size)
    exportable = cfg.model_type in ("llama", "qwen2") and not cfg.is_moe and cfg.quantization is None
    return list(GGUF_TYPES) if exportable and all(r % 32 == 0 for r in rows) else []


def _settings(method: str, group: int) -> dict[str, Any]:
    """The engine settings of a scheme (int8's group is its row: it takes no group size)."""
    return {"quantization": method} | ({"quantization_group_size": group} if group else {})


def _key(model_fingerprint: str, method: str, group: int) -> str:
    return fingerprint({"model": model_fingerprint, "quantization": method, "group_size": group,
                        "dataset": DATASET, "texts": TEXTS, "tokens": TEXT_TOKENS})


def stored_quality(store: Store, model_dir: str) -> list[Quality]:
    model = model_row(store, model_dir)
    with store.session() as session:
        rows = session.scalars(select(QualityRow).where(QualityRow.model_id == model.id)).all()
    return [Quality.from_row(r) for r in rows]


def measure_quality(store: Store, model_dir: str, threads: int = 2, say: Say = lambda m: None,
                    gguf: bool = False) -> list[Quality]:
    """Every valid scheme's perplexity against the unquantized model's (with `gguf`, every GGUF
    format's too), measured where the store has none yet (a model needs a tokenizer: the
    held-out text is real)."""
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise ValueError(f"model: {model_dir} has no tokenizer.json; quality is measured on real text")
    model = model_row(store, model_dir)
    known = {(q.quantization, q.group_size) for q in stored_quality(store, model_dir)}
    wanted = valid_schemes(model_dir) + ([(GGUF_PREFIX + t, 32) for t in valid_gguf_types(model_dir)] if gguf else [])
    missing = [s for s in wanted if s not in known]
    if not missing:
        return stored_quality(store, model_dir)
    texts = heldout_texts(model_dir, TEXTS, TEXT_TOKENS)
    say(f"perplexity of the unquantized model on {len(texts)} held-out ShareGPT replies")
    with LLM(EngineConfig(model=model_dir, dtype="float32", num_threads=threads)) as llm:
        reference, tokens = perplexity(llm, texts)
    for method, group in missing:
        if method.startswith(GGUF_PREFIX):
            say(f"perplexity as {method.removeprefix(GGUF_PREFIX)} GGUF, written and read back")
            value = _gguf_perplexity(model_dir, method.removeprefix(GGUF_PREFIX), texts, threads)
        else:
            say(f"perplexity under {method}" + (f", groups of {group}" if group else ""))
            with LLM(EngineConfig(model=model_dir, dtype="float32", num_threads=threads,
                                  **_settings(method, group))) as llm:
                value, _ = perplexity(llm, texts)
        with store.session() as session:
            session.add(QualityRow(fingerprint=_key(model.fingerprint, method, group), model_id=model.id,
                                   quantization=method, group_size=group, dataset=DATASET, texts=len(texts),
                                   tokens=tokens, perplexity=value, reference_perplexity=reference))
            session.commit()
    return stored_quality(store, model_dir)


def _gguf_perplexity(model_dir: str, qtype: str, texts: list[list[int]], threads: int) -> float:
    """The model written as a `qtype` GGUF file, read back into float32 and run unquantized."""
    with tempfile.TemporaryDirectory(prefix="pilot-gguf-quality-") as scratch:
        file = export_gguf(model_dir, Path(scratch) / f"model.{qtype}.gguf", qtype)
        back = import_gguf(file, Path(scratch) / "model", dtype="float32")
        file.unlink()  # only the read-back copy is needed now
        with LLM(EngineConfig(model=str(back), dtype="float32", num_threads=threads)) as llm:
            return perplexity(llm, texts)[0]
