"""Adapter initialisations, one method per file, found by name in `INITS`.

An init maps (key, frozen matrix W [in, out] f32, rank r, scale s) to (A [in, r], B [r, out],
residual [in, out]): the adapted layer starts as residual + s * A @ B, which equals W for every method
(B = 0 for plain LoRA; PiSSA/MiLoRA/OLoRA move a rank-r part of W into the adapter). A new method is
a new file here with a function decorated by `@register("name")`.
"""

from __future__ import annotations

from typing import Callable

import jax

Init = Callable[[jax.Array, jax.Array, int, float], tuple[jax.Array, jax.Array, jax.Array]]
INITS: dict[str, Init] = {}


def register(name: str) -> Callable[[Init], Init]:
    def add(fn: Init) -> Init:
        INITS[name] = fn
        return fn

    return add


from jaxllm.peft.inits import lora, olora, pissa  # noqa: E402,F401  (registers the methods)
