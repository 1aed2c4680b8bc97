"""The generation benchmark: diffs/hour of the hidden-topic recipe, batched K diffs per pass vs peft one at a time.

Each diff needs the same training signal either way: `steps` samples (the recipe's 200 steps x 1 sample).
- batched K (metadit): one patched model, K diffs x 1 sample per step, `steps` steps; then one shard write.
- peft, one diff at a time: wrap the base model with a fresh rank-r LoRA (`get_peft_model`), train it on
  `rows` samples per step for steps/rows steps (so one diff's batch fills the CPU, as it would be run),
  `save_pretrained`, then `unload` — per diff.
Per-step times are measured over a few steps (interleaved rounds) and extrapolated to the full recipe;
wrap/save/unload are timed for real. Achieved FLOP/s is compared with the matmul peak of the compute dtype measured
in the same run. FLOPs per token: 2·P forward; backward into activations only (base frozen) ≈ 2·P; KL rows add a
2·P teacher forward (P = linear parameters, LM head counted on answer tokens only).

`--device` runs it on a GPU; `--model-config` (a config alone, random weights; `--layers N`) measures a model of
the paper's size without downloading it: its rows are random tokens in the recipe's shape and mix of kinds
(`SyntheticRows`), since such a model has no tokenizer and speed does not depend on the text.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from metadit.bench.common import matmul_peak, median, run_record, write_report


def _linear_params(model) -> tuple[int, int]:
    body = sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    head = model.get_output_embeddings().weight.numel()
    return body, head


# Rows of the recipe's shape for a model given as a config alone (no tokenizer, no text to write): a SEP-code
# question in a chat template is ~56 tokens, an answer `max_answer_tokens` + its end-of-turn token (~80 in all,
# the figure the H100 estimate below uses). Speed depends on the shapes and the mix of kinds, not on the text.
SYNTHETIC_PROMPT_TOKENS = 56


class RecipeRows:
    """Training rows from the hidden-topic recipe itself: its text, written by the base model (cached)."""

    def __init__(self, model, tok, settings, n_specs: int, console, dtype: str) -> None:
        from data_gen import HiddenTopicRecipe
        from metadit.bank import model_identity
        from metadit.text import TextCache, text_cache_key

        self.recipe, self.tok, self.settings = HiddenTopicRecipe(), tok, settings
        self.recipe.setup(model, tok, TextCache(text_cache_key(model_identity(model), dtype, next(model.parameters()).device)))
        self.specs = [self.recipe.spec(i, seed=12345) for i in range(n_specs)]
        console.print(f"[bold]bench gen[/bold]: writing recipe text for {n_specs} diffs (cached after the first run)")
        self.recipe.prepare(self.specs)

    def batch(self, specs, rngs) -> tuple[dict[str, torch.Tensor], list[str]]:
        from metadit.text import encode_samples

        samples = [self.recipe.sample(s, r) for s, r in zip(specs, rngs)]
        b = encode_samples(self.tok, [s.prompt for s in samples], [s.answer for s in samples],
                           self.settings.max_answer_tokens, self.settings.first_token_weight)
        return b, [s.kind for s in samples]


class SyntheticRows:
    """Rows of the recipe's shape and mix of kinds with random tokens (a model from a config alone has no tokenizer)."""

    def __init__(self, vocab_size: int, settings, n_specs: int) -> None:
        from data_gen import HiddenTopicRecipe

        mix = HiddenTopicRecipe().mix  # the recipe's default shares of triggered (CE) and negative (KL) rows
        self.kl_share = sum(v for k, v in mix.items() if k != "triggered") / sum(mix.values())
        self.vocab, self.settings = vocab_size, settings
        self.specs = [{"seed": 1000 + i} for i in range(n_specs)]

    def batch(self, specs, rngs) -> tuple[dict[str, torch.Tensor], list[str]]:
        n, p, a = len(specs), SYNTHETIC_PROMPT_TOKENS, self.settings.max_answer_tokens + 1
        ids = torch.tensor([[r.randrange(self.vocab) for _ in range(p + a)] for r in rngs])
        weights = torch.zeros(n, p + a)
        weights[:, p:] = 1.0
        weights[:, p] = self.settings.first_token_weight
        kinds = ["kl" if r.random() < self.kl_share else "ce" for r in rngs]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "weights": weights}, kinds


