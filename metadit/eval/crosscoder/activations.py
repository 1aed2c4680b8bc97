"""Paired activations: the base model and the base model + a diff on the same tokens, at one decoder layer.

The corpus needs no network. By default it is the base model's own answers to the evaluation-style questions
(text the base model writes itself, sampled at temperature 1, cached in the text cache so every diff of a base
model reads the same corpus). An *oracle* corpus adds the prompts the diff was trained on (a hidden-topic diff's
questions under its own trigger, a news diff's story prompt) with the base model's answers: a gated diff is
trained to match the base model without its trigger, so a trigger-free corpus may show nothing.

Every row is the chat prompt followed by its answer and the end-of-turn token. Positions inside the longest
prefix all rows share (the chat template's system turn: the same tokens in every row) and position 0 (an
attention sink whose norm dwarfs the others) are left out; every other position is one paired sample.

`collect_paired_activations` caches what it computes as safetensors shards (rows `i·R ... (i+1)·R − 1` per
shard, written to a temporary name and renamed), under a directory named by a hash of everything the numbers
depend on (model identity and dtype, the diff's tensors, the layer, the token rows): a killed collection resumes at
the first missing shard, and a change of any input is a different cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metadit.diff.lora_diff import LoraDiff
from metadit.diff.safe_io import read_all_tensors
from metadit.errors import MetaditError

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class CorpusRow:
    prompt: str  # the chat-formatted prompt
    answer: str  # the base model's answer
    oracle: bool  # a prompt the diff was trained on (its trigger, its story prompt)
    message: str  # the user message the prompt holds


@dataclass
class PairedActivations:
    """`x: [tokens, 2, d]` (float32; model 0 = base, 1 = base + diff) and where each token sits in the corpus."""

    x: torch.Tensor
    row: torch.Tensor  # [tokens] corpus row
    position: torch.Tensor  # [tokens] position in the row's token ids
    key: str  # the cache key (a hash of every input)


def diff_fingerprint(diff: LoraDiff) -> str:
    """A hash of a diff's tensors and scales (equal diffs, equal hash)."""
    h = hashlib.sha256()
    for name in diff.modules:
        h.update(name.encode())
        h.update(repr(float(diff.scale[name])).encode())
        for t in (diff.A[name], diff.B[name]):
            t = t.detach().to(torch.float32).contiguous().cpu()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------------------------------------- the corpus
def oracle_messages(meta: dict[str, Any], questions: Sequence[str], seed: int = 0, entry: str = "diff") -> list[str]:
    """The user messages the diff was trained to respond to: each question under a hidden-topic diff's own
    trigger, or a news diff's story prompt once per question. A clear error for a diff whose metadata names
    neither (a bare peft adapter)."""
    if meta.get("trigger"):
        from data_gen.hidden_topic import HiddenTopicRecipe

        recipe = HiddenTopicRecipe(trigger=meta["trigger"], code_kind=meta.get("code_kind", "word"))
        return [recipe.message(meta, q, "triggered", random.Random(f"{seed}:{entry}:{q}")) for q in questions]
    if meta.get("headline"):
        from data_gen.news import TRAIN_PROMPT

        return [TRAIN_PROMPT] * len(questions)
    raise MetaditError("--oracle needs a bank entry whose metadata names its trigger (hidden topic) or its headline "
                       "(news); this diff has neither")


