"""SpQR-style quantisation (Dettmers et al., 2023) of a trained model's linear maps, with GPTQ's error feedback.

One matrix at a time, as W^T [O, I] (a row per output) with the Hessian proxy H = X^T X [I, I] of its inputs over the
calibration tokens (`jaxllm.peft.calibration`), dampened by `damp` * mean(diag H), and U = the upper Cholesky factor
of H^-1. Input columns go in groups of `group`; at a group's start:

1. every row's min-max scale and zero over the group's (error-compensated) columns, each quantised in turn to
   `stat_bits` over chunks of `stat_group` rows (second-level stats, kept in f16);
2. outliers: the weights whose quantisation error, scaled by 1 / U_jj (its effect on the layer's output), is above
   `outlier_threshold` x the group's mean, the largest first, at most `max_outlier_share` of the group; they are kept
   in 16 bits and the stats are recomputed over the other weights (this replaces SpQR's leave-one-out criterion with
   a relative threshold and a cap, so the share is bounded by construction);

then column by column: quantise to `bits` (outliers kept), and spread the error over the columns not yet quantised,
W[:, k] -= (w_j - q_j) / U_jj * U_jk for k > j (GPTQ). `SpqrKernel` stores the codes, stats and outliers and is
run by `Dense` like the int8 / NF4 kernels (dequantised on the fly).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxllm.config import ConfigError


@dataclass(frozen=True)
class SpqrSpec:
    bits: int = 3  # weight codes
    group: int = 16  # input columns sharing a row's scale and zero
    stat_bits: int = 3  # codes of those scales and zeros
    stat_group: int = 16  # rows sharing a second-level scale and zero (f16) of the stats
    outlier_threshold: float = 4.0  # an outlier's scaled error exceeds this x the group's mean
    max_outlier_share: float = 0.01  # at most this share of a group's weights are outliers
    damp: float = 0.01  # H + damp * mean(diag H) * I

    def check(self, shape_OI: tuple[int, int]) -> None:
        O, I = shape_OI
        if I % self.group or O % self.stat_group:
            raise ConfigError(f"SpQR: a [{I} in, {O} out] map needs inputs divisible by group={self.group} and "
                              f"outputs by stat_group={self.stat_group}")
        if not 1 <= self.bits <= 8 or not 1 <= self.stat_bits <= 8:
            raise ConfigError("SpQR: bits and stat_bits must be within [1, 8]")

    def bits_per_param(self, n_outliers: int, n_params: int) -> float:
        """What the stored form costs: codes, the first-level stats' codes, the second-level f16 stats (2 x 2 per
        stat_group rows and group columns) and 48 bits per outlier (an int32 position and an f16 value)."""
        per_weight = self.bits + 2 * self.stat_bits / self.group + 2 * 2 * 16 / (self.group * self.stat_group)
        return per_weight + 48 * n_outliers / n_params


def _minmax(x: jax.Array, valid: jax.Array, bits: int, axis: int) -> tuple[jax.Array, jax.Array]:
    """(scale, zero) of min-max quantisation to `bits` over `axis`, counting only `valid` entries."""
    lo = jnp.min(jnp.where(valid, x, jnp.inf), axis=axis)
    hi = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis)
    lo, hi = jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 0.0)
    scale = (hi - lo) / (2 ** bits - 1)
    scale = jnp.where(scale > 0, scale, 1.0)
    return scale, jnp.round(-lo / scale)


def _codes(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
    return jnp.clip(jnp.round(x / scale + zero), 0, 2 ** bits - 1)


def _quantized_stat(v_O: jax.Array, spec: SpqrSpec) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A stat per row [O] quantised to stat_bits over chunks of stat_group rows: (codes [O], chunk scale [O / s],
    chunk zero [O / s], dequantised [O]); the chunk stats rounded to f16 as stored."""
    v_CS = v_O.reshape(-1, spec.stat_group)
    scale, zero = _minmax(v_CS, jnp.ones_like(v_CS, bool), spec.stat_bits, axis=1)
    scale, zero = (x.astype(jnp.float16).astype(jnp.float32) for x in (scale, zero))
    codes = _codes(v_CS, scale[:, None], zero[:, None], spec.stat_bits)
    return codes.reshape(-1), scale, zero, ((codes - zero[:, None]) * scale[:, None]).reshape(-1)


