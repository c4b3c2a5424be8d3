"""The `jaxllm` command line: `jaxllm <command> [--config FILE ...] [key=value ...]`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from rich.console import Console
from rich.table import Table

from jaxllm.config import Config, ConfigError, load_config
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.host_memory import reexec_with_huge_pages

console = Console(width=None if sys.stdout.isatty() else 160)  # logs: no truncated names


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", action="append", default=[],
        help="YAML file or preset name under configs/ (e.g. tiny, mesh/fsdp_tp); repeat to merge in order",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4 train.steps=100")


def _add_process_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", help="host:port of process 0, for a multi-process run (or JAXLLM_COORDINATOR)")
    p.add_argument("--num-processes", type=int, help="processes in the run (or JAXLLM_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="this process's index (or JAXLLM_PROCESS_ID)")
    p.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds without a peer's heartbeat before the others stop (a peer died)")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_info(args: argparse.Namespace) -> None:
    """Model size, FLOPs per token and param shardings for a config; optionally one forward pass."""
    import jax
    import jax.numpy as jnp

    from jaxllm.config import validate
    from jaxllm.language_model import build
    from jaxllm.sharding import make_mesh

    cfg = _load(args)
    sizes = validate(cfg, jax.device_count())
    lm = build(cfg)
    seq = cfg.data.seq_len
    console.print(f"[bold]params[/] {lm.num_params:,} ({lm.num_params - lm.num_embedding_params:,} non-embedding)")
    console.print(f"[bold]train FLOPs/token[/] at seq {seq}: {lm.flops_per_token(seq):.4g}")
    console.print(f"[bold]mesh[/] {sizes} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    shardings = lm.param_shardings(make_mesh(cfg.mesh))
    table = Table("param", "shape", "logical axes", "partition spec")
    for (path, shape), axes, sh in zip(
        jax.tree_util.tree_leaves_with_path(lm.param_shapes), jax.tree.leaves(lm.logical_axes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(shardings)
    ):
        name = ".".join(str(k.key) for k in path)
        table.add_row(name, str(shape.shape), str(axes), str(sh.spec))
    console.print(table)
    if args.forward:
        params = jax.jit(lm.init)(jax.random.key(cfg.train.seed))
        tokens = jnp.zeros((1, seq), jnp.int32)
        apply = jax.jit(lm.apply)
        t0 = time.perf_counter()
        logits = apply(params, tokens).block_until_ready()
        t1 = time.perf_counter()
        apply(params, tokens).block_until_ready()
        t2 = time.perf_counter()
        console.print(
            f"[bold]forward[/] logits {tuple(logits.shape)} {logits.dtype}; "
            f"compile+run {t1 - t0:.2f}s, run {1000 * (t2 - t1):.1f} ms"
        )


def cmd_train(args: argparse.Namespace) -> None:
    """Train a model (default: the small preset on the built-in synthetic corpus)."""
    from jaxllm.distributed import initialize
    from jaxllm.train.trainer import resolve_run_config, train

    initialize(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)
    result = train(resolve_run_config(args.config, args.overrides, default=("small",)), console=console)
    if result.interrupted:
        raise SystemExit(130)


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a Hugging Face or jaxllm model: LoRA adapters (default) or every parameter."""
    from jaxllm.distributed import initialize
    from jaxllm.train.trainer import resolve_finetune_config, train

    initialize(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)
    result = train(resolve_finetune_config(args.base, args.config, args.overrides), console=console)
    if result.interrupted:
        raise SystemExit(130)


def cmd_bench(args: argparse.Namespace) -> None:
    """Time the train step of a config; print one JSON line."""
    import json

    from jaxllm.train.bench import bench

    print(json.dumps(bench(_load(args), steps=args.steps, warmup=args.warmup)))


