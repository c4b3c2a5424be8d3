"""The base a fine-tuning method starts from: `finetune.base` loaded and placed on the mesh, checked against the
run's model (the same architecture; or the same dense model when the run adds experts: sparse upcycling)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.config import Config, ConfigError, ModelConfig
from jaxllm.language_model import LanguageModel, Params
from jaxllm.models.upcycle import upcycle


def loaded_base(cfg: Config):
    """`finetune.base` as a LoadedModel (a Hugging Face or a run directory)."""
    from jaxllm.interop.models import load_model  # loading a run directory sets up its steps: a recursion

    return load_model(cfg.finetune.base)


def load_base(cfg: Config, lm: LanguageModel, mesh: Mesh) -> Params:
    """The params of `finetune.base` for `lm`, placed on the mesh: its architecture must be `cfg.model`'s, or the
    same dense model when `cfg.model` adds experts (sparse upcycling: experts copied, router fresh)."""
    loaded = loaded_base(cfg)
    if cfg.model.moe.num_experts and not loaded.lm.cfg.moe.num_experts:
        key = jax.random.fold_in(jax.random.key(cfg.train.seed), 1)
        params = jax.jit(lambda p, k: upcycle(p, loaded.lm.cfg, cfg.model, k))(loaded.params, key)
        return jax.device_put(params, lm.param_shardings(mesh))
    base_cfg = with_execution_of(loaded.lm.cfg, cfg.model)
    if base_cfg != cfg.model:
        diff = {k: (getattr(cfg.model, k), getattr(base_cfg, k)) for k in vars(cfg.model)
                if getattr(cfg.model, k) != getattr(base_cfg, k)}
        raise ConfigError(f"model config differs from finetune.base={cfg.finetune.base!r} (config, base): {diff}")
    return jax.device_put(loaded.params, lm.param_shardings(mesh))


def with_execution_of(base: ModelConfig, run: ModelConfig) -> ModelConfig:
    """The base model's architecture run the way `run` runs a model: compute dtype, remat, layer scan, loss
    chunk and attention / grouped-matmul kernels may differ from the base without changing its function."""
    return dataclasses.replace(
        base, dtype=run.dtype, remat=run.remat, scan_layers=run.scan_layers, loss_chunk_tokens=run.loss_chunk_tokens,
        attention=dataclasses.replace(base.attention, impl=run.attention.impl),
        moe=dataclasses.replace(base.moe, impl=run.moe.impl))


def fresh_copies(params: Params, shardings) -> Callable[[], Params]:
    """A function returning new buffers of `params` on each call (the train step donates what it gets)."""
    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=shardings)
    return lambda: copy(params)
