"""What the method experiments share: the real corpus they train on, seeds, and the two-standard-deviation rule.

Corpus: the Python standard library's source (`data.source=stdlib`, held-out files every 50th) with a 4,096-token
byte-level BPE learned from its training files (cached under $JAXLLM_CACHE/experiments, default ~/.cache/jaxllm).
A seed sets the initialisation (`train.seed`); by default every run reads the same batches in the same order
(`data.seed=0`), so runs of two methods with one seed differ only by the method and its initial values. Methods
whose initial values do not depend on a seed (PiSSA's SVD) vary the data order with the seed instead.

A difference between two runs' means is stated only when it exceeds twice the standard deviation of that
difference across seeds, 2 * sqrt(std_a^2 / n_a + std_b^2 / n_b) with sample standard deviations; otherwise the
experiments report "no difference at this scale".
"""

from __future__ import annotations

import json
import math
import os
import sysconfig
from pathlib import Path

VOCAB = 4096
EVAL_BATCHES = 24  # held-out batches per evaluation: the same 24 x 8 x 256 tokens for every run


def tokenizer_dir(vocab: int = VOCAB) -> Path:
    """A BPE tokenizer trained on the stdlib's training files (cached: the same files always give the same one)."""
    from jaxllm.config import DataConfig
    from jaxllm.data.pipeline import load_corpus
    from jaxllm.data.tokenizer_training import train_tokenizer

    tag = Path(sysconfig.get_paths()["stdlib"]).name  # e.g. python3.11: another stdlib, another tokenizer
    out = Path(os.environ.get("JAXLLM_CACHE", Path.home() / ".cache" / "jaxllm")) / "experiments" / f"stdlib-bpe-{vocab}-{tag}"
    if not (out / "tokenizer.json").exists():
        train_tokenizer(load_corpus(DataConfig(source="stdlib")).train_docs, vocab, out)
    return out


def corpus_overrides(vocab: int = VOCAB) -> list[str]:
    """Config overrides that train and evaluate on the stdlib corpus with its BPE tokenizer."""
    return ["data.source=stdlib", f"data.tokenizer={tokenizer_dir(vocab)}", f"model.vocab_size={vocab}",
            f"train.eval_batches={EVAL_BATCHES}"]


def shape_overrides(d_model: int, layers: int, d_ff: int) -> list[str]:
    """A small model's shape: heads of 32 dims, one kv head per 64 dims of d_model."""
    return [f"model.d_model={d_model}", f"model.num_layers={layers}", f"model.num_heads={max(1, d_model // 32)}",
            f"model.num_kv_heads={max(1, d_model // 64)}", f"model.mlp.d_ff={d_ff}"]


def seed_overrides(seed: int, data_order: bool = False) -> list[str]:
    return [f"train.seed={seed}"] + ([f"data.seed={seed}"] if data_order else [])


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return m, math.sqrt(var)


def differs(a: list[float], b: list[float]) -> bool:
    """True when mean(a) - mean(b) exceeds two standard deviations of that difference across seeds."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    return abs(ma - mb) > 2 * math.sqrt(sa**2 / len(a) + sb**2 / len(b))


def compare(a: list[float], b: list[float], name_a: str, name_b: str, what: str = "eval loss") -> str:
    """One sentence: which has the lower `what` by how much, or "no difference at this scale"."""
    if not differs(a, b):
        return f"{name_a} vs {name_b}: no difference at this scale ({what} {fmt(a)} vs {fmt(b)})"
    lower, higher = (name_a, name_b) if mean_std(a)[0] < mean_std(b)[0] else (name_b, name_a)
    return (f"{lower} has the lower {what} by {abs(mean_std(a)[0] - mean_std(b)[0]):.3f} (> 2 std; "
            f"{name_a} {fmt(a)}, {name_b} {fmt(b)})")


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


class Results:
    """Runs' results in a JSON file, written after every run so an interrupted experiment resumes where it was."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        old = json.loads(path.read_text()) if path.exists() else {}
        same = old.get("settings") == json.loads(json.dumps(meta.get("settings")))  # tuples come back as lists
        self.previous = old if same else {}  # what the resumed file said besides its runs (e.g. its base's scores)
        self.runs: dict[str, dict] = self.previous.get("runs", {})
        for run in self.runs.values():  # runs recorded before runs carried their own commit: the file's
            run.setdefault("commit", old.get("commit"))
        self.meta = meta

    def __contains__(self, key: str) -> bool:
        return key in self.runs

    def add(self, key: str, result: dict) -> None:
        self.runs[key] = {**result, "commit": self.meta.get("commit")}
        self.save()

    def require_same(self, name: str, value) -> None:
        """Resuming: stop unless `value` equals what the resumed file recorded as `name` (e.g. the base model's
        scores: runs that adapted another base would not be comparable)."""
        was = self.previous.get(name)
        if self.runs and was is not None and was != json.loads(json.dumps(value)):
            raise SystemExit(f"{self.path}: {name} is {value}, but the recorded runs had {was}; move the file away to "
                             "start over")

    def commits(self) -> list[str]:
        """The commits the runs ran at."""
        return sorted({str(r.get("commit")) for r in self.runs.values()})

    def save(self, **extra) -> None:
        self.path.write_text(json.dumps({**self.meta, **extra, "runs": self.runs}, indent=1) + "\n")
