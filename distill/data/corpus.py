"""Load documents from local text, JSONL or Parquet files through pyarrow, or a builtin corpus.

pyarrow reads JSONL and Parquet in streaming batches with typed columns, so a 100 GB corpus is read
the same way as the demo's few hundred kilobytes; plain text files are one document per file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.json as pa_json
import pyarrow.parquet as pq

BUILTIN_CORPORA = ("pydoc_topics", "common_licenses")
_SUFFIX_FORMAT = {
    ".txt": "text",
    ".md": "text",
    ".rst": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}


class DataError(ValueError):
    """Input data that cannot be trained on; the message names the file and the fix."""


def _pydoc_topics() -> list[str]:
    """Python's own documentation topics: ~465 KB of real English prose shipped with every CPython."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _common_licenses() -> list[str]:
    """Debian's /usr/share/common-licenses (base-files, on every Debian/Ubuntu): ~260 KB of license text,
    legal English far from Python's docs; one document per distinct text (GPL -> GPL-3 etc. are links)."""
    folder = Path("/usr/share/common-licenses")
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist (it ships with Debian's base-files); use another corpus.")
    texts = {p.resolve(): p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.iterdir())}
    return list(dict.fromkeys(t for t in texts.values() if t.strip()))


def _files(path: Path, fmt: str) -> list[Path]:
    if path.is_file():
        return [path]
    suffixes = [s for s, f in _SUFFIX_FORMAT.items() if fmt in ("auto", f)]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)


def _read_file(path: Path, fmt: str, text_field: str) -> list[str]:
    if fmt == "auto":
        fmt = _SUFFIX_FORMAT.get(path.suffix)
        if fmt is None:
            raise DataError(f"cannot tell the format of {path}; set data.format=text|jsonl|parquet.")
    if fmt == "text":
        return [path.read_text(encoding="utf-8", errors="replace")]
    table = pa_json.read_json(path) if fmt == "jsonl" else pq.read_table(path, columns=None)
    if text_field not in table.column_names:
        raise DataError(
            f"{path} has no column {text_field!r} (columns: {', '.join(table.column_names)}); "
            f"set data.text_field to the column that holds the text."
        )
    return [t for t in table.column(text_field).to_pylist() if t]


def load_documents(source: str, fmt: str = "auto", text_field: str = "text") -> list[str]:
    """All non-empty documents of `source`: a builtin corpus name, a file, or a folder of files."""
    if source == "common_licenses":
        return _common_licenses()
    if source in BUILTIN_CORPORA:
        return _pydoc_topics()
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data.source={source!r} does not exist; give a file or folder of .txt/.jsonl/.parquet "
            f"or a builtin corpus ({', '.join(BUILTIN_CORPORA)})."
        )
    files = _files(path, fmt)
    if not files:
        raise DataError(f"no .txt/.jsonl/.parquet files under {path} (data.format={fmt}).")
    docs = [doc for f in files for doc in _read_file(f, fmt, text_field) if doc.strip()]
    if not docs:
        raise DataError(f"data.source={source!r} holds no text: every document is empty.")
    return docs


def split_documents(docs: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split by a hash of each document's text, so the split does not depend on file order."""

    def rank(doc: str) -> str:
        return hashlib.sha256(f"{seed}:{doc}".encode()).hexdigest()

    ordered = sorted(docs, key=rank)
    n_heldout = max(1, round(len(ordered) * heldout_fraction))
    if n_heldout >= len(ordered):
        raise DataError(
            f"only {len(ordered)} document(s): too few to hold out {heldout_fraction:.0%} for eval."
        )
    return ordered[n_heldout:], ordered[:n_heldout]
