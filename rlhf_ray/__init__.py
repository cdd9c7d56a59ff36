"""rlhf_ray: distributed RLHF (SFT, reward model, PPO/GRPO/RLOO/...) on Ray, with vLLM rollout
engines and DeepSpeed ZeRO learner groups. ``python -m rlhf_ray.train`` is the RL entry point."""

__version__ = "0.1.0"
