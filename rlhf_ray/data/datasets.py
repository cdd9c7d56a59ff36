"""Loading and validating prompt, SFT and preference data (the built-in task's and users' own).

Every file goes through the same path: read rows (JSON lines, or parquet via
pyarrow), validate each row, normalise it to a fixed schema and hand the result
to Hugging Face ``datasets``. Bad rows raise :class:`DataError` *before*
anything is trained, with one ``"<file>:<line>: <problem>"`` line per bad row
(up to :data:`MAX_REPORTED` of them; parquet rows read ``"<file>:row <i>"``).

Normalised schemas (extra columns are dropped):

* prompts      ``{"prompt": str}``
* SFT          ``{"prompt": str, "response": str}``
* comparisons  ``{"prompt": str, "completions": [str, ...]}`` ranked best -> worst, >= 2 items;
  rows of the form ``{"prompt", "chosen", "rejected"}`` become ``completions=[chosen, rejected]``.

This module also owns prompt tokenization with a length policy
(:func:`tokenize_prompts`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets

MAX_REPORTED = 10
"""How many bad rows one DataError lists."""

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)

Row = dict[str, Any]
# A row check returns the normalised row, or raises _RowProblem.
RowCheck = Callable[[Any], Row]


class DataError(ValueError):
    """Bad data: the message names ``file:line`` (or ``file:row i``) and the field of each problem."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


class _RowProblem(Exception):
    """Raised by row checks; the loader prefixes the location."""


# --------------------------------------------------------------------------- row checks


