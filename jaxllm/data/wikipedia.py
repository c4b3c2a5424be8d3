"""English prose that installs from PyPI: the English Wikipedia sample that `gensim` ships in its wheel.

`data.source=wikipedia` reads `gensim/test/test_data/enwiki-latest-pages-articles1.xml-...-shortened.bz2` (106
articles of a 2016 dump, about 3 MB of text; Wikipedia's text is CC BY-SA 3.0, gensim itself LGPL-2.1), strips
the wiki markup with gensim's own `filter_wiki`, and gives one document per article section ("Title: Section"
then its text), so the train / eval split by document spreads over many articles. Nothing is downloaded:
`pip install 'jaxllm[corpora]'` (the test extras include it).
"""

from __future__ import annotations

import bz2
import re
from pathlib import Path

from jaxllm.config import ConfigError
from jaxllm.data.sources import ReadReport

SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$", re.M)
MIN_CHARS = 200  # shorter sections (stubs, lists emptied by the markup filter) are left out


def sample_path() -> Path:
    try:
        import gensim
    except ImportError as err:
        raise ConfigError("data.source=wikipedia reads the Wikipedia sample inside the gensim package: "
                          "pip install 'jaxllm[corpora]'") from err
    return Path(gensim.__file__).parent / SAMPLE


def article_sections(title: str, wikitext: str) -> list[str]:
    """An article's sections as plain-text documents "Title: Section\\n\\ntext" (the lead is "Title")."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = re.sub(r"'{2,}", "", filter_wiki(wikitext))  # bold / italic quotes the filter leaves
    docs, name, start = [], title, 0
    for m in [*_HEADING.finditer(text), None]:
        body = re.sub(r"\n{3,}", "\n\n", text[start : m.start() if m else len(text)]).strip()
        if len(body) >= MIN_CHARS:
            docs.append(f"{name}\n\n{body}")
        if m:
            name, start = f"{title}: {m.group(2)}", m.end()
    return docs


def read_wikipedia() -> tuple[list[str], ReadReport]:
    """Every section of every article (redirects skipped and counted), in the sample's order."""
    from gensim.corpora.wikicorpus import extract_pages

    report, docs = ReadReport(), []
    with bz2.BZ2File(sample_path()) as f:
        for title, wikitext, _ in extract_pages(f, filter_namespaces=("0",)):
            if not wikitext or wikitext.lstrip().lower().startswith("#redirect"):
                report.skip(title, "a redirect")
                continue
            sections = article_sections(title, wikitext)
            docs += sections
            report.documents += len(sections)
    return docs, report