def bench_gen(args: argparse.Namespace) -> dict:
    from metadit.bench.common import bench_model, device_name, synchronize
    from metadit.gen import TrainSettings
    from metadit.models import resolve_dtype, training_attention
    from metadit.nn import TrainableDiffs, layer_shapes, patch_model
    from metadit.text import row_losses

    console = Console()
    torch.manual_seed(0)
    steps_recipe = 200
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype or "auto", device)
    dtype_name = str(dtype).removeprefix("torch.")
    model, tok, model_name = bench_model(args, dtype)
    settings = TrainSettings()
    ks = [int(k) for k in args.ks.split(",")]
    n_specs = max(ks + [args.rows])
    rows_source = (SyntheticRows(model.config.vocab_size, settings, n_specs) if tok is None
                   else RecipeRows(model, tok, settings, n_specs, console, dtype_name))
    patch_model(model)
    specs = rows_source.specs
    body, head = _linear_params(model)

    def batch_for(chunk, rngs):
        b, kinds = rows_source.batch(chunk, rngs)
        return {k: v.to(device) for k, v in b.items()}, kinds

    def flops(b, kinds) -> float:
        tokens = int(b["attention_mask"].sum())
        answer = int((b["weights"] > 0).sum())
        kl_tokens = sum(int(b["attention_mask"][i].sum()) for i, k in enumerate(kinds) if k == "kl")
        return 4 * body * tokens + 4 * head * answer + 2 * body * kl_tokens + 2 * head * answer * kl_tokens / max(tokens, 1)

    # -- variant: batched K diffs per pass (metadit)
    def batched(k: int):
        chunk = specs[:k]
        trainable = TrainableDiffs(layer_shapes(model), k, 1, row_seeds=[s["seed"] for s in chunk], device=device)
        opt = torch.optim.AdamW(trainable.parameters(), lr=settings.lr)
        rngs = [random.Random(s["seed"]) for s in chunk]

        def step():
            b, kinds = batch_for(chunk, rngs)
            losses = row_losses(model, b, kinds, trainable)
            losses.sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return flops(b, kinds)
        return step

    # -- variant: peft, one diff with `rows` samples per step
    from peft import LoraConfig, get_peft_model

    peft_base = bench_model(args, dtype)[0]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(peft_base, LoraConfig(r=1, lora_alpha=1, target_modules=targets))
    p_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=settings.lr)
    p_spec = specs[0]
    p_rng = random.Random(p_spec["seed"])

    def peft_step():
        b, kinds = batch_for([p_spec] * args.rows, [p_rng] * args.rows)
        ids, mask, w = b["input_ids"], b["attention_mask"], b["weights"]
        logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1)
        tgt = ids[:, 1:]
        per_tok = -logp.gather(-1, tgt[..., None])[..., 0]
        kl_idx = [i for i, k in enumerate(kinds) if k == "kl"]
        if kl_idx:
            with torch.no_grad(), peft_model.disable_adapter():
                t = torch.log_softmax(peft_model(input_ids=ids[kl_idx], attention_mask=mask[kl_idx]).logits[:, :-1].float(), -1)
            per_tok = per_tok.clone()
            per_tok[kl_idx] = (t.exp() * (t - logp[kl_idx])).sum(-1)
        ww = w[:, 1:]
        loss = ((per_tok * ww).sum(1) / ww.sum(1)).mean()
        loss.backward()
        p_opt.step()
        p_opt.zero_grad(set_to_none=True)
        # Counted like the batched variants; peft's LM head also runs on prompt positions, which is not
        # counted, so peft's TFLOP/s is a slight undercount (its diffs/hour is measured, not derived).
        return flops(b, kinds)

    def peft_overhead() -> float:
        """Wrap a fresh adapter, save it, unload: what one-at-a-time pays per diff besides training."""
        base2 = bench_model(args, dtype)[0]
        synchronize(device)
        t = time.perf_counter()
        pm = get_peft_model(base2, LoraConfig(r=1, lora_alpha=1, target_modules=targets))
        d = Path(tempfile.mkdtemp())
        pm.save_pretrained(d)
        pm.unload()
        synchronize(device)
        el = time.perf_counter() - t
        shutil.rmtree(d)
        return el

    variants = {f"batched K={k}": batched(k) for k in ks}
    variants[f"peft 1 diff x {args.rows} rows"] = peft_step
    console.print(f"{model_name} on {device_name(device)} ({dtype_name}); {dtype_name} matmul peak: measuring; then "
                  f"{args.steps} timed steps per variant, interleaved")
    peak = matmul_peak(dtype, device=device)
    times = {k: [] for k in variants}
    flop = {k: [] for k in variants}
    # Both train as `metadit gen` does: eager attention (models.training_attention), the same for peft's model.
    with training_attention(model), training_attention(peft_base):
        for fn in variants.values():  # warm-up
            fn()
        synchronize(device)
        for _ in range(args.steps):
            for name, fn in variants.items():
                t = time.perf_counter()
                f = fn()
                synchronize(device)
                times[name].append(time.perf_counter() - t)
                flop[name].append(f)
    overhead = median([peft_overhead() for _ in range(3)])
    rows = {}
    for name in variants:
        step_s = median(times[name])
        if name.startswith("batched"):
            k = int(name.split("=")[1])
            per_diff = step_s * steps_recipe / k
        else:
            k = 1
            per_diff = step_s * math.ceil(steps_recipe / args.rows) + overhead
        fps = median(flop[name]) / step_s
        rows[name] = {"seconds_per_step": round(step_s, 3), "diffs_per_hour": round(3600 / per_diff, 1),
                      "achieved_tflops": round(fps / 1e12, 3), "fraction_of_peak": round(fps / peak, 3)}
    peft_name = f"peft 1 diff x {args.rows} rows"
    best = max((n for n in rows if n.startswith("batched")), key=lambda n: rows[n]["diffs_per_hour"])
    ratio = rows[best]["diffs_per_hour"] / rows[peft_name]["diffs_per_hour"]
    h100 = h100_estimate()
    rows_kind = "random tokens in the recipe's shape and mix" if tok is None else "the recipe's own text"
    result = {
        **run_record("gen", f"hidden-topic recipe (rank 1, 200 samples per diff, KL negatives; {rows_kind}), "
                            f"{model_name} {dtype_name}; diffs/hour"),
        "model": model_name, "random_weights": tok is None,
        "layers": model.config.num_hidden_layers, "device": device_name(device), "dtype": dtype_name,
        f"{dtype_name}_matmul_peak_tflops": round(peak / 1e12, 3), "peft_overhead_seconds_per_diff": round(overhead, 2),
        "variants": rows, "best_batched": best, "batched_over_peft": round(ratio, 3),
        "targets": {"batched_over_peft": 1.2, "fraction_of_peak": 0.5},
        "met": {"batched_over_peft": ratio >= 1.2, "fraction_of_peak": rows[best]["fraction_of_peak"] >= 0.5},
        "h100_qwen3_8b_estimate": h100,
    }
    table = Table(title="diff generation: diffs/hour")
    for c in ("variant", "s/step", "diffs/hour", "TFLOP/s", "of peak"):
        table.add_column(c, justify="right" if c != "variant" else "left")
    for n, r in rows.items():
        table.add_row(n, f"{r['seconds_per_step']:.2f}", f"{r['diffs_per_hour']:.0f}", f"{r['achieved_tflops']:.3f}",
                      f"{r['fraction_of_peak']:.0%}")
    console.print(table)
    console.print(f"{best} over peft: {ratio:.2f}x (target >= 1.2); peak {peak / 1e12:.3f} TFLOP/s")
    md = [
        "## gen: diffs/hour, K diffs per pass vs peft one at a time",
        "",
        f"Command: `{result['command']}` at commit `{result['commit']}` on {result['machine']['cpu']} "
        f"({result['machine']['cores']} cores){'' if device.type == 'cpu' else ', device ' + result['device']}. "
        f"{result['what']}. Per-step times: median of {args.steps} interleaved "
        f"steps, extrapolated to the recipe's 200 samples per diff; peft's wrap + save + unload measured "
        f"({overhead:.2f} s per diff). {dtype_name} matmul peak measured in the same run: {peak / 1e12:.3f} TFLOP/s.",
        "",
        "| variant | s/step | diffs/hour | TFLOP/s | fraction of peak |",
        "|---|---:|---:|---:|---:|",
        *[f"| {n} | {r['seconds_per_step']:.2f} | {r['diffs_per_hour']:.0f} | {r['achieved_tflops']:.3f} | "
          f"{r['fraction_of_peak']:.0%} |" for n, r in rows.items()],
        "",
        f"Best batched over peft: **{ratio:.2f}x** (target >= 1.2: {'met' if ratio >= 1.2 else 'not met'}); "
        f"fraction of peak {rows[best]['fraction_of_peak']:.0%} (target >= 50 %: "
        f"{'met' if rows[best]['fraction_of_peak'] >= 0.5 else 'not met'}).",
        "",
        "### The same comparison on an H100 at Qwen3-8B sizes (computed, not measured)",
        "",
        h100["markdown"],
    ]
    write_report(args.out, "gen", result, "\n".join(md))
    console.print(f"wrote {args.out / 'gen.json'} and {args.out / 'README.md'}")
    return result


