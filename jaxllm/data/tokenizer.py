"""Tokenizers: byte-level (no files) and any Hugging Face `tokenizer.json` (via `tokenizers`).

Special tokens follow the tokenizer's own rule, as transformers applies it: `encode(text,
add_special_tokens=True)` adds what the tokenizer.json post-processor adds (BOS for Llama-style
tokenizers, nothing for many chat models), and the named BOS / EOS / PAD tokens are those of
`tokenizer_config.json` when it names them. Generation stops at `stop_ids`: EOS and the
`eos_token_id`s of a `generation_config.json` beside the tokenizer (an instruct model's end of turn).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    stop_ids: tuple[int, ...]
    chat_template: str | None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def special_text(self, token_id: int | None) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, then PAD=256, BOS=257, EOS=258; its rule adds BOS. In template text BOS and
    EOS are written <|bos|> and <|eos|>."""

    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258
    stop_ids = (258,)
    chat_template = None
    _MARKERS = {"<|bos|>": 257, "<|eos|>": 258}

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return ([self.bos_id] if add_special_tokens else []) + list(text.encode("utf-8"))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of template text (markers -> BOS/EOS) and the character index each token starts at."""
        ids: list[int] = []
        starts: list[int] = []
        i = 0
        while i < len(text):
            marker = next((m for m in self._MARKERS if text.startswith(m, i)), None)
            if marker:
                ids.append(self._MARKERS[marker])
                starts.append(i)
                i += len(marker)
                continue
            piece = text[i].encode("utf-8")
            ids.extend(piece)
            starts.extend([i] * len(piece))
            i += 1
        return ids, starts

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def special_text(self, token_id: int | None) -> str:
        return {self.bos_id: "<|bos|>", self.eos_id: "<|eos|>"}.get(token_id, "")


def _token_name(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (fast tokenizers library) with its tokenizer_config.json and
    generation_config.json when they sit beside it."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_json(path.parent / "tokenizer_config.json")
        self.chat_template: str | None = config.get("chat_template")

        def find(key: str, names: list[str]) -> int | None:
            named = _token_name(config.get(key))
            if named is not None and self._tok.token_to_id(named) is not None:
                return self._tok.token_to_id(named)
            return next((self._tok.token_to_id(n) for n in names if self._tok.token_to_id(n) is not None), None)

        self.bos_id = find("bos_token", ["<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"])
        self.eos_id = find("eos_token", ["</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>"])
        pad = find("pad_token", ["<pad>", "<|pad|>", "[PAD]"])
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        generation = _read_json(path.parent / "generation_config.json").get("eos_token_id")
        extra = generation if isinstance(generation, list) else [generation] if generation is not None else []
        self.stop_ids = tuple(dict.fromkeys(([self.eos_id] if self.eos_id is not None else []) + [int(i) for i in extra]))

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of rendered template text (special tokens in it -> their ids, as transformers'
        apply_chat_template tokenizes) and the character index each token starts at."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [start for start, _ in enc.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids)], skip_special_tokens=False)

    def special_text(self, token_id: int | None) -> str:
        """How a special token is written in a template: its vocabulary string."""
        return (self._tok.id_to_token(token_id) or "") if token_id is not None else ""


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


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
