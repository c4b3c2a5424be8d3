"""A training method is one object and a registry entry: a toy method ("train only the norms", half of each, under
a penalty) defined here, with no change to library code, trains through `jaxllm finetune`, checkpoints, resumes
exactly and exports; its loss term and update mask act as their formulas say."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxllm.cli import main
from jaxllm.config import ConfigError, load_config
from jaxllm.interop.models import load_model
from jaxllm.train.methods import Prepared, TrainingMethod, register
from jaxllm.train.methods.base_model import fresh_copies, load_base


def path_name(path) -> str:
    return ".".join(k.key for k in path)


def _is_norm(path) -> bool:
    return "norm" in path_name(path)


def _split(tree):
    """(norm leaves, the rest): the same tree shape, None where a leaf belongs to the other."""
    pick = lambda want: jax.tree_util.tree_map_with_path(lambda p, x: x if _is_norm(p) == want else None, tree)
    return pick(True), pick(False)


PENALTY = 1e-3  # weight of the toy method's loss term: PENALTY * sum of squared norm scales


def _trains(scale: np.ndarray) -> np.ndarray:
    """The toy method's update mask of a norm scale ([..., D]): its first D / 2 entries."""
    return np.arange(scale.shape[-1]) < scale.shape[-1] // 2


@register("norms")
class NormsOnly(TrainingMethod):
    """Only the first half of each normalisation scale trains, under an L2 penalty; every other base param stays
    frozen."""

    def prepare(self, mesh, key, base):
        trained, frozen = _split(load_base(self.cfg, self.lm, mesh, base))
        shardings = _split(self.lm.param_shardings(mesh))[0]
        return Prepared(fresh_copies(trained, shardings), shardings, frozen)

    def to_model(self, trained, frozen, rng):
        return jax.tree.map(lambda a, b: b if a is None else a, trained, frozen, is_leaf=lambda x: x is None)

    def regularizers(self, trained, frozen):
        return {"norm_l2": PENALTY * sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(trained))}

    def update_mask(self, trained):
        return jax.tree.map(lambda x: jnp.asarray(_trains(x)), trained)

    def describe(self, trained_abstract):
        return f"{sum(x.size for x in jax.tree.leaves(trained_abstract)):,} trainable norm params"

    def export(self, trained, run_dir, console):
        flat = {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(trained))}
        save_file(flat, run_dir / "norms.safetensors")
        return run_dir / "norms.safetensors"


def _logged(run, name: str) -> list[float]:
    return [json.loads(line)[name] for line in (run / "metrics.jsonl").read_text().splitlines() if name in line]


def _leaf(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_a_method_registered_outside_the_library_trains_resumes_and_exports(base_and_data, tmp_path, capsys):
    base, data = base_and_data
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["finetune", "--base", str(base), "finetune.method=norms", f"data.source={data}", "data.format=sft",
            "data.seq_len=64",
            "train.batch_size=8", "train.eval_every=0", "train.log_every=1", "train.warmup_steps=1", "train.steps=4",
            "train.learning_rate=1e-2", "checkpoint.save_every=2", "checkpoint.keep_last=5", "checkpoint.async_save=false"]
    assert main([*args, f"checkpoint.run_dir={straight}"]) == 0
    n_norms = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(load_model(base).params) if _is_norm(p))
    assert f"{n_norms:,} trainable norm params" in capsys.readouterr().out

    shutil.copytree(straight, resumed)  # as if stopped right after saving step 2
    shutil.rmtree(resumed / "checkpoints" / "4")
    assert main([*args, f"checkpoint.run_dir={resumed}"]) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    assert _logged(resumed, "train/loss")[-2:] == _logged(straight, "train/loss")[-2:]  # steps 3, 4, bitwise

    before, after = load_model(base).params, load_model(straight).params
    norms = [np.asarray(x, np.float64) for p, x in jax.tree_util.tree_leaves_with_path(before) if _is_norm(p)]
    term = PENALTY * sum(np.sum(np.square(x)) for x in norms)  # at step 1 the scales are the base's
    np.testing.assert_allclose(_logged(straight, "train/method/norm_l2")[0], term, rtol=1e-5)
    loss, ce = _logged(straight, "train/loss")[0], _logged(straight, "train/cross_entropy")[0]
    np.testing.assert_allclose(loss, ce + term, rtol=1e-6)
    exported = load_file(straight / "norms.safetensors")
    assert sorted(exported) == sorted(path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(before) if _is_norm(p))
    for path, b in jax.tree_util.tree_leaves_with_path(before):
        a = np.asarray(_leaf(after, path))
        if _is_norm(path):
            half = _trains(a)
            assert not np.array_equal(a[..., half], np.asarray(b)[..., half])  # trained
            np.testing.assert_array_equal(a[..., ~half], np.asarray(b)[..., ~half])  # masked: bitwise the base
            np.testing.assert_array_equal(exported[path_name(path)], a)
        else:
            np.testing.assert_array_equal(a, np.asarray(b))  # frozen: bitwise the base


def test_an_unregistered_method_is_a_config_error(base_and_data):
    base, data = base_and_data
    with pytest.raises(ConfigError, match=r"finetune.method='nope' is not allowed; choose one of \[.*'norms'"):
        load_config(["tiny"], [f"finetune.base={base}", "finetune.method=nope"])
