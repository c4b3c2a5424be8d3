"""S²FT (Yang et al., 2024): structured sparse fine-tuning. In every layer a few attention heads' rows of the output
projection `o` and a few channels' rows of the MLP's `down` train; every other weight stays frozen. The trained rows
are a separate leaf, a row delta D [k, out] over the chosen rows R of W [in, out]:
    y = x W + x[:, R] D,
so gradients and optimizer state exist for those rows only (not a mask over the whole kernel), and merging adds D
to those rows of W. D starts at zero (the base). Which rows: per layer, a random `head_fraction` of the heads (their
head_dim rows of `o`) and `channel_fraction` of the MLP's hidden channels (rows of `down`), at least one of each, drawn
from `seed`; the paper's default shares are ~5% / ~2%.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ConfigError, LoraConfig
from jaxllm.language_model import LanguageModel, Params
from jaxllm.nested import get_path, replace_path
from jaxllm.peft.lora import LoraAdapter, Target
from jaxllm.peft.lora_kernel import dense_matrix


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowDeltaKernel:
    """base [*in, *out] (an array or QuantizedKernel), rows [k] int32 (of the flattened input), delta [k, *out]; leaves
    may carry leading stacked-layer axes, `matmul` runs on one layer's slice."""

    base: Any
    rows: jax.Array
    delta: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    def matmul(self, x_MI: jax.Array, dtype: jnp.dtype) -> jax.Array:
        d_KO = self.delta.reshape(self.rows.shape[0], -1).astype(dtype)
        w_IO = dense_matrix(self.base, d_KO.shape[1], dtype)
        return x_MI @ w_IO + jnp.take(x_MI, self.rows, axis=1) @ d_KO


def chosen_rows(n_layers: int, groups: int, group_size: int, fraction: float, seed: int, salt: int) -> np.ndarray:
    """[L, k * group_size] sorted input rows: per layer, k = max(1, round(fraction * groups)) groups (heads or channels)
    drawn at random, each contributing its `group_size` consecutive rows."""
    k = max(1, round(fraction * groups))
    out = []
    for layer in range(n_layers):
        picked = np.sort(np.random.default_rng([seed, salt, layer]).choice(groups, k, replace=False))
        out.append((picked[:, None] * group_size + np.arange(group_size)).reshape(-1))
    return np.stack(out).astype(np.int32)


class S2ftAdapter(LoraAdapter):
    """Row deltas on a `head_fraction` of the `o` heads and a `channel_fraction` of the `down` channels per block."""

    def __init__(self, lm: LanguageModel, head_fraction: float, channel_fraction: float, seed: int):
        super().__init__(lm, LoraConfig(targets=["blocks.attn.o", "blocks.mlp.down"], rank=1))
        c = lm.cfg
        self.rows: dict[tuple[str, ...], np.ndarray] = {}
        for salt, t in enumerate(self.targets):
            if t.path[-1] == "o":
                groups, size, fraction = c.num_heads, c.resolved_head_dim, head_fraction
            else:
                groups, size, fraction = math.prod(t.in_shape), 1, channel_fraction
            if not 0 < fraction <= 1:
                raise ConfigError(f"S²FT share {fraction} of {t.name}'s {'heads' if size > 1 else 'channels'} must "
                                  "be within (0, 1]")
            self.rows[t.path] = chosen_rows(t.lead[0], groups, size, fraction, seed, salt)

    def _leaf_specs(self, t: Target) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
        k = self.rows[t.path].shape[1]
        return {"delta": ((*t.lead, k, *t.out_shape), (*t.axes[: t.n_lead], None, *t.axes[t.n_lead + t.n_in :]))}

    def init(self, key: jax.Array, base: Params) -> tuple[Params, Params]:
        """(zero deltas: the adapted model is the base, the frozen base); `key` is unused."""
        return self.zeros(), self.frozen_of(base)

    def apply(self, frozen: Params, adapter: Params, rng: jax.Array | None = None) -> Params:
        params = frozen
        for t in self.targets:
            kernel = RowDeltaKernel(get_path(frozen, t.path + ("kernel",)), jnp.asarray(self.rows[t.path]),
                                    get_path(adapter, t.path)["delta"])
            params = replace_path(params, t.path + ("kernel",), kernel)
        return params

    def delta(self, w_LIO: jax.Array, leaves: Params, t: Target) -> jax.Array:
        """D written into the chosen rows R of each layer, zeros elsewhere [L, I, O]."""
        d_LKO = jnp.asarray(leaves["delta"], jnp.float32).reshape(w_LIO.shape[0], -1, w_LIO.shape[2])
        return jax.vmap(lambda r, d: jnp.zeros(w_LIO.shape[1:], jnp.float32).at[r].set(d))(
            jnp.asarray(self.rows[t.path]), d_LKO)

    def flops_per_token(self) -> int:
        """6 per delta weight (the gathered rows' forward, input and weight gradients)."""
        return 6 * self.num_params
