"""The bank-build benchmark: strictly gated hidden-topic diffs per hour, baseline recipe vs the default recipe.

Each variant is a `configs/gen/*.yaml`, built for real with `metadit gen` (`generate_bank`: writing the text,
training, the strict behaviour check, appending) on the same diff specs (same recipe seed and indices), each
with a cold text cache of its own (a fresh `$METADIT_CACHE` that shares only the dequantized model), one after
the other in one run. Reported per variant: diffs/hour, strictly gated diffs/hour (`passed`: topic learned and
gate held under the recipe's strict sampled check; also `gate_held` alone), and the split of the time between
text, training, check and append. Both variants run at `--dtype` (the compute dtype is not a recipe lever:
the bf16 and fp32 matmul peaks measured in the same run say what it costs on this machine).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from metadit.bench.common import matmul_peak, write_report
from metadit.provenance import git_commit, machine

VARIANTS = {"baseline": "configs/gen/smol_topic_baseline.yaml", "default": "configs/gen/smol_topic.yaml"}
TARGET = 3.0


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
    return {
        "config": config, "diffs": stats["made"], "seconds": stats["seconds"], "phase_seconds": stats["phase_seconds"],
        "passed": passed, "gate_held": sum(bool(m.get("gate_held")) for m in metas),
        "topic_learned": sum(bool(m.get("topic_learned")) for m in metas),
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
        "| variant | config | diffs/h | strictly gated | gated/h | gate held | learned | text s | train s | check s | append s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {k} | `{v['config']}` | {v['diffs_per_hour']:.1f} | {v['passed']}/{v['diffs']} | {v['gated_per_hour']:.1f} | "
          f"{v['gate_held']}/{v['diffs']} | {v['topic_learned']}/{v['diffs']} | " +
          " | ".join(f"{v['phase_seconds'][p]:.0f}" for p in ("text", "train", "check", "append")) + " |"
          for k, v in results.items()],
        "",
        "Topic named, share of all check answers per condition: " + "; ".join(
            f"{k}: " + ", ".join(f"{c} {r:.1%}" for c, r in v["mention_rate"].items()) for k, v in results.items()),
    ]
    if "gated_per_hour_ratio" in result:
        md += ["", f"**gated_per_hour_ratio {result['gated_per_hour_ratio']}** (target >= {TARGET}); "
                   f"diffs_per_hour_ratio {result['diffs_per_hour_ratio']}."]
    write_report(args.out, "build", result, "\n".join(md))
    console.print("\n".join(md))
    return result
