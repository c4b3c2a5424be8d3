"""The grain pipeline: documents -> tokens -> windows of seq_len+1 -> packed rows -> batches.

Rows hold several documents, told apart by `segment_ids` (0 = padding) with `positions` restarting at
each document; `loss_mask` is 1 on real targets (times the document's per-token loss weights: SFT
examples weigh only response tokens). Iterators are grain's, so their state (a small dict)
is checkpointed with the model and a resumed run continues with the exact next batch.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from jaxllm.config import CalibrationConfig, ConfigError, DataConfig
from jaxllm.data.sources import ReadReport, read_documents
from jaxllm.data.synthetic import document_entropy, generate_documents
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer


READ_IN_CALLER = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)

# document -> (token ids [n] int32, loss weight of each token as a target [n] f32)
Encoder = Callable[[Any], tuple[np.ndarray, np.ndarray]]


def text_encoder(tokenizer: Tokenizer, *, end_with_eos: bool = True) -> Encoder:
    """Plain documents: tokens with the tokenizer's own special tokens (`add_special_tokens=True`, as
    transformers tokenizes), then EOS when `end_with_eos` and the rule did not end with it; every token a target.
    Training ends documents with EOS so the model learns where text stops; `jaxllm eval` scores text exactly
    as transformers tokenizes it."""
    eos = tokenizer.eos_id if end_with_eos else None

    def encode(text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = tokenizer.encode(text, add_special_tokens=True)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return np.asarray(ids, np.int32), np.ones(len(ids), np.float32)

    return encode


@dataclass
class Corpus:
    train_docs: list[Any]  # strings, or conversations for data.format=sft
    eval_docs: list[Any]
    tokenizer: Tokenizer
    report: ReadReport
    floor: float | None  # synthetic corpus, byte tokens: exact entropy (nats/token) of the eval docs
    encode: Encoder | None = None  # None: plain text (text_encoder)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read (or generate) documents and split off every k-th one for evaluation."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    encode = None
    if cfg.format == "sft":
        from jaxllm.data.sft import ChatEncoder, load_template, read_conversations

        if cfg.source == "synthetic":
            raise ConfigError("data.format=sft needs data.source to be a .jsonl file of prompt/response or messages")
        docs, report = read_conversations(cfg.source)
        encode = ChatEncoder(tokenizer, load_template(cfg.chat_template, tokenizer), max_tokens=cfg.seq_len + 1)
        kept = [d for d in docs if encode(d)[1].any()]  # responses entirely past seq_len teach nothing
        for _ in range(len(docs) - len(kept)):
            report.skip(f"data.seq_len={cfg.seq_len}", "no response token within the first seq_len + 1 tokens")
        report.documents, docs = len(kept), kept
    elif cfg.source == "synthetic":
        docs = generate_documents(cfg.synthetic_docs, seed=cfg.seed)
        report = ReadReport(documents=len(docs))
    elif cfg.source == "stdlib":
        from jaxllm.data.stdlib import read_stdlib

        docs, report = read_stdlib()
    elif cfg.source == "wikipedia":
        from jaxllm.data.wikipedia import read_wikipedia

        docs, report = read_wikipedia()
    else:
        docs, report = read_documents(cfg.source, cfg.text_field)
    every = max(2, round(1 / cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
    eval_docs = docs[::every] if every else []
    train_docs = [d for i, d in enumerate(docs) if not every or i % every]
    floor = None
    if cfg.source == "synthetic" and cfg.tokenizer == "byte":
        nats, targets = map(sum, zip(*map(document_entropy, eval_docs or docs)))
        floor = nats / targets
    if not train_docs:
        raise ConfigError(f"data.source={cfg.source!r}: no training documents left after the eval split")
    return Corpus(train_docs, eval_docs, tokenizer, report, floor, encode)


class _Windows(grain.experimental.FlatMapTransform):
    """Split (ids, weights) into windows of seq_len + 1 tokens overlapping by one: inputs, targets and
    the targets' loss weights."""

    max_fan_out = 4096

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, doc: tuple[np.ndarray, np.ndarray]) -> Sequence[dict[str, np.ndarray]]:
        ids, weights = doc
        out = []
        for s in range(0, max(len(ids) - 1, 1), self.seq_len):
            w = ids[s : s + self.seq_len + 1]
            if len(w) > 1:
                out.append({"inputs": w[:-1], "targets": w[1:], "weights": weights[s + 1 : s + len(w)]})
        return out


def _finish(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "inputs": row["inputs"],
        "targets": row["targets"],
        "positions": row["inputs_positions"],
        "segment_ids": row["inputs_segment_ids"],
        "loss_mask": (row["targets_segment_ids"] != 0).astype(np.float32) * row["weights"],
    }