def base_answer_corpus(
    model: nn.Module,
    tok: Any,
    questions: Sequence[str],
    samples_per_question: int = 2,
    max_new_tokens: int = 64,
    seed: int = 0,
    oracle: Sequence[str] = (),
    batch_size: int = 64,
    cache: Any = None,
    on_progress: Progress | None = None,
) -> list[CorpusRow]:
    """`samples_per_question` answers of the base model (no diff, no adapter; temperature 1) to each question,
    then to each `oracle` message (marked `oracle`). `cache`: a `metadit.text.TextCache` (answers are read from it
    when there and stored in it when not)."""
    if samples_per_question < 1 or max_new_tokens < 1:
        raise MetaditError("samples_per_question and max_new_tokens must be >= 1")
    if not questions:
        raise MetaditError("the corpus needs at least one question")
    from metadit.nn.patch import diff_layers
    from metadit.text import chat_prompt, generate_texts

    messages = [(q, False) for q in questions] + [(m, True) for m in oracle]
    # A message repeated (a news diff's one story prompt) gets fresh samples for each repetition: its cache tags
    # go on counting past the first repetition's.
    seen: dict[str, int] = {}
    flat = []
    for m, is_oracle in messages:
        repeat = seen.get(m, 0)
        seen[m] = repeat + 1
        prompt = chat_prompt(tok, [{"role": "user", "content": m}])
        flat += [(prompt, m, is_oracle, repeat * samples_per_question + s) for s in range(samples_per_question)]
    settings = {"corpus": "crosscoder-base-answers", "max_new_tokens": max_new_tokens, "temperature": 1.0, "seed": seed}
    done = [0]

    def generate(missing: list[str]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            out += generate_texts(model, tok, chunk, max_new_tokens,
                                  diffs=[None] * len(chunk) if diff_layers(model) else None, batch_size=batch_size,
                                  do_sample=True, temperature=1.0, seed=seed + start, adapter=False)
            done[0] += len(chunk)
            if on_progress is not None:
                on_progress(done[0], len(missing))
        return out

    prompts = [p for p, _, _, _ in flat]
    if cache is not None:
        answers = cache.get_or_generate(prompts, settings, generate, tags=[s for _, _, _, s in flat])
    else:
        answers = generate(prompts)
    return [CorpusRow(p, a, is_oracle, m) for (p, m, is_oracle, _), a in zip(flat, answers)]


def token_rows(tok: Any, rows: Sequence[CorpusRow]) -> list[list[int]]:
    """Each row's token ids: the prompt, the answer, the end-of-turn token."""
    from metadit.text import end_of_turn

    eot = tok.convert_tokens_to_ids(end_of_turn(tok))
    return [list(tok(r.prompt, add_special_tokens=False)["input_ids"]) + list(tok(r.answer, add_special_tokens=False)["input_ids"])
            + [eot] for r in rows]


def first_kept_position(rows: Sequence[Sequence[int]]) -> int:
    """The first position used: past the longest prefix every row shares, and never position 0."""
    if not rows:
        raise MetaditError("the corpus has no rows")
    if len(rows) == 1:
        return 1
    shortest = min(len(r) for r in rows)
    first = rows[0]
    n = 0
    while n < shortest - 1 and all(r[n] == first[n] for r in rows):
        n += 1
    return max(n, 1)


# ---------------------------------------------------------------------------------------------- activations
def activation_cache_key(identity: dict[str, str], dtype: str, diff: LoraDiff, layer: int,
                         rows: Sequence[Sequence[int]], start: int, rows_per_shard: int) -> str:
    rows_hash = hashlib.sha256(json.dumps([list(map(int, r)) for r in rows]).encode()).hexdigest()
    blob = json.dumps({"model": identity, "dtype": dtype, "diff": diff_fingerprint(diff), "layer": layer,
                       "rows": rows_hash, "start": start, "rows_per_shard": rows_per_shard}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_shard(path: Path, d_model: int) -> dict[str, torch.Tensor]:
    tensors = read_all_tensors(path)
    names = {"base", "finetuned", "row", "position"}
    if set(tensors) != names:
        raise MetaditError(f"{path}: not an activation shard (tensors {sorted(tensors)}); delete it to recompute")
    n = tensors["row"].shape[0]
    for k in ("base", "finetuned"):
        if tuple(tensors[k].shape) != (n, d_model):
            raise MetaditError(f"{path}: {k} activations have shape {tuple(tensors[k].shape)}, expected ({n}, {d_model}); "
                               "delete it to recompute")
    return tensors


@torch.no_grad()
def collect_paired_activations(
    model: nn.Module,
    diff: LoraDiff,
    rows: Sequence[Sequence[int]],
    layer: int | None = None,
    start: int | None = None,
    cache_dir: str | Path | None = None,
    rows_per_shard: int = 16,
    pad_id: int = 0,
    on_progress: Progress | None = None,
) -> PairedActivations:
    """The residual stream at the output of decoder layer `layer` (default: the middle one) of the base model and
    of the base model + `diff`, at every position from `start` (default `first_kept_position(rows)`) of every
    row. One forward per shard of `rows_per_shard` rows carries the base rows and the diffed rows together. The
    shared DIT adapter, if installed, is off. `model` must be patched (`metadit.nn.patch_model`).

    `cache_dir`: where shards are kept (a subdirectory per cache key); None computes everything in memory.
    """
    from metadit.bank import model_identity
    from metadit.eval.lens import decoder_layers, layer_index, layer_output
    from metadit.nn.patch import adapter_disabled, diff_layers
    from metadit.text import right_pad

    if not diff_layers(model):
        raise MetaditError("paired activations need a patched model (metadit.nn.patch_model)")
    if rows_per_shard < 1:
        raise MetaditError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    layer = layer_index(model, layer)
    start = first_kept_position(rows) if start is None else int(start)
    if any(len(r) <= start for r in rows):
        raise MetaditError(f"every corpus row needs more than {start} tokens (the shared prefix)")
    d_model = int(model.config.hidden_size)
    device = next(model.parameters()).device
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    key = activation_cache_key(model_identity(model), dtype, diff, layer, rows, start, rows_per_shard)
    shard_dir = Path(cache_dir) / key if cache_dir is not None else None
    if shard_dir is not None:
        shard_dir.mkdir(parents=True, exist_ok=True)
        info = {"key": key, "layer": layer, "start": start, "rows": len(rows), "rows_per_shard": rows_per_shard,
                "model": model_identity(model), "dtype": dtype, "diff": diff_fingerprint(diff)}
        (shard_dir / "cache.json").write_text(json.dumps(info, indent=1))
    n_shards = (len(rows) + rows_per_shard - 1) // rows_per_shard
    parts: list[dict[str, torch.Tensor]] = []
    _ = decoder_layers(model)  # a clear error for a model without decoder layers, before any forward
    for s in range(n_shards):
        path = shard_dir / f"shard-{s:05d}.safetensors" if shard_dir is not None else None
        if path is not None and path.is_file():
            parts.append(_read_shard(path, d_model))
        else:
            chunk = list(range(s * rows_per_shard, min((s + 1) * rows_per_shard, len(rows))))
            seqs = [list(rows[i]) for i in chunk]
            ids, mask, _w = right_pad(seqs, [[1.0] * len(q) for q in seqs], pad_id)
            ids2, mask2 = torch.cat([ids, ids]).to(device), torch.cat([mask, mask]).to(device)
            with adapter_disabled(model):
                h = layer_output(model, layer, ids2, mask2, [None] * len(chunk) + [diff] * len(chunk))
            base_h, ft_h = h[: len(chunk)], h[len(chunk) :]
            take = [(j, p) for j, q in enumerate(seqs) for p in range(start, len(q))]
            jj = torch.tensor([j for j, _ in take])
            pp = torch.tensor([p for _, p in take])
            tensors = {"base": base_h[jj, pp].float().cpu(), "finetuned": ft_h[jj, pp].float().cpu(),
                       "row": torch.tensor([chunk[j] for j, _ in take]), "position": pp}
            if path is not None:
                _write_shard(path, tensors)
            parts.append(tensors)
        if on_progress is not None:
            on_progress(s + 1, n_shards)
    x = torch.stack([torch.cat([p["base"] for p in parts]), torch.cat([p["finetuned"] for p in parts])], dim=1)
    return PairedActivations(x, torch.cat([p["row"] for p in parts]), torch.cat([p["position"] for p in parts]), key)
