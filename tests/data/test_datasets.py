"""Tests for rlhf_ray.data.datasets: validation errors name file:line and field; normalisation; tokenization."""

from pathlib import Path

import datasets
import pytest

from rlhf_ray.data.datasets import (
    MAX_REPORTED,
    DataError,
    load_comparison_dataset,
    load_prompt_dataset,
    load_sft_dataset,
    tokenize_prompts,
    tokenize_prompts_with_index,
)
from rlhf_ray.models.tokenizer import build_char_tokenizer

GOOD_SFT = b'{"prompt": "rev abc=", "response": "cba"}\n'


def _write(tmp_path: Path, content: bytes, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("line2", "expected"),
    [
        (b'{"prompt": "rev abc=", "response": "cba"', "invalid JSON"),
        (b'{"prompt": "rev abc="}', "missing field 'response'"),
        (b'{"prompt": "rev abc=", "response": 5}', "field 'response' must be a string, got int"),
        (b'{"prompt": "", "response": "cba"}', "field 'prompt' is an empty string"),
        (b'{"prompt": "rev \xff\xfe=", "response": "cba"}', "invalid UTF-8"),
        (b'["rev abc=", "cba"]', "row must be a JSON object, got list"),
    ],
)
def test_sft_row_errors_name_file_line_and_field(tmp_path: Path, line2: bytes, expected: str) -> None:
    path = _write(tmp_path, GOOD_SFT + line2 + b"\n" + GOOD_SFT)
    with pytest.raises(DataError) as info:
        load_sft_dataset(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ")
    assert expected in message
    assert info.value.problems == [message]


def test_custom_keys_and_blank_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path, b'\n{"q": "rev ab=", "a": "ba", "extra": 1}\n\n   \n{"q": "rev abc=", "a": "cba"}\n'
    )
    ds = load_sft_dataset(path, prompt_key="q", response_key="a")
    assert ds.column_names == ["prompt", "response", "messages"]
    assert ds.to_list() == [
        {"prompt": "rev ab=", "response": "ba", "messages": []},
        {"prompt": "rev abc=", "response": "cba", "messages": []},
    ]
    with pytest.raises(DataError, match=r"data\.jsonl:2: missing field 'prompt'"):
        load_prompt_dataset(path)


def test_prompt_dataset(tmp_path: Path) -> None:
    path = _write(tmp_path, b'\xef\xbb\xbf{"prompt": "rev ab="}\r\n{"prompt": "rev abc="}\r\n')
    ds = load_prompt_dataset(path)
    assert isinstance(ds, datasets.Dataset)
    assert ds["prompt"] == ["rev ab=", "rev abc="]


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    for content in (b"", b"\n\n  \n"):
        path = _write(tmp_path, content)
        with pytest.raises(DataError, match=rf"^{path}: no rows"):
            load_prompt_dataset(path)


def test_missing_file_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_prompt_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_prompt_dataset(_write(tmp_path, b"prompt\nx\n", "data.csv"))


def test_many_bad_rows_reported_together(tmp_path: Path) -> None:
    lines = [b'{"prompt": "ok"}'] + [b'{"prompt": 1}'] * 14
    path = _write(tmp_path, b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as info:
        load_prompt_dataset(path)
    assert len(info.value.problems) == MAX_REPORTED
    assert info.value.problems[0] == f"{path}:2: field 'prompt' must be a string, got int"
    assert info.value.problems[-1].startswith(f"{path}:11: ")
    assert str(info.value).endswith(f"... and 4 more bad rows in {path}")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            b'{"prompt": "p", "completions": ["a"]}',
            "field 'completions' needs at least 2 ranked completions, got 1",
        ),
        (b'{"prompt": "p", "completions": ["a", 3]}',
         "field 'completions' item 1 must be a string or a message list, got int"),
        (b'{"prompt": "p", "completions": ["a", ""]}', "field 'completions' item 1 is an empty string"),
        (b'{"prompt": "p", "completions": "ab"}', "field 'completions' must be a list of strings, got str"),
        (b'{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
        (b'{"prompt": "p"}', "missing field 'completions' (or the pair 'chosen'/'rejected')"),
        (b'{"completions": ["a", "b"]}', "missing field 'prompt'"),
    ],
)
def test_comparison_row_errors(tmp_path: Path, row: bytes, expected: str) -> None:
    good = b'{"prompt": "p", "completions": ["a", "b"]}\n'
    path = _write(tmp_path, good + good + row + b"\n")
    with pytest.raises(DataError) as info:
        load_comparison_dataset(path)
    assert str(info.value) == f"{path}:3: {expected}"


