"""The grain pipeline: documents -> tokens -> windows of seq_len+1 -> packed rows -> batches.

Rows hold several documents, told apart by `segment_ids` (0 = padding) with `positions` restarting at
each document; `loss_mask` is 1 on real targets. Iterators are grain's, so their state (a small dict)
is checkpointed with the model and a resumed run continues with the exact next batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import grain
import numpy as np

from jaxllm.config import ConfigError, DataConfig
from jaxllm.data.sources import ReadReport, read_documents
from jaxllm.data.synthetic import document_entropy, generate_documents
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer


@dataclass
class Corpus:
    train_docs: list[str]
    eval_docs: list[str]
    tokenizer: Tokenizer
    report: ReadReport
    floor: float | None  # synthetic corpus, byte tokens: exact entropy (nats/token) of the eval docs


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read (or generate) documents and split off every k-th one for evaluation."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    if cfg.source == "synthetic":
        docs = generate_documents(cfg.synthetic_docs, seed=cfg.seed)
        report = ReadReport(documents=len(docs))
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
    return Corpus(train_docs, eval_docs, tokenizer, report, floor)


class _Windows(grain.experimental.FlatMapTransform):
    """Split a token array into windows of seq_len + 1 tokens overlapping by one (inputs + targets)."""

    max_fan_out = 4096

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, ids: np.ndarray) -> Sequence[np.ndarray]:
        starts = range(0, max(len(ids) - 1, 1), self.seq_len)
        return [ids[s : s + self.seq_len + 1] for s in starts if len(ids[s : s + self.seq_len + 1]) > 1]


def _finish(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "inputs": row["inputs"],
        "targets": row["targets"],
        "positions": row["inputs_positions"],
        "segment_ids": row["inputs_segment_ids"],
        "loss_mask": (row["targets_segment_ids"] != 0).astype(np.float32),
    }


def make_batches(
    docs: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    repeat: bool,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Packed batches {inputs, targets, positions, segment_ids: int32 [B, T]; loss_mask: f32 [B, T]}.

    Each process reads documents process_index::process_count and yields its batch_size rows.
    With `repeat` the documents are reshuffled every epoch and the stream never ends; without it
    the documents are read once in order and a final short batch is padded with empty rows.
    """
    bos, eos = tokenizer.bos_id, tokenizer.eos_id

    def tokenize(text: str) -> np.ndarray:
        ids = ([bos] if bos is not None else []) + tokenizer.encode(text) + ([eos] if eos is not None else [])
        return np.asarray(ids, np.int32)

    ds = grain.MapDataset.source(list(docs))[process_index::process_count]
    if repeat:
        ds = ds.shuffle(seed=seed).repeat()
    ds = ds.map(tokenize).to_iter_dataset()
    ds = grain.experimental.FlatMapIterDataset(ds, _Windows(seq_len))
    ds = ds.map(lambda w: {"inputs": w[:-1], "targets": w[1:]})
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"inputs": seq_len, "targets": seq_len}, num_packing_bins=batch_size,
        seed=seed, shuffle_bins=repeat,
    )
    ds = ds.batch(batch_size, drop_remainder=repeat).map(_finish)
    return ds if repeat else ds.map(lambda b: _pad_rows(b, batch_size))


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pad a final short batch with empty rows (segment 0, no loss) so every batch has `rows` rows."""
    missing = rows - len(batch["inputs"])
    return {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()} if missing else batch


