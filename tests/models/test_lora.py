"""LoRA without Ray: adapters wrap the base, merged weights carry the base model's names and
reproduce the adapted model exactly, and disabling the adapters gives the base (the reference)."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import Config, LoRAConfig, ModelConfig, config_errors
from rlhf_ray.models import ensure_tiny_llama, load_causal_lm
from rlhf_ray.models.lora import apply_lora, merged_weights


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
