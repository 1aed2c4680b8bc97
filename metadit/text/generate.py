"""The one generation loop: batched, left-padded continuations of chat prompts, row i under its own diff."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from metadit.nn import use_diffs
from metadit.text.prompts import end_of_turn


@torch.no_grad()
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
) -> list[str]:
    """Continue each prompt (already chat-formatted); row i uses `diffs[i]` when diffs are given.

    Prompts are left-padded in batches of `batch_size`; generation stops at the end-of-turn token.
    """
    if diffs is not None and len(diffs) != len(prompts):
        raise ValueError("generate_texts: need one diff (or None) per prompt")
    eot = tok.convert_tokens_to_ids(end_of_turn(tok))
    out: list[str] = []
    tok.padding_side = "left"
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        ctx = use_diffs(model, list(diffs[start : start + batch_size])) if diffs is not None else nullcontext()
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eot)
        if do_sample:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with ctx:
            ids = model.generate(**enc, **kwargs)
        new = ids[:, enc["input_ids"].shape[1] :]
        out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return out
