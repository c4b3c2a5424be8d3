"""Compression on real text: pretrain a base on the stdlib corpus, then prune it (magnitude and Wanda at several
sparsities, both at 2:4, MaskLLM's learned 2:4 with a Wanda prior) and quantise it (round-to-nearest int4 and int3,
NF4, SpQR at 3 and 4 bits), and score every result by its loss on the held-out stdlib files.

    python experiments/compress/run.py [--base-steps 300] [--maskllm-steps 100] [--seeds 3] [--out experiments/compress]
    python experiments/compress/run.py --quick --out DIR   # a tiny base, a few steps (the tests)

Pruning and quantisation are deterministic given the base and the calibration rows (the first `--calib` rows of
the training files); MaskLLM runs `--seeds` times (its Gumbel noise and data order). Bits per parameter count what
each stored form costs (codes + scales/zeros/outliers) over the quantised maps. Writes results.json (with command,
commit, date, machine, versions), results.md (tables; Wanda > magnitude, learned 2:4 > one-shot 2:4 and SpQR > RTN
checked in direction with experiments/real_text.py's two-std rule) and results.png (loss vs sparsity, loss vs bits).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from provenance import provenance  # noqa: E402
from real_text import Results, compare, corpus_overrides, fmt, mean_std, seed_overrides  # noqa: E402

from jaxllm.compress.prune import LAYER_MAPS, PruneSpec, prune, sparsity_of  # noqa: E402
from jaxllm.compress.quantize import dequantized, spqr  # noqa: E402
from jaxllm.compress.spqr import SpqrSpec  # noqa: E402
from jaxllm.config import CalibrationConfig, load_config  # noqa: E402
from jaxllm.data.pipeline import calibration_rows, load_corpus, make_batches  # noqa: E402
from jaxllm.interop.models import load_model  # noqa: E402
from jaxllm.nested import get_path, replace_path  # noqa: E402
from jaxllm.peft.lora import find_targets  # noqa: E402
from jaxllm.peft.quantized_kernel import quantize  # noqa: E402
from jaxllm.train.trainer import resolve_finetune_config, train  # noqa: E402

SPARSITIES = (0.3, 0.5, 0.7)


def rtn(w_IO: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Round-to-nearest: min-max codes over `group` consecutive inputs of each output, f16 scale and zero."""
    I, O = w_IO.shape
    x = w_IO.reshape(I // group, group, O)
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    scale = np.where(hi > lo, (hi - lo) / (2 ** bits - 1), 1.0).astype(np.float16).astype(np.float32)
    zero = np.round(-lo / scale)
    return ((np.clip(np.round(x / scale + zero), 0, 2 ** bits - 1) - zero) * scale).reshape(I, O)


def map_kernels(lm, params, fn):
    """`params` with every layer projection's kernel [*lead, *in, *out] replaced, per layer, by fn(w [I, O])."""
    for t in find_targets(lm, LAYER_MAPS, "targets"):
        kernel = np.asarray(get_path(params, t.path + ("kernel",)))
        w = kernel.reshape(-1, int(np.prod(t.in_shape)), int(np.prod(t.out_shape)))
        out = np.stack([fn(m) for m in w]).reshape(kernel.shape)
        params = replace_path(params, t.path + ("kernel",), jnp.asarray(out, kernel.dtype))
    return params


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--maskllm-steps", type=int, default=100)
    ap.add_argument("--maskllm-lr", type=float, default=3e-4,
                    help="the logits' learning rate (1e-3 and 1e-2 overwrote the Wanda prior within a few steps)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--calib", type=int, default=32, help="calibration rows (of the training files)")
    ap.add_argument("--quick", action="store_true", help="a tiny base, a few steps (for the tests)")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = (["model.d_model=64", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1", "model.mlp.d_ff=128"]
             if args.quick else ["model.d_model=128", "model.num_layers=3", "model.num_heads=4",
                                 "model.num_kv_heads=2", "model.mlp.d_ff=512"])
    seq = 128 if args.quick else 512
    command = "python experiments/compress/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = {"base_steps": args.base_steps, "maskllm_steps": args.maskllm_steps, "maskllm_lr": args.maskllm_lr,
                "seeds": args.seeds,
                "calib": args.calib, "shape": shape, "seq_len": seq}
    results = Results(out / "results.json", {**provenance(command.strip()), "settings": settings})
    work = Path(tempfile.mkdtemp(prefix="compress-exp-"))
    corpus_args = [*corpus_overrides(), f"data.seq_len={seq}", "train.batch_size=4"]
    base_dir = work / "base"
    pretrained = train(load_config(["small"], [
        *corpus_args, *shape, f"train.steps={args.base_steps}", "train.eval_every=0",
        f"train.warmup_steps={max(1, args.base_steps // 10)}", f"checkpoint.save_every={args.base_steps}",
        f"checkpoint.run_dir={base_dir}"]))
    if pretrained.interrupted:
        raise SystemExit(f"the base's pretraining was interrupted at step {pretrained.end_step}")
    m = load_model(base_dir)
    lm, base = m.lm, m.params
    corpus = load_corpus(m.config.data)
    eval_batches = list(make_batches(corpus.eval_docs, corpus.tokenizer, seq_len=seq, batch_size=8, seed=0,
                                     repeat=False, encode=corpus.encode))[: 2 if args.quick else 12]
    loss_sums = jax.jit(lm.loss_sums)

    def eval_losses(params) -> dict:
        """{"eval_loss": mean over the held-out tokens, "batch_losses": each eval batch's mean (for paired tests)}."""
        sums = [tuple(float(v) for v in loss_sums(params, b)) for b in eval_batches]
        return {"eval_loss": sum(s for s, _, _ in sums) / sum(n for _, _, n in sums),
                "batch_losses": [s / n for s, _, n in sums]}

    rows = list(calibration_rows(m.config.data, CalibrationConfig(samples=args.calib)))
    base_scores = eval_losses(base)
    base_loss = base_scores["eval_loss"]
    results.require_same("base", base_scores)
    print(f"base eval loss {base_loss:.4f}; {len(rows)} calibration rows of {seq}", flush=True)

    def record(key: str, params, **extra) -> None:
        if key not in results:
            results.add(key, {**eval_losses(params), **extra})
            print(f"== {key}: {results.runs[key]['eval_loss']:.4f}", flush=True)

    for method in ("magnitude", "wanda"):
        for s in SPARSITIES:
            if f"{method}-{s}" not in results:
                pruned = prune(lm, base, PruneSpec(method=method, sparsity=s), rows)
                record(f"{method}-{s}", pruned, sparsity=sparsity_of(lm, pruned)["all"])
        if f"{method}-2:4" not in results:
            pruned = prune(lm, base, PruneSpec(method=method, pattern=(2, 4)), rows)
            record(f"{method}-2:4", pruned, sparsity=sparsity_of(lm, pruned)["all"])
    for seed in range(args.seeds):
        key = f"maskllm-2:4|{seed}"
        if key in results:
            continue
        run_dir = work / f"maskllm-{seed}"
        result = train(resolve_finetune_config(str(base_dir), [], [
            *corpus_args, "finetune.method=maskllm", f"finetune.calibration.samples={args.calib}",
            f"train.steps={args.maskllm_steps}", f"train.learning_rate={args.maskllm_lr}", "train.warmup_steps=0",
            "train.eval_every=0", "train.log_every=10", f"checkpoint.save_every={args.maskllm_steps}",
            f"checkpoint.run_dir={run_dir}", *seed_overrides(seed, data_order=True)]))
        if result.interrupted:
            raise SystemExit(f"{key} was interrupted at step {result.end_step}; run again")
        learned = load_model(run_dir).params
        record(key, learned, sparsity=sparsity_of(lm, learned)["all"], steps=result.end_step)
    n_quantised = sum(int(np.prod(t.shape)) for t in find_targets(lm, LAYER_MAPS, "targets"))
    for bits, group in ((4, 64), (3, 16)):
        record(f"rtn-int{bits}-g{group}", map_kernels(lm, base, lambda w, b=bits, g=group: rtn(w, b, g)),
               bits_per_param=bits + 2 * 16 / group)
    record("nf4", map_kernels(lm, base, lambda w: np.asarray(quantize(jnp.asarray(w), "nf4", 64).dequantize())),
           bits_per_param=4 + 32 / 64)
    for bits in (3, 4):
        if f"spqr-{bits}bit" not in results:
            quantised, report = spqr(lm, base, SpqrSpec(bits=bits), rows)
            record(f"spqr-{bits}bit", dequantized(quantised), **report)
    write_report(results, {"base": base_scores, "quantised_params": n_quantised}, out)


def paired(a: dict, b: dict, name_a: str, name_b: str) -> str:
    """Two deterministic results (one run each): which is lower, when the mean of their per-batch differences over
    the same eval batches exceeds two standard errors of it; else "no difference at this scale"."""
    d = np.asarray(a["batch_losses"]) - np.asarray(b["batch_losses"])
    se = d.std(ddof=1) / np.sqrt(len(d))
    both = f"{name_a} {a['eval_loss']:.3f}, {name_b} {b['eval_loss']:.3f}"
    if abs(d.mean()) <= 2 * se:
        return f"{name_a} vs {name_b}: no difference at this scale ({both}; paired over {len(d)} eval batches)"
    lower = name_a if d.mean() < 0 else name_b
    return f"{lower} has the lower eval loss by {abs(d.mean()):.3f} (> 2 standard errors over {len(d)} paired eval batches; {both})"


def write_report(results: Results, extra: dict, out: Path) -> None:
    """results.md, results.png and the claims and tables (for the README) in results.json, beside `extra`."""
    runs, base_loss = results.runs, extra["base"]["eval_loss"]
    by = lambda prefix: [r["eval_loss"] for k, r in runs.items() if k.split("|")[0] == prefix]
    meta = results.meta
    lines = ["# Compression on real text", "",
             f"`{meta['command']}` at commit {meta['commit']}{' + changes' if meta['dirty'] else ''} "
             f"(runs at {', '.join(results.commits())}), {meta['date']}, {meta['machine']}; python {meta['python']}, "
             f"jax {meta['jax']}.", "",
             f"Base: {meta['settings']['shape']}, {meta['settings']['base_steps']} steps on the stdlib corpus; eval "
             f"loss on the held-out stdlib files {base_loss:.3f}. Calibration: {meta['settings']['calib']} rows.", "",
             "## Pruning (the layers' projections)", "", "| method | sparsity | eval loss |", "|---|---:|---:|"]
    for name in ("magnitude", "wanda"):
        for s in SPARSITIES:
            lines.append(f"| {name} | {s:.0%} | {fmt(by(f'{name}-{s}'))} |")
    for name in ("magnitude-2:4", "wanda-2:4", "maskllm-2:4"):
        lines.append(f"| {name} | 50% (2:4) | {fmt(by(name))} |")
    lines += ["", "## Quantisation (the same maps)", "", "| method | bits / param | eval loss |", "|---|---:|---:|"]
    for name in ("rtn-int4-g64", "rtn-int3-g16", "nf4", "spqr-3bit", "spqr-4bit"):
        outliers = f" ({100 * runs[name]['outlier_share']:.2f}% outliers)" if "outlier_share" in runs[name] else ""
        lines.append(f"| {name} | {runs[name]['bits_per_param']:.2f}{outliers} | {fmt(by(name))} |")
    claims = [
        ("Wanda beats magnitude pruning at 50%", "wanda-0.5", "magnitude-0.5"),
        ("Wanda beats magnitude pruning at 2:4", "wanda-2:4", "magnitude-2:4"),
        ("learned 2:4 (MaskLLM) beats one-shot 2:4 (Wanda)", "maskllm-2:4", "wanda-2:4"),
        ("SpQR 3-bit beats round-to-nearest int4 with fewer bits", "spqr-3bit", "rtn-int4-g64"),
        ("SpQR 3-bit beats NF4 with fewer bits", "spqr-3bit", "nf4"),
        ("SpQR 4-bit beats round-to-nearest int3 (groups of 16) at about equal bits", "spqr-4bit", "rtn-int3-g16"),
    ]
    tables = lines[lines.index("## Pruning (the layers' projections)"):]
    found = [f"- {claim}: " + (compare(by(a), by(b), a, b) if len(by(a)) > 1 or len(by(b)) > 1 else
                               paired(runs[a], runs[b], a, b)) for claim, a, b in claims]
    lines += ["", "## Which claims reproduce (in direction; two-std rule across seeds, or paired over the eval batches "
              "for deterministic methods)", "",
              *found, "", "![eval loss vs sparsity and bits](results.png)", ""]
    results.save(**extra, claims=found, tables=tables)
    (out / "results.md").write_text("\n".join(lines))
    plot(runs, base_loss, out)
    print("\n".join(lines))


def plot(runs: dict, base_loss: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in ("magnitude", "wanda"):
        left.plot([0, *SPARSITIES], [base_loss, *(runs[f"{name}-{s}"]["eval_loss"] for s in SPARSITIES)], "o-",
                  label=name)
    for name, marker in (("magnitude-2:4", "s"), ("wanda-2:4", "D"), ("maskllm-2:4", "*")):
        values = [r["eval_loss"] for k, r in runs.items() if k.split("|")[0] == name]
        left.errorbar([0.5], [mean_std(values)[0]], yerr=[mean_std(values)[1]], fmt=marker, label=name, ms=8)
    left.set_xlabel("sparsity of the layers' projections")
    left.set_ylabel("eval loss (held-out stdlib, nats)")
    left.set_title("pruning")
    left.legend()
    for name in ("rtn-int4-g64", "rtn-int3-g16", "nf4", "spqr-3bit", "spqr-4bit"):
        right.plot([runs[name]["bits_per_param"]], [runs[name]["eval_loss"]], "o", label=name, ms=8)
    right.axhline(base_loss, ls="--", c="gray", label="base (f32)")
    right.set_xlabel("bits per parameter (stored)")
    right.set_title("quantisation")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)


if __name__ == "__main__":
    main()
