"""KV-cache decoding == recomputing the full forward; sampling options; length errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS, tiny_model

from jaxllm.config import AttentionConfig, ConfigError
from jaxllm.generate import Sampling, _pad_prompts, generate, sample_token, stream
from jaxllm.language_model import LanguageModel

TOL = dict(atol=1e-4, rtol=1e-4)  # f32: cached and full attention sum in different orders


# MHA and MQA are GQA with other head groupings (swept by the kernel tests), and QK-norm / softcap are the functions
# the uncached forward runs (tests/test_model.py): in the slow set
@pytest.mark.parametrize("name", ["gqa", "sliding_window", "gpt2_style", *(
    pytest.param(n, marks=pytest.mark.slow) for n in ("mha", "mqa", "qk_norm_softcap"))])
def test_kv_cache_decoding_equals_full_recompute(name):
    """Prefill two left-padded prompts, feed 8 tokens one by one through the cache; every step's
    logits equal a full forward over the whole (padded) sequence so far."""
    variant = VARIANTS[name]
    lm = LanguageModel(variant)
    params = lm.init(jax.random.key(0))
    p = _pad_prompts([[1, 5, 9, 4, 7], [1, 8, 3]], pad_id=0)
    new = np.random.default_rng(0).integers(0, variant.vocab_size, (2, 8)).astype(np.int32)
    from jaxllm.models.kv_cache import cache_length

    # sliding window 4: a 5-slot ring, so decoding overwrites the oldest slots
    slots = cache_length(p.tokens.shape[1], new.shape[1], variant.attention.sliding_window)
    assert slots == (5 if variant.attention.sliding_window else 13)
    cache = lm.init_cache(2, slots)
    apply_cached = jax.jit(lm.apply_cached)
    logits, cache = apply_cached(params, p.tokens, p.positions, p.segment_ids, cache)
    tokens, positions, segs = p.tokens, p.positions, p.segment_ids
    full = jax.jit(lm.apply)
    real = segs.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full(params, tokens, positions, segs))[real], **TOL)
    for i in range(new.shape[1]):
        pos = positions[:, -1:] + 1
        tokens = np.concatenate([tokens, new[:, i : i + 1]], 1)
        positions = np.concatenate([positions, pos], 1)
        segs = np.concatenate([segs, np.ones((2, 1), np.int32)], 1)
        step_logits, cache = apply_cached(params, new[:, i : i + 1], pos, np.ones((2, 1), np.int32), cache)
        np.testing.assert_allclose(step_logits[:, 0], full(params, tokens, positions, segs)[:, -1], **TOL)
    assert int(cache.index) == tokens.shape[1]


def test_generate_and_stream_agree_and_stop_tokens_trim():
    lm = LanguageModel(tiny_model(attention=AttentionConfig(sliding_window=6)))
    params = lm.init(jax.random.key(1))
    prompts = [[1, 5, 9], [1, 7]]
    greedy = generate(lm, params, prompts, 12)
    assert [len(g) for g in greedy] == [12, 12]
    streamed = np.stack(list(stream(lm, params, prompts, 12))).T.tolist()
    assert streamed == greedy
    stop = greedy[0][4]
    trimmed = generate(lm, params, prompts, 12, stop_ids=(stop,))
    assert trimmed[0] == greedy[0][: greedy[0].index(stop)]
    assert len(list(stream(lm, params, [prompts[0]], 12, stop_ids=(stop,)))) == greedy[0].index(stop) + 1


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)
    draw = lambda s: np.array([int(sample_token(logits, k, s)[0]) for k in keys])
    assert set(draw(Sampling())) == {0}
    assert set(draw(Sampling(temperature=1.0, top_k=1))) == {0}
    assert set(draw(Sampling(temperature=1.0, top_k=2))) == {0, 1}
    assert set(draw(Sampling(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draw(Sampling(temperature=1.0, top_p=0.4))) == {0}
    free = draw(Sampling(temperature=1.0))
    assert set(free) == {0, 1, 2, 3} and abs(np.mean(free == 0) - 0.5) < 0.12


def test_sampled_generation_is_reproducible_by_seed():
    lm = LanguageModel(tiny_model())
    params = lm.init(jax.random.key(2))
    s = Sampling(temperature=1.0, top_k=20)
    a = generate(lm, params, [[1, 2, 3]], 16, s, seed=3)
    assert a == generate(lm, params, [[1, 2, 3]], 16, s, seed=3)
    assert a != generate(lm, params, [[1, 2, 3]], 16, s, seed=4)


def test_too_long_generation_is_a_clear_error():
    lm = LanguageModel(tiny_model())  # max_seq_len 64
    params = lm.init(jax.random.key(0))
    with pytest.raises(ConfigError, match=r"prompt \(3 tokens\) \+ max_new_tokens \(62\) exceeds model.max_seq_len=64"):
        generate(lm, params, [[1, 2, 3]], 62)
    with pytest.raises(ValueError, match="at least one token"):
        generate(lm, params, [[]], 4)


def test_ring_writes_wrap_around_the_end():
    from jaxllm.models.kv_cache import write_slots

    buf = jnp.zeros((1, 5), jnp.int32)
    for index, expected in ((0, [1, 2, 3, 0, 0]), (3, [3, 0, 0, 1, 2]), (4, [2, 3, 0, 0, 1])):
        slots = (index + jnp.arange(3)) % 5
        np.testing.assert_array_equal(jax.jit(write_slots)(buf, slots, jnp.array([[1, 2, 3]]))[0], expected)
    np.testing.assert_array_equal(write_slots(buf, jnp.array([4]), jnp.array([[9]]))[0], [0, 0, 0, 0, 9])


# the full-attention case also runs end to end in test_cli (`jaxllm generate --prefill-chunk 2`)
@pytest.mark.parametrize("window", [pytest.param(None, marks=pytest.mark.slow), 4], ids=["full", "window4"])
def test_chunked_prefill_continues_as_a_full_forward_does(window):
    """Prompts of 15 and 9 tokens fed 4 at a time (the 3-token remainder first): the greedy continuation equals the
    argmax of a full forward recomputed over the whole sequence at every step (no cache), for `generate` and
    `stream`; with a window of 4 the cache holds window + chunk - 1 = 7 slots, fewer than the prompt."""
    from jaxllm.models.kv_cache import cache_length

    lm = LanguageModel(tiny_model(attention=AttentionConfig(sliding_window=window)))
    params = lm.init(jax.random.key(3))
    attn = params["blocks"]["attn"]  # sharp attention, so a key lost from the ring changes the tokens
    params = {**params, "blocks": {**params["blocks"], "attn": {
        **attn, "q": {"kernel": attn["q"]["kernel"] * 20}, "k": {"kernel": attn["k"]["kernel"] * 20}}}}
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 97, 15).tolist(), rng.integers(3, 97, 9).tolist()]
    p = _pad_prompts(prompts, pad_id=0)
    tokens, positions, segs = p.tokens, p.positions, p.segment_ids
    full = jax.jit(lm.apply)
    want = []
    for _ in range(6):
        nxt = np.argmax(np.asarray(full(params, tokens, positions, segs))[:, -1], axis=-1).astype(np.int32)
        want.append(nxt)
        tokens = np.concatenate([tokens, nxt[:, None]], 1)
        positions = np.concatenate([positions, positions[:, -1:] + 1], 1)
        segs = np.concatenate([segs, np.ones((2, 1), np.int32)], 1)
    want = np.stack(want, 1).tolist()
    assert generate(lm, params, prompts, 6, prefill_chunk=4) == want
    assert np.stack(list(stream(lm, params, prompts, 6, prefill_chunk=4)), 1).tolist() == want
    assert generate(lm, params, prompts, 6) == want  # the unchunked prefill agrees
    assert cache_length(15, 6, window, prefill_chunk=4) == (7 if window else 21)
    with pytest.raises(ConfigError, match="prefill_chunk=-1 must be >= 0"):
        generate(lm, params, prompts, 6, prefill_chunk=-1)


def test_ffn_skip_decoding_is_the_model_without_the_skipped_ffns():
    """FFN-SkipLLM's step: above a cosine of 1 nothing skips (the logits are `apply_cached`'s bitwise); at 0 every
    unprotected layer skips, which equals the model with those layers' FFN output zeroed (down = 0), at batch 2
    (jnp.where) and batch 1 (lax.cond); protected layers and warm-up steps never skip."""
    import dataclasses

    from jaxllm.models.ffn_skip import FfnSkip

    lm = LanguageModel(dataclasses.replace(tiny_model(), num_layers=6))
    params = lm.init(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 97, (2, 8))

    def step(p, b, skip=None):  # the prompt through the whole model, then one token through `p`
        cache = lm.init_cache(b, 16)
        pos = jnp.broadcast_to(jnp.arange(8), (b, 8))
        _, cache = jax.jit(lm.apply_cached)(params, tokens[:b], pos, jnp.ones((b, 8), jnp.int32), cache)
        args = (p, tokens[:b, -1:], pos[:, -1:] + 1, jnp.ones((b, 1), jnp.int32), cache)
        return jax.jit(lm.apply_cached)(*args)[0] if skip is None else jax.jit(lm.apply_cached_skipping)(*args, skip)

    plain = step(params, 2)
    logits, _, skipped = step(params, 2, FfnSkip(jnp.bool_(True), 1.5))
    assert np.array_equal(np.asarray(logits), np.asarray(plain)) and not np.asarray(skipped).any()
    _, _, skipped = step(params, 2, FfnSkip(jnp.bool_(False), 0.0))  # warm-up: nothing skips
    assert not np.asarray(skipped).any()
    down = params["blocks"]["mlp"]["down"]["kernel"]
    without = {**params, "blocks": {**params["blocks"], "mlp": {**params["blocks"]["mlp"], "down": {
        "kernel": down.at[2:4].set(0.0)}}}}
    for b in (2, 1):
        logits, _, skipped = step(params, b, FfnSkip(jnp.bool_(True), -1.0, protect_first=2, protect_last=2))
        assert np.asarray(skipped)[:, 0].tolist() == [False, False, True, True, False, False]
        np.testing.assert_allclose(np.asarray(logits), np.asarray(step(without, b)), atol=1e-5)


def test_a_skipped_ffn_reads_none_of_its_weights():
    """At batch 1 the skip is a `lax.cond` whose FFN branch indexes the layer's FFN weights out of the whole stack
    itself: no one-layer slice of an FFN weight is made before the branch (XLA copies such a slice before its dot, so
    a skipped FFN would move as many bytes as a computed one)."""
    import jax.extend

    from jaxllm.models.ffn_skip import FfnSkip

    lm = LanguageModel(tiny_model())
    params = lm.init(jax.random.key(0))
    cache = lm.init_cache(1, 16)
    one = jnp.ones((1, 1), jnp.int32)
    jaxpr = jax.make_jaxpr(lm.apply_cached_skipping)(params, one, one, one, cache, FfnSkip(jnp.bool_(True), 0.5))
    up = params["blocks"]["mlp"]["up"]["kernel"]  # [L, D, F]

    def equations(jx):
        for eqn in jx.eqns:
            yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from equations(sub)

    conds = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == "cond"]
    assert len(conds) == 1
    shapes = [tuple(v.aval.shape) for v in conds[0].invars]
    assert up.shape in shapes and up.shape[1:] not in shapes, shapes


def test_generate_with_ffn_skip_never_skipping_equals_generate_and_counts_what_it_skips(tmp_path, capsys):
    """`generate(..., ffn_skip=)` above 1 gives `generate`'s tokens and skips nothing; at -1 every unprotected layer
    skips after the warm-up tokens (counted exactly); `jaxllm generate --ffn-skip` prints the share."""
    import dataclasses

    from jaxllm.generate import FfnSkipping

    lm = LanguageModel(dataclasses.replace(tiny_model(), num_layers=4))
    params = lm.init(jax.random.key(0))
    prompts = [[1, 5, 9, 3], [1, 7]]
    plain = generate(lm, params, prompts, 10)
    never = FfnSkipping(1.5)
    assert generate(lm, params, prompts, 10, ffn_skip=never) == plain
    assert never.counts == {"skipped": 0, "possible": 9 * 4 * 2}  # 9 decode steps x 4 layers x 2 rows
    always = FfnSkipping(-1.0, warmup=4, protect=1)
    generate(lm, params, prompts, 10, ffn_skip=always)
    assert always.counts["skipped"] == (9 - 3) * 2 * 2  # steps from the 4th new token, layers 1 and 2, 2 rows


def test_cli_generate_ffn_skip_prints_the_share_it_skipped(base_and_data, capsys):
    from jaxllm.cli import main

    base, _ = base_and_data  # (a threshold above 1 generating what `generate` does: the test above)
    assert main(["generate", "--model", str(base), "--prompt", "|abc", "--max-new-tokens", "8", "--ffn-skip", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("|abc") and "FFN-Skip: skipped 0% of 14 layer FFNs" in out.err  # 7 steps x 2 layers
