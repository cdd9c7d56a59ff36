"""A model path that holds no model is named as such before anything loads it."""

from __future__ import annotations

import pytest

from rlhf_ray.models import ModelDirError, check_model_dir, ensure_tiny_llama


def test_model_dir_problems_are_named(tmp_path):
    model = ensure_tiny_llama(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=1)
    check_model_dir(model, "model.policy_path", tokenizer=True)  # a complete directory passes
    check_model_dir("org/name", "model.policy_path")  # a hub name is left to Hugging Face

    (empty := tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match=r"^model.policy_path: .*empty holds no model \(no config.json, no "
                                            r"\*.safetensors weights\)$"):
        check_model_dir(empty, "model.policy_path")
    with pytest.raises(ModelDirError, match=r"^reward.model_path: .*nowhere: no such model directory$"):
        check_model_dir(tmp_path / "nowhere", "reward.model_path")
    with pytest.raises(ModelDirError, match="is a file"):
        check_model_dir(model / "config.json", "model.critic_path")

    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    check_model_dir(model, "model.reference_path")  # the reference needs no tokenizer of its own
    with pytest.raises(ModelDirError, match="not a complete model directory: no tokenizer files"):
        check_model_dir(model, "model.policy_path", tokenizer=True)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    with pytest.raises(ModelDirError, match=r"no \*.safetensors weights \(found \['pytorch_model.bin'\]"):
        check_model_dir(model, "model.policy_path")
