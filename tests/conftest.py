"""Shared fixtures: one local Ray cluster per test session, the built-in tiny model and task
data built once, and configs composed through Hydra exactly as the CLI composes them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Throwaway test clusters: no token file in the user's home, CPU DeepSpeed, quiet tokenizers.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Where the tiny model and task data are built (once per session)."""
    return tmp_path_factory.mktemp("rlhf_ray_cache")


def compose(overrides: list[str]):
    """A validated ``Config`` from conf/ + overrides, as ``python -m rlhf_ray.train`` builds it."""
    from rlhf_ray.train import compose_config

    return compose_config(overrides)


@pytest.fixture(scope="session")
def s3_env():
    """An S3-compatible server on loopback (moto, bucket ``rlhf-test``) for the session; its
    endpoint and throwaway credentials are in ``os.environ`` while it runs. Started before Ray,
    so every worker process inherits them, as a cluster's nodes carry their storage settings."""
    from tests.s3_server import s3_server

    with s3_server() as env:
        yield env


@pytest.fixture(scope="session")
def ray_cluster(s3_env):
    """A local Ray cluster shared by the tests that need workers (8 logical CPUs on 2 cores:
    workers pin one thread each, see cluster.threads_per_worker); its workers reach ``s3_env``."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, object_store_memory=512 * 2**20,
             namespace="rlhf_ray_tests", log_to_driver=False)
    yield ray
    ray.shutdown()
