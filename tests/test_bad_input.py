"""Bad input stops a run with a named error before any worker starts."""

from __future__ import annotations

import json

import pytest

from rlhf_ray.data import DataError
from rlhf_ray.models import build_char_tokenizer, ensure_tiny_llama
from rlhf_ray.train import run
from tests.conftest import compose


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    """Each of these errors must come before the run touches Ray or starts a worker."""

    def connect(*args, **kwargs):
        raise AssertionError("bad input reached the Ray connection")

    monkeypatch.setattr("rlhf_ray.runtime.connect", connect)


def test_malformed_prompt_file_names_file_and_line(tmp_path, cache_dir):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"prompt": "rev abc="}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    cfg = compose([f"model.cache_dir={cache_dir}", f"data.train_prompts={bad}", f"data.eval_prompts={bad}"])
    with pytest.raises(DataError, match=r"prompts.jsonl:2: .*prompt"):
        run(cfg, tmp_path / "run")


def test_empty_after_overlong_filter(tmp_path, cache_dir):
    cfg = compose([f"model.cache_dir={cache_dir}", "data.max_prompt_len=2", "data.overlong_prompt=skip"])
    with pytest.raises(DataError, match="no prompts left"):
        run(cfg, tmp_path / "run")


def test_overlong_prompt_error_policy(tmp_path, cache_dir):
    cfg = compose([f"model.cache_dir={cache_dir}", "data.max_prompt_len=4", "data.overlong_prompt=error"])
    with pytest.raises(DataError, match="max_prompt_len=4"):
        run(cfg, tmp_path / "run")


def test_tokenizer_that_does_not_fit_the_model(tmp_path, cache_dir):
    model = ensure_tiny_llama(tmp_path / "small-vocab", hidden_size=32, num_layers=1, num_heads=2, alphabet="abc")
    build_char_tokenizer().save_pretrained(str(model))  # 100 ids for a model with a handful of rows
    cfg = compose([f"model.cache_dir={cache_dir}", f"model.policy_path={model}"])
    with pytest.raises(ValueError, match="embedding rows"):
        run(cfg, tmp_path / "run")
