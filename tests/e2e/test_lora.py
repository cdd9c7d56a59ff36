"""LoRA end to end on the real stack: PEFT adapters trained on the DeepSpeed rank, the reference
served by the same rank with its adapters disabled (no reference worker), the policy synced to
vLLM with the logprob check either as merged weights or as a vLLM LoRA adapter
(``model.lora.sync``), checkpoints holding the adapter, and a final export with the adapter and
a merged model that transformers and vLLM load as is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_ray import checkpoint as ckpt
from rlhf_ray.placement import resource_plan
from rlhf_ray.train import run
from tests.conftest import compose
from tests.e2e.exports import assert_causal_lm_export

pytestmark = pytest.mark.e2e


def tensor_bytes(path: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(str(path)).values())


@pytest.mark.parametrize("sync", ["merged", "adapter"])
def test_lora_grpo_two_steps(ray_cluster, tmp_path, cache_dir, sync):
    cfg = compose([f"model.lora.sync={sync}", f"trainer.output_dir={tmp_path}", f"model.cache_dir={cache_dir}", "algo=grpo",
                   "model.lora.rank=8", "model.lora.alpha=16", "rollout.num_engines=1", "policy.num_ranks=1",
                   "trainer.total_steps=2", "trainer.prompts_per_step=8", "trainer.save_every=1", "policy.lr=1e-2",
                   # the untrained policy earns ~0 reward (zero GRPO advantages): the entropy bonus
                   # makes sure the adapters move, so the reference must differ from the policy after it
                   "algo.entropy_coef=0.1"])
    assert "reference" not in {r.role for r in resource_plan(cfg)}
    summary = run(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and len(rows) == 2
    for r in rows:
        print(f"\nLoRA ({sync}) step {r['step']}: sync {r['sync/bytes'] / 1e6:.3f} MB in {r['sync/seconds']:.3f}s, "
              f"logprob diff {r['sync/check_logprob_diff']:.1e}, kl/mean {r['kl/mean']:.2e}, "
              f"mismatch_kl {r['rollout/mismatch_kl']:.1e}")
        assert r["sync/check_logprob_diff"] < 1e-4  # merged weights / the adapter in vLLM == adapted policy
    # KL of the rollout policy to the reference (before each update): zero at first (LoRA's B
    # starts at 0, so policy == base), then > 0 once the adapters have moved the policy
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["kl/mean"] > 1e-6
    # step 2's samples come from the synced policy: vLLM's behaviour logprobs are the learner's
    # (an engine that generated without the adapter would be off by about kl/mean, ~1 here)
    assert rows[1]["rollout/mismatch_kl"] < 1e-6
    # the checkpoint holds the adapter weights (what training changed)
    states = torch.load(Path(ckpt.latest(tmp_path / "checkpoints")) / "policy/ds/mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    assert any("lora_A" in k for k in states) and any("lora_B" in k for k in states)
    final = tmp_path / "final"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (final / "adapter").iterdir()}
    # the export is the same code in both modes (the merged model + the adapter): vLLM loads it
    # in one of them, transformers in both
    assert_causal_lm_export(final, with_vllm=sync == "merged")
    # the bytes each sync sends: the whole merged model, or the adapter alone
    sent = tensor_bytes(final / "adapter/adapter_model.safetensors" if sync == "adapter" else final / "model.safetensors")
    assert rows[0]["sync/bytes"] == sent