def test_chosen_rejected_normalised(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        b'{"prompt": "rev ab=", "chosen": "ba", "rejected": "ab"}\n'
        b'{"prompt": "rev abc=", "completions": ["cba", "cbb", "abc"]}\n',
    )
    ds = load_comparison_dataset(path)
    assert ds.column_names == ["prompt", "messages", "completions"]
    assert ds.to_list() == [
        {"prompt": "rev ab=", "messages": [], "completions": ["ba", "ab"]},
        {"prompt": "rev abc=", "messages": [], "completions": ["cba", "cbb", "abc"]},
    ]


def test_parquet_round_trip_and_errors(tmp_path: Path) -> None:
    rows = [
        {"prompt": "rev ab=", "chosen": "ba", "rejected": "ab"},
        {"prompt": "rev abc=", "chosen": "cba", "rejected": "abc"},
    ]
    path = tmp_path / "prefs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    ds = load_comparison_dataset(path)
    assert ds["completions"] == [["ba", "ab"], ["cba", "abc"]]

    bad = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(
        [{"prompt": "rev ab=", "response": "ba"}, {"prompt": "", "response": "x"}]
    ).to_parquet(str(bad))
    assert len(load_prompt_dataset(bad, prompt_key="response")) == 2
    with pytest.raises(DataError, match=rf"^{bad}:row 1: field 'prompt' is an empty string$"):
        load_sft_dataset(bad)


def test_tokenize_prompts_policies() -> None:
    tok = build_char_tokenizer()
    prompts = ["rev ab=", "rev abcdef=", "rev abc="]  # 7, 11, 8 characters = tokens

    ids, skipped = tokenize_prompts(tok, prompts, 8, "truncate")
    assert skipped == 0
    # Cut from the left: the end of the prompt (where the answer starts) is kept.
    assert [tok.decode(x) for x in ids] == ["rev ab=", " abcdef=", "rev abc="]
    assert all(len(x) <= 8 for x in ids)

    ids, skipped = tokenize_prompts(tok, prompts, 8, "skip")
    assert skipped == 1 and [tok.decode(x) for x in ids] == ["rev ab=", "rev abc="]
    assert tokenize_prompts_with_index(tok, prompts, 8, "skip")[1] == [0, 2]

    with pytest.raises(DataError, match="prompt 1 has 11 tokens, more than max_prompt_len=8"):
        tokenize_prompts(tok, prompts, 8, "error")
    assert tokenize_prompts(tok, prompts, 11, "error")[1] == 0
    with pytest.raises(ValueError, match="policy must be"):
        tokenize_prompts(tok, prompts, 8, "drop")  # type: ignore[arg-type]
    assert tokenize_prompts(tok, [], 8) == ([], 0)


def test_tokenize_prompts_truncation_keeps_bos() -> None:
    class BosTokenizer:
        """Adds a BOS like Llama tokenizers do."""

        bos_token_id = 1

        def __call__(self, text: str) -> dict[str, list[int]]:
            return {"input_ids": [1] + [ord(c) for c in text]}

    ids, _ = tokenize_prompts(BosTokenizer(), ["abcdef"], 4, "truncate")
    assert ids == [[1, ord("d"), ord("e"), ord("f")]]
