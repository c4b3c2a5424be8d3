"""LoRA fine-tuning throughput and peak memory: jaxllm vs Hugging Face transformers + peft, same run, same shape.

Shape: SmolLM2-135M's architecture (Llama: vocab 49152, d_model 576, d_ff 1536, 30 layers, 9 heads / 3 kv heads,
tied embeddings), random weights saved locally as a Hugging Face directory; LoRA rank 8, alpha 16, no dropout,
on all 7 projections (q, k, v, o, gate, up, down); 4 x 256 random tokens per step, every token a target; f32;
AdamW on the adapters. Each peer runs in its own process, alternating, `--rounds` times; tokens/s is the
median of `--steps` timed steps after one warm-up step; peak memory is the process's peak resident set
(model loading included, for both). jaxllm's process re-executes itself with huge-page malloc as the `jaxllm`
command does (`jaxllm.host_memory`) and torch runs as its users run it; each also runs once more per round with the
other malloc setting (`torch+hugepages`, `jaxllm, JAXLLM_HUGE_PAGES=0`), to show what of the difference that is. Writes
experiments/results/bench_finetune.{md,json}.

    python experiments/bench_finetune.py [--rounds 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance

from jaxllm.host_memory import reexec_with_huge_pages

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, RANK, ALPHA = 4, 256, 8, 16


def make_base(directory: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(directory, safe_serialization=True)


def _tokens():
    import numpy as np

    return np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (BATCH, SEQ + 1), dtype=np.int64)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def torch_peer(base: Path, steps: int) -> dict:
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa", dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                       target_modules=TARGETS, task_type="CAUSAL_LM")).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    tokens = torch.from_numpy(_tokens())
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    timed = _timed(step, steps)
    return {**timed, "threads": torch.get_num_threads(), "peak_rss_bytes": _peak_rss_bytes()}


def jaxllm_peer(base: Path, steps: int) -> dict:
    import jax

    from jaxllm.train.setup import setup_step
    from jaxllm.train.trainer import resolve_finetune_config

    cfg = resolve_finetune_config(str(base), ["finetune/lora"], [
        f"finetune.lora.rank={RANK}", f"finetune.lora.alpha={ALPHA}", "finetune.lora.dropout=0.0",
        "finetune.lora.lr_ratio=1.0", "train.learning_rate=1e-4", "train.weight_decay=0.0", "train.grad_clip=0.0",
        f"train.batch_size={BATCH}", f"data.seq_len={SEQ}", "data.format=text"])
    s = setup_step(cfg)
    tokens = _tokens().astype("int32")
    batch = s.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    with jax.set_mesh(s.mesh):
        state = [s.init()]

        def step():
            state[0], m = s.train_step(state[0], batch, s.frozen)
            return float(m["loss"])

        timed = _timed(step, steps)
    trainable = sum(x.size for x in jax.tree.leaves(s.abstract_state.params))
    return {**timed, "flops_per_token": s.flops_per_token(SEQ), "trainable_params": trainable,
            "peak_rss_bytes": _peak_rss_bytes(), "matmul_floor_s": round(matmul_floor_s(), 4)}


def matmul_floor_s(repeats: int = 5) -> float:
    """Seconds per step of the frozen base's and the tied head's matmuls alone: each projection's forward x @ W and
    input gradient dy @ W^T at its shape ([4 x 256 tokens, in] x [in, out]) times the layers, plus the head's two,
    each jitted alone, median of `repeats` calls. What the step would take with attention, the adapters, the softmax,
    element-wise work and the optimizer free."""
    import jax
    import numpy as np

    M, D, F, V = BATCH * SEQ, SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = D // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    forward = jax.jit(lambda x_MI, w_IO: x_MI @ w_IO)
    input_grad = jax.jit(lambda dy_MO, w_IO: jax.lax.dot_general(dy_MO, w_IO, (((1,), (1,)), ((), ()))))

    def seconds(fn, *args) -> float:
        fn(*args).block_until_ready()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(*args).block_until_ready()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    def both(i: int, o: int) -> float:
        key_x, key_w, key_dy = jax.random.split(jax.random.key(0), 3)
        w = jax.random.normal(key_w, (i, o)) * 0.02
        return (seconds(forward, jax.random.normal(key_x, (M, i)), w)
                + seconds(input_grad, jax.random.normal(key_dy, (M, o)), w))

    projections = [(D, D), (D, kv), (D, kv), (D, D), (D, F), (D, F), (F, D)]  # q, k, v, o, gate, up, down
    return SHAPE["num_hidden_layers"] * sum(both(i, o) for i, o in projections) + both(D, V)


def _timed(step, steps: int) -> dict:
    """Step times after a warm-up step, the last loss, and the timed steps' page faults and kernel CPU time per step."""
    loss = step()  # warm-up (and compile)
    times, before = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        times.append(round(time.perf_counter() - t, 4))
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"step_s_all": times, "loss": loss, "page_faults_per_step": (after.ru_minflt - before.ru_minflt) // steps,
            "sys_cpu_s_per_step": round((after.ru_stime - before.ru_stime) / steps, 3)}


