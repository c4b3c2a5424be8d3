"""Full fine-tuning: every param of the base trains (sparse upcycling too: a dense base into an MoE model)."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from jaxllm.train.methods.base_model import Base, fresh_copies, load_base
from jaxllm.train.methods.method import Prepared, TrainingMethod
from jaxllm.train.methods.registry import register


@register("full")
class FullFinetune(TrainingMethod):
    def prepare(self, mesh: Mesh, key: jax.Array, base: Base) -> Prepared:
        shardings = self.lm.param_shardings(mesh)
        return Prepared(fresh_copies(load_base(self.cfg, self.lm, mesh, base), shardings), shardings)
