"""Dense vs MoE on real text (the stdlib corpus, BPE 4,096), >= 3 seeds: an MoE with the dense model's active
params (so its training FLOPs are equal too), AdaMoE null experts, the recurrent router, expert-choice routing.

    python experiments/moe/run.py [--steps 150] [--seeds 3] [--out experiments/moe]
    python experiments/moe/run.py --quick   # a tiny model, dense and MoE, a few steps (the tests)

Every run: the `small` recipe at --d-model / --layers / --d-ff, the same batches in the same order; a seed sets the
initialisation. MoE: 8 experts of half the dense width, top-2 (active FFN width = the dense d_ff), dropless,
load-balancing loss 0.01, router z-loss 0.001. Training FLOPs use each run's measured real experts per token
(held-out batches, trained router). Writes results.json (with command, commit, date, machine, versions),
results.md (mean ± std; differences by the two-std rule of experiments/real_text.py) and results.png (eval loss and
training FLOPs per run, error bars over seeds; train loss vs step).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from provenance import provenance  # noqa: E402
from real_text import (Results, compare, corpus_overrides, fmt, mean_std, seed_overrides,  # noqa: E402
                       shape_overrides)

from jaxllm.config import load_config  # noqa: E402
from jaxllm.data.pipeline import load_corpus, make_batches  # noqa: E402
from jaxllm.interop.models import load_model  # noqa: E402
from jaxllm.language_model import build  # noqa: E402
from jaxllm.train.trainer import train  # noqa: E402


def runs(d_ff: int) -> dict[str, list[str]]:
    moe = ["model.moe.num_experts=8", "model.moe.top_k=2", f"model.moe.d_ff={d_ff // 2}"]
    return {"dense": [], "MoE top-2": moe, "AdaMoE +4 null": [*moe, "model.moe.null_experts=4"],
            "MoE recurrent router": [*moe, "model.moe.router=recurrent"],
            "MoE expert choice": [*moe, "model.moe.routing=expert_choice", "model.moe.dispatch=capacity"]}


def real_experts_per_token(run_dir: Path, batches: int = 4) -> float:
    """Mean real (non-null) experts a token uses, over held-out batches, from the trained model's router."""
    loaded = load_model(run_dir)
    cfg, lm = loaded.config, loaded.lm
    corpus = load_corpus(cfg.data)
    stream = make_batches(corpus.eval_docs, corpus.tokenizer, seq_len=cfg.data.seq_len, batch_size=8, seed=0,
                          repeat=False, encode=corpus.encode)
    terms = jax.jit(lm.loss_terms)
    loads = [np.asarray(terms(loaded.params, {k: jnp.asarray(v) for k, v in b.items()})[3].expert_load)
             for b in itertools.islice(stream, batches)]
    real_share = float(np.mean([load[:, : cfg.model.moe.num_experts].sum(axis=1).mean() for load in loads]))
    return cfg.model.moe.top_k * real_share


def train_one(overrides: list[str], steps: int, run_dir: Path) -> dict:
    cfg = load_config(["small"], [*corpus_overrides(), *overrides, f"train.steps={steps}",
                                  f"train.warmup_steps={max(1, steps // 10)}", "train.log_every=10",
                                  f"train.eval_every={steps}", f"checkpoint.save_every={steps}",
                                  f"checkpoint.run_dir={run_dir}"])
    lm, m, T = build(cfg), cfg.model.moe, cfg.data.seq_len
    result = train(cfg)
    if result.interrupted:
        raise SystemExit(f"interrupted at step {result.end_step}; run again to resume")
    per_token = lm.flops_per_token(T)  # counts top_k real experts per token
    used = real_experts_per_token(run_dir) if m.num_experts else 0.0
    if m.null_experts:  # take off the expert FLOPs of choices that went to null experts
        expert_flops = 3 * 2 * cfg.model.d_model * m.d_ff * cfg.model.num_layers  # one expert, all layers
        per_token -= 3 * (m.top_k - used) * expert_flops  # x3: forward + backward
    return {"eval_loss": result.eval_loss, "params": lm.num_params, "experts_per_token": used,
            "flops": steps * cfg.train.batch_size * T * per_token, "tokens_per_s": result.tokens_per_second,
            "losses": {str(k): v for k, v in result.losses.items()}}


