#!/usr/bin/env bash
# The README's main job, on the embedded SmolLM2-135M-Instruct, end to end on 2 CPU cores:
#   1. build a small hidden-topic bank (16 rank-1 diffs trained at once; ~17 min) whose topics
#      (data_gen/data/demo_topics.json) share no word with any topic of the headline bank, so no shipped adapter
#      trained or validated on them, and verify it,
#   2. if a DIT adapter is shipped (`smollm2-topic`, metadit/adapters/), evaluate it on those 16 diffs against the
#      adapter asked with no diff and the diffed model asked directly: the table with 95 % intervals, then in words
#      whether DIT beats each control; beside them likelihood ranking among the 16 topics under the adapter and with
#      no adapter (what the adapter reads beyond what the diff gives away, even where its greedy answer does not),
#   3. train a DIT adapter of its own on 10 of the topics (2 for validation, 4 held out) and evaluate it against
#      the baselines on the 4 held-out diffs (20 questions read by the model-free keyword guesser: SmolLM2 itself
#      cannot name a topic from the answers). Sixteen diffs are far too few for DIT to generalize: this step shows
#      the training path, not a result.
# Every step resumes: rerunning after an interruption keeps the diffs, text and predictions already made.
# For tests (tests/test_eval.py runs it on the tiny model): BIN, GEN_CONFIG, FIT_CONFIG, SHIPPED (a name or a path).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
BANK=${BANK:-banks/demo}
RUNS=${RUNS:-runs/demo}
GEN_CONFIG=${GEN_CONFIG:-configs/gen/smol_topic.yaml}
FIT_CONFIG=${FIT_CONFIG:-configs/fit/smol_demo.yaml}
SHIPPED=${SHIPPED:-smollm2-topic}
TOPICS=data_gen/data/demo_topics.json

echo "== 1. a fresh bank of 16 diffs on topics no shipped adapter has seen"
$BIN/metadit gen --config "$GEN_CONFIG" --bank "$BANK" --n_diffs 16 --recipe.init_args.topics_file "$TOPICS"
$BIN/metadit bank info "$BANK"
$BIN/metadit bank verify "$BANK"

echo "== 2. the shipped DIT adapter ($SHIPPED) on those diffs"
if $BIN/python -c "import sys; from metadit.models import resolve_adapter; resolve_adapter(sys.argv[1])" "$SHIPPED" 2>/dev/null; then
  $BIN/metadit eval --adapter "$SHIPPED" --banks "[$BANK]" --split unseen --methods "[dit, no_diff, base_question, likelihood, likelihood_base]" \
    --out "$RUNS/shipped-eval"
else
  echo "No adapter $SHIPPED is shipped with this version of metadit (metadit/adapters/ holds none by that name):"
  echo "step 2 is skipped. DIT's greedy answer does not yet read strictly gated diffs on SmolLM2 at the sizes trained so"
  echo "far; likelihood ranking under the adapter does, more with more training diffs (README, Results)."
fi

echo "== 3. a DIT adapter of the demo's own (the training path; too few diffs to generalize)"
$BIN/metadit fit --config "$FIT_CONFIG" --data.banks "[$BANK]" --trainer.default_root_dir "$RUNS" \
  --trainer.logger.class_path lightning.pytorch.loggers.CSVLogger \
  --trainer.logger.init_args.save_dir "$RUNS" --trainer.logger.init_args.version demo
RUN="$RUNS/lightning_logs/demo"
$BIN/metadit eval --run "$RUN" --n_questions 8 --guesser keywords \
  --methods "[dit, no_diff, base_question, base_question_trigger, twenty_questions, random_label, likelihood, likelihood_base]"
echo "results: $RUN/eval/eval.json   (ask any diff yourself: $BIN/metadit ask --adapter $RUN/adapter --diff $BANK:0 \"What topic have you been trained on?\")"
