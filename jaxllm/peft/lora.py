"""LoRA and its variants as pure transforms of the params tree.

    adapter = LoraAdapter(lm, cfg.finetune.lora)
    lora, frozen = adapter.init(key, base_params)       # trainable adapter tree, frozen base tree
    logits = lm.apply(adapter.apply(frozen, lora), tokens)
    grads = jax.grad(lambda p: lm.loss(adapter.apply(frozen, p, rng), batch)[0])(lora)
    merged = adapter.merge(frozen, lora)               # plain dense params again

The adapter tree mirrors the module paths of its targets: {"blocks": {"attn": {"q": {"a", "b"}}}}
with `a` [*lead, *in, r], `b` [*lead, r, *out] (DoRA's `magnitude` [*lead, *out], SORSA's `s` [*lead, r]), where lead is
the stacked `layers` axis of block params. Several adapters on one base are several such trees;
pick one per call. `frozen` is the base with PiSSA-style residuals and, for QLoRA, quantised kernels.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.config import ConfigError, LoraConfig
from jaxllm.language_model import LanguageModel, Params
from jaxllm.nested import get_path, merge_into, replace_path
from jaxllm.peft.inits import INITS
from jaxllm.peft.lora_kernel import LoraKernel, column_norm
from jaxllm.peft.quantized_kernel import QuantizedKernel, quantize, quantized_logical_axes
from jaxllm.sharding import param_shardings


@dataclass(frozen=True)
class Target:
    """One adapted linear map: its module path and how its kernel's axes split."""

    path: tuple[str, ...]
    n_lead: int  # stacked-layer axes in front (1 for block params, 0 otherwise)
    n_in: int
    shape: tuple[int, ...]  # the kernel's full shape
    axes: tuple[str | None, ...]  # the kernel's logical axes

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def lead(self) -> tuple[int, ...]:
        return self.shape[: self.n_lead]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.shape[self.n_lead : self.n_lead + self.n_in]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape[self.n_lead + self.n_in :]


def find_targets(lm: LanguageModel, names: Sequence[str], key: str) -> list[Target]:
    """The linear maps of `lm` whose last path part or dotted path fully matches one of `names` (regexes); a
    ConfigError naming `key` (the config field they come from) when none does."""
    patterns = [re.compile(t) for t in names]
    targets: list[Target] = []
    for path, n_in in sorted(lm.linear_layers.items()):
        name = ".".join(path)
        if any(p.fullmatch(path[-1]) or p.fullmatch(name) for p in patterns):
            shape = get_path(lm.param_shapes, path + ("kernel",)).shape
            axes = get_path(lm.logical_axes, path + ("kernel",))
            targets.append(Target(path, int(axes[0] == "layers"), n_in, tuple(shape), axes))
    if not targets:
        all_names = sorted({p[-1] for p in lm.linear_layers} | {".".join(p) for p in lm.linear_layers})
        raise ConfigError(f"{key}={list(names)} match no linear layer; names: {all_names}")
    return targets


def lora_scale(spec: LoraConfig) -> float:
    return spec.alpha / math.sqrt(spec.rank) if spec.rslora else spec.alpha / spec.rank


