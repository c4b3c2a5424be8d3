"""Decoder-only transformer covering the Llama, Mistral, Qwen2 and GPT-2 families by configuration.

Layers are stacked (params carry a leading `layers` axis) and run with `jax.lax.scan`, so compile
time does not grow with depth; `scan_layers=False` unrolls the same loop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.attention import Attention
from jaxllm.models.bottleneck import Bottleneck
from jaxllm.models.ffn_skip import FfnSkip, cosine_B
from jaxllm.models.kv_cache import KVCache, LayerCache
from jaxllm.models.layers import Dense, Embed, make_norm
from jaxllm.models.mixlora import MixLoraFfn
from jaxllm.models.mlp import Mlp
from jaxllm.models.moe import MoeFfn, MoeStats
from jaxllm.models.pregate_router import PregateRouter
from jaxllm.sharding import Rules, constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def moe_every(cfg: ModelConfig) -> int:
    """1 when every layer is alike (all dense or all MoE), else N: layers N-1, 2N-1, ... are MoE."""
    return cfg.moe.every if cfg.moe.num_experts else 1


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); with `model.bottleneck`, adapters on the
    sublayers it names (`attn_adapter`, `mlp_adapter`)."""

    def __init__(self, cfg: ModelConfig, rules: Rules, *, rngs: nnx.Rngs):
        self.rules = rules
        self.attn_norm = make_norm(cfg, cfg.d_model, rngs)
        self.attn = Attention(cfg, rules, rngs=rngs)
        self.mlp_norm = make_norm(cfg, cfg.d_model, rngs)
        if cfg.moe.num_experts and cfg.moe.lora_rank:
            self.mlp = MixLoraFfn(cfg, rules, rngs=rngs)
        elif cfg.moe.num_experts:
            self.mlp = MoeFfn(cfg, rules, rngs=rngs)
        else:
            self.mlp = Mlp(cfg, rules, rngs=rngs)
        adapted = cfg.bottleneck.sublayers if cfg.bottleneck.width else ()
        self.attn_adapter = Bottleneck(cfg, rngs=rngs) if "attn" in adapted else None
        self.mlp_adapter = Bottleneck(cfg, rngs=rngs) if "mlp" in adapted else None

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache: LayerCache | None = None, router_state=None,
                 packed: bool = True):
        """[B, T, D] -> ([B, T, D], (k_cache, v_cache) or None, MoeStats or None, router state or None).
        `router_state`: a recurrent MoE router's per-token state from the layer below, or the pre-gating router's
        logits."""
        x_BTD, kv = self.attend(x_BTD, positions_BT, segment_ids_BT, cache, packed)
        ffn_BTD, stats, router_state = self.feed_forward(x_BTD, router_state)
        return self.add(x_BTD, ffn_BTD), kv, stats, router_state

    def attend(self, x_BTD, positions_BT, segment_ids_BT, cache: LayerCache | None, packed: bool):
        """x + attention(norm(x)) [B, T, D], and the layer's (k_cache, v_cache) or None."""
        normed_BTD = self.attn_norm(x_BTD)
        attn = self.attn(normed_BTD, positions_BT, segment_ids_BT, cache, packed=packed)
        attn_BTD, kv = attn if cache is not None else (attn, None)
        if self.attn_adapter is not None:
            attn_BTD = self.attn_adapter(normed_BTD, attn_BTD)
        return x_BTD + attn_BTD, kv

    def feed_forward(self, x_BTD, router_state=None):
        """The FFN's contribution ffn(norm(x)) [B, T, D] (not yet added), MoeStats or None, router state or None."""
        normed_BTD = self.mlp_norm(x_BTD)
        if isinstance(self.mlp, (MoeFfn, MixLoraFfn)):
            ffn_BTD, stats, router_state = self.mlp(normed_BTD, router_state)
        else:
            ffn_BTD, stats = self.mlp(normed_BTD), None
        if self.mlp_adapter is not None:
            ffn_BTD = self.mlp_adapter(normed_BTD, ffn_BTD)
        return ffn_BTD, stats, router_state

    def add(self, x_BTD, ffn_BTD):
        return constrain(x_BTD + ffn_BTD, ("batch", "length", "act_embed"), self.rules)


