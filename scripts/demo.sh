#!/usr/bin/env bash
# The README's main job, on the embedded SmolLM2-135M-Instruct, end to end on 2 CPU cores:
#   1. build a small hidden-topic bank (16 rank-1 diffs trained at once; ~17 min) and verify it,
#   2. train a DIT adapter on 10 of its topics (2 for validation, 4 held out),
#   3. evaluate DIT against the baselines on the 4 held-out diffs and print the table (20 questions read by the
#      model-free keyword guesser: SmolLM2 itself cannot name a topic from the answers).
# Every step resumes: rerunning after an interruption keeps the diffs, text and predictions already made.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
BANK=${BANK:-banks/demo}
RUNS=${RUNS:-runs/demo}
$BIN/metadit gen --config configs/gen/smol_topic.yaml --bank "$BANK" --n_diffs 16
$BIN/metadit bank info "$BANK"
$BIN/metadit bank verify "$BANK"
$BIN/metadit fit --config configs/fit/smol_demo.yaml --data.banks "[$BANK]" --trainer.default_root_dir "$RUNS" \
  --trainer.logger.class_path lightning.pytorch.loggers.CSVLogger \
  --trainer.logger.init_args.save_dir "$RUNS" --trainer.logger.init_args.version demo
RUN="$RUNS/lightning_logs/demo"
$BIN/metadit eval --run "$RUN" --n_questions 8 --guesser keywords \
  --methods "[dit, no_diff, base_question, base_question_trigger, twenty_questions, random_label, likelihood]"
echo "results: $RUN/eval/eval.json   (ask any diff yourself: $BIN/metadit ask --adapter $RUN/adapter --diff $BANK:0 \"What topic have you been trained on?\")"
