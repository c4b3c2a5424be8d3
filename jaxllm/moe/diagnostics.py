"""Routing diagnostics on recorded expert choices (numpy): OpenMoE's findings (Xue et al., 2024) and Read-ME's
inter-layer redundancy, each a plain count a reader can redo by hand.

Shapes: L MoE layers, M tokens (flattened rows), P choices per token (first choice first); `expert_LM` holds each
token's first choice per layer. Every function returns the metric and the value it would take if routing ignored
what the finding says it depends on, so a report can say whether a finding reproduces.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Finding(NamedTuple):
    value: np.ndarray  # the metric (per layer, per bucket, ...)
    baseline: np.ndarray  # the same metric had routing ignored the factor in question


def _modal_share(t_N: np.ndarray, e_N: np.ndarray) -> float:
    """Share of the N occurrences that go to their token id's most frequent expert."""
    pairs_2K, count_K = np.unique(np.stack([t_N, e_N]), axis=1, return_counts=True)  # K distinct (id, expert) pairs
    modal: dict[int, int] = {}
    for tok, n in zip(pairs_2K[0], count_K):
        modal[tok] = max(modal.get(tok, 0), n)
    return sum(modal.values()) / t_N.size


def token_id_routing(tokens_M: np.ndarray, expert_LM: np.ndarray, min_count: int = 8, seed: int = 0) -> Finding:
    """(1) Routing decided by token id: per layer, over token ids seen at least `min_count` times, the share of their
    occurrences that go to the id's modal expert. Baseline: the same share with the ids shuffled among those
    occurrences (permutation `seed`): what routing unrelated to the id gives with the same counts and loads."""
    tokens_M = np.asarray(tokens_M)
    ids, counts = np.unique(tokens_M, return_counts=True)
    frequent = np.isin(tokens_M, ids[counts >= min_count])
    if not frequent.any():
        raise ValueError(f"no token id occurs {min_count} times: give more data or a lower min_count")
    t = tokens_M[frequent]
    shuffled = np.random.default_rng(seed).permutation(t)
    value = [_modal_share(t, e_M[frequent]) for e_M in np.asarray(expert_LM)]
    baseline = [_modal_share(shuffled, e_M[frequent]) for e_M in np.asarray(expert_LM)]
    return Finding(np.array(value), np.array(baseline))


def choice_agreement(early_LM: np.ndarray, late_LM: np.ndarray) -> Finding:
    """(2) Routing learned early: per layer, the share of tokens whose first choice is the same in two checkpoints.
    Baseline: the agreement of independent choices with the same loads, sum_e load_early(e) load_late(e)."""
    early_LM, late_LM = np.asarray(early_LM), np.asarray(late_LM)
    slots = int(max(early_LM.max(), late_LM.max())) + 1
    load = lambda e_M: np.bincount(e_M, minlength=slots) / e_M.size
    return Finding(np.mean(early_LM == late_LM, axis=1),
                   np.array([load(a) @ load(b) for a, b in zip(early_LM, late_LM)]))


def drop_rate_by_position(dropped_LMP: np.ndarray, expert_LMP: np.ndarray, positions_M: np.ndarray,
                          num_experts: int, buckets: int = 4) -> tuple[Finding, np.ndarray]:
    """(3) Late tokens dropped more under capacity dispatch: the share of choices of real experts (slot <
    `num_experts`) that were dropped, over all layers, per bucket of positions ([0, T) cut into `buckets` equal
    ranges). Baseline: the overall drop rate in every bucket. Also returns the buckets' first positions."""
    positions_M = np.asarray(positions_M)
    T = int(positions_M.max()) + 1
    bucket_M = np.minimum(positions_M * buckets // T, buckets - 1)
    real_LMP = np.asarray(expert_LMP) < num_experts
    dropped_LMP = np.asarray(dropped_LMP) & real_LMP
    bucket_LMP = np.broadcast_to(bucket_M[None, :, None], real_LMP.shape)
    real = np.bincount(bucket_LMP[real_LMP], minlength=buckets)
    dropped = np.bincount(bucket_LMP[dropped_LMP], minlength=buckets)
    rate = dropped / np.maximum(real, 1)
    overall = dropped.sum() / max(real.sum(), 1)
    return Finding(rate, np.full(buckets, overall)), np.array([-(-b * T // buckets) for b in range(buckets)])


def entropy(a_M: np.ndarray) -> float:
    """Entropy (nats) of the empirical distribution of the values in `a_M`."""
    p = np.unique(np.asarray(a_M), return_counts=True)[1] / np.size(a_M)
    return float(-np.sum(p * np.log(p)))


def mutual_information(a_M: np.ndarray, b_M: np.ndarray) -> float:
    """I(A; B) in nats of the empirical joint distribution of paired choices: H(A) + H(B) - H(A, B)."""
    a_M, b_M = np.asarray(a_M), np.asarray(b_M)
    joint = a_M.astype(np.int64) * (int(b_M.max()) + 1) + b_M
    return entropy(a_M) + entropy(b_M) - entropy(joint)


def interlayer_mutual_information(expert_LM: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(I [L, L] in nats between every two layers' first choices, the same normalised by min(H_i, H_j): 1 when one
    layer's choice determines the other's; Read-ME's argument that per-layer routers are redundant)."""
    expert_LM = np.asarray(expert_LM)
    L = expert_LM.shape[0]
    mi = np.array([[mutual_information(expert_LM[i], expert_LM[j]) for j in range(L)] for i in range(L)])
    h = np.array([entropy(e) for e in expert_LM])
    return mi, mi / np.maximum(np.minimum(h[:, None], h[None, :]), 1e-12)
