"""BM25 over a local collection of text files: the ``search`` tool's index (no network).

Okapi BM25 (Robertson et al.), with the non-negative IDF that Lucene uses. For a query with
distinct terms q (a term repeated in the query counts once) and a document D:

    score(D, query) = sum over q of  IDF(q) * f(q, D) * (k1 + 1) / (f(q, D) + k1 * (1 - b + b * |D| / avgdl))
    IDF(q)          = ln(1 + (N - n(q) + 0.5) / (n(q) + 0.5))

f(q, D) is how often q occurs in D, |D| the number of tokens of D, avgdl the mean of |D| over
the collection, N the number of documents and n(q) the number that contain q. Defaults
k1 = 1.5, b = 0.75. Tokens are the lower-cased runs of word characters (regex ``\\w+``).
A document is one file; only documents with a positive score are returned.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["BM25Index", "tokenize"]

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25Index:
    def __init__(self, documents: Sequence[tuple[str, str]], k1: float = 1.5, b: float = 0.75):
        """``documents``: (id, text) pairs."""
        if not documents:
            raise ValueError("BM25Index needs at least one document")
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b = float(k1), float(b)
        self.ids = [doc_id for doc_id, _ in documents]
        self.texts = [text for _, text in documents]
        self.tf = [Counter(tokenize(text)) for text in self.texts]
        self.lengths = [sum(c.values()) for c in self.tf]
        self.avgdl = sum(self.lengths) / len(self.lengths)
        df: Counter = Counter()
        for counts in self.tf:
            df.update(counts.keys())
        self.df = dict(df)

    @classmethod
    def from_directory(cls, directory: str | Path, extensions: Iterable[str] = (".txt", ".md"), **kwargs) -> "BM25Index":
        """Every file under ``directory`` (recursively) with one of ``extensions``; ids are relative paths."""
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise ValueError(f"search: {root} is not a directory")
        exts = {e.lower() for e in extensions}
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        if not files:
            raise ValueError(f"search: no {', '.join(sorted(exts))} files under {root}")
        return cls([(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files], **kwargs)

    def __len__(self) -> int:
        return len(self.ids)

    def idf(self, term: str) -> float:
        n = self.df.get(term, 0)
        return math.log(1.0 + (len(self.ids) - n + 0.5) / (n + 0.5))

    def score(self, query: str, index: int) -> float:
        """BM25 score of document ``index`` for ``query``."""
        counts, length = self.tf[index], self.lengths[index]
        norm = self.k1 * (1.0 - self.b + self.b * length / self.avgdl) if self.avgdl > 0 else self.k1
        total = 0.0
        for term in dict.fromkeys(tokenize(query)):
            f = counts.get(term, 0)
            if f:
                total += self.idf(term) * f * (self.k1 + 1.0) / (f + norm)
        return total

    def search(self, query: str, top_k: int = 3) -> list[tuple[str, float]]:
        """The ``top_k`` best (id, score) with a positive score, best first (ties: by id)."""
        scored = [(self.ids[i], self.score(query, i)) for i in range(len(self.ids))]
        scored = [s for s in scored if s[1] > 0]
        scored.sort(key=lambda s: (-s[1], s[0]))
        return scored[:top_k]

    def text(self, doc_id: str) -> str:
        return self.texts[self.ids.index(doc_id)]
