"""Readers for local data: .txt, .jsonl, .parquet, ArrayRecord, and Hugging Face datasets saved to disk.

Every reader yields documents as `bytes | str`; `read_documents` decodes them, skips (and counts) the
ones that are not valid UTF-8 or not parseable, and fails clearly on a missing path or an empty result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from jaxllm.config import ConfigError

SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrayrecord", ".array_record")


@dataclass
class ReadReport:
    """What reading found: documents kept, and skipped ones with a reason each (first few kept)."""

    documents: int = 0
    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {why}")


def _txt(path: Path) -> Iterator[tuple[str, bytes]]:
    """A .txt file holds documents separated by blank lines."""
    for i, chunk in enumerate(path.read_bytes().split(b"\n\n")):
        if chunk.strip():
            yield f"{path}#{i}", chunk.strip()


def _jsonl(path: Path, text_field: str, report: ReadReport) -> Iterator[tuple[str, bytes | str]]:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                report.skip(where, f"not valid UTF-8 (byte {err.start})")
                continue
            except json.JSONDecodeError as err:
                report.skip(where, f"not valid JSON ({err.msg})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                report.skip(where, f"no string field {text_field!r}")
                continue
            yield where, record[text_field]


def _parquet(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ConfigError("reading .parquet needs pyarrow: pip install 'jaxllm[data]'") from err
    table = pq.read_table(path, columns=[text_field])
    for i, text in enumerate(table.column(text_field).to_pylist()):
        yield f"{path}[{i}]", text


def _arrayrecord(path: Path, text_field: str) -> Iterator[tuple[str, bytes | str]]:
    """Records are raw UTF-8 text, or JSON objects holding `text_field`."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        for i, record in enumerate(reader.read_all()):
            if record[:1] == b"{":
                try:
                    record = json.loads(record)[text_field]
                except (ValueError, KeyError, TypeError):
                    pass
            yield f"{path}[{i}]", record
    finally:
        reader.close()


def _hf_dataset(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError as err:
        raise ConfigError("reading a saved Hugging Face dataset needs `datasets`: pip install 'jaxllm[data]'") from err
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if text_field not in ds.column_names:
        raise ConfigError(f"data.text_field={text_field!r} is not a column of {path}; columns: {ds.column_names}")
    for i, text in enumerate(ds[text_field]):
        yield f"{path}[{i}]", text


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def read_documents(source: str, text_field: str = "text") -> tuple[list[str], ReadReport]:
    """All documents under `source` (a file, a directory of files, or a saved HF dataset)."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"data.source={source!r} does not exist; give a file, a directory, 'synthetic', 'stdlib' "
                          "or 'wikipedia'")
    report = ReadReport()
    if path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json")):
        streams = [_hf_dataset(path, text_field)]
    else:
        files = _files(path)
        if not files:
            raise ConfigError(f"data.source={source!r} holds no files ending in {list(SUFFIXES)}")
        streams = []
        for f in files:
            if f.suffix == ".txt":
                streams.append(_txt(f))
            elif f.suffix == ".jsonl":
                streams.append(_jsonl(f, text_field, report))
            elif f.suffix == ".parquet":
                streams.append(_parquet(f, text_field))
            elif f.suffix in (".arrayrecord", ".array_record"):
                streams.append(_arrayrecord(f, text_field))
            else:
                raise ConfigError(f"{f}: unsupported file type; supported: {list(SUFFIXES)}")
    docs: list[str] = []
    for stream in streams:
        for where, doc in stream:
            if isinstance(doc, bytes):
                try:
                    doc = doc.decode("utf-8")
                except UnicodeDecodeError as err:
                    report.skip(where, f"not valid UTF-8 (byte {err.start})")
                    continue
            if not isinstance(doc, str) or not doc.strip():
                report.skip(where, "empty or not text")
                continue
            docs.append(doc)
    report.documents = len(docs)
    if not docs:
        raise ConfigError(f"data.source={source!r} has no usable documents ({report.skipped} skipped: {report.examples})")
    return docs, report
