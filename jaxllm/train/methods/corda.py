"""CorDA (`finetune.method=corda`, `finetune.corda.mode: ipm | kpm`): before training, a calibration pass over
`finetune.corda.samples` token rows (of `finetune.corda.data`, or the fine-tuning data when empty) collects each
target's input covariance on the base; the adapters come from the covariance-oriented SVD (`jaxllm.peft.corda`)
and then train as a residual-init LoRA (rank, alpha, targets from `finetune.lora`)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from jaxllm.config import Config, ConfigError
from jaxllm.data.pipeline import load_corpus, make_batches
from jaxllm.language_model import LanguageModel, Params
from jaxllm.peft.corda import CordaAdapter
from jaxllm.train.methods.lora import Lora
from jaxllm.train.methods.registry import register


def calibration_rows(cfg: Config) -> Iterator[np.ndarray]:
    """The first `finetune.corda.samples` packed rows [T] of the calibration data (token ids)."""
    c = cfg.finetune.corda
    data = dataclasses.replace(cfg.data, source=c.data, format=c.format) if c.data else cfg.data
    corpus = load_corpus(data)
    batches = make_batches(corpus.train_docs, corpus.tokenizer, seq_len=data.seq_len, batch_size=1, seed=0,
                           repeat=False, encode=corpus.encode)
    return (np.asarray(b["inputs"][0]) for b in itertools.islice(iter(batches), c.samples))


@register("corda")
class Corda(Lora):
    kind = "CorDA"

    @staticmethod
    def make_adapter(lm: LanguageModel, cfg: Config) -> CordaAdapter:
        return CordaAdapter(lm, cfg.finetune.lora, cfg.finetune.corda.mode)

    def initialise(self, key: jax.Array, base: Params, mesh: Mesh) -> tuple[Params, Params]:
        try:
            self.adapter.calibrate(base, calibration_rows(self.cfg))
        except ValueError as err:  # no rows
            raise ConfigError(f"finetune.method=corda: {err}; finetune.corda.data holds no calibration text") from err
        trained, frozen = self.adapter.init(key, jax.device_get(base))
        return (jax.device_put(trained, self.adapter.shardings(mesh)),
                jax.device_put(frozen, self.adapter.frozen_shardings(mesh)))
