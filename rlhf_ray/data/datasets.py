"""Loading and validating prompt, SFT and preference data (the built-in task's and users' own).

Every source goes through the same path: read rows (:mod:`rlhf_ray.data.sources`: JSON lines,
parquet, a ``save_to_disk`` directory, or ``hf:NAME?split=S`` via ``datasets.load_dataset``),
validate each row, normalise it to a fixed schema and hand the result to Hugging Face
``datasets``. Bad rows raise :class:`DataError` *before* anything is trained, with one
``"<file>:<line>: <problem>"`` line per bad row (up to :data:`MAX_REPORTED` of them; other
sources read ``"<source>:row <i>"``).

Rows are raw text or chat (OpenAI-style ``[{"role", "content"}, ...]`` lists, rendered later
with the tokenizer's chat template, :mod:`rlhf_ray.data.chat`). Normalised schemas (extra
columns are dropped; ``messages`` is empty for raw-text rows, ``prompt``/``response`` are empty
for chat rows):

* prompts      ``{"prompt": str, "messages": [...]}``; chat rows end with a user turn
* SFT          ``{"prompt": str, "response": str, "messages": [...]}``; chat rows end with the
  assistant turn (every assistant turn is trained on)
* comparisons  ``{"prompt": str, "messages": [...], "completions": [str, ...]}`` ranked
  best -> worst, >= 2 items (for chat rows: the assistant replies to ``messages``). Accepted:
  ``{"prompt"|"messages", "completions": [...]}``, ``{"prompt"|"messages", "chosen", "rejected"}``
  with strings or assistant message lists, and ``{"chosen": [...], "rejected": [...]}`` as two
  whole conversations that share everything but the last (assistant) turn.

This module also owns prompt tokenization with a length policy (:func:`tokenize_prompts`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import datasets

from rlhf_ray.data.chat import ChatError, Messages, PromptInput, check_messages, prompt_token_ids
from rlhf_ray.data.sources import RowProblem, SourceError, iter_rows

MAX_REPORTED = 10
"""How many bad rows one DataError lists."""

Row = dict[str, Any]
# A row check returns the normalised row, or raises RowProblem / ChatError.
RowCheck = Callable[[Any], Row]


class DataError(ValueError):
    """Bad data: the message names ``file:line`` (or ``source:row i``) and the field of each problem."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


# --------------------------------------------------------------------------- row checks


