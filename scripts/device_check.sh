#!/usr/bin/env bash
# scripts/device_check.sh OUT_DIR — the prepared GPU check: on a machine with one GPU and no network, run the
# tests that can run there (the device test on CUDA: METADIT_TEST_DEVICE), then `metadit bench core` and
# `metadit bench gen` at SmolLM2-135M and Qwen3-8B sizes (models from their configs alone: random weights, no
# download), and write everything to OUT_DIR, within BUDGET_S seconds (default 280) all told:
#   OUT_DIR/env.json, nvidia-smi.txt          the machine, the versions
#   OUT_DIR/tests.txt, tests.xml              the tests' output and JUnit report
#   OUT_DIR/bench/SIZE/{core,gen}.json        the benchmarks (+ README.md sections), one folder per size
#   OUT_DIR/steps.tsv, summary.json           each step's exit status and seconds
# A failing or timed-out step is recorded and the next one runs; the script exits non-zero if any step failed.
#
# The device machine has Python 3.12 with torch, transformers, peft and lightning, but not jsonargparse, datasets
# (dill, multiprocess) or gguf: the tests that need those skip, and nothing here imports them. Wheels it needs
# carried in (pure Python; unpacked into .cache/device-site and put on PYTHONPATH only if not importable there):
#   rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0
# Fetch them on a machine with PyPI into WHEELS (default .cache/device-wheels, an ignored path):
#   pip download --no-deps --only-binary :all: -d .cache/device-wheels rich==15.0.0 markdown-it-py==4.3.0 \
#       mdurl==0.1.2 pygments==2.21.0 pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0
#
# Settings (environment): PYTHON (python3), DEVICE (cuda), SIZES ("smollm2-135m qwen3-8b"; NAME[:LAYERS], a
# shipped model config), CORE_ARGS, GEN_ARGS (extra bench flags), TESTS (test files), BUDGET_S, WHEELS,
# TIMEOUT_SCALE (multiplies each step's own time limit: a slow CPU needs more).
# The CPU dry run of the whole script, on a tiny config:
#   DEVICE=cpu SIZES=qwen3-tiny:1 CORE_ARGS="--rows 2 --tokens 8 --steps 1" GEN_ARGS="--ks 2 --rows 2 --steps 1" \
#       TESTS=tests/test_paper_setting.py BUDGET_S=3600 TIMEOUT_SCALE=10 scripts/device_check.sh /tmp/device-check
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: scripts/device_check.sh OUT_DIR" >&2
    exit 2
fi
OUT=$1
cd "$(dirname "$0")/.."
mkdir -p "$OUT/bench"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-"smollm2-135m qwen3-8b"}
CORE_ARGS=${CORE_ARGS:-"--rows 16 --tokens 64 --steps 6"}
GEN_ARGS=${GEN_ARGS:-"--ks 16,64 --rows 16 --steps 3"}
TESTS=${TESTS:-"tests/test_nn.py tests/test_paper_setting.py tests/test_reference_import.py"}
BUDGET_S=${BUDGET_S:-280}
WHEELS=${WHEELS:-.cache/device-wheels}
TIMEOUT_SCALE=${TIMEOUT_SCALE:-1}
DEADLINE=$((SECONDS + BUDGET_S))
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false METADIT_TEST_DEVICE="$DEVICE"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/steps.tsv"
failed=0

