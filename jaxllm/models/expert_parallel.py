"""Expert parallelism for the dropless MoE path: experts sharded over the mesh axes of the logical `expert`
axis, tokens exchanged with two all-to-alls inside `jax.shard_map`.

Each device routes its own tokens (the routing is computed outside, under the automatic sharding), packs
every (token, choice) assignment into a send buffer per destination device (the device holding that
expert), swaps buffers with `all_to_all`, runs its local experts as grouped matmuls over what it received,
and swaps the results back. Buffers are sized for the worst case (every local assignment to one device:
[devices, tokens x k, D]) so nothing is ever dropped; `lax.ragged_all_to_all` would send only the filled
rows and is the way to cut that memory on GPU/TPU. Expert weights enter replicated over every other mesh
axis (FSDP / tensor shards are gathered, as FSDP does for any weight before use).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.sharding import Rules, dividing_axes, split_axes


def expert_axes(rules: Rules, num_experts: int) -> tuple[str, ...]:
    """Mesh axes (size > 1, under the current mesh) that the `expert` axis is split over; () means no
    expert parallelism. Raises if they do not divide the experts."""
    axes = split_axes("expert", rules)
    size = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
    if num_experts % size:
        raise ValueError(f"{num_experts} experts do not split over mesh axes {axes} of total size {size}")
    return axes


def experts_expert_parallel(
    x_BTD: jax.Array, expert_BTP: jax.Array, weight_BTP: jax.Array, weights: tuple[jax.Array, ...],
    rules: Rules, ep_axes: tuple[str, ...], run_experts: Callable,
) -> jax.Array:
    """sum over picks p of weight_p * expert_p(x) for every token, [B, T, D] f32, with experts split over `ep_axes`.

    `run_experts(x_AD, local_expert_A, weights_local)` runs the local experts on rows tagged with a local
    expert id (rows tagged `E_local` are padding and must come back as zeros)."""
    mesh = jax.sharding.get_abstract_mesh()
    tok = dividing_axes(dict(rules).get("batch", ()), x_BTD.shape[0])  # the batch axes that split the rows
    rows = P(tok or None, None, None)
    E = weights[0].shape[0]
    ep = math.prod(mesh.shape[a] for a in ep_axes)
    E_local = E // ep

    def local(x_btd, e_btp, w_btp, *w_local):
        b, t, D = x_btd.shape
        P = e_btp.shape[-1]
        A = b * t * P
        flat_e = e_btp.reshape(A)
        dest = jnp.where(flat_e < E, flat_e // E_local, ep)  # null experts (>= E) go nowhere
        order = jnp.argsort(dest, stable=True)
        counts = jnp.bincount(dest, length=ep + 1)
        sorted_dest = dest[order]
        rank = jnp.arange(A) - (jnp.cumsum(counts) - counts)[sorted_dest]
        x_AD = x_btd.reshape(b * t, D)[order // P]
        send_x = jnp.zeros((ep + 1, A, D), x_btd.dtype).at[sorted_dest, rank].set(x_AD)[:ep]
        send_e = jnp.full((ep + 1, A), E_local, jnp.int32).at[sorted_dest, rank].set(flat_e[order] % E_local)[:ep]
        recv_x = jax.lax.all_to_all(send_x, ep_axes, 0, 0)  # [ep, A, D]: recv[p] = what device p sent here
        recv_e = jax.lax.all_to_all(send_e, ep_axes, 0, 0)
        out_AD = run_experts(recv_x.reshape(ep * A, D), recv_e.reshape(ep * A), w_local)
        back = jax.lax.all_to_all(out_AD.reshape(ep, A, D), ep_axes, 0, 0)  # back[p] = results for rows sent to p
        mine = jnp.concatenate([back, jnp.zeros((1, A, D), back.dtype)])[sorted_dest, rank]  # null: zeros
        contrib = mine.astype(jnp.float32) * w_btp.reshape(A)[order][:, None]
        return jnp.zeros((b * t, D), jnp.float32).at[order // P].add(contrib).reshape(b, t, D)

    expert_spec = P(ep_axes if len(ep_axes) > 1 else ep_axes[0], None, None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(rows, rows, rows) + (expert_spec,) * len(weights), out_specs=rows,
    )(x_BTD, expert_BTP, weight_BTP, *weights)
