#!/usr/bin/env bash
# Every SmolLM2 bank the studies read (scripts/studies.sh), with the sizes reports/ used. Each command resumes
# (finished diffs are skipped), so rerun this after an interruption; one at a time on 2 cores.
# Wall time here: the hidden-topic recipe of configs/gen/smol_topic.yaml ~63 diffs/hour in fp32 on an AVX2 CPU
# (reports/bench/build.json), ~1 h per 97 news diffs (reports/gen/README.md).
# `ONLY="rank ood"` builds a subset: topic news rank ood full gate.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
for part in ${ONLY:-topic news rank ood full gate}; do
  echo "=== $part $(date -u +%H:%M:%S)"
  case $part in
    topic) $BIN/metadit gen --config configs/gen/smol_topic.yaml --n_diffs "${TOPIC_DIFFS:-640}" ;;
    news) $BIN/metadit gen --config configs/gen/smol_news.yaml --n_diffs "${NEWS_DIFFS:-96}" ;;
    rank)  # rank generalization: 8 diffs per rank, topics disjoint from banks/smol_topic's (seed 1)
      for r in 2 4 8 16; do
        $BIN/metadit gen --config configs/gen/smol_rank.yaml --train.rank "$r" --bank "banks/smol_rank$r" \
          --n_diffs 8 --diffs_per_pass 8
      done ;;
    ood)  # zero-width-space triggers
      for t in zwsp_start zwsp_random; do
        $BIN/metadit gen --config configs/gen/smol_topic.yaml --recipe.init_args.trigger "$t" \
          --bank "banks/smol_topic_$t" --n_diffs 8 --diffs_per_pass 8 --seed 1
      done ;;
    full) $BIN/metadit gen --config configs/gen/smol_full.yaml --bank banks/smol_rankfull --n_diffs 4 ;;
    gate)  # the KL-weight experiment (reports/gen): banks/smol_topic's first 24 specs with negatives weighted 3x / 10x
      for w in 3 10; do
        $BIN/metadit gen --config configs/gen/smol_topic.yaml --bank "banks/gate_kl$w" --train.kl_weight "$w" \
          --n_diffs 8 --diffs_per_pass 8
        $BIN/metadit gen --config configs/gen/smol_topic.yaml --bank "banks/gate_kl$w" --train.kl_weight "$w" \
          --n_diffs 24 --diffs_per_pass 16
      done ;;
    *) echo "unknown part $part (topic news rank ood full gate)" >&2; exit 2 ;;
  esac
done
