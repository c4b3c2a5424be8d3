"""Read-ME refactoring (Cai et al., 2024): a dense model's gated FFNs split into a shared FFN and E experts whose
neurons are slices of the dense FFN, grouped by activation statistics from a calibration pass.

The statistic is the Gram matrix H = A^T A [F, F] of each layer's FFN hidden activations A = silu(x W_gate) * x W_up
(the input of `down`), summed over the calibration tokens. The grouping rule, deterministic:

1. importance of neuron i: H_ii (its summed squared activation); the `shared` most important neurons form the shared
   FFN (ties: the lower index first);
2. the rest are grouped into E experts of equal width: the most important neuron not yet placed seeds an expert, which
   takes the unplaced neurons most correlated with the seed (C_ij = H_ij / sqrt(H_ii H_jj): neurons that fire
   together go together; ties: the more important, then the lower index) until it is full; then the next seed.

Experts and shared FFN are exact slices, so the refactored MoE with every expert chosen (weight 1: the pre-gating
router's) computes the dense FFN. Everything but the FFNs and the new router is carried over unchanged.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ConfigError, ModelConfig
from jaxllm.language_model import LanguageModel, Params
from jaxllm.peft.calibration import input_statistics
from jaxllm.peft.lora import find_targets


class Partition(NamedTuple):
    shared_S: np.ndarray  # int [S]: the shared FFN's neurons, ascending
    experts_EN: np.ndarray  # int [E, N]: each expert's neurons, ascending (N = (F - S) / E)


def partition_neurons(h_FF: np.ndarray, num_experts: int, shared: int) -> Partition:
    """One layer's partition of F neurons by the rule in the module docstring, from the Gram matrix H [F, F]."""
    h_FF = np.asarray(h_FF, np.float64)
    F = h_FF.shape[0]
    if shared < 0 or (F - shared) % num_experts or shared >= F:
        raise ConfigError(f"{F} FFN neurons do not split into {shared} shared plus {num_experts} equal experts")
    importance = np.diag(h_FF)
    by_importance = np.lexsort((np.arange(F), -importance))  # most important first, ties: lower index
    rank = np.empty(F, int)
    rank[by_importance] = np.arange(F)
    scale = np.sqrt(np.maximum(importance, 1e-30))
    corr_FF = h_FF / scale[:, None] / scale[None, :]
    unplaced = np.ones(F, bool)
    unplaced[by_importance[:shared]] = False
    width = (F - shared) // num_experts
    experts = []
    for _ in range(num_experts):
        seed = next(i for i in by_importance if unplaced[i])
        candidates = np.flatnonzero(unplaced & (np.arange(F) != seed))
        order = np.lexsort((rank[candidates], -corr_FF[seed, candidates]))  # most correlated, then more important
        group = np.concatenate([[seed], candidates[order[: width - 1]]])
        unplaced[group] = False
        experts.append(np.sort(group))
    return Partition(np.sort(by_importance[:shared]), np.stack(experts))


def check_refactorable(dense: ModelConfig, moe: ModelConfig) -> None:
    """A ConfigError unless `moe` is `dense` with its FFNs as a shared FFN plus equal experts covering its neurons."""
    m, mlp = moe.moe, dense.mlp
    if dense.moe.num_experts or not m.num_experts:
        raise ConfigError("refactoring goes from a dense model (moe.num_experts=0) to an MoE one (num_experts > 0)")
    diff = sorted(k for k in vars(moe) if k != "moe" and getattr(moe, k) != getattr(dense, k))
    if diff:
        raise ConfigError(f"refactoring changes only model.moe; the MoE config also differs from the dense one in {diff}")
    if not mlp.gated or mlp.activation != "silu" or mlp.structure != "dense" or dense.bias == "all":
        raise ConfigError("refactoring splits a dense SwiGLU FFN without biases (mlp.gated, activation silu)")
    shared = (m.shared_d_ff or 0) if m.shared_experts else 0
    if m.every != 1 or m.null_experts or m.shared_gate or m.lora_rank or m.routing != "topk":
        raise ConfigError("refactoring makes top-k MoE layers everywhere (moe.every=1) without null experts, a shared "
                          "gate or MixLoRA")
    if m.shared_experts and not m.shared_d_ff:
        raise ConfigError("set model.moe.shared_d_ff: the shared FFN's width, in neurons of the dense FFN")
    if shared + m.num_experts * (m.d_ff or 0) != mlp.d_ff:
        raise ConfigError(f"moe.shared_d_ff ({shared}) + num_experts ({m.num_experts}) x moe.d_ff ({m.d_ff}) must equal "
                          f"the dense FFN's mlp.d_ff={mlp.d_ff}")


def ffn_activation_grams(lm: LanguageModel, params: Params, rows: Iterable[np.ndarray]) -> np.ndarray:
    """H = A^T A [L, F, F] of each layer's FFN hidden activations over the calibration rows."""
    (target,) = find_targets(lm, ("down",), "refactoring")
    stats, _ = input_statistics(lm, params, [target], rows, lambda a_MF: a_MF.T @ a_MF)
    return np.asarray(stats["blocks"]["mlp"]["down"]["stat"])


def refactor(dense_params: Params, moe_init: Params, partitions: list[Partition]) -> Params:
    """MoE params: `moe_init`'s router (and pre-gating router), the dense model's everything else, each layer's
    shared FFN and experts sliced from its dense FFN by `partitions` (one per layer)."""
    mlp = dense_params["blocks"]["mlp"]
    gate_LDF, up_LDF, down_LFD = (mlp[n]["kernel"] for n in ("gate", "up", "down"))
    experts_LEN = jnp.asarray(np.stack([p.experts_EN for p in partitions]))
    cols = lambda w_LDF: jax.vmap(lambda w, i: w[:, i].transpose(1, 0, 2))(w_LDF, experts_LEN)  # [L, E, D, N]
    rows = lambda w_LFD: jax.vmap(lambda w, i: w[i])(w_LFD, experts_LEN)  # [L, E, N, D]
    new_mlp = {**moe_init["blocks"]["mlp"], "gate": cols(gate_LDF), "up": cols(up_LDF), "down": rows(down_LFD)}
    if "shared" in new_mlp:
        shared_LS = jnp.asarray(np.stack([p.shared_S for p in partitions]))
        take_cols = lambda w_LDF: jax.vmap(lambda w, i: w[:, i])(w_LDF, shared_LS)
        new_mlp["shared"] = {"gate": {"kernel": take_cols(gate_LDF)}, "up": {"kernel": take_cols(up_LDF)},
                             "down": {"kernel": jax.vmap(lambda w, i: w[i])(down_LFD, shared_LS)}}
    out = {**dense_params, "blocks": {**dense_params["blocks"], "mlp": new_mlp}}
    return {**out, **{k: v for k, v in moe_init.items() if k not in dense_params}}  # the pre-gating router


def refactor_dense(dense_lm: LanguageModel, dense_params: Params, moe_cfg: ModelConfig, rows: Iterable[np.ndarray],
                   key: jax.Array) -> tuple[Params, list[Partition]]:
    """(MoE params for `moe_cfg`, each layer's partition) from a dense model and calibration rows of tokens."""
    check_refactorable(dense_lm.cfg, moe_cfg)
    m = moe_cfg.moe
    grams = ffn_activation_grams(dense_lm, dense_params, rows)
    partitions = [partition_neurons(h, m.num_experts, (m.shared_d_ff or 0) if m.shared_experts else 0) for h in grams]
    moe_lm = LanguageModel(moe_cfg)
    return refactor(dense_params, jax.jit(moe_lm.init)(key), partitions), partitions
