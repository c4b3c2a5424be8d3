"""LoRA and its variants (rsLoRA, PiSSA / MiLoRA / OLoRA inits, DoRA, LoRA+, QLoRA-style quantised bases; all in
`finetune.lora`): adapters train against a frozen base; the finished run exports a peft adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from rich.console import Console

from jaxllm.config import Config, ConfigError
from jaxllm.language_model import LanguageModel, Params
from jaxllm.peft.lora import LoraAdapter
from jaxllm.train.methods.base_model import Base, fresh_copies, load_base
from jaxllm.train.methods.method import Prepared, TrainingMethod
from jaxllm.train.methods.registry import register
from jaxllm.train.optimizer import make_optimizer


@register("lora")
class Lora(TrainingMethod):
    kind = "LoRA"  # what the run's first line calls the adapters

    def __init__(self, cfg: Config, lm: LanguageModel):
        super().__init__(cfg, lm)
        self.adapter = self.make_adapter(lm, cfg)
        self.initial: Params | None = None  # the adapter as initialised (PiSSA-style exports need it)

    @staticmethod
    def make_adapter(lm: LanguageModel, cfg: Config) -> LoraAdapter:
        return LoraAdapter(lm, cfg.finetune.lora)

    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.cfg.train, self.cfg.finetune.lora.lr_ratio)  # LoRA+: B's own learning rate

    def prepare(self, mesh: Mesh, key: jax.Array, base: Base) -> Prepared:
        shardings = self.adapter.shardings(mesh)
        trained, frozen = self.initialise(key, load_base(self.cfg, self.lm, mesh, base), mesh)
        self.initial = jax.tree.map(jnp.copy, trained)  # not donated with the state
        return Prepared(fresh_copies(trained, shardings), shardings, frozen)

    def initialise(self, key: jax.Array, base: Params, mesh: Mesh) -> tuple[Params, Params]:
        """(adapter, frozen) from the placed base, placed on `mesh`."""
        shardings = (self.adapter.shardings(mesh), self.adapter.frozen_shardings(mesh))
        init = jax.jit(self.adapter.init, out_shardings=shardings)
        return init(key, base)

    def to_model(self, trained: Params, frozen: Params, rng: jax.Array | None) -> Params:
        return self.adapter.apply(frozen, trained, rng)

    def model_params(self, trained: Params, frozen: Params, step: int) -> Params:
        return jax.jit(self.adapter.merge)(frozen, trained)  # the adapters merged into the base

    def flops_per_token(self, seq_len: int) -> float:
        """The base's forward and input gradients (no dW: frozen) + the adapters' (`adapter.flops_per_token`)."""
        lm = self.lm
        return lm.flops_per_token(seq_len, frozen_matmul_params=lm.active_matmul_params) + self.adapter.flops_per_token()

    def describe(self, trained_abstract: Params) -> str:
        a, n = self.adapter, self.lm.num_params
        return (f"{a.num_params:,} trainable {self.kind} params ({100 * a.num_params / n:.2f}%) on {len(a.targets)} linear "
                f"maps of a frozen {n:,}-param base")

    def as_lora(self, trained: Params) -> Params:
        """The trained tree as the LoRA factors {a, b} (and DoRA's magnitude) that peft's format holds."""
        return trained

    def export(self, trained: Params, run_dir: Path, console: Console) -> Path | None:
        """The adapter as a peft directory (`run_dir/adapter`) when the base is a Hugging Face family."""
        from jaxllm.interop.hf_mapping import model_type_of
        from jaxllm.interop.peft_adapter import save_peft_adapter

        try:
            out = save_peft_adapter(run_dir / "adapter", self.adapter, self.as_lora(jax.device_get(trained)),
                                    model_type_of(self.lm.cfg), initial=self.as_lora(jax.device_get(self.initial)),
                                    base_model=self.cfg.finetune.base)
        except ConfigError as err:
            console.print(f"[yellow]adapter not exported in peft format: {err}[/]")
            return None
        console.print(f"adapter ({self.adapter.num_params:,} params) in peft format: {out}")
        return out


def adapter_method(name: str, kind: str, make_adapter: Callable[[LanguageModel, Config], LoraAdapter]) -> type[Lora]:
    """Register `name` (a `finetune.method`) as LoRA's method over another adapter type: the same optimizer, merge,
    FLOP count and peft export, the adapters `make_adapter(lm, cfg)` builds; the run's first line calls them `kind`."""
    cls = type(kind, (Lora,), {"kind": kind, "make_adapter": staticmethod(make_adapter), "__module__": __name__})
    return register(name)(cls)
