"""Typed configuration: dataclasses, YAML presets, dotted CLI overrides, validated before compiling.

Merging and type checking are OmegaConf structured configs; this module adds the cross-field checks
(heads vs kv heads vs tensor axis, mesh vs device count, ...) and turns every failure into a
`ConfigError` whose message names the offending key and what it may be.

    cfg = load_config(["configs/tiny.yaml"], ["model.num_layers=4"])
    validate(cfg, num_devices=jax.device_count())
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned", "none")
ROPE_SCALINGS = ("none", "llama3", "linear", "ntk", "yarn")
BIASES = ("none", "qkv", "all")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "auto")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")
CONTEXT_PARALLEL = ("ring", "allgather")
OPTIMIZERS = ("adamw", "lion", "adafactor")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
DATA_FORMATS = ("text", "sft")
MLP_STRUCTURES = ("dense", "lowrank", "blockdense", "blockshuffle")
MATMUL_IMPLS = ("xla", "pallas", "auto")
FINETUNE_METHODS = ["lora", "full", "mixlora"]  # and every method registered later (jaxllm.train.methods.register)
LORA_INITS = ("lora", "gaussian", "pissa", "milora", "olora")
QUANTIZATIONS = ("none", "int8", "nf4")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or inconsistent with another."""


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling to run a model past the context it was trained at (`factor` times longer):
    `linear` (position interpolation: every frequency / factor), `ntk` (NTK-aware: theta * factor^(H / (H - 2)),
    high frequencies nearly kept), `yarn` (YaRN: frequencies that turn fewer than `beta_slow` times over the
    original context are interpolated, more than `beta_fast` kept, a linear ramp over the dims in between, and
    attention logits sharpened by attention_factor^2), `llama3` (Llama-3.1's wavelength bands)."""

    type: str = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_seq_len: int = 8192  # llama3, yarn: the context the model was trained at
    beta_fast: float = 32.0  # yarn: rotations over the original context above which a frequency is kept
    beta_slow: float = 1.0  # yarn: ... below which it is interpolated
    attention_factor: Optional[float] = None  # yarn: cos/sin multiplier; default 0.1 ln(factor) + 1
    truncate: bool = True  # yarn: round the ramp's end dims outwards (as the reference implementation does)


@dataclass
class AttentionConfig:
    impl: str = "xla"  # xla | pallas (flash attention kernel) | cudnn (GPU) | auto: pallas on GPU/TPU, else xla
    sliding_window: Optional[int] = None  # tokens a query may look back, itself included (Mistral)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3/OLMo2)
    logit_softcap: Optional[float] = None  # cap * tanh(scores / cap) (Gemma-2)
    # With the sequence split over mesh axes (`mesh.sequence` > 1): how a device sees the others' keys and values
    # (ring: passed around with ppermute, one chunk held at a time; allgather: all gathered) and whether training
    # lays each row out in the causal load-balancing zigzag order (device i holds chunks i and 2n - 1 - i of 2n).
    context_parallel: str = "ring"
    zigzag: bool = True


@dataclass
class MlpConfig:
    d_ff: int = 1408
    activation: str = "silu"
    gated: bool = True  # act(x W_gate) * (x W_up): SwiGLU with silu, GeGLU with gelu
    # Structured FFN maps (Wei et al., 2024): dense | lowrank U(Vx) | blockdense U_r(V_b x) |
    # blockshuffle P^-1(U_b P(V_b x)). Sizes from rank/blocks, else from param_fraction of the dense map.
    structure: str = "dense"
    rank: Optional[int] = None  # lowrank / blockdense inner width
    blocks: Optional[int] = None  # blockdense (default 4) / blockshuffle block count
    param_fraction: float = 0.5  # target params / dense params, for the sizes not given
    impl: str = "auto"  # block-diagonal products: xla (batched einsum) | pallas (block-sparse kernel) | auto
    merge_below_tokens: int = 0  # generation: use the merged dense maps when <= this many tokens are in flight
    # Self-guided training: each structured map outputs a * x W + (1 - a) * structured(x), W a dense guide
    # initialised as the factors' product, a decaying 1 -> 0 over this share of train.steps; then W is
    # dropped from params and optimizer state. 0: off.
    guide_fraction: float = 0.0
    guide_schedule: str = "cosine"  # cosine | linear
    guide_sampled: bool = False  # compute the dense path only with probability a (saves its FLOPs)


@dataclass
class MoeConfig:
    """Sparse mixture-of-experts FFN (jaxllm/models/moe.py); num_experts 0 keeps the dense FFN."""

    num_experts: int = 0
    top_k: int = 2  # experts per token, weights renormalised over the chosen ones (Mixtral)
    d_ff: Optional[int] = None  # per-expert width; default mlp.d_ff
    shared_experts: int = 0  # always-on experts (DeepSeekMoE / Qwen-MoE), one FFN of shared * d_ff
    shared_d_ff: Optional[int] = None  # the shared FFN's width, if not shared_experts * d_ff
    shared_gate: bool = False  # Qwen-MoE: the shared FFN's output scaled by sigmoid(x w) per token
    normalize_top_k: bool = True  # renormalise the k chosen router probabilities to sum 1 (Mixtral; Qwen-MoE: off)
    null_experts: int = 0  # AdaMoE: zero-compute experts, so tokens use a variable number of real ones
    dispatch: str = "dropless"  # dropless (sorted tokens, grouped matmul) | capacity (fixed slots per expert)
    capacity_factor: float = 1.25  # capacity: slots per expert = factor * tokens * top_k / experts
    load_balance_loss: float = 0.01  # Switch-style E * sum_e f_e P_e
    router_z_loss: float = 0.001  # mean logsumexp(router logits)^2
    impl: str = "auto"  # grouped matmul: pallas (gmm/tgmm) | tiled (padded tiles, plain XLA) | xla (ragged_dot) | auto
    every: int = 1  # MoE FFN in every Nth layer (layers N-1, 2N-1, ...), dense FFNs in the others
    routing: str = "topk"  # topk (each token picks k experts) | expert_choice (each expert picks its tokens)
    router: str = "linear"  # linear | recurrent (RMoE: a GRU carries router state across layers) | pregate (Read-ME:
    #                         one choice per token for all layers, from its id and position, before the layer stack)
    router_state_dim: int = 64  # recurrent router: GRU state width; pregate: the router MLP's width
    router_grad: str = "chosen"  # pregate: the router's gradient through the chosen experts only | all (every expert
    #                              runs, unchosen ones at weight 0: their gradient tells the router which would help)
    lora_rank: int = 0  # > 0: MixLoRA -- experts are LoRA deltas (this rank) on one shared dense FFN
    lora_alpha: float = 16.0  # MixLoRA delta scale alpha / rank


@dataclass
class BottleneckConfig:
    """Bottleneck adapters (Houlsby et al. 2019; LLM-Adapters): y + scale * up(act(down(u))) on a sublayer's output y,
    with u = y (series, after the sublayer) or u = the sublayer's normed input (parallel, beside it). `up` starts at
    zero, so a model with fresh adapters computes the model without them. They add modules: they do not merge into
    the base's weights, and a model with them has no Hugging Face equivalent."""

    width: int = 0  # bottleneck width; 0: no adapters
    placement: str = "series"  # series | parallel
    sublayers: list[str] = field(default_factory=lambda: ["mlp"])  # attn and/or mlp (LLM-Adapters' best: mlp)
    activation: str = "relu"
    scale: float = 1.0


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: Optional[int] = None  # default d_model // num_heads
    max_seq_len: int = 2048
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    bias: str = "none"  # which projections carry a bias: none (Llama), qkv (Qwen2), all (GPT-2)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MlpConfig = field(default_factory=MlpConfig)
    moe: MoeConfig = field(default_factory=MoeConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    tie_embeddings: bool = False
    final_logit_softcap: Optional[float] = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "dots"  # keep matmul outputs, recompute the rest: measured fastest on CPU too
    scan_layers: bool = True  # False unrolls the layer loop (same stacked params)
    init_std: float = 0.02
    loss_chunk_tokens: int = 1024  # tokens per chunk of the output head + loss (bounds f32 logits to this x vocab)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


def _default_rules() -> dict[str, list[str]]:
    # Logical axis -> mesh axes. Params: embed/vocab/mlp/heads...; activations: batch/length/act_*.
    return {
        "batch": ["data", "fsdp", "expert"],
        "length": ["sequence"],
        "act_embed": [],
        "act_heads": ["tensor"],
        "act_kv_heads": ["tensor"],
        "act_mlp": ["tensor"],
        "act_vocab": ["tensor"],
        "embed": ["fsdp"],
        "vocab": ["tensor"],
        "mlp": ["tensor"],
        "mlp_blocks": ["tensor"],  # the block axis of block-diagonal FFN factors
        "heads": ["tensor"],
        "kv_heads": ["tensor"],
        "head_dim": [],
        "layers": [],
        "norm": [],
        "expert": ["expert"],
    }


@dataclass
class MeshConfig:
    """Device mesh shape (-1 on one axis: all remaining devices) and logical->mesh axis rules."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    sequence: int = 1  # context parallelism: each row's positions split over this many devices
    tensor: int = 1
    # Multi-host (hybrid) meshes: how many granules (processes, or TPU slices) the data / fsdp axes
    # span over the slower network (DCN); the sizes above are then per granule (ICI).
    dcn_data: int = 1
    dcn_fsdp: int = 1
    rules: dict[str, list[str]] = field(default_factory=_default_rules)

    def axis_sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}

    def dcn_sizes(self) -> dict[str, int]:
        return {name: getattr(self, f"dcn_{name}", 1) for name in MESH_AXES}


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic (built-in corpus), stdlib (Python's source), wikipedia (English), or a path
    synthetic_docs: int = 20000
    text_field: str = "text"
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json (or its directory)
    format: str = "text"  # text: documents; sft: jsonl of prompt/response or chat `messages`
    chat_template: str = ""  # sft: a Jinja chat template file; default: the tokenizer's, else a plain one
    seq_len: int = 256
    eval_fraction: float = 0.02
    seed: int = 0


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    microbatches: int = 1
    optimizer: str = "adamw"  # adamw | lion | adafactor (scales updates by param RMS: lr ~1)
    learning_rate: float = 3e-3
    schedule: str = "cosine"  # warmup then: cosine | linear decay | constant | wsd (stable, then decay)
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # final lr / peak lr for the decaying schedules
    wsd_decay_fraction: float = 0.2  # share of steps in WSD's final decay
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1  # not applied to norms, biases or embeddings of positions
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    z_loss: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 0  # batches per evaluation; 0: every held-out document


@dataclass
class CheckpointConfig:
    run_dir: str = ""  # empty: a new runs/<date-time>; an existing run directory resumes
    save_every: int = 100
    keep_last: int = 2
    keep_every: Optional[int] = None
    async_save: bool = True


@dataclass
class LoraConfig:
    """Low-rank adapters W + scale * A @ B on the linear maps named in `targets`."""

    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])  # names or regexes
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    init: str = "lora"  # lora (B = 0) | gaussian | pissa | milora (top / bottom singular triplets) | olora (QR)
    dora: bool = False  # weight-decomposed: learned per-output magnitude over the normalised W + sAB
    lr_ratio: float = 1.0  # LoRA+: B's learning rate / A's (16 in the paper)
    quantize: str = "none"  # frozen base kernels stored as none | int8 | nf4, dequantised on the fly
    quant_block: int = 64  # values per quantisation scale (along each kernel's last axis)


@dataclass
class HftConfig:
    """Half fine-tuning: in every layer, half of each category's matrices (attention, MLP, norms) train."""

    seed: int = 0  # which half; a new stage of sequential fine-tuning re-draws it with a new seed


@dataclass
class SorsaConfig:
    """SORSA: the principal rank-`finetune.lora.rank` SVD part of each target trains as U, S, V^T."""

    gamma: float = 4e-4  # weight of the orthonormality regulariser sum ||U^T U - I||_F + ||V^T V - I||_F


@dataclass
class S2ftConfig:
    """S²FT: per layer, rows of a few attention heads of `o` and of a few MLP channels of `down` train."""

    head_fraction: float = 0.05  # share of the heads (at least one)
    channel_fraction: float = 0.02  # share of the MLP's hidden channels (at least one)
    seed: int = 0  # which rows


@dataclass
class CalibrationConfig:
    """The sample rows a method's calibration pass reads before training (CorDA's covariances, MaskLLM's Wanda prior)."""

    samples: int = 64  # rows of data.seq_len tokens
    data: str = ""  # source; empty: the fine-tuning data (data.source)
    format: str = "text"  # data.format of `data` when it is given


@dataclass
class CordaConfig:
    """CorDA: adapters from the SVD of each target oriented by its input covariance on `finetune.calibration` rows."""

    mode: str = "ipm"  # ipm: train the top-r directions (learn the task) | kpm: the bottom-r (keep what the rows use)


@dataclass
class MaskllmConfig:
    """MaskLLM: a learned 2:4 mask per target; each group of 4 weights picks one of the 6 2:4 patterns with
    probabilities softmax(scale * logits), sampled by Gumbel-softmax at temperature tau while training; the weights
    stay frozen and the argmax pattern is the final mask."""

    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    tau_start: float = 4.0  # Gumbel-softmax temperature, annealed geometrically over train.steps
    tau_end: float = 0.05
    scale_start: float = 100.0  # logit scale, annealed linearly
    scale_end: float = 500.0
    prior: str = "wanda"  # the logits' starting point: wanda (on finetune.calibration rows) | magnitude | none
    prior_strength: float = 3.0  # a pattern's starting logit: strength x its overlap with the prior's kept weights / 2


@dataclass
class PregateConfig:
    """Read-ME: the dense base refactored into the run's pre-gated MoE (`model.moe.router=pregate`, a shared FFN of
    `moe.shared_d_ff` neurons plus experts of `moe.d_ff`, grouped on `finetune.calibration` rows), then the router
    trained by distillation from the dense model (KL of the logits)."""

    train_experts: bool = False  # also fine-tune the experts and shared FFN (else only the router trains)


@dataclass
class FinetuneConfig:
    base: str = ""  # the model to adapt: a Hugging Face checkpoint directory or a jaxllm run directory
    # lora: train adapters only; full: every parameter; mixlora: router + LoRA experts (model.moe); hft: half of each
    # layer's matrices; sorsa: singular vectors and values of each target's principal part (finetune.lora targets/rank);
    # bone / bat: block-affine adapters (peft's MiSS); abba: Hadamard product of two low-rank pairs; corda: LoRA from
    # the covariance-oriented SVD (finetune.corda); s2ft: row deltas on a few heads of o and channels of down;
    # bottleneck: adapters added after or beside the attention / MLP sublayers (model.bottleneck); maskllm: learned
    # 2:4 masks on frozen weights (finetune.maskllm); pregate: Read-ME, a dense base refactored into a pre-gated MoE
    # whose router learns from the dense model (finetune.pregate)
    method: str = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    hft: HftConfig = field(default_factory=HftConfig)
    sorsa: SorsaConfig = field(default_factory=SorsaConfig)
    corda: CordaConfig = field(default_factory=CordaConfig)
    maskllm: MaskllmConfig = field(default_factory=MaskllmConfig)
    pregate: PregateConfig = field(default_factory=PregateConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    s2ft: S2ftConfig = field(default_factory=S2ftConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# --------------------------------------------------------------------------------------- loading


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or a preset name such as `tiny` or `mesh/fsdp_tp` under `configs/`."""
    path = Path(name)
    if path.exists():
        return path
    preset = CONFIGS_DIR / f"{name}.yaml"
    if preset.exists():
        return preset
    known = sorted(str(p.relative_to(CONFIGS_DIR))[:-5] for p in CONFIGS_DIR.rglob("*.yaml"))
    raise ConfigError(f"config file {str(name)!r} not found; presets: {known}")


def _allowed_keys(node_type: type, dotted_key: str) -> list[str]:
    """Field names of the dataclass that should hold `dotted_key`'s last part."""
    parts = dotted_key.split(".")[:-1]
    cls: Any = node_type
    for part in parts:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields or not dataclasses.is_dataclass(fields[part].default_factory):
            break
        cls = fields[part].default_factory
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _omegaconf_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = err.full_key or "?"
    if isinstance(err, ConfigKeyError):
        allowed = _allowed_keys(Config, key)
        return ConfigError(f"unknown config key {key!r} (from {source}); allowed here: {allowed}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"config key {key!r} (from {source}): {msg}")
    return ConfigError(f"config (from {source}): {err}")


def load_config(
    files: Sequence[str | Path] = (), overrides: Sequence[str] = (), base: Config | None = None
) -> Config:
    """Merge defaults <- YAML files (in order) <- `key=value` overrides into a typed `Config`.

    Raises ConfigError for unknown keys, wrong types or values that fail `check_values`.
    """
    merged = OmegaConf.structured(base if base is not None else Config())
    sources: list[tuple[str, Any]] = []
    for f in files:
        path = resolve_config_path(f)
        sources.append((str(path), OmegaConf.load(path)))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value (e.g. model.num_layers=4); got {bad}")
    for o in overrides:
        sources.append((f"override {o!r}", OmegaConf.from_dotlist([o])))
    for source, conf in sources:
        try:
            merged = OmegaConf.merge(merged, conf)
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, source) from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    check_values(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ------------------------------------------------------------------------------------ validation


def _choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def _positive(key: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{key}={value!r} must be > 0")


def check_values(cfg: Config) -> None:
    """Checks that need no devices: choices, positivity, cross-field consistency."""
    m = cfg.model
    _choice("model.norm", m.norm, NORMS)
    _choice("model.position", m.position, POSITIONS)
    _choice("model.rope_scaling.type", m.rope_scaling.type, ROPE_SCALINGS)
    if m.rope_scaling.type != "none":
        _positive("model.rope_scaling.factor", m.rope_scaling.factor)
    if m.rope_scaling.type == "yarn" and not 0 < m.rope_scaling.beta_slow < m.rope_scaling.beta_fast:
        raise ConfigError(f"model.rope_scaling: yarn needs 0 < beta_slow ({m.rope_scaling.beta_slow}) < beta_fast "
                          f"({m.rope_scaling.beta_fast})")
    _choice("model.bias", m.bias, BIASES)
    _choice("model.mlp.activation", m.mlp.activation, ACTIVATIONS)
    _choice("model.attention.impl", m.attention.impl, ATTENTION_IMPLS)
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.param_dtype", m.param_dtype, DTYPES)
    _choice("model.remat", m.remat, REMAT_POLICIES)
    _choice("train.optimizer", cfg.train.optimizer, OPTIMIZERS)
    _choice("train.schedule", cfg.train.schedule, SCHEDULES)
    _choice("data.format", cfg.data.format, DATA_FORMATS)
    lora = cfg.finetune.lora
    _choice("finetune.method", cfg.finetune.method, FINETUNE_METHODS)
    if cfg.finetune.base and m.mlp.guide_fraction > 0:
        raise ConfigError("model.mlp.guide_fraction (self-guided training) is for training from scratch; "
                          "it cannot be combined with finetune.base")
    if cfg.finetune.method == "mixlora" and cfg.finetune.base and not (m.moe.num_experts and m.moe.lora_rank):
        raise ConfigError("finetune.method=mixlora needs model.moe.num_experts > 0 and model.moe.lora_rank > 0 "
                          "(the LoRA experts to add to the base's FFNs)")
    b = m.bottleneck
    if cfg.finetune.method == "bottleneck" and cfg.finetune.base and not b.width:
        raise ConfigError("finetune.method=bottleneck needs model.bottleneck.width > 0 (the adapters to add to the base)")
    if b.width < 0:
        raise ConfigError(f"model.bottleneck.width={b.width} must be >= 0")
    _choice("model.bottleneck.placement", b.placement, ("series", "parallel"))
    _choice("model.bottleneck.activation", b.activation, ACTIVATIONS)
    for sublayer in b.sublayers:
        _choice("a model.bottleneck.sublayers entry", sublayer, ("attn", "mlp"))
    if b.width and not b.sublayers:
        raise ConfigError("model.bottleneck.sublayers is empty; name attn and/or mlp")
    _choice("finetune.lora.init", lora.init, LORA_INITS)
    _choice("finetune.lora.quantize", lora.quantize, QUANTIZATIONS)
    _positive("finetune.lora.rank", lora.rank)
    _positive("finetune.lora.alpha", lora.alpha)
    _positive("finetune.lora.lr_ratio", lora.lr_ratio)
    _positive("finetune.lora.quant_block", lora.quant_block)
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"finetune.lora.dropout={lora.dropout} must be within [0, 1)")
    if not lora.targets:
        raise ConfigError("finetune.lora.targets is empty; name at least one linear map, e.g. [q, v]")
    if cfg.finetune.sorsa.gamma < 0:
        raise ConfigError(f"finetune.sorsa.gamma={cfg.finetune.sorsa.gamma} must be >= 0")
    _choice("finetune.corda.mode", cfg.finetune.corda.mode, ("ipm", "kpm"))
    _positive("finetune.calibration.samples", cfg.finetune.calibration.samples)
    _choice("finetune.calibration.format", cfg.finetune.calibration.format, DATA_FORMATS)
    mk = cfg.finetune.maskllm
    _choice("finetune.maskllm.prior", mk.prior, ("wanda", "magnitude", "none"))
    for key in ("tau_start", "tau_end", "scale_start", "scale_end"):
        _positive(f"finetune.maskllm.{key}", getattr(mk, key))
    if mk.prior_strength < 0:
        raise ConfigError(f"finetune.maskllm.prior_strength={mk.prior_strength} must be >= 0")
    _positive("train.steps", cfg.train.steps)
    _positive("train.learning_rate", cfg.train.learning_rate)
    if not 0 <= cfg.train.warmup_steps <= cfg.train.steps:
        raise ConfigError(f"train.warmup_steps={cfg.train.warmup_steps} must be within [0, train.steps={cfg.train.steps}]")
    for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "max_seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.mlp.d_ff", m.mlp.d_ff)
    _choice("model.mlp.structure", m.mlp.structure, MLP_STRUCTURES)
    _choice("model.mlp.impl", m.mlp.impl, MATMUL_IMPLS)
    _positive("model.mlp.rank", m.mlp.rank, allow_none=True)
    _positive("model.mlp.blocks", m.mlp.blocks, allow_none=True)
    if not 0 < m.mlp.param_fraction <= 1:
        raise ConfigError(f"model.mlp.param_fraction={m.mlp.param_fraction} must be within (0, 1]")
    _choice("model.moe.dispatch", m.moe.dispatch, ("dropless", "capacity"))
    _choice("model.moe.impl", m.moe.impl, MATMUL_IMPLS + ("tiled",))
    if m.moe.num_experts < 0 or m.moe.null_experts < 0 or m.moe.shared_experts < 0:
        raise ConfigError("model.moe.num_experts, null_experts and shared_experts must be >= 0")
    if m.moe.num_experts and not 1 <= m.moe.top_k <= m.moe.num_experts + m.moe.null_experts:
        raise ConfigError(f"model.moe.top_k={m.moe.top_k} must be within [1, num_experts + null_experts = "
                          f"{m.moe.num_experts + m.moe.null_experts}]")
    _positive("model.moe.capacity_factor", m.moe.capacity_factor)
    _positive("model.moe.every", m.moe.every)
    if m.moe.num_experts and m.num_layers % m.moe.every:
        raise ConfigError(f"model.moe.every={m.moe.every} must divide model.num_layers={m.num_layers}")
    _choice("model.moe.routing", m.moe.routing, ("topk", "expert_choice"))
    _choice("model.moe.router", m.moe.router, ("linear", "recurrent", "pregate"))
    _positive("model.moe.router_state_dim", m.moe.router_state_dim)
    _choice("model.moe.router_grad", m.moe.router_grad, ("chosen", "all"))
    if m.moe.router_grad == "all" and (m.moe.router != "pregate" or m.moe.dispatch != "dropless"):
        raise ConfigError("model.moe.router_grad=all runs every expert of a pre-gated, dropless MoE "
                          "(model.moe.router=pregate, dispatch=dropless)")
    if m.moe.num_experts and m.moe.router == "pregate" and m.moe.routing != "topk":
        raise ConfigError("model.moe.router=pregate chooses each token's experts (routing=topk), not experts' tokens")
    if (m.moe.shared_d_ff or m.moe.shared_gate) and not m.moe.shared_experts:
        raise ConfigError("model.moe.shared_d_ff / shared_gate describe the shared FFN: set model.moe.shared_experts >= 1")
    if m.moe.lora_rank < 0:
        raise ConfigError(f"model.moe.lora_rank={m.moe.lora_rank} must be >= 0")
    if m.moe.num_experts and m.moe.lora_rank and (
            m.moe.null_experts or m.moe.shared_experts or m.moe.routing != "topk" or m.moe.router != "linear"
            or m.moe.dispatch != "dropless" or not m.mlp.gated or m.mlp.structure != "dense"):
        raise ConfigError("MixLoRA (model.moe.lora_rank > 0) runs top-k linear routing, dropless, over a dense "
                          "gated FFN, without null or shared experts")
    if m.moe.routing == "expert_choice" and (m.moe.null_experts or m.moe.dispatch != "capacity"):
        raise ConfigError("model.moe.routing=expert_choice fills fixed expert capacities: it needs "
                          "model.moe.dispatch=capacity and no null experts")
    _choice("model.mlp.guide_schedule", m.mlp.guide_schedule, ("cosine", "linear"))
    if not 0 <= m.mlp.guide_fraction <= 1:
        raise ConfigError(f"model.mlp.guide_fraction={m.mlp.guide_fraction} must be within [0, 1]")
    if m.mlp.guide_fraction and m.mlp.structure == "dense":
        raise ConfigError("model.mlp.guide_fraction > 0 (self-guided training) needs a structured model.mlp.structure")
    _positive("model.loss_chunk_tokens", m.loss_chunk_tokens)
    _positive("model.head_dim", m.head_dim, allow_none=True)
    _positive("model.attention.sliding_window", m.attention.sliding_window, allow_none=True)
    _positive("model.attention.logit_softcap", m.attention.logit_softcap, allow_none=True)
    _positive("model.final_logit_softcap", m.final_logit_softcap, allow_none=True)
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}; "
            f"allowed num_kv_heads: {[k for k in range(1, m.num_heads + 1) if m.num_heads % k == 0]}"
        )
    if m.head_dim is None and m.d_model % m.num_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
            "set model.head_dim explicitly or pick num_heads dividing d_model"
        )
    if m.position == "rope" and m.resolved_head_dim % 2:
        raise ConfigError(f"model.head_dim={m.resolved_head_dim} must be even for rope positions")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
            f"allowed: data.seq_len <= {m.max_seq_len}"
        )
    _positive("data.seq_len", cfg.data.seq_len)
    _positive("train.batch_size", cfg.train.batch_size)
    _positive("train.microbatches", cfg.train.microbatches)
    if cfg.train.batch_size % cfg.train.microbatches:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by "
            f"train.microbatches={cfg.train.microbatches}"
        )
    sizes = cfg.mesh.axis_sizes()
    filled = [a for a, s in sizes.items() if s == -1]
    if len(filled) > 1:
        raise ConfigError(f"at most one mesh axis may be -1 (fill); got {filled}")
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}={size} must be a positive size or -1 (fill)")
    for logical, axes in cfg.mesh.rules.items():
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ConfigError(
                f"mesh.rules.{logical} names unknown mesh axes {unknown}; allowed: {list(MESH_AXES)}"
            )
    _check_tensor_axis(m, sizes["tensor"])
    _choice("model.attention.context_parallel", m.attention.context_parallel, CONTEXT_PARALLEL)