# ---------------------------------------------------------------- wheels that are not there already
missing=$("$PY" - <<'EOF'
import importlib.util
needed = {"rich": "rich", "markdown_it": "markdown_it_py", "mdurl": "mdurl", "pygments": "pygments",
          "pytest": "pytest", "iniconfig": "iniconfig", "pluggy": "pluggy"}
print(" ".join(w for m, w in needed.items() if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "unpacking carried wheels for: $missing"
    "$PY" - "$WHEELS" .cache/device-site $missing <<'EOF' || { echo "missing wheels (see the header)" >&2; exit 2; }
import sys, zipfile
from pathlib import Path
wheels, site, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
site.mkdir(parents=True, exist_ok=True)
for name in names:
    found = sorted(wheels.glob(f"{name}-*.whl"), key=lambda p: p.name.lower())
    if not found:
        sys.exit(f"no wheel for {name} in {wheels}")
    zipfile.ZipFile(found[-1]).extractall(site)  # pure-Python wheels: unpacked, they import as installed
    print(f"  {found[-1].name}")
EOF
    export PYTHONPATH="$PWD/.cache/device-site:$PYTHONPATH"
fi

# ---------------------------------------------------------------- one step: bounded by the time left
step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$(($2 * TIMEOUT_SCALE))
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 10 ]; then
        printf '%s\tskipped\t0\tbudget spent\n' "$name" >> "$OUT/steps.tsv"
        echo "== $name: skipped (budget spent)"
        failed=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" >> "$OUT/steps.tsv"
    [ "$rc" -ne 0 ] && failed=1
    return 0
}

# ---------------------------------------------------------------- the machine
(command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1) || echo "no nvidia-smi" > "$OUT/nvidia-smi.txt"
step env 60 "$PY" - "$OUT/env.json" "$DEVICE" <<'EOF'
import json, platform, sys
import torch, transformers, peft
out, device = sys.argv[1], sys.argv[2]
env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
       "peft": peft.__version__, "device": device, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(torch.cuda.mem_get_info(0)[1] / 2**30, 1),
               bf16=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
json.dump(env, open(out, "w"), indent=2)
print(json.dumps(env))
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("DEVICE is cuda but torch sees no GPU")
EOF

# ---------------------------------------------------------------- the tests
# tests/test_bank.py's to_dataset tests need `datasets`, absent there; the files chosen here skip what they cannot run.
# shellcheck disable=SC2086
step tests 150 bash -c "\"$PY\" -m pytest -q -ra -p no:cacheprovider -m 'not slow' --junitxml \"$OUT/tests.xml\" $TESTS \
    > \"$OUT/tests.txt\" 2>&1; rc=\$?; tail -5 \"$OUT/tests.txt\"; exit \$rc"

# ---------------------------------------------------------------- the benchmarks, per size
for size in $SIZES; do
    name=${size%%:*}
    layers=${size#*:}
    layer_flag=()
    folder=$name
    if [ "$layers" != "$size" ]; then
        layer_flag=(--layers "$layers")
        folder="$name-${layers}layers"
    fi
    # shellcheck disable=SC2086
    step "core-$folder" 90 "$PY" -m metadit.cli bench core --device "$DEVICE" --model-config "$name" "${layer_flag[@]}" \
        $CORE_ARGS --out "$OUT/bench/$folder"
    # shellcheck disable=SC2086
    step "gen-$folder" 120 "$PY" -m metadit.cli bench gen --device "$DEVICE" --model-config "$name" "${layer_flag[@]}" \
        $GEN_ARGS --out "$OUT/bench/$folder"
done

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds, command = (line.split("\t") + [""] * 4)[:4]
    steps.append({"step": name, "exit": rc, "seconds": int(seconds or 0), "command": command})
bench = {str(p.relative_to(out)): json.loads(p.read_text()) for p in sorted((out / "bench").rglob("*.json"))}
summary = {"steps": steps, "ok": all(s["exit"] == "0" for s in steps),
           "bench": {k: {"model": v.get("model"), "device": v.get("device"), "dtype": v.get("dtype"),
                         **({"tokens_per_second": v["tokens_per_second"], "skipped": v.get("skipped")}
                            if v.get("benchmark") == "core" else
                            {"variants": v.get("variants"), "batched_over_peft": v.get("batched_over_peft")})}
                     for k, v in bench.items()}}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
for s in steps:
    print(f"{s['step']:>24}  exit {s['exit']:>7}  {s['seconds']:>4} s")
EOF
echo "device check: $([ $failed -eq 0 ] && echo ok || echo 'some steps failed'); results in $OUT"
exit $failed
