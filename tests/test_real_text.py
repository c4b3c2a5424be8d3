"""Real text offline: the Python standard library's source as a corpus, a BPE tokenizer trained on it, and
the docstring fine-tuning task derived from it (deterministic, split by module)."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.config import DataConfig
from jaxllm.data.pipeline import load_corpus, make_batches
from jaxllm.data.stdlib import docstring_task, first_sentence, function_examples, stdlib_files
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.data.tokenizer_training import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(DataConfig(source="stdlib", tokenizer="byte", eval_fraction=0.05, seq_len=64))


def test_stdlib_corpus_loads_through_the_pipeline(corpus):
    decoder = (STDLIB / "json" / "decoder.py").read_text(encoding="utf-8")
    assert decoder in corpus.train_docs + corpus.eval_docs  # whole files, one per document
    import jax  # installed under site-packages, which is not the standard library

    assert Path(jax.__file__).read_text(encoding="utf-8") not in corpus.train_docs
    n = corpus.report.documents
    assert n > 1000 and len(corpus.eval_docs) == -(-n // 20) and len(corpus.train_docs) + len(corpus.eval_docs) == n
    assert sum(map(len, corpus.train_docs)) > 20_000_000  # tens of MB of human-written code and docstrings
    again = load_corpus(DataConfig(source="stdlib", tokenizer="byte", eval_fraction=0.05, seq_len=64))
    assert again.eval_docs == corpus.eval_docs  # the split is by document and deterministic
    batch = next(iter(make_batches(corpus.train_docs[:8], corpus.tokenizer, seq_len=64, batch_size=2, seed=0,
                                   repeat=False)))
    first = corpus.train_docs[0].encode("utf-8")[:63]
    assert bytes(batch["inputs"][0, 1:64].tolist()) == first  # BOS, then the first file's bytes


def test_trained_tokenizer_round_trips_and_loads_in_transformers(corpus, tmp_path):
    path = train_tokenizer(corpus.train_docs[:40], 400, tmp_path / "tok")
    tok = load_tokenizer(str(path.parent))
    assert tok.vocab_size == 400 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    held_out = corpus.eval_docs[:5] + ["naïve café — 東京\n\tx = 1  # ünïcödé"]
    for text in held_out:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and len(ids) < len(text.encode("utf-8"))  # lossless, and it compresses
    assert tok.encode("x = 1", add_special_tokens=True)[0] == tok.bos_id  # the Llama rule: BOS added
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(path.parent)
    assert hf(held_out[0])["input_ids"] == tok.encode(held_out[0], add_special_tokens=True)


def test_tokenizer_cli_trains_on_training_documents_only(tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("alpha beta gamma\n\n" * 30 + "zeta unique held\n\n")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", f"data.source={data}", "data.eval_fraction=0.5", "--vocab-size", "300",
                 "--out", str(out)]) == 0
    assert (out / "tokenizer.json").exists() and "data.tokenizer=" in capsys.readouterr().out
    assert main(["tokenizer", "train", f"data.source={data}", "--vocab-size", "100", "--out", str(out)]) == 2
    assert "below the 256 byte tokens" in capsys.readouterr().err


def test_first_sentence_and_function_examples(tmp_path):
    assert first_sentence("Return the sum.  More text.\n\nDetails.") == "Return the sum."
    assert first_sentence("Compute\n  the e.g. value\nof x") == "Compute the e.g. value of x"
    src = tmp_path / "m.py"
    src.write_text('class A:\n    @staticmethod\n    def add(x, y):\n        """Add two numbers. Really."""\n'
                   '        return x + y\n\n\ndef bare():\n    return 1\n\n\ndef short():\n    """Tiny."""\n    return 2\n')
    assert function_examples(src) == [{"prompt": "@staticmethod\ndef add(x, y):\n    return x + y\n",
                                       "response": "Add two numbers.", "function": "add"}]


def test_docstring_task_is_deterministic_and_split_by_module(tmp_path):
    files = stdlib_files(include_tests=False)[:60]
    counts = docstring_task(tmp_path / "a", held_out=0.3, files=files)
    docstring_task(tmp_path / "b", held_out=0.3, files=files)
    for name in ("train.jsonl", "held_out.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    read = lambda name: [json.loads(line) for line in (tmp_path / "a" / name).read_text().splitlines()]
    train, held = read("train.jsonl"), read("held_out.jsonl")
    assert len(train) == counts["train"] > 0 and len(held) == counts["held_out"] > 0
    assert not {e["module"] for e in train} & {e["module"] for e in held}  # no module on both sides
    assert all(set(e) == {"prompt", "response", "module", "function"} for e in train + held)
    assert all('"""' + e["response"] not in e["prompt"] for e in train + held)  # the docstring is not in the prompt
    assert np.mean([len(e["response"]) for e in train]) > 20


def test_wikipedia_corpus_is_english_prose_split_into_sections():
    pytest.importorskip("gensim", reason="data.source=wikipedia reads gensim's bundled sample ([corpora] extra)")
    wiki = load_corpus(DataConfig(source="wikipedia", tokenizer="byte", eval_fraction=0.05, seq_len=64))
    docs = wiki.train_docs + wiki.eval_docs
    assert len(docs) > 1000 and 2_000_000 < sum(map(len, docs)) < 5_000_000 and wiki.report.skipped > 0  # redirects
    lead = next(d for d in docs if d.startswith("Anarchism\n\n"))
    assert "Anarchism is a political philosophy" in lead and "[[" not in lead and "'''" not in lead
    assert any(d.startswith("Anarchism: ") for d in docs)  # sections are their own documents
    assert not any("{{" in d or "<ref" in d for d in docs)  # templates and references filtered out
    words = " ".join(docs[:200]).split()
    assert sum(w.lower() in {"the", "of", "and", "a", "in"} for w in words) / len(words) > 0.1  # English prose
