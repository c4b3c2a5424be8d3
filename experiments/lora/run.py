"""PEFT on real text: pretrain a base on the stdlib corpus, then adapt it to the stdlib docstring task (function code
-> its docstring's first sentence) with full fine-tuning, LoRA, rsLoRA, PiSSA, MiLoRA, OLoRA, DoRA, LoRA+, QLoRA
(NF4 base), HFT, SORSA, Bone, Bat, ABBA, CorDA (IPM calibrated on the task, KPM on pretraining text), S²FT and
series / parallel bottleneck adapters, >= 3 seeds each.

    python experiments/lora/run.py [--base-steps 300] [--steps 50] [--seeds 3] [--out experiments/lora]
    python experiments/lora/run.py --quick   # tiny base, 2 methods, 2 seeds, a few steps (the tests)

The base never sees the task's held-out modules: it pretrains on the stdlib files outside them. Every method gets
the same steps and batch; a seed sets the adapter's initialisation and the data order. Measured per run: the
held-out modules' response loss and next-token accuracy (teacher-forced), the train-loss curve, trainable params,
bytes of trained params + optimizer state, tokens/s, and forgetting: the adapted model's loss on the pretraining
eval files (the base's own before adaptation). Writes results.json (with command, commit, date, machine, versions),
results.md (mean ± std tables; PiSSA's "converges faster than LoRA" and MiLoRA's "forgets less" checked in
direction with the two-std rule of experiments/real_text.py) and results.png (train loss vs step, band = ± std).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from provenance import provenance  # noqa: E402
from real_text import Results, compare, corpus_overrides, fmt, mean_std, seed_overrides  # noqa: E402

from jaxllm.config import load_config  # noqa: E402
from jaxllm.data.pipeline import load_corpus, make_batches  # noqa: E402
from jaxllm.data.sft import ChatEncoder, load_template, read_conversations  # noqa: E402
from jaxllm.data.stdlib import docstring_task, is_held_out, module_name, stdlib_files  # noqa: E402
from jaxllm.interop.models import load_model  # noqa: E402
from jaxllm.train.setup import setup_step  # noqa: E402
from jaxllm.train.trainer import resolve_finetune_config, train  # noqa: E402

HELD_OUT = 0.1  # share of modules whose functions are held out (and never pretrained on)
METHODS = {  # name -> (overrides, learning rate)
    "full": (["finetune.method=full"], 5e-4),
    "lora": ([], 2e-3),
    "rslora": (["finetune.lora.rslora=true"], 2e-3),
    "pissa": (["finetune.lora.init=pissa"], 2e-3),
    "milora": (["finetune.lora.init=milora"], 2e-3),
    "olora": (["finetune.lora.init=olora"], 2e-3),
    "dora": (["finetune.lora.dora=true"], 2e-3),
    "lora+": (["finetune.lora.lr_ratio=16"], 2e-3),
    "qlora": (["finetune.lora.quantize=nf4"], 2e-3),
    "hft": (["finetune.method=hft"], 5e-4),
    "sorsa": (["finetune.method=sorsa"], 2e-3),
    "bone": (["finetune.method=bone"], 2e-3),
    "bat": (["finetune.method=bat"], 2e-3),
    "abba": (["finetune.method=abba"], 2e-3),
    "corda-ipm": (["finetune.method=corda", "finetune.corda.mode=ipm"], 2e-3),
    "corda-kpm": (["finetune.method=corda", "finetune.corda.mode=kpm"], 2e-3),  # calibrated on pretraining text
    "s2ft": (["finetune.method=s2ft"], 2e-3),
    # LLM-Adapters' bottleneck adapters after / beside the MLP (their best placement), width 32 of d_model 128
    "series": (["finetune.method=bottleneck", "model.bottleneck.width=32", "model.bottleneck.placement=series"], 2e-3),
    "parallel": (["finetune.method=bottleneck", "model.bottleneck.width=32", "model.bottleneck.placement=parallel"],
                 2e-3),
}


def pretraining_corpus(path: Path, files: list[Path]) -> int:
    """The `files` outside the task's held-out modules, as jsonl {"text"}; returns how many."""
    n = 0
    with path.open("w") as f:
        for file in files:
            try:
                text = file.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip() and not is_held_out(module_name(file), HELD_OUT):
                f.write(json.dumps({"text": text}) + "\n")
                n += 1
    return n


MEMORY = ("trained_bytes", "optimizer_bytes", "frozen_bytes", "trainable")


