#!/usr/bin/env bash
# Submit a training run to a running Ray cluster as a Ray job, shipping this repository as the
# job's working_dir (deploy/runtime_env.yaml says what is left out). Arguments are Hydra
# overrides of `python -m rlhf_ray.train`; logs stream here until the job ends (Ctrl-C detaches,
# the job keeps running: `ray job logs -f <id>` / `ray job stop <id>`).
#
#   RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 deploy/submit.sh algo=grpo trainer.total_steps=200 \
#       trainer.output_dir=/shared/runs/grpo-1 model.cache_dir=/shared/cache
#
# Token authentication is on: RAY_AUTH_MODE=token, with the cluster's token in RAY_AUTH_TOKEN, or
# in the file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (`ray get-auth-token`). The
# token never goes into the job's runtime_env. RAY_AUTH_MODE=disabled only for throwaway clusters.
# JOB_PYTHON (default `python`) is the interpreter on the cluster; RAY the local `ray` CLI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} && ! -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
  echo "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (see README, Security)" >&2
  exit 2
fi
ADDRESS=${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}
if [[ -z ${RAY:-} ]]; then
  if [[ -x .venv/bin/ray ]]; then RAY=.venv/bin/ray; else RAY=ray; fi
fi
# `ray job submit` joins the entrypoint words with spaces and runs them through a shell on the
# cluster: quote every override so values with spaces or shell characters arrive intact.
quoted=()
for arg in "$@"; do quoted+=("$(printf '%q' "$arg")"); done
exec "$RAY" job submit --address "$ADDRESS" --runtime-env deploy/runtime_env.yaml --working-dir . \
  -- "${JOB_PYTHON:-python}" -m rlhf_ray.train "${quoted[@]}"
