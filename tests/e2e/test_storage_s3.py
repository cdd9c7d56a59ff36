"""A training run whose outputs live on S3 (the session's S3 server on loopback): the learner
rank SIGKILLed in the middle of uploading its step-2 checkpoint, which is left without its
COMPLETE marker; the next run resumes from step 1 (downloaded from S3), never from the partial
step 2, and finishes with checkpoints, metrics and a final model on S3 that users load as is."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rlhf_ray import checkpoint as ckpt
from rlhf_ray import storage
from rlhf_ray.calls import WorkerError
from rlhf_ray.train import run
from tests.conftest import compose
from tests.e2e.exports import assert_causal_lm_export

pytestmark = pytest.mark.e2e

OUT = "s3://rlhf-test/e2e-run"


def files(uri: str) -> list[str]:
    """Every object under ``uri``, relative to it (straight from the bucket)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    root = uri.removeprefix("s3://")
    return sorted(p[len(root) + 1 :] for p in fs.find(root))


def metric_rows() -> list[dict]:
    return [json.loads(x) for x in storage.read_text(storage.join(OUT, "metrics.jsonl")).splitlines()]


def test_run_on_s3_survives_a_kill_during_checkpoint_upload(ray_cluster, s3_env, tmp_path, cache_dir, monkeypatch,
                                                            caplog):
    root = storage.join(OUT, "checkpoints")
    step1, step2 = ckpt.step_dir(root, 1), ckpt.step_dir(root, 2)
    # max_restarts=0: the kill fails the run (the in-run restart is tested in test_faults.py);
    # the second run below is the resume, as a resubmitted job would do it
    cfg = compose([f"trainer.output_dir={OUT}", f"model.cache_dir={cache_dir}", "algo=grpo", "rollout.num_engines=1",
                   "policy.num_ranks=1", "trainer.prompts_per_step=8", "trainer.total_steps=2",
                   "trainer.save_every=1", "trainer.max_restarts=0"])
    # the learner rank uploads step 2's policy checkpoint (files sorted: the model states, the
    # optimizer states, its RNG states) and is SIGKILLed right after the first file
    monkeypatch.setenv("RLHF_RAY_FAULTS", f"storage@upload:{step2}/policy#1=kill")
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path))
    with pytest.raises(WorkerError, match="policy"):
        run(cfg, tmp_path / "local")
    assert (tmp_path / f"fired-storage@upload:{step2}/policy#1".replace("/", "_")).exists()
    assert ckpt.is_complete(step1) and ckpt.latest(root) == step1
    assert files(step2) == ["policy/ds/mp_rank_00_model_states.pt"]  # partial: no optimizer, RNG, driver state, marker
    assert not any(f.startswith("final/") for f in files(OUT))
    assert [r["step"] for r in metric_rows()] == [1]  # uploaded with checkpoint 1

    monkeypatch.delenv("RLHF_RAY_FAULTS")
    caplog.set_level(logging.INFO, logger="rlhf_ray")
    summary = run(cfg, tmp_path / "resubmitted")  # a new job: a new local staging directory
    assert f"resumed from {step1} at step 1 (" in caplog.text
    assert summary["steps"] == 2 and summary["final_model"] == storage.join(OUT, "final")
    assert ckpt.checkpoints(root) == [step1, step2]
    assert {"COMPLETE", "driver.json", "policy/ds/mp_rank_00_model_states.pt",  # (+ DeepSpeed's zero_to_*.py)
            "policy/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "policy/rng_rank0.json"} <= set(files(step2))
    assert ckpt.read_driver_state(step2)["step"] == 2
    assert [r["step"] for r in metric_rows()] == [1, 2]  # step 1's row from the first job
    assert json.loads(storage.read_text(storage.join(OUT, "summary.json")))["steps"] == 2
    with storage.fetched(storage.join(OUT, "final")) as final:
        assert_causal_lm_export(Path(final), with_vllm=False)  # vLLM loads exports: test_pipeline, test_lora
