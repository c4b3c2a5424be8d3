"""Supervised fine-tuning examples: jsonl of {"prompt", "response"} or chat {"messages": [{role, content}]},
rendered with a chat template, tokenized with a per-token loss weight of 1 on assistant tokens only.

Templates are Jinja, rendered in a sandbox as Hugging Face does (`messages`, `add_generation_prompt`,
`bos_token`, `eos_token`); the tokenizer's own template (tokenizer_config.json) is used when it has one.
The text an assistant turn adds is found by rendering the conversation up to that turn twice, with and
without the turn: the template must render each conversation as an extension of its prefixes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import ConfigError
from jaxllm.data.sources import ReadReport
from jaxllm.data.tokenizer import Tokenizer

# Used when neither data.chat_template nor the tokenizer gives one.
DEFAULT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")
Conversation = list[dict[str, str]]


def read_conversations(source: str | Path) -> tuple[list[Conversation], ReadReport]:
    """Conversations from a jsonl file (or a directory of them); bad lines are skipped and reported."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"data.source={str(source)!r} does not exist; data.format=sft needs a .jsonl file")
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".jsonl" for f in files):
        raise ConfigError(f"data.format=sft reads .jsonl files; got {str(source)!r}")
    report, convs = ReadReport(), []
    for f in files:
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines()):
            if not line.strip():
                continue
            where = f"{f.name}:{i + 1}"
            try:
                conv = to_conversation(json.loads(line))
            except (json.JSONDecodeError, ValueError) as err:
                report.skip(where, str(err)[:120])
                continue
            convs.append(conv)
            report.documents += 1
    if not convs:
        raise ConfigError(f"data.source={str(source)!r} holds no usable examples ({report.skipped} skipped: "
                          f"{report.examples[:3]})")
    return convs, report


def to_conversation(record: Any) -> Conversation:
    """A training record as a list of {role, content} messages with an assistant turn to learn from, or
    ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "messages" in record:
        conv = to_messages(record["messages"])
        if not any(m["role"] == "assistant" for m in conv):
            raise ValueError("no assistant message to learn from")
        return conv
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    raise ValueError("needs 'messages' or string 'prompt' and 'response' fields")


def to_messages(msgs: Any) -> Conversation:
    """A non-empty list of {role, content} messages (roles in ROLES, string content), or ValueError."""
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs a role in {list(ROLES)} and string content")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


@dataclass
class ChatEncoder:
    """conversation -> (token ids [n] int32, loss weights [n] f32: 1 where the token is an assistant token).

    The whole conversation is rendered and tokenized at once, so the ids are transformers'
    `apply_chat_template(messages, tokenize=True)`; a token is an assistant token when it starts inside
    the text an assistant turn adds. `max_tokens` truncates longer examples (counted in `truncated`).
    """

    tokenizer: Tokenizer
    template: str
    max_tokens: int
    truncated: int = 0

    def __post_init__(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(self.template)

    def render(self, messages: Conversation, add_generation_prompt: bool = False) -> str:
        tok = self.tokenizer
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=tok.special_text(tok.bos_id), eos_token=tok.special_text(tok.eos_id))

    def prompt_ids(self, messages: Conversation) -> list[int]:
        """Tokens that ask the model for the next assistant turn (the template's generation prompt)."""
        return self.tokenizer.encode_with_offsets(self.render(messages, add_generation_prompt=True))[0]

    def __call__(self, conv: Conversation) -> tuple[np.ndarray, np.ndarray]:
        spans: list[tuple[int, int]] = []  # character ranges the assistant turns add to the rendering
        done = ""
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            prefix, full = self.render(conv[:i], add_generation_prompt=True), self.render(conv[: i + 1])
            if not prefix.startswith(done) or not full.startswith(prefix):
                raise ConfigError("the chat template does not render a conversation as an extension of its "
                                  "prefixes, so response tokens cannot be located; use another data.chat_template")
            spans.append((len(prefix), len(full)))
            done = full
        ids, starts = self.tokenizer.encode_with_offsets(self.render(conv))
        weights = [float(any(a <= s < b for a, b in spans)) for s in starts]
        if len(ids) > self.max_tokens:
            self.truncated += 1
            ids, weights = ids[: self.max_tokens], weights[: self.max_tokens]
        return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def load_template(path: str, tokenizer: Tokenizer) -> str:
    """data.chat_template (a file) if given, else the tokenizer's template, else DEFAULT_TEMPLATE."""
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"data.chat_template={path!r} does not exist")
        return p.read_text()
    return getattr(tokenizer, "chat_template", None) or DEFAULT_TEMPLATE