def state_bytes(run_dir: Path) -> dict[str, int]:
    """Bytes of the arrays a run holds while training: trained params, optimizer state, frozen params."""
    setup = setup_step(load_config([run_dir / "config.yaml"]))
    state = jax.eval_shape(setup.init)
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return {"trained_bytes": size(state.params), "optimizer_bytes": size(state.opt_state),
            "frozen_bytes": size(setup.frozen), "trainable": sum(x.size for x in jax.tree.leaves(state.params))}


def scores(lm, params, batches) -> tuple[float, float]:
    """(mean loss, next-token accuracy) over the loss-weighted targets of `batches`."""
    @jax.jit
    def sums(params, b):
        logits = lm.apply(params, b["inputs"], b["positions"], b["segment_ids"]).astype(jnp.float32)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
        hit = (jnp.argmax(logits, -1) == b["targets"]).astype(jnp.float32)
        w = b["loss_mask"]
        return jnp.sum(nll * w), jnp.sum(hit * w), jnp.sum(w)

    total = np.zeros(3)
    for b in batches:
        total += np.array([float(v) for v in sums(params, {k: jnp.asarray(v) for k, v in b.items()})])
    return total[0] / total[2], total[1] / total[2]


def evaluate(run_dir: Path, held_out: list, pretrain_eval: list) -> dict:
    m = load_model(run_dir)
    seq = m.config.data.seq_len
    enc = ChatEncoder(m.tokenizer, load_template("", m.tokenizer), max_tokens=seq + 1)
    task = make_batches(held_out, m.tokenizer, seq_len=seq, batch_size=8, seed=0, repeat=False, encode=enc)
    text = make_batches(pretrain_eval, m.tokenizer, seq_len=seq, batch_size=8, seed=0, repeat=False)
    loss, acc = scores(m.lm, m.params, task)
    base_loss, _ = scores(m.lm, m.params, text)
    return {"held_out_loss": loss, "held_out_accuracy": acc, "pretrain_eval_loss": base_loss}


