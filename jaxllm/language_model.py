"""The functional model API: build once from a config, then pure functions of a params pytree.

    lm = LanguageModel(cfg.model)                   # or jaxllm.build(cfg) for the mesh rules too
    params = lm.init(jax.random.key(0))             # nested dict of arrays
    logits = jax.jit(lm.apply)(params, tokens)      # [B, T] int -> [B, T, V]
    loss, metrics = lm.loss(params, batch)          # batch: inputs, targets, [loss_mask, positions, segment_ids]

Everything is a plain function of pytrees: jit, grad and vmap them without knowing Flax.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxllm.config import Config, ModelConfig, _default_rules
from jaxllm.losses import chunked_cross_entropy_sums, loss_from_sums
from jaxllm.models.context_parallel import to_zigzag
from jaxllm.models.ffn_skip import FfnSkip
from jaxllm.models.kv_cache import KVCache
from jaxllm.models.moe import MoeStats
from jaxllm.models.layers import Dense
from jaxllm.models.transformer import Transformer
from jaxllm.sharding import Rules, make_rules, param_shardings, split_axes

Params = dict[str, Any]
Batch = Mapping[str, jax.Array]


class LanguageModel:
    """A model config split once into (graphdef, params); all methods are pure in `params`."""

    def __init__(self, cfg: ModelConfig, rules: Mapping[str, Sequence[str]] | Rules | None = None):
        self.cfg = cfg
        if rules is None:
            rules = _default_rules()
        self.rules: Rules = make_rules(rules) if isinstance(rules, Mapping) else tuple(rules)
        abstract = nnx.eval_shape(lambda: Transformer(cfg, self.rules, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_state = nnx.split(abstract)
        self.param_shapes: Params = jax.tree.map(
            lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(abstract_state)
        )
        specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
        self.logical_axes: Params = jax.tree.map(
            tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )
        # Module path of every linear map (its params hold a `kernel`) -> number of input dims.
        self.linear_layers: dict[tuple[str, ...], int] = {
            tuple(str(k) for k in path): node.n_in for path, node in nnx.iter_graph(abstract) if isinstance(node, Dense)
        }

    # ------------------------------------------------------------------ pure functions of params
    def init(self, key: jax.Array) -> Params:
        """Fresh params (nested dict of arrays) from a PRNG key."""
        model = Transformer(self.cfg, self.rules, rngs=nnx.Rngs(params=key))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def apply(
        self,
        params: Params,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        *,
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Logits [B, T, V]; with return_hidden, (logits, final hidden states [B, T, D])."""
        model: Transformer = nnx.merge(self.graphdef, params)
        hidden_BTD = model.hidden(tokens_BT, positions_BT, segment_ids_BT)
        logits_BTV = model.logits(hidden_BTD)
        return (logits_BTV, hidden_BTD) if return_hidden else logits_BTV

    def logits_and_stats(self, params: Params, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                         segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, MoeStats | None]:
        """Logits [B, T, V] and the per-layer MoE statistics [L, ...] (routing included; None without MoE)."""
        model: Transformer = nnx.merge(self.graphdef, params)
        hidden_BTD, _, stats, _ = model.run(tokens_BT, positions_BT, segment_ids_BT)
        return model.logits(hidden_BTD), stats

    def apply_cached(
        self,
        params: Params,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array,
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache]:
        """Logits [B, T, V] of tokens that continue what `cache` holds, and the updated cache."""
        model: Transformer = nnx.merge(self.graphdef, params)
        hidden_BTD, cache = model.hidden(tokens_BT, positions_BT, segment_ids_BT, cache)
        return model.logits(hidden_BTD), cache

    def apply_cached_skipping(
        self, params: Params, tokens_B1: jax.Array, positions_B1: jax.Array, segment_ids_B1: jax.Array,
        cache: KVCache, ffn_skip: FfnSkip,
    ) -> tuple[jax.Array, KVCache, jax.Array]:
        """`apply_cached` for one token per row with FFN-SkipLLM (`jaxllm.models.ffn_skip`): (logits [B, 1, V],
        updated cache, which rows skipped each layer's FFN [L, B])."""
        model: Transformer = nnx.merge(self.graphdef, params)
        hidden_B1D, cache, _, skipped_LB = model.run(tokens_B1, positions_B1, segment_ids_B1, cache, ffn_skip)
        return model.logits(hidden_B1D), cache, skipped_LB

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty cache of `length` slots (prompt + new tokens) in the compute dtype."""
        return KVCache.empty(self.cfg, batch, length)

    def loss_sums(self, params: Params, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(sum of token cross entropies, sum of logsumexp^2, token count) over unmasked targets.

        The output head and loss run about `cfg.loss_chunk_tokens` tokens at a time (all rows, a slice of
        positions): the full f32 logits of a big batch are never held.
        """
        return self.loss_terms(params, batch)[:3]

    def loss_terms(self, params: Params, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, MoeStats | None]:
        """`loss_sums` and the per-layer MoE statistics [L, ...] of the same forward (None without MoE). With each row
        split over devices (`mesh.sequence` > 1) and `model.attention.zigzag`, rows are first laid out in the zigzag
        order, which balances causal attention work; the token sums do not change."""
        model: Transformer = nnx.merge(self.graphdef, params)
        devices = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in split_axes("length", self.rules))
        if devices > 1 and self.cfg.attention.zigzag:
            batch = to_zigzag(batch, devices)
        hidden_BTD, _, stats, _ = model.run(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
        sums = chunked_cross_entropy_sums(
            hidden_BTD, model.logits, batch["targets"], batch.get("loss_mask"),
            max(1, self.cfg.loss_chunk_tokens // hidden_BTD.shape[0]),
        )
        return (*sums, stats)

    def moe_aux_loss(self, stats: MoeStats | None) -> jax.Array:
        """Weighted router losses, averaged over layers: load_balance_loss * LB + router_z_loss * Z."""
        if stats is None:
            return jnp.zeros((), jnp.float32)
        m = self.cfg.moe
        return m.load_balance_loss * jnp.mean(stats.load_balance_loss) + m.router_z_loss * jnp.mean(stats.router_z_loss)

    def objective_sums(
        self, params: Params, batch: Batch, *, z_loss: float = 0.0
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array, jax.Array], MoeStats | None]:
        """The training objective as a token sum, its parts (cross-entropy sum, logsumexp^2 sum, tokens, router-loss
        sum) and the MoE statistics. The router losses are weighted by the token count, so microbatches add up like
        the cross entropy. The one definition of what training minimises: `loss` and the train step use it."""
        ce, zl, n, stats = self.loss_terms(params, batch)
        aux = self.moe_aux_loss(stats) * n
        return ce + z_loss * zl + aux, (ce, zl, n, aux), stats

    def loss(self, params: Params, batch: Batch, *, z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
        """What `jaxllm train` minimises, per target token: the next-token cross entropy of batch['targets'] given
        batch['inputs'] (both [B, T]), plus z_loss * mean logsumexp^2, plus the MoE router losses (load balance,
        router z-loss; none without MoE). Returns (loss, {cross_entropy, z_loss, aux_loss, tokens})."""
        _, (ce, zl, n, aux), _ = self.objective_sums(params, batch, z_loss=z_loss)
        return loss_from_sums(ce, zl, n, z_loss, aux)

    # ------------------------------------------------------------------------ structured FFN maps
    @functools.cached_property
    def merged_model(self) -> LanguageModel:
        """The same model with dense FFN maps (for `merge_params`); itself when already dense."""
        if self.cfg.mlp.structure == "dense":
            return self
        mlp = dataclasses.replace(self.cfg.mlp, structure="dense")
        return LanguageModel(dataclasses.replace(self.cfg, mlp=mlp), self.rules)

    def merge_params(self, params: Params) -> Params:
        """Params for `merged_model`: structured FFN factors multiplied out (no nonlinearity between them)."""
        if self.cfg.mlp.structure == "dense":
            return params
        from jaxllm.models.structured import merge_structured

        return merge_structured(self.cfg, params)

    # -------------------------------------------------------------------------------- accounting
    @property
    def num_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.param_shapes))

    @property
    def num_embedding_params(self) -> int:
        """Lookup-table params (token and learned position embeddings): no matmul FLOPs."""
        n = self.cfg.vocab_size * self.cfg.d_model
        return n + (self.cfg.max_seq_len * self.cfg.d_model if self.cfg.position == "learned" else 0)

    @property
    def active_matmul_params(self) -> int:
        """Weights a token passes through in matmuls (the output head even when tied; MoE: the experts it
        runs): forward FLOPs per token = 2 x this + attention."""
        c = self.cfg
        matmul_params = self.num_params - self.num_embedding_params
        if c.tie_embeddings:  # the shared table is also the output head's matmul
            matmul_params += c.vocab_size * c.d_model
        matmul_params -= _bias_and_norm_params(self.param_shapes)
        m, moe_layers = c.moe, c.num_layers // c.moe.every
        if m.num_experts and m.lora_rank:  # MixLoRA: top_k experts' deltas; the dense down map per choice
            D, F = c.d_model, c.mlp.d_ff
            matmul_params -= moe_layers * ((m.num_experts - m.top_k) * 3 * m.lora_rank * (D + F) - (m.top_k - 1) * F * D)
        elif m.num_experts:  # a token runs top_k of the experts (at most: null experts run none)
            per_expert = 3 * c.d_model * (m.d_ff or c.mlp.d_ff)
            matmul_params -= moe_layers * (m.num_experts - min(m.top_k, m.num_experts)) * per_expert
        return matmul_params

    def flops_per_token(self, seq_len: int, *, training: bool = True, frozen_matmul_params: int = 0) -> float:
        """Matmul FLOPs per token for a row of `seq_len` tokens (causal).

        Forward = 2 * active_matmul_params + 4 * layers * heads * head_dim * (mean keys attended per query:
        causal, windowed). Training adds the input gradients (= forward) and the weight gradients
        (2 per weight), except for `frozen_matmul_params` of those weights, whose gradients are never
        computed: 3 * forward - 2 * frozen. Norms, softmax and elementwise work are not counted.
        """
        c = self.cfg
        window = c.attention.sliding_window or seq_len
        mean_keys = sum(min(i + 1, window) for i in range(seq_len)) / seq_len
        forward = 2 * self.active_matmul_params + 4 * c.num_layers * c.num_heads * c.resolved_head_dim * mean_keys
        return 3 * forward - 2 * frozen_matmul_params if training else forward

    def param_shardings(self, mesh: Mesh) -> Any:
        """NamedSharding tree matching `init`'s output under this model's logical-axis rules."""
        return param_shardings(self.logical_axes, self.param_shapes, mesh, self.rules)


def _bias_and_norm_params(param_shapes: Params) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(param_shapes)
    return sum(int(x.size) for path, x in leaves if getattr(path[-1], "key", None) in ("bias", "scale"))


def build(cfg: Config) -> LanguageModel:
    """The LanguageModel of a full config, with its mesh's logical-axis rules."""
    return LanguageModel(cfg.model, cfg.mesh.rules)
