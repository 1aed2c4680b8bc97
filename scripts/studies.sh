#!/usr/bin/env bash
# Every study in reports/, in dependency order, on the SmolLM2 banks (build them first: scripts/banks.sh).
# Each sweep resumes (finished steps are skipped), so rerun this after an interruption. On 2 CPU cores the
# whole set takes hours; `ONLY="headline data-scaling"` runs a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
declare -A CONFIG=([headline]=headline [data-scaling]=data_scaling [trigger-inversion]=trigger_inversion
  [encoder-ablation]=encoder_ablation [ood-trigger]=ood_trigger [rank-generalization]=rank_generalization
  [cross-behavior]=cross_behavior [crosscoder-eval]=crosscoder_eval)
ORDER=(headline data-scaling trigger-inversion encoder-ablation ood-trigger rank-generalization cross-behavior
  crosscoder-eval)
for study in ${ONLY:-${ORDER[@]}}; do
  echo "=== $study $(date -u +%H:%M:%S)"
  $BIN/metadit sweep --config "configs/sweep/${CONFIG[$study]}.yaml" ${SWEEP_ARGS:-} || echo "($study: some cells failed; see above)"
  $BIN/metadit report --study "$study" || true
done
