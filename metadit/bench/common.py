"""Shared pieces of the benchmarks: machine facts, interleaved timing, writing reports/bench/."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def interleaved(variants: dict[str, Callable[[], None]], steps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Time each variant `steps` times, round-robin (A B C A B C ...), so drift hits all variants alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(steps):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 2048, reps: int = 10) -> float:
    """Measured dense matmul FLOP/s on this machine, for 'fraction of peak' figures."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def write_report(out: Path, name: str, result: dict[str, Any], markdown: str) -> None:
    """`out/<name>.json` plus this benchmark's section in `out/README.md` (other sections are kept)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    readme = out / "README.md"
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n\nWritten by `metadit bench`; each section is one run.\n"
    section = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    readme.write_text(text)
