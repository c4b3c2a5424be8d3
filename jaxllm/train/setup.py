"""Everything a config needs before its first step: model, optimizer, mesh, shardings, jitted steps.

Shared by the trainer and `jaxllm bench`, so both time and run the very same compiled step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import Config, validate
from jaxllm.language_model import LanguageModel, build
from jaxllm.sharding import logical_to_spec, make_mesh
from jaxllm.train.optimizer import make_optimizer, make_schedule
from jaxllm.train.step import TrainState, init_state, make_eval_step, make_train_step


def state_shardings(abstract: TrainState, param_sh: Any, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Shardings of a TrainState: params by their logical axes, optimizer statistics like their
    param when shaped like it, everything else (counts, Adafactor's factored statistics) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    same_rank = lambda leaf, sh: sh if len(sh.spec) == len(leaf.shape) else replicated
    opt_sh = optax.tree_map_params(
        tx, same_rank, abstract.opt_state, param_sh, transform_non_params=lambda _: replicated
    )
    return TrainState(replicated, param_sh, opt_sh, replicated)


@dataclass(frozen=True)
class StepSetup:
    lm: LanguageModel
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    init: Callable[[], TrainState]  # jitted: a fresh, sharded TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying their target shardings
    state_sharding: TrainState
    batch_sharding: NamedSharding
    train_step: Callable  # jitted (state, batch) -> (state, metrics); donates state
    eval_step: Callable  # jitted (params, batch) -> (loss sum, token count)

    def global_batch(self, local: dict[str, Any]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over the batch axes."""
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), local)


def setup_step(cfg: Config) -> StepSetup:
    validate(cfg, jax.device_count())
    t = cfg.train
    lm = build(cfg)
    mesh = make_mesh(cfg.mesh)
    schedule, tx = make_schedule(t), make_optimizer(t)
    make_state = partial(init_state, lm, tx, t.seed)
    abstract = jax.eval_shape(make_state)
    state_sh = state_shardings(abstract, lm.param_shardings(mesh), tx, mesh)
    batch_sh = NamedSharding(mesh, logical_to_spec(("batch", "length"), lm.rules, dict(mesh.shape)))
    train_step = jax.jit(
        make_train_step(lm, tx, microbatches=t.microbatches, z_loss=t.z_loss, schedule=schedule),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,),
    )
    return StepSetup(
        lm=lm, tx=tx, schedule=schedule, mesh=mesh,
        init=jax.jit(make_state, out_shardings=state_sh),
        abstract_state=jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh),
        state_sharding=state_sh, batch_sharding=batch_sh, train_step=train_step,
        eval_step=jax.jit(make_eval_step(lm), in_shardings=(state_sh.params, batch_sh)),
    )
