"""The training loop behind `jaxllm train`: data, jitted sharded step, evals, checkpoints, metrics.

    cfg = load_config(["small"], ["train.steps=100"])
    result = train(cfg)           # resumes if cfg.checkpoint.run_dir holds a checkpoint
"""

from __future__ import annotations

import itertools
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from jaxllm.config import Config, ConfigError, load_config, to_yaml, validate
from jaxllm.data.pipeline import Corpus, RowStreams, load_corpus, local_rows
from jaxllm.distributed import all_processes_agree, check_same_config, merged_state
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.metrics import MetricsWriter
from jaxllm.train.peak_flops import peak_flops
from jaxllm.train.methods.base_model import base_config
from jaxllm.train.setup import next_phase, phase_config, setup_step


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    end_step: int
    losses: dict[int, float] = field(default_factory=dict)  # logged step -> train loss
    eval_loss: float | None = None
    floor: float | None = None
    tokens_per_second: float = 0.0
    mfu: float = 0.0
    interrupted: bool = False
    adapter_dir: Path | None = None  # LoRA fine-tuning: the adapter in peft's format


def resolve_run_config(files: list[str], overrides: list[str], base: Config | None = None) -> Config:
    """Config for `jaxllm train`: a run directory's saved config.yaml (if any) under files/overrides.
    `base` replaces the defaults (fine-tuning: the base model's config)."""
    cfg = load_config(files, overrides, base=base)
    if not cfg.checkpoint.run_dir:
        cfg.checkpoint.run_dir = time.strftime("runs/%Y%m%d-%H%M%S")
        return cfg
    saved = Path(cfg.checkpoint.run_dir) / "config.yaml"
    return load_config([saved, *files], overrides) if saved.exists() else cfg


def resolve_finetune_config(base_dir: str, files: list[str], overrides: list[str]) -> Config:
    """Config for `jaxllm finetune --base DIR`: the base model's architecture and tokenizer, then files
    and overrides (fine-tuning hyperparameters, data), with finetune.base set."""
    return resolve_run_config(files, [*overrides, f"finetune.base={base_dir}"], base=base_config(base_dir))


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _check_vocab(cfg: Config, corpus: Corpus) -> None:
    if corpus.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({corpus.tokenizer.vocab_size}, data.tokenizer={cfg.data.tokenizer!r}); "
            f"allowed: model.vocab_size >= {corpus.tokenizer.vocab_size}"
        )


