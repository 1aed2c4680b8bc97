"""The core benchmark: one DIT-style training step with K different diffs in the batch, three ways.

- factored: the per-row diff applied as `((x @ Aᵢᵀ) · sᵢ) @ Bᵢᵀ` (metadit's layer)
- dense: a dense per-row ΔWᵢ = sᵢ Bᵢ Aᵢ materialized every forward (what the paper's reference code does)
- no-diff: the same step with no diffs at all (the ceiling)

Each step: forward + cross-entropy + backward into the shared rank-16 adapter, in the compute dtype (`--dtype`;
default `auto`: bf16 on a GPU or a CPU that computes it natively, else fp32). Timed interleaved, on `--device`.
The model is `--model`, or `--model-config` (a config alone with random weights: Qwen3-8B's sizes need no
download; `--layers N` keeps its first N layers so it fits a CPU). The dense variant is skipped, saying why, when
its per-row ΔW (kept for the backward pass) would not fit in the device's free memory.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from metadit.bench.common import (
    available_bytes, bench_model, device_name, interleaved, median, rank1_diffs, run_record, write_report,
)
from metadit.models import resolve_dtype
from metadit.nn import DiffBatch, DiffLinear, add_adapter, dense_row_delta, factored_row_delta, layer_shapes, patch_model, use_diffs


def dense_bytes(shapes: dict[str, tuple[int, int]], rows: int, dtype: torch.dtype) -> int:
    """What the dense variant holds at once: every layer's per-row ΔW [rows, out, in], saved for the backward pass."""
    return rows * sum(i * o for i, o in shapes.values()) * torch.empty((), dtype=dtype).element_size()


def bench_core(args: argparse.Namespace) -> dict:
    console = Console()
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype or "auto", device)
    model, _, model_name = bench_model(args, dtype)
    patch_model(model)
    params = add_adapter(model, rank=16, seed=0)
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(std=0.01)  # a trained adapter, not the zero init
    shapes = layer_shapes(model)
    batch = DiffBatch.from_diffs(rank1_diffs(shapes, args.rows), shapes, dtype=dtype, device=device)
    ids = torch.randint(0, model.config.vocab_size, (args.rows, args.tokens),
                        generator=torch.Generator().manual_seed(1)).to(device)

    def step() -> None:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        for p in params:
            p.grad = None

    def with_diffs(row_delta):
        def run() -> None:
            DiffLinear.row_delta = staticmethod(row_delta)
            try:
                with use_diffs(model, batch):
                    step()
            finally:
                DiffLinear.row_delta = staticmethod(factored_row_delta)
        return run

    variants = {"factored": with_diffs(factored_row_delta), "dense": with_diffs(dense_row_delta), "no-diff": step}
    skipped = {}
    need, free = dense_bytes(shapes, args.rows, dtype), available_bytes(device)
    if need > 0.8 * free:
        skipped["dense"] = (f"its per-row ΔW for {args.rows} rows needs {need / 2**30:.1f} GiB held for the backward "
                            f"pass; {free / 2**30:.1f} GiB free on {device_name(device)}")
        del variants["dense"]
        console.print(f"[yellow]skipping dense[/yellow]: {skipped['dense']}")
    dtype_name = str(dtype).removeprefix("torch.")
    console.print(f"[bold]bench core[/bold]: {model_name} on {device_name(device)} ({dtype_name}), {args.rows} rows x "
                  f"{args.tokens} tokens, {args.steps} timed steps per variant (interleaved)")
    times = interleaved(variants, steps=args.steps, device=device)
    tokens = args.rows * args.tokens
    tps = {k: tokens / median(v) for k, v in times.items()}
    ratios = {"factored_over_no_diff": tps["factored"] / tps["no-diff"]}
    if "dense" in tps:
        ratios["factored_over_dense"] = tps["factored"] / tps["dense"]
    targets = {k: v for k, v in {"factored_over_no_diff": 0.9, "factored_over_dense": 1.5}.items() if k in ratios}
    result = {
        **run_record("core", f"one DIT training step (forward + backward, shared rank-16 adapter trainable, "
                             f"{dtype_name}), {args.rows} rows x {args.tokens} tokens, {args.rows} different rank-1 diffs"),
        "model": model_name,
        "random_weights": bool(getattr(args, "model_config", None)),
        "layers": model.config.num_hidden_layers,
        "device": device_name(device),
        "dtype": dtype_name,
        "seconds_per_step": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "tokens_per_second": {k: round(v, 1) for k, v in tps.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": targets,
        "met": {k: ratios[k] >= targets[k] for k in targets},
        "skipped": skipped,
    }
    table = Table(title="one DIT training step")
    table.add_column("variant")
    table.add_column("tokens/s", justify="right")
    table.add_column("median s/step", justify="right")
    for k in variants:
        table.add_row(k, f"{tps[k]:.0f}", f"{median(times[k]):.3f}")
    console.print(table)
    for k, v in ratios.items():
        console.print(f"{k}: {v:.3f} (target >= {targets[k]}) {'met' if result['met'][k] else 'NOT met'}")
    md = [
        "## core: one DIT training step, per-row diffs three ways",
        "",
        f"Command: `{result['command']}` at commit `{result['commit']}` on {result['machine']['cpu']} "
        f"({result['machine']['cores']} cores, torch {result['machine']['torch']})"
        f"{'' if device.type == 'cpu' else ', device ' + result['device']}. Model {model_name}"
        f"{' (a config alone, random weights)' if result['random_weights'] else ''}, {result['layers']} layers.",
        "",
        f"{result['what']}. Variants timed interleaved, {args.steps} steps each after 2 warm-up steps; medians."
        + "".join(f" {k} skipped: {v}." for k, v in skipped.items()),
        "",
        "| variant | tokens/s | median s/step |",
        "|---|---:|---:|",
        *[f"| {k} | {tps[k]:.0f} | {median(times[k]):.3f} |" for k in variants],
        "",
        "| ratio | measured | target | met |",
        "|---|---:|---:|---|",
        *[f"| {k} | {ratios[k]:.3f} | {targets[k]} | {'yes' if result['met'][k] else 'no'} |" for k in targets],
    ]
    write_report(args.out, "core", result, "\n".join(md))
    console.print(f"wrote {args.out / 'core.json'} and {args.out / 'README.md'}")
    return result