# peer -> (process, environment added): each framework as its users run it, and with the other malloc setting
PEERS = {"torch": ("torch", {}), "jaxllm": ("jaxllm", {}),
         "torch+hugepages": ("torch", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
         "jaxllm, JAXLLM_HUGE_PAGES=0": ("jaxllm", {"JAXLLM_HUGE_PAGES": "0"})}
DEFAULT_PAGES = "jaxllm, JAXLLM_HUGE_PAGES=0"


def run(peer: str, base: Path, steps: int) -> dict:
    process, added = PEERS[peer]
    cmd = [sys.executable, __file__, "--peer", process, "--base", str(base), "--steps", str(steps)]
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXLLM_HUGE_PAGES")} | added
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res["step_s"] = statistics.median(res["step_s_all"])
    res["tokens_per_s"] = round(BATCH * SEQ / res["step_s"], 1)
    return res


def meta(args: argparse.Namespace) -> dict:
    return provenance(f"python experiments/bench_finetune.py --rounds {args.rounds} --steps {args.steps}",
                      ("jax", "flax", "torch", "transformers", "peft"))


def _medians(rows: list[dict], key: str, peers=tuple(PEERS)) -> dict:
    """peer -> the median of `key` over its rows."""
    return {p: statistics.median(r[key] for r in rows if r["peer"] == p) for p in peers}


def write(result: dict) -> str:
    m, rows = result["meta"], result["rows"]
    med = result["median_tokens_per_s"]
    mem = result["median_peak_rss_gib"]
    faults, sys_s = _medians(rows, "page_faults_per_step"), _medians(rows, "sys_cpu_s_per_step")
    floor, step = _medians(rows, "matmul_floor_s", ("jaxllm",))["jaxllm"], _medians(rows, "step_s")["jaxllm"]
    goal = BATCH * SEQ / med["torch"] / 1.5
    lines = ["# LoRA fine-tuning: jaxllm vs transformers + peft", "",
             f"`{m['command']}` at commit {m['commit']}{' (dirty)' if m['dirty'] else ''}, {m['date']}, {m['machine']}; "
             f"jax {m['jax']}, flax {m['flax']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}.",
             "", "SmolLM2-135M architecture (random weights), LoRA r=8 alpha=16 on q, k, v, o, gate, up, down; "
             f"{BATCH} x {SEQ} tokens per step; f32; AdamW on the adapters.", "",
             "| round | peer | median step (s) | tokens/s | peak RSS (GiB) | page faults / step | kernel CPU s / step "
             "| loss after warm-up + steps |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['peer']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['page_faults_per_step']:,} | {r['sys_cpu_s_per_step']:.2f} | "
                     f"{r['loss']:.4f} |")
    lines += ["", f"Median tokens/s: jaxllm {med['jaxllm']:.0f}, transformers + peft {med['torch']:.0f}: "
                  f"**{result['speedup']:.2f}x** (transformers + peft with huge-page malloc too: "
                  f"{med['torch+hugepages']:.0f}, {result['speedup_same_malloc']:.2f}x). Peak memory: jaxllm "
                  f"{mem['jaxllm']:.2f} GiB, transformers + peft {mem['torch']:.2f} GiB "
                  f"({mem['jaxllm'] / mem['torch']:.2f}x).", "",
              f"Huge-page malloc (`jaxllm.host_memory`): jaxllm with default pages {med[DEFAULT_PAGES]:.0f} tokens/s "
              f"({faults[DEFAULT_PAGES]:,.0f} page faults and {sys_s[DEFAULT_PAGES]:.2f} s of kernel CPU time per step), "
              f"with huge pages {med['jaxllm']:.0f} ({faults['jaxllm']:,.0f} and {sys_s['jaxllm']:.2f} s).", "",
              f"MFU ({result['flops_per_token']:.4g} FLOPs per token: forward and input gradients of the frozen "
              f"base, all three matmuls of the adapters; peak {result['peak_flops'] / 1e9:.0f} GFLOP/s f32, "
              f"{result['peak_source']}): jaxllm {100 * result['mfu']['jaxllm']:.0f}%, transformers + peft "
              f"{100 * result['mfu']['torch']:.0f}% ({100 * result['mfu']['torch+hugepages']:.0f}% with huge pages). "
              f"1.5x transformers + peft would take an MFU of {150 * result['mfu']['torch']:.0f}%.", "",
              f"The frozen base's and the head's matmuls alone (forward and input gradient, each jitted alone at its "
              f"shape in jaxllm's process, `matmul_floor_s`): {floor:.2f} s per step, {100 * floor / step:.0f}% of "
              f"jaxllm's {step:.2f} s step. 1.5x transformers + peft needs a step of {goal:.2f} s, i.e. attention, the "
              f"adapters, the softmax, element-wise work and the optimizer in {goal - floor:.2f} s; they take "
              f"{step - floor:.2f} s now."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peer", choices=["torch", "jaxllm"], help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        if args.peer == "jaxllm":
            reexec_with_huge_pages()
        peer = torch_peer if args.peer == "torch" else jaxllm_peer
        print(json.dumps(peer(Path(args.base), args.steps)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        make_base(base)
        for r in range(args.rounds):
            for peer in list(PEERS) if r % 2 == 0 else list(PEERS)[::-1]:
                res = run(peer, base, args.steps)
                rows.append({"round": r + 1, "peer": peer, **res})
                print(f"round {r + 1} {peer}: {res['tokens_per_s']} tokens/s, "
                      f"peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    med = _medians(rows, "tokens_per_s")
    mem = {p: b / 2**30 for p, b in _medians(rows, "peak_rss_bytes").items()}
    from jaxllm.train.peak_flops import peak_flops

    peak = peak_flops("float32")
    flops = next(r["flops_per_token"] for r in rows if r["peer"] == "jaxllm")  # the same model FLOPs for both
    mfu = {p: flops * med[p] / peak.flops_per_s for p in med}
    result = {"meta": meta(args), "rows": rows, "median_tokens_per_s": med, "median_peak_rss_gib": mem,
              "speedup": med["jaxllm"] / med["torch"], "speedup_same_malloc": med["jaxllm"] / med["torch+hugepages"],
              "flops_per_token": flops, "peak_flops": peak.flops_per_s,
              "peak_source": peak.source, "mfu": mfu}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "bench_finetune.md").write_text(write(result))
    print(write(result))


if __name__ == "__main__":
    main()
