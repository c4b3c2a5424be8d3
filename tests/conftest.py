"""Test setup: 8 fake CPU devices (must be set before JAX initialises) and tiny model configs."""

import os
import tempfile

# 8 fake CPU devices; LLVM's cheap pipeline: the suite's tiny programs spend far longer compiling than running
# (measured on test_train + test_structured: 273 s -> 205 s, same results)
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the MFU peak's recorded measurement (jaxllm/train/peak_flops.py) goes to a scratch directory, not ~/.cache
os.environ.setdefault("JAXLLM_CACHE", tempfile.mkdtemp(prefix="jaxllm-test-cache-"))
# One compilation cache for the session, shared by the xdist workers (they inherit the environment): a resumed run,
# a second CLI call or another module's identical program loads its executable instead of compiling it again.
OWN_JIT_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if OWN_JIT_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxllm-test-jit-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import ctypes  # noqa: E402
import ctypes.util  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxllm.config import AttentionConfig, MlpConfig, ModelConfig  # noqa: E402


def tiny_model(**overrides) -> ModelConfig:
    """A 2-layer, d_model 32 Llama-style config; keyword overrides replace fields."""
    base = ModelConfig(
        vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
        mlp=MlpConfig(d_ff=64),
    )
    return dataclasses.replace(base, **overrides)


def tiny_base_and_sft_data(root):
    """(run directory of a 2-step `tiny` base, a 64-example instruction jsonl) under `root`: what fine-tuning tests
    start from."""
    import json

    from jaxllm.config import load_config
    from jaxllm.data.synthetic import generate_instructions
    from jaxllm.train.trainer import train

    train(load_config(["tiny"], [f"checkpoint.run_dir={root / 'base'}", "train.steps=2", "train.eval_every=0"]))
    data = root / "reverse.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_instructions(64, seed=0)))
    return root / "base", data


def perturbed(tree, seed: int):
    """Adapter weights as after some training: every leaf moved by 0.05 N(0, 1) (B no longer zero)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="session")
def base_and_data(tmp_path_factory):
    """A 2-step `tiny` base run and instruction data, shared by the fine-tuning modules (read only)."""
    return tiny_base_and_sft_data(tmp_path_factory.mktemp("finetune_base"))


# The attention/model variants every causality and packing property must hold for.
VARIANTS = {
    "mha": tiny_model(num_kv_heads=4),
    "gqa": tiny_model(),
    "mqa": tiny_model(num_kv_heads=1),
    "sliding_window": tiny_model(attention=AttentionConfig(sliding_window=4)),
    "qk_norm_softcap": tiny_model(
        attention=AttentionConfig(qk_norm=True, logit_softcap=20.0), final_logit_softcap=30.0
    ),
    "gpt2_style": tiny_model(
        norm="layernorm", position="learned", bias="all", tie_embeddings=True, num_kv_heads=4,
        mlp=MlpConfig(d_ff=64, activation="gelu_tanh", gated=False),
    ),
}


@pytest.fixture(params=sorted(VARIANTS), ids=sorted(VARIANTS))
def variant(request) -> ModelConfig:
    return VARIANTS[request.param]


def pallas_block_shapes(fn, *args) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(block shape, array shape) of every BlockSpec of every pallas_call in fn's jaxpr (arrays left in
    memory_space=ANY have no blocks: the kernel loads tiles itself)."""
    def eqns(jaxpr):
        for e in jaxpr.eqns:
            yield e
            for v in e.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from eqns(inner)

    found = []
    for e in eqns(jax.make_jaxpr(fn)(*args).jaxpr):
        if e.primitive.name == "pallas_call":
            for bm in e.params["grid_mapping"].block_mappings:
                if str(bm.transformed_block_aval.memory_space) == "any":
                    continue
                shape = tuple(getattr(d, "block_size", 1) for d in bm.block_shape)
                found.append((shape, bm.array_aval.shape))
    return found


# Longest modules first (seconds of worker time in experiments/results/test_suite_time runs): xdist hands whole
# modules to workers in collection order (--no-loadscope-reorder), so the workers finish together instead of one
# running a long module alone at the end. Modules not listed keep their order, after these.
LONGEST_FIRST = ["test_moe", "test_multiprocess", "test_reproduce", "test_peft", "test_flash_attention", "test_structured",
                 "test_finetune", "test_peft_family", "test_compress", "test_generate", "test_train", "test_block_sparse_matmul", "test_model", "test_cli",
                 "test_hf_parity", "test_peft_parity", "test_context_parallel", "test_hf_cli", "test_sharding",
                 "test_grouped_matmul", "test_lm_eval", "test_training_method", "test_notebooks", "test_bench_gpu"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


def pytest_sessionfinish(session):
    """The process that made the session's compilation cache removes it (xdist workers leave it to that one)."""
    if OWN_JIT_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# glibc's malloc_trim; absent on macOS and musl, where freed memory is left as it is
_MALLOC_TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", lambda _pad: 0)


def pytest_runtest_teardown(item, nextitem):
    """After a module's last test (on this worker), drop JAX's compiled programs; after every test, hand
    memory freed back to the OS (glibc keeps it otherwise): a worker would grow past 4 GiB over the suite."""
    if nextitem is None or nextitem.module is not item.module:
        jax.clear_caches()
        gc.collect()
    _MALLOC_TRIM(0)