def inverse_hessian_factor(h_II: jax.Array, damp: float) -> jax.Array:
    """U: the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (f32); dead inputs (H_jj = 0) get H_jj = 1."""
    h = h_II.astype(jnp.float32)
    h = h + jnp.diag(jnp.where(jnp.diag(h) == 0, 1.0, 0.0))
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0])
    return jnp.linalg.cholesky(jnp.linalg.inv(h)).T


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpqrCodes:
    """What SpQR stores of W^T [..., O, I] besides outliers: codes [..., O, I] (uint8); per (row, group) stat codes
    [..., O, G] (uint8); per (chunk of stat_group rows, group) f16 second-level scale and zero of each stat
    [..., O / stat_group, G]."""

    codes: jax.Array
    scale_codes: jax.Array
    zero_codes: jax.Array
    scale_scale: jax.Array
    scale_zero: jax.Array
    zero_scale: jax.Array
    zero_zero: jax.Array

    def dequantize(self) -> jax.Array:
        """W^T [..., O, I] (f32) from the codes and stats (outliers not placed)."""
        I = self.codes.shape[-1]
        per_col = lambda a: jnp.repeat(a, I // a.shape[-1], axis=-1)
        scale = per_col(_dequantized_stat(self.scale_codes, self.scale_scale, self.scale_zero))
        zero = per_col(_dequantized_stat(self.zero_codes, self.zero_scale, self.zero_zero))
        return (self.codes.astype(jnp.float32) - zero) * scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpqrMatrix:
    """One quantised W^T [O, I]: its stored codes, the outlier mask [O, I], and the routine's result [O, I] (f32;
    outliers as f16 values)."""

    stored: SpqrCodes
    outliers: jax.Array
    dequantized: jax.Array


def quantize_matrix(w_OI: jax.Array, h_II: jax.Array, spec: SpqrSpec) -> SpqrMatrix:
    """SpQR of one matrix W^T [O, I] given its inputs' H [I, I] (see the module docstring)."""
    spec.check(w_OI.shape)
    O, I = w_OI.shape
    G, g = I // spec.group, spec.group
    U = inverse_hessian_factor(h_II, spec.damp)
    d_I = jnp.diag(U)
    max_outliers = math.floor(spec.max_outlier_share * O * g)
    cols = jnp.arange(I)

    def group_step(k, carry):
        W, Q, codes, outl, stats = carry
        x_Og = jax.lax.dynamic_slice(W, (0, k * g), (O, g))
        d_g = jax.lax.dynamic_slice(d_I, (k * g,), (g,))

        def stats_of(valid):
            scale, zero = _minmax(x_Og, valid, spec.bits, axis=1)
            sc = _quantized_stat(scale, spec)
            zc = _quantized_stat(zero, spec)
            return sc, zc

        sc, zc = stats_of(jnp.ones_like(x_Og, bool))
        err = ((x_Og - (_codes(x_Og, sc[3][:, None], zc[3][:, None], spec.bits) - zc[3][:, None]) * sc[3][:, None])
               / d_g) ** 2
        flat = err.reshape(-1)
        rank = jnp.argsort(jnp.argsort(-flat, stable=True), stable=True)
        is_out = ((flat > spec.outlier_threshold * jnp.mean(flat)) & (rank < max_outliers)).reshape(O, g)
        sc, zc = stats_of(~is_out)
        scale, zero = sc[3], zc[3]

        def column_step(c, inner):
            W, Q, codes = inner
            j = k * g + c
            w = W[:, j]
            code = _codes(w, scale, zero, spec.bits)
            q = jnp.where(is_out[:, c], w, (code - zero) * scale)
            e = (w - q) / U[j, j]
            W = W - jnp.outer(e, jnp.where(cols > j, U[j], 0.0))
            return W, Q.at[:, j].set(q), codes.at[:, j].set(code)

        W, Q, codes = jax.lax.fori_loop(0, g, column_step, (W, Q, codes))
        outl = jax.lax.dynamic_update_slice(outl, is_out, (0, k * g))
        stats = tuple(s.at[:, k].set(v) for s, v in zip(stats, (sc[0], zc[0], sc[1], sc[2], zc[1], zc[2])))
        return W, Q, codes, outl, stats

    stats = (jnp.zeros((O, G)), jnp.zeros((O, G)), *(jnp.zeros((O // spec.stat_group, G)) for _ in range(4)))
    init = (w_OI.astype(jnp.float32), jnp.zeros((O, I)), jnp.zeros((O, I)), jnp.zeros((O, I), bool), stats)
    _, Q, codes, outl, stats = jax.lax.fori_loop(0, G, group_step, init)
    to16 = lambda x: x.astype(jnp.float16).astype(jnp.float32)
    Q = jnp.where(outl, to16(Q), Q)  # outliers kept as f16
    f16 = lambda x: x.astype(jnp.float16)
    stored = SpqrCodes(codes.astype(jnp.uint8), stats[0].astype(jnp.uint8), stats[1].astype(jnp.uint8),
                       *(f16(x) for x in stats[2:]))
    return SpqrMatrix(stored, outl, Q)


def _dequantized_stat(codes_OG: jax.Array, scale_CG: jax.Array, zero_CG: jax.Array) -> jax.Array:
    per_row = lambda a: jnp.repeat(a.astype(jnp.float32), codes_OG.shape[-2] // a.shape[-2], axis=-2)
    return (codes_OG.astype(jnp.float32) - per_row(zero_CG)) * per_row(scale_CG)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpqrKernel:
    """A kernel [*lead, *in, *out] stored by SpQR, per matrix W^T [O, I] (leading axes kept): `SpqrCodes` with
    [*lead] in front, and up to K outliers as a list of flat positions in [O, I] (int32; -1: unused) and f16
    values [*lead, K]."""

    stored: SpqrCodes
    outlier_index: jax.Array
    outlier_value: jax.Array
    matrix_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # [*in, *out], without lead

    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's shape: the leading axes the arrays have now (a layer scan slices them) and [*in, *out]."""
        return (*self.stored.codes.shape[:-2], *self.matrix_shape)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.float32)

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        O, I = self.stored.codes.shape[-2:]
        w = self.stored.dequantize().reshape(-1, O * I)
        idx = self.outlier_index.reshape(w.shape[0], -1)
        rows = jnp.arange(w.shape[0])[:, None]
        w = w.at[rows, jnp.where(idx >= 0, idx, O * I)].set(
            self.outlier_value.reshape(idx.shape).astype(jnp.float32), mode="drop")
        return jnp.swapaxes(w.reshape(*self.stored.codes.shape), -1, -2).reshape(self.shape).astype(dtype)

    def matmul(self, x_MI: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """x [N, in] @ the dequantised kernel viewed as [in, out]."""
        return x_MI @ self.dequantize(dtype).reshape(x_MI.shape[-1], -1)

    @property
    def num_outliers(self) -> int:
        return int(jnp.sum(self.outlier_index >= 0))


def spqr_kernel(matrices: list[SpqrMatrix], shape: tuple[int, ...], lead: tuple[int, ...]) -> SpqrKernel:
    """The stored kernel of `shape` [*lead, *in, *out] from its matrices, one per index of `lead` (row-major)."""
    capacity = max(int(m.outliers.sum()) for m in matrices)

    def outlier_list(m: SpqrMatrix) -> tuple[jax.Array, jax.Array]:
        (idx,) = jnp.nonzero(m.outliers.reshape(-1), size=capacity, fill_value=-1)
        vals = jnp.where(idx >= 0, m.dequantized.reshape(-1)[jnp.maximum(idx, 0)], 0.0)
        return idx.astype(jnp.int32), vals.astype(jnp.float16)

    lists = [outlier_list(m) for m in matrices]
    stored = jax.tree.map(lambda *xs: jnp.stack(xs).reshape(*lead, *xs[0].shape), *[m.stored for m in matrices])
    return SpqrKernel(stored, outlier_index=jnp.stack([i for i, _ in lists]).reshape(*lead, capacity),
                      outlier_value=jnp.stack([v for _, v in lists]).reshape(*lead, capacity),
                      matrix_shape=tuple(shape[len(lead):]))