class LoraAdapter:
    """The adapters a `LoraConfig` puts on a model; every method is pure in its tree arguments."""

    def __init__(self, lm: LanguageModel, spec: LoraConfig):
        self.lm, self.spec, self.scale = lm, spec, lora_scale(spec)
        self.targets = find_targets(lm, spec.targets, "finetune.lora.targets")
        for t in self.targets:
            if spec.rank > min(math.prod(t.in_shape), math.prod(t.out_shape)):
                raise ConfigError(f"finetune.lora.rank={spec.rank} exceeds the smaller side of {t.name} "
                                  f"({math.prod(t.in_shape)} x {math.prod(t.out_shape)})")
        if spec.init not in INITS:
            raise ConfigError(f"finetune.lora.init={spec.init!r}; registered: {sorted(INITS)}")

    # ----------------------------------------------------------------------------- structure
    def _leaf_specs(self, t: Target) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
        """name -> (shape, logical axes) of one target's adapter leaves."""
        lead_axes, in_axes, out_axes = t.axes[: t.n_lead], t.axes[t.n_lead : t.n_lead + t.n_in], t.axes[t.n_lead + t.n_in :]
        r = self.spec.rank
        leaves = {"a": ((*t.lead, *t.in_shape, r), (*lead_axes, *in_axes, None)),
                  "b": ((*t.lead, r, *t.out_shape), (*lead_axes, None, *out_axes))}
        if self.spec.dora:
            leaves["magnitude"] = ((*t.lead, *t.out_shape), (*lead_axes, *out_axes))
        return leaves

    def _tree(self, leaf) -> Params:
        tree: Params = {}
        for t in self.targets:
            tree = merge_into(tree, t.path, {k: leaf(*v) for k, v in self._leaf_specs(t).items()})
        return tree

    @property
    def param_shapes(self) -> Params:
        return self._tree(lambda shape, axes: jax.ShapeDtypeStruct(shape, jnp.float32))

    @property
    def logical_axes(self) -> Params:
        return self._tree(lambda shape, axes: axes)

    def zeros(self) -> Params:
        """An adapter tree of zeros (f32)."""
        return self._tree(lambda shape, axes: jnp.zeros(shape, jnp.float32))

    @property
    def num_params(self) -> int:
        return sum(math.prod(s.shape) for s in jax.tree.leaves(self.param_shapes))

    def flops_per_token(self) -> int:
        """Adapter FLOPs per training token: 6 per A and B weight (forward, input- and weight-gradient matmuls)."""
        shapes = jax.tree_util.tree_leaves_with_path(self.param_shapes)
        return 6 * sum(int(x.size) for p, x in shapes if getattr(p[-1], "key", None) in ("a", "b"))

    def shardings(self, mesh: Mesh) -> Params:
        return param_shardings(self.logical_axes, self.param_shapes, mesh, self.lm.rules)

    def quantized_paths(self) -> list[tuple[str, ...]]:
        """Kernels stored quantised in the frozen tree: every stacked block linear map (QLoRA)."""
        if self.spec.quantize == "none":
            return []
        return [p + ("kernel",) for p in sorted(self.lm.linear_layers) if p[0] in ("blocks", "moe_blocks")]

    def frozen_logical_axes(self, shard_blocks: bool = True) -> Params:
        """Logical axes of the frozen tree; a quantised kernel's block-count axis keeps the name of the
        kernel's last axis when `shard_blocks`, else is replicated."""
        axes = self.lm.logical_axes
        for path in self.quantized_paths():
            q_axes = quantized_logical_axes(get_path(axes, path), self.spec.quantize)
            if not shard_blocks:
                q_axes = dataclasses.replace(q_axes, codes=(*q_axes.codes[:-2], None, None), scales=(*q_axes.scales[:-1], None))
            axes = replace_path(axes, path, q_axes)
        return axes

    def frozen_shardings(self, mesh: Mesh) -> Params:
        shapes = jax.eval_shape(lambda: self.frozen_of(self.lm.init(jax.random.key(0))))
        try:
            return param_shardings(self.frozen_logical_axes(), shapes, mesh, self.lm.rules)
        except ConfigError:  # too few quantisation blocks to split: replicate that axis
            return param_shardings(self.frozen_logical_axes(shard_blocks=False), shapes, mesh, self.lm.rules)

    # ------------------------------------------------------------------------ pure transforms
    def init(self, key: jax.Array, base: Params) -> tuple[Params, Params]:
        """(adapter, frozen): fresh adapter params and the frozen tree they are trained against.

        For every init, apply(frozen, adapter) computes the base model (up to quantisation).
        """
        init_fn, adapter, frozen = INITS[self.spec.init], {}, base
        for i, t in enumerate(self.targets):
            w_LIO = self.kernel_matrix(base, t)
            keys = jax.random.split(jax.random.fold_in(key, i), w_LIO.shape[0])
            # one layer at a time (lax.map, not vmap): jaxlib's batched QR splits its batch over XLA's CPU thread pool
            # and blocks a pool thread on it, so several batched QRs in one program (OLoRA on 7 maps) deadlock on a
            # 2-core machine (tests/test_peft.py::test_olora_init_of_every_map_in_one_program_finishes)
            a, b, residual = jax.lax.map(lambda km: init_fn(*km, self.spec.rank, self.scale), (keys, w_LIO))
            leaves = {"a": a.reshape(*t.lead, *t.in_shape, -1), "b": b.reshape(*t.lead, -1, *t.out_shape)}
            if self.spec.dora:
                leaves["magnitude"] = column_norm_stacked(w_LIO).reshape(*t.lead, *t.out_shape)
            adapter = merge_into(adapter, t.path, leaves)
            if self.spec.init not in ("lora", "gaussian"):  # the adapter took part of W: keep the rest
                frozen = self._with_kernel(frozen, t, residual)
        return adapter, self.frozen_of(frozen)

    def frozen_of(self, base: Params) -> Params:
        """The base with its block kernels quantised when the spec asks for it."""
        for path in self.quantized_paths():
            base = replace_path(base, path, quantize(get_path(base, path), self.spec.quantize, self.spec.quant_block))
        return base

    def apply(self, frozen: Params, adapter: Params, rng: jax.Array | None = None) -> Params:
        """Params for `lm.apply`/`lm.loss`: each target kernel becomes a LoraKernel. Pass `rng`
        (a PRNG key) to train with dropout; without it dropout is off (evaluation)."""
        params = frozen
        use_dropout = rng is not None and self.spec.dropout > 0
        for i, t in enumerate(self.targets):
            leaves = get_path(adapter, t.path)
            key = None
            if use_dropout:
                key = jax.random.fold_in(rng, i)
                key = jax.random.split(key, t.lead) if t.n_lead else key
            kernel = LoraKernel(
                base=get_path(frozen, t.path + ("kernel",)), a=leaves["a"], b=leaves["b"], magnitude=leaves.get("magnitude"),
                mid=leaves.get("s"),
                dropout_key=key, scale=self.scale, dropout=self.spec.dropout if use_dropout else 0.0,
            )
            params = replace_path(params, t.path + ("kernel",), kernel)
        return params

    def merge(self, frozen: Params, adapter: Params) -> Params:
        """Dense params with every adapter folded into its kernel (quantised kernels dequantised)."""
        params = self.dequantized(frozen)
        for t in self.targets:
            merged = self.merged_matrix(self.kernel_matrix(params, t), get_path(adapter, t.path), t)
            params = self._with_kernel(params, t, merged)
        return params

    def unmerge(self, merged: Params, adapter: Params, record: Params | None = None) -> Params:
        """The inverse of `merge`: for LoRA, merged kernels minus scale * A @ B.

        Float arithmetic cannot undo every rounding of the merge (W + sAB may land in a coarser binade),
        so this alone is exact only up to the last bit; with the `record` of `merge_reversibly` the base
        comes back bitwise."""
        if self.spec.dora:
            raise ValueError("a merged DoRA kernel cannot be unmerged: its column norms are gone; keep the base")
        params = merged
        for t in self.targets:
            back = self.unmerged_matrix(self.kernel_matrix(params, t), get_path(adapter, t.path), t)
            params = self._with_kernel(params, t, back, None if record is None else get_path(record, t.path))
        return params

    def merge_reversibly(self, frozen: Params, adapter: Params) -> tuple[Params, Params]:
        """(`merge`'s dense params, record): the record holds, per adapted kernel, the integer distance
        [in units in the last place, int8 when it fits] between the base and what `unmerge` computes,
        so `unmerge(merged, adapter, record)` restores the base bitwise. Call both the same way (both
        eagerly or both jitted), as a different fusion may round differently."""
        merged = self.merge(frozen, adapter)
        approx = self.unmerge(merged, adapter)
        record: Params = {}
        for t in self.targets:
            ulps = _bits(get_path(frozen, t.path + ("kernel",))) - _bits(get_path(approx, t.path + ("kernel",)))
            small = bool(jnp.all(jnp.abs(ulps) <= 127))
            merge_into(record, t.path[:-1], {t.path[-1]: ulps.astype(jnp.int8) if small else ulps})
        return merged, record

    def dequantized(self, frozen: Params) -> Params:
        dtype = jnp.dtype(self.lm.cfg.param_dtype)
        for path in self.quantized_paths():
            q = get_path(frozen, path)
            if isinstance(q, QuantizedKernel):
                frozen = replace_path(frozen, path, q.dequantize(dtype))
        return frozen

    # ----------------------------------------------- one target's matrices; adapter types override these
    def kernel_matrix(self, params: Params, t: Target) -> jax.Array:
        """`t`'s kernel in `params` as f32 matrices [L, I, O] (L = 1 for an unstacked kernel)."""
        w = jnp.asarray(get_path(params, t.path + ("kernel",)), jnp.float32)
        return w.reshape(-1, math.prod(t.in_shape), math.prod(t.out_shape))

    def delta(self, w_LIO: jax.Array, leaves: Params, t: Target) -> jax.Array:
        """The update the adapter `leaves` make to W [L, I, O]: scale * A @ B (SORSA: scale * A diag(s) B)."""
        a_LIR = jnp.asarray(leaves["a"], jnp.float32).reshape(w_LIO.shape[0], w_LIO.shape[1], -1)
        if "s" in leaves:  # SORSA's singular values between A and B
            a_LIR = a_LIR * jnp.asarray(leaves["s"], jnp.float32).reshape(w_LIO.shape[0], 1, -1)
        b_LRO = jnp.asarray(leaves["b"], jnp.float32).reshape(w_LIO.shape[0], -1, w_LIO.shape[2])
        return self.scale * jnp.einsum("lir,lro->lio", a_LIR, b_LRO)

    def merged_matrix(self, w_LIO: jax.Array, leaves: Params, t: Target) -> jax.Array:
        """W + delta (DoRA: rescaled to its learned column magnitudes) [L, I, O]."""
        merged = w_LIO + self.delta(w_LIO, leaves, t)
        if "magnitude" in leaves:
            m_LO = leaves["magnitude"].reshape(w_LIO.shape[0], -1)
            merged = merged * (m_LO / column_norm_stacked(merged))[:, None, :]
        return merged

    def unmerged_matrix(self, merged_LIO: jax.Array, leaves: Params, t: Target) -> jax.Array:
        """W from `merged_matrix`'s result, for an additive update that does not depend on W."""
        return merged_LIO - self.delta(merged_LIO, leaves, t)

    def _with_kernel(self, params: Params, t: Target, w_LIO: jax.Array, ulps: jax.Array | None = None) -> Params:
        """`params` with `t`'s kernel set to the matrices [L, I, O] (in the kernel's dtype, moved by `ulps`)."""
        kernel = w_LIO.reshape(t.shape).astype(get_path(params, t.path + ("kernel",)).dtype)
        return replace_path(params, t.path + ("kernel",), kernel if ulps is None else _add_ulps(kernel, ulps))


def _bits(x: jax.Array) -> jax.Array:
    """A float array's bit patterns as signed integers of its width, widened to int32."""
    ints = {2: jnp.int16, 4: jnp.int32}[jnp.dtype(x.dtype).itemsize]
    return jax.lax.bitcast_convert_type(x, ints).astype(jnp.int32)


def _add_ulps(x: jax.Array, ulps: jax.Array) -> jax.Array:
    """The float whose bit pattern is x's plus `ulps` (the exact inverse of a `_bits` difference)."""
    ints = {2: jnp.int16, 4: jnp.int32}[jnp.dtype(x.dtype).itemsize]
    return jax.lax.bitcast_convert_type((_bits(x) + ulps.astype(jnp.int32)).astype(ints), x.dtype)


def column_norm_stacked(w_LIO: jax.Array) -> jax.Array:
    """Per-layer column norms: [L, I, O] -> [L, O]."""
    return jax.vmap(column_norm)(w_LIO)
