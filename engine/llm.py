"""`LLM`: offline generation, streaming and scoring over an `LLMEngine`, or over several
replicas behind a `DataParallelEngine` when `data_parallel_size` > 1."""

from __future__ import annotations

from typing import Any, Iterator
from typing import Sequence as SequenceType

import torch
from rich.progress import Progress

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.parallel.data_parallel import DataParallelEngine
from engine.sampling_params import SamplingParams
from engine.sequence import RequestOutput, StreamToken

Prompt = str | list[int]


class LLM:
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            config = EngineConfig(**kwargs)
        elif kwargs:
            config = config.model_copy(update=kwargs)
        self.engine: LLMEngine | DataParallelEngine = (
            DataParallelEngine(config) if config.data_parallel_size > 1 else LLMEngine(config))
        self.config = config
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        """Stop the processes behind the engine: data-parallel replicas, tensor-parallel ranks."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompts: Prompt | SequenceType[Prompt],
                 params: SamplingParams | SequenceType[SamplingParams] | None = None,
                 use_progress: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: got {len(params)} for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for prompt, sp in zip(prompts, params):
                ids.append(self.engine.add_request(None, prompt, sp))
        except Exception:
            for request_id in ids:  # all or nothing: no orphans left running
                self.engine.abort_request(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        with Progress(disable=not use_progress, transient=True) as progress:
            task = progress.add_task("generating", total=len(ids))
            while wanted - results.keys():
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted:
                        results[output.request_id] = output
                        progress.advance(task)
        return [results[i] for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamToken]:
        """Yield tokens of one request as the engine produces them."""
        request_id = self.engine.add_request(None, prompt, params)
        emitted, text_len = 0, 0
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id != request_id:
                        continue
                    new_ids = output.token_ids[emitted:]
                    for j, token in enumerate(new_ids):
                        last = j == len(new_ids) - 1
                        text = output.text[text_len:] if last else ""
                        text_len += len(text)
                        yield StreamToken(token, text, output.finish_reason if last else None)
                    emitted = len(output.token_ids)
                    if output.finished:
                        return
        finally:
            if request_id in self.engine.requests:
                self.engine.abort_request(request_id)

    def score(self, token_ids: list[int]) -> torch.Tensor:
        return self.engine.score(token_ids)
