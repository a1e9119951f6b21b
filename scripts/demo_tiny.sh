#!/usr/bin/env bash
# Set everything up, then run the paper's pipeline (DPO -> reverse DPO -> AlignDistil off-
# and on-policy) on a tiny random model and synthetic data. Offline, about a minute on a
# laptop CPU. It proves the machinery end to end; it does not show the method working
# (the model is random) - the SmolLM2 quickstart does that.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
aligndistil make-tiny --out outputs/tiny
aligndistil pipeline --config configs/pipelines/tiny.yaml
for stage in dpo reverse_dpo aligndistil_off_policy aligndistil_on_policy; do
  echo "== $stage: last logged step"
  tail -n 1 "outputs/tiny/pipeline/$stage/metrics.jsonl"
done
