"""`jaxllm moe-report RUN`: the routing diagnostics (`jaxllm.moe.diagnostics`) of a trained MoE run on a data source,
as a markdown table (`report.md`), JSON (`report.json`) and tensorboard scalars, in `RUN/moe_report/` by default.

The same batches run through the newest checkpoint and an early one (the oldest kept, or `early_step`); each MoE layer
records every token's expert choices and whether capacity dispatch dropped them (`MoeStats.expert_MP` /
`dropped_MP`). `capacity_factor` evaluates under capacity dispatch at that factor (a dropless run drops nothing)."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import jax
import numpy as np

from jaxllm.config import ConfigError
from jaxllm.data.pipeline import load_corpus, make_batches
from jaxllm.language_model import LanguageModel, Params
from jaxllm.moe.diagnostics import choice_agreement, drop_rate_by_position, interlayer_mutual_information, token_id_routing
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.metrics import MetricsWriter
from jaxllm.train.setup import load_run


class Routings(NamedTuple):
    tokens_M: np.ndarray  # the tokens routed (padding left out)
    positions_M: np.ndarray
    expert_LMP: np.ndarray  # int [L, M, P]: chosen router slots per MoE layer
    dropped_LMP: np.ndarray  # bool [L, M, P]


def collect_routing(lm: LanguageModel, params: Params, batches: Iterable[dict[str, np.ndarray]]) -> Routings:
    """Every MoE layer's expert choices for the tokens of `batches` (rows of `inputs`; `segment_ids` 0 = padding)."""
    run = _routing_fn(lm)
    parts = []
    for b in batches:
        stats = run(params, b)
        if stats is None:
            raise ConfigError("the model has no MoE layers (model.moe.num_experts=0): nothing routes")
        B, T = b["inputs"].shape
        positions = b.get("positions", np.broadcast_to(np.arange(T), (B, T)))
        real = (np.asarray(b["segment_ids"]) > 0 if "segment_ids" in b else np.ones((B, T), bool)).reshape(-1)
        parts.append((np.asarray(b["inputs"]).reshape(-1)[real], np.asarray(positions).reshape(-1)[real],
                      np.asarray(stats.expert_MP)[:, real], np.asarray(stats.dropped_MP)[:, real]))
    if not parts:
        raise ConfigError("no batches: the data source holds no documents")
    return Routings(*(np.concatenate(x, axis=-2 if x[0].ndim == 3 else 0) for x in zip(*parts)))


@functools.lru_cache(maxsize=4)
def _routing_fn(lm: LanguageModel):
    """The jitted (params, batch) -> MoeStats of `lm` (one compilation for every checkpoint routed)."""
    return jax.jit(lambda p, b: lm.logits_and_stats(p, b["inputs"], b.get("positions"), b.get("segment_ids"))[1])


def _table(rows: list[list[str]]) -> str:
    head, *body = rows
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body])


