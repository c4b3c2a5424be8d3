"""Load a model from either kind of directory, and convert between them.

A *Hugging Face directory* holds config.json + safetensors (+ tokenizer.json); a *jaxllm run
directory* holds config.yaml + checkpoints/ written by `jaxllm train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax

from jaxllm.config import Config, ConfigError, load_config, to_yaml
from jaxllm.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from jaxllm.interop.hf_checkpoint import load_hf_checkpoint, read_hf_config, save_hf_checkpoint
from jaxllm.interop.hf_mapping import config_from_hf
from jaxllm.language_model import LanguageModel, Params


@dataclass
class LoadedModel:
    lm: LanguageModel
    params: Params
    tokenizer: Tokenizer | None
    config: Config  # for HF directories: defaults with this model config
    family: str | None = None  # Hugging Face model_type (HF directories only)


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").exists() and (path / "checkpoints").is_dir()


def load_model(path: str | Path, adapter: str | Path | None = None) -> LoadedModel:
    """A model with its params and tokenizer; `adapter`: a peft LoRA directory merged into a Hugging Face base
    (as peft's merge_and_unload does)."""
    path = Path(path)
    if (path / "config.json").exists():
        lm, params, family = load_hf_checkpoint(path)
        tok = HFTokenizer(path / "tokenizer.json") if (path / "tokenizer.json").exists() else None
        if adapter is not None:
            from jaxllm.interop.peft_adapter import load_peft_adapter

            lora_adapter, lora = load_peft_adapter(adapter, lm, family)
            params = jax.jit(lora_adapter.merge)(params, lora)
        return LoadedModel(lm, params, tok, Config(model=lm.cfg), family)
    if adapter is not None:
        raise ConfigError(f"a peft adapter applies to a Hugging Face base directory; {path} is not one "
                          "(`jaxllm convert` a jaxllm run to one first)")
    if is_run_dir(path):
        from jaxllm.train.checkpoint import Checkpointer
        from jaxllm.train.setup import phase_config, setup_step

        cfg = load_config([path / "config.yaml"], ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.expert=1",
                                                   "mesh.dcn_data=1", "mesh.dcn_fsdp=1",
                                                   f"train.batch_size={jax.device_count()}", "train.microbatches=1"])
        ckpt = Checkpointer(path / "checkpoints", cfg.checkpoint)
        cfg = phase_config(cfg, ckpt.latest_step() or 0)  # e.g. saved after its self-guided phase: no guides
        setup = setup_step(cfg)
        restored = ckpt.restore_latest(setup.abstract_state)
        if restored is None:
            raise ConfigError(f"{path}: the run directory holds no complete checkpoint")
        step, state = restored[0], restored[1]
        params = setup.method.model_params(state.params, setup.frozen, step)  # e.g. LoRA: merged into its base
        return LoadedModel(setup.lm, params, load_tokenizer(cfg.data.tokenizer), cfg)
    raise ConfigError(f"{path}: neither a Hugging Face directory (config.json) nor a jaxllm run directory "
                      "(config.yaml + checkpoints/)")


def base_config(path: str | Path) -> Config:
    """Defaults for fine-tuning the model in `path`: its model config, tokenizer and sequence length."""
    path = Path(path)
    if (path / "config.json").exists():
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
    raise ConfigError(f"finetune base {str(path)!r}: neither a Hugging Face directory (config.json) nor a jaxllm "
                      "run directory (config.yaml + checkpoints/)")


def convert(src: str | Path, dst: str | Path) -> str:
    """HF directory -> jaxllm run directory (step 0, fresh optimizer: `jaxllm train` continues from it),
    or jaxllm run directory -> HF directory. Returns a one-line description."""
    src, dst = Path(src), Path(dst)
    if (src / "config.json").exists():
        from jaxllm.train.checkpoint import Checkpointer
        from jaxllm.train.setup import setup_step

        lm, params, family = load_hf_checkpoint(src)
        tok = str(src / "tokenizer.json") if (src / "tokenizer.json").exists() else "byte"
        cfg = Config(model=lm.cfg)
        cfg.data.tokenizer, cfg.data.seq_len = tok, min(cfg.data.seq_len, lm.cfg.max_seq_len)
        cfg.checkpoint.run_dir = str(dst)
        setup = setup_step(cfg)
        state = setup.init()._replace(params=jax.device_put(params, setup.state_sharding.params))
        state = state._replace(opt_state=jax.jit(setup.tx.init)(state.params))
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "config.yaml").write_text(to_yaml(cfg))
        ckpt = Checkpointer(dst / "checkpoints", cfg.checkpoint)
        ckpt.save(0, state, {}, force=True)
        ckpt.wait()
        ckpt.close()
        return f"{family} checkpoint {src} -> jaxllm run directory {dst} (step 0)"
    loaded = load_model(src)
    tok_dir = Path(loaded.config.data.tokenizer).parent if loaded.config.data.tokenizer != "byte" else None
    family = save_hf_checkpoint(dst, loaded.lm.cfg, loaded.params, tokenizer_dir=tok_dir)
    return f"jaxllm run {src} -> {family} checkpoint {dst}"
