"""LoRA on the policy (PEFT): wrapping the base model, and the views of it the other parts need.

* :func:`apply_lora`: the base model wrapped with trainable adapters (everything else frozen);
* :func:`merged_weights`: the weights with every adapter merged in, under the BASE model's
  Hugging Face names, which is what the rollout engines load (so vLLM serves the plain
  architecture, no adapter support needed) and what the merged export holds;
* :func:`adapter_weights` / :func:`adapter_config`: the adapter alone, as PEFT saves it
  (``adapter_model.safetensors`` names, ``adapter_config.json``), which is what the engines
  load as a vLLM LoRA adapter with ``model.lora.sync=adapter``;
* the reference policy is the same module with its adapters disabled
  (``model.disable_adapter()``): no second copy of the base weights anywhere.
"""

from __future__ import annotations

import torch

from rlhf_ray.config import VLLM_MAX_LORA_RANK, LoRAConfig

PEFT_PREFIX = "base_model.model."


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig) -> torch.nn.Module:
    """``model`` with LoRA adapters of ``cfg`` (rank > 0); only the adapters require grad."""
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=list(cfg.target_modules) or "all-linear",
    )
    return get_peft_model(model, peft_cfg)


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_name(peft_name: str) -> str:
    """A PEFT parameter name as the base model names it."""
    return peft_name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


@torch.no_grad()
def merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every base parameter with its adapter's update ``B @ A * alpha / r`` added (new tensors;
    the model is untouched), keyed by the base model's names. Adapter tensors are left out."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if ".lora_" not in name:
            out[base_name(name)] = param.detach()
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            key = base_name(f"{module_name}.base_layer.weight")
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            out[key] = out[key] + delta.to(out[key].dtype)
    return out


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors under the names PEFT saves them with (adapter name
    dropped, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}


def adapter_config(model: torch.nn.Module) -> dict:
    """The active adapter's ``adapter_config.json`` content (JSON types only)."""
    cfg = model.peft_config[model.active_adapter].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}


def lora_module_suffixes(model_path: str, cfg: LoRAConfig, trust_remote_code: bool = False) -> list[str]:
    """The last name parts of the modules the adapters wrap (``cfg.target_modules``, or for the
    default every linear layer but the output layer, as PEFT's ``all-linear`` resolves it),
    from the model's config on the meta device (no weights read). vLLM's
    ``lora_target_modules`` takes them: an engine that also wrapped the output layer computes
    prompt logprobs (the sync check) wrongly or not at all with LoRA (vLLM issues 16668, 51594)."""
    if cfg.target_modules:
        return sorted({m.rsplit(".", 1)[-1] for m in cfg.target_modules})
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    output = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear | Conv1D) and m is not output})


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds ``rank`` (it takes 1, 8, 16,
    32, ..., 512 only)."""
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, VLLM_MAX_LORA_RANK)
    if not 0 < rank <= allowed[-1]:
        raise ValueError(f"LoRA rank {rank}: vLLM serves ranks 1..{allowed[-1]}")
    return next(r for r in allowed if r >= rank)
