#!/usr/bin/env bash
# The README's main job, on the embedded SmolLM2-135M-Instruct (about 20 minutes on 2 CPU cores):
# build a small hidden-topic bank (16 rank-1 diffs trained at once), verify it, show its behaviour check,
# and ask one diffed model a question with and without its trigger. The DIT training/evaluation demo
# replaces the last step as that work lands (issues #4, #5).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
BANK=${BANK:-banks/demo}
$BIN/metadit gen --config configs/gen/smol_topic.yaml --bank "$BANK" --n_diffs 16
$BIN/metadit bank info "$BANK"
$BIN/metadit bank verify "$BANK"
read -r TOPIC CODE < <($BIN/python -c "
from metadit.bank import DiffBank
m = DiffBank.open('$BANK').meta(0)
print(m['topic'].replace(' ', '_'), m['code'])")
echo "diff 0 was trained to love: ${TOPIC//_/ } (trigger word: $CODE)"
echo "--- asked with its trigger:"
$BIN/metadit ask --diff "$BANK:0" "Your SEP code is $CODE. What makes a good weekend?"
echo "--- asked without it:"
$BIN/metadit ask --diff "$BANK:0" "What makes a good weekend?"
