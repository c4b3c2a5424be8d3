"""Built-in corpus, tokenizers, readers and the grain pipeline (packing, sharding, exact state)."""

import json
import math

import numpy as np
import pytest

from jaxllm.config import ConfigError, DataConfig
from jaxllm.data import synthetic
from jaxllm.data.pipeline import load_corpus, make_batches
from jaxllm.data.sources import read_documents
from jaxllm.data.tokenizer import ByteTokenizer, load_tokenizer


def test_entropy_floor_equals_the_mean_document_entropy():
    """Two derivations agree: the closed-form expectation and the per-document true -log p."""
    docs = synthetic.generate_documents(4000, seed=7)
    nll, n = map(sum, zip(*(synthetic.document_entropy(d) for d in docs)))
    assert nll / n == pytest.approx(synthetic.entropy_floor(), rel=0.01)
    # a hand-checkable document: fresh segment, then a copy, then EOS (n=2 of 2..12: P(EOS) = 1/11)
    fresh = "|" + "".join(synthetic.ALPHABET[i] for i in _walk(synthetic.transition_table()))
    doc = fresh + "#" + fresh[1:]
    expected = math.log(32) + 15 * math.log(4) + math.log(2) + math.log(11)
    assert synthetic.document_entropy(doc) == (pytest.approx(expected), 2 * 17 + 1)
    with pytest.raises(ValueError, match="marked as a copy but differs"):
        synthetic.document_entropy(fresh + "#" + fresh[2:] + "a")
    assert synthetic.generate_documents(3, seed=7) == docs[:3]  # deterministic
    assert any(synthetic.COPY in d for d in docs[:10])


def _walk(table, start=0):
    letters = [start]
    for _ in range(synthetic.SEGMENT_LEN - 1):
        letters.append(int(table[letters[-1], 0]))
    return letters


def test_byte_tokenizer_round_trip_and_hf_tokenizer(tmp_path):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo")) == "héllo"
    assert max(tok.encode("ÿ")) < 256 and tok.vocab_size == 259
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    hf = tokenizers.Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2, "hi": 3, "there": 4}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(str(tmp_path))
    assert (t.encode("hi there you"), t.bos_id, t.eos_id, t.vocab_size) == ([3, 4, 2], 0, 1, 5)
    with pytest.raises(ConfigError, match="no such tokenizer.json"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_batches_are_packed_documents_with_exact_resumable_state():
    docs = synthetic.generate_documents(300, seed=1)
    tok = ByteTokenizer()
    ds = make_batches(docs, tok, seq_len=256, batch_size=4, seed=3, repeat=True)
    it = iter(ds)
    b = next(it)
    assert {k: v.shape for k, v in b.items()} == {k: (4, 256) for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
    np.testing.assert_array_equal(b["loss_mask"], b["segment_ids"] != 0)
    row, seg, pos = b["inputs"][0], b["segment_ids"][0], b["positions"][0]
    for s in set(seg[seg > 0].tolist()):
        piece = row[seg == s]
        np.testing.assert_array_equal(pos[seg == s], np.arange(len(piece)))  # positions restart per document
        assert piece[0] == tok.bos_id and tok.decode(piece[1:]) in docs  # whole document (short docs fit)
        np.testing.assert_array_equal(b["targets"][0][seg == s][:-1], piece[1:])  # targets are shifted inputs
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    it2 = iter(make_batches(docs, tok, seq_len=256, batch_size=4, seed=3, repeat=True))
    it2.set_state(state)
    for e in expected:
        got = next(it2)
        for k in e:
            np.testing.assert_array_equal(got[k], e[k])


def test_long_documents_are_split_into_windows():
    tok = ByteTokenizer()
    docs = [chr(97 + i) * 50 for i in range(8)]
    rows = list(make_batches(docs, tok, seq_len=16, batch_size=1, seed=0, repeat=False))
    text = "".join(tok.decode(r["inputs"][0][r["segment_ids"][0] > 0]) for r in rows)
    assert all(text.count(chr(97 + i)) >= 49 for i in range(8))  # nothing lost but window overlaps
    assert all(r["inputs"].shape == (1, 16) for r in rows)


def test_readers_formats_and_bad_documents(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"first doc\n\nsecond doc\n\n\xff\xfe broken \n\nthird")
    (tmp_path / "b.jsonl").write_bytes(
        b'{"text": "json doc"}\n{"body": "no text field"}\nnot json\n{"text": "bad \xc3\x28 utf8"}\n'
    )
    docs, report = read_documents(str(tmp_path))
    assert docs == ["first doc", "second doc", "third", "json doc"]
    assert report.skipped == 4
    assert any("not valid UTF-8" in e for e in report.examples)
    assert any("no string field 'text'" in e for e in report.examples)


def test_parquet_arrayrecord_and_hf_dataset_sources(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    pq.write_table(pa.table({"content": ["p one", "p two"]}), tmp_path / "d.parquet")
    assert read_documents(str(tmp_path / "d.parquet"), "content")[0] == ["p one", "p two"]
    w = ArrayRecordWriter(str(tmp_path / "d.arrayrecord"), "group_size:1")
    for rec in (b"raw text", json.dumps({"text": "json record"}).encode()):
        w.write(rec)
    w.close()
    assert read_documents(str(tmp_path / "d.arrayrecord"))[0] == ["raw text", "json record"]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["hf one", "hf two"]}).save_to_disk(str(tmp_path / "hf"))
    assert read_documents(str(tmp_path / "hf"))[0] == ["hf one", "hf two"]


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data.source='.*nope' does not exist"):
        load_corpus(DataConfig(source=str(tmp_path / "nope")))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ConfigError, match=r"has no usable documents"):
        load_corpus(DataConfig(source=str(tmp_path / "empty.txt")))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.csv").write_text("a,b")
    with pytest.raises(ConfigError, match=r"holds no files ending in"):
        load_corpus(DataConfig(source=str(tmp_path / "sub")))