def cmd_generate(args: argparse.Namespace) -> None:
    """Stream a continuation of --prompt (or, with --chat / --messages, the model's reply) from a Hugging Face
    or jaxllm run directory; the prompt is tokenized by the tokenizer's own rule, as transformers does."""
    from jaxllm.generate import FfnSkipping, Sampling, stream
    from jaxllm.interop.models import load_model

    if args.prompt is None and args.messages is None:
        raise ConfigError("give --prompt TEXT or --messages FILE")
    m = load_model(args.model, args.adapter)
    if m.tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer.json: cannot turn the prompt into tokens")
    tok = m.tokenizer
    chat = args.chat or args.messages is not None
    if chat:
        ids = _chat_prompt_ids(tok, _read_messages(args.messages) if args.messages else
                               [{"role": "user", "content": args.prompt}], args.model)
    else:
        ids = tok.encode(args.prompt, add_special_tokens=True)
        _write(args.prompt)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    skipping = None if args.ffn_skip is None else FfnSkipping(args.ffn_skip)
    new: list[int] = []
    shown = ""
    for token in stream(m.lm, m.params, [ids], args.max_new_tokens, sampling, stop_ids=tok.stop_ids, seed=args.seed,
                        prefill_chunk=args.prefill_chunk, ffn_skip=skipping):
        if int(token[0]) in tok.stop_ids:
            break
        new.append(int(token[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # a character's bytes not all decoded yet: wait for the rest
            _write(text[len(shown):])
            shown = text
    _write(tok.decode(new)[len(shown):] + "\n")
    if skipping is not None:
        Console(stderr=True).print(f"FFN-Skip: skipped {100 * skipping.skipped_fraction:.0f}% of "
                                   f"{skipping.counts['possible']} layer FFNs while decoding")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _read_messages(path: str) -> list[dict[str, str]]:
    """A JSON file holding a list of {role, content} messages, or {"messages": [...]}."""
    import json
    from pathlib import Path

    from jaxllm.data.sft import to_messages

    try:
        record = json.loads(Path(path).read_text())
        return to_messages(record.get("messages") if isinstance(record, dict) else record)
    except (OSError, json.JSONDecodeError, ValueError) as err:
        raise ConfigError(f"--messages {path}: {err}") from err


def _chat_prompt_ids(tok: Tokenizer, messages: list[dict[str, str]], model: str) -> list[int]:
    """The messages rendered with the model's chat template, ending in its generation prompt."""
    from jaxllm.data.sft import ChatEncoder

    if not tok.chat_template:
        raise ConfigError(f"{model} has no chat_template in tokenizer_config.json: prompt it with --prompt alone")
    return ChatEncoder(tok, tok.chat_template, max_tokens=0).prompt_ids(messages)


def cmd_convert(args: argparse.Namespace) -> None:
    """Hugging Face directory <-> jaxllm run directory."""
    from jaxllm.interop.models import convert

    console.print(convert(args.src, args.dst))


def cmd_eval(args: argparse.Namespace) -> None:
    """Loss and perplexity of a model on a local text/jsonl/parquet file (every document, tokenized as
    transformers does: the tokenizer's own special tokens, no EOS added)."""
    import json
    import math

    import jax

    from jaxllm.data.pipeline import make_batches, text_encoder
    from jaxllm.data.sources import read_documents
    from jaxllm.interop.models import load_model

    m = load_model(args.model, args.adapter)
    if m.tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer.json")
    docs, report = read_documents(args.data, args.text_field)
    seq = min(args.seq_len, m.lm.cfg.max_seq_len)
    loss_sums = jax.jit(m.lm.loss_sums)
    total = count = 0.0
    for batch in make_batches(docs, m.tokenizer, seq_len=seq, batch_size=args.batch_size, seed=0, repeat=False,
                              encode=text_encoder(m.tokenizer, end_with_eos=False)):
        s, _, n = loss_sums(m.params, batch)
        total, count = total + float(s), count + float(n)
    loss = total / max(count, 1.0)
    print(json.dumps({"loss": loss, "perplexity": math.exp(loss), "tokens": int(count), "documents": len(docs),
                      "skipped": report.skipped}))


def cmd_compress(args: argparse.Namespace) -> None:
    """Prune (magnitude or Wanda, unstructured or N:M) or quantise (SpQR) a Hugging Face or jaxllm model into --out: a
    Hugging Face directory from a Hugging Face one, else a jaxllm run directory (dense weights: SpQR's dequantised);
    with --compact (2:4 only), the compact format of `jaxllm.compress.compact`. `generate`, `eval` and `convert` load
    each. Prints and writes (compression.json) the sparsity of every pruned
    map, or SpQR's bits per parameter and outlier share."""
    import dataclasses
    import itertools
    import json
    from pathlib import Path

    import shutil

    from jaxllm.compress.compact import save_compact
    from jaxllm.compress.prune import PruneSpec, parse_pattern, prune, sparsity_of
    from jaxllm.config import to_yaml
    from jaxllm.compress.quantize import dequantized, spqr
    from jaxllm.compress.spqr import SpqrSpec
    from jaxllm.data.pipeline import make_batches, text_encoder
    from jaxllm.data.sources import read_documents
    from jaxllm.interop.hf_checkpoint import is_hf_dir, save_hf_checkpoint
    from jaxllm.interop.models import load_model, save_run

    targets = tuple(args.targets.split(","))
    spec = PruneSpec(method=args.method, sparsity=args.sparsity, pattern=parse_pattern(args.pattern) if args.pattern
                     else None, targets=targets, sequential=not args.one_shot) if args.method != "spqr" else None
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; name a new directory")
    m = load_model(args.model)
    rows = None
    if spec is None or spec.needs_calibration:
        if not args.data:
            raise ConfigError(f"--method {args.method} needs --data: calibration text (.txt/.jsonl/.parquet)")
        if m.tokenizer is None:
            raise ConfigError(f"{args.model} has no tokenizer.json: cannot tokenize the calibration text")
        docs, report = read_documents(args.data, args.text_field)
        seq = min(args.seq_len, m.lm.cfg.max_seq_len)
        batches = make_batches(docs, m.tokenizer, seq_len=seq, batch_size=1, seed=0, repeat=False,
                               encode=text_encoder(m.tokenizer))
        rows = [b["inputs"][0] for b in itertools.islice(iter(batches), args.samples)]
        console.print(f"calibration: {len(rows)} rows of {seq} tokens from {len(docs)} documents of {args.data}"
                      + (f" ({report.skipped} skipped)" if report.skipped else ""))
    record = {"source": str(args.model), "method": args.method, "calibration_rows": len(rows or []),
              "calibration_data": args.data}
    if spec is None:
        qspec = SpqrSpec(bits=args.bits, group=args.group)
        with console.status(f"quantising (SpQR, {qspec.bits} bits, groups of {qspec.group})"):
            quantized, report = spqr(m.lm, m.params, qspec, rows, targets)
        params = dequantized(quantized)  # the formats written hold dense weights
        record |= {"spqr": dataclasses.asdict(qspec), **report}
        summary = f"SpQR: {report['bits_per_param']:.2f} bits per param, {100 * report['outlier_share']:.2f}% outliers"
    else:
        with console.status(f"pruning ({spec.method}{', layer by layer' if spec.sequential and rows else ''})"):
            params = prune(m.lm, m.params, spec, rows)
        sparsity = sparsity_of(m.lm, params, targets)
        record |= {"pattern": args.pattern, "target_sparsity": spec.target_sparsity,
                   "sequential": bool(spec.sequential and rows), "sparsity": sparsity}
        summary = f"{spec.method} pruned {len(sparsity) - 1} maps to {100 * sparsity['all']:.1f}% zeros"
    if args.compact:
        if spec is None or spec.pattern != (2, 4):
            raise ConfigError("--compact stores 2:4-sparse weights: use it with --pattern 2:4")
        if is_hf_dir(Path(args.model)) and (Path(args.model) / "tokenizer.json").exists():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(args.model) / "tokenizer.json", out / "tokenizer.json")
        stored = save_compact(out, to_yaml(m.config), m.lm, params)
        record |= {"compact": {k: stored[k] for k in ("packed", "bytes", "dense_bytes")}}
        summary += f"; compact: {stored['bytes']:,} bytes ({stored['bytes'] / stored['dense_bytes']:.2f}x dense)"
    elif is_hf_dir(Path(args.model)):
        save_hf_checkpoint(out, m.lm.cfg, params, tokenizer_dir=args.model)
    else:
        save_run(out, m.config, params)
    (out / "compression.json").write_text(json.dumps(record, indent=2))
    console.print(f"{summary} -> {out}")


def cmd_moe_report(args: argparse.Namespace) -> None:
    """OpenMoE's routing diagnostics and the inter-layer mutual information of a trained MoE run (markdown on
    stdout; report.md / report.json / tensorboard in --out, default RUN/moe_report)."""
    from jaxllm.moe_report import moe_report, render

    print(render(moe_report(args.run, args.data, batches=args.batches, batch_size=args.batch_size,
                            early_step=args.early_step, capacity_factor=args.capacity_factor,
                            min_count=args.min_count, buckets=args.buckets, out=args.out)))


def cmd_tokenizer(args: argparse.Namespace) -> None:
    """Train a byte-level BPE tokenizer on the training documents of a config's data (`data.source`)."""
    from jaxllm.data.pipeline import load_corpus
    from jaxllm.data.tokenizer_training import train_tokenizer

    corpus = load_corpus(_load(args).data)
    if not all(isinstance(d, str) for d in corpus.train_docs):
        raise ConfigError("tokenizer training reads plain-text documents (data.format=text)")
    path = train_tokenizer(corpus.train_docs, args.vocab_size, args.out, show_progress=sys.stderr.isatty())
    console.print(f"{path}: {args.vocab_size:,} tokens learned from {len(corpus.train_docs):,} training documents "
                  f"(held-out documents unseen); use it with data.tokenizer={path.parent}")


def cmd_docstring_task(args: argparse.Namespace) -> None:
    """Write the stdlib docstring task (function code -> its docstring's first sentence) as SFT jsonl."""
    from jaxllm.data.stdlib import docstring_task

    counts = docstring_task(args.out, args.held_out)
    console.print(f"{args.out}/train.jsonl: {counts['train']:,} examples from {counts['train_modules']} modules; "
                  f"{args.out}/held_out.jsonl: {counts['held_out']:,} from {counts['held_out_modules']} other modules")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; `argv` None: this process's own (then the process first re-executes itself with huge-page
    malloc, `jaxllm.host_memory`)."""
    if argv is None:
        reexec_with_huge_pages()
    parser = argparse.ArgumentParser(prog="jaxllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="param count, FLOPs and shardings of a config")
    _add_config_args(p)
    p.add_argument("--forward", action="store_true", help="also compile and time one forward pass")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("train", help="train a model; resumes when checkpoint.run_dir holds a checkpoint")
    _add_config_args(p)
    _add_process_args(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("finetune", help="fine-tune a HF or jaxllm model (LoRA by default); resumes like train")
    p.add_argument("--base", required=True, help="Hugging Face directory or jaxllm run directory to adapt")
    _add_config_args(p)
    _add_process_args(p)
    p.set_defaults(fn=cmd_finetune)
    p = sub.add_parser("bench", help="time the train step of a config (one JSON line)")
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("generate", help="stream a continuation from a HF or jaxllm run directory")
    p.add_argument("--model", required=True, help="Hugging Face directory or jaxllm run directory")
    p.add_argument("--prompt", help="text to continue (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="send --prompt as a user turn through the chat template")
    p.add_argument("--messages", help="JSON file of [{role, content}, ...] to answer through the chat template")
    p.add_argument("--adapter", help="peft adapter directory (LoRA, MiSS or LoHa) to apply to a Hugging Face --model")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="feed the prompt into the KV cache this many tokens at a time (long prompts; 0: at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ffn-skip", type=float, metavar="THRESHOLD",
                   help="FFN-SkipLLM: skip a layer's FFN when the last one changed the token's residual by a cosine "
                        ">= THRESHOLD (after 4 tokens, outside the first and last layer; above 1: never)")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("convert", help="Hugging Face directory <-> jaxllm run directory")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("eval", help="loss/perplexity of a model on a local data file")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help=".txt/.jsonl/.parquet file or directory")
    p.add_argument("--text-field", default="text")
    p.add_argument("--adapter", help="peft adapter directory (LoRA, MiSS or LoHa) to apply to a Hugging Face --model")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("compress", help="prune (magnitude, Wanda; unstructured or N:M) or quantise (SpQR) a model")
    p.add_argument("--model", required=True, help="Hugging Face directory or jaxllm run directory")
    p.add_argument("--method", choices=["wanda", "magnitude", "spqr"], default="wanda")
    p.add_argument("--bits", type=int, default=3, help="spqr: bits per weight code")
    p.add_argument("--group", type=int, default=16, help="spqr: input columns sharing a scale and zero")
    p.add_argument("--sparsity", type=float, default=0.5, help="share of each map's weights set to zero")
    p.add_argument("--pattern", help="N:M sparsity instead, e.g. 2:4 (keep 2 of every 4 consecutive inputs)")
    p.add_argument("--targets", default="q,k,v,o,gate,up,down", help="linear maps to prune (names or regexes)")
    p.add_argument("--data", help="calibration text for wanda and spqr (.txt/.jsonl/.parquet file or directory)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--samples", type=int, default=128, help="calibration rows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration row")
    p.add_argument("--one-shot", action="store_true",
                   help="calibrate every layer on the unpruned model (default: layer by layer, as Wanda's code)")
    p.add_argument("--compact", action="store_true",
                   help="with --pattern 2:4: write the compact format (kept values + a pattern code per 4 weights)")
    p.add_argument("--out", required=True, help="new directory for the compressed model")
    p.set_defaults(fn=cmd_compress)
    p = sub.add_parser("moe-report", help="routing diagnostics of a trained MoE run (OpenMoE's findings, layer MI)")
    p.add_argument("run", help="a jaxllm run directory of an MoE model")
    p.add_argument("--data", default="", help="data source (as data.source); default: the run's own data")
    p.add_argument("--batches", type=int, default=8, help="batches of data.seq_len tokens to route")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--early-step", type=int, default=None, help="the early checkpoint to compare (default: oldest kept)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="route under capacity dispatch at this factor (default: as the run was trained)")
    p.add_argument("--min-count", type=int, default=8, help="token ids seen fewer times are left out of finding 1")
    p.add_argument("--buckets", type=int, default=4, help="position buckets for the drop rate")
    p.add_argument("--out", default=None, help="directory for report.md / report.json / tensorboard")
    p.set_defaults(fn=cmd_moe_report)
    p = sub.add_parser("tokenizer", help="train a BPE tokenizer on a config's training documents")
    p.add_argument("action", choices=["train"])
    _add_config_args(p)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", required=True, help="directory for tokenizer.json + tokenizer_config.json")
    p.set_defaults(fn=cmd_tokenizer)
    p = sub.add_parser("docstring-task", help="stdlib functions -> their docstrings' first sentence, as SFT jsonl")
    p.add_argument("--out", required=True, help="directory for train.jsonl and held_out.jsonl")
    p.add_argument("--held-out", type=float, default=0.1, help="share of modules held out (by module name)")
    p.set_defaults(fn=cmd_docstring_task)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as err:
        Console(stderr=True, width=console.width).print(f"[red]config error:[/] {err}")  # every process, even quiet ones
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