def moe_report(run: str | Path, data: str = "", *, batches: int = 8, batch_size: int = 8, early_step: int | None = None,
               capacity_factor: float | None = None, min_count: int = 8, buckets: int = 4, out: str | Path | None = None
               ) -> dict[str, Any]:
    """The report's numbers as a dict; writes report.md / report.json / tensorboard under `out` (RUN/moe_report)."""
    run = Path(run)
    cfg, lm, params = load_run(run)
    ckpt = Checkpointer(run / "checkpoints", cfg.checkpoint)
    steps = ckpt.steps()
    ckpt.close()
    early = steps[0] if early_step is None else early_step
    if capacity_factor is not None:
        moe = dataclasses.replace(cfg.model.moe, dispatch="capacity", capacity_factor=capacity_factor)
        lm = LanguageModel(dataclasses.replace(cfg.model, moe=moe), lm.rules)
    data_cfg = dataclasses.replace(cfg.data, source=data) if data else cfg.data
    corpus = load_corpus(data_cfg)
    docs = list(corpus.eval_docs) + list(corpus.train_docs)
    rows = list(make_batches(docs, corpus.tokenizer, seq_len=cfg.data.seq_len, batch_size=batch_size, seed=0,
                             repeat=False, encode=corpus.encode))[:batches]
    late = collect_routing(lm, params, rows)
    m = cfg.model.moe
    every = m.every
    layer_names = [f"layer {(i + 1) * every - 1}" for i in range(late.expert_LMP.shape[0])]
    first_LM = late.expert_LMP[..., 0]
    token = token_id_routing(late.tokens_M, first_LM, min_count)
    drops, starts = drop_rate_by_position(late.dropped_LMP, late.expert_LMP, late.positions_M, m.num_experts, buckets)
    mi, nmi = interlayer_mutual_information(first_LM)
    agreement = None
    latest = max(steps)
    if early != latest:
        early_params = load_run(run, early)[2]
        agreement = choice_agreement(collect_routing(lm, early_params, rows).expert_LMP[..., 0], first_LM)
    L = len(layer_names)
    adjacent = float(np.mean([nmi[i, i + 1] for i in range(L - 1)])) if L > 1 else float("nan")
    result = {
        "run": str(run), "step": latest, "early_step": early if agreement is not None else None,
        "tokens": int(late.tokens_M.size), "dispatch": "capacity" if capacity_factor is not None else m.dispatch,
        "capacity_factor": capacity_factor if capacity_factor is not None else m.capacity_factor,
        "layers": layer_names,
        "token_id_share": token.value.tolist(), "token_id_share_baseline": token.baseline.tolist(),
        "agreement": None if agreement is None else agreement.value.tolist(),
        "agreement_chance": None if agreement is None else agreement.baseline.tolist(),
        "drop_rate_by_position": drops.value.tolist(), "drop_rate_overall": float(drops.baseline[0]),
        "bucket_starts": starts.tolist(), "mutual_information_nats": mi.tolist(), "normalized_mi": nmi.tolist(),
        "adjacent_normalized_mi": adjacent,
        "reproduces": {
            "routing decided by token id (share above baseline in every layer)": bool(np.all(token.value > token.baseline)),
            "routing learned early (agreement above chance in every layer)":
                None if agreement is None else bool(np.all(agreement.value > agreement.baseline)),
            "late tokens dropped more (last position bucket above the first)":
                bool(drops.value[-1] > drops.value[0]) if drops.baseline[0] > 0 else None,
        },
    }
    out = run / "moe_report" if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "report.md").write_text(render(result) + "\n")
    writer = MetricsWriter(out)
    for i, name in enumerate(layer_names):
        values = {"token_id_share": token.value[i], "token_id_share_baseline": token.baseline[i]}
        if agreement is not None:
            values.update(agreement=agreement.value[i], agreement_chance=agreement.baseline[i])
        writer.scalars(i, values, prefix="moe_report/")
    for b, rate in enumerate(drops.value):
        writer.scalars(int(starts[b]), {"drop_rate_by_position": rate}, prefix="moe_report/")
    writer.close()
    return result


def render(r: dict[str, Any]) -> str:
    """The report as markdown."""
    f = lambda x: "n/a" if x is None else f"{x:.3f}"
    agree = r["agreement"] or [None] * len(r["layers"])
    chance = r["agreement_chance"] or [None] * len(r["layers"])
    per_layer = _table([["MoE layer", "token id -> modal expert", "(ids shuffled)",
                         "agreement with " + (f"step {r['early_step']}" if r["early_step"] is not None else
                                              "an early step (none kept)"), "(chance)"]] +
                       [[name, f(a), f(b), f(c), f(d)] for name, a, b, c, d in
                        zip(r["layers"], r["token_id_share"], r["token_id_share_baseline"], agree, chance)])
    drops = _table([["positions from", "drop rate"]] + [[str(s), f(d)] for s, d in
                                                          zip(r["bucket_starts"], r["drop_rate_by_position"])])
    verdicts = "\n".join(f"- {k}: {'n/a' if v is None else 'yes' if v else 'no'}" for k, v in r["reproduces"].items())
    return (f"# MoE routing report: {r['run']} (step {r['step']})\n\n{r['tokens']:,} tokens, {r['dispatch']} dispatch "
            f"(capacity factor {r['capacity_factor']}).\n\n{per_layer}\n\nDrop rate by position (overall "
            f"{f(r['drop_rate_overall'])}):\n\n{drops}\n\nInter-layer mutual information of first choices, normalised by "
            f"the smaller entropy (1: one layer's choice fixes the other's), mean over adjacent layers: "
            f"{f(r['adjacent_normalized_mi'])}\n\nOpenMoE's findings here:\n{verdicts}")
