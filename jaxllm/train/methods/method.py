"""The shape every training method has: what it trains, what it holds fixed, how the two make the model's params,
what it adds to a run's log, where its phase ends and what it leaves behind. `setup_step` and `train` ask the method,
never which method it is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh
from rich.console import Console

from jaxllm.config import Config
from jaxllm.data.pipeline import calibration_rows
from jaxllm.language_model import LanguageModel, Params
from jaxllm.train.methods.base_model import Base
from jaxllm.train.optimizer import make_optimizer


CALIBRATION_RECORD = "calibration_rows.npy"  # in a run directory: the rows its method calibrated on [N, T]


@dataclass(frozen=True)
class Prepared:
    """A method's starting point on a mesh."""

    init_trained: Callable[[], Params]  # fresh buffers of the trained params on each call (the step donates them)
    trained_shardings: Any
    frozen: Any = None  # what the step holds fixed (a frozen base), placed; None: nothing


class TrainingMethod:
    """Pretraining's answers; a method overrides what it does differently. Register a subclass by name with
    `jaxllm.train.methods.register` (fine-tuning methods are then chosen by `finetune.method`)."""

    phase_note = "phase over"  # logged when `phase_end()` is reached

    def __init__(self, cfg: Config, lm: LanguageModel):
        self.cfg, self.lm = cfg, lm

    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.cfg.train)

    def prepare(self, mesh: Mesh, key: jax.Array, base: Base | None) -> Prepared:
        """The trained params' initialiser and shardings, and the frozen input, from `key` (a PRNG key) and, for a
        fine-tuning method, the base model (`finetune.base`, loaded by `setup_step`)."""
        shardings = self.lm.param_shardings(mesh)
        init = jax.jit(self.lm.init, out_shardings=shardings)
        return Prepared(lambda: init(key), shardings)

    def calibration_rows(self) -> list[np.ndarray]:
        """The run's calibration rows [T] (`finetune.calibration`), recorded in its run directory
        (`calibration_rows.npy`) the first time they are drawn: the run then resumes and loads (`load_run`) from what
        it calibrated on, even after its data has moved or changed. Without a run directory: drawn from the data."""
        record = Path(self.cfg.checkpoint.run_dir) / CALIBRATION_RECORD if self.cfg.checkpoint.run_dir else None
        if record is not None and record.exists():
            return list(np.load(record, allow_pickle=False))
        rows = list(calibration_rows(self.cfg.data, self.cfg.finetune.calibration))
        if record is not None and rows and jax.process_index() == 0:
            record.parent.mkdir(parents=True, exist_ok=True)
            np.save(record, np.stack(rows), allow_pickle=False)
        return rows

    def to_model(self, trained: Params, frozen: Any, rng: jax.Array | None) -> Params:
        """The params the model runs on in a step (`rng`: a PRNG key for stochastic methods; None to evaluate)."""
        return trained

    def objective_sums(self, model_params: Params, frozen: Any, batch: dict[str, jax.Array], z_loss: float
                       ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array, jax.Array], Any]:
        """What a step minimises on a batch, as token sums (`LanguageModel.objective_sums`'s shape): next-token
        cross entropy on the data; a distillation method compares with a teacher instead."""
        return self.lm.objective_sums(model_params, batch, z_loss=z_loss)

    def regularizers(self, trained: Params, frozen: Any) -> dict[str, jax.Array]:
        """Loss terms the method adds once per step ({name: f32 scalar}; a regulariser), logged as `method/<name>`."""
        return {}

    def update_mask(self, trained: Params) -> Any:
        """Which entries of the trained params may change: None (all), or a tree like `trained` holding, per leaf,
        a 0/1 array broadcastable to it or None (the whole leaf trains). Masked entries keep their values."""
        return None

    def frozen_at(self, frozen: Any, step: int) -> Any:
        """The step's fixed input: the frozen params (or a schedule's value at `step`)."""
        return frozen

    def model_params(self, trained: Params, frozen: Any, step: int) -> Params:
        """The model as trained so far, as plain params of `self.lm` (what loading a run directory gives)."""
        return self.to_model(trained, self.frozen_at(frozen, step), None)

    def step_metrics(self, step: int) -> dict[str, float]:
        """Metrics the method logs at `step` besides the step's own."""
        return {}

    def phase_end(self) -> int | None:
        """The step after which training continues as `next_config()` (None: one phase; at most two phases)."""
        return None

    def next_config(self) -> Config:
        raise NotImplementedError(f"{type(self).__name__} has one phase")

    def carry_over(self, trained_tree: Any) -> Any:
        """Trained params (or optimizer state shaped like them) into the next phase."""
        return trained_tree

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token this method performs (frozen weights get no weight gradient)."""
        return self.lm.flops_per_token(seq_len)

    def describe(self, trained_abstract: Params) -> str:
        """What trains, for the run's first line."""
        return f"{self.lm.num_params:,} params"

    def export(self, trained: Params, run_dir: Path, console: Console) -> Path | None:
        """What a finished run leaves besides its checkpoint (a peft adapter); the path or None."""
        return None
