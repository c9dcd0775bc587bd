"""Tokenizers: a byte-level default that needs no files, or `tokenizer.json` when present."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class ByteTokenizer:
    """Token id = byte value (0..255); the model's BOS is prepended; ids >= 256 decode to nothing."""

    vocab_size = 256

    def __init__(self, bos_token_id: int | None = None) -> None:
        self.bos_token_id = bos_token_id

    def encode(self, text: str) -> list[int]:
        prefix = [self.bos_token_id] if self.bos_token_id is not None else []
        return prefix + list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if 0 <= t < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)


def load_tokenizer(directory: str | Path, bos_token_id: int | None) -> Tokenizer:
    path = Path(directory) / "tokenizer.json"
    if path.is_file():
        return HFTokenizer(path)
    return ByteTokenizer(bos_token_id)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a UTF-8 character.

    Decodes only a short window at the end, so the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0

    def update(self, token_ids: list[int]) -> str:
        prefix_text = self.tokenizer.decode(token_ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(token_ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # wait for the rest of a multi-byte character
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        self.text += delta
        return delta
