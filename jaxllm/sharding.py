"""Sharding as configuration: mesh construction and logical-axis -> mesh-axis rules.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, ...) and key activations are
constrained with logical names (`batch`, `length`, `act_embed`, ...). `Rules` map each logical name to
zero or more mesh axes; the mesh itself (`data`, `fsdp`, `expert`, `tensor`) comes from `MeshConfig`.
Changing parallelism (data parallel, FSDP, FSDP+TP) is a change of mesh sizes, never of code.

Meshes use `AxisType.Auto` axes (sharding propagated by XLA, guided by our constraints): the one
place that decides the axis type is `make_mesh`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxllm.config import MESH_AXES, ConfigError, MeshConfig, mesh_shape

Rules = tuple[tuple[str, tuple[str, ...]], ...]
"""Hashable logical->mesh axis rules, e.g. (("embed", ("fsdp",)), ("batch", ("data", "fsdp")))."""


def make_rules(mapping: Mapping[str, Sequence[str]]) -> Rules:
    return tuple((name, tuple(axes)) for name, axes in mapping.items())


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes (data, fsdp, expert, tensor), Auto-typed."""
    devices = list(devices if devices is not None else jax.devices())
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    dcn = cfg.dcn_sizes()
    if max(dcn.values()) == 1:
        sizes = mesh_shape(cfg, len(devices))
        return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=axis_types, devices=devices)
    # hybrid: each axis = (granules over DCN) x (devices within a granule over ICI); a process is a granule
    ici = mesh_shape(cfg, len(devices), per_granule=True)
    grid = mesh_utils.create_hybrid_device_mesh(
        [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], devices, process_is_granule=True
    )
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_spec(
    logical_axes: Sequence[str | None], rules: Rules, mesh_shape: Mapping[str, int] | None = None
) -> PartitionSpec:
    """Map logical names to a PartitionSpec; a mesh axis already used by an earlier dim is skipped,
    and so is one of size 1 in `mesh_shape` (when given), which would not split anything."""
    table = dict(rules)
    if mesh_shape is not None:
        table = {name: tuple(a for a in axes if mesh_shape.get(a, 1) > 1) for name, axes in table.items()}
    used: set[str] = set()
    spec: list[Any] = []
    for name in logical_axes:
        if name is not None and name not in table:
            raise ConfigError(f"logical axis {name!r} has no entry in mesh.rules; known: {sorted(table)}")
        axes = tuple(a for a in table.get(name, ()) if a not in used) if name is not None else ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _path_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_shardings(
    logical_axes: Any, shapes: Any, mesh: Mesh, rules: Rules
) -> Any:
    """NamedShardings for a param tree, given matching trees of logical axes and shapes.

    Raises ConfigError naming the parameter when a dimension does not divide by its mesh axes.
    """
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)

    def one(path: tuple[Any, ...], axes: tuple[str | None, ...], shape: Any) -> NamedSharding:
        spec = logical_to_spec(axes, rules, dict(mesh.shape))
        for dim, (size, entry) in enumerate(zip(shape.shape, spec)):
            mesh_axes = (entry,) if isinstance(entry, str) else (entry or ())
            shards = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
            if size % shards:
                raise ConfigError(
                    f"param {_path_str(path)} dim {dim} ({axes[dim]}={size}) is not divisible by mesh "
                    f"axes {mesh_axes} of total size {shards}; change the mesh sizes or mesh.rules.{axes[dim]}"
                )
        return NamedSharding(mesh, spec)

    return jax.tree.map_with_path(one, logical_axes, shapes, is_leaf=is_axes)


def split_axes(logical: str, rules: Rules) -> tuple[str, ...]:
    """The mesh axes that `rules` map `logical` onto and that the current mesh splits (size > 1); () without a mesh."""
    shape = jax.sharding.get_abstract_mesh().shape
    return tuple(a for a in dict(rules).get(logical, ()) if shape.get(a, 1) > 1)


def dividing_axes(axes: Sequence[str], size: int) -> tuple[str, ...]:
    """Those of `axes`, in order, that the current mesh splits and that together divide `size` (a `shard_map`
    splits a dim over them; the others replicate it)."""
    shape, kept = jax.sharding.get_abstract_mesh().shape, []
    for a in axes:
        if shape.get(a, 1) > 1 and size % (math.prod(shape[b] for b in kept) * shape[a]) == 0:
            kept.append(a)
    return tuple(kept)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current mesh (`jax.set_mesh`); a no-op
    when no mesh is set, so the same model code runs unsharded."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules, dict(mesh.shape)))
