"""Dense vs MoE at equal active parameters on the built-in corpus, plus AdaMoE null experts.

    python experiments/moe/run.py [--steps 200] [--out experiments/moe]

Runs (the `small` preset at --d-model / --layers, default 128 / 2, small enough that capacity limits the
dense model on this corpus; the same data order and token budget for each): dense (d_ff --d-ff, 512); MoE
with 8 experts of half that width, top-2 (the same active FFN params per token as dense, 4x the FFN
params); AdaMoE: the same MoE plus 4 null experts (zero-compute router slots, so a token may use
fewer than 2 real experts). Writes results.md (eval loss, params, training FLOPs with each run's measured
use of real experts, train tokens/s, real experts per token) and results.png (train loss vs steps and vs
training FLOPs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import load_config
from jaxllm.data.pipeline import load_corpus, make_batches
from jaxllm.interop.models import load_model
from jaxllm.language_model import build
from jaxllm.train.trainer import train

def runs(d_ff: int) -> dict[str, list[str]]:
    moe = ["model.moe.num_experts=8", "model.moe.top_k=2", f"model.moe.d_ff={d_ff // 2}"]
    return {"dense": [], f"MoE 8x{d_ff // 2} top-2": moe, f"AdaMoE 8x{d_ff // 2} +4 null, top-2": moe + ["model.moe.null_experts=4"]}


def real_experts_per_token(run_dir: Path, batches: int = 4) -> float:
    """Mean real (non-null) experts a token uses, over held-out batches, from the trained model's router."""
    loaded = load_model(run_dir)
    cfg, lm = loaded.config, loaded.lm
    corpus = load_corpus(cfg.data)
    it = iter(make_batches(corpus.eval_docs, corpus.tokenizer, seq_len=cfg.data.seq_len, batch_size=8, seed=0,
                      repeat=True, encode=corpus.encode))
    terms = jax.jit(lm.loss_terms)
    loads = [np.asarray(terms(loaded.params, {k: jnp.asarray(v) for k, v in next(it).items()})[3].expert_load)
             for _ in range(batches)]
    real_share = float(np.mean([load[:, : cfg.model.moe.num_experts].sum(axis=1).mean() for load in loads]))
    return cfg.model.moe.top_k * real_share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent))
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=512, help="dense FFN width; experts are half as wide")
    args = ap.parse_args()
    D, L, F = args.d_model, args.layers, args.d_ff
    shape = [f"model.d_model={D}", f"model.num_layers={L}", f"model.num_heads={max(1, D // 32)}",
             f"model.num_kv_heads={max(1, D // 64)}", f"model.mlp.d_ff={F}"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="moe-"))
    common = [*shape, f"train.steps={args.steps}", f"train.warmup_steps={args.steps // 10}", "train.log_every=10",
              f"train.eval_every={args.steps}", f"checkpoint.save_every={args.steps}"]
    rows, curves = [], {}
    for name, overrides in runs(F).items():
        run_dir = work / name.split()[0]
        cfg = load_config(["small"], [*common, *overrides, f"checkpoint.run_dir={run_dir}"])
        lm = build(cfg)
        result = train(cfg)
        T, m = cfg.data.seq_len, cfg.model.moe
        per_token = lm.flops_per_token(T)  # counts top_k real experts per token
        used = real_experts_per_token(run_dir) if m.num_experts else 0.0
        if m.null_experts:  # take off the expert FLOPs of choices that went to null experts
            expert_flops = 3 * 2 * cfg.model.d_model * m.d_ff * cfg.model.num_layers  # one expert, all layers
            per_token -= 3 * (m.top_k - used) * expert_flops  # x3: forward + backward
        tokens = cfg.train.batch_size * T
        params = lm.num_params
        rows.append(dict(name=name, params=params, flops=args.steps * tokens * per_token, eval_loss=result.eval_loss,
                         tokens_per_s=result.tokens_per_second, experts_per_token=used))
        curves[name] = {"losses": result.losses, "flops_per_step": tokens * per_token}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (name, curve), color in zip(curves.items(), ("black", "tab:blue", "tab:orange")):
        steps = sorted(s for s in curve["losses"] if s >= 20)
        for ax, x in zip(axes, (steps, [s * curve["flops_per_step"] for s in steps])):
            ax.plot(x, [curve["losses"][s] for s in steps], color=color, label=name)
    axes[0].set_xlabel("step (8 x 256 tokens)")
    axes[1].set_xlabel("training FLOPs")
    for ax in axes:
        ax.set_ylabel("train loss (nats/token)")
        ax.set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Dense vs MoE at equal active FFN params on the built-in corpus (d_model {D}, {L} layers, d_ff {F})")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)

    dense = rows[0]
    lines = [
        "# Dense vs MoE at equal active parameters, and AdaMoE null experts",
        "",
        f"`python experiments/moe/run.py --steps {args.steps} --d-model {D} --layers {L} --d-ff {F}` on "
        f"{jax.devices()[0].platform.upper()} (this 2-core machine), {time.strftime('%Y-%m-%d')}. The `small` preset at "
        f"d_model {D}, {L} layers, {args.steps} steps of 8 x 256 tokens per run, same data order. MoE: 8 experts of width "
        f"{F // 2}, top-2 (active FFN width {F} = the dense d_ff), load-balancing loss 0.01, router z-loss 0.001, "
        "dropless. AdaMoE adds 4 null experts. Training "
        "FLOPs use each run's measured real experts per token (held-out batches, trained router). Eval loss on the "
        f"held-out documents (entropy floor {0.8548:.3f}).",
        "",
        "| run | params | real experts / token | training FLOPs (vs dense) | eval loss | train tokens/s (vs dense) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params']:,} | {r['experts_per_token']:.2f} | {r['flops']:.3g} "
                     f"({r['flops'] / dense['flops']:.2f}x) | {r['eval_loss']:.4f} | {r['tokens_per_s']:,.0f} "
                     f"({r['tokens_per_s'] / dense['tokens_per_s']:.2f}x) |")
    lines += ["", "![loss curves](results.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"rows": rows, "curves": curves}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
