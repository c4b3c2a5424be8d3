"""The `jaxllm` command line end to end: info, train (as a user runs it: its own process on one CPU device; the default
preset in the slow set), generate, convert both ways, eval (in-process), and config errors as exit code 2."""

import json
import os
import platform

import pytest

from cli_process import jaxllm_process
from jaxllm.cli import main
from jaxllm.host_memory import huge_page_environment, malloc_pages, transparent_huge_page_mode


def test_info_and_config_errors(capsys):
    assert main(["info", "--config", "tiny", "--config", "mesh/fsdp_tp"]) == 0
    out = capsys.readouterr().out
    assert "blocks.attn.q.kernel" in out and "'fsdp', 'tensor'" in out
    assert main(["info", "--config", "tiny", "model.num_kv_heads=3"]) == 2
    assert "model.num_heads=4 is not divisible by model.num_kv_heads=3" in capsys.readouterr().err


@pytest.mark.slow
def test_default_preset_lowers_the_loss(tmp_path):
    """`jaxllm train` on its default preset (small), shortened: what the README's first command runs."""
    run = tmp_path / "run"
    out = jaxllm_process("train", f"checkpoint.run_dir={run}", "train.steps=20", "train.warmup_steps=3",
                          "train.log_every=1", "data.synthetic_docs=2000", "checkpoint.async_save=false")
    assert "done: step 20" in out and "floor" in out
    losses = [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert losses[-1] < 0.6 * losses[0], losses


def test_train_then_generate_convert_and_eval(tmp_path, capsys):
    run = tmp_path / "run"
    out = jaxllm_process("train", "--config", "tiny", f"checkpoint.run_dir={run}", "train.steps=10",
                          "train.warmup_steps=3", "train.log_every=1", "checkpoint.async_save=false")
    assert "done: step 10" in out and "floor" in out
    reexecuted = huge_page_environment(os.environ, platform.libc_ver(), transparent_huge_page_mode())
    assert f"host malloc: {malloc_pages(reexecuted or os.environ)}" in out  # re-executed itself where that helps
    losses = [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 10 and losses[-1] < losses[0]

    assert main(["generate", "--model", str(run), "--prompt", "|abc", "--max-new-tokens", "24"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("|abc") and len(text) > 10
    assert main(["generate", "--model", str(run), "--prompt", "|abc", "--max-new-tokens", "24", "--prefill-chunk", "2"]) == 0
    assert capsys.readouterr().out.strip() == text  # the prompt fed 2 tokens at a time: same greedy text

    assert main(["convert", str(run), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run2")]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "run2"), "--prompt", "|abc", "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out.strip() == text  # same weights, same greedy continuation

    data = tmp_path / "eval.txt"
    data.write_text("|abcdefghijklmnop#abcdefghijklmnop\n\n|ponmlkjihgfedcba")
    assert main(["eval", "--model", str(run), "--data", str(data), "--seq-len", "64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["documents"] == 2 and result["tokens"] == 34 + 17  # every character after BOS; no EOS added
    assert 0 < result["loss"] < 10 and result["perplexity"] == pytest.approx(2.718281828 ** result["loss"])


@pytest.mark.slow  # a converted checkpoint's weights are the test above's claim; this one trains on from them
def test_training_resumes_from_a_converted_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", f"checkpoint.run_dir={run}", "train.steps=2", "train.eval_every=0",
                 "checkpoint.async_save=false"]) == 0
    assert main(["convert", str(run), str(tmp_path / "hf")]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run2")]) == 0
    capsys.readouterr()
    # resuming a converted checkpoint continues training from its weights (step 0, no iterator state)
    assert main(["train", f"checkpoint.run_dir={tmp_path / 'run2'}", "train.steps=2", "train.warmup_steps=1",
                 "checkpoint.async_save=false"]) == 0
    assert "resuming from step 0" in capsys.readouterr().out


def test_generate_needs_a_model_directory(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "neither a Hugging Face directory" in capsys.readouterr().err
