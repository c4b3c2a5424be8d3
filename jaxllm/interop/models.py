"""Load a model from either kind of directory, and convert between them.

A *Hugging Face directory* holds config.json + safetensors (+ tokenizer.json); a *jaxllm run
directory* holds config.yaml + checkpoints/ written by `jaxllm train`; a *compact directory* holds a 2:4-sparse
model's packed weights (`jaxllm.compress.compact`, written by `jaxllm compress --compact`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import jax

from jaxllm.compress.compact import is_compact_dir, load_compact
from jaxllm.config import Config, ConfigError, FinetuneConfig, load_config, to_yaml
from jaxllm.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from jaxllm.interop.hf_checkpoint import is_hf_dir, load_hf_checkpoint, save_hf_checkpoint
from jaxllm.train.checkpoint import Checkpointer, is_run_dir
from jaxllm.train.methods.base_model import not_a_model_dir
from jaxllm.train.setup import load_run, setup_step
from jaxllm.language_model import LanguageModel, Params


@dataclass
class LoadedModel:
    lm: LanguageModel
    params: Params
    tokenizer: Tokenizer | None
    config: Config  # for HF directories: defaults with this model config
    family: str | None = None  # Hugging Face model_type (HF directories only)


def load_model(path: str | Path, adapter: str | Path | None = None) -> LoadedModel:
    """A model with its params and tokenizer; `adapter`: a peft adapter directory (LoRA, MiSS, LoHa) merged into a
    Hugging Face base (as peft's merge_and_unload does)."""
    path = Path(path)
    if is_hf_dir(path):
        lm, params, family = load_hf_checkpoint(path)
        tok = HFTokenizer(path / "tokenizer.json") if (path / "tokenizer.json").exists() else None
        if adapter is not None:
            from jaxllm.interop.peft_adapter import load_peft_adapter

            lora_adapter, lora = load_peft_adapter(adapter, lm, family)
            params = jax.jit(lora_adapter.merge)(params, lora)
        cfg = Config(model=lm.cfg)
        cfg.data.seq_len = min(cfg.data.seq_len, lm.cfg.max_seq_len)
        if tok is not None:
            cfg.data.tokenizer = str(path / "tokenizer.json")
        return LoadedModel(lm, params, tok, cfg, family)
    if adapter is not None:
        raise ConfigError(f"a peft adapter applies to a Hugging Face base directory; {path} is not one "
                          "(`jaxllm convert` a jaxllm run to one first)")
    if is_run_dir(path):
        cfg, lm, params = load_run(path)
        return LoadedModel(lm, params, load_tokenizer(cfg.data.tokenizer), cfg)
    if is_compact_dir(path):
        cfg = load_config([path / "config.yaml"])
        if (path / "tokenizer.json").exists():
            cfg.data.tokenizer = str(path / "tokenizer.json")
        lm = LanguageModel(cfg.model)
        return LoadedModel(lm, jax.device_put(load_compact(path, lm)), load_tokenizer(cfg.data.tokenizer), cfg)
    raise not_a_model_dir(path)


def save_run(dst: str | Path, cfg: Config, params: Params) -> None:
    """`params` of `cfg.model` as a jaxllm run directory at step 0 (fresh optimizer; `jaxllm train` continues from it,
    `generate` / `eval` / `convert` load it); `cfg` is written with no fine-tuning base."""
    dst = Path(dst)
    cfg = dataclasses.replace(cfg, finetune=FinetuneConfig(),
                              checkpoint=dataclasses.replace(cfg.checkpoint, run_dir=str(dst)))
    setup = setup_step(cfg)
    state = setup.init()._replace(params=jax.device_put(params, setup.state_sharding.params))
    state = state._replace(opt_state=jax.jit(setup.tx.init)(state.params))
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.yaml").write_text(to_yaml(cfg))
    ckpt = Checkpointer(dst / "checkpoints", cfg.checkpoint)
    ckpt.save(0, state, {}, force=True)
    ckpt.wait()
    ckpt.close()


def convert(src: str | Path, dst: str | Path) -> str:
    """HF directory -> jaxllm run directory (step 0, fresh optimizer: `jaxllm train` continues from it),
    or jaxllm run directory -> HF directory. Returns a one-line description."""
    src, dst = Path(src), Path(dst)
    if is_hf_dir(src):
        lm, params, family = load_hf_checkpoint(src)
        tok = str(src / "tokenizer.json") if (src / "tokenizer.json").exists() else "byte"
        cfg = Config(model=lm.cfg)
        cfg.data.tokenizer, cfg.data.seq_len = tok, min(cfg.data.seq_len, lm.cfg.max_seq_len)
        save_run(dst, cfg, params)
        return f"{family} checkpoint {src} -> jaxllm run directory {dst} (step 0)"
    loaded = load_model(src)
    tok_dir = Path(loaded.config.data.tokenizer).parent if loaded.config.data.tokenizer != "byte" else None
    family = save_hf_checkpoint(dst, loaded.lm.cfg, loaded.params, tokenizer_dir=tok_dir)
    return f"jaxllm run {src} -> {family} checkpoint {dst}"