def _require_object(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise _RowProblem(f"row must be a JSON object, got {type(row).__name__}")
    return row


def _require_str(row: dict[str, Any], key: str) -> str:
    if key not in row:
        raise _RowProblem(f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise _RowProblem(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowProblem(f"field {key!r} is an empty string")
    return value


def _require_completions(row: dict[str, Any], key: str = "completions") -> list[str]:
    value = row[key]
    if not isinstance(value, list):
        raise _RowProblem(f"field {key!r} must be a list of strings, got {type(value).__name__}")
    if len(value) < 2:
        raise _RowProblem(f"field {key!r} needs at least 2 ranked completions, got {len(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _RowProblem(f"field {key!r} item {i} must be a string, got {type(item).__name__}")
        if not item.strip():
            raise _RowProblem(f"field {key!r} item {i} is an empty string")
    return value


def _prompt_check(prompt_key: str) -> RowCheck:
    def check(row: Any) -> Row:
        return {"prompt": _require_str(_require_object(row), prompt_key)}

    return check


def _sft_check(prompt_key: str, response_key: str) -> RowCheck:
    def check(row: Any) -> Row:
        obj = _require_object(row)
        return {"prompt": _require_str(obj, prompt_key), "response": _require_str(obj, response_key)}

    return check


def _comparison_check(row: Any) -> Row:
    obj = _require_object(row)
    prompt = _require_str(obj, "prompt")
    if "completions" in obj:
        return {"prompt": prompt, "completions": _require_completions(obj)}
    if "chosen" in obj or "rejected" in obj:
        return {"prompt": prompt, "completions": [_require_str(obj, "chosen"), _require_str(obj, "rejected")]}
    raise _RowProblem("missing field 'completions' (or the pair 'chosen'/'rejected')")


# --------------------------------------------------------------------------- readers


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, parsed row) per non-blank line; yields (location, _RowProblem) for unreadable lines."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # tolerate a UTF-8 byte-order mark, as editors on Windows write one
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, _RowProblem(f"invalid UTF-8 at byte {e.start} of the line")
                continue
            if not text.strip():
                continue  # blank lines (e.g. a trailing newline) are allowed
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, _RowProblem(f"invalid JSON: {e.msg} (column {e.colno})")


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # pyarrow comes with `datasets`

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet file: {e}") from e
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


def _read_rows(path: str | os.PathLike[str], check: RowCheck) -> list[Row]:
    """Validated, normalised rows of one file; DataError listing the bad ones."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = _iter_jsonl(p)
    elif suffix in PARQUET_SUFFIXES:
        rows = _iter_parquet(p)
    else:
        raise DataError(f"{p}: unsupported file type {suffix!r} (use JSON lines: .jsonl/.json, or .parquet)")
    good: list[Row] = []
    problems: list[str] = []
    n_bad = 0
    for where, row in rows:
        try:
            if isinstance(row, _RowProblem):
                raise row
            good.append(check(row))
        except _RowProblem as e:
            n_bad += 1
            if len(problems) < MAX_REPORTED:
                problems.append(f"{where}: {e}")
    if n_bad:
        more = f"\n... and {n_bad - len(problems)} more bad rows in {p}" if n_bad > len(problems) else ""
        raise DataError("\n".join(problems) + more, problems)
    if not good:
        raise DataError(f"{p}: no rows (the file is empty or has only blank lines)")
    return good


_STR = datasets.Value("string")


def load_prompt_dataset(path: str | os.PathLike[str], *, prompt_key: str = "prompt") -> datasets.Dataset:
    """Prompts for RL: column ``prompt`` (read from ``prompt_key``)."""
    rows = _read_rows(path, _prompt_check(prompt_key))
    return datasets.Dataset.from_list(rows, features=datasets.Features({"prompt": _STR}))


def load_sft_dataset(
    path: str | os.PathLike[str], *, prompt_key: str = "prompt", response_key: str = "response"
) -> datasets.Dataset:
    """Demonstrations: columns ``prompt``, ``response`` (the response carries no EOS text)."""
    rows = _read_rows(path, _sft_check(prompt_key, response_key))
    return datasets.Dataset.from_list(rows, features=datasets.Features({"prompt": _STR, "response": _STR}))


def load_comparison_dataset(path: str | os.PathLike[str]) -> datasets.Dataset:
    """Preferences: columns ``prompt``, ``completions`` (best -> worst); chosen/rejected rows normalised."""
    rows = _read_rows(path, _comparison_check)
    features = datasets.Features({"prompt": _STR, "completions": datasets.List(_STR)})
    return datasets.Dataset.from_list(rows, features=features)


# --------------------------------------------------------------------------- tokenization

PromptLengthPolicy = Literal["truncate", "skip", "error"]


def tokenize_prompts_with_index(
    tokenizer: Any, prompts: Sequence[str], max_prompt_len: int, policy: PromptLengthPolicy = "truncate"
) -> tuple[list[list[int]], list[int]]:
    """Token ids of the kept prompts and the indices (into ``prompts``) they came from.

    The tokenizer's own special tokens are added (a BOS for tokenizers that use
    one, nothing for the built-in character tokenizer), as vLLM does for text
    prompts. Too-long prompts are, by ``policy``:

    * ``"truncate"``: cut from the LEFT, keeping the end of the prompt (the
      part the response continues from); a leading BOS is kept;
    * ``"skip"``: dropped;
    * ``"error"``: DataError naming the index of the first one.
    """
    if policy not in ("truncate", "skip", "error"):
        raise ValueError(f"policy must be 'truncate', 'skip' or 'error', got {policy!r}")
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
    if not prompts:
        return [], []
    encoded = tokenizer(list(prompts))["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    kept_ids: list[list[int]] = []
    kept_index: list[int] = []
    for i, ids in enumerate(encoded):
        ids = list(ids)
        if len(ids) > max_prompt_len:
            if policy == "error":
                raise DataError(
                    f"prompt {i} has {len(ids)} tokens, more than max_prompt_len={max_prompt_len}: {prompts[i][:80]!r}"
                )
            if policy == "skip":
                continue
            head = ids[:1] if bos is not None and ids[0] == bos and max_prompt_len > 1 else []
            ids = head + ids[len(ids) - (max_prompt_len - len(head)) :]
        kept_ids.append(ids)
        kept_index.append(i)
    return kept_ids, kept_index


def tokenize_prompts(
    tokenizer: Any, prompts: Sequence[str], max_prompt_len: int, policy: PromptLengthPolicy = "truncate"
) -> tuple[list[list[int]], int]:
    """``(token_id_lists, n_skipped)``; see :func:`tokenize_prompts_with_index` for the policies.

    With ``"skip"`` the kept prompts stay in input order; use
    :func:`tokenize_prompts_with_index` to know which ones they are.
    """
    ids, kept = tokenize_prompts_with_index(tokenizer, prompts, max_prompt_len, policy)
    return ids, len(prompts) - len(kept)
