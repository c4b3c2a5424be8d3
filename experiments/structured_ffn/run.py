"""Dense vs structured FFNs (lowrank, blockdense, blockshuffle) at ~63% and ~32% of the FFN params, with and
without self-guided training, at three model sizes, >= 3 seeds, on real text (the stdlib corpus, BPE 4,096).

    python experiments/structured_ffn/run.py [--steps 150] [--seeds 3] [--out experiments/structured_ffn]
    python experiments/structured_ffn/run.py --quick   # 2 sizes, 2 runs, 2 seeds, a few steps (the tests)

Writes results.json (every run: eval loss, params, training FLOPs, tokens/s, train-loss curve; with the command,
commit, date, machine and versions), results.md (mean ± std tables, the fitted scaling curves, which of Wei et
al. (2024)'s claims reproduce in direction under the two-std rule of experiments/real_text.py, and FFN-only
timings) and results.png (eval loss vs params and vs training FLOPs, error bars over seeds). Interrupted, it
resumes from results.json (same settings).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from provenance import provenance  # noqa: E402
from real_text import Results, compare, corpus_overrides, differs, fmt, mean_std, seed_overrides  # noqa: E402

from jaxllm.config import load_config  # noqa: E402
from jaxllm.language_model import build  # noqa: E402
from jaxllm.models.mlp import Mlp  # noqa: E402
from jaxllm.train.bench import median_seconds  # noqa: E402
from jaxllm.train.trainer import train  # noqa: E402

SIZES = ((64, 2, 256), (96, 2, 384), (128, 3, 512))  # d_model, layers, d_ff (head width 32, GQA 2:1)
STRUCTURES = ("lowrank", "blockdense", "blockshuffle")
COLORS = {"dense": "black", "lowrank": "tab:blue", "blockdense": "tab:orange", "blockshuffle": "tab:green"}


def methods(quick: bool) -> dict[str, list[str]]:
    """Name -> overrides: dense; each structure at 63% and 32%; self-guided (+SG) at 32%."""
    out = {"dense": []}
    for structure in STRUCTURES[:1] if quick else STRUCTURES:
        for fraction in (0.32,) if quick else (0.63, 0.32):
            out[f"{structure} {fraction:.0%}"] = [f"model.mlp.structure={structure}", f"model.mlp.param_fraction={fraction}"]
        if not quick:
            out[f"{structure} 32% +SG"] = [*out[f"{structure} 32%"], "model.mlp.guide_fraction=0.5"]
    return out


def shape(d: int, layers: int, d_ff: int) -> list[str]:
    return [f"model.d_model={d}", f"model.num_layers={layers}", f"model.num_heads={d // 32}",
            f"model.num_kv_heads={max(1, d // 64)}", f"model.mlp.d_ff={d_ff}"]


def train_one(overrides: list[str], steps: int, work: Path) -> dict:
    common = [*corpus_overrides(), f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
              "train.log_every=10", f"train.eval_every={steps}", f"checkpoint.save_every={steps}"]
    cfg = load_config(["small"], [*common, *overrides, f"checkpoint.run_dir={work}"])
    guided = build(cfg)
    plain = build(load_config(["small"], [*common, *overrides, "model.mlp.guide_fraction=0"]))
    T, tokens = cfg.data.seq_len, cfg.train.batch_size * cfg.data.seq_len
    switch = round(cfg.model.mlp.guide_fraction * steps)  # the dense guide runs (and costs) until then
    flops = tokens * (switch * guided.flops_per_token(T) + (steps - switch) * plain.flops_per_token(T))
    m = cfg.model
    embedding = m.vocab_size * m.d_model
    t0 = time.time()
    result = train(cfg)
    if result.interrupted:  # SIGTERM / Ctrl-C stops the run at a checkpoint: stop the experiment, record nothing
        raise SystemExit(f"interrupted at step {result.end_step}; run again to resume")
    return {"eval_loss": result.eval_loss, "params": plain.num_params, "non_embedding_params": plain.num_params - embedding,
            "flops": flops, "tokens_per_s": result.tokens_per_second, "wall_s": round(time.time() - t0, 1),
            "losses": result.losses}


def ffn_seconds(overrides: list[str], d_model: int, d_ff: int, tokens: int) -> float:
    """Median seconds of one FFN block's forward+backward on [tokens, d_model] (f32, jitted)."""
    cfg = load_config(["small"], [f"model.d_model={d_model}", f"model.mlp.d_ff={d_ff}", *overrides])
    graph, params = nnx.split(Mlp(cfg.model, build(cfg).rules, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (tokens, d_model))
    step = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(graph, p)(x) ** 2), argnums=(0, 1)))
    return median_seconds(step, params, x, reps=7)


def power_law_slope(flops: list[float], losses: list[float]) -> tuple[float, float]:
    """(b, log a) of loss = a * FLOPs^-b, least squares in log-log."""
    slope, intercept = np.polyfit(np.log(flops), np.log(losses), 1)
    return -float(slope), float(intercept)


