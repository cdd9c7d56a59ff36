"""Where rows come from: one function, :func:`iter_rows`, reads any supported source as
``(location, row)`` pairs, so that every bad row can be reported as ``<location>: <problem>``.

Sources (a data-file setting takes any of them):

* a JSON-lines file (``.jsonl`` / ``.json``)           -> locations ``file:line``
* a parquet file (``.parquet``)                        -> ``file:row i``
* a directory written by ``datasets.save_to_disk``     -> ``dir:row i`` (a ``DatasetDict``
  needs ``DIR?split=NAME``)
* ``hf:NAME[?split=S&config=C]``: ``datasets.load_dataset(NAME, C, split=S)`` (split defaults to
  ``train``), i.e. a dataset on the Hugging Face Hub, or a local dataset directory / loading
  script that ``load_dataset`` understands                -> ``hf:NAME[split]:row i``
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
HUB_PREFIX = "hf:"


class SourceError(ValueError):
    """A source that cannot be read at all (missing, unknown type, unreadable)."""


class RowProblem(Exception):
    """One unreadable row (bad JSON, bad UTF-8); yielded in place of the row."""


def _split_query(source: str) -> tuple[str, dict[str, str]]:
    """``"name?split=x&config=y"`` -> ``("name", {"split": "x", "config": "y"})``."""
    base, _, query = source.partition("?")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = set(params) - {"split", "config"}
    if unknown:
        raise SourceError(f"{source}: unknown option(s) {sorted(unknown)} (use ?split=NAME&config=NAME)")
    return base, params


def iter_rows(source: str | os.PathLike[str]) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` for every row of ``source``; a ``RowProblem`` stands in for a row
    that could not be parsed. Raises SourceError for a source that cannot be opened."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        yield from _iter_hub(text)
        return
    base, params = _split_query(text) if "?" in text else (text, {})
    p = Path(base)
    if p.is_dir():
        yield from _iter_saved(p, params.get("split"))
        return
    if not p.is_file():
        raise SourceError(f"{p}: no such file or directory")
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _iter_jsonl(p)
    elif suffix in PARQUET_SUFFIXES:
        yield from _iter_parquet(p)
    else:
        raise SourceError(f"{p}: unsupported file type {suffix!r} (use JSON lines: .jsonl/.json, .parquet, "
                          "a datasets.save_to_disk directory, or hf:NAME?split=S)")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # tolerate a UTF-8 byte-order mark, as editors on Windows write one
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, RowProblem(f"invalid UTF-8 at byte {e.start} of the line")
                continue
            if not text.strip():
                continue  # blank lines (e.g. a trailing newline) are allowed
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, RowProblem(f"invalid JSON: {e.msg} (column {e.colno})")


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # pyarrow comes with `datasets`

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise SourceError(f"{path}: cannot read parquet file: {e}") from e
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


def _iter_dataset(ds: Any, where: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(ds):
        yield f"{where}:row {i}", row


def _iter_saved(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise SourceError(f"{path}: not a datasets.save_to_disk directory ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise SourceError(f"{path}: a DatasetDict with splits {sorted(ds)}; name one as {path}?split=NAME")
        ds, where = ds[split], f"{path}[{split}]"
    elif split is not None:
        raise SourceError(f"{path}: a single Dataset has no splits (drop ?split={split})")
    else:
        where = str(path)
    yield from _iter_dataset(ds, where)


def _iter_hub(source: str) -> Iterator[tuple[str, Any]]:
    import datasets

    name, params = _split_query(source[len(HUB_PREFIX):])
    split, config = params.get("split") or "train", params.get("config") or None
    if not name:
        raise SourceError(f"{source}: no dataset name after {HUB_PREFIX!r}")
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, missing split/config, bad files: all mean "cannot open"
        raise SourceError(f"{source}: datasets.load_dataset({name!r}, {config!r}, split={split!r}) failed: "
                          f"{type(e).__name__}: {e}") from e
    yield from _iter_dataset(ds, f"{HUB_PREFIX}{name}[{split}]")