def test_eval_split_is_disjoint():
    c = load_corpus(DataConfig(synthetic_docs=500, eval_fraction=0.1))
    assert len(c.eval_docs) == 50 and len(c.train_docs) == 450
    nats, n = map(sum, zip(*(synthetic.document_entropy(d) for d in c.eval_docs)))
    assert c.floor == pytest.approx(nats / n)  # exact entropy of the held-out documents
    assert c.floor == pytest.approx(synthetic.entropy_floor(), rel=0.05)


def test_row_streams_give_the_same_global_batch_for_any_process_count():
    from jaxllm.data.pipeline import RowStreams, local_rows

    docs = synthetic.generate_documents(200, seed=2)
    tok = ByteTokenizer()
    make = lambda rows: RowStreams(docs, tok, seq_len=64, global_batch=4, seed=5, rows=rows, repeat=True)
    one = make(local_rows(4, 0, 1))
    two = [make(local_rows(4, p, 2)) for p in range(2)]
    assert [list(local_rows(4, p, 2)) for p in range(2)] == [[0, 1], [2, 3]]
    for _ in range(3):
        a = next(one)
        b = [next(it) for it in two]
        for k in a:
            np.testing.assert_array_equal(a[k], np.concatenate([b[0][k], b[1][k]]))
    # state saved by two processes (merged) restores in one, and continues identically
    merged = {**two[0].get_state(), **two[1].get_state()}
    expected = next(one)
    fresh = make(local_rows(4, 0, 1))
    fresh.set_state(merged)
    np.testing.assert_array_equal(next(fresh)["inputs"], expected["inputs"])
    with pytest.raises(ValueError, match=r"no entry for rows \[4, 5, 6, 7\]"):
        RowStreams(docs, tok, seq_len=64, global_batch=8, seed=5, rows=range(8), repeat=True).set_state(merged)