def analyse(runs: dict[str, dict], names: list[str], sizes: list[tuple], seeds: int) -> dict:
    """Per method: eval losses by size (lists over seeds), FLOPs, params, per-seed scaling slopes and the
    per-seed distance from dense's fitted curve at the method's FLOPs (negative: better than dense per FLOP)."""
    table = {}
    for name in names:
        by_size = [[runs[f"{name}|{s}|{seed}"] for seed in range(seeds)] for s in range(len(sizes))]
        losses = [[r["eval_loss"] for r in rs] for rs in by_size]
        table[name] = {"losses": losses, "flops": [rs[0]["flops"] for rs in by_size],
                       "params": [rs[0]["params"] for rs in by_size],
                       "non_embedding_params": [rs[0]["non_embedding_params"] for rs in by_size],
                       "tokens_per_s": [mean_std([r["tokens_per_s"] for r in rs])[0] for rs in by_size]}
    for name, t in table.items():
        fits = [power_law_slope(t["flops"], [losses[seed] for losses in t["losses"]]) for seed in range(seeds)]
        dense_fits = [power_law_slope(table["dense"]["flops"], [ls[seed] for ls in table["dense"]["losses"]])
                      for seed in range(seeds)]
        t["slopes"] = [b for b, _ in fits]
        t["vs_dense_curve"] = [[t["losses"][s][seed] - math.exp(dense_fits[seed][1] - dense_fits[seed][0] * math.log(t["flops"][s]))
                                for seed in range(seeds)] for s in range(len(sizes))]
    return table


def claims(table: dict, sizes: list[tuple]) -> list[str]:
    """Wei et al. (2024)'s claims, each checked in direction with the two-std rule."""
    last = len(sizes) - 1
    lines = ["**Structured FFNs use training FLOPs more efficiently as models grow** (paper: steeper scaling curves; "
             "here: the fitted exponent b of eval loss = a * FLOPs^-b over the sizes, and the distance from dense's "
             "fitted curve at the same FLOPs at the largest size, negative = better than dense per FLOP; +SG runs "
             "counted with their guide's FLOPs):"]
    for name, t in table.items():
        if name == "dense":
            continue
        steeper = differs(t["slopes"], table["dense"]["slopes"]) and mean_std(t["slopes"])[0] > mean_std(table["dense"]["slopes"])[0]
        gap = t["vs_dense_curve"][last]
        below = mean_std(gap)[0] + 2 * mean_std(gap)[1] / math.sqrt(len(gap)) < 0
        above = mean_std(gap)[0] - 2 * mean_std(gap)[1] / math.sqrt(len(gap)) > 0
        lines.append(f"- {name}: b = {fmt(t['slopes'])} vs dense {fmt(table['dense']['slopes'])} "
                     f"({'steeper than dense' if steeper else 'not steeper beyond 2 std'}); at the largest size "
                     f"{fmt(gap)} nats from dense's curve ({'better than dense per FLOP' if below else 'worse than dense per FLOP' if above else 'no difference at this scale'}).")
    lines += ["", "**Self-guided training improves structured FFNs** (same steps; +SG pays for the dense guide in the "
              "first half):"]
    for structure in STRUCTURES:
        if f"{structure} 32% +SG" not in table:
            continue
        for s, size in enumerate(sizes):
            lines.append(f"- d_model {size[0]}: " + compare(table[f"{structure} 32% +SG"]["losses"][s],
                                                           table[f"{structure} 32%"]["losses"][s],
                                                           f"{structure} 32% +SG", f"{structure} 32%"))
    lines += ["", "**Ranking of the structures** (paper: LowRank and BlockDense ahead of BlockShuffle), at each size "
              "and fraction, by mean eval loss; a `<` is a difference beyond 2 std, a `≈` is none:"]
    for fraction in ("63%", "32%"):
        names = [f"{s} {fraction}" for s in STRUCTURES if f"{s} {fraction}" in table]
        if len(names) < 2:
            continue
        for s, size in enumerate(sizes):
            ordered = sorted(names, key=lambda n: mean_std(table[n]["losses"][s])[0])
            text = ordered[0]
            for a, b in zip(ordered, ordered[1:]):
                text += (" < " if differs(table[a]["losses"][s], table[b]["losses"][s]) else " ≈ ") + b
            lines.append(f"- {fraction}, d_model {size[0]}: {text}")
    return lines


