"""`metadit bench build`: per-diff rows beside the report and the gated-per-hour ratio's interval."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from metadit.bench import build
from metadit.eval.stats import wilson_interval

ROOT = Path(__file__).resolve().parents[1]


def test_ratio_interval_matches_a_direct_resampling():
    a = [True] * 12 + [False] * 4
    b = [True] * 4 + [False] * 12
    low, high = build.ratio_interval(a, 0.5, b, 1.0)
    rng = np.random.default_rng(0)
    ka = np.asarray(a, float)[rng.integers(0, 16, size=(10_000, 16))].sum(1)
    kb = np.asarray(b, float)[rng.integers(0, 16, size=(10_000, 16))].sum(1)
    ratios = np.where(kb == 0, np.inf, (ka / 0.5) / np.maximum(kb, 1e-12))
    assert (low, high) == tuple(np.quantile(ratios, [0.025, 0.975]))
    assert low < (12 / 0.5) / (4 / 1.0) < high


def test_ratio_interval_is_unbounded_above_when_the_baseline_often_gates_nothing():
    # 3 of 16: P(a resample has no pass) = (13/16)**16 = 3.6 % > 2.5 %
    low, high = build.ratio_interval([True] * 13 + [False] * 3, 1.0, [True] * 3 + [False] * 13, 1.0)
    assert high == float("inf") and 0 < low < 13 / 3


def test_ratio_interval_is_none_when_the_baseline_rarely_gates():
    assert build.ratio_interval([True] * 8, 1.0, [True] + [False] * 15, 1.0) is None  # P(no pass) ~ 36 %


def test_bench_build_writes_rows_and_intervals(tmp_path, monkeypatch):
    tiny = str(ROOT / "configs/gen/tiny_topic.yaml")
    monkeypatch.setattr(build, "VARIANTS", {"baseline": tiny, "default": tiny})
    out = tmp_path / "bench"
    args = argparse.Namespace(diffs=2, variants="baseline,default", dtype=None, out=out)
    result = build.bench_build(args)
    rows = [json.loads(line) for line in (out / "build_rows.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["index"]) for r in rows] == [("baseline", 0), ("baseline", 1), ("default", 0), ("default", 1)]
    assert all(set(build.ROW_KEYS) <= set(r) for r in rows)
    # the same specs in both variants: the same topics, in order
    assert [r["topic"] for r in rows[:2]] == [r["topic"] for r in rows[2:]]
    for name, v in result["variants"].items():
        mine = [r for r in rows if r["variant"] == name]
        k = sum(bool(r["passed"]) for r in mine)
        assert v["passed"] == k and v["intervals"]["passed"]["k"] == k
        assert (v["intervals"]["passed"]["low"], v["intervals"]["passed"]["high"]) == \
            pytest.approx(wilson_interval(k, 2), abs=1e-4)
    assert "rows" not in result["variants"]["default"]
    saved = json.loads((out / "build.json").read_text())
    assert "gated_per_hour_ratio_interval" in saved
    assert "build_rows.jsonl" in (out / "README.md").read_text()
