"""Generation as pure jitted functions over an explicit KV cache.

    out = generate(lm, params, [[1, 5, 9], [1, 7]], max_new_tokens=20)           # greedy
    out = generate(lm, params, prompts, 50, Sampling(temperature=0.8, top_p=0.9), stop_ids=(2,))
    for token_ids in stream(lm, params, prompts, 50): ...                        # one step at a time

Prompts of different lengths are left-padded (segment 0) so every row's last prompt token sits at
the same cache slot; positions count real tokens only. Sliding-window models keep a bounded cache of
max(prompt, window) slots, reused as a ring (window + chunk - 1 with a chunked prefill). `prefill_chunk=N` feeds a
long prompt N tokens at a time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ConfigError
from jaxllm.language_model import LanguageModel, Params
from jaxllm.models.ffn_skip import FfnSkip
from jaxllm.models.kv_cache import KVCache, cache_length


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def sample_token(logits_BV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """Next token ids [B] from logits [B, V] under `s` (filters applied to the tempered distribution)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if s.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(logits_BV, s.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    if s.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, jnp.sum(cum_BV < s.top_p, axis=-1, keepdims=True), axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV).astype(jnp.int32)


@dataclass
class _Prompts:
    tokens: np.ndarray  # [B, P] left-padded
    positions: np.ndarray
    segment_ids: np.ndarray


def _pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> _Prompts:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    P = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    seg = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) :] = p
        seg[i, P - len(p) :] = 1
    positions = np.clip(np.cumsum(seg, axis=1) - 1, 0, None).astype(np.int32)
    return _Prompts(tokens, positions, seg)


@partial(jax.jit, static_argnames=("lm", "cache_len", "sampling", "chunk"))
def prefill(lm: LanguageModel, params: Params, tokens, positions, segment_ids, key, *, cache_len: int, sampling: Sampling,
            chunk: int = 0):
    """Run the prompts [B, P] into a fresh cache; returns (cache, first new token [B], last positions [B]).

    With `chunk` > 0 the prompt goes in `chunk` tokens at a time (the remainder first), each chunk attending to
    the cache: activations and attention scores are those of [B, chunk] tokens, not [B, P]."""
    cache = lm.init_cache(tokens.shape[0], cache_len)
    P = tokens.shape[1]
    first = P % chunk if chunk and P > chunk else P  # the part that goes in at once
    logits, cache = lm.apply_cached(params, tokens[:, :first], positions[:, :first], segment_ids[:, :first], cache)
    last_BV = logits[:, -1]
    if first < P:
        as_chunks = lambda x: x[:, first:].reshape(x.shape[0], -1, chunk).swapaxes(0, 1)  # [n, B, chunk]

        def one(cache, xs):
            logits, cache = lm.apply_cached(params, *xs, cache)
            return cache, logits[:, -1]

        chunks = (as_chunks(tokens), as_chunks(positions), as_chunks(segment_ids))
        cache, lasts = jax.lax.scan(one, cache, chunks)  # lasts: [chunks, B, V]
        last_BV = lasts[-1]
    return cache, sample_token(last_BV, key, sampling), positions[:, -1]


@partial(jax.jit, static_argnames=("lm", "sampling"), donate_argnames=("cache",))
def decode_step(lm: LanguageModel, params: Params, cache: KVCache, token_B, position_B, key, *, sampling: Sampling):
    """Feed one token per row at `position_B`; returns (cache, next token [B])."""
    ones = jnp.ones_like(token_B)[:, None]
    logits, cache = lm.apply_cached(params, token_B[:, None], position_B[:, None], ones, cache)
    return cache, sample_token(logits[:, 0], key, sampling)


@dataclass(frozen=True)
class FfnSkipping:
    """FFN-SkipLLM while decoding (`jaxllm.models.ffn_skip`): skip a layer's FFN for a token when the last FFN that ran
    turned its residual by a cosine >= `threshold` (above 1: never), after `warmup` new tokens, outside the first and
    last `protect` layers. `stream` counts what it skipped in `skipped` / `possible` (layer-token FFN calls)."""

    threshold: float
    warmup: int = 4
    protect: int = 1
    counts: dict = dataclasses.field(default_factory=lambda: {"skipped": 0, "possible": 0}, compare=False, hash=False)

    @property
    def skipped_fraction(self) -> float:
        return self.counts["skipped"] / max(self.counts["possible"], 1)


@partial(jax.jit, static_argnames=("lm", "sampling", "threshold", "protect"), donate_argnames=("cache",))
def decode_step_skipping(lm: LanguageModel, params: Params, cache: KVCache, token_B, position_B, key, active, *,
                         sampling: Sampling, threshold: float, protect: int):
    """`decode_step` with FFN skipping: (cache, next token [B], number of FFNs skipped)."""
    ones = jnp.ones_like(token_B)[:, None]
    skip = FfnSkip(jnp.asarray(active), threshold, protect, protect)
    logits, cache, skipped_LB = lm.apply_cached_skipping(params, token_B[:, None], position_B[:, None], ones, cache, skip)
    return cache, sample_token(logits[:, 0], key, sampling), jnp.sum(skipped_LB)


def _cache_length(lm: LanguageModel, prompt_len: int, max_new_tokens: int, chunk: int) -> int:
    """Cache slots for a request; a ConfigError if it would run past the model's positions."""
    if prompt_len + max_new_tokens > lm.cfg.max_seq_len:
        raise ConfigError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"model.max_seq_len={lm.cfg.max_seq_len}"
        )
    if chunk < 0:
        raise ConfigError(f"prefill_chunk={chunk} must be >= 0 (0: the whole prompt at once)")
    return cache_length(prompt_len, max_new_tokens, lm.cfg.attention.sliding_window, chunk)


