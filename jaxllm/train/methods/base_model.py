"""The base a fine-tuning method starts from: `finetune.base` (a Hugging Face or a jaxllm run directory), handed to
the method by `setup_step`, checked against the run's model (the same architecture; or the same dense model when the
run adds experts: sparse upcycling) and placed on the mesh."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.config import Config, ConfigError, ModelConfig, load_config
from jaxllm.interop.hf_checkpoint import is_hf_dir, read_hf_config
from jaxllm.interop.hf_mapping import config_from_hf
from jaxllm.language_model import LanguageModel, Params
from jaxllm.models.upcycle import upcycle
from jaxllm.train.checkpoint import is_run_dir


@dataclass(frozen=True)
class Base:
    """A fine-tuning run's starting model: its architecture and params."""

    cfg: ModelConfig
    params: Params


def not_a_model_dir(path: Path | str) -> ConfigError:
    return ConfigError(f"{str(path)!r}: neither a Hugging Face directory (config.json) nor a jaxllm run directory "
                       "(config.yaml + checkpoints/)")


def base_config(path: str | Path) -> Config:
    """Defaults for fine-tuning the model in `path`: its model config, tokenizer and sequence length."""
    path = Path(path)
    if is_hf_dir(path):
        lm_cfg = config_from_hf(read_hf_config(path))
        cfg = Config(model=lm_cfg)
        if (path / "tokenizer.json").exists():
            cfg.data.tokenizer = str(path / "tokenizer.json")
        cfg.data.seq_len = min(cfg.data.seq_len, lm_cfg.max_seq_len)
        return cfg
    if is_run_dir(path):
        saved = load_config([path / "config.yaml"])
        cfg = Config(model=saved.model)
        cfg.data.tokenizer, cfg.data.seq_len = saved.data.tokenizer, saved.data.seq_len
        return cfg
    raise not_a_model_dir(path)


def load_base(cfg: Config, lm: LanguageModel, mesh: Mesh, base: Base) -> Params:
    """`base`'s params for `lm`, placed on the mesh: its architecture must be `cfg.model`'s, or the same dense model
    when `cfg.model` adds experts (sparse upcycling: experts copied, router fresh)."""
    if cfg.model.moe.num_experts and not base.cfg.moe.num_experts:
        key = jax.random.fold_in(jax.random.key(cfg.train.seed), 1)
        params = jax.jit(lambda p, k: upcycle(p, base.cfg, cfg.model, k))(base.params, key)
        return jax.device_put(params, lm.param_shardings(mesh))
    base_cfg = with_execution_of(base.cfg, cfg.model)
    if base_cfg != cfg.model:
        diff = {k: (getattr(cfg.model, k), getattr(base_cfg, k)) for k in vars(cfg.model)
                if getattr(cfg.model, k) != getattr(base_cfg, k)}
        raise ConfigError(f"model config differs from finetune.base={cfg.finetune.base!r} (config, base): {diff}")
    return jax.device_put(base.params, lm.param_shardings(mesh))


def with_execution_of(base: ModelConfig, run: ModelConfig) -> ModelConfig:
    """The base model's architecture run the way `run` runs a model: compute dtype, remat, layer scan, loss
    chunk, attention / grouped-matmul kernels and context parallelism may differ from the base without changing its
    function; so may the context it is extended to (`max_seq_len`, `rope_scaling`: e.g. YaRN for a longer context)."""
    return dataclasses.replace(
        base, dtype=run.dtype, remat=run.remat, scan_layers=run.scan_layers, loss_chunk_tokens=run.loss_chunk_tokens,
        max_seq_len=run.max_seq_len, rope_scaling=run.rope_scaling,
        attention=dataclasses.replace(base.attention, impl=run.attention.impl,
                                      context_parallel=run.attention.context_parallel, zigzag=run.attention.zigzag),
        moe=dataclasses.replace(base.moe, impl=run.moe.impl))


def fresh_copies(params: Params, shardings) -> Callable[[], Params]:
    """A function returning new buffers of `params` on each call (the train step donates what it gets)."""
    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=shardings)
    return lambda: copy(params)
