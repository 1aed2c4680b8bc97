"""Compare two runs of the test suite from their JUnit XML files: is the new commit's suite slower?

The layering issue asks for the suite "no slower": old and new commit timed back to back on one machine,
new/old <= 1.05. Two figures, because the new suite also holds tests the old one did not have:

- `whole`: each run's total test time (the sum over its test cases) and its count of tests;
- `common`: only the tests both runs have (same file and name) and both passed, summed per run; their ratio is the
  like-for-like figure. A session-scoped fixture's setup is billed to the first test that uses it, so a fixture
  first used by a test only one run has moves time out of `common`: the per-fixture totals are in `whole`.

Commands (run back to back, nothing else heavy on the machine):

    git worktree add --detach /tmp/suite-old OLD_COMMIT
    (cd /tmp/suite-old && PYTHONPATH=$PWD python -m pytest -q -p no:cacheprovider --junitxml=/tmp/old.xml)
    python -m pytest -q -p no:cacheprovider --junitxml=/tmp/new.xml
    python scripts/suite_timing.py /tmp/old.xml /tmp/new.xml --out reports/bench/suite_timing.json
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_cases(path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(passed test id -> seconds, every test id -> seconds) of one JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise SystemExit(f"error: cannot read JUnit XML {path}: {e}")
    passed, every = {}, {}
    for case in root.iter("testcase"):
        key = f"{case.get('classname')}::{case.get('name')}"
        seconds = float(case.get("time") or 0.0)
        every[key] = seconds
        if not any(child.tag in ("failure", "error", "skipped") for child in case):
            passed[key] = seconds
    if not every:
        raise SystemExit(f"error: {path} holds no test cases")
    return passed, every


def compare(old: Path, new: Path) -> dict:
    old_passed, old_every = read_cases(old)
    new_passed, new_every = read_cases(new)
    common = sorted(set(old_passed) & set(new_passed))
    old_common = sum(old_passed[k] for k in common)
    new_common = sum(new_passed[k] for k in common)
    slower = sorted(common, key=lambda k: new_passed[k] - old_passed[k], reverse=True)[:10]
    return {
        "old": str(old), "new": str(new),
        "whole": {"old_s": round(sum(old_every.values()), 1), "old_tests": len(old_every),
                  "new_s": round(sum(new_every.values()), 1), "new_tests": len(new_every),
                  "ratio": round(sum(new_every.values()) / sum(old_every.values()), 3)},
        "common": {"tests": len(common), "old_s": round(old_common, 1), "new_s": round(new_common, 1),
                   "ratio": round(new_common / old_common, 3) if old_common else None},
        "only_old": len(set(old_every) - set(new_every)), "only_new": len(set(new_every) - set(old_every)),
        "most_slower_common": [{"test": k, "old_s": round(old_passed[k], 2), "new_s": round(new_passed[k], 2)}
                               for k in slower],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path, help="JUnit XML of the old commit's suite")
    p.add_argument("new", type=Path, help="JUnit XML of the new commit's suite")
    p.add_argument("--out", type=Path, help="write the comparison as JSON here")
    a = p.parse_args(argv)
    result = compare(a.old, a.new)
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
