#!/usr/bin/env bash
# The README's main job. Until the DIT pipeline lands (issues #3-#5) it runs the core on the embedded
# SmolLM2: a small real bank, checked and inspected, and the core benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
BANK=${BANK:-banks/demo}
rm -rf "$BANK"
$BIN/python -m metadit.demo --bank "$BANK"
$BIN/metadit bank info "$BANK"
$BIN/metadit bank verify "$BANK"
