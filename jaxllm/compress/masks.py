"""Which weights a pruning keeps, from their scores: unstructured (per output or per matrix) or N:M."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _ranks(scores: jax.Array, axis: int) -> jax.Array:
    """Each entry's rank along `axis` (0: lowest; ties broken by position)."""
    return jnp.argsort(jnp.argsort(scores, axis=axis, stable=True), axis=axis, stable=True)


def unstructured_keep(scores_IO: jax.Array, sparsity: float, per_output: bool) -> jax.Array:
    """bool [I, O]: False for the int(sparsity * I) lowest scores of each output column (`per_output`), or for the
    int(sparsity * I * O) lowest of the whole matrix."""
    I, O = scores_IO.shape
    if per_output:
        return _ranks(scores_IO, 0) >= int(sparsity * I)
    return (_ranks(scores_IO.reshape(-1), 0) >= int(sparsity * I * O)).reshape(I, O)


def n_of_m_keep(scores_IO: jax.Array, n: int, m: int) -> jax.Array:
    """bool [I, O]: per output, the n highest scores of every m consecutive inputs (2:4: n=2, m=4); I % m == 0."""
    I, O = scores_IO.shape
    groups_GMO = scores_IO.reshape(I // m, m, O)
    return (_ranks(groups_GMO, 1) >= m - n).reshape(I, O)
