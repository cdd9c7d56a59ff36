"""Chat rows and data sources: message lists validated with file:line errors, rendered with the
tokenizer's chat template (the built-in tokenizer ships one), SFT loss masked to assistant
turns, and rows read from JSONL, parquet, save_to_disk directories and ``hf:`` datasets."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from rlhf_ray.data import (
    ChatError,
    DataError,
    encode_conversation,
    load_comparison_dataset,
    load_prompt_dataset,
    load_sft_dataset,
    prompt_inputs,
    prompt_token_ids,
    render_prompt,
    tokenize_prompts_with_index,
)
from rlhf_ray.models import build_char_tokenizer
from rlhf_ray.workers.supervised import encode_demonstrations, encode_rankings

EOS = 2


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _jsonl(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_builtin_template_renders_turns(tok) -> None:
    msgs = [{"role": "system", "content": "sys"}, user("rev ab="), bot("ba"), user("rev cd=")]
    assert render_prompt(tok, msgs) == "sys\nrev ab=ba<eos>rev cd="
    ids = prompt_token_ids(tok, [msgs])[0]
    # the earlier assistant turn's EOS is the EOS token id (not the five characters "<eos>")
    assert ids.count(EOS) == 1 and len(ids) == len("sys\nrev ab=ba") + 1 + len("rev cd=")
    # raw text stays raw: no template applied
    assert prompt_token_ids(tok, ["rev ab="]) == [tok("rev ab=")["input_ids"]]


def test_no_template_is_a_clear_error(tok) -> None:
    plain = build_char_tokenizer()
    plain.chat_template = None
    with pytest.raises(ChatError, match="has no chat template"):
        prompt_token_ids(plain, [[user("x")]])
    with pytest.raises(DataError, match="no chat template"):
        tokenize_prompts_with_index(plain, [[user("x")]], 8)


def test_sft_mask_covers_every_assistant_turn(tok) -> None:
    ids, mask = encode_conversation(tok, [user("ab="), bot("ba"), user("c="), bot("c")])
    assert tok.decode(ids) == "ab=ba<eos>c=c<eos>"
    # positions:               a  b  =  b  a  E  c  =  c  E
    assert mask == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    batch = encode_demonstrations(tok, ["", "x="], ["", "y"], 16,
                                  messages=[[user("ab="), bot("ba")], []])
    assert batch.input_ids[0, :6].tolist() == tok("ab=ba")["input_ids"] + [EOS]
    assert batch.loss_mask[0].tolist()[:6] == [0, 0, 0, 1, 1, 1]
    # a raw row next to it keeps the old layout: prompt | response EOS
    assert batch.loss_mask[1].tolist()[:4] == [0, 0, 1, 1]


def test_chat_rankings_use_the_rendered_prompt(tok) -> None:
    batch = encode_rankings(tok, ["", "p="], [["ba", "ab"], ["q", "r"]], 16,
                            messages=[[{"role": "system", "content": "s"}, user("ab=")], []])
    assert tok.decode(batch.input_ids[0, 0][batch.attention_mask[0, 0].bool()]) == "s\nab=ba"
    assert tok.decode(batch.input_ids[1, 1][batch.attention_mask[1, 1].bool()]) == "p=r"


def test_prompt_rows_raw_and_chat(tmp_path: Path, tok) -> None:
    path = _jsonl(tmp_path, [{"prompt": "rev ab="}, {"messages": [user("rev cd=")]},
                             {"prompt": [user("rev ef=")]}])
    ds = load_prompt_dataset(path)
    assert prompt_inputs(ds) == ["rev ab=", [user("rev cd=")], [user("rev ef=")]]
    ids, kept = tokenize_prompts_with_index(tok, prompt_inputs(ds), 24)
    assert kept == [0, 1, 2] and [tok.decode(i) for i in ids] == ["rev ab=", "rev cd=", "rev ef="]


@pytest.mark.parametrize(("row", "expected"), [
    ({"messages": [user("a"), bot("b")]}, "messages must end with a turn of role 'user', the last one is 'assistant'"),
    ({"messages": []}, "field 'messages' must be a non-empty list of messages, got list (empty)"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string, got int"),
    ({"messages": ["hi"]}, "messages[0] must be an object with 'role' and 'content', got str"),
])
def test_bad_chat_prompt_rows_name_file_line(tmp_path: Path, row: dict, expected: str) -> None:
    path = _jsonl(tmp_path, [{"messages": [user("ok")]}, row])
    with pytest.raises(DataError) as info:
        load_prompt_dataset(path)
    assert str(info.value).startswith(f"{path}:2: ") and expected in str(info.value)


def test_sft_chat_rows(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"messages": [user("a="), bot("a")]}, {"prompt": "b=", "response": "b"},
                             {"messages": [user("c=")]}])
    with pytest.raises(DataError, match=rf"{path}:3: messages must end with a turn of role 'assistant'"):
        load_sft_dataset(path)
    ds = load_sft_dataset(_jsonl(tmp_path, [{"messages": [user("a="), bot("a")]}, {"prompt": "b=", "response": "b"}]))
    assert ds.to_list() == [{"prompt": "", "response": "", "messages": [user("a="), bot("a")]},
                            {"prompt": "b=", "response": "b", "messages": []}]


def test_preference_formats(tmp_path: Path) -> None:
    rows = [
        # UltraFeedback / HH style: two whole conversations sharing the prompt turns
        {"chosen": [user("ab="), bot("ba")], "rejected": [user("ab="), bot("ab")]},
        # TRL conversational style: prompt messages + assistant-only replies
        {"prompt": [user("cd=")], "chosen": [bot("dc")], "rejected": [bot("cd")]},
        # ranked list of assistant replies to a chat prompt
        {"messages": [user("ef=")], "completions": ["fe", {"role": "assistant", "content": "ee"}, [bot("ef")]]},
        {"prompt": "gh=", "chosen": "hg", "rejected": "gh"},
    ]
    ds = load_comparison_dataset(_jsonl(tmp_path, rows))
    assert ds["messages"] == [[user("ab=")], [user("cd=")], [user("ef=")], []]
    assert ds["completions"] == [["ba", "ab"], ["dc", "cd"], ["fe", "ee", "ef"], ["hg", "gh"]]
    assert ds["prompt"] == ["", "", "", "gh="]
    bad = _jsonl(tmp_path, rows[:1] + [{"chosen": [user("x="), bot("a")], "rejected": [user("y="), bot("b")]},
                                       {"prompt": "p", "chosen": [user("x")], "rejected": "b"}], "bad.jsonl")
    with pytest.raises(DataError) as info:
        load_comparison_dataset(bad)
    assert info.value.problems == [
        f"{bad}:2: 'chosen' and 'rejected' conversations differ before their last turn",
        f"{bad}:3: 'chosen' must end with a turn of role 'assistant', the last one is 'user'",
    ]


def test_sources_parquet_saved_dir_and_hf(tmp_path: Path) -> None:
    rows = [{"messages": [user("rev ab=")]}, {"messages": [user("rev cd=")]}]
    expected = [[user("rev ab=")], [user("rev cd=")]]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    assert prompt_inputs(load_prompt_dataset(tmp_path / "p.parquet")) == expected
    # a save_to_disk directory, and a DatasetDict that needs ?split=
    ds.save_to_disk(str(tmp_path / "saved"))
    assert prompt_inputs(load_prompt_dataset(tmp_path / "saved")) == expected
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    assert prompt_inputs(load_prompt_dataset(f"{tmp_path / 'dd'}?split=test")) == expected[1:]
    with pytest.raises(DataError, match=r"a DatasetDict with splits \['test', 'train'\]; name one as .*\?split=NAME"):
        load_prompt_dataset(tmp_path / "dd")
    # hf:NAME goes through datasets.load_dataset (here a local data directory: no hub is reachable)
    (tmp_path / "hub").mkdir()
    _jsonl(tmp_path / "hub", rows, "train.jsonl")
    _jsonl(tmp_path / "hub", rows + [{"messages": [{"role": "robot", "content": "x"}]}], "test.jsonl")
    assert prompt_inputs(load_prompt_dataset(f"hf:{tmp_path / 'hub'}")) == expected
    with pytest.raises(DataError, match=rf"^hf:{tmp_path / 'hub'}\[test\]:row 2: messages\[0\].role must be one of"):
        load_prompt_dataset(f"hf:{tmp_path / 'hub'}?split=test")
    with pytest.raises(DataError, match=r"load_dataset\('.*nope', None, split='train'\) failed"):
        load_prompt_dataset(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match=r"unknown option\(s\) \['splt'\]"):
        load_prompt_dataset(f"{tmp_path / 'saved'}?splt=x")
