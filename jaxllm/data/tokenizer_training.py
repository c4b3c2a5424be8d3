"""Train a byte-level BPE tokenizer on a corpus with Hugging Face `tokenizers` (as GPT-2 / Llama-3 style).

The directory written holds `tokenizer.json` (byte-level pre-tokenizer and decoder, so any text round-trips;
a post-processor that adds BOS, the Llama rule) and `tokenizer_config.json` naming <s>, </s> and <pad>:
`data.tokenizer=DIR` uses it, and transformers' AutoTokenizer loads it the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

SPECIALS = ("<pad>", "<s>", "</s>")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *, min_frequency: int = 2,
                    show_progress: bool = False) -> Path:
    """Learn `vocab_size` tokens (256 bytes + 3 specials + merges) from `texts`; returns the tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from jaxllm.config import ConfigError

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIALS):
        raise ConfigError(f"--vocab-size {vocab_size} is below the {len(alphabet)} byte tokens + {len(SPECIALS)} "
                          "special tokens a byte-level BPE needs")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                  initial_alphabet=alphabet, show_progress=show_progress)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"},
        indent=2))
    return out / "tokenizer.json"
