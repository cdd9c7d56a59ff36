"""Thin workers, one class per role. Plain classes: ``ray.remote`` is applied where a group
spawns them (``rlhf_ray.groups``), so each can be built and tested without Ray."""