@partial(jax.jit, static_argnames=("lm", "max_new_tokens", "cache_len", "sampling", "stop_ids", "pad_id", "chunk"))
def _generate(lm, params, tokens, positions, segment_ids, key, *, max_new_tokens, cache_len, sampling, stop_ids,
              pad_id, chunk):
    key, sub = jax.random.split(key)
    (pre_lm, pre_params), (dec_lm, dec_params) = _prefill_and_decode_models(lm, params, (tokens.shape[0], chunk or tokens.shape[1]))
    cache, first, last_pos = prefill(pre_lm, pre_params, tokens, positions, segment_ids, sub,
                                     cache_len=cache_len, sampling=sampling, chunk=chunk)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
    out = jnp.full((tokens.shape[0], max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stops)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, token, pos, done, out, key = carry
        key, sub = jax.random.split(key)
        cache, nxt = decode_step(dec_lm, dec_params, cache, token, pos + 1, sub, sampling=sampling)
        nxt = jnp.where(done, pad_id, nxt)
        return i + 1, cache, nxt, pos + 1, done | jnp.isin(nxt, stops), out.at[:, i].set(nxt), key

    carry = (jnp.int32(1), cache, first, last_pos, done, out, key)
    return jax.lax.while_loop(cond, body, carry)[5]


def _prefill_and_decode_models(lm: LanguageModel, params: Params, prompt_shape: tuple[int, int]):
    """((model, params) for the prefill of [B, P] prompts, (model, params) for decoding B tokens a step).

    Structured FFNs have no nonlinearity between their factors: with at most `mlp.merge_below_tokens`
    tokens in flight the merged dense maps run instead (measured default 0: never, on CPU)."""

    def pick(tokens_in_flight: int) -> tuple[LanguageModel, Params]:
        if lm.cfg.mlp.structure == "dense" or tokens_in_flight > lm.cfg.mlp.merge_below_tokens:
            return lm, params
        return lm.merged_model, lm.merge_params(params)

    return pick(prompt_shape[0] * prompt_shape[1]), pick(prompt_shape[0])


def _prepare(lm: LanguageModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, chunk: int):
    """Left-padded prompts and the cache length for a request (errors before anything compiles)."""
    p = _pad_prompts(prompts, pad_id)
    return p, _cache_length(lm, p.tokens.shape[1], max_new_tokens, chunk)


def _trim(row: Sequence[int], stop_ids: tuple[int, ...], length: int) -> list[int]:
    row = [int(t) for t in row[:length]]
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[:i]
    return row


def generate(
    lm: LanguageModel,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    seed: int = 0,
    prefill_chunk: int = 0,
    ffn_skip: FfnSkipping | None = None,
) -> list[list[int]]:
    """New token ids per prompt (stop token excluded), prefill + `lax.while_loop` decode, one jit.
    `prefill_chunk` > 0: the prompt goes into the cache that many tokens at a time (long prompts). With `ffn_skip`
    the tokens come from `stream`'s loop (its counts are filled in)."""
    if ffn_skip is not None:
        rows = np.stack(list(stream(lm, params, prompts, max_new_tokens, sampling, stop_ids=stop_ids, pad_id=pad_id,
                                    seed=seed, prefill_chunk=prefill_chunk, ffn_skip=ffn_skip)), axis=1)
        return [_trim(row, tuple(stop_ids), max_new_tokens) for row in rows]
    p, cache_len = _prepare(lm, prompts, max_new_tokens, pad_id, prefill_chunk)
    out = _generate(lm, params, p.tokens, p.positions, p.segment_ids, jax.random.key(seed),
                    max_new_tokens=max_new_tokens, cache_len=cache_len, sampling=sampling,
                    stop_ids=tuple(stop_ids), pad_id=pad_id, chunk=prefill_chunk)
    return [_trim(row, tuple(stop_ids), max_new_tokens) for row in np.asarray(out)]


def stream(
    lm: LanguageModel,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    seed: int = 0,
    prefill_chunk: int = 0,
    ffn_skip: FfnSkipping | None = None,
) -> Iterator[np.ndarray]:
    """Yield the next token of every row [B] as it is decoded (same jitted steps as `generate`);
    stops when every row has produced a stop token or after max_new_tokens."""
    p, cache_len = _prepare(lm, prompts, max_new_tokens, pad_id, prefill_chunk)
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    in_flight = (p.tokens.shape[0], prefill_chunk or p.tokens.shape[1])
    (pre_lm, pre_params), (dec_lm, dec_params) = _prefill_and_decode_models(lm, params, in_flight)
    cache, token, pos = prefill(pre_lm, pre_params, p.tokens, p.positions, p.segment_ids, sub,
                                cache_len=cache_len, sampling=sampling, chunk=prefill_chunk)
    done = np.zeros(len(prompts), bool)
    for i in range(max_new_tokens):
        tok = np.where(done, pad_id, np.asarray(token))
        yield tok
        done |= np.isin(tok, list(stop_ids))
        if done.all() or i + 1 == max_new_tokens:
            return
        key, sub = jax.random.split(key)
        pos = pos + 1
        if ffn_skip is None:
            cache, token = decode_step(dec_lm, dec_params, cache, jnp.asarray(tok), pos, sub, sampling=sampling)
            continue
        cache, token, skipped = decode_step_skipping(
            dec_lm, dec_params, cache, jnp.asarray(tok), pos, sub, i + 1 >= ffn_skip.warmup, sampling=sampling,
            threshold=ffn_skip.threshold, protect=ffn_skip.protect)
        ffn_skip.counts["skipped"] += int(skipped)
        ffn_skip.counts["possible"] += lm.cfg.num_layers * len(prompts)
