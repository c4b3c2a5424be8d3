"""Real text that every machine has: the Python standard library's own source (PSF license).

`data.source=stdlib` reads every .py file under `sysconfig`'s stdlib path (site-packages excluded): human-
written code, comments and docstrings, about 30 MB on CPython 3.11, one document per file in sorted order.
`docstring_task` derives a fine-tuning task from the same files: a function's code without its docstring ->
the first sentence of that docstring, split into train / held-out by module, never by example.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sysconfig
import textwrap
from pathlib import Path

from jaxllm.data.sources import ReadReport

_NOT_STDLIB = ("site-packages", "dist-packages")
_TEST_DIRS = ("test", "tests", "idle_test")


def stdlib_files(include_tests: bool = True) -> list[Path]:
    """The standard library's .py files, sorted by path relative to the stdlib root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in root.rglob("*.py"):
        parts = f.relative_to(root).parts
        if any(p in _NOT_STDLIB for p in parts) or (not include_tests and any(p in _TEST_DIRS for p in parts)):
            continue
        files.append(f)
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def read_stdlib() -> tuple[list[str], ReadReport]:
    """One document per stdlib source file; files that are not UTF-8 are skipped and reported."""
    report, docs = ReadReport(), []
    for f in stdlib_files():
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            report.skip(str(f), f"not valid UTF-8 (byte {err.start})")
            continue
        if text.strip():
            docs.append(text)
            report.documents += 1
    return docs, report


def module_name(path: Path) -> str:
    """`json/decoder.py` -> `json.decoder`; `json/__init__.py` -> `json`."""
    rel = path.relative_to(Path(sysconfig.get_paths()["stdlib"])).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def is_held_out(module: str, fraction: float) -> bool:
    """Deterministic, platform-independent split by module name (a hash, not Python's salted `hash`)."""
    return int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) < fraction * 16**8


def first_sentence(docstring: str) -> str:
    """The docstring's first sentence: its first paragraph, whitespace collapsed, up to the first '.', '!' or
    '?' that a capital letter follows ('e.g. x' does not end a sentence)."""
    paragraph = " ".join(docstring.strip().split("\n\n", 1)[0].split())
    match = re.search(r"(?<=[.!?])\s(?=[A-Z])", paragraph)
    return paragraph[: match.start()] if match else paragraph


def function_examples(path: Path, max_code_chars: int = 1500) -> list[dict[str, str]]:
    """{"prompt": code without its docstring, "response": the docstring's first sentence, "function"} for each
    function with a docstring in the file (nested ones too); empty for files that do not parse."""
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2 or node.body[0].lineno <= node.lineno:
            continue
        sentence = first_sentence(doc)
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        doc_node = node.body[0]
        code = "".join(lines[first - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno])
        code = textwrap.dedent(code)
        if 10 <= len(sentence) <= 200 and len(code) <= max_code_chars:
            out.append({"prompt": code.rstrip() + "\n", "response": sentence, "function": node.name})
    return out


def docstring_task(out_dir: str | Path, held_out: float = 0.1, files: list[Path] | None = None) -> dict[str, int]:
    """Write train.jsonl and held_out.jsonl of {"prompt", "response", "module", "function"} from the stdlib's
    non-test modules (or `files` of it); a module's examples all go to one side. Returns the example and
    module counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "held_out": 0, "train_modules": 0, "held_out_modules": 0}
    with (out / "train.jsonl").open("w") as train, (out / "held_out.jsonl").open("w") as held:
        for f in stdlib_files(include_tests=False) if files is None else files:
            try:
                examples = function_examples(f)
            except UnicodeDecodeError:
                continue
            if not examples:
                continue
            module = module_name(f)
            side = "held_out" if is_held_out(module, held_out) else "train"
            sink = held if side == "held_out" else train
            for e in examples:
                sink.write(json.dumps({**e, "module": module}) + "\n")
            counts[side] += len(examples)
            counts[f"{side}_modules"] += 1
    return counts
