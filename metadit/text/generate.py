"""The one generation loop: batched, left-padded continuations of chat prompts, row i under its own diff.

Every stage that generates goes through `generate_ids` (the bank's text and behaviour check, DIT's answers with
or without the adapter and the encoder's soft tokens, the baselines, the trigger search's answer prefixes, the
activation lens's steered continuations); `generate_texts` is its decoded form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, ContextManager

import torch

from metadit.nn import adapter_disabled, use_diffs
from metadit.text.prompts import end_of_turn

# (input_ids, attention_mask, start, stop) -> the inputs `generate` takes for rows start..stop (e.g. soft tokens
# prepended as `inputs_embeds`); (start, stop) -> a context the rows' generate runs in (e.g. a steering hook).
EmbedFn = Callable[[torch.Tensor, torch.Tensor, int, int], dict[str, torch.Tensor]]
ContextFn = Callable[[int, int], ContextManager]


@torch.no_grad()
def generate_ids(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    diffs: Sequence[Any] | None = None,
    batch_size: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    adapter: bool = True,
    embed: EmbedFn | None = None,
    context: ContextFn | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Continue each chat-formatted prompt; per row `(prompt ids, new ids)` (new ids as generated: the end-of-turn
    token and any padding after it included).

    Args:
        diffs: row i runs under `diffs[i]` (None: no diff); None: the model's rows as they are.
        batch_size: prompts per `generate` call (left-padded).
        do_sample, temperature: sample at `temperature` (top-k/top-p off), else greedy; `seed` fixes the draws.
        adapter: False runs with the shared DIT adapter switched off.
        embed: build the `generate` inputs of a chunk from its token ids (soft tokens); default: the ids.
        context: a context each chunk's `generate` runs in, given the chunk's row range.
    """
    if diffs is not None and len(diffs) != len(prompts):
        raise ValueError("generate: need one diff (or None) per prompt")
    eot = tok.convert_tokens_to_ids(end_of_turn(tok))
    out: list[tuple[list[int], list[int]]] = []
    tok.padding_side = "left"
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        stop = start + len(chunk)
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        inputs = embed(enc["input_ids"], enc["attention_mask"], start, stop) if embed is not None else enc
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eot)
        if do_sample:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with ExitStack() as stack:
            if diffs is not None:
                stack.enter_context(use_diffs(model, list(diffs[start:stop])))
            if not adapter:
                stack.enter_context(adapter_disabled(model))
            if context is not None:
                stack.enter_context(context(start, stop))
            ids = model.generate(**inputs, **kwargs)
        # With `inputs_embeds`, generate returns the new tokens only.
        new = ids if "inputs_embeds" in inputs else ids[:, enc["input_ids"].shape[1] :]
        for row in range(len(chunk)):
            out.append((enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist(), new[row].tolist()))
    return out


def generate_texts(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    diffs: Sequence[Any] | None = None,
    batch_size: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    adapter: bool = True,
    embed: EmbedFn | None = None,
) -> list[str]:
    """`generate_ids`, decoded: each continuation up to its end-of-turn token, stripped."""
    rows = generate_ids(model, tok, prompts, max_new_tokens, diffs=diffs, batch_size=batch_size, do_sample=do_sample,
                        temperature=temperature, seed=seed, adapter=adapter, embed=embed)
    return [t.strip() for t in tok.batch_decode([new for _, new in rows], skip_special_tokens=True)]


def cut_at_end_of_turn(new: list[int], eot: int, keep: bool = False) -> list[int]:
    """New ids up to the first end-of-turn token (with it when `keep`)."""
    return new[: new.index(eot) + int(keep)] if eot in new else new
