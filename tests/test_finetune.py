"""`jaxllm finetune` and its data: only adapter params train (base unchanged bitwise, optimizer state the
adapter's size), response-only loss, sharded == single device, SFT rendering, CLI end to end with resume."""

import json

import chex
import jax
import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.config import ConfigError, load_config
from jaxllm.data.pipeline import load_corpus, make_batches
from jaxllm.data.sft import ChatEncoder, DEFAULT_TEMPLATE, read_conversations
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.interop.hf_checkpoint import load_hf_checkpoint
from jaxllm.interop.models import load_model
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.peft import LoraAdapter
from jaxllm.train.setup import setup_step
from jaxllm.train.step import make_train_step
from jaxllm.train.trainer import resolve_finetune_config


def _finetune_cfg(base, data, *overrides):
    return resolve_finetune_config(str(base), ["finetune/lora"], [
        f"data.source={data}", "data.seq_len=64", "train.batch_size=8", "train.steps=4", "train.warmup_steps=0",
        *overrides])


def setup_cfg_checkpoint(run):
    return load_config([run / "config.yaml"]).checkpoint


def _batches(setup, cfg, n):
    corpus = load_corpus(cfg.data)
    it = iter(make_batches(corpus.train_docs, corpus.tokenizer, seq_len=cfg.data.seq_len,
                           batch_size=cfg.train.batch_size, seed=0, repeat=True, encode=corpus.encode))
    return [next(it) for _ in range(n)]


def test_only_adapter_params_train(base_and_data):
    base, data = base_and_data
    cfg = _finetune_cfg(base, data, "finetune.lora.rank=4", "finetune.lora.dropout=0.1")
    setup = setup_step(cfg)
    base_params = jax.tree.map(np.array, load_model(base).params)
    chex.assert_trees_all_equal(jax.tree.map(np.array, setup.frozen), base_params)
    state = setup.init()
    start = jax.tree.map(np.array, state.params)
    with jax.set_mesh(setup.mesh):
        for batch in _batches(setup, cfg, 3):
            state, metrics = setup.train_step(state, setup.global_batch(batch), setup.frozen)
    chex.assert_trees_all_equal(jax.tree.map(np.array, setup.frozen), base_params)  # base unchanged, bitwise
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, start)
    assert min(jax.tree.leaves(moved)) > 0  # every adapter leaf trained
    # optimizer state: AdamW's two moments, each exactly the adapter's shapes -- nothing base-sized
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sorted(x.shape for x in moments) == sorted(adapter_shapes * 2)
    assert sum(x.size for x in moments) == 2 * setup.method.adapter.num_params < setup.lm.num_params


def test_lora_flops_per_token_leave_out_the_frozen_weights_gradients(base_and_data):
    """Full fine-tuning computes every weight's gradient; LoRA none of the base's (2 FLOPs per weight and
    token fewer) and adds its adapters' forward, input and weight gradients (6 per adapter weight)."""
    base, data = base_and_data
    T, r = 64, 4
    full = setup_step(_finetune_cfg(base, data, "finetune.method=full"))
    lora = setup_step(_finetune_cfg(base, data, f"finetune.lora.rank={r}"))
    V, D, L, N, K, H, F = 320, 64, 2, 4, 2, 16, 128  # the tiny preset: head_dim 64 / 4
    kernels = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + D * V  # q, k, v, o, gate, up, down; head
    adapters = L * r * ((D + N * H) + 2 * (D + K * H) + (N * H + D) + 2 * (D + F) + (F + D))
    assert full.flops_per_token(T) - lora.flops_per_token(T) == pytest.approx(2 * kernels - 6 * adapters, abs=1e-3)


def test_prompt_targets_do_not_change_the_loss(base_and_data):
    base, data = base_and_data
    cfg = _finetune_cfg(base, data)
    setup = setup_step(cfg)
    batch = _batches(setup, cfg, 1)[0]
    mask = batch["loss_mask"]
    assert 0 < mask.sum() < 0.5 * mask.size  # responses are a minority of the tokens
    loss = lambda b: float(setup.eval_step(setup.init().params, setup.global_batch(b), setup.frozen)[0])
    changed = dict(batch, targets=np.where(mask == 0, (batch["targets"] + 7) % 259, batch["targets"]))
    assert loss(changed) == loss(batch)
    response_changed = dict(batch, targets=np.where(mask > 0, (batch["targets"] + 7) % 259, batch["targets"]))
    assert loss(response_changed) != loss(batch)


