"""Read documents from text, JSONL and Parquet files (or a builtin corpus) as a stream.

Every reader yields one document at a time from bounded reads: a JSONL byte range line by line, Parquet
row groups in record batches, a text file whole (one document per file). A bad line or file is a
`DataError` naming the file, the line and the fix, never a parser's traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

BUILTIN_CORPORA = ("pydoc_topics", "common_licenses")
_SUFFIX_FORMAT = {
    ".txt": "text",
    ".md": "text",
    ".rst": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".idx": "megatron",  # a Megatron `.bin`/`.idx` pair (e.g. from preprocess_data.py), named by its index
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


def builtin_documents(name: str) -> list[str]:
    return _common_licenses() if name == "common_licenses" else _pydoc_topics()


def corpus_files(path: Path, fmt: str) -> list[Path]:
    """The files of `path` (a file, or a folder searched recursively) in a fixed order."""
    if not path.exists():
        raise DataError(
            f"data.source={str(path)!r} does not exist; give a file or folder of .txt/.jsonl/.parquet "
            f"or a builtin corpus ({', '.join(BUILTIN_CORPORA)})."
        )
    if path.is_file():
        return [path.with_suffix(".idx") if path.suffix == ".bin" else path]
    suffixes = [s for s, f in _SUFFIX_FORMAT.items() if fmt in ("auto", f)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise DataError(
            f"no .txt/.jsonl/.parquet files or Megatron .bin/.idx pairs under {path} (data.format={fmt})."
        )
    return files


def file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix not in _SUFFIX_FORMAT:
        raise DataError(f"cannot tell the format of {path}; set data.format=text|jsonl|parquet|megatron.")
    return _SUFFIX_FORMAT[path.suffix]


def jsonl_documents(path: Path, start: int, end: int, field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        f.seek(max(start - 1, 0))
        if start > 0:
            f.readline()  # the line holding byte start-1 belongs to the previous range
        while f.tell() < end:
            offset = f.tell()
            line = f.readline()
            if not line:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(
                    f"{path}, line {_line_number(path, offset)}: not valid JSON ({e}); fix or drop that line."
                ) from None
            if not isinstance(row, dict) or field not in row:
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(
                    f"{path}, line {_line_number(path, offset)}: no {field!r} field (has: {keys}); set "
                    f"data.text_field to the field that holds the text."
                )
            text = row[field]
            if text is not None and not isinstance(text, str):
                raise DataError(
                    f"{path}, line {_line_number(path, offset)}: field {field!r} holds "
                    f"{type(text).__name__}, not text; set data.text_field to a text field."
                )
            if text and text.strip():
                yield text


def _line_number(path: Path, offset: int) -> int:
    """1-based line number of the line starting at byte `offset` (read only when reporting an error)."""
    count, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(1 << 22, offset - done))
            count += block.count(b"\n")
            done += len(block)
    return count


def parquet_documents(path: Path, groups: list[int], field: str) -> Iterator[str]:
    reader = parquet_file(path)
    try:
        if field not in reader.schema_arrow.names:
            raise DataError(
                f"{path} has no column {field!r} (columns: {', '.join(reader.schema_arrow.names)}); set "
                f"data.text_field to the column that holds the text."
            )
        for batch in reader.iter_batches(batch_size=1024, row_groups=groups, columns=[field]):
            column = batch.column(0)
            if not (column.type.equals("string") or column.type.equals("large_string")):
                raise DataError(f"{path}: column {field!r} is {column.type}, not text; set data.text_field.")
            yield from (t for t in column.to_pylist() if t and t.strip())
    except DataError:
        raise
    except Exception as e:  # a damaged file fails while reading, in pyarrow's own exception types
        raise DataError(f"{path} could not be read as Parquet ({e}); re-export it or remove it.") from None


def file_documents(path: Path, fmt: str, text_field: str) -> Iterator[str]:
    """The non-empty documents of one whole file."""
    fmt = file_format(path, fmt)
    if fmt == "text":
        text = path.read_text(encoding="utf-8", errors="replace")
        yield from [text] if text.strip() else []
    elif fmt == "jsonl":
        yield from jsonl_documents(path, 0, path.stat().st_size, text_field)
    else:
        groups = list(range(parquet_file(path).metadata.num_row_groups))
        yield from parquet_documents(path, groups, text_field)


def parquet_file(path: Path):
    """An open pyarrow ParquetFile (pyarrow is imported here, not at module import: tokeniser workers
    reading only JSONL or text stay small)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path} is not a readable Parquet file ({e}); re-export it or remove it.") from None


def load_documents(source: str, fmt: str = "auto", text_field: str = "text") -> list[str]:
    """All non-empty documents of `source` in memory: for small corpora (tests, prompts). Training reads
    tokenised shards instead (distill/data/tokenize.py)."""
    if source in BUILTIN_CORPORA:
        return builtin_documents(source)
    docs = [
        d for f in corpus_files(Path(source).expanduser(), fmt) for d in file_documents(f, fmt, text_field)
    ]
    if not docs:
        raise DataError(f"data.source={source!r} holds no text: every document is empty.")
    return docs
