"""Conditional compute on real text (the stdlib corpus, BPE 4,096): Read-ME (a dense model refactored into a pre-gated
MoE, its router distilled from the dense model) vs continuing the dense model vs sparse upcycling, after equal further
training; and OpenMoE's routing diagnostics on a trained MoE. The report closes with FFN-SkipLLM's decoding benchmark
(skipped share vs agreement vs speed: experiments/bench_ffn_skip.py's committed artifact, with its own provenance).

    python experiments/moe/conditional_compute.py [--base-steps 150] [--steps 100] [--seeds 3]
    python experiments/moe/conditional_compute.py --quick --out DIR   # a tiny model, a few steps (the tests)

Per seed: a dense base (the `small` recipe at --d-model / --layers / --d-ff, --base-steps steps) and a narrow dense
base (d_ff = Read-ME top-1's active width, 7 d_ff/16, the same steps), then --steps more steps on the same data for
each variant: a base continued (full fine-tuning); a base upcycled into 4 copies of its FFN, top-1 (full fine-tuning;
an upcycled expert is the whole FFN it copies, so the narrow base's upcycled MoE is the one at Read-ME top-1's active
parameters); Read-ME: the dense base refactored into a shared FFN of d_ff/4 neurons plus 4 experts of 3 d_ff/16
(grouped on 32 calibration rows), top-1 or top-2, its pre-gating router distilled from the dense base for all the
steps, or for half of them and then the whole MoE trained on the data. Diagnostics (seed 0): an MoE of 8 experts,
top-2, capacity dispatch (factor 1.25) trained --base-steps steps with a checkpoint every 10, reported by
`jaxllm.moe_report` at its last step against step 10. Writes conditional_compute.json (with command, commit, date,
machine, versions) and conditional_compute.md (tables; differences by the two-std rule of experiments/real_text.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import provenance  # noqa: E402
from real_text import (Results, compare, corpus_overrides, fmt, seed_overrides,  # noqa: E402
                       shape_overrides)

from jaxllm.config import load_config  # noqa: E402
from jaxllm.moe_report import moe_report, render  # noqa: E402
from jaxllm.train.trainer import resolve_finetune_config, train  # noqa: E402


def narrow_width(F: int) -> int:
    """The narrow base's d_ff: Read-ME top-1's active FFN neurons (its shared FFN plus one expert)."""
    return F // 4 + 3 * F // 16


def variants(F: int) -> dict[str, tuple[list[str], int, bool, str]]:
    """{name: (overrides on its base, active FFN neurons per token and layer, whether a second half of the steps then
    trains the whole model on the data, which base: "dense base" or "narrow dense base")}."""
    shared, width = F // 4, 3 * F // 16
    readme = ["finetune.method=pregate", "model.moe.num_experts=4", f"model.moe.d_ff={width}",
              "model.moe.shared_experts=1", f"model.moe.shared_d_ff={shared}", "model.moe.router=pregate",
              "finetune.calibration.samples=32"]
    upcycle = ["finetune.method=full", "model.moe.num_experts=4", "model.moe.top_k=1"]
    narrow = narrow_width(F)
    return {
        "dense, continued": (["finetune.method=full"], F, False, "dense base"),
        "upcycled, 4 copies, top-1": (upcycle, F, False, "dense base"),
        "narrow dense, continued": (["finetune.method=full"], narrow, False, "narrow dense base"),
        "upcycled narrow, 4 copies, top-1": (upcycle, narrow, False, "narrow dense base"),
        "Read-ME top-1, router distilled": ([*readme, "model.moe.top_k=1"], shared + width, False, "dense base"),
        "Read-ME top-1, distilled then trained": ([*readme, "model.moe.top_k=1"], shared + width, True, "dense base"),
        "Read-ME top-2, distilled then trained": ([*readme, "model.moe.top_k=2"], shared + 2 * width, True,
                                                  "dense base"),
    }


def run(overrides: list[str], run_dir: Path, steps: int, base: Path | None = None) -> dict:
    common = [*corpus_overrides(), f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
              "train.log_every=10", f"train.eval_every={steps}", f"checkpoint.save_every={steps}",
              f"checkpoint.run_dir={run_dir}", *overrides]
    cfg = (resolve_finetune_config(str(base), [], common) if base is not None else load_config(["small"], common))
    result = train(cfg)
    if result.interrupted:
        raise SystemExit(f"{run_dir} was interrupted at step {result.end_step}; run again")
    return {"eval_loss": result.eval_loss, "tokens_per_s": result.tokens_per_second}


def run_variant(overrides: list[str], then_train: bool, run_dir: Path, steps: int, base: Path) -> dict:
    """The variant's further `steps`: all on its own method, or half on it and half training the whole model it
    made on the data (full fine-tuning from its run directory)."""
    if not then_train:
        return run(overrides, run_dir, steps, base)
    first = run(overrides, run_dir.with_name(run_dir.name + "-first"), steps // 2, base)
    seed = [o for o in overrides if o.startswith(("train.seed", "data.seed"))]
    second = run(["finetune.method=full", *seed], run_dir, steps - steps // 2,
                 run_dir.with_name(run_dir.name + "-first"))
    return {**second, "first_half": first}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=100, help="further steps for every variant")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=96)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=384)
    ap.add_argument("--quick", action="store_true", help="a tiny model, a few steps (for the tests)")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args(argv)
    D, L, F = (32, 2, 64) if args.quick else (args.d_model, args.layers, args.d_ff)
    shapes = {"dense base": shape_overrides(D, L, F), "narrow dense base": shape_overrides(D, L, narrow_width(F))}
    quick = ["train.eval_batches=2"] if args.quick else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/moe/conditional_compute.py " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = {"base_steps": args.base_steps, "steps": args.steps, "seeds": args.seeds, "shapes": shapes,
                "variants": {k: [*v[0], "then full fine-tuning"] if v[2] else v[0]
                                                      for k, v in variants(F).items()}}
    results = Results(out / "conditional_compute.json", {**provenance(command.strip()), "settings": settings})
    work = Path(tempfile.mkdtemp(prefix="conditional-"))
    for seed in range(args.seeds):
        for base_name, shape in shapes.items():
            base = work / f"{base_name.replace(' ', '_')}-{seed}"
            todo = [(name, v) for name, v in variants(F).items()
                    if v[3] == base_name and f"{name}|{seed}" not in results]
            if todo:
                print(f"== {base_name}, seed {seed}", flush=True)
                got = run([*shape, *seed_overrides(seed), *quick], base, args.base_steps)
                if f"{base_name}|{seed}" not in results:
                    results.add(f"{base_name}|{seed}", got)
            for name, (overrides, _, then_train, _) in todo:
                print(f"== {name}|{seed}", flush=True)
                results.add(f"{name}|{seed}", run_variant([*overrides, *seed_overrides(seed, data_order=True), *quick],
                                                          then_train,
                                                          work / f"{name.replace(' ', '_').replace(',', '')}-{seed}",
                                                          args.steps, base))
    if "diagnostics" not in results:
        moe_dir = work / "moe-diagnostics"
        run([*shapes["dense base"], "model.moe.num_experts=8", "model.moe.top_k=2", f"model.moe.d_ff={F // 2}",
             "model.moe.dispatch=capacity", "model.moe.capacity_factor=1.25", *seed_overrides(0), *quick,
             "checkpoint.save_every=10", "checkpoint.keep_every=10"], moe_dir, args.base_steps)
        report = moe_report(moe_dir, batches=2 if args.quick else 12, early_step=10 if args.base_steps > 10 else None,
                            out=work / "moe-report")
        results.add("diagnostics", {"report": report, "markdown": render(report)})
    write_report(results, variants(F), F, args, out)


def write_report(results: Results, table: dict, F: int, args, out: Path) -> None:
    m, runs = results.meta, results.runs
    narrow = narrow_width(F)
    losses = lambda name: [r["eval_loss"] for k, r in runs.items() if k.split("|")[0] == name]
    lines = [
        "# Conditional compute on real text: Read-ME vs dense vs upcycling; OpenMoE's routing diagnostics", "",
        f"`{m['command']}` at commit {m['commit']}{' + changes' if m['dirty'] else ''} (runs at "
        f"{', '.join(results.commits())}), {m['date']}, {m['machine']}; python {m['python']}, jax {m['jax']}.", "",
        f"Dense base: {m['settings']['shapes']['dense base']}; narrow dense base: the same with d_ff={narrow} "
        f"(Read-ME top-1's active FFN width); each {args.base_steps} steps of 8 x 256 stdlib tokens, {args.seeds} "
        f"seeds; then {args.steps} further steps for each variant, the same data. An upcycled expert copies its "
        "base's whole FFN, so the upcycled narrow base is the MoE at Read-ME top-1's active parameters after the same "
        "training. Read-ME's router learns by distillation from the dense base, so alone it can at best reach the "
        "base; \"distilled then trained\" spends the first half of the steps distilling and the second training the "
        "whole MoE on the data (full fine-tuning), as the dense and upcycled models do throughout. Active FFN neurons: "
        "per token and layer. (Tokens/s are in the JSON only: this CPU is shared while it runs.)", "",
        "| variant | active FFN neurons (vs dense) | eval loss |", "|---|---:|---:|",
        f"| dense base (before the further steps) | {F} (1.00x) | {fmt(losses('dense base'))} |",
        f"| narrow dense base (before the further steps) | {narrow} ({narrow / F:.2f}x) | "
        f"{fmt(losses('narrow dense base'))} |"]
    for name, (_, active, _, _) in table.items():
        lines.append(f"| {name} | {active} ({active / F:.2f}x) | {fmt(losses(name))} |")
    found = [f"- {compare(losses(a), losses(b), a, b)}" for a, b in (
        ("Read-ME top-1, router distilled", "dense base"),
        ("Read-ME top-1, distilled then trained", "dense, continued"),
        ("Read-ME top-1, distilled then trained", "upcycled, 4 copies, top-1"),
        ("Read-ME top-1, distilled then trained", "upcycled narrow, 4 copies, top-1"),
        ("Read-ME top-1, distilled then trained", "narrow dense, continued"),
        ("upcycled narrow, 4 copies, top-1", "narrow dense, continued"),
        ("Read-ME top-2, distilled then trained", "Read-ME top-1, distilled then trained"),
        ("upcycled, 4 copies, top-1", "dense, continued"))]
    diagnostics = runs["diagnostics"]["markdown"].split("\n", 2)[2]  # without its title line (a temporary path)
    lines += ["", "## Differences (two-std rule over seeds)", "", *found, "",
              f"## OpenMoE's routing diagnostics (8 experts, top-2, capacity 1.25, {args.base_steps} steps, seed 0; "
              "step 10 as the early checkpoint)", "", diagnostics, ""]
    ffn_skip = Path(__file__).resolve().parents[1] / "results" / "bench_ffn_skip.md"
    if ffn_skip.exists():  # FFN-SkipLLM's skipped share vs agreement vs speed: its own benchmark and provenance
        lines += ["## FFN-SkipLLM while decoding (`experiments/bench_ffn_skip.py`, its artifact as committed)", "",
                  ffn_skip.read_text().split("\n", 2)[2].strip(), ""]
    results.save(claims=found)
    (out / "conditional_compute.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
