"""LoRA without Ray: adapters wrap the base, merged weights carry the base model's names and
reproduce the adapted model exactly, disabling the adapters gives the base (the reference), and
the adapter alone (``model.lora.sync=adapter``) is what PEFT saves, with a config vLLM accepts."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_ray.config import Config, LoRAConfig, ModelConfig, config_errors
from rlhf_ray.models import ensure_tiny_llama, load_causal_lm
from rlhf_ray.models.lora import (
    adapter_config,
    adapter_weights,
    apply_lora,
    lora_module_suffixes,
    merged_weights,
    vllm_max_lora_rank,
)


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return str(ensure_tiny_llama(cache_dir / "tiny-lora", hidden_size=64, num_layers=2, num_heads=2))


def test_merged_weights_reproduce_the_adapted_model(tiny):
    base = load_causal_lm(tiny)
    names = {n for n, _ in base.named_parameters()}
    model = apply_lora(load_causal_lm(tiny), LoRAConfig(rank=4, alpha=8.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():  # B starts at zero: give the adapters a real update
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    ids = torch.tensor([[5, 9, 14, 30, 2, 7, 8]])
    merged = merged_weights(model)
    assert set(merged) == names  # base names only, no adapter tensors
    fresh = load_causal_lm(tiny)
    fresh.load_state_dict(merged)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        torch.testing.assert_close(fresh(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():  # the reference policy: the untouched base
            torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
        assert (adapted - base(input_ids=ids).logits).abs().max() > 1e-2


def test_lora_config_checks():
    bad = Config(model=ModelConfig(lora=LoRAConfig(rank=4), reference_path="/elsewhere"))
    bad.policy.zero_stage = 3
    errors = config_errors(bad)
    assert any(e.startswith("model.reference_path: with LoRA") for e in errors)
    assert any(e.startswith("policy.zero_stage: LoRA") for e in errors)
    assert any(e.startswith("model.lora:") for e in config_errors(Config(model=ModelConfig(lora=LoRAConfig(rank=-1)))))
    for lora in (LoRAConfig(rank=0, sync="adapter"), LoRAConfig(rank=600, sync="adapter")):
        assert any(e.startswith("model.lora.sync: adapter needs") for e in config_errors(Config(model=ModelConfig(lora=lora))))
    assert any(e.startswith("model.lora.sync:") for e in config_errors(Config(model=ModelConfig(lora=LoRAConfig(sync="x")))))
    assert not config_errors(Config(model=ModelConfig(lora=LoRAConfig(rank=8, sync="adapter"))))
    head = Config(model=ModelConfig(lora=LoRAConfig(rank=8, sync="adapter", target_modules=["q_proj", "lm_head"])))
    assert any(e.startswith("model.lora.target_modules: with model.lora.sync=adapter") for e in config_errors(head))


def test_adapter_tensors_and_config_are_what_peft_saves_and_vllm_accepts(tiny, tmp_path):
    from safetensors.torch import load_file
    from vllm.config.lora import LoRAConfig as VllmLoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    model = apply_lora(load_causal_lm(tiny), LoRAConfig(rank=4, alpha=8.0))
    tensors = adapter_weights(model)
    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(tensors) == set(saved) and all(torch.equal(tensors[k], saved[k]) for k in saved)
    # 2 layers x 7 linear modules (q k v o gate up down) x (A, B); nothing of the base
    assert len(tensors) == 28 and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    config = json.loads(json.dumps(adapter_config(model)))  # goes over Ray and into a JSON file
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    # PEFT resolves "all-linear" to the module paths; vLLM matches the tensors' names instead
    assert {m.rsplit(".", 1)[-1] for m in config["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    PEFTHelper.from_dict(config).validate_legal(VllmLoRAConfig(max_lora_rank=vllm_max_lora_rank(4)))
    # the engine's module filter (from the config alone) is what PEFT adapted: no output layer
    assert lora_module_suffixes(tiny, LoRAConfig(rank=4)) == sorted({m.rsplit(".", 1)[-1] for m in config["target_modules"]})
    assert lora_module_suffixes(tiny, LoRAConfig(rank=4, target_modules=["q_proj", "model.layers.0.mlp.up_proj"])) == [
        "q_proj", "up_proj"]


def test_vllm_max_lora_rank_is_the_smallest_allowed_above():
    # vLLM takes max_lora_rank in {1, 8, 16, 32, 64, 128, 256, 320, 512}
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ValueError, match="ranks 1..512"):
        vllm_max_lora_rank(513)