def _check_tensor_axis(m: ModelConfig, tensor: int) -> None:
    if tensor <= 1:
        return
    for key, value in (("model.num_heads", m.num_heads), ("model.num_kv_heads", m.num_kv_heads)):
        if value % tensor:
            raise ConfigError(
                f"{key}={value} is not divisible by the tensor mesh axis (mesh.tensor={tensor}); "
                f"allowed mesh.tensor: {[t for t in range(1, value + 1) if value % t == 0]}"
            )


def mesh_shape(cfg: MeshConfig, num_devices: int, *, per_granule: bool = False) -> dict[str, int]:
    """Axis sizes with the -1 axis filled; ConfigError if they do not multiply to `num_devices`.

    With DCN factors (mesh.dcn_*), the per-granule sizes fill num_devices / prod(dcn) devices and the
    result is their product with the DCN factors (or the per-granule sizes, with `per_granule`).
    """
    dcn = cfg.dcn_sizes()
    granules = math.prod(dcn.values())
    if granules < 1 or min(dcn.values()) < 1:
        raise ConfigError(f"mesh.dcn_* must be >= 1; got {dcn}")
    if num_devices % granules:
        raise ConfigError(f"mesh.dcn_* multiply to {granules} granules, which does not divide {num_devices} devices")
    per = num_devices // granules
    sizes = cfg.axis_sizes()
    fixed = math.prod(s for s in sizes.values() if s != -1)
    fill = [a for a, s in sizes.items() if s == -1]
    where = f"the {per} devices of each of {granules} granules" if granules > 1 else f"the {per} devices"
    if fill:
        if per % fixed:
            raise ConfigError(
                f"mesh axes {({a: s for a, s in sizes.items() if s != -1})} multiply to {fixed}, "
                f"which does not divide {where} for mesh.{fill[0]}=-1"
            )
        sizes[fill[0]] = per // fixed
    elif fixed != per:
        raise ConfigError(
            f"mesh axes {sizes} multiply to {fixed} but there are {per} devices"
            f"{' per granule' if granules > 1 else ''}; make the product equal the device count or set one axis to -1"
        )
    return sizes if per_granule else {a: sizes[a] * dcn[a] for a in sizes}


def validate(cfg: Config, num_devices: int) -> dict[str, int]:
    """All checks, including those against the device count. Returns the filled mesh shape."""
    check_values(cfg)
    sizes = mesh_shape(cfg.mesh, num_devices)
    _check_tensor_axis(cfg.model, sizes["tensor"])
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = cfg.train.batch_size // cfg.train.microbatches
    if micro % batch_shards:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} / train.microbatches={cfg.train.microbatches} "
            f"= {micro} is not divisible by the data*fsdp*expert mesh axes ({batch_shards})"
        )
    seq = math.prod(sizes[a] for a in cfg.mesh.rules.get("length", ()))
    chunks = 2 * seq if cfg.model.attention.zigzag else seq
    if seq > 1 and cfg.data.seq_len % chunks:
        layout = " in the zigzag layout (2 chunks per device)" if cfg.model.attention.zigzag else ""
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be a multiple of {chunks} to split each row over "
                          f"{seq} devices (mesh axes {cfg.mesh.rules['length']}){layout}")
    return sizes