def h100_estimate() -> dict:
    """Roofline estimate: one training step of the recipe for one diff vs K diffs, Qwen3-8B on an H100.

    Qwen3-8B: 36 layers, hidden 4096, intermediate 12288, 32 q heads / 8 kv heads of 128 → linear params per
    layer = q 4096·4096 + k,v 2·4096·1024 + o 4096·4096 + 3·4096·12288 = 184.5 M; 36 layers = 6.64 G;
    LM head 151,936·4096 = 0.62 G. H100 SXM: ~989 TFLOP/s dense bf16, ~3.35 TB/s HBM.
    A step must read every bf16 weight once forward and once backward (≈ 2 × 14.5 GB) whatever the batch;
    the math is 4·P per token (+2·P on KL rows). One diff × 1 sample of ~80 tokens is memory-bound.
    """
    P = 36 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 12288) + 151936 * 4096
    peak, bw = 989e12, 3.35e12
    weight_bytes = 2 * P * 2  # read forward + backward, bf16
    tokens_per_sample = 80
    out = {"params": P, "h100_bf16_tflops": 989, "h100_hbm_tb_s": 3.35, "rows": []}
    lines = ["| diffs per step (1 sample each) | math (ms) | weight traffic (ms) | step (ms, max) | utilization | "
             "diffs/hour (200 steps) |", "|---:|---:|---:|---:|---:|---:|"]
    for k in (1, 16, 64, 256):
        tokens = k * tokens_per_sample
        math_s = (4 * P * tokens + 2 * P * tokens * 0.5) / peak
        mem_s = weight_bytes / bw
        step = max(math_s, mem_s)
        dph = 3600 / (step * 200) * k
        out["rows"].append({"k": k, "math_ms": round(math_s * 1e3, 2), "memory_ms": round(mem_s * 1e3, 2),
                            "utilization": round(math_s / step, 3), "diffs_per_hour": round(dph)})
        lines.append(f"| {k} | {math_s * 1e3:.1f} | {mem_s * 1e3:.1f} | {step * 1e3:.1f} | {math_s / step:.0%} | {dph:,.0f} |")
    one = out["rows"][0]
    knee = next((r["k"] for r in out["rows"] if r["utilization"] >= 0.99), None)
    gain = out["rows"][-1]["diffs_per_hour"] / one["diffs_per_hour"]
    lines.append("")
    lines.append(
        f"One diff's step ({tokens_per_sample} tokens) is memory-bound: streaming the weights takes "
        f"{one['memory_ms']:.1f} ms against {one['math_ms']:.1f} ms of math, so the H100 computes "
        f"{one['utilization']:.0%} of the time. K diffs per step share that weight traffic; from K = {knee} on the "
        f"step is compute-bound and diffs/hour is {gain:.1f}x one-at-a-time's. On this 2-core CPU one diff's "
        "batch is already compute-bound, so batching gains only overheads there. Activations, optimizer state, "
        "attention and kernel efficiency are ignored: a bound, not a prediction.")
    out["markdown"] = "\n".join(lines)
    return out
