"""An EleutherAI `lm-eval` model backed by a jaxllm model (Hugging Face or jaxllm run directory).

    import lm_eval, jaxllm.interop.lm_eval_adapter   # registers model name "jaxllm"
    lm_eval.simple_evaluate(model="jaxllm", model_args="pretrained=runs/xyz", tasks=[...])
    # a peft LoRA adapter on a Hugging Face base: model_args="pretrained=HF_DIR,adapter=PEFT_DIR"

Scoring pads each request to a multiple of `bucket` tokens, so a handful of shapes are compiled.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from jaxllm.generate import Sampling, generate
from jaxllm.interop.models import load_model


@register_model("jaxllm")
class JaxLLMEvalModel(LM):
    def __init__(self, pretrained: str, max_length: int | None = None, bucket: int = 64, adapter: str | None = None,
                 **_: Any):
        super().__init__()
        loaded = load_model(pretrained, adapter)
        if loaded.tokenizer is None:
            raise ValueError(f"{pretrained} has no tokenizer: lm-eval needs text in and out")
        self.lm, self.params, self.tok = loaded.lm, loaded.params, loaded.tokenizer
        self.max_length = min(max_length or self.lm.cfg.max_seq_len, self.lm.cfg.max_seq_len)
        self.bucket = bucket
        self._log_probs = jax.jit(self._token_log_probs)

    def _token_log_probs(self, params, tokens_1T, targets_1T):
        """log p(targets) and whether each target is the argmax: [1, T] each."""
        logits = self.lm.apply(params, tokens_1T).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, targets_1T[..., None], axis=-1)[..., 0]
        return picked, jnp.argmax(logits, axis=-1) == targets_1T

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = (context + continuation)[-(self.max_length + 1) :]
        n = len(continuation)
        inputs, targets = ids[:-1], ids[1:]
        T = -(-len(inputs) // self.bucket) * self.bucket
        pad = lambda x: np.asarray([x + [0] * (T - len(x))], np.int32)
        logp, greedy = self._log_probs(self.params, pad(inputs), pad(targets))
        sl = slice(len(inputs) - n, len(inputs))
        return float(np.sum(np.asarray(logp)[0, sl])), bool(np.all(np.asarray(greedy)[0, sl]))

    def _context_ids(self, text: str) -> list[int]:
        """Text as transformers tokenizes it: with the tokenizer's own special tokens (BOS or none)."""
        return self.tok.encode(text, add_special_tokens=True)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), is the continuation the greedy one) per request."""
        return [self._score(self._context_ids(ctx), self.tok.encode(cont)) for ctx, cont in (r.args for r in requests)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of whole texts, in windows of max_length tokens."""
        out = []
        for (text,) in (r.args for r in requests):
            ids, total = self._context_ids(text), 0.0
            for start in range(1, len(ids), self.max_length):
                total += self._score(ids[max(0, start - self.max_length) : start], ids[start : start + self.max_length])[0]
            out.append(total)
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for context, kwargs in (r.args for r in requests):
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self._context_ids(context)
            new = min(int(kwargs.get("max_gen_toks", 64)), self.lm.cfg.max_seq_len - len(ids))
            sampling = Sampling(temperature=float(kwargs.get("temperature", 0.0)))
            text = self.tok.decode(generate(self.lm, self.params, [ids], new, sampling, stop_ids=self.tok.stop_ids)[0])
            cut = min([text.find(u) for u in until if u in text], default=len(text))
            out.append(text[:cut])
        return out
