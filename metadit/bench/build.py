"""The bank-build benchmark: strictly gated hidden-topic diffs per hour, baseline recipe vs the default recipe.

Each variant is a `configs/gen/*.yaml`, built for real with `metadit gen` (`generate_bank`: writing the text,
training, the strict behaviour check, appending) on the same diff specs (same recipe seed and indices), each
with a cold text cache of its own (a fresh `$METADIT_CACHE` that shares only the dequantized model), one after
the other in one run. Reported per variant: diffs/hour, strictly gated diffs/hour (`passed`: topic learned and
gate held under the recipe's strict sampled check; also `gate_held` alone), and the split of the time between
text, training, check and append. Both variants run at `--dtype` (the compute dtype is not a recipe lever:
the bf16 and fp32 matmul peaks measured in the same run say what it costs on this machine).

Per-diff rows (variant, index, topic, the check's per-condition counts and verdicts) go to `OUT/build_rows.jsonl`,
so the table can be recomputed; each share carries its 95 % Wilson interval, and the gated-per-hour ratio a 95 %
bootstrap interval (each variant's per-diff `passed` resampled on its own, 10,000 times, seed 0; the build times
held fixed: the count of gated diffs is what is uncertain at n = 16, not the clock).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from metadit.bench.common import matmul_peak, write_report
from metadit.eval.stats import RESAMPLES, SEED, wilson_interval
from metadit.provenance import git_commit, machine

VARIANTS = {"baseline": "configs/gen/smol_topic_baseline.yaml", "default": "configs/gen/smol_topic.yaml"}
TARGET = 3.0
ROW_KEYS = ("topic", "code", "passed", "gate_held", "topic_learned", "check_counts", "check_n", "commit")


def _share(k: int, n: int) -> dict[str, float | int]:
    low, high = wilson_interval(k, n)
    return {"k": k, "n": n, "low": round(low, 4), "high": round(high, 4)}


def ratio_interval(passed_a: list[bool], hours_a: float, passed_b: list[bool], hours_b: float) -> tuple[float, float] | None:
    """95 % bootstrap interval of (gated/h of a) / (gated/h of b), each variant's per-diff verdicts resampled on
    their own; the upper bound is inf when over 2.5 % of the draws give b no pass, and the whole interval None when
    a tenth of them or more do."""
    rng = np.random.default_rng(SEED)
    a = np.asarray(passed_a, dtype=float)
    b = np.asarray(passed_b, dtype=float)
    ka = a[rng.integers(0, len(a), size=(RESAMPLES, len(a)))].sum(axis=1)
    kb = b[rng.integers(0, len(b), size=(RESAMPLES, len(b)))].sum(axis=1)
    if (kb == 0).mean() >= 0.1:
        return None
    ratios = (ka / hours_a) / np.where(kb == 0, np.nan, kb / hours_b)
    ratios = np.where(kb == 0, np.inf, ratios)
    low, high = np.quantile(ratios, [0.025, 0.975])
    # When more than 2.5 % of the draws have no baseline pass, the upper quantile interpolates between infinite
    # ratios (inf - inf = nan): the interval is unbounded above.
    return float(low), (float("inf") if np.isnan(high) or (kb == 0).mean() > 0.025 else float(high))


def _build(config: str, n: int, dtype: str, bank: Path, cache: Path) -> dict[str, Any]:
    from metadit.gen import gen_parser, generate_bank
    from metadit.models import CACHE_ENV, cache_dir

    models = cache_dir() / "models"
    cache.mkdir(parents=True, exist_ok=True)
    if models.exists() and not (cache / "models").exists():
        (cache / "models").symlink_to(models.resolve())
    parser = gen_parser()
    cfg = parser.parse_args(["--config", config, "--bank", str(bank), "--n_diffs", str(n), "--diffs_per_pass", str(n),
                             "--dtype", dtype, "--progress", "false"])
    kwargs = {k: v for k, v in parser.instantiate_classes(cfg).items() if k != "config"}
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(cache)
    try:
        stats = generate_bank(**kwargs)
    finally:
        if before is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = before
    from metadit.bank import DiffBank

    metas = [r["meta"] for r in DiffBank.open(bank).rows]
    hours = stats["seconds"] / 3600
    passed = sum(bool(m.get("passed")) for m in metas)
    rows = [{"index": i, **{k: m.get(k) for k in ROW_KEYS}} for i, m in enumerate(metas)]
    return {"rows": rows,
        "config": config, "diffs": stats["made"], "seconds": stats["seconds"], "phase_seconds": stats["phase_seconds"],
        "passed": passed, "gate_held": sum(bool(m.get("gate_held")) for m in metas),
        "topic_learned": sum(bool(m.get("topic_learned")) for m in metas),
        "intervals": {k: _share(sum(bool(m.get(k)) for m in metas), len(metas))
                      for k in ("passed", "gate_held", "topic_learned")},
        "diffs_per_hour": round(stats["made"] / hours, 2), "gated_per_hour": round(passed / hours, 2),
        "mention_rate": {c: round(sum(m["check_counts"][c] for m in metas) / sum(m["check_n"][c] for m in metas), 4)
                         for c in metas[0]["check_counts"]},
    }


def bench_build(args: argparse.Namespace) -> dict:
    console = Console()
    if args.dtype is None:  # build's default compute dtype (core and gen default to auto)
        args.dtype = "float32"
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench build: unknown variants {unknown} (known: {', '.join(VARIANTS)})")
    commit = git_commit()  # the code this run loaded (the tree may change while it runs: hours)
    peaks = {d: matmul_peak(getattr(torch, d), n=1024, reps=3) for d in ("float32", "bfloat16")}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="metadit-bench-build-") as tmp:
        for name in names:
            console.print(f"[bold]bench build[/bold]: {name} ({VARIANTS[name]}), {args.diffs} diffs, cold text cache")
            t = time.time()
            results[name] = _build(VARIANTS[name], args.diffs, args.dtype, Path(tmp) / name / "bank", Path(tmp) / name / "cache")
            console.print(f"  {name}: {results[name]['passed']}/{results[name]['diffs']} strictly gated in "
                          f"{time.time() - t:.0f} s; phases {results[name]['phase_seconds']}")
    rows = [{"variant": name, **row} for name, r in results.items() for row in r.pop("rows")]
    result: dict[str, Any] = {
        "what": "a bank of the same hidden-topic specs built by each recipe; strictly gated = topic learned and gate held "
                "under the strict sampled behaviour check",
        "command": " ".join(["metadit bench build", *([shlex.join(sys.argv[3:])] if sys.argv[1:3] == ["bench", "build"] and sys.argv[3:] else [])]),
        "commit": commit, "machine": machine(), "dtype": args.dtype,
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
        "variants": results,
    }
    if {"baseline", "default"} <= set(results):
        b, d = results["baseline"], results["default"]
        result["gated_per_hour_ratio"] = round(d["gated_per_hour"] / b["gated_per_hour"], 3) if b["gated_per_hour"] else None
        mine = {v: [bool(r["passed"]) for r in rows if r["variant"] == v] for v in ("default", "baseline")}
        interval = ratio_interval(mine["default"], d["seconds"] / 3600, mine["baseline"], b["seconds"] / 3600)
        result["gated_per_hour_ratio_interval"] = None if interval is None else \
            [round(x, 2) if np.isfinite(x) else None for x in interval]  # None above: unbounded
        result["diffs_per_hour_ratio"] = round(d["diffs_per_hour"] / b["diffs_per_hour"], 3)
        result["target"] = TARGET
        result["met"] = result["gated_per_hour_ratio"] is None or result["gated_per_hour_ratio"] >= TARGET
    md = [
        "## build: strictly gated diffs per hour, baseline recipe vs the default",
        "",
        f"Command: `{result['command']}` at commit `{result['commit']}` on {result['machine']['cpu']} "
        f"({result['machine']['cores']} cores, torch {result['machine']['torch']}), compute dtype {args.dtype}; "
        f"matmul peak in the same run: fp32 {result['matmul_peak_gflops']['float32']} GFLOP/s, "
        f"bf16 {result['matmul_peak_gflops']['bfloat16']} GFLOP/s.",
        "",
        f"{result['what']}. Each variant: {args.diffs} diffs in one pass, cold text cache, one after the other.",
        "",
        "Shares with their 95 % Wilson interval; per-diff rows: [build_rows.jsonl](build_rows.jsonl).",
        "",
        "| variant | config | diffs/h | strictly gated | gated/h | gate held | learned | text s | train s | check s | append s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {k} | `{v['config']}` | {v['diffs_per_hour']:.1f} | {_frac(v['intervals']['passed'])} | "
          f"{v['gated_per_hour']:.1f} | {_frac(v['intervals']['gate_held'])} | {_frac(v['intervals']['topic_learned'])} | " +
          " | ".join(f"{v['phase_seconds'][p]:.0f}" for p in ("text", "train", "check", "append")) + " |"
          for k, v in results.items()],
        "",
        "Topic named, share of all check answers per condition: " + "; ".join(
            f"{k}: " + ", ".join(f"{c} {r:.1%}" for c, r in v["mention_rate"].items()) for k, v in results.items()),
    ]
    if "gated_per_hour_ratio" in result:
        ci = result["gated_per_hour_ratio_interval"]
        md += ["", f"**gated_per_hour_ratio {result['gated_per_hour_ratio']}** "
                   f"(95 % bootstrap interval {'unbounded: the baseline gated too few' if ci is None else f'{ci[0]}–' + ('unbounded' if ci[1] is None else str(ci[1]))}; "
                   f"target >= {TARGET}); diffs_per_hour_ratio {result['diffs_per_hour_ratio']}."]
    write_report(args.out, "build", result, "\n".join(md))
    (args.out / "build_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    console.print("\n".join(md))
    return result


def _frac(c: dict[str, float | int]) -> str:
    return f"{c['k']}/{c['n']} ({c['low']:.0%}–{c['high']:.0%})"