def _require_object(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise RowProblem(f"row must be a JSON object, got {type(row).__name__}")
    return row


def _present(row: dict[str, Any], key: str) -> bool:
    return row.get(key) is not None  # parquet / datasets rows carry None for absent fields


def _require_str(row: dict[str, Any], key: str) -> str:
    if key not in row:
        raise RowProblem(f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise RowProblem(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowProblem(f"field {key!r} is an empty string")
    return value


def _prompt_of(row: dict[str, Any], prompt_key: str) -> tuple[str, Messages]:
    """``(text, [])`` of a raw prompt or ``("", messages)`` of a chat prompt (ending with a user
    turn), from ``messages`` or from a ``prompt_key`` field that holds a message list."""
    if _present(row, "messages"):
        return "", check_messages(row["messages"], "messages", last_role="user")
    if isinstance(row.get(prompt_key), list):
        return "", check_messages(row[prompt_key], prompt_key, last_role="user")
    return _require_str(row, prompt_key), []


def _reply(value: Any, key: str) -> tuple[str, Messages]:
    """A completion: a non-empty string, an assistant message, or a message list ending with one.
    Returns its text and the turns before it (empty unless a whole conversation was given)."""
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(f"field {key} is an empty string")
        return value, []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowProblem(f"field {key} must be a string or a message list, got {type(value).__name__}")
    turns = check_messages(value, key, last_role="assistant")
    return turns[-1]["content"], turns[:-1]


def _prompt_check(prompt_key: str) -> RowCheck:
    def check(row: Any) -> Row:
        text, messages = _prompt_of(_require_object(row), prompt_key)
        return {"prompt": text, "messages": messages}

    return check


def _sft_check(prompt_key: str, response_key: str) -> RowCheck:
    def check(row: Any) -> Row:
        obj = _require_object(row)
        if _present(obj, "messages"):
            return {"prompt": "", "response": "",
                    "messages": check_messages(obj["messages"], "messages", last_role="assistant")}
        return {"prompt": _require_str(obj, prompt_key), "response": _require_str(obj, response_key), "messages": []}

    return check


def _comparison_check(row: Any) -> Row:
    obj = _require_object(row)
    if _present(obj, "completions"):
        value = obj["completions"]
        if not isinstance(value, list):
            raise RowProblem(f"field 'completions' must be a list of strings, got {type(value).__name__}")
        if len(value) < 2:
            raise RowProblem(f"field 'completions' needs at least 2 ranked completions, got {len(value)}")
        replies = [_reply(item, f"'completions' item {i}")[0] for i, item in enumerate(value)]
        text, messages = _prompt_of(obj, "prompt")
        return {"prompt": text, "messages": messages, "completions": replies}
    if _present(obj, "chosen") or _present(obj, "rejected"):
        for key in ("chosen", "rejected"):
            if not _present(obj, key):
                raise RowProblem(f"missing field {key!r}")
        (chosen, before_c), (rejected, before_r) = _reply(obj["chosen"], "'chosen'"), _reply(obj["rejected"], "'rejected'")
        if before_c or before_r:  # two whole conversations: the shared turns are the prompt
            if before_c != before_r:
                raise RowProblem("'chosen' and 'rejected' conversations differ before their last turn")
            if before_c[-1]["role"] != "user":
                raise RowProblem("the turns before the 'chosen'/'rejected' reply must end with a user turn")
            return {"prompt": "", "messages": before_c, "completions": [chosen, rejected]}
        text, messages = _prompt_of(obj, "prompt")
        return {"prompt": text, "messages": messages, "completions": [chosen, rejected]}
    raise RowProblem("missing field 'completions' (or the pair 'chosen'/'rejected')")


# --------------------------------------------------------------------------- reading


def _read_rows(source: str | os.PathLike[str], check: RowCheck) -> list[Row]:
    """Validated, normalised rows of one source; DataError listing the bad ones."""
    good: list[Row] = []
    problems: list[str] = []
    n_bad = 0
    try:
        for where, row in iter_rows(source):
            try:
                if isinstance(row, RowProblem):
                    raise row
                good.append(check(row))
            except (RowProblem, ChatError) as e:
                n_bad += 1
                if len(problems) < MAX_REPORTED:
                    problems.append(f"{where}: {e}")
    except SourceError as e:
        raise DataError(str(e)) from e
    if n_bad:
        more = f"\n... and {n_bad - len(problems)} more bad rows in {source}" if n_bad > len(problems) else ""
        raise DataError("\n".join(problems) + more, problems)
    if not good:
        raise DataError(f"{source}: no rows (the file is empty or has only blank lines)")
    return good


_STR = datasets.Value("string")
_MESSAGES = datasets.List({"role": _STR, "content": _STR})


def load_prompt_dataset(source: str | os.PathLike[str], *, prompt_key: str = "prompt") -> datasets.Dataset:
    """Prompts for RL: columns ``prompt`` (read from ``prompt_key``) and ``messages``."""
    rows = _read_rows(source, _prompt_check(prompt_key))
    return datasets.Dataset.from_list(rows, features=datasets.Features({"prompt": _STR, "messages": _MESSAGES}))


def load_sft_dataset(
    source: str | os.PathLike[str], *, prompt_key: str = "prompt", response_key: str = "response"
) -> datasets.Dataset:
    """Demonstrations: columns ``prompt``, ``response`` (no EOS text) and ``messages``."""
    rows = _read_rows(source, _sft_check(prompt_key, response_key))
    features = datasets.Features({"prompt": _STR, "response": _STR, "messages": _MESSAGES})
    return datasets.Dataset.from_list(rows, features=features)


def load_comparison_dataset(source: str | os.PathLike[str]) -> datasets.Dataset:
    """Preferences: columns ``prompt``, ``messages``, ``completions`` (best -> worst)."""
    rows = _read_rows(source, _comparison_check)
    features = datasets.Features({"prompt": _STR, "messages": _MESSAGES, "completions": datasets.List(_STR)})
    return datasets.Dataset.from_list(rows, features=features)


def prompt_inputs(ds: datasets.Dataset) -> list[PromptInput]:
    """Each row's prompt as raw text or as its message list (what the tokenization takes)."""
    return [m if m else p for p, m in zip(ds["prompt"], ds["messages"], strict=True)]


# --------------------------------------------------------------------------- tokenization

PromptLengthPolicy = Literal["truncate", "skip", "error"]


def tokenize_prompts_with_index(
    tokenizer: Any, prompts: Sequence[PromptInput], max_prompt_len: int, policy: PromptLengthPolicy = "truncate"
) -> tuple[list[list[int]], list[int]]:
    """Token ids of the kept prompts and the indices (into ``prompts``) they came from.

    Raw-text prompts get the tokenizer's own special tokens (a BOS for tokenizers
    that use one, nothing for the built-in character tokenizer), as vLLM does for
    text prompts; message lists are rendered with the chat template
    (:func:`rlhf_ray.data.chat.prompt_token_ids`). Too-long prompts are, by ``policy``:

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
    try:
        encoded = prompt_token_ids(tokenizer, prompts)
    except ChatError as e:
        raise DataError(f"prompts: {e}") from e
    bos = getattr(tokenizer, "bos_token_id", None)
    kept_ids: list[list[int]] = []
    kept_index: list[int] = []
    for i, ids in enumerate(encoded):
        ids = list(ids)
        if len(ids) > max_prompt_len:
            if policy == "error":
                raise DataError(
                    f"prompt {i} has {len(ids)} tokens, more than max_prompt_len={max_prompt_len}: {str(prompts[i])[:80]!r}"
                )
            if policy == "skip":
                continue
            head = ids[:1] if bos is not None and ids[0] == bos and max_prompt_len > 1 else []
            ids = head + ids[len(ids) - (max_prompt_len - len(head)) :]
        kept_ids.append(ids)
        kept_index.append(i)
    return kept_ids, kept_index


def tokenize_prompts(
    tokenizer: Any, prompts: Sequence[PromptInput], max_prompt_len: int, policy: PromptLengthPolicy = "truncate"
) -> tuple[list[list[int]], int]:
    """``(token_id_lists, n_skipped)``; see :func:`tokenize_prompts_with_index` for the policies.

    With ``"skip"`` the kept prompts stay in input order; use
    :func:`tokenize_prompts_with_index` to know which ones they are.
    """
    ids, kept = tokenize_prompts_with_index(tokenizer, prompts, max_prompt_len, policy)
    return ids, len(prompts) - len(kept)
