# The workflow of a `metadit sweep` (metadit/eval/sweep.py): one job per step of the sweep's expanded plan.
#
# `metadit sweep` writes the plan (ROOT/.workflows/STUDY/plan-HASH.json, given here as the config file) and runs
# this file with the cells' last done markers as targets. A step waits for the step before it in its cell; a
# cell's first step waits for the last step of every cell it reads from ({run_dir:CELL}, {best_ckpt:CELL}, ...).
# A step's one declared output is its done marker, CELL_DIR/ID.done.json, which `python -m metadit.eval.sweep_step`
# writes when the step's `metadit` command succeeded. Its output directory and its log are not declared:
# Snakemake deletes a job's outputs and logs before the job runs (or, for `update()` outputs, copies them aside
# and restores them on failure), and a fit that resumes needs the checkpoints its killed attempt left in its run
# directory, while the log keeps every attempt.
#
# One rule per metadit subcommand (fit, test, eval, ...), so that a profile or `--set-resources` can give each
# its own resources on a cluster, e.g. `--set-resources fit:slurm_partition=gpu fit:gres=gpu:1`.

import re
import shlex

PLAN = config
LAST = {cell["name"]: cell["steps"][-1]["id"] for cell in PLAN["cells"]}


def marker(cell, step_id):
    return f"{PLAN['dir']}/{cell}/{step_id}.done.json"


NEEDS = {}  # "CELL/ID" -> the markers the step waits for
COMMAND = {}  # "CELL/ID" -> its metadit subcommand
for cell in PLAN["cells"]:
    before = [marker(dep, LAST[dep]) for dep in cell["deps"]]
    for step in cell["steps"]:
        key = f"{cell['name']}/{step['id']}"
        NEEDS[key], COMMAND[key] = before, step["argv"][0]
        before = [marker(cell["name"], step["id"])]

RUN_STEP = [PLAN["python"], "-m", "metadit.eval.sweep_step", PLAN["plan_file"]]
MARKER = PLAN["dir"].replace("{", "{{").replace("}", "}}") + "/{key}.done.json"

for command in sorted(set(COMMAND.values())):

    rule:
        name:
            command
        input:
            lambda wildcards: NEEDS[wildcards.key],
        output:
            MARKER,
        threads: config.get("step_threads", 1)  # `metadit sweep` gives every core to each step, one at a time
        wildcard_constraints:
            key="|".join(re.escape(k) for k, c in COMMAND.items() if c == command),
        params:
            run=lambda wildcards: shlex.join([*RUN_STEP, wildcards.key]),
        shell:
            "{params.run}"