def make_batches(
    docs: Sequence[Any],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    repeat: bool,
    encode: Encoder | None = None,
) -> grain.IterDataset:
    """Packed batches {inputs, targets, positions, segment_ids: int32 [B, T]; loss_mask: f32 [B, T]}.

    (Multi-process runs use `RowStreams`, which gives each global batch row its own stream.)
    With `repeat` the documents are reshuffled every epoch and the stream never ends; without it
    the documents are read once in order and a final short batch is padded with empty rows.
    `encode` turns a document into tokens and loss weights (default: plain text with `tokenizer`).
    """
    ds = grain.MapDataset.source(list(docs))
    if repeat:
        ds = ds.shuffle(seed=seed).repeat()
    # documents are in memory and encoding holds the GIL: read in the calling thread, as grain advises (its
    # default, 16 threads prefetching 500 documents, costs each of RowStreams' per-row streams its own pool)
    ds = ds.map(encode or text_encoder(tokenizer)).to_iter_dataset(READ_IN_CALLER)
    ds = grain.experimental.FlatMapIterDataset(ds, _Windows(seq_len))
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"inputs": seq_len, "targets": seq_len, "weights": seq_len}, num_packing_bins=max(4, batch_size),
        seed=seed, shuffle_bins=repeat,
    )
    ds = ds.batch(batch_size, drop_remainder=repeat).map(_finish)
    return ds if repeat else ds.map(lambda b: _pad_rows(b, batch_size))


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pad a final short batch with empty rows (segment 0, no loss) so every batch has `rows` rows."""
    missing = rows - len(batch["inputs"])
    return {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()} if missing else batch




def local_rows(global_batch: int, process_index: int, process_count: int) -> range:
    """The contiguous block of global batch rows a process holds (jax's layout for a batch-sharded
    global array built by `make_array_from_process_local_data`)."""
    per = global_batch // process_count
    return range(process_index * per, (process_index + 1) * per)


class RowStreams:
    """Global batches whose row r always comes from its own packed stream over documents r::B.

    A process iterates only the rows it holds, so the global batch (and the loss) is the same for
    any number of processes, and the state, one entry per row, restores onto another topology.
    """

    def __init__(
        self, docs: Sequence[Any], tokenizer: Tokenizer, *, seq_len: int, global_batch: int, seed: int,
        rows: Sequence[int], repeat: bool, encode: Encoder | None = None,
    ):
        self.seq_len = seq_len
        self._its = {
            r: iter(make_batches(docs[r::global_batch], tokenizer, seq_len=seq_len, batch_size=1, seed=seed + r,
                                 repeat=repeat, encode=encode))
            for r in rows
        }

    def __iter__(self) -> RowStreams:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch, any_left = self.next_or_empty()
        if not any_left:
            raise StopIteration
        return batch

    def next_or_empty(self) -> tuple[dict[str, np.ndarray], bool]:
        """The next rows, an exhausted row (only without repeat) given as an empty one; and whether
        any row still had data."""
        rows, any_left = [], False
        for it in self._its.values():
            row = next(it, None)
            any_left |= row is not None
            rows.append(row if row is not None else _pad_rows({k: np.zeros((0, self.seq_len), v) for k, v in _DTYPES.items()}, 1))
        return {k: np.concatenate([r[k] for r in rows]) for k in _DTYPES}, any_left

    def get_state(self) -> dict[str, Any]:
        return {str(r): it.get_state() for r, it in self._its.items()}

    def set_state(self, state: dict[str, Any]) -> None:
        missing = [r for r in self._its if str(r) not in state]
        if missing:
            raise ValueError(f"data iterator state has no entry for rows {missing} (saved with another batch size?)")
        for r, it in self._its.items():
            it.set_state(state[str(r)])


_DTYPES = {"inputs": np.int32, "targets": np.int32, "positions": np.int32, "segment_ids": np.int32,
           "loss_mask": np.float32}


def calibration_rows(data: DataConfig, calibration: CalibrationConfig) -> Iterator[np.ndarray]:
    """The first `calibration.samples` packed rows [T] (token ids, T = data.seq_len) of `calibration.data` (read as
    `calibration.format`), or of the fine-tuning data `data` when that is empty."""
    if calibration.data:
        data = dataclasses.replace(data, source=calibration.data, format=calibration.format)
    corpus = load_corpus(data)
    batches = make_batches(corpus.train_docs, corpus.tokenizer, seq_len=data.seq_len, batch_size=1, seed=0,
                           repeat=False, encode=corpus.encode)
    return (np.asarray(b["inputs"][0]) for b in itertools.islice(iter(batches), calibration.samples))
