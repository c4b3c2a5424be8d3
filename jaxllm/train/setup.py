"""Everything a config needs before its first step: model, optimizer, mesh, shardings, jitted steps.

Shared by the trainer and `jaxllm bench`, so both time and run the very same compiled step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import Config, ConfigError, load_config, validate
from jaxllm.interop.hf_checkpoint import is_hf_dir, load_hf_checkpoint
from jaxllm.language_model import LanguageModel, Params, build
from jaxllm.sharding import logical_to_spec, make_mesh
from jaxllm.train.checkpoint import Checkpointer, is_run_dir
from jaxllm.train.methods import TrainingMethod, method_for
from jaxllm.train.methods.base_model import Base, not_a_model_dir
from jaxllm.train.optimizer import make_schedule
from jaxllm.train.step import TrainState, make_eval_step, make_train_step


def state_shardings(abstract: TrainState, param_sh: Any, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Shardings of a TrainState: params by their logical axes, optimizer statistics like their
    param when shaped like it, everything else (counts, Adafactor's factored statistics) replicated. Masked
    optimizers (LoRA+'s per-label transforms) keep their MaskedNode placeholders: they hold no array."""
    replicated = NamedSharding(mesh, PartitionSpec())
    masked = lambda leaf: isinstance(leaf, optax.MaskedNode)

    def same_rank(leaf, sh):
        if masked(leaf):
            return leaf
        return sh if len(sh.spec) == len(leaf.shape) else replicated

    opt_sh = optax.tree_map_params(
        tx, same_rank, abstract.opt_state, param_sh, transform_non_params=lambda _: replicated, is_leaf=masked
    )
    return TrainState(replicated, param_sh, opt_sh, replicated)


@dataclass(frozen=True)
class StepSetup:
    lm: LanguageModel
    method: TrainingMethod  # what trains, what is frozen, how they make the model (jaxllm/train/methods/)
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    init: Callable[[], TrainState]  # a fresh, sharded TrainState (new buffers each call: the step donates them)
    abstract_state: TrainState  # ShapeDtypeStructs carrying their target shardings
    state_sharding: TrainState
    batch_sharding: NamedSharding
    train_step: Callable  # jitted (state, batch, frozen) -> (state, metrics); donates state
    eval_step: Callable  # jitted (params, batch, frozen) -> (loss sum, token count)
    frozen: Any = None  # what the method holds fixed (a frozen base), or None

    def frozen_at(self, step: int) -> Any:
        """The step's non-trained input: the frozen params, or a schedule's value (the self-guided weight a)."""
        return self.method.frozen_at(self.frozen, step)

    def flops_per_token(self, seq_len: int) -> float:
        return self.method.flops_per_token(seq_len)

    def global_batch(self, local: dict[str, Any]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over the batch axes."""
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), local)


def setup_step(cfg: Config, base: Base | None = None) -> StepSetup:
    """Model, optimizer, mesh, initial state and jitted steps of a config, for the training method it names
    (`jaxllm.train.methods`: pretraining, or with `finetune.base` set, `finetune.method`, starting from `base`:
    by default the model in the `finetune.base` directory)."""
    validate(cfg, jax.device_count())
    lm, mesh = build(cfg), make_mesh(cfg.mesh)
    method = method_for(cfg, lm)
    if cfg.finetune.base and base is None:
        base = load_base_model(cfg.finetune.base)
    tx, schedule = method.optimizer(), make_schedule(cfg.train)
    replicated = NamedSharding(mesh, PartitionSpec())
    init_key, rng = jax.random.split(jax.random.key(cfg.train.seed))
    rng_data = jax.random.key_data(rng)
    prepared = method.prepare(mesh, init_key, base)
    fresh_state = lambda params: TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.copy(rng_data))
    abstract = jax.eval_shape(lambda: fresh_state(prepared.init_trained()))
    state_sh = state_shardings(abstract, prepared.trained_shardings, tx, mesh)
    start = jax.jit(fresh_state, out_shardings=state_sh)
    frozen = prepared.frozen
    frozen_sh = replicated if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
    batch_sh = NamedSharding(mesh, logical_to_spec(("batch", "length"), lm.rules, dict(mesh.shape)))
    step = make_train_step(lm, tx, microbatches=cfg.train.microbatches, z_loss=cfg.train.z_loss, schedule=schedule,
                           to_model=method.to_model, regularizers=method.regularizers, update_mask=method.update_mask,
                           objective=method.objective_sums)
    train_step = jax.jit(step, in_shardings=(state_sh, batch_sh, frozen_sh), out_shardings=(state_sh, None),
                         donate_argnums=(0,))
    return StepSetup(
        lm=lm, method=method, tx=tx, schedule=schedule, mesh=mesh, init=lambda: start(prepared.init_trained()),
        abstract_state=jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh),
        state_sharding=state_sh, batch_sharding=batch_sh, train_step=train_step,
        eval_step=jax.jit(make_eval_step(lm, method.to_model), in_shardings=(state_sh.params, batch_sh, frozen_sh)),
        frozen=frozen,
    )


def phase_config(cfg: Config, step: int) -> Config:
    """The config of the phase that `step` falls in (a self-guided run is a structured model after its phase)."""
    method = method_for(cfg, build(cfg))
    while (end := method.phase_end()) is not None and step >= end:
        cfg = method.next_config()
        method = method_for(cfg, build(cfg))
    return cfg


def next_phase(state: TrainState, setup: StepSetup, after: StepSetup) -> TrainState:
    """A state at the end of `setup`'s phase, carried into `after`'s (params and optimizer statistics alike)."""
    carry = setup.method.carry_over
    return jax.device_put(TrainState(state.step, carry(state.params), carry(state.opt_state), state.rng),
                          after.state_sharding)


def load_run(path: Path, step: int | None = None) -> tuple[Config, LanguageModel, Params]:
    """(config, model, params) of a jaxllm run directory's newest complete checkpoint (`step`: the one of that step),
    on this process's devices; a fine-tuning run gives its model as trained (e.g. LoRA: the adapters merged into the
    base)."""
    cfg = load_config([path / "config.yaml"], ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.expert=1",
                                               "mesh.sequence=1", "mesh.dcn_data=1", "mesh.dcn_fsdp=1",
                                               f"train.batch_size={jax.device_count()}", "train.microbatches=1"])
    cfg.checkpoint.run_dir = str(path)  # where the run is now: its method may read what it recorded there
    ckpt = Checkpointer(path / "checkpoints", cfg.checkpoint)
    try:
        if step is not None and step not in ckpt.steps():
            raise ConfigError(f"{path}: no checkpoint of step {step}; it holds steps {ckpt.steps()}")
        cfg = phase_config(cfg, step if step is not None else ckpt.latest_step() or 0)  # e.g. after a self-guided phase
        setup = setup_step(cfg)
        restored = ckpt.restore_latest(setup.abstract_state, upto=step)
    finally:
        ckpt.close()
    if restored is None or (step is not None and restored[0] != step):
        raise ConfigError(f"{path}: the run directory holds no complete checkpoint" + (f" of step {step}" if step is not None else ""))
    step, state = restored[0], restored[1]
    return cfg, setup.lm, setup.method.model_params(state.params, setup.frozen, step)


def load_base_model(path: str | Path) -> Base:
    """The model in a Hugging Face or jaxllm run directory, as a fine-tuning base."""
    path = Path(path)
    if is_hf_dir(path):
        lm, params, _ = load_hf_checkpoint(path)
        return Base(lm.cfg, params)
    if is_run_dir(path):
        _, lm, params = load_run(path)
        return Base(lm.cfg, params)
    raise not_a_model_dir(path)
