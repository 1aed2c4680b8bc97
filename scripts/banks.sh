#!/usr/bin/env bash
# Every SmolLM2 bank the studies read (scripts/studies.sh), with the sizes the study configs need (topic 704, news 96). Each command resumes
# (finished diffs are skipped), so rerun this after an interruption; one at a time on 2 cores.
# Wall time here: the hidden-topic recipe of configs/gen/smol_topic.yaml ~63 diffs/hour in fp32 on an AVX2 CPU
# (reports/bench/build.json), ~1 h per 97 news diffs (reports/gen/README.md).
# `ONLY="rank ood"` builds a subset: topic news rank ood full openvocab gate (and tune, not in the default list: round 1
# of every generalization cell's tuning, which comes before its build; see the header of configs/gen/smol_cell_*.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
for part in ${ONLY:-topic news rank ood full openvocab gate}; do
  echo "=== $part $(date -u +%H:%M:%S)"
  case $part in
    topic) $BIN/metadit gen --config configs/gen/smol_topic.yaml --n_diffs "${TOPIC_DIFFS:-704}" ;;
    news) $BIN/metadit gen --config configs/gen/smol_news.yaml --n_diffs "${NEWS_DIFFS:-96}" ;;
    rank)  # rank generalization cells (issue 14): 24 diffs per rank, topics in no other cell nor in banks/smol_topic
      for r in 2 4 8 16; do $BIN/metadit gen --config "configs/gen/smol_cell_rank$r.yaml"; done ;;
    ood)  # zero-width-space trigger cells
      for t in zwsp_start zwsp_random; do $BIN/metadit gen --config "configs/gen/smol_cell_$t.yaml"; done ;;
    full) $BIN/metadit gen --config configs/gen/smol_cell_full.yaml ;;
    openvocab) $BIN/metadit gen --config configs/gen/smol_topic_openvocab.yaml ;;  # out-of-pool codes
    tune)  # round 1 of each cell's tuning: the 8 specs of block `tune`, seed 100 (later rounds: by hand, see the headers)
      for c in rank2 rank4 rank8 rank16 full zwsp_start zwsp_random; do
        $BIN/metadit gen --config "configs/gen/smol_cell_$c.yaml" --seed 100 --recipe.init_args.topic_block tune \
          --n_diffs 8 --bank "banks/tune/cell_${c}_r1"
      done ;;
    gate)  # the KL-weight experiment (reports/gen): banks/smol_topic's first 24 specs with negatives weighted 3x / 10x
      for w in 3 10; do
        $BIN/metadit gen --config configs/gen/smol_topic.yaml --bank "banks/gate_kl$w" --train.kl_weight "$w" \
          --n_diffs 8 --diffs_per_pass 8
        $BIN/metadit gen --config configs/gen/smol_topic.yaml --bank "banks/gate_kl$w" --train.kl_weight "$w" \
          --n_diffs 24 --diffs_per_pass 16
      done ;;
    *) echo "unknown part $part (topic news rank ood full openvocab gate tune)" >&2; exit 2 ;;
  esac
done
