"""Training batches: prompt + answer token rows, right-padded, with per-token loss weights on the answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from metadit.text.prompts import end_of_turn


def answer_ids(tok: Any, answer: str, max_answer_tokens: int, eot: int) -> list[int]:
    """An answer's scored tokens: its first `max_answer_tokens`, then the end-of-turn token (trained and scored too)."""
    return tok(answer, add_special_tokens=False)["input_ids"][:max_answer_tokens] + [eot]


def encode_samples(tok: Any, prompts: Sequence[str], answers: Sequence[str], max_answer_tokens: int,
                   first_token_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and per-token loss `weights` (answer tokens only).

    Each answer is cut to `max_answer_tokens` and ends with the end-of-turn token, which is trained too.
    """
    eot = tok.convert_tokens_to_ids(end_of_turn(tok))
    seqs, weights = [], []
    for p, a in zip(prompts, answers):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        a_ids = answer_ids(tok, a, max_answer_tokens, eot)
        seqs.append(p_ids + a_ids)
        w = [0.0] * len(p_ids) + [1.0] * len(a_ids)
        w[len(p_ids)] = first_token_weight
        weights.append(w)
    ids, mask, wt = right_pad(seqs, weights, tok.pad_token_id if tok.pad_token_id is not None else eot)
    return {"input_ids": ids, "attention_mask": mask, "weights": wt}


def right_pad(seqs: Sequence[Sequence[int]], weights: Sequence[Sequence[float]],
              pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows right-padded with `pad` into `ids`, their attention `mask`, and per-token `weights` (0 on padding)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    wt = torch.zeros(len(seqs), width)
    for i, (s, w) in enumerate(zip(seqs, weights)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        wt[i, : len(w)] = torch.tensor(w)
    return ids, mask, wt
