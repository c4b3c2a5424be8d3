"""MaskLLM (`finetune.method=maskllm`, `finetune.maskllm`): learned 2:4 masks on the frozen weights of the target maps
(`jaxllm.compress.maskllm`). The trained params are the masks' logits, started from a prior (Wanda 2:4 on
`finetune.calibration` rows, magnitude 2:4, or none); each step samples masks by Gumbel-softmax with the temperature
and logit scale annealed over `train.steps`; evaluation and the finished model use the argmax patterns, so the run
loads as the pruned model (`generate`, `eval`, `convert`, `jaxllm compress`'s outputs alike)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.compress.maskllm import hard_mask, logits_axes, logits_shape, prior_logits, soft_mask
from jaxllm.compress.prune import PruneSpec, input_norms, keep_mask
from jaxllm.config import Config, ConfigError
from jaxllm.language_model import LanguageModel, Params
from jaxllm.nested import get_path, merge_into, replace_path
from jaxllm.peft.lora import find_targets
from jaxllm.sharding import param_shardings
from jaxllm.train.methods.base_model import Base, fresh_copies, load_base
from jaxllm.train.methods.method import Prepared, TrainingMethod
from jaxllm.train.methods.registry import register


@register("maskllm")
class MaskLlm(TrainingMethod):
    def __init__(self, cfg: Config, lm: LanguageModel):
        super().__init__(cfg, lm)
        self.spec = cfg.finetune.maskllm
        self.targets = find_targets(lm, self.spec.targets, "finetune.maskllm.targets")
        for t in self.targets:
            if t.in_shape[-1] % 4:
                raise ConfigError(f"finetune.method=maskllm: {t.name}'s input axis ({t.in_shape[-1]}) does not split "
                                  "into groups of 4")

    def _tree(self, leaf) -> Params:
        tree: Params = {}
        for t in self.targets:
            merge_into(tree, t.path, {"logits": leaf(t)})
        return tree

    def prepare(self, mesh: Mesh, key: jax.Array, base: Base) -> Prepared:
        params = load_base(self.cfg, self.lm, mesh, base)
        shapes = self._tree(lambda t: jax.ShapeDtypeStruct(logits_shape(t), jnp.float32))
        shardings = param_shardings(self._tree(logits_axes), shapes, mesh, self.lm.rules)
        logits = jax.device_put(self._prior(params), shardings)
        scalar = lambda x: jax.device_put(jnp.float32(x), NamedSharding(mesh, PartitionSpec()))
        frozen = {"params": params, "tau": scalar(self.spec.tau_start), "scale": scalar(self.spec.scale_start)}
        return Prepared(fresh_copies(logits, shardings), shardings, frozen)

    def _prior(self, params: Params) -> Params:
        """Starting logits: zeros, or favouring the 2:4 patterns of the prior (magnitude or Wanda)."""
        s = self.spec
        if s.prior == "none":
            return self._tree(lambda t: jnp.zeros(logits_shape(t), jnp.float32))
        norms = None
        if s.prior == "wanda":
            rows = self.calibration_rows()
            if not rows:
                raise ConfigError("finetune.maskllm.prior=wanda: finetune.calibration.data holds no text")
            norms = input_norms(self.lm, params, self.targets, rows)
        spec = PruneSpec(method=s.prior, pattern=(2, 4))

        def one(t):
            I, O = math.prod(t.in_shape), math.prod(t.out_shape)
            w_LIO = get_path(params, t.path + ("kernel",)).reshape(-1, I, O)
            n_LI = None if norms is None else get_path(norms, t.path)["stat"].reshape(-1, I)
            keep = jnp.stack([keep_mask(w_LIO[i], None if n_LI is None else n_LI[i], spec)
                              for i in range(w_LIO.shape[0])])
            return prior_logits(t, keep.reshape(t.shape), s.prior_strength, s.scale_start)

        return self._tree(one)

    def _schedule(self, step: int) -> tuple[float, float]:
        """(tau, scale) at `step`: tau geometric from tau_start to tau_end, scale linear, over train.steps."""
        s, frac = self.spec, min(step / max(self.cfg.train.steps - 1, 1), 1.0)
        return s.tau_start * (s.tau_end / s.tau_start) ** frac, s.scale_start + (s.scale_end - s.scale_start) * frac

    def frozen_at(self, frozen: Params, step: int) -> Params:
        tau, scale = self._schedule(step)
        return {**frozen, "tau": jnp.float32(tau), "scale": jnp.float32(scale)}

    def to_model(self, trained: Params, frozen: Params, rng: jax.Array | None) -> Params:
        """The frozen weights times sampled masks (`rng`: training) or the argmax masks (None: evaluation)."""
        params = frozen["params"]
        for i, t in enumerate(self.targets):
            logits = get_path(trained, t.path)["logits"]
            mask = (hard_mask(t, logits) if rng is None else
                    soft_mask(t, logits, jax.random.fold_in(rng, i), frozen["tau"], frozen["scale"]))
            kernel = get_path(params, t.path + ("kernel",))
            params = replace_path(params, t.path + ("kernel",), kernel * mask.astype(kernel.dtype))
        return params

    def model_params(self, trained: Params, frozen: Params, step: int) -> Params:
        return jax.jit(lambda t, f: self.to_model(t, f, None))(trained, frozen)

    def step_metrics(self, step: int) -> dict[str, float]:
        tau, scale = self._schedule(step)
        return {"maskllm/tau": tau, "maskllm/scale": scale}

    def flops_per_token(self, seq_len: int) -> float:
        """The masked maps get weight gradients (the logits' gradient is dL/dW' * W); the rest do not."""
        masked = sum(math.prod(t.shape) for t in self.targets)
        lm = self.lm
        return lm.flops_per_token(seq_len, frozen_matmul_params=lm.active_matmul_params - masked)

    def describe(self, trained_abstract: Params) -> str:
        n = sum(x.size for x in jax.tree.leaves(trained_abstract))
        return (f"{n:,} mask logits (6 patterns per 4 weights) on {len(self.targets)} linear maps of a frozen "
                f"{self.lm.num_params:,}-param base; prior {self.spec.prior}")