def train(cfg: Config, console: Console | None = None) -> TrainResult:
    """Train (or resume) the run in cfg.checkpoint.run_dir; returns what was measured."""
    main = jax.process_index() == 0
    console = console or Console()
    console.quiet = console.quiet or not main  # logs and progress from process 0 only
    validate(cfg, jax.device_count())
    if not cfg.checkpoint.run_dir:
        raise ConfigError("checkpoint.run_dir is empty; give a directory (resolve_run_config picks runs/<date-time>)")
    corpus = load_corpus(cfg.data)
    _check_vocab(cfg, corpus)
    if corpus.encode is not None and getattr(corpus.encode, "truncated", 0):
        console.print(f"[yellow]data:[/] {corpus.encode.truncated} SFT examples are longer than data.seq_len + 1 "
                      f"= {cfg.data.seq_len + 1} tokens and are truncated")
    if corpus.report.skipped:
        console.print(f"[yellow]data:[/] skipped {corpus.report.skipped} bad documents, e.g. {corpus.report.examples[:3]}")
    run_dir = Path(cfg.checkpoint.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_same_config(to_yaml(cfg))
    if main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    t, d = cfg.train, cfg.data
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, warn=lambda m: console.print(f"[yellow]{m}[/]"))
    setup = setup_step(phase_config(cfg, ckpt.latest_step() or 0))  # a resumed run continues in its phase
    mesh = setup.mesh
    restored = ckpt.restore_latest(setup.abstract_state)
    if restored is not None:
        start, state, data_state = restored
        console.print(f"resuming from step {start} in {run_dir}")
    else:
        start, data_state = 0, None
        state = setup.init()

    rows = local_rows(t.batch_size, jax.process_index(), jax.process_count())
    train_it = RowStreams(corpus.train_docs, corpus.tokenizer, seq_len=d.seq_len, global_batch=t.batch_size,
                          seed=d.seed, rows=rows, repeat=True, encode=corpus.encode)
    if data_state:  # a converted checkpoint (step 0) carries no iterator state
        train_it.set_state(data_state)

    def evaluate(params) -> float | None:
        if not corpus.eval_docs:
            return None
        it = RowStreams(corpus.eval_docs, corpus.tokenizer, seq_len=d.seq_len, global_batch=t.batch_size,
                        seed=d.seed, rows=rows, repeat=False, encode=corpus.encode)
        total, count = 0.0, 0.0
        for _ in range(t.eval_batches) if t.eval_batches else itertools.count():
            batch, any_left = it.next_or_empty()
            if not all_processes_agree(any_left):  # every process runs the same number of steps
                break
            s, n = setup.eval_step(params, setup.global_batch(batch), setup.frozen_at(step))
            total, count = total + float(s), count + float(n)
        return total / count if count else None

    writer = MetricsWriter(run_dir, enabled=main)
    writer.text(start, "config", "```\n" + to_yaml(cfg) + "\n```")
    tokens_per_step = t.batch_size * d.seq_len
    flops_per_step = setup.flops_per_token(d.seq_len) * tokens_per_step
    peak = peak_flops(cfg.model.dtype)
    result = TrainResult(run_dir=run_dir, start_step=start, end_step=start, floor=corpus.floor)
    console.print(
        f"run dir [bold]{run_dir}[/]: {setup.method.describe(setup.abstract_state.params)}, mesh {dict(mesh.shape)}, "
        f"{len(corpus.train_docs):,} train / {len(corpus.eval_docs):,} eval docs, steps {start}->{t.steps}; "
        f"MFU of {setup.flops_per_token(d.seq_len):.4g} FLOPs/token against {peak.flops_per_s / 1e9:,.0f} GFLOP/s "
        f"({peak.source})"
    )

    progress = Progress(
        TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, disable=not main,
    )
    switch = setup.method.phase_end()  # a method's next phase (the self-guided model without guides)
    after = setup_step(setup.method.next_config()) if switch is not None else None  # built outside the mesh context
    step, last_saved, last_log_step = start, start, start
    last_log_time = time.perf_counter()
    with _StopRequest() as stop, progress, jax.set_mesh(mesh):
        task = progress.add_task("train", total=t.steps, completed=start, info="compiling")
        while step < t.steps:
            state, metrics = setup.train_step(state, setup.global_batch(next(train_it)), setup.frozen_at(step))
            metrics = {**metrics, **setup.method.step_metrics(step)}
            step += 1
            if switch is not None and step >= switch:  # the phase is over: continue as the next one
                before = setup.lm.num_params
                note = setup.method.phase_note
                state, setup, switch = next_phase(state, setup, after), after, None  # two phases at most
                flops_per_step = setup.flops_per_token(d.seq_len) * tokens_per_step
                console.print(f"step {step}: {note} ({before:,} -> {setup.lm.num_params:,} params)")
            if step % t.log_every == 0 or step == t.steps or stop.signal:
                host = jax.device_get(metrics)
                for layer, shares in enumerate(host.pop("moe/expert_load", ())):  # [L, slots]: one histogram per layer
                    writer.histogram(step, f"moe/expert_load/layer{layer}", shares)
                m = {k: float(v) for k, v in host.items()}
                now = time.perf_counter()
                step_time = (now - last_log_time) / (step - last_log_step)
                last_log_time, last_log_step = now, step
                m.update(step_time=step_time, tokens_per_second=tokens_per_step / step_time,
                         mfu=flops_per_step / step_time / peak.flops_per_s)
                writer.scalars(step, m, prefix="train/")
                result.losses[step] = m["loss"]
                result.tokens_per_second, result.mfu = m["tokens_per_second"], m["mfu"]
                info = f"loss {m['loss']:.3f} | {m['tokens_per_second']:,.0f} tok/s | MFU {100 * m['mfu']:.1f}%"
                progress.update(task, info=info)
                if not console.is_terminal:  # logs and CI: a line per log step instead of a live bar
                    console.print(f"step {step}/{t.steps} {info}")
            if t.eval_every and step % t.eval_every == 0:
                result.eval_loss = evaluate(state.params)
                if result.eval_loss is not None:
                    writer.scalars(step, {"loss": result.eval_loss, "perplexity": float(np.exp(result.eval_loss))},
                                   prefix="eval/")
            progress.update(task, completed=step)
            if step % cfg.checkpoint.save_every == 0 or step == t.steps or stop.signal:
                ckpt.save(step, state, merged_state(train_it.get_state()), force=True)
                last_saved = step
            if stop.signal:
                console.print(f"[yellow]received signal {stop.signal}: saved step {step}, exiting[/]")
                result.interrupted = True
                break
    ckpt.wait()
    ckpt.close()
    result.end_step = step
    if main and not result.interrupted:
        result.adapter_dir = setup.method.export(state.params, run_dir, console)
    if not result.interrupted and result.eval_loss is None:
        with jax.set_mesh(mesh):
            result.eval_loss = evaluate(state.params)
    writer.close()
    _summary(console, result, last_saved)
    return result


def _summary(console: Console, r: TrainResult, saved: int) -> None:
    last = r.losses[max(r.losses)] if r.losses else float("nan")
    line = f"[bold]done[/]: step {r.end_step}, train loss {last:.4f}"
    if r.eval_loss is not None:
        line += f", eval loss {r.eval_loss:.4f}"
    if r.floor is not None:
        line += f", floor {r.floor:.4f} (exact entropy of the held-out documents)"
    console.print(line)
    console.print(f"{r.tokens_per_second:,.0f} tokens/s, MFU {100 * r.mfu:.1f}%; checkpoint step {saved} and "
                  f"tensorboard logs in {r.run_dir} (tensorboard --logdir {r.run_dir})")
