"""Half fine-tuning (`finetune.method=hft`, `finetune.hft.seed`): the layer stack trains under a per-layer mask that
lets half of each category's matrices move (`jaxllm.peft.half_finetune`); params outside the stack stay frozen."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.language_model import Params
from jaxllm.peft.half_finetune import half_masks, split_stacked
from jaxllm.train.methods.base_model import Base, fresh_copies, load_base
from jaxllm.train.methods.method import Prepared, TrainingMethod
from jaxllm.train.methods.registry import register


@register("hft")
class HalfFinetune(TrainingMethod):
    def _split(self, tree: Params) -> tuple[Params, Params]:
        return split_stacked(tree, self.lm.logical_axes)

    def prepare(self, mesh: Mesh, key: jax.Array, base: Base) -> Prepared:
        trained, frozen = self._split(load_base(self.cfg, self.lm, mesh, base))
        shardings = self._split(self.lm.param_shardings(mesh))[0]
        return Prepared(fresh_copies(trained, shardings), shardings, frozen)

    def to_model(self, trained: Params, frozen: Params, rng: jax.Array | None) -> Params:
        return {**frozen, **trained}

    def update_mask(self, trained: Params) -> Params:
        return jax.tree.map(jnp.asarray, half_masks(trained, self.cfg.finetune.hft.seed))

    def flops_per_token(self, seq_len: int) -> float:
        """Full fine-tuning's less the output head's weight gradient (frozen); the stack's frozen halves still get
        theirs computed (one array holds every layer's), then masked."""
        c = self.lm.cfg
        return self.lm.flops_per_token(seq_len, frozen_matmul_params=c.vocab_size * c.d_model)

    def describe(self, trained_abstract: Params) -> str:
        masks = half_masks(trained_abstract, self.cfg.finetune.hft.seed)
        moving = sum(int(m.sum()) * x.size // x.shape[0] for m, x in zip(jax.tree.leaves(masks),
                                                                          jax.tree.leaves(trained_abstract)))
        return (f"{moving:,} of {self.lm.num_params:,} params train (half of each layer's attention, MLP and norm "
                f"matrices, seed {self.cfg.finetune.hft.seed}); embeddings and head frozen")
