"""Tokenizers: byte-level (no files) and any Hugging Face `tokenizer.json` (via `tokenizers`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, then PAD=256, BOS=257, EOS=258."""

    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (fast tokenizers library); BOS/EOS found by common names."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        find = lambda names: next((self._tok.token_to_id(n) for n in names if self._tok.token_to_id(n) is not None), None)
        self.bos_id = find(["<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"])
        self.eos_id = find(["</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>"])
        pad = find(["<pad>", "<|pad|>", "[PAD]"])
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        config = Path(path).parent / "tokenizer_config.json"
        self.chat_template: str | None = None
        if config.exists():
            self.chat_template = json.loads(config.read_text()).get("chat_template")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids)])


def load_tokenizer(spec: str) -> Tokenizer:
    """`byte`, or a path to a `tokenizer.json` file (or a directory holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        from jaxllm.config import ConfigError

        raise ConfigError(f"data.tokenizer={spec!r}: no such tokenizer.json; use 'byte' or a path to tokenizer.json")
    return HFTokenizer(path)