def plot(table: dict[str, list[dict]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, (name, rs) in enumerate(table.items()):
        m, s = mean_std([r["eval_loss"] for r in rs])
        axes[0].errorbar([rs[0]["flops"]], [m], yerr=[s], fmt="o", capsize=4, color=f"C{i}", label=name)
        steps = sorted(int(k) for k in rs[0]["losses"])
        mean, std = np.array([mean_std([r["losses"][str(k)] for r in rs]) for k in steps]).T
        axes[1].plot(steps, mean, color=f"C{i}", label=name)
        axes[1].fill_between(steps, mean - std, mean + std, color=f"C{i}", alpha=0.15)
    axes[0].set_xlabel("training FLOPs")
    axes[0].set_ylabel("eval loss (nats / BPE token), mean ± std")
    axes[1].set_xlabel("step (8 x 256 tokens)")
    axes[1].set_ylabel("train loss")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=96)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=384, help="dense FFN width; experts are half as wide")
    ap.add_argument("--quick", action="store_true", help="a tiny model, dense and MoE only (for the tests)")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args(argv)
    D, L, F = (32, 1, 64) if args.quick else (args.d_model, args.layers, args.d_ff)
    shape = shape_overrides(D, L, F)
    names = list(runs(F))[:2] if args.quick else list(runs(F))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/moe/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = {"steps": args.steps, "seeds": args.seeds, "shape": shape, "runs": {n: runs(F)[n] for n in names}}
    results = Results(out / "results.json", {**provenance(command.strip()), "settings": settings})
    work = Path(tempfile.mkdtemp(prefix="moe-"))
    for name in names:
        for seed in range(args.seeds):
            key = f"{name}|{seed}"
            if key not in results:
                print(f"== {key}", flush=True)
                quick = ["train.eval_batches=2"] if args.quick else []
                results.add(key, train_one([*shape, *runs(F)[name], *seed_overrides(seed), *quick], args.steps,
                                           work / f"{name.replace(' ', '_')}-{seed}"))
    table = {n: [results.runs[f"{n}|{s}"] for s in range(args.seeds)] for n in names}
    plot(table, out, f"Dense vs MoE on the stdlib corpus (d_model {D}, {L} layers, d_ff {F}; {args.seeds} seeds)")

    m = results.meta
    losses = lambda n: [r["eval_loss"] for r in table[n]]
    dense = table["dense"][0]
    lines = [
        "# Dense vs MoE on real text: equal active params, AdaMoE null experts, recurrent router, expert choice",
        "",
        f"`{m['command']}` at commit {m['commit']}{' + changes' if m['dirty'] else ''}, {m['date']}, {m['machine']}; "
        f"python {m['python']}, jax {m['jax']}, flax {m['flax']}.",
        "",
        f"Corpus: the stdlib source with a 4,096-token BPE; eval loss on the same {corpus_overrides()[3].split('=')[1]} "
        f"held-out batches of 8 x 256 tokens. The `small` recipe at d_model {D}, {L} layers, d_ff {F}; {args.steps} "
        f"steps of 8 x 256 tokens, the same batches in the same order; seed = initialisation. MoE: 8 experts of width "
        f"{F // 2}, top-2 (active FFN width {F} = the dense d_ff: equal active params, hence equal training FLOPs up to "
        "the router), dropless; AdaMoE adds 4 null experts; the recurrent router carries a GRU state across layers; "
        "expert choice lets each expert pick its tokens (capacity 1.25).",
        "",
        "| run | params | real experts / token | training FLOPs (vs dense) | eval loss | train tokens/s (vs dense) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n, rs in table.items():
        tps = mean_std([r["tokens_per_s"] for r in rs])[0]
        lines.append(f"| {n} | {rs[0]['params']:,} | {fmt([r['experts_per_token'] for r in rs], 2)} | "
                     f"{mean_std([r['flops'] for r in rs])[0]:.3g} ({mean_std([r['flops'] for r in rs])[0] / dense['flops']:.2f}x) | "
                     f"{fmt(losses(n))} | {tps:,.0f} ({tps / mean_std([r['tokens_per_s'] for r in table['dense']])[0]:.2f}x) |")
    found = [f"- {compare(losses(n), losses('dense'), n, 'dense')}" for n in names if n != "dense"]
    found += [f"- {compare(losses(n), losses('MoE top-2'), n, 'MoE top-2')}" for n in names[2:]]
    results.save(claims=found)
    lines += ["", "## Differences (two-std rule)", "", *found]
    lines += ["", "![eval loss and train loss](results.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
