"""Structured feed-forward maps (Wei, Moalla, Pascanu, Gulcehre, 2024): a dense W [in, out] replaced by

    lowrank       x -> (x V) U                       V [in, r], U [r, out]
    blockdense    x -> BD(x, V) U                    V: b blocks [in/b, r/b], U [r, out]
    blockshuffle  x -> P^-1 BD(P BD(x, V), U)        V: b blocks [in/b, m/b], U: b blocks [m/b, out/b], m = min(in, out)

where BD is a block-diagonal product (the Pallas block-sparse kernel, or a batched einsum) and P the
Monarch channel shuffle ([b, n/b] -> [n/b, b]). With no nonlinearity between the factors each map equals
one dense matrix (`dense_kernel`), which decoding can use instead. Sizes come from `mlp.rank` /
`mlp.blocks`, else from `mlp.param_fraction` of the dense map's in * out params.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ConfigError, MlpConfig, ModelConfig
from jaxllm.models.layers import make_param
from kernels_pallas.backend import backend_for, current_platform
from kernels_pallas.block_sparse_matmul import BlockLayout, block_sparse_matmul, plan
from kernels_pallas.choose import matmul_impl


@dataclass(frozen=True)
class Sizes:
    rank: int | None  # lowrank / blockdense inner width
    blocks: int | None  # blockdense / blockshuffle block count


def structure_sizes(mlp: MlpConfig, i: int, o: int) -> Sizes:
    """Rank and blocks of one structured map [i -> o]; ConfigError when they do not fit."""
    f = mlp.param_fraction
    if mlp.structure == "lowrank":
        r = mlp.rank or max(1, round(f * i * o / (i + o)))
        if r > min(i, o):
            raise ConfigError(f"model.mlp.rank={r} exceeds min(in, out) = {min(i, o)} of a {i} x {o} FFN map")
        return Sizes(r, None)
    if mlp.structure == "blockdense":
        b = mlp.blocks or 4
        r = mlp.rank or max(b, round(f * i * o / (i / b + o) / b) * b)
        if i % b or r % b:
            raise ConfigError(f"model.mlp.blocks={b} must divide the FFN map's input width {i} and rank {r}")
        return Sizes(r, b)
    if mlp.structure == "blockshuffle":
        common = [b for b in range(1, math.gcd(i, o) + 1) if i % b == 0 and o % b == 0]
        m = min(i, o)
        b = mlp.blocks or min(common, key=lambda b: abs(m * (i + o) / b - f * i * o))
        if i % b or o % b:
            raise ConfigError(f"model.mlp.blocks={b} must divide the FFN map's widths {i} and {o}")
        return Sizes(None, b)
    raise ConfigError(f"model.mlp.structure={mlp.structure!r} has no sizes")


def structured_params(structure: str, sizes: Sizes, i: int, o: int) -> int:
    """Parameters of one structured map (FLOPs per token are twice this)."""
    r, b = sizes.rank, sizes.blocks
    return {"lowrank": lambda: r * (i + o), "blockdense": lambda: i * r // b + r * o,
            "blockshuffle": lambda: min(i, o) * (i + o) // b}[structure]()


def block_diagonal(x_MI: jax.Array, w_JIO: jax.Array, impl: str) -> jax.Array:
    """x [M, J * I] @ blockdiag(w [J, I, O]) -> [M, J * O] (J diagonal blocks)."""
    b, i, o = w_JIO.shape
    if impl == "auto":
        fits = plan(x_MI.shape[0], i, o, x_MI.dtype, backend_for(current_platform())).fits
        impl = matmul_impl(impl, what="block-diagonal matmul", fits=fits)
    if impl == "pallas":
        return block_sparse_matmul(x_MI, w_JIO, BlockLayout.block_diagonal(b, i, o), impl="pallas")
    y_MJO = jnp.einsum("mji,jio->mjo", x_MI.reshape(-1, b, i), w_JIO)
    return y_MJO.reshape(-1, b * o)


def shuffle(x_MI: jax.Array, blocks: int) -> jax.Array:
    """Monarch's channel shuffle: channels viewed [blocks, C / blocks] -> [C / blocks, blocks]."""
    n, c = x_MI.shape
    return x_MI.reshape(n, blocks, c // blocks).swapaxes(1, 2).reshape(n, c)


def structured_apply(structure: str, blocks: int | None, impl: str, x_MI: jax.Array, v: jax.Array, u: jax.Array):
    """The structured map of factors (v, u) on rows x [M, in] -> [M, out]."""
    if structure == "lowrank":
        return (x_MI @ v) @ u
    if structure == "blockdense":
        return block_diagonal(x_MI, v, impl) @ u
    h = shuffle(block_diagonal(x_MI, v, impl), blocks)
    y = block_diagonal(h, u, impl)
    return shuffle(y, y.shape[1] // blocks)  # P^-1 on the outputs: [out/b, b] <- [b, out/b]


def merge_structured(cfg: ModelConfig, params: dict) -> dict:
    """Params of the same model with dense FFN maps: each {v, u} (stacked over layers) becomes the
    {kernel} it equals. Pure; for `cfg.mlp.structure != "dense"`."""
    D, F = cfg.d_model, cfg.mlp.d_ff
    mlp = dict(params["blocks"]["mlp"])
    for name, (i, o) in (("gate", (D, F)), ("up", (D, F)), ("down", (F, D))):
        if name not in mlp:
            continue
        blocks = structure_sizes(cfg.mlp, i, o).blocks
        eye = jnp.eye(i, dtype=jnp.float32)
        one = lambda v, u: structured_apply(cfg.mlp.structure, blocks, "xla", eye, v.astype(jnp.float32),
                                            u.astype(jnp.float32))
        kernel = jax.vmap(one)(mlp[name]["v"], mlp[name]["u"])
        mlp[name] = {"kernel": kernel.astype(mlp[name]["v"].dtype)}
    return {**params, "blocks": {**params["blocks"], "mlp": mlp}}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GuidedKernel:
    """A dense guide [*lead, i, o] with its mixing weight a [*lead] (and a PRNG key [*lead] when sampled)."""

    kernel: jax.Array
    alpha: jax.Array
    key: jax.Array | None = None
    sampled: bool = dataclasses.field(metadata=dict(static=True), default=False)


def guide_alpha(step: int, decay_steps: int, schedule: str) -> float:
    """The guide's weight a at `step`: 1 -> 0 over `decay_steps` (cosine or linear), then 0."""
    t = min(1.0, step / decay_steps) if decay_steps > 0 else 1.0
    return 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1.0 - t


def with_guide(params: dict, alpha: jax.Array | float, key: jax.Array | None = None, sampled: bool = False) -> dict:
    """Params whose dense guides carry mixing weight `alpha` (and, with `sampled`, a key per layer to
    draw whether the dense path runs). Without this wrapper a guide acts with a = 1."""
    mlp = dict(params["blocks"]["mlp"])
    for i, name in enumerate(sorted(mlp)):
        if "guide" not in mlp[name]:
            continue
        g = mlp[name]["guide"]
        layers = g.shape[0]
        keys = jax.random.split(jax.random.fold_in(key, i), layers) if sampled and key is not None else None
        kernel = GuidedKernel(g, jnp.full((layers,), alpha, jnp.float32), keys, sampled and key is not None)
        mlp[name] = {**mlp[name], "guide": kernel}
    return {**params, "blocks": {**params["blocks"], "mlp": mlp}}


def drop_guides(tree):
    """`tree` (params, or any tree holding them, e.g. optimizer state) without the `guide` entries."""
    if isinstance(tree, dict):
        return {k: drop_guides(v) for k, v in tree.items() if k != "guide"}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(drop_guides(v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(drop_guides(v) for v in tree)
    return tree


class StructuredLinear(nnx.Module):
    """A structured stand-in for `Dense((i,), (o,), (in_axis, out_axis))` without bias: [..., i] -> [..., o].

    Initialised so the product has the dense init's std (factor V ~ N(0, 1/fan_in), U scaled up)."""

    def __init__(self, cfg: ModelConfig, i: int, o: int, axes: tuple[str, str], *, std: float, rngs: nnx.Rngs):
        m = cfg.mlp
        self.structure, self.impl, self.dtype = m.structure, m.impl, jnp.dtype(cfg.dtype)
        sizes = structure_sizes(m, i, o)
        self.rank, self.blocks, self.i, self.o = sizes.rank, sizes.blocks, i, o
        pdt = jnp.dtype(cfg.param_dtype)
        normal = nnx.initializers.normal
        in_axis, out_axis = axes
        r, b = sizes.rank, sizes.blocks
        if m.structure == "lowrank":
            self.v = make_param(rngs, normal(1 / math.sqrt(i)), (i, r), (in_axis, None), pdt)
            self.u = make_param(rngs, normal(std * math.sqrt(i / r)), (r, o), (None, out_axis), pdt)
        elif m.structure == "blockdense":
            self.v = make_param(rngs, normal(math.sqrt(b / i)), (b, i // b, r // b), ("mlp_blocks", None, None), pdt)
            self.u = make_param(rngs, normal(std * math.sqrt(i / r)), (r, o), (None, out_axis), pdt)
        else:
            mid = min(i, o)
            paths = max(1, mid // (b * b))  # intermediates linking one input to one output
            self.v = make_param(rngs, normal(math.sqrt(b / i)), (b, i // b, mid // b), ("mlp_blocks", None, None), pdt)
            self.u = make_param(rngs, normal(std * math.sqrt(i / b / paths)), (b, mid // b, o // b),
                                ("mlp_blocks", None, None), pdt)

        # self-guided training: a dense guide starting at the factors' product
        self.guide = (nnx.Param(self.dense_kernel().astype(pdt), out_sharding=tuple(axes), eager_sharding=False)
                      if m.guide_fraction > 0 else None)

    @property
    def num_params(self) -> int:
        return structured_params(self.structure, Sizes(self.rank, self.blocks), self.i, self.o)

    def _apply(self, x_MI: jax.Array, v: jax.Array, u: jax.Array) -> jax.Array:
        return structured_apply(self.structure, self.blocks, self.impl, x_MI, v, u)

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        x_MI = x.astype(self.dtype).reshape(-1, self.i)
        y = self._apply(x_MI, self.v[...].astype(self.dtype), self.u[...].astype(self.dtype))
        if self.guide is not None:
            y = self._guided(x_MI, y, self.guide.get_value())
        return y.reshape(*lead, self.o)

    def _guided(self, x_MI: jax.Array, y_MO: jax.Array, guide) -> jax.Array:
        """a * x W + (1 - a) * y; sampled: the dense term only with probability a, else y alone."""
        if not isinstance(guide, GuidedKernel):
            return x_MI @ guide.astype(self.dtype)
        a = guide.alpha.astype(self.dtype)
        mixed = lambda: a * (x_MI @ guide.kernel.astype(self.dtype)) + (1 - a) * y_MO
        if not guide.sampled:
            return mixed()
        return jax.lax.cond(jax.random.bernoulli(guide.key, guide.alpha), mixed, lambda: y_MO)

    def dense_kernel(self) -> jax.Array:
        """The equal dense matrix [i, o] (f32): the map applied to the identity."""
        eye = jnp.eye(self.i, dtype=jnp.float32)
        return self._apply(eye, self.v[...].astype(jnp.float32), self.u[...].astype(jnp.float32))
