"""Every entry point (train, sft, reward_model, evaluate, pipeline) turns bad input into one
``error: ...`` line per problem on stderr, naming the key or file:line, no traceback, exit
status 2, before any worker starts. The runs are real processes, started all at once (forked
from one interpreter that imported their dependencies once: tests/forked_cli.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cases(model: Path, empty: Path, files: dict[str, Path]) -> dict[str, list[str]]:
    """name -> command line (``python -m``) of each bad-input run."""
    return {
        "train_config": ["rlhf_ray.train", "rollout.top_p=2", "trainer.eval_every=-1"],
        "train_data": ["rlhf_ray.train", f"model.policy_path={model}", f"data.train_prompts={files['prompts']}",
                       f"data.eval_prompts={files['prompts']}"],
        "train_model_dir": ["rlhf_ray.train", f"model.policy_path={empty}"],
        "sft_config": ["rlhf_ray.sft", "epochs=0"],
        "sft_data": ["rlhf_ray.sft", f"model.policy_path={model}", f"data.train_file={files['sft']}"],
        "reward_model_data": ["rlhf_ray.reward_model", f"model.policy_path={model}",
                              f"data.train_file={files['comparisons']}"],
        "evaluate_model_dir": ["rlhf_ray.evaluate", f"policies=[{model},{empty}]"],
        "evaluate_data": ["rlhf_ray.evaluate", f"policies=[{model}]", f"prompts_file={files['prompts']}"],
        "pipeline_config": ["rlhf_ray.pipeline", "sft.epochs=0", "ppo.rollout.temperature=0"],
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    from rlhf_ray.models import ensure_tiny_llama

    tmp = tmp_path_factory.mktemp("entry_errors")
    model = ensure_tiny_llama(tmp / "model", hidden_size=32, num_layers=1, num_heads=1, max_position_embeddings=64)
    (empty := tmp / "empty").mkdir()
    files = {"prompts": tmp / "prompts.jsonl", "sft": tmp / "sft.jsonl", "comparisons": tmp / "cmp.jsonl"}
    files["prompts"].write_text(json.dumps({"prompt": "rev ab="}) + "\n" + json.dumps({"prompt": 7}) + "\n")
    files["sft"].write_text(json.dumps({"prompt": "rev ab=", "response": "ba"}) + "\n{not json\n")
    files["comparisons"].write_text(json.dumps({"prompt": "rev ab=", "completions": ["ba"]}) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    spec = {name: [*argv, f"hydra.run.dir={tmp / name}"] for name, argv in cases(model, empty, files).items()}
    (tmp / "spec.json").write_text(json.dumps(spec))
    (logs := tmp / "logs").mkdir()
    # all at once, each a real process forked from one interpreter that imported the heavy
    # dependencies once (tests/forked_cli.py: ~5 s of imports each otherwise)
    forked = subprocess.run([sys.executable, str(REPO / "tests" / "forked_cli.py"), str(tmp / "spec.json"), str(logs)],
                            cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert forked.returncode == 0, forked.stderr[-3000:]
    codes = json.loads(forked.stdout.splitlines()[-1])
    return {name: subprocess.CompletedProcess(["python", "-m", *spec[name]], codes[name],
                                              (logs / f"{name}.stdout").read_text(), (logs / f"{name}.stderr").read_text())
            for name in spec}


EXPECTED = {  # name -> every line the run must print on stderr (regex, in order)
    "train_config": [r"error: rollout.top_p: must be in \(0, 1\], got 2.0",
                     r"error: trainer.eval_every: must be >= 0, got -1"],
    "train_data": [r"error: .*prompts.jsonl:2: field 'prompt' must be a string, got int"],
    "train_model_dir": [r"error: model.policy_path: .*empty holds no model \(no config.json, no \*.safetensors"],
    "sft_config": [r"error: epochs: must be >= 1"],
    "sft_data": [r"error: .*sft.jsonl:2: .*JSON"],
    "reward_model_data": [r"error: .*cmp.jsonl:1: field 'completions' needs at least 2 ranked completions"],
    "evaluate_model_dir": [r"error: policies\[1\]: .*empty holds no model"],
    "evaluate_data": [r"error: .*prompts.jsonl:2: field 'prompt' must be a string"],
    "pipeline_config": [r"error: sft.epochs: must be >= 1", r"error: ppo.rollout.temperature: must be > 0",
                        r"error: eval.rollout.temperature: must be > 0"],  # eval samples at ppo's temperature
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bad_input_is_one_line_per_problem_and_exit_2(results, name):
    import re

    r = results[name]
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == len(EXPECTED[name]), r.stderr[-3000:]
    for line, pattern in zip(lines, EXPECTED[name], strict=True):
        assert re.match(pattern, line), (line, pattern)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
