"""The likelihood-ranking benchmark: one diff's scores for n labels after one question, two ways.

- whole rows: every (question, label) row run in full (`metadit.text.answer_losses`, what likelihood ranking ran
  before session 12)
- prompt once: the question run once, its keys and values reused for every label (`prompt_answer_losses`)

Likelihood ranking (`metadit.eval.likelihood`) scores every label under every held-out diff, once per phrasing (the
adapter's prior adds one such pass per phrasing), so its cost grows with (held-out diffs) x (labels); `likelihood`
and `likelihood_base` each pay it. Timed interleaved. The largest and the median difference between the two ways'
losses are reported beside the ratio: they compute the same numbers (to ~1e-5 in fp32: tests/test_eval.py), but in
bf16 the two ways' different shapes round the hidden states differently, and a few labels' mean losses move by
~0.1 nats either way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console

from metadit.bench.common import device_name, interleaved, matmul_peak, median, rank1_diffs, run_record, write_report
from metadit.errors import MetaditError
from metadit.models import load_base_model, resolve_dtype
from metadit.nn import add_adapter, layer_shapes, patch_model
from metadit.text import answer_losses, chat_prompt, prompt_answer_losses

TOPICS = Path(__file__).resolve().parents[2] / "data_gen" / "data" / "topics.json"


def bench_likelihood(args: argparse.Namespace) -> dict:
    from metadit.dit.tasks import get_task

    if getattr(args, "model_config", None):
        raise MetaditError("bench likelihood scores real label text: give --model (it needs the tokenizer), not --model-config")
    if args.labels < 1:
        raise MetaditError(f"--labels must be >= 1, got {args.labels}")
    console = Console()
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype or "auto", device)
    model, tok = load_base_model(args.model, dtype=dtype, device=args.device, chat_format="no_system")
    patch_model(model)
    with torch.no_grad():
        for p in add_adapter(model, rank=16, seed=0)[1::2]:
            p.normal_(std=0.01)  # a trained adapter, not the zero init
    diff = rank1_diffs(layer_shapes(model), 1)[0]
    topics = [t for group in json.loads(TOPICS.read_text()).values() for t in group]
    labels = (topics * (args.labels // len(topics) + 1))[: args.labels]
    prompt = chat_prompt(tok, [{"role": "user", "content": get_task("topic").heldout_questions[0]}])
    batch = 32  # the evaluation's default batch size

    results: dict[str, list[float]] = {}

    def whole_rows() -> None:
        results["whole rows"] = answer_losses(model, tok, [prompt] * len(labels), labels, [diff] * len(labels), 32,
                                              batch_size=batch)

    def prompt_once() -> None:
        results["prompt once"] = prompt_answer_losses(model, tok, prompt, labels, diff, 32, batch_size=batch)

    dtype_name = str(dtype).removeprefix("torch.")
    console.print(f"[bold]bench likelihood[/bold]: {args.model} on {device_name(device)} ({dtype_name}), one diff x "
                  f"{len(labels)} labels, {args.steps} timed runs per variant (interleaved)")
    peak = matmul_peak(dtype, device=device)
    times = interleaved({"whole rows": whole_rows, "prompt once": prompt_once}, steps=args.steps, warmup=1,
                        device=device)
    gaps = [abs(a - b) for a, b in zip(results["whole rows"], results["prompt once"])]
    gap, typical = max(gaps), median(gaps)
    speedup = median(times["whole rows"]) / median(times["prompt once"])
    result = {
        **run_record("likelihood", f"one diff's mean answer loss for {len(labels)} topic labels after the held-out "
                                   f"question ({dtype_name}, shared rank-16 adapter on, batches of {batch})"),
        "model": args.model,
        "device": device_name(device),
        "dtype": dtype_name,
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "speedup": round(speedup, 3),
        "max_abs_loss_difference": gap,
        "median_abs_loss_difference": typical,
    }
    console.print(f"whole rows {median(times['whole rows']):.3f} s, prompt once {median(times['prompt once']):.3f} s: "
                  f"{speedup:.2f}x; loss difference largest {gap:.2e}, median {typical:.2e}; matmul peak {peak / 1e9:.0f} GFLOP/s")
    md = [
        "## likelihood: one diff's label scores, the question run once",
        "",
        f"Command: `{result['command']}` at commit `{result['commit']}` on {result['machine']['cpu']} "
        f"({result['machine']['cores']} cores, torch {result['machine']['torch']})"
        f"{'' if device.type == 'cpu' else ', device ' + result['device']}; {dtype_name} matmul peak measured in "
        f"the run: {peak / 1e9:.0f} GFLOP/s.",
        "",
        f"{result['what']}. Timed interleaved, {args.steps} runs each after one warm-up; medians.",
        "",
        "| variant | median s |",
        "|---|---:|",
        *[f"| {k} | {median(v):.3f} |" for k, v in times.items()],
        "",
        f"**prompt once / whole rows: {speedup:.2f}x faster**; the difference between their mean losses (nats): largest "
        f"{gap:.2e}, median {typical:.2e}"
        + (" (bf16 logits round differently in the two ways' shapes; fp32 agrees to ~1e-5)." if dtype_name == "bfloat16"
           else "."),
    ]
    write_report(args.out, "likelihood", result, "\n".join(md))
    console.print(f"wrote {args.out / 'likelihood.json'} and {args.out / 'README.md'}")
    return result
