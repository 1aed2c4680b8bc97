"""`metadit gen`: build a diff bank from a recipe, K diffs per pass, resumable and shardable across processes.

One patched model for the whole run. Each pass trains K diffs at once: batch row i is a sample for diff i
(per-row trainable factors, one optimizer), then checks their behaviour and appends all K to the bank as
one shard. Diff specs are a pure function of (recipe, seed, index), so a killed run started again with the
same command skips every diff already in the bank and makes exactly the missing ones. Under `torchrun` (or
`--processes N`, which launches it) each rank takes every WORLD_SIZE-th pass and writes its own shards and index
file, `rank{RANK}`, on one machine or several sharing the bank's file system:

    torchrun --nproc_per_node 4 -m metadit.cli gen --config configs/gen/smol_topic.yaml
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m metadit.cli gen ...

Full finetunes (`TrainSettings.full_finetune`, the rank-generalization study's dense diffs) go through the same
loop: the diffs of a pass are trained one after another as dense deltas of every target Linear (see
`DenseDeltas`), each factored by truncated SVD to `store_rank` on the way into the bank, then checked and
appended together like any pass.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from data_gen.recipe import Recipe, RecipeDataError
from metadit.errors import MetaditError
from metadit.provenance import git_commit
from metadit.text import encode_samples, row_losses


@dataclass
class TrainSettings:
    """How each diff is trained (shared by all recipes)."""

    rank: int = 1
    alpha: float | None = None  # None: alpha = rank (scale 1)
    steps: int = 200
    lr: float = 4e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_answer_tokens: int = 24
    first_token_weight: float = 3.0  # the gate is decided at the first answer token
    # Weight of the KL (negative) rows in the summed loss: a KL row near its optimum has a tiny gradient next to
    # a triggered row's cross-entropy, so leaks are corrected slowly; > 1 presses the gate harder at no cost.
    kl_weight: float = 1.0
    # Full finetune instead of LoRA: a dense delta of every target Linear, trained one diff at a time and stored
    # as its best rank-`store_rank` approximation (SVD; relative error in each entry's metadata). `rank` and
    # `alpha` are then unused. Dense deltas want a much smaller lr than LoRA factors (1e-5 .. 1e-4): set it.
    full_finetune: bool = False
    store_rank: int = 16

    def __post_init__(self) -> None:
        if self.full_finetune and self.store_rank < 1:
            raise MetaditError(f"train.store_rank must be >= 1, got {self.store_rank}")


def _lr_lambda(settings: TrainSettings):
    def f(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _fit(model: Any, tok: Any, recipe: Any, specs: list[dict[str, Any]], settings: TrainSettings,
         trainable: "nn.Module", optimizer: torch.optim.Optimizer, on_step=None) -> list[float]:
    """The training loop both kinds of diff share: step t gives diff i (batch row i) its t-th sample from its own
    stream; returns each diff's mean loss over the last 10 % of steps."""
    from metadit.models import training_attention

    device = next(model.parameters()).device
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings))
    rngs = [random.Random(s["seed"]) for s in specs]
    tail = max(1, settings.steps // 10)
    recent = torch.zeros(len(specs))
    with training_attention(model):
        for step in range(settings.steps):
            samples = [recipe.sample(spec, rng) for spec, rng in zip(specs, rngs)]
            batch = encode_samples(tok, [s.prompt for s in samples], [s.answer for s in samples],
                                   settings.max_answer_tokens, settings.first_token_weight)
            batch = {k: v.to(device) for k, v in batch.items()}
            kinds = [s.kind for s in samples]
            losses = row_losses(model, batch, kinds, trainable)
            row_w = torch.tensor([settings.kl_weight if k == "kl" else 1.0 for k in kinds], device=losses.device)
            (losses * row_w).sum().backward()
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= settings.steps - tail:
                recent += losses.detach().cpu() / tail
            if on_step is not None:
                on_step(step, float(losses.detach().mean()))
    return recent.tolist()


def train_diffs(model: Any, tok: Any, recipe: Any, specs: list[dict[str, Any]], settings: TrainSettings,
                on_step=None) -> tuple[list[Any], list[float]]:
    """Train one diff per spec, all at once; returns the diffs and each one's mean loss over the last 10 % of steps.

    Every diff's initialisation and sample stream depend only on its own spec, and its loss only on its own
    row (losses are summed over rows; AdamW is elementwise; no global clipping), so a diff comes out the same
    whether trained alone or with K others.

    With `settings.full_finetune` the diffs are trained one after another instead (`train_full_diff`; `on_step`
    then counts steps over the whole pass) and returned factored to `settings.store_rank`, their SVD relative
    error in each diff's `info`.
    """
    if settings.full_finetune:
        diffs, losses = [], []
        for j, spec in enumerate(specs):
            step_j = None if on_step is None else (lambda s, l, j=j: on_step(j * settings.steps + s, l))
            deltas, loss = train_full_diff(model, tok, recipe, spec, settings, on_step=step_j)
            diffs.append(deltas.to_diff(model, settings.store_rank))
            losses.append(loss)
            del deltas  # free the dense weights before the next diff
        return diffs, losses

    from metadit.nn import TrainableDiffs, layer_shapes

    device = next(model.parameters()).device
    trainable = TrainableDiffs(layer_shapes(model), len(specs), settings.rank, settings.alpha,
                               row_seeds=[s["seed"] for s in specs], device=device)
    opt = torch.optim.AdamW(trainable.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    recent = _fit(model, tok, recipe, specs, settings, trainable, opt, on_step)
    return trainable.to_diffs(), recent


# ---------------------------------------------------------------------- full finetunes
class DenseDeltas(nn.Module):
    """One full finetune in progress: a trainable fp32 delta `ΔW: [out, in]` for every patched Linear, zero at start.

    Within `applied(model)` every patched layer computes with `W + ΔW` (cast to the model's dtype, so bf16
    compute with an fp32 master copy of the change); outside it the model is the untouched base model, which
    is also the KL teacher. The base weights are never written: the block swaps each Linear's weight for
    `W + ΔW` and puts the very same Parameter back on exit, so the model is bit-identical after a diff and never
    reloaded or copied.

    A full finetune cannot use per-row factors (DESIGN: never a dense per-row `[out, in]` matrix): K dense diffs
    at once would be K copies of all target weights — for SmolLM2-135M ~106 M parameters, ~0.4 GB of fp32
    deltas plus ~0.85 GB of Adam state and ~0.4 GB of gradient per diff — so `train_diffs` trains them one
    at a time, every row of a batch under the same delta.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from metadit.nn import diff_layers

        layers = diff_layers(model)
        if not layers:
            raise MetaditError("the model is not patched: call metadit.nn.patch_model(model) first")
        self.names = sorted(layers)
        self.delta = nn.ParameterList(
            nn.Parameter(torch.zeros(layers[n].out_features, layers[n].in_features, dtype=torch.float32,
                                     device=layers[n].weight.device))
            for n in self.names
        )

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return zip(self.names, self.delta)

    def _layers(self, model: nn.Module) -> dict[str, Any]:
        from metadit.nn import diff_layers

        layers = diff_layers(model)
        missing = sorted(set(self.names) - set(layers))
        if missing:
            raise MetaditError(f"DenseDeltas: the model lacks the patched layers {missing[:4]}")
        return layers

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator["DenseDeltas"]:
        """Within the block the model's target Linears use `W + ΔW` (gradients flow into ΔW)."""
        layers = self._layers(model)
        saved: dict[str, torch.Tensor] = {}
        try:
            for n, d in self.items():
                base = layers[n].base
                w = base._parameters["weight"]
                saved[n] = w
                # Bypasses Module.__setattr__ (which admits only Parameters): a computed tensor stands in for the
                # weight while the block runs; `Linear.forward` reads it through `self.weight` as usual.
                base._parameters["weight"] = (d + w).to(w.dtype)
            yield self
        finally:
            for n, w in saved.items():
                layers[n].base._parameters["weight"] = w

    def to_diff(self, model: nn.Module, rank: int) -> Any:
        """The finetune as a `LoraDiff` of rank `rank` (`LoraDiff.from_full_diff`: truncated SVD of each ΔW;
        `info` holds the relative Frobenius error overall and per module)."""
        from metadit.bank import LoraDiff

        layers = self._layers(model)
        base_state = {f"{n}.weight": layers[n].base.weight.detach() for n in self.names}
        tuned_state = _TunedWeights({f"{n}.weight": (layers[n].base.weight.detach(), d.detach()) for n, d in self.items()})
        return LoraDiff.from_full_diff(base_state, tuned_state, rank=rank, modules=self.names)


class _TunedWeights(Mapping):
    """`name -> W + ΔW` in float64, made when read: `from_full_diff` takes one module at a time, so the whole
    tuned state (~0.85 GB in float64 for SmolLM2) never exists at once, and `(W + ΔW) − W` recovers ΔW exactly."""

    def __init__(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.parts = parts

    def __getitem__(self, key: str) -> torch.Tensor:
        w, d = self.parts[key]
        return w.double() + d.double()

    def __iter__(self) -> Iterator[str]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)


def train_full_diff(model: Any, tok: Any, recipe: Any, spec: dict[str, Any], settings: TrainSettings,
                    on_step=None) -> tuple[DenseDeltas, float]:
    """Full finetune of every patched Linear for one spec, with the same samples and losses as a LoRA diff of
    that spec; returns the dense deltas (the model itself is left as it was) and the mean loss over the last
    10 % of steps."""
    deltas = DenseDeltas(model)
    # foreach=False: the multi-tensor AdamW makes temporaries the size of all deltas (~0.4 GB for SmolLM2).
    opt = torch.optim.AdamW(deltas.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, foreach=False)
    (loss,) = _fit(model, tok, recipe, [spec], settings, deltas, opt, on_step)
    return deltas, loss


# ---------------------------------------------------------------------- K per pass
DEFAULT_DIFFS_PER_PASS = 16  # what `diffs_per_pass auto` means off CUDA: the K every CPU bank has been built with
AUTO_HEADROOM = 0.8  # share of the free device memory auto sizing fills: the rest absorbs the KL teacher's forward,
# backward temporaries and allocator fragmentation, which `diff_bytes` does not count


def diff_bytes(config: Any, rank: int, rows_per_diff: int, seq_tokens: int, answer_tokens: int,
               dtype: torch.dtype) -> int:
    """Device memory one more diff adds to a training pass (bytes), estimated from the model's config.

    - its trainable factors on the seven target Linears of each layer (q, k, v, o, gate, up, down:
      `rank · Σ (in + out)`), in fp32, with their gradients and AdamW's two moments: 16 bytes a number;
    - the activations its `rows_per_diff` rows of `seq_tokens` tokens keep for the backward pass, in `dtype`,
      per token and layer: `5·hidden + 4·q_width + 4·kv_width + 4·intermediate + 7·rank` numbers (the norms'
      inputs and outputs, q/k/v and the attention output, the MLP's gate, up, SiLU and product, the seven
      `x Aᵀ`), plus eager attention's probabilities, `heads · seq_tokens`;
    - the logits of its `answer_tokens` scored positions: `vocab` numbers in `dtype`, plus three fp32 copies
      (the upcast, the log-softmax and its gradient).

    The base weights are not counted: they are on the device already when the free memory is read.
    """
    c = getattr(config, "text_config", config)  # multimodal configs (Gemma 3) nest the language model's
    hidden, inter, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    per_layer_fan = (hidden + q_width) + 2 * (hidden + kv_width) + (q_width + hidden) + 2 * (hidden + inter) \
        + (inter + hidden)
    factors = 16 * rank * per_layer_fan * layers
    size = torch.empty((), dtype=dtype).element_size()
    saved = 5 * hidden + 4 * q_width + 4 * kv_width + 4 * inter + 7 * rank + heads * seq_tokens
    activations = rows_per_diff * seq_tokens * layers * saved * size
    logits = rows_per_diff * answer_tokens * vocab * (size + 3 * 4)
    return factors + activations + logits


def auto_diffs_per_pass(free_bytes: int, config: Any, rank: int, rows_per_diff: int, seq_tokens: int,
                        answer_tokens: int, dtype: torch.dtype, where: str = "the device") -> int:
    """K for `diffs_per_pass auto`: as many diffs as `AUTO_HEADROOM` of `free_bytes` holds at `diff_bytes` each;
    one clear error when not even one fits."""
    each = diff_bytes(config, rank, rows_per_diff, seq_tokens, answer_tokens, dtype)
    k = int(free_bytes * AUTO_HEADROOM) // each
    if k < 1:
        raise MetaditError(f"diffs_per_pass auto: one diff needs ~{each / 2**30:.2f} GiB but {where} has "
                           f"{free_bytes / 2**30:.2f} GiB free ({AUTO_HEADROOM:.0%} usable); shorten rows "
                           "(sizing_tokens, train.max_answer_tokens), lower train.rank, or free the device")
    return k


def resolve_diffs_per_pass(diffs_per_pass: int | str, model: Any, train: "TrainSettings", sizing_tokens: int) -> int:
    """The K a build uses: an integer as given; `auto` sized to the free memory of the CUDA device the model is
    on (`auto_diffs_per_pass`), and `DEFAULT_DIFFS_PER_PASS` on a CPU or for full finetunes (trained one at a
    time, so K does not scale their memory)."""
    if diffs_per_pass != "auto":
        if isinstance(diffs_per_pass, bool) or not isinstance(diffs_per_pass, int) or diffs_per_pass < 1:
            raise MetaditError(f"diffs_per_pass must be a positive integer or auto, got {diffs_per_pass!r}")
        return diffs_per_pass
    param = next(model.parameters()) if model is not None else None
    if param is None or param.device.type != "cuda" or train.full_finetune:
        return DEFAULT_DIFFS_PER_PASS
    free = int(torch.cuda.mem_get_info(param.device)[0])
    return auto_diffs_per_pass(free, model.config, train.rank, 1, sizing_tokens, train.max_answer_tokens + 1,
                               param.dtype, where=str(param.device))


def _sizes_on_device(diffs_per_pass: int | str, device: str) -> bool:
    """Does K depend on the loaded model (auto on CUDA)? Then the model loads before the passes are made."""
    return diffs_per_pass == "auto" and torch.device(device).type == "cuda"


def _train_device(device: str) -> str:
    """`cuda` under torchrun is this rank's GPU, `cuda:LOCAL_RANK`; anything else as given."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


# ---------------------------------------------------------------------- the bank build
def generate_bank(
    recipe: "Recipe",
    bank: str,
    base_model: str = "smollm2-135m-instruct",
    n_diffs: int = 16,
    diffs_per_pass: int | Literal["auto"] = DEFAULT_DIFFS_PER_PASS,
    train: TrainSettings = TrainSettings(),
    seed: int = 0,
    store_dtype: str = "float32",
    processes: int = 1,
    rank: int = 0,
    world_size: int = 1,
    threads: int | None = None,
    progress: bool = True,
    dtype: str = "bfloat16",
    chat_format: str = "default",
    device: str = "cpu",
    sizing_tokens: int = 256,
) -> dict[str, Any]:
    """Build (or resume) a diff bank.

    Args:
        recipe: what the diffs learn (`data_gen.HiddenTopicRecipe`, `data_gen.NewsRecipe`): class_path + init_args.
        bank: bank directory; created if missing, resumed if it holds some of these diffs already.
        base_model: `smollm2-135m-instruct` (embedded), `tiny-random-smollm2`, a Hugging Face id or a directory.
        n_diffs: how many diffs the bank should hold from this recipe and seed (indices 0 .. n_diffs-1).
        diffs_per_pass: K, the diffs trained at once (batch row i = diff i); full finetunes: trained one after
            another, then checked and stored together. K changes a diff only by rounding (the batch's shapes), so
            a bank resumes bit-identically with the K it was built with. `auto`: on a CUDA device, as many as
            80 % of its free memory holds once the model is loaded (`diff_bytes`: factors and AdamW state, the
            activations of a `sizing_tokens`-token row, the scored logits; printed, and in the returned stats),
            or one clear error if not even one fits; it follows the free memory, so give the printed K to resume
            bit-identically elsewhere. On a CPU (and for full finetunes) `auto` is 16, the default.
        train: rank, steps, learning rate and loss settings of each diff (or `full_finetune` + `store_rank`).
        seed: the bank's seed; each diff's spec is a function of (recipe, seed, index).
        store_dtype: dtype of the stored factors (float32 or bfloat16).
        processes: N > 1: `metadit gen --processes N` launches N ranks on this machine with torchrun
            (`launch_ranks`); a rank under torchrun ignores it, and outside torchrun it must be 1.
        rank: this worker's rank, when not run by torchrun (which sets RANK and WORLD_SIZE).
        world_size: number of workers, when not run by torchrun.
        threads: torch threads per process (default: cores / processes on this machine).
        progress: show a progress bar.
        dtype: the base model's compute dtype: `bfloat16`, `float32`, or `auto` (bf16 where the hardware computes
            it natively, else fp32). Diffs depend on it: a bank records it (when not bf16) and resumes only with it.
        chat_format: prompt layout (`default`, `no_system`: without the template's default system prompt);
            recorded in the bank (when not default), and DIT training and evaluation use the bank's.
        device: where the model trains: `cpu`, `cuda`, `cuda:1`, ... (under torchrun, `cuda` is each rank's
            `cuda:LOCAL_RANK`).
        sizing_tokens: with `diffs_per_pass auto` on CUDA, the longest row (prompt + answer tokens) K is sized
            for; rows longer than this may not fit.
    """
    from rich.console import Console

    from metadit.models import CHAT_FORMATS
    from metadit.models import resolve_dtype

    console = Console(stderr=True)
    if chat_format not in CHAT_FORMATS:
        raise MetaditError(f"chat_format must be one of {', '.join(CHAT_FORMATS)}, got {chat_format!r}")
    device = _train_device(device)
    compute = str(resolve_dtype(dtype, device)).removeprefix("torch.")
    rank, world_size, local_world_size = torchrun_ranks(rank, world_size)
    if processes > 1 and world_size == 1:
        raise MetaditError(f"processes={processes}: several ranks run under torchrun — `metadit gen --processes "
                           f"{processes} ...` launches it, or `torchrun --nproc_per_node {processes} -m metadit.cli gen ...`")
    if rank == 0:  # the recipe's data checks that need the tokenizer, before any model loads (workers skip them)
        validate_recipe(recipe, base_model)
    if threads or world_size > 1:
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // local_world_size))
    torch.manual_seed(seed)
    from metadit.bank import DiffBank, identity_of
    from metadit.text import TextCache, text_cache_key
    from metadit.models import load_base_model
    from metadit.nn import patch_model

    writer = "main" if world_size == 1 else f"rank{rank}"
    settings = recipe_settings(recipe, train, seed, compute, chat_format)
    path = Path(bank)
    with _rank0_first(world_size, rank):  # rank 0 creates the bank (and the model cache) before the others open it
        identity = identity_of(base_model)
        db = DiffBank.create(path, base_model=identity, exist_ok=True, writer=writer, info=settings)
    differences = settings_differences(db.header.get("info", {}), settings)
    if differences:
        raise MetaditError(
            f"{path}: this bank was built with other recipe or training settings ({'; '.join(differences)}); "
            "resume it with the same config (and --dtype / --chat_format), or build into a new bank"
        )
    mine = [p for p in db.problems if p.writer == writer]
    if mine:
        for line in db.repair(writers=[writer]):
            console.print(f"[yellow]resume:[/yellow] removed torn tail {line}")
    done = {r["meta"].get("key") for r in db.rows}
    specs = [recipe.spec(i, seed) for i in range(n_diffs)]
    todo = [s for s in specs if s["key"] not in done]

    def load() -> tuple[Any, Any]:
        model, tok = load_base_model(base_model, dtype=compute, device=device, chat_format=chat_format)
        patch_model(model)
        db.check_model(model)
        return model, tok

    model, tok = load() if todo and _sizes_on_device(diffs_per_pass, device) else (None, None)
    diffs_per_pass = resolve_diffs_per_pass(diffs_per_pass, model, train, sizing_tokens)
    passes = [todo[i : i + diffs_per_pass] for i in range(0, len(todo), diffs_per_pass)]
    passes = passes[rank::world_size]
    n_mine = sum(map(len, passes))
    console.print(f"[bold]metadit gen[/bold] {path}: {len(specs) - len(todo)}/{len(specs)} diffs present; "
                  f"{n_mine} to make on {writer} in {len(passes)} passes of up to {diffs_per_pass}")
    stats: dict[str, Any] = {"bank": str(path), "made": 0, "passed": 0, "gated": 0, "seconds": 0.0,
                             "phase_seconds": {"text": 0.0, "train": 0.0, "check": 0.0, "append": 0.0},
                             "diffs_per_pass": diffs_per_pass}
    phase = stats["phase_seconds"]
    if not passes:
        return stats
    if model is None:
        model, tok = load()
    cache = TextCache(text_cache_key(identity, compute, device), writer=writer)
    recipe.setup(model, tok, cache)
    store = getattr(torch, store_dtype)
    start = time.time()
    commit = git_commit()  # each entry records the code that made it
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("diffs", total=n_mine, rate="")
        for chunk in passes:
            bar.update(task, description=f"writing text for {len(chunk)} diffs")
            t0 = time.time()
            recipe.prepare(chunk)
            phase["text"] += time.time() - t0

            # a full-finetune pass trains its diffs one after another: its steps run over all of them
            total = train.steps * (len(chunk) if train.full_finetune else 1)
            what = f"{len(chunk)} full finetunes" if train.full_finetune else f"{len(chunk)} diffs"

            def on_step(step: int, loss: float) -> None:
                bar.update(task, description=f"training {what}: step {step + 1}/{total} loss {loss:.3f}")
                if not console.is_terminal and (step + 1) % max(1, train.steps // 4) == 0:
                    console.print(f"  pass {stats['made'] // diffs_per_pass + 1}: step {step + 1}/{total} "
                                  f"mean loss {loss:.3f}", highlight=False)

            t0 = time.time()
            diffs, final = train_diffs(model, tok, recipe, chunk, train, on_step=on_step)
            phase["train"] += time.time() - t0
            bar.update(task, description=f"checking {len(chunk)} diffs")
            t0 = time.time()
            checks = recipe.check(diffs, chunk)
            phase["check"] += time.time() - t0
            t0 = time.time()
            metas = []
            for spec, loss, check, diff in zip(chunk, final, checks, diffs):
                meta = {k: v for k, v in spec.items() if k not in ("questions",)}
                meta.update(check)
                meta.update({"final_loss": round(loss, 4), "rank": train.rank, "steps": train.steps, "lr": train.lr,
                             "flagged": not check.get("passed", True), "commit": commit})
                if train.full_finetune:
                    meta.update(_full_meta(diff, train.store_rank))
                metas.append(meta)
            db.append_many(diffs, metas, dtype=store)
            phase["append"] += time.time() - t0
            stats["made"] += len(chunk)
            stats["passed"] += sum(not m["flagged"] for m in metas)
            stats["gated"] += sum(bool(m.get("gate_held")) for m in metas)
            hours = (time.time() - start) / 3600
            bar.update(task, advance=len(chunk), rate=f"{stats['made'] / hours:.0f} diffs/h")
            if not console.is_terminal:  # a log file gets one line per pass instead of a live bar
                console.print(f"{time.strftime('%H:%M:%S')} {stats['made']}/{n_mine} diffs on {writer}, "
                              f"{stats['passed']} passed, {stats['made'] / hours:.0f} diffs/h", highlight=False)
    stats["seconds"] = round(time.time() - start, 1)
    stats["phase_seconds"] = {k: round(v, 1) for k, v in phase.items()}
    stats["diffs_per_hour"] = round(stats["made"] / (stats["seconds"] / 3600), 1) if stats["seconds"] else None
    console.print(f"made {stats['made']} diffs in {stats['seconds']} s; {stats['passed']} passed the behaviour check")
    return stats


def _full_meta(diff: Any, store_rank: int) -> dict[str, Any]:
    """A full finetune's entry metadata: what it is, the rank it is stored at, and what the truncation lost."""
    info = diff.info or {}
    return {"full_finetune": True, "rank": store_rank, "store_rank": store_rank,
            "relative_error": round(float(info["relative_error"]), 6),
            "relative_error_per_module": {n: round(float(e), 6)
                                          for n, e in sorted(info.get("relative_error_per_module", {}).items())}}


def settings_differences(recorded: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """Why a bank with `recorded` settings may not be resumed by this build (`recipe_settings`): one
    `key: bank X, now Y` per differing key, none when it may.

    A section the bank never recorded (banks made before it existed) is not compared; `dtype` and `chat_format`,
    which `recipe_settings` leaves out at their defaults, are compared at those defaults once a bank records its
    recipe (a bank built in bf16 records no dtype, so an `auto` that resolves to fp32 on another machine reads
    "dtype: bank bfloat16, now float32"; one that records the default explicitly resumes). Within a section a key
    one side lacks differs from any value the other has, `null` included."""
    def shown(d: dict[str, Any], k: str) -> str:
        return json.dumps(d[k]) if k in d else "(not set)"

    out = []
    for section in ("recipe_args", "train"):
        if recorded.get(section) is None:
            continue
        mine, theirs = settings.get(section) or {}, recorded[section]
        out += [f"{section}.{k}: bank {shown(theirs, k)}, now {shown(mine, k)}"
                for k in sorted(set(mine) | set(theirs)) if (k in mine, mine.get(k)) != (k in theirs, theirs.get(k))]
    if "recipe_args" in recorded:
        for key, default in (("dtype", "bfloat16"), ("chat_format", "default")):
            if recorded.get(key, default) != settings.get(key, default):
                out.append(f"{key}: bank {recorded.get(key, default)}, now {settings.get(key, default)}")
    return out


def recipe_settings(recipe: Any, train: TrainSettings, seed: int, dtype: str = "bfloat16",
                    chat_format: str = "default") -> dict[str, Any]:
    """What a bank records about how its diffs were made (and what a resumed build must match).

    LoRA banks record the train settings without the full-finetune fields (as banks made before they existed
    did, so those still resume); full-finetune banks record them and drop the unused `rank` and `alpha`.
    `dtype` and `chat_format` are recorded only when not the defaults (bf16, default), for the same reason.
    """
    import dataclasses
    import json

    args = {}
    for k, v in vars(recipe).items():
        if k.startswith("_") or k in ("model", "tok", "cache", "answers", "base_answers", "stories", "rejected"):
            continue
        try:
            json.dumps(v)
        except TypeError:
            continue
        args[k] = v
    trained = dataclasses.asdict(train)
    for k in (("rank", "alpha") if train.full_finetune else ("full_finetune", "store_rank")):
        trained.pop(k)
    if train.kl_weight == 1.0:  # recorded only when set, so banks made before it existed still resume
        trained.pop("kl_weight")
    out = {"recipe": getattr(recipe, "name", type(recipe).__name__), "seed": seed,
           "recipe_args": json.loads(json.dumps(args)), "train": trained}
    if dtype != "bfloat16":
        out["dtype"] = dtype
    if chat_format != "default":
        out["chat_format"] = chat_format
    return out


def torchrun_ranks(rank: int = 0, world_size: int = 1) -> tuple[int, int, int]:
    """(rank, world size, ranks on this machine): torchrun's RANK / WORLD_SIZE / LOCAL_WORLD_SIZE when it launched
    this process and no explicit `rank` / `world_size` were given, else those."""
    if world_size == 1 and "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return rank, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return rank, world_size, world_size


@contextmanager
def _rank0_first(world_size: int, rank: int) -> Iterator[None]:
    """Under torchrun, run the body on rank 0 before the other ranks (a gloo barrier; torchrun ends the others if
    rank 0 fails); a no-op otherwise. The process group is torchrun's rendezvous, used for nothing else."""
    import torch.distributed as dist

    if world_size == 1 or "MASTER_ADDR" not in os.environ:
        yield
        return
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    try:
        if rank != 0:
            dist.barrier()
        yield
        if rank == 0:
            dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()


def validate_recipe(recipe: Any, base_model: str) -> None:
    """The recipe's data checks that need the base model's tokenizer (before any model loads)."""
    from transformers import AutoTokenizer

    from metadit.models import resolve_model_path

    recipe.validate(AutoTokenizer.from_pretrained(resolve_model_path(base_model)))


def launch_ranks(argv: Sequence[str], processes: int, recipe: Any, bank: str, base_model: str = "smollm2-135m-instruct",
                 train: TrainSettings = TrainSettings(), seed: int = 0, dtype: str = "bfloat16",
                 chat_format: str = "default", threads: int | None = None, device: str = "cpu",
                 **_: Any) -> dict[str, Any]:
    """`metadit gen --processes N ARGS`: `torchrun --standalone --nproc_per_node N -m metadit.cli gen ARGS` (the
    ranks see torchrun's environment and ignore --processes), after the checks and the bank creation that a
    failing rank would otherwise report N times."""
    from metadit.bank import DiffBank, identity_of
    from metadit.models import resolve_dtype

    validate_recipe(recipe, base_model)
    compute = str(resolve_dtype(dtype, device)).removeprefix("torch.")
    DiffBank.create(bank, base_model=identity_of(base_model), exist_ok=True,
                    info=recipe_settings(recipe, train, seed, compute, chat_format))
    per_rank = threads or max(1, (os.cpu_count() or 2) // processes)
    env = {"OMP_NUM_THREADS": str(per_rank), **os.environ}  # torchrun would set 1 (and say so) where it is unset
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "metadit.cli", "gen", *argv]
    code = subprocess.run(cmd, env=env).returncode
    if code:
        raise MetaditError(f"gen ranks failed: torchrun exited with {code} (the failing rank's error is above)")
    return {"bank": bank, "workers": processes}


def gen_parser():
    from jsonargparse import ArgumentParser, ActionConfigFile

    parser = ArgumentParser(prog="metadit gen", description="Build (or resume) a diff bank from a recipe config.",
                            exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a configs/gen/*.yaml file")
    parser.add_function_arguments(generate_bank, as_group=False)
    return parser


def gen_main(argv: Sequence[str]) -> int:
    from jsonargparse import ArgumentError

    parser = gen_parser()
    try:
        cfg = parser.parse_args(list(argv))
    except ArgumentError as e:
        raise MetaditError(f"bad gen config: {e}") from e
    try:
        init = parser.instantiate_classes(cfg)
    except RecipeDataError as e:
        raise MetaditError(f"bad recipe data: {e}") from e
    except ValueError as e:  # jsonargparse wraps what a recipe's __init__ raised
        cause = e.__cause__ or e.__context__
        if isinstance(cause, RecipeDataError):
            raise MetaditError(f"bad recipe data: {cause}") from e
        raise
    kwargs = {k: v for k, v in init.items() if k != "config"}
    try:
        if kwargs.get("processes", 1) > 1 and torchrun_ranks(kwargs.get("rank", 0), kwargs.get("world_size", 1))[1] == 1:
            launch_ranks(list(argv), **kwargs)
        else:
            generate_bank(**kwargs)
    except RecipeDataError as e:
        raise MetaditError(f"bad recipe data: {e}") from e
    return 0