class Transformer(nnx.Module):
    """tokens [B, T] -> logits [B, T, V] (and optionally the final hidden states [B, T, D])."""

    def __init__(self, cfg: ModelConfig, rules: Rules, *, rngs: nnx.Rngs):
        self.cfg, self.rules = cfg, rules
        kw = dict(std=cfg.init_std, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), **kw)
        if cfg.position == "learned":
            self.pos_embed = Embed(cfg.max_seq_len, cfg.d_model, (None, "embed"), **kw)

        def stack(block_cfg: ModelConfig, n: int) -> Block:
            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(block_cfg, rules, rngs=rngs)

            return make_blocks(rngs)

        every = moe_every(cfg)
        if every == 1:
            self.blocks = stack(cfg, cfg.num_layers)
        else:  # groups of (every - 1) dense blocks then one MoE block: two stacks, scanned group by group
            dense_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=0))
            self.blocks = stack(dense_cfg, cfg.num_layers - cfg.num_layers // every)
            self.moe_blocks = stack(cfg, cfg.num_layers // every)
        if cfg.moe.num_experts and cfg.moe.router == "pregate":
            self.pregate = PregateRouter(cfg.vocab_size, cfg.max_seq_len, cfg.moe.router_state_dim,
                                         cfg.moe.num_experts + cfg.moe.null_experts, cfg.init_std, rngs=rngs)
        self.final_norm = make_norm(cfg, cfg.d_model, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), use_bias=False, **kw)

    def hidden(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Final-norm hidden states [B, T, D]. Default positions 0..T-1, one segment per row.

        With a `cache` the tokens continue what it holds: returns (hidden, updated cache).
        """
        hidden_BTD, cache, _, _ = self.run(tokens_BT, positions_BT, segment_ids_BT, cache)
        return hidden_BTD if cache is None else (hidden_BTD, cache)

    def run(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        ffn_skip: FfnSkip | None = None,
    ) -> tuple[jax.Array, KVCache | None, MoeStats | None, jax.Array | None]:
        """(hidden [B, T, D], updated cache or None, per-layer MoeStats [L, ...] or None, and with `ffn_skip` (one
        token per row continuing a cache, dense FFNs) which rows skipped each layer's FFN [L, B], else None)."""
        cfg, rules = self.cfg, self.rules
        B, T = tokens_BT.shape
        if ffn_skip is not None and (cache is None or T != 1 or cfg.moe.num_experts):
            raise ValueError("FFN skipping decodes one token per row from a cache, on a model with dense FFNs")
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        packed = segment_ids_BT is not None  # static: unpacked rows may use cuDNN's own causal mask
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        x_BTD = self.embed(tokens_BT)
        if cfg.position == "learned":
            x_BTD = x_BTD + self.pos_embed(positions_BT)
        x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"), rules)

        if cache is not None:
            cache = cache.record(positions_BT, segment_ids_BT)

        def layer_fn(block_def):
            def layer(carry, xs):
                x_BTD, router_state = carry
                block = nnx.merge(block_def, xs[0])
                layer_cache = None
                if cache is not None:
                    layer_cache = LayerCache(xs[1], xs[2], cache.positions, cache.segment_ids, cache.slots(T))
                x_BTD, kv, stats, router_state = block(x_BTD, positions_BT, segment_ids_BT, layer_cache, router_state,
                                                       packed=packed)
                return (x_BTD, router_state), (kv, stats)

            if cfg.remat != "none" and cache is None:
                layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
            return layer

        def skipping_layer(block_def, stacked_state):
            def block_at(layer):
                return nnx.merge(block_def, jax.tree.map(lambda a: a[layer], stacked_state))

            def layer(carry, xs):
                x_BTD, cos_B = carry
                k, v, layer = xs
                layer_cache = LayerCache(k, v, cache.positions, cache.segment_ids, cache.slots(T))
                # only attention's weights are used here (the FFN's slices are dead code): XLA copies a dynamic
                # slice of a weight before its dot, so the FFN's are sliced inside the branch that runs it; sliced
                # here, a skipped FFN would cost as much memory traffic as one that runs
                block = block_at(layer)
                x_BTD, kv = block.attend(x_BTD, positions_BT, segment_ids_BT, layer_cache, packed)
                skip_B = ffn_skip.decide(layer, cfg.num_layers, cos_B)
                ffn = lambda x: block_at(layer).feed_forward(x)[0]
                if B == 1:  # a real skip
                    ffn_BTD = jax.lax.cond(skip_B[0], jnp.zeros_like, ffn, x_BTD)
                else:
                    ffn_BTD = jnp.where(skip_B[:, None, None], jnp.zeros((), x_BTD.dtype), ffn(x_BTD))
                y_BTD = block.add(x_BTD, ffn_BTD)
                return (y_BTD, jnp.where(skip_B, cos_B, cosine_B(x_BTD, y_BTD))), (kv, skip_B)

            return layer

        router_state = None
        if cfg.moe.num_experts and cfg.moe.router == "recurrent":  # zeros below the first layer
            router_state = jnp.zeros((B, T, cfg.moe.router_state_dim), jnp.float32)
        elif cfg.moe.num_experts and cfg.moe.router == "pregate":  # every layer's routing, once, before the stack
            router_state = self.pregate(tokens_BT, positions_BT)
        block_def, stacked_state = nnx.split(self.blocks)
        every = moe_every(cfg)
        skipped_LB = None
        if ffn_skip is not None:
            xs = (cache.k, cache.v, jnp.arange(cfg.num_layers))
            (x_BTD, _), (kv, skipped_LB) = jax.lax.scan(skipping_layer(block_def, stacked_state),
                                                       (x_BTD, jnp.zeros((B,))), xs)
            stats = None
        elif every == 1:
            unroll = 1 if cfg.scan_layers else cfg.num_layers
            xs = (stacked_state,) if cache is None else (stacked_state, cache.k, cache.v)
            (x_BTD, _), (kv, stats) = jax.lax.scan(layer_fn(block_def), (x_BTD, router_state), xs, unroll=unroll)
        else:
            x_BTD, kv, stats = self._run_groups(layer_fn, block_def, stacked_state, x_BTD, router_state, cache, every)
        hidden_BTD = self.final_norm(x_BTD)
        if cache is not None:
            cache = cache._replace(k=kv[0], v=kv[1], index=cache.index + T)
        return hidden_BTD, cache, stats, skipped_LB

    def _run_groups(self, layer_fn, dense_def, dense_state, x_BTD, router_state, cache, every: int):
        """The layers as G = L / every groups of (every - 1) dense blocks then one MoE block (a scan over
        groups, each scanning its dense blocks). KV caches stay [L, ...] in layer order."""
        G = self.cfg.num_layers // every
        moe_def, moe_state = nnx.split(self.moe_blocks)
        grouped = lambda tree, n: jax.tree.map(lambda a: a.reshape(G, n, *a.shape[1:]), tree)
        dense_layer, moe_layer = layer_fn(dense_def), layer_fn(moe_def)

        def group(carry, xs):
            dense_xs, moe_xs = xs[0], xs[1]
            kv_xs = xs[2:]
            inner = (dense_xs,) + tuple(a[: every - 1] for a in kv_xs)
            carry, (dense_kv, _) = jax.lax.scan(dense_layer, carry, inner)
            carry, (moe_kv, stats) = moe_layer(carry, (moe_xs,) + tuple(a[every - 1] for a in kv_xs))
            kv = None if not kv_xs else tuple(jnp.concatenate([d, m[None]]) for d, m in zip(dense_kv, moe_kv))
            return carry, (kv, stats)

        xs = (grouped(dense_state, every - 1), moe_state)
        if cache is not None:
            xs += (grouped(cache.k, every), grouped(cache.v, every))
        (x_BTD, _), (kv, stats) = jax.lax.scan(group, (x_BTD, router_state), xs,
                                               unroll=1 if self.cfg.scan_layers else G)
        if kv is not None:
            kv = tuple(a.reshape(-1, *a.shape[2:]) for a in kv)
        return x_BTD, kv, stats

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """Output head (tied or untied) with optional soft-cap: [B, T, D] -> [B, T, V]."""
        cfg = self.cfg
        logits_BTV = self.embed.attend(x_BTD) if cfg.tie_embeddings else self.lm_head(x_BTD)
        if cfg.final_logit_softcap is not None:
            cap = cfg.final_logit_softcap
            logits_BTV = cap * jnp.tanh(logits_BTV / cap)
        return constrain(logits_BTV, ("batch", "length", "act_vocab"), self.rules)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None) -> jax.Array:
        return self.logits(self.hidden(tokens_BT, positions_BT, segment_ids_BT))
