"""Everything a config needs before its first step: model, optimizer, mesh, shardings, jitted steps.

Shared by the trainer and `jaxllm bench`, so both time and run the very same compiled step.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import Config, ConfigError, ModelConfig, validate
from jaxllm.language_model import LanguageModel, build
from jaxllm.models.mixlora import from_dense, split_trainable
from jaxllm.models.mixlora import join as join_mixlora
from jaxllm.models.structured import drop_guides, guide_alpha, with_guide
from jaxllm.peft.lora import LoraAdapter
from jaxllm.sharding import logical_to_spec, make_mesh
from jaxllm.train.optimizer import make_optimizer, make_schedule
from jaxllm.train.step import TrainState, _identity, init_state, make_eval_step, make_train_step


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
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    init: Callable[[], TrainState]  # jitted: a fresh, sharded TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying their target shardings
    state_sharding: TrainState
    batch_sharding: NamedSharding
    train_step: Callable  # jitted (state, batch, frozen) -> (state, metrics); donates state
    eval_step: Callable  # jitted (params, batch, frozen) -> (loss sum, token count)
    frozen: Any = None  # fine-tuning: the frozen params the trained ones adapt (else None)
    join: Callable | None = None  # MixLoRA: (trained, frozen) -> model params
    adapter: LoraAdapter | None = None  # LoRA fine-tuning: what state.params are adapters of
    initial_adapter: Any = None  # ... and the adapter as initialised (PiSSA-style exports need it)
    guide_alpha: Callable[[int], float] | None = None  # self-guided phase: the guide's weight at a step

    @property
    def guided(self) -> bool:
        return self.guide_alpha is not None

    def frozen_at(self, step: int) -> Any:
        """The step's non-trained input: the frozen params, or in the self-guided phase the guide weight a."""
        return jnp.float32(self.guide_alpha(step)) if self.guide_alpha is not None else self.frozen

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token that this step performs: frozen weights get no weight gradient (dW);
        LoRA adds its adapters' forward, input- and weight-gradient matmuls (6 per adapter weight)."""
        lm = self.lm
        if self.adapter is not None:
            lora_matmul = sum(int(x.size) for p, x in jax.tree_util.tree_leaves_with_path(self.adapter.param_shapes)
                              if getattr(p[-1], "key", None) in ("a", "b"))
            return lm.flops_per_token(seq_len, frozen_matmul_params=lm.active_matmul_params) + 6 * lora_matmul
        if self.join is not None:  # MixLoRA: the router and the chosen experts' deltas train
            c = lm.cfg
            m = c.moe
            trained = (c.num_layers // m.every) * (c.d_model * m.num_experts
                                                   + m.top_k * 3 * m.lora_rank * (c.d_model + c.mlp.d_ff))
            return lm.flops_per_token(seq_len, frozen_matmul_params=lm.active_matmul_params - trained)
        return lm.flops_per_token(seq_len)

    def global_batch(self, local: dict[str, Any]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over the batch axes."""
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), local)


def setup_step(cfg: Config) -> StepSetup:
    """Model, optimizer, mesh and jitted steps of a config. With `finetune.base` set, the params start
    from that model: all of them train (`finetune.method: full`) or LoRA adapters on it (`lora`)."""
    validate(cfg, jax.device_count())
    t = cfg.train
    lm = build(cfg)
    mesh = make_mesh(cfg.mesh)
    lora_spec = cfg.finetune.lora if cfg.finetune.base and cfg.finetune.method == "lora" else None
    schedule, tx = make_schedule(t), make_optimizer(t, lora_spec.lr_ratio if lora_spec else 1.0)
    replicated = NamedSharding(mesh, PartitionSpec())
    adapter, frozen, to_model, initial, alpha, join = None, None, _identity, None, None, None
    mlp = cfg.model.mlp
    if mlp.guide_fraction > 0:  # self-guided phase: `frozen` is the guide weight a of the step
        decay = guide_decay_steps(cfg)
        alpha = functools.partial(guide_alpha, decay_steps=decay, schedule=mlp.guide_schedule)
        to_model = lambda params, a, rng: with_guide(params, a, rng, mlp.guide_sampled)
        if cfg.finetune.base:
            raise ConfigError("model.mlp.guide_fraction (self-guided training) is for training from scratch")
    if not cfg.finetune.base:
        make_state = partial(init_state, lm, tx, t.seed)
        abstract = jax.eval_shape(make_state)
        state_sh = state_shardings(abstract, lm.param_shardings(mesh), tx, mesh)
        init = jax.jit(make_state, out_shardings=state_sh)
    else:
        init_key, rng = jax.random.split(jax.random.key(t.seed))
        rng = jax.device_put(jax.random.key_data(rng), replicated)
        params, param_sh, frozen, adapter = _finetune_params(cfg, lm, mesh, init_key)
        if cfg.finetune.method == "mixlora":
            join = to_model = join_mixlora
        if adapter is not None:
            to_model = lambda trained, base, rng: adapter.apply(base, trained, rng)
            initial = jax.tree.map(jnp.copy, params)  # not donated with the state
        abstract = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), rng), params)
        state_sh = state_shardings(abstract, param_sh, tx, mesh)
        zero = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        opt_init = jax.jit(tx.init, out_shardings=state_sh.opt_state)
        copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=state_sh.params)

        def init() -> TrainState:  # fresh buffers each call: the train step donates them
            return TrainState(zero, copy(params), opt_init(params), rng)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen) if alpha is None else replicated
    batch_sh = NamedSharding(mesh, logical_to_spec(("batch", "length"), lm.rules, dict(mesh.shape)))
    step = make_train_step(lm, tx, microbatches=t.microbatches, z_loss=t.z_loss, schedule=schedule, to_model=to_model)
    train_step = jax.jit(step, in_shardings=(state_sh, batch_sh, frozen_sh), out_shardings=(state_sh, None),
                         donate_argnums=(0,))
    return StepSetup(
        lm=lm, tx=tx, schedule=schedule, mesh=mesh, init=init,
        abstract_state=jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh),
        state_sharding=state_sh, batch_sharding=batch_sh, train_step=train_step,
        eval_step=jax.jit(make_eval_step(lm, to_model), in_shardings=(state_sh.params, batch_sh, frozen_sh)),
        frozen=frozen, adapter=adapter, initial_adapter=initial, guide_alpha=alpha,
        join=join,
    )


def guide_decay_steps(cfg: Config) -> int:
    """Steps over which the self-guided weight a decays to 0 (then the guides are dropped)."""
    return max(1, round(cfg.model.mlp.guide_fraction * cfg.train.steps))


def without_guides(cfg: Config) -> Config:
    """The config of the run after its self-guided phase: the same model without dense guides."""
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, mlp=dataclasses.replace(cfg.model.mlp, guide_fraction=0.0)))


def drop_guide_state(state: TrainState, after: StepSetup) -> TrainState:
    """A self-guided TrainState without its guides (params and optimizer statistics), placed for `after`."""
    pruned = TrainState(state.step, drop_guides(state.params), drop_guides(state.opt_state), state.rng)
    return jax.device_put(pruned, after.state_sharding)


def _finetune_params(cfg: Config, lm: LanguageModel, mesh: Mesh, key: jax.Array):
    """(trained params, their shardings, frozen params or None, LoraAdapter or None) of a fine-tuning run:
    the base itself (`method: full`), or fresh adapters on a frozen base (`lora`)."""
    base = _load_base(cfg, lm, mesh)
    if cfg.finetune.method == "full":
        return base, lm.param_shardings(mesh), None, None
    if cfg.finetune.method == "mixlora":  # the dense base frozen; router and LoRA experts fresh
        shardings = lm.param_shardings(mesh)
        params = jax.jit(lambda b, k: from_dense(b, lm.init(k)), out_shardings=shardings)(base, key)
        trained, frozen = split_trainable(params)
        return trained, split_trainable(shardings)[0], frozen, None
    adapter = LoraAdapter(lm, cfg.finetune.lora)
    param_sh = adapter.shardings(mesh)
    params, frozen = jax.jit(adapter.init, out_shardings=(param_sh, adapter.frozen_shardings(mesh)))(key, base)
    return params, param_sh, frozen, adapter


def _load_base(cfg: Config, lm: LanguageModel, mesh: Mesh) -> Any:
    """The params of `finetune.base`, placed on the mesh; its architecture must be `cfg.model`'s, or the
    same dense model when `cfg.model` adds experts (sparse upcycling: experts copied, router fresh)."""
    from jaxllm.interop.models import load_model
    from jaxllm.models.upcycle import upcycle

    loaded = load_model(cfg.finetune.base)
    if cfg.finetune.method == "mixlora":  # a dense base for the MixLoRA model: compare all but model.moe
        dense = dataclasses.replace(cfg.model, moe=loaded.lm.cfg.moe)
        if with_execution_of(loaded.lm.cfg, dense) != dense or loaded.lm.cfg.moe.num_experts:
            raise ConfigError(f"finetune.method=mixlora needs a dense base with this architecture; "
                              f"{cfg.finetune.base!r} differs")
        return jax.device_put(loaded.params, LanguageModel(dense, lm.rules).param_shardings(mesh))
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