def plot(curves: dict[str, list[dict]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, runs in curves.items():
        steps = sorted(int(s) for s in runs[0])
        mean, std = np.array([mean_std([r[str(s)] for r in runs]) for s in steps]).T
        ax.plot(steps, mean, label=name, ls="--" if name == "full" else "-")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("train loss (response tokens, nats)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a tiny base, a few steps (for the tests)")
    ap.add_argument("--methods", help="comma-separated subset of " + ",".join(METHODS) + " (default: all; quick: full,lora)")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.methods.split(",") if args.methods else ["full", "lora"] if args.quick else list(METHODS)
    base_shape = (["model.d_model=32", "model.num_layers=1", "model.num_heads=1", "model.num_kv_heads=1", "model.mlp.d_ff=64"]
                  if args.quick else ["model.d_model=128", "model.num_layers=3", "model.num_heads=4",
                                      "model.num_kv_heads=2", "model.mlp.d_ff=512"])
    seq = 128 if args.quick else 512
    command = "python experiments/lora/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = {"base_steps": args.base_steps, "steps": args.steps, "seeds": args.seeds, "base_shape": base_shape,
                "seq_len": seq}  # a method's runs are keyed by its name: adding or leaving out methods keeps the rest
    results = Results(out / "results.json", {**provenance(command.strip()), "settings": settings,
                                             "methods": {n: METHODS[n] for n in names}})
    work = Path(tempfile.mkdtemp(prefix="lora-exp-"))

    sources = stdlib_files()[:300] if args.quick else stdlib_files()  # quick: a slice of the stdlib
    files = pretraining_corpus(work / "pretrain.jsonl", sources)
    non_test = set(stdlib_files(include_tests=False))
    task = docstring_task(work / "task", HELD_OUT, [f for f in sources if f in non_test])
    pretrain = [*corpus_overrides(), f"data.source={work / 'pretrain.jsonl'}", f"data.seq_len={seq}", "train.batch_size=4"]
    base_dir = work / "base"
    base = train(load_config(["small"], [*pretrain, *base_shape, f"train.steps={args.base_steps}", "train.eval_every=0",
                                         f"train.warmup_steps={max(1, args.base_steps // 10)}",
                                         f"checkpoint.save_every={args.base_steps}", f"checkpoint.run_dir={base_dir}"]))
    corpus = load_corpus(load_config([base_dir / "config.yaml"]).data)
    pretrain_eval = corpus.eval_docs[: 4 if args.quick else 12]
    held_out, _ = read_conversations(str(work / "task" / "held_out.jsonl"))
    held_out = held_out[:32] if args.quick else held_out
    base_scores = evaluate(base_dir, held_out, pretrain_eval)
    base_summary = {"steps": base.end_step, "files": files, **base_scores}
    results.require_same("base", base_summary)  # resumed runs adapted this very base

    for name in names:
        overrides, lr = METHODS[name]
        for seed in range(args.seeds):
            key = f"{name}|{seed}"
            if key in results:
                continue
            print(f"== {key}", flush=True)
            run_dir = work / f"{name}-{seed}"
            cfg = resolve_finetune_config(str(base_dir), ["finetune/lora"], [
                f"data.source={work / 'task' / 'train.jsonl'}", f"data.seq_len={seq}", "train.batch_size=8",
                f"train.steps={args.steps}", f"train.learning_rate={lr}", f"train.warmup_steps={max(1, args.steps // 10)}",
                "train.log_every=5", "train.eval_every=0", "data.eval_fraction=0", f"checkpoint.save_every={args.steps}",
                f"checkpoint.run_dir={run_dir}", *overrides, *seed_overrides(seed, data_order=True),
                # CorDA-KPM orients its decomposition by the knowledge to keep: the pretraining text
                *([f"finetune.calibration.data={work / 'pretrain.jsonl'}", "finetune.calibration.format=text"]
                  if name == "corda-kpm" else [])])
            result = train(cfg)
            if result.interrupted:
                raise SystemExit(f"interrupted at step {result.end_step}; run again to resume")
            memory = state_bytes(run_dir) if seed == 0 else {k: results.runs[f"{name}|0"][k] for k in MEMORY}  # seed-free
            results.add(key, {**evaluate(run_dir, held_out, pretrain_eval), **memory, "lr": lr,
                              "tokens_per_s": result.tokens_per_second,
                              "losses": {str(k): v for k, v in result.losses.items()}})

    runs = results.runs
    by = lambda name, what: [runs[f"{name}|{s}"][what] for s in range(args.seeds)]
    plot({n: [runs[f"{n}|{s}"]["losses"] for s in range(args.seeds)] for n in names}, out,
         f"Adapting a {args.base_steps}-step stdlib base to docstrings ({args.seeds} seeds, band = ± std)")

    m = results.meta
    mib = lambda b: f"{b / 2**20:.2f}"
    early = str(min(int(s) for s in runs[f"{names[1]}|0"]["losses"] if int(s) >= args.steps // 3))
    lines = [
        "# PEFT on real text: full fine-tuning vs the LoRA family and its successors on the stdlib docstring task",
        "",
        f"`{m['command']}` at commit {m['commit']}{' + changes' if m['dirty'] else ''} (runs at "
        f"{', '.join(results.commits())}), {m['date']}, {m['machine']}; "
        f"python {m['python']}, jax {m['jax']}, flax {m['flax']}.",
        "",
        f"Base: the `small` recipe at {' '.join(o.split('.')[-1] for o in base_shape)}, pretrained {args.base_steps} steps "
        f"of 4 x {seq} tokens on the {files:,} stdlib files outside the task's held-out modules (BPE 4,096). Task: "
        f"`jaxllm docstring-task` (function code -> its docstring's first sentence; {task['train']:,} training "
        f"examples from {task['train_modules']} modules, {task['held_out']:,} held-out from {task['held_out_modules']} "
        f"other modules), loss on the response only. Every method: {args.steps} steps of 8 x {seq} tokens, warmup "
        f"{max(1, args.steps // 10)}, cosine; LoRA family rank 8, alpha 16 on q, k, v, o, gate, up, down; LoRA+ B lr x16; "
        "QLoRA: the same LoRA over an NF4 base (blocks of 64); HFT: half of each layer's matrices, full fine-tuning's lr; "
        "SORSA, Bone, Bat, ABBA, CorDA at the LoRA family's rank 8 (and alpha 16 where it applies; SORSA gamma 4e-4); "
        "CorDA calibrates on 64 rows (IPM: the task, KPM: pretraining text); S²FT: 5% of the heads' rows of o, 2% of "
        "the channels' rows of down. Seed = adapter initialisation and data order.",
        f"Held-out: every example of the held-out modules, teacher-forced. Forgetting: loss on {len(pretrain_eval)} "
        f"pretraining eval files; the base scores {base_scores['pretrain_eval_loss']:.3f} there and "
        f"{base_scores['held_out_loss']:.3f} (accuracy {base_scores['held_out_accuracy']:.1%}) on the held-out task.",
        "",
        f"| method | lr | trainable params | train loss at step {early} | held-out loss | held-out token accuracy | "
        "pretraining-eval loss (forgetting) | trained + optimizer MiB | frozen MiB | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        r0 = runs[f"{n}|0"]
        lines.append(
            f"| {n} | {r0['lr']:g} | {r0['trainable']:,} | {fmt([r['losses'][early] for r in (runs[f'{n}|{s}'] for s in range(args.seeds))])} | "
            f"{fmt(by(n, 'held_out_loss'))} | {fmt([100 * a for a in by(n, 'held_out_accuracy')], 1)}% | "
            f"{fmt(by(n, 'pretrain_eval_loss'))} | {mib(r0['trained_bytes'] + r0['optimizer_bytes'])} | "
            f"{mib(r0['frozen_bytes'])} | {mean_std(by(n, 'tokens_per_s'))[0]:,.0f} |")
    early_losses = lambda n: [runs[f"{n}|{s}"]["losses"][early] for s in range(args.seeds)]
    found = []
    if {"pissa", "lora"} <= set(names):
        found += [f"- PiSSA converges faster than LoRA (train loss at step {early}): "
                  + compare(early_losses("pissa"), early_losses("lora"), "PiSSA", "LoRA", "train loss"),
                  "- PiSSA ends lower (held-out loss): " + compare(by("pissa", "held_out_loss"), by("lora", "held_out_loss"),
                                                                 "PiSSA", "LoRA", "held-out loss")]
    if {"milora", "lora", "pissa"} <= set(names):
        found += ["- MiLoRA forgets less than LoRA (pretraining-eval loss after adaptation): "
                  + compare(by("milora", "pretrain_eval_loss"), by("lora", "pretrain_eval_loss"), "MiLoRA", "LoRA",
                            "pretraining-eval loss"),
                  "- MiLoRA forgets less than PiSSA: " + compare(by("milora", "pretrain_eval_loss"),
                                                                by("pissa", "pretrain_eval_loss"), "MiLoRA", "PiSSA",
                                                                "pretraining-eval loss")]
    if {"full", "lora"} <= set(names):
        found += ["- LoRA vs full fine-tuning (held-out loss): " + compare(by("lora", "held_out_loss"),
                                                                          by("full", "held_out_loss"), "LoRA", "full",
                                                                          "held-out loss"),
                  "- LoRA vs full fine-tuning (forgetting): " + compare(by("lora", "pretrain_eval_loss"),
                                                                       by("full", "pretrain_eval_loss"), "LoRA", "full",
                                                                       "pretraining-eval loss")]
    claims = [  # (names needed, claim, (a, b, what)): the paper's claim that a beats b
        ({"hft", "full"}, "HFT forgets less than full fine-tuning", ("hft", "full", "pretrain_eval_loss")),
        ({"hft", "full"}, "HFT vs full fine-tuning (held-out loss)", ("hft", "full", "held_out_loss")),
        ({"sorsa", "lora"}, f"SORSA converges faster than LoRA (train loss at step {early})", ("sorsa", "lora", early)),
        ({"sorsa", "pissa"}, f"SORSA converges faster than PiSSA (train loss at step {early})", ("sorsa", "pissa", early)),
        ({"bone", "lora"}, f"Bone converges faster than LoRA (train loss at step {early})", ("bone", "lora", early)),
        ({"abba", "lora"}, "ABBA ends lower than LoRA (held-out loss)", ("abba", "lora", "held_out_loss")),
        ({"corda-ipm", "lora"}, "CorDA-IPM ends lower than LoRA (held-out loss)", ("corda-ipm", "lora", "held_out_loss")),
        ({"corda-kpm", "lora"}, "CorDA-KPM forgets less than LoRA", ("corda-kpm", "lora", "pretrain_eval_loss")),
        ({"s2ft", "lora"}, "S²FT forgets less than LoRA", ("s2ft", "lora", "pretrain_eval_loss")),
        ({"parallel", "series"}, "Parallel adapters end lower than series adapters (held-out loss)",
         ("parallel", "series", "held_out_loss")),
        ({"lora", "series"}, "LoRA ends lower than series adapters (held-out loss)", ("lora", "series", "held_out_loss")),
    ]
    for needed, claim, (a, b, what) in claims:
        if needed <= set(names):
            values = early_losses if what == early else (lambda n, w=what: by(n, w))
            label = "train loss" if what == early else what.replace("_", " ").replace("pretrain", "pretraining")
            found.append(f"- {claim}: " + compare(values(a), values(b), a, b, label))
    lines += ["", "## Which claims reproduce (in direction; two-std rule)", "", *found]
    results.save(base=base_summary, task=task, early_step=early,
                 claims=found)
    lines += ["", "![train loss vs step](results.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
