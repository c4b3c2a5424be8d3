"""Half fine-tuning (HFT, Hui et al. 2024): in every layer, a random half of each category's matrices trains while
the other half keeps the base's values, so a stage of sequential fine-tuning leaves half of what earlier stages
learned in place.

A unit is a module (a kernel with its bias, a norm's scale); a category is a layer's attention, MLP (or MoE
experts and router) or norms: modules are grouped by their parent module, and norms, wherever they sit, form one
category. In layer l a category of n units trains n / 2 of them; an odd n trains (n + 1) / 2 in even layers and
(n - 1) / 2 in odd ones, so the whole stack trains half of each category. Which units is drawn from `seed` (a new
stage re-draws it with a new seed). Params stacked over `layers` share one array across layers, so the choice is a
0/1 mask per leaf [L, 1, ...] (an update mask, `TrainingMethod.update_mask`), not a choice of whole leaves. Params
outside the layer stack (embeddings, final norm, output head) stay frozen.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from jaxllm.language_model import Params
from jaxllm.nested import set_path

Path = tuple[str, ...]


def split_stacked(params: Params, logical_axes: Params) -> tuple[Params, Params]:
    """(the layer stacks: top-level subtrees whose params lead with the `layers` axis, everything else)."""
    def stacked(tree) -> bool:
        leaves = _leaves(tree)
        return bool(leaves) and all(axes[0] == "layers" for _, axes in leaves)

    names = [k for k in params if stacked(logical_axes[k])]
    return {k: params[k] for k in names}, {k: v for k, v in params.items() if k not in names}


def category(unit: Path) -> Path:
    """The category of a module within a layer: ("norms",) for a normalisation, else its parent module's path."""
    return ("norms",) if "norm" in unit[-1] else unit[:-1]


def half_masks(stacks: Params, seed: int) -> Params:
    """Per leaf of `stacks` (arrays or shapes [L, ...]): a 0/1 float32 array [L, 1, ...], 1 where the leaf's module
    trains in that layer."""
    units: dict[tuple[str, Path], set[Path]] = defaultdict(set)  # (stack, category) -> its modules
    leaves = _leaves(stacks)
    for path, _ in leaves:
        units[(path[0], category(path[1:-1]))].add(path[1:-1])
    trains: dict[tuple[str, Path], np.ndarray] = {}  # (stack, module) -> [L] bool
    for c, ((stack, cat), members) in enumerate(sorted(units.items())):
        members = sorted(members)
        n_layers = next(x.shape[0] for p, x in leaves if p[0] == stack)
        picked = np.zeros((n_layers, len(members)), bool)
        for layer in range(n_layers):
            k = (len(members) + (layer % 2 == 0)) // 2
            order = np.random.default_rng([seed, c, layer]).permutation(len(members))
            picked[layer, order[:k]] = True
        for j, unit in enumerate(members):
            trains[(stack, unit)] = picked[:, j]
    masks: Params = {}
    for path, x in leaves:
        mask = trains[(path[0], path[1:-1])].astype(np.float32).reshape(-1, *([1] * (len(x.shape) - 1)))
        set_path(masks, path, mask)
    return masks


def _leaves(tree, prefix: Path = ()) -> list[tuple[Path, object]]:
    """(path, leaf) of a nested dict, in key order; tuples of axis names count as leaves."""
    if isinstance(tree, dict):
        return [item for k in sorted(tree) for item in _leaves(tree[k], prefix + (k,))]
    return [(prefix, tree)]
