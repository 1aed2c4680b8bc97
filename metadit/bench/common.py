"""Shared pieces of the benchmarks: machine facts, interleaved timing, writing reports/bench/."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from metadit.bank import LoraDiff


def run_record(name: str, what: str) -> dict[str, Any]:
    """The keys every benchmark's JSON starts with: which one, what it measured, the command as typed, the code that
    ran and the machine."""
    from metadit.provenance import git_commit, machine

    command = "metadit " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("metadit") else f"metadit bench {name}"
    return {"benchmark": name, "what": what, "command": command, "commit": git_commit(), "machine": machine()}


def rank1_diffs(shapes: dict[str, tuple[int, int]], k: int, seed: int = 0) -> list[LoraDiff]:
    """`k` random rank-1 diffs of a diff bank's scale for every layer in `shapes` (timing needs no trained ones)."""
    g = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(k):
        A = {n: torch.randn(1, i, generator=g) / i**0.5 for n, (i, o) in shapes.items()}
        B = {n: torch.randn(o, 1, generator=g) * 0.01 for n, (i, o) in shapes.items()}
        diffs.append(LoraDiff(A, B, {n: 1.0 for n in shapes}))
    return diffs


def interleaved(variants: dict[str, Callable[[], None]], steps: int, warmup: int = 2,
                device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Time each variant `steps` times, round-robin (A B C A B C ...), so drift hits all variants alike.

    On a GPU each step ends with a synchronize, so a step's time is its kernels' time, not its launch time."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(steps):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t)
    return times


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: str | torch.device) -> str:
    """What the benchmark ran on, in words: the GPU's name, or "cpu"."""
    d = torch.device(device)
    return torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu"


def available_bytes(device: str | torch.device) -> int:
    """Memory free for tensors now: the GPU's free memory, or the host's MemAvailable."""
    d = torch.device(device)
    if d.type == "cuda":
        return int(torch.cuda.mem_get_info(d)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2**62  # unknown: do not skip anything on its account


def bench_model(args: Any, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """The benchmark's model on `args.device`: `--model_config` (a config alone, random weights: speed needs no
    trained weights, and nothing is downloaded), else `--model` loaded as usual. Returns (model, tokenizer or None,
    its name as the report gives it)."""
    from metadit.models import load_base_model, random_model_from_config

    if getattr(args, "model_config", None):
        model = random_model_from_config(args.model_config, args.layers, dtype=dtype, device=args.device)
        return model, None, model.name_or_path
    model, tok = load_base_model(args.model, dtype=dtype, device=args.device)
    return model, tok, args.model


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int | None = None, reps: int = 10,
                device: str | torch.device = "cpu") -> float:
    """Measured dense matmul FLOP/s on this device, for 'fraction of peak' figures (n = 2048 on a CPU, 8192 on a GPU)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
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
