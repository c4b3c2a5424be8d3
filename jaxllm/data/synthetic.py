"""The built-in corpus: a synthetic language whose per-token entropy is known exactly.

A document is a run of segments, each a marker character and `SEGMENT_LEN` letters:
  '|' + fresh letters: a random first letter (of 32), then each letter followed by one of its 4
       allowed successors, uniformly (a fixed random transition table);
  '#' + a copy of the previous segment's letters: predictable only by attending back.
The first segment is always fresh; later ones are fresh or copies with probability 1/2.
Fresh segments carry ln 32 + 15 ln 4 nats, markers ln 2, the end of a document its hazard;
`entropy_floor` gives the exact expected loss per token, which a perfect model reaches.
A model with broken attention or masking cannot predict the copies and stays above it.
"""

from __future__ import annotations

import functools
import math

import numpy as np

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEF"  # 32 letters, one byte each
SUCCESSORS = 4
SEGMENT_LEN = 16
FRESH, COPY = "|", "#"
MIN_SEGMENTS, MAX_SEGMENTS = 2, 12


def transition_table(seed: int = 1234) -> np.ndarray:
    """[32, 4] indices: the letters allowed to follow each letter (the 'grammar', fixed by seed)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(len(ALPHABET), SUCCESSORS, replace=False) for _ in ALPHABET])


def generate_documents(num_docs: int, seed: int = 0, grammar_seed: int = 1234) -> list[str]:
    """`num_docs` documents of MIN_SEGMENTS..MAX_SEGMENTS segments each (deterministic in seed)."""
    return list(_documents(num_docs, seed, grammar_seed))


@functools.lru_cache(maxsize=4)  # 20,000 documents take seconds to draw; a process that trains twice draws them once
def _documents(num_docs: int, seed: int, grammar_seed: int) -> tuple[str, ...]:
    table = transition_table(grammar_seed)
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(MIN_SEGMENTS, MAX_SEGMENTS + 1))
        parts, prev = [], ""
        for i in range(n):
            if i > 0 and rng.random() < 0.5:
                parts.append(COPY + prev)
                continue
            letters = [int(rng.integers(len(ALPHABET)))]
            for _ in range(SEGMENT_LEN - 1):
                letters.append(int(table[letters[-1], rng.integers(SUCCESSORS)]))
            prev = "".join(ALPHABET[j] for j in letters)
            parts.append(FRESH + prev)
        docs.append("".join(parts))
    return tuple(docs)


def document_entropy(doc: str, grammar_seed: int = 1234) -> tuple[float, int]:
    """(nats, targets): -log p of a document's BOS+text+EOS targets under the true process.

    Summed over the held-out documents this is the exact loss of a perfect model on them.
    """
    table = transition_table(grammar_seed)
    letters = {c: i for i, c in enumerate(ALPHABET)}
    seg = SEGMENT_LEN + 1
    n = len(doc) // seg
    nats = 0.0
    for k in range(n):  # the boundary before segment k, then its letters
        if k >= MIN_SEGMENTS:
            nats -= math.log(1 - 1 / (MAX_SEGMENTS - k + 1))  # not EOS: P(n > k | n >= k)
        if k > 0:
            nats += math.log(2)  # fresh or copy
        body = doc[k * seg + 1 : (k + 1) * seg]
        if doc[k * seg] == FRESH:
            nats += math.log(len(ALPHABET))
            for a, b in zip(body, body[1:]):
                if letters[b] not in table[letters[a]]:
                    raise ValueError(f"{a!r} -> {b!r} is not in the grammar")
                nats += math.log(SUCCESSORS)
        elif body != doc[(k - 1) * seg + 1 : k * seg]:
            raise ValueError(f"segment {k} is marked as a copy but differs from the previous one")
    if n < MAX_SEGMENTS:
        nats += math.log(MAX_SEGMENTS - n + 1)  # EOS: P(n = k | n >= k)
    return nats, len(doc) + 1


def entropy_floor() -> float:
    """Expected loss (nats per predicted token) of the ideal model on this corpus, byte tokens.

    Documents are tokenized as BOS + characters + EOS, so a document of n segments has
    n * (SEGMENT_LEN + 1) + 1 targets. At the boundary after segment k the ideal model predicts
    EOS with the hazard q_k = P(n = k | n >= k), else a marker ('|' or '#', 1/2 each once k >= 1).
    Averaged as the trainer does, over all tokens: E[entropy] / E[targets].
    """
    fresh = math.log(len(ALPHABET)) + (SEGMENT_LEN - 1) * math.log(SUCCESSORS)
    ns = np.arange(MIN_SEGMENTS, MAX_SEGMENTS + 1)
    p_n = np.full(len(ns), 1.0 / len(ns))
    entropy = float(np.sum(p_n * fresh * (1 + 0.5 * (ns - 1))))  # content of fresh segments
    for k in range(1, MAX_SEGMENTS + 1):  # boundary after segment k (marker or EOS)
        reach = float(p_n[ns >= k].sum())
        q = float(p_n[ns == k].sum()) / reach
        h_end = -sum(p * math.log(p) for p in (q, 1 - q) if p > 0)
        entropy += reach * (h_end + (1 - q) * math.log(2))
    targets = float(np.sum(p_n * (ns * (SEGMENT_LEN + 1) + 1)))
    return entropy / targets


INSTRUCTION_TASKS = ("chain", "reverse", "shift", "repeat")


def generate_instructions(
    num: int, seed: int = 0, task: str = "chain", min_len: int = 3, max_len: int = 8, grammar_seed: int = 1234
) -> list[dict[str, str]]:
    """Synthetic instruction data for fine-tuning: the response is a function of the prompt, so a
    perfectly adapted model has zero loss on it.

    chain:   "chain: a" -> `max_len` letters, each the *first* allowed successor of the one before: a new
             deterministic rule over the pretraining grammar (where each of 4 successors was equally likely);
    reverse: "reverse: abc" -> "cba";  shift: "shift: abc" -> "bcd" (Caesar +1);  repeat: "repeat: abc" -> "abc"
             (random letters of a-z, `min_len`..`max_len` of them: these need content-based copying).
    """
    if task not in INSTRUCTION_TASKS:
        raise ValueError(f"task {task!r}; choose one of {list(INSTRUCTION_TASKS)}")
    rng = np.random.default_rng(seed)
    first_successor = transition_table(grammar_seed)[:, 0]
    out = []
    for _ in range(num):
        if task == "chain":
            letters = [int(rng.integers(len(ALPHABET)))]
            for _ in range(max_len):
                letters.append(int(first_successor[letters[-1]]))
            out.append({"prompt": f"chain: {ALPHABET[letters[0]]}", "response": "".join(ALPHABET[j] for j in letters[1:])})
            continue
        word = "".join(rng.choice(list(ALPHABET[:26]), size=int(rng.integers(min_len, max_len + 1))))
        response = {"reverse": word[::-1], "shift": "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word),
                    "repeat": word}[task]
        out.append({"prompt": f"{task}: {word}", "response": response})
    return out
