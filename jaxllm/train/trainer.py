"""The training loop behind `jaxllm train`: data, jitted sharded step, evals, checkpoints, metrics.

    cfg = load_config(["small"], ["train.steps=100"])
    result = train(cfg)           # resumes if cfg.checkpoint.run_dir holds a checkpoint
"""

from __future__ import annotations

import functools
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
from jaxllm.host_memory import malloc_pages
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.metrics import MetricsWriter
from jaxllm.train.peak_flops import peak_flops
from jaxllm.train.methods.base_model import base_config
from jaxllm.train.setup import StepSetup, next_phase, phase_config, setup_step


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


def resolve_run_config(files: list[str], overrides: list[str], base: Config | None = None,
                       default: tuple[str, ...] = ()) -> Config:
    """Config for `jaxllm train`: a run directory's saved config.yaml (if any) under files/overrides; a new run
    starts from `default` presets when no files are given (a resumed run keeps its own config, whatever preset made it).
    `base` replaces the defaults (fine-tuning: the base model's config)."""
    cfg = load_config(files or list(default), overrides, base=base)
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
    corpus, run_dir = _open_run(cfg, console)
    t, d = cfg.train, cfg.data
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, warn=lambda m: console.print(f"[yellow]{m}[/]"))
    setup = setup_step(phase_config(cfg, ckpt.latest_step() or 0))  # a resumed run continues in its phase
    restored = ckpt.restore_latest(setup.abstract_state)
    start, state, data_state = restored if restored is not None else (0, setup.init(), None)
    if restored is not None:
        console.print(f"resuming from step {start} in {run_dir}")
    rows = local_rows(t.batch_size, jax.process_index(), jax.process_count())
    train_it = RowStreams(corpus.train_docs, corpus.tokenizer, seq_len=d.seq_len, global_batch=t.batch_size,
                          seed=d.seed, rows=rows, repeat=True, encode=corpus.encode)
    if data_state:  # a converted checkpoint (step 0) carries no iterator state
        train_it.set_state(data_state)
    evaluate = functools.partial(_evaluate, cfg, corpus, rows)
    result = TrainResult(run_dir=run_dir, start_step=start, end_step=start, floor=corpus.floor)
    log = _StepLog(cfg, console, MetricsWriter(run_dir, enabled=main), result, start)
    log.begin(setup, corpus)
    switch = setup.method.phase_end()  # a method's next phase (the self-guided model without guides)
    after = setup_step(setup.method.next_config()) if switch is not None else None  # built outside the mesh context
    step = last_saved = start
    with _StopRequest() as stop, log.progress, jax.set_mesh(setup.mesh):
        while step < t.steps:
            state, metrics = setup.train_step(state, setup.global_batch(next(train_it)), setup.frozen_at(step))
            metrics = {**metrics, **setup.method.step_metrics(step)}
            step += 1
            if switch is not None and step >= switch:  # the phase is over: continue as the next one
                console.print(f"step {step}: {setup.method.phase_note} ({setup.lm.num_params:,} -> "
                              f"{after.lm.num_params:,} params)")
                state, setup, switch = next_phase(state, setup, after), after, None  # two phases at most
            if step % t.log_every == 0 or step == t.steps or stop.signal:
                log.train(step, metrics, setup)
            if t.eval_every and step % t.eval_every == 0:
                log.eval(step, evaluate(setup, state.params, step))
            log.progress.update(log.task, completed=step)
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
        with jax.set_mesh(setup.mesh):
            result.eval_loss = evaluate(setup, state.params, step)
    log.writer.close()
    _summary(console, result, last_saved)
    return result


def _open_run(cfg: Config, console: Console) -> tuple[Corpus, Path]:
    """Validate the config, load and check the data, create the run directory with its config.yaml."""
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
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return corpus, run_dir


def _evaluate(cfg: Config, corpus: Corpus, rows, setup: StepSetup, params, step: int) -> float | None:
    """Mean loss per token over the eval documents (`train.eval_batches` batches; 0: all), None without any."""
    t, d = cfg.train, cfg.data
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


class _StepLog:
    """The run's first line, its progress bar and the metrics it logs (tensorboard + metrics.jsonl), with step time,
    tokens/s and MFU measured between log steps."""

    def __init__(self, cfg: Config, console: Console, writer: MetricsWriter, result: TrainResult, start: int):
        self.cfg, self.console, self.writer, self.result = cfg, console, writer, result
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.peak = peak_flops(cfg.model.dtype)
        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
            disable=jax.process_index() != 0,
        )
        self.task = self.progress.add_task("train", total=cfg.train.steps, completed=start, info="compiling")
        self.last_step, self.last_time = start, time.perf_counter()
        writer.text(start, "config", "```\n" + to_yaml(cfg) + "\n```")

    def begin(self, setup: StepSetup, corpus: Corpus) -> None:
        seq, peak = self.cfg.data.seq_len, self.peak
        self.console.print(
            f"run dir [bold]{self.result.run_dir}[/]: {setup.method.describe(setup.abstract_state.params)}, mesh "
            f"{dict(setup.mesh.shape)}, {len(corpus.train_docs):,} train / {len(corpus.eval_docs):,} eval docs, steps "
            f"{self.last_step}->{self.cfg.train.steps}; MFU of {setup.flops_per_token(seq):.4g} FLOPs/token against "
            f"{peak.flops_per_s / 1e9:,.0f} GFLOP/s ({peak.source}); host malloc: {malloc_pages()}"
        )

    def train(self, step: int, metrics: dict, setup: StepSetup) -> None:
        host = jax.device_get(metrics)
        for layer, shares in enumerate(host.pop("moe/expert_load", ())):  # [L, slots]: one histogram per layer
            self.writer.histogram(step, f"moe/expert_load/layer{layer}", shares)
        m = {k: float(v) for k, v in host.items()}
        now = time.perf_counter()
        step_time = (now - self.last_time) / (step - self.last_step)
        self.last_time, self.last_step = now, step
        flops_per_step = setup.flops_per_token(self.cfg.data.seq_len) * self.tokens_per_step
        m.update(step_time=step_time, tokens_per_second=self.tokens_per_step / step_time,
                 mfu=flops_per_step / step_time / self.peak.flops_per_s)
        self.writer.scalars(step, m, prefix="train/")
        r = self.result
        r.losses[step] = m["loss"]
        r.tokens_per_second, r.mfu = m["tokens_per_second"], m["mfu"]
        info = f"loss {m['loss']:.3f} | {m['tokens_per_second']:,.0f} tok/s | MFU {100 * m['mfu']:.1f}%"
        self.progress.update(self.task, info=info)
        if not self.console.is_terminal:  # logs and CI: a line per log step instead of a live bar
            self.console.print(f"step {step}/{self.cfg.train.steps} {info}")

    def eval(self, step: int, loss: float | None) -> None:
        self.result.eval_loss = loss
        if loss is not None:
            self.writer.scalars(step, {"loss": loss, "perplexity": float(np.exp(loss))}, prefix="eval/")


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
