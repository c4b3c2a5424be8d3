"""MiSS (peft's name for Bone, Kang 2024, block-affine adaptation, and its Bat variant) as kernel pytrees.

With a target's kernel W [in, out] and the rank r:
- **Bone**: a trainable `block` b [r, out] is added to every r-row block of W (row i gets b[i mod r]); the layer
  computes it without forming W': y = x W + (x summed over its r-wide blocks, zero-padded to a multiple of r) b.
- **Bat** (the weight guide): `block` B [out / r, r, r] in peft's layout; every r x r tile W_ca (input block c,
  output block a) becomes W_ca + B_a^T W_ca + B_a^T, so the update depends on W; the layer runs x (W + Delta(W))
  (and its weight gradient flows through W + Delta: one dW-sized matmul per step, as in peft).
Both start at zero, i.e. as the base. `merge` forms W'; `unmerge` inverts it (Bone: subtract; Bat: per tile
(I + B_a)^-T (W'_ca - B_a^T)). Rank, targets and quantisation come from `finetune.lora` (`alpha`, `dropout`,
`init` and `dora` do not apply).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import ConfigError, LoraConfig
from jaxllm.language_model import LanguageModel, Params
from jaxllm.nested import get_path, replace_path
from jaxllm.peft.lora import LoraAdapter, Target
from jaxllm.peft.lora_kernel import dense_matrix


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MissKernel:
    """base [*in, *out] (an array or QuantizedKernel) and `block` (Bone [r, *out]; Bat [out / r, r, r]); leaves may
    carry leading stacked-layer axes, `matmul` runs on one layer's slice."""

    base: Any
    block: jax.Array
    bat: bool = dataclasses.field(metadata=dict(static=True), default=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    def _out_size(self) -> int:
        return math.prod(self.block.shape[:2]) if self.bat else math.prod(self.block.shape[1:])

    def matmul(self, x_MI: jax.Array, dtype: jnp.dtype) -> jax.Array:
        w_IO = dense_matrix(self.base, self._out_size(), dtype)
        block = self.block.astype(dtype)
        if self.bat:  # the update depends on W: run the adapted kernel
            return x_MI @ (w_IO + bat_delta(w_IO, block))
        r = block.shape[0]
        pad = -x_MI.shape[1] % r
        summed_MR = jnp.pad(x_MI, ((0, 0), (0, pad))).reshape(x_MI.shape[0], -1, r).sum(axis=1)
        return x_MI @ w_IO + summed_MR @ block.reshape(r, -1)


def bone_rows(b_RO: jax.Array, n_in: int) -> jax.Array:
    """Bone's update [in, out]: row i is b[i mod r] (b [r, *out])."""
    r = b_RO.shape[0]
    return jnp.tile(b_RO.reshape(r, -1), (-(-n_in // r), 1))[:n_in]


def bat_delta(w_IO: jax.Array, b_ARR: jax.Array) -> jax.Array:
    """Bat's update of W [in, out] for blocks B [out / r, r, r]: per tile (c, a), B_a^T W_ca + B_a^T."""
    n_out, r = b_ARR.shape[0], b_ARR.shape[1]
    w_CQAP = w_IO.reshape(-1, r, n_out, r)
    delta_CKAP = jnp.einsum("cqap,aqk->ckap", w_CQAP, b_ARR) + jnp.transpose(b_ARR, (2, 0, 1))[None]
    return delta_CKAP.reshape(w_IO.shape)


def bat_undo(merged_IO: jax.Array, b_ARR: jax.Array) -> jax.Array:
    """W from W' = W + bat_delta(W, B): per tile, solve (I + B_a)^T W_ca = W'_ca - B_a^T."""
    n_out, r = b_ARR.shape[0], b_ARR.shape[1]
    m_CKAP = merged_IO.reshape(-1, r, n_out, r) - jnp.transpose(b_ARR, (2, 0, 1))[None]
    lhs_AKQ = jnp.transpose(jnp.eye(r, dtype=b_ARR.dtype) + b_ARR, (0, 2, 1))  # (I + B_a)^T
    rhs_AKM = jnp.transpose(m_CKAP, (2, 1, 0, 3)).reshape(n_out, r, -1)  # [a, k, (c, p)]
    w_AQM = jnp.linalg.solve(lhs_AKQ, rhs_AKM)
    return jnp.transpose(w_AQM.reshape(n_out, r, -1, r), (2, 1, 0, 3)).reshape(merged_IO.shape)


class MissAdapter(LoraAdapter):
    """Bone (`bat=False`) or Bat blocks on the linear maps `spec.targets` names, rank `spec.rank`."""

    def __init__(self, lm: LanguageModel, spec: LoraConfig, bat: bool = False):
        super().__init__(lm, dataclasses.replace(spec, init="lora", dora=False, rslora=False, dropout=0.0))
        self.bat = bat
        for t in self.targets:
            if bat and (math.prod(t.in_shape) % spec.rank or math.prod(t.out_shape) % spec.rank):
                raise ConfigError(f"finetune.method=bat needs finetune.lora.rank={spec.rank} to divide both sides of "
                                  f"{t.name} ({math.prod(t.in_shape)} x {math.prod(t.out_shape)})")

    def _leaf_specs(self, t: Target) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
        r, lead_axes = self.spec.rank, t.axes[: t.n_lead]
        if self.bat:
            return {"block": ((*t.lead, math.prod(t.out_shape) // r, r, r), (*lead_axes, None, None, None))}
        return {"block": ((*t.lead, r, *t.out_shape), (*lead_axes, None, *t.axes[t.n_lead + t.n_in :]))}

    def init(self, key: jax.Array, base: Params) -> tuple[Params, Params]:
        """(zero blocks: the adapted model is the base, the frozen base); `key` is unused."""
        return self.zeros(), self.frozen_of(base)

    def apply(self, frozen: Params, adapter: Params, rng: jax.Array | None = None) -> Params:
        params = frozen
        for t in self.targets:
            kernel = MissKernel(get_path(frozen, t.path + ("kernel",)), get_path(adapter, t.path)["block"], self.bat)
            params = replace_path(params, t.path + ("kernel",), kernel)
        return params

    def delta(self, w_LIO: jax.Array, leaves: Params, t: Target) -> jax.Array:
        """Bone: b's rows repeated down W; Bat: per tile B_a^T W_ca + B_a^T [L, I, O]."""
        block = jnp.asarray(leaves["block"], jnp.float32)
        b_L = block.reshape(w_LIO.shape[0], *block.shape[t.n_lead :])
        if self.bat:
            return jax.vmap(bat_delta)(w_LIO, b_L)
        return jax.vmap(lambda b: bone_rows(b, w_LIO.shape[1]))(b_L)

    def unmerged_matrix(self, merged_LIO: jax.Array, leaves: Params, t: Target) -> jax.Array:
        """Bone: subtract; Bat: its update depends on W, so solve each tile for it."""
        if not self.bat:
            return super().unmerged_matrix(merged_LIO, leaves, t)
        block = jnp.asarray(leaves["block"], jnp.float32)
        return jax.vmap(bat_undo)(merged_LIO, block.reshape(merged_LIO.shape[0], *block.shape[t.n_lead :]))

    def flops_per_token(self) -> int:
        """Adapter FLOPs per training token: Bone 6 per block weight (forward, input and weight gradients of the
        [r, out] matmul); Bat the weight gradient of every adapted kernel (2 per weight: its update is formed
        from W, so dW' = x^T dy is computed)."""
        if self.bat:
            return sum(2 * math.prod(t.shape) for t in self.targets)
        return 6 * self.num_params

