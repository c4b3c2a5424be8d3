"""Paths into nested dicts (params trees): read, set in place, replace without mutating, merge leaves in."""

from __future__ import annotations

from typing import Any, Mapping

Path = tuple[str, ...]


def get_path(tree: Mapping[str, Any], path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict[str, Any], path: Path, value: Any) -> None:
    """Set `path` in place, creating intermediate dicts."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def replace_path(tree: Mapping[str, Any], path: Path, value: Any) -> dict[str, Any]:
    """A copy of `tree` with `path` set to `value`; subtrees off the path are shared, nothing is mutated."""
    if not path:
        return value
    return {**tree, path[0]: replace_path(tree[path[0]], path[1:], value)}


def merge_into(tree: dict[str, Any], path: Path, leaves: Mapping[str, Any]) -> dict[str, Any]:
    """Add `leaves` under `path` in place (creating dicts); returns `tree`."""
    node = tree
    for k in path:
        node = node.setdefault(k, {})
    node.update(leaves)
    return tree
