"""Stop conditions: the EOS ids of a model's generation_config (one or several) plus the
configured stop ids and strings end up in the SamplingParams every engine uses."""

from __future__ import annotations

import json

import pytest

from rlhf_ray.config import RolloutConfig
from rlhf_ray.sampling import generation_eos_ids, sampling_params, stop_token_ids


def test_stops_from_generation_config_and_config(tmp_path):
    one, several, none = tmp_path / "one", tmp_path / "several", tmp_path / "none"
    for d in (one, several, none):
        d.mkdir()
    (one / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    (several / "generation_config.json").write_text(json.dumps({"eos_token_id": [128009, 128001]}))
    (none / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert generation_eos_ids(str(one)) == (2,)
    assert generation_eos_ids(str(several)) == (128001, 128009)
    assert generation_eos_ids(str(none)) == ()
    cfg = RolloutConfig(stop_token_ids=[7, 2], stop=["</answer>"], n_samples_per_prompt=3, max_new_tokens=5)
    assert stop_token_ids(cfg, str(one)) == [2, 7]
    assert stop_token_ids(cfg, str(several)) == [2, 7, 128001, 128009]
    pytest.importorskip("vllm")
    p = sampling_params(cfg, str(several), seed=11)
    assert (p.n, p.max_tokens, p.seed, p.logprobs) == (3, 5, 11, 0)
    assert sorted(p.stop_token_ids) == [2, 7, 128001, 128009] and p.stop == ["</answer>"]
    assert p.detokenize  # stop strings are matched on the decoded text
    plain = sampling_params(RolloutConfig(), str(one), seed=0, n=1)
    assert plain.stop in (None, []) and not plain.detokenize  # token ids only: nothing to decode