def plot(table: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for name, t in table.items():
        structure = name.split()[0]
        style = "--" if "+SG" in name else ":" if "63%" in name else "-"
        marker = "s" if "+SG" in name else "^" if "63%" in name else "o"
        means, stds = zip(*map(mean_std, t["losses"]))
        for ax, x in zip(axes, (t["non_embedding_params"], t["flops"])):
            ax.errorbar(x, means, yerr=stds, fmt=marker + style, color=COLORS[structure], label=name, capsize=3, ms=4)
    for ax, label in zip(axes, ("non-embedding params", "training FLOPs")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("eval loss (nats / BPE token)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 sizes, dense and lowrank 32%%, a few steps (for the tests)")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args(argv)
    sizes = [[32, 1, 64], [64, 1, 128]] if args.quick else [list(s) for s in SIZES]
    names = list(methods(args.quick))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/structured_ffn/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = {"steps": args.steps, "seeds": args.seeds, "sizes": sizes, "methods": methods(args.quick)}
    results = Results(out / "results.json", {**provenance(command.strip()), "settings": settings})
    work = Path(tempfile.mkdtemp(prefix="structured-"))
    for s, size in enumerate(sizes):
        for name, overrides in methods(args.quick).items():
            for seed in range(args.seeds):
                key = f"{name}|{s}|{seed}"
                if key not in results:
                    print(f"== {key}", flush=True)
                    quick = ["train.eval_batches=2"] if args.quick else []
                    results.add(key, train_one([*shape(*size), *overrides, *seed_overrides(seed), *quick], args.steps,
                                               work / key.replace(" ", "_").replace("|", "-").replace("%", "")))
    table = analyse(results.runs, names, sizes, args.seeds)

    timings = {}
    for d_model, d_ff, tokens in ((256, 1024, 2048), (1024, 4096, 1024)) if not args.quick else ((32, 64, 64),):
        base = ffn_seconds([], d_model, d_ff, tokens)
        for name, overrides in methods(args.quick).items():
            if "+SG" not in name:
                t = base if name == "dense" else ffn_seconds(overrides, d_model, d_ff, tokens)
                timings.setdefault(name, []).append((t, base / t))
    found = claims(table, sizes)
    results.save(table=table, ffn_timings=timings, claims=found)

    m = results.meta
    title = (f"Structured FFNs on the stdlib corpus (BPE {corpus_overrides()[2].split('=')[1]}), "
             f"{args.steps} steps x 8 x 256 tokens, {args.seeds} seeds (mean ± std)")
    plot(table, out, title)
    lines = [
        "# Structured FFNs on real text: dense vs lowrank / blockdense / blockshuffle, with and without self-guided training",
        "",
        f"`{m['command']}` at commit {m['commit']}{' + changes' if m['dirty'] else ''}, {m['date']}, {m['machine']}; "
        f"python {m['python']}, jax {m['jax']}, flax {m['flax']}.",
        "",
        f"Corpus: the Python standard library's source (`data.source=stdlib`), a 4,096-token BPE learned from its training "
        f"files; eval loss on the same {corpus_overrides()[3].split('=')[1]} held-out batches (8 x 256 tokens) of files "
        f"never trained on. Every run: the `small` preset's recipe (AdamW, lr 3e-3, cosine, {max(1, args.steps // 10)} "
        f"warmup) for {args.steps} steps of 8 x 256 tokens; seed = initialisation (the same batches in the same order for every run). Sizes (d_model, layers, "
        f"d_ff): {', '.join(map(str, sizes))}, head width 32. +SG: self-guided training, the dense guide's weight "
        "cosine-decays 1 -> 0 over the first half, then the guides are dropped; its training FLOPs include the guide.",
        "",
        "| run | " + " | ".join(f"d{d} params (non-emb.) | eval loss | training FLOPs" for d, _, _ in sizes) + " |",
        "|---|" + "---:|---:|---:|" * len(sizes),
    ]
    for name, t in table.items():
        cells = [f"{t['params'][s]:,} ({t['non_embedding_params'][s]:,}) | {fmt(t['losses'][s])} | {t['flops'][s]:.3g}"
                 for s in range(len(sizes))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Fitted scaling curves, eval loss = a * FLOPs^-b (least squares in log-log over the sizes, per seed):", "",
              "| run | b | train tokens/s at each size (noisy) |", "|---|---:|---|"]
    for name, t in table.items():
        lines.append(f"| {name} | {fmt(t['slopes'], 4)} | " + ", ".join(f"{v:,.0f}" for v in t["tokens_per_s"]) + " |")
    lines += ["", "## Which claims reproduce (in direction)", "", *found, "",
              "## FFN block alone: forward+backward time and speedup over dense (f32, jitted, median of 7, this CPU)", "",
              "| FFN | " + " | ".join(f"d{d}/ff{f}, {n} tokens" for d, f, n in
                                     (((256, 1024, 2048), (1024, 4096, 1024)) if not args.quick else ((32, 64, 64),))) + " |",
              "|---|" + "---:|" * len(next(iter(timings.values())))]
    for name, ts in timings.items():
        lines.append(f"| {name} | " + " | ".join(f"{1000 * t:.1f} ms ({sp:.2f}x)" for t, sp in ts) + " |")
    lines += ["", "![eval loss vs params and FLOPs](results.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