@pytest.mark.parametrize("variant", [pytest.param("dora_nf4", marks=pytest.mark.slow), "lora_plus"])
def test_sharded_finetuning_matches_single_device(base_and_data, variant):
    """DoRA on an NF4 base (QDoRA: both variants' leaves in one program) and LoRA+ on 8 devices: their leaves and
    optimizer state shard like the kernels they adapt, and 3 steps equal one device's."""
    base, data = base_and_data
    extra = {"dora_nf4": ["finetune.lora.dora=true", "finetune.lora.quantize=nf4"],
             "lora_plus": ["finetune.lora.lr_ratio=16"]}[variant]
    cfg = _finetune_cfg(base, data, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", *extra)
    setup = setup_step(cfg)
    batches = _batches(setup, cfg, 3)
    state = setup.init()
    up = setup.frozen["blocks"]["mlp"]["up"]["kernel"]
    P = jax.sharding.PartitionSpec
    if variant == "dora_nf4":  # quantised codes [L, D, F / block, block / 2] shard like the kernel they replace
        assert tuple(up.codes.sharding.spec[:2]) == (None, "fsdp") and tuple(up.scales.sharding.spec[:2]) == (None, "fsdp")
    else:
        assert up.sharding.spec == P(None, "fsdp", "tensor")
    assert state.params["blocks"]["mlp"]["up"]["b"].sharding.spec == P(None, None, "tensor")
    if variant == "dora_nf4":  # the magnitude [L, F] shards like the kernel's output axis
        assert state.params["blocks"]["mlp"]["up"]["magnitude"].sharding.spec == P(None, "tensor")
    if variant == "lora_plus":  # B's moments (their own masked Adam) shard like B
        b_adam = state.opt_state[1].inner_states["b"].inner_state[0]
        assert b_adam.mu["blocks"]["mlp"]["up"]["b"].sharding.spec == P(None, None, "tensor")
    # the reference: the same step, jitted without shardings, on one device
    one = jax.devices()[0]
    ref_state = jax.device_put(jax.tree.map(np.array, state), one)
    frozen = jax.device_put(jax.tree.map(np.array, setup.frozen), one)
    adapter = LoraAdapter(setup.lm, cfg.finetune.lora)
    ref_step = jax.jit(make_train_step(setup.lm, setup.tx, to_model=lambda p, f, r: adapter.apply(f, p, r)))
    losses, ref_losses = [], []
    with jax.set_mesh(setup.mesh):
        for b in batches:
            state, m = setup.train_step(state, setup.global_batch(b), setup.frozen)
            losses.append(float(m["loss"]))
    for b in batches:
        ref_state, rm = ref_step(ref_state, jax.device_put(b, one), frozen)
        ref_losses.append(float(rm["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(np.array, state.params), jax.tree.map(np.array, ref_state.params),
                                atol=1e-5, rtol=1e-4)


def test_dora_and_nf4_leaves_shard_like_the_kernels_they_adapt(base_and_data):
    """QDoRA on 8 devices (the default run's part of the slow 3-step comparison above): NF4 codes and scales, B and
    DoRA's magnitude shard along the kernel's axes."""
    base, data = base_and_data
    setup = setup_step(_finetune_cfg(base, data, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2",
                                     "finetune.lora.dora=true", "finetune.lora.quantize=nf4"))
    P = jax.sharding.PartitionSpec
    up = setup.frozen["blocks"]["mlp"]["up"]["kernel"]
    assert tuple(up.codes.sharding.spec[:2]) == (None, "fsdp") and tuple(up.scales.sharding.spec[:2]) == (None, "fsdp")
    params = setup.abstract_state.params["blocks"]["mlp"]["up"]
    assert params["b"].sharding.spec == P(None, None, "tensor")
    assert params["magnitude"].sharding.spec == P(None, "tensor")


def test_sft_rendering_weights_only_responses(tmp_path):
    tok = ByteTokenizer()
    enc = ChatEncoder(tok, DEFAULT_TEMPLATE, max_tokens=1000)
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok"}]
    ids, weights = enc(conv)
    assert ids[0] == tok.bos_id and ids.tolist().count(tok.eos_id) == 2
    trained = [(int(i), float(w)) for i, w in zip(ids, weights) if w > 0]
    assert bytes(i for i, _ in trained if i < 256) == b"yook" and sum(i == tok.eos_id for i, _ in trained) == 2
    # a Hugging Face-style (ChatML) template from a file, special tokens as text
    template = tmp_path / "chatml.jinja"
    template.write_text("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|eos|>\\n' }}"
                        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    enc = ChatEncoder(tok, template.read_text(), max_tokens=1000)
    ids, weights = enc([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert bytes(int(i) for i, w in zip(ids, weights) if w > 0 and i < 256) == b"b\n"
    # templates that do not extend their prefixes cannot locate responses: a clear error
    bad = ChatEncoder(tok, "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}", 1000)
    with pytest.raises(ConfigError, match="extension of its prefixes"):
        bad([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    # truncation to max_tokens is counted
    short = ChatEncoder(tok, DEFAULT_TEMPLATE, max_tokens=8)
    assert len(short(conv)[0]) == 8 and short.truncated == 1


def test_sft_bad_records_are_skipped_and_reported(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join([
        json.dumps({"prompt": "p", "response": "r"}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"text": "pretraining-style"}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
    ]))
    convs, report = read_conversations(f)
    assert len(convs) == 2 and report.skipped == 4
    assert any("no assistant message" in e for e in report.examples)
    assert any("role in" in e for e in report.examples)
    with pytest.raises(ConfigError, match="needs data.source to be a .jsonl"):
        load_corpus(load_config([], ["data.format=sft"]).data)


def test_finetune_cli_end_to_end_with_resume(base_and_data, tmp_path, capsys):
    base, data = base_and_data
    run = tmp_path / "run"
    args = ["finetune", "--base", str(base), "--config", "finetune/lora", f"data.source={data}", "data.seq_len=64",
            "train.batch_size=8", "train.eval_every=0", "train.log_every=2", "train.warmup_steps=1", f"checkpoint.run_dir={run}"]
    assert main(args + ["train.steps=4"]) == 0
    out = capsys.readouterr().out
    assert "trainable LoRA params" in out and "in peft format" in out
    adapter_bytes = (run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 0.2 * 4 * load_model(base).lm.num_params  # adapters alone: small
    assert main(args + ["train.steps=6"]) == 0
    assert "resuming from step 4" in capsys.readouterr().out
    merged = load_model(run)  # a finetune run loads as its merged model (generate, convert, eval)
    assert jax.tree.structure(merged.params) == jax.tree.structure(load_model(base).params)
    setup = setup_step(load_config([run / "config.yaml"]))
    restored = Checkpointer(run / "checkpoints", setup_cfg_checkpoint(run)).restore_latest(setup.abstract_state)
    tokens = np.arange(20).reshape(2, 10)
    apply = jax.jit(setup.lm.apply)  # the same architecture throughout
    adapted = apply(jax.jit(setup.method.adapter.apply)(setup.frozen, restored[1].params), tokens)
    np.testing.assert_allclose(apply(merged.params, tokens), adapted, atol=1e-5)
    assert main(["convert", str(run), str(tmp_path / "hf")]) == 0  # the merged model as a HF checkpoint
    lm, params, _ = load_hf_checkpoint(tmp_path / "hf")
    np.testing.assert_allclose(jax.jit(lm.apply)(params, tokens), adapted, atol=1e-5)
    assert main(["finetune", "--base", str(tmp_path / "nothing"), f"data.source={data}"]) == 2
    assert "neither a Hugging Face directory" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("finetune.method=qlora", "finetune.method='qlora' is not allowed; choose one of ['lora', 'full', 'mixlora'"),
    ("finetune.lora.init=svd", "finetune.lora.init='svd' is not allowed"),
    ("finetune.lora.quantize=int4", "finetune.lora.quantize='int4' is not allowed; choose one of ['none', 'int8', 'nf4']"),
    ("finetune.lora.dropout=1.0", "finetune.lora.dropout=1.0 must be within [0, 1)"),
    ("finetune.lora.rank=0", "finetune.lora.rank=0 must be > 0"),
    ("finetune.lora.targets=[]", "finetune.lora.targets is empty"),
    ("data.format=chat", "data.format='chat' is not allowed; choose one of ['text', 'sft']"),
])
def test_finetune_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(["finetune/lora"], [override])
    assert message in str(err.value)


def test_execution_knobs_may_differ_from_the_base_but_not_the_architecture(base_and_data):
    """How the base runs (remat, loss chunks, attention kernel, compute dtype) is the run's choice; what it
    computes (its architecture) must be the base's."""
    base, data = base_and_data
    setup = setup_step(_finetune_cfg(base, data, "model.remat=none", "model.loss_chunk_tokens=64",
                                     "model.attention.impl=xla", "model.scan_layers=false"))
    assert (setup.lm.cfg.remat, setup.lm.cfg.loss_chunk_tokens, setup.lm.cfg.scan_layers) == ("none", 64, False)
    with pytest.raises(ConfigError, match="model config differs from finetune.base"):
        setup_step(_finetune_cfg(base, data, "model.mlp.d_ff=96"))
