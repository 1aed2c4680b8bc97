"""Per-row losses of a batch whose row i runs under its own diff: cross-entropy or KL to the frozen base model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from metadit.nn import use_diffs
from metadit.text.batches import answer_ids, encode_samples, right_pad
from metadit.text.prompts import end_of_turn


def answer_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  predict: torch.Tensor) -> torch.Tensor:
    """Logits only where `predict[:, t]` (the positions whose next token is scored): skips the LM head on the
    prompt, ~10 % of a small model's step."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = model.get_output_embeddings()(hidden[predict])
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def row_losses(model: Any, batch: dict[str, torch.Tensor], kinds: Sequence[str], diffs: Any) -> torch.Tensor:
    """Per-row weighted loss: cross-entropy for "ce" rows, KL(base ‖ diffed) over the vocabulary for "kl" rows.

    `diffs`: anything `use_diffs` takes (row i under diff i), or an object with an `applied(model)` context
    (`metadit.gen.DenseDeltas`: one dense diff, every row).
    The KL teacher is the same model with the diff removed (the frozen base model), computed without
    gradient on the "kl" rows only.
    """
    installed = diffs.applied(model) if hasattr(diffs, "applied") else use_diffs(model, diffs)
    ids, mask, w = batch["input_ids"], batch["attention_mask"], batch["weights"]
    predict = w[:, 1:] > 0  # position t predicts token t+1
    predict = torch.cat([predict, torch.zeros_like(predict[:, :1])], dim=1)
    targets = ids[:, 1:][w[:, 1:] > 0]
    token_w = w[:, 1:][w[:, 1:] > 0]
    rows = predict.nonzero()[:, 0]
    with installed:
        logits = answer_logits(model, ids, mask, predict)
    logp = F.log_softmax(logits, dim=-1)
    per_token = -logp.gather(1, targets[:, None])[:, 0]
    kl_rows = [i for i, k in enumerate(kinds) if k == "kl"]
    device = ids.device  # every index and accumulator on the batch's device (CPU or GPU alike)
    if kl_rows:
        sel = torch.tensor(kl_rows, device=device)
        with torch.no_grad():
            t_logits = answer_logits(model, ids[sel], mask[sel], predict[sel])
        t_logp = F.log_softmax(t_logits, dim=-1)
        is_kl = torch.zeros(len(kinds), dtype=torch.bool, device=device)
        is_kl[sel] = True
        tok_kl = is_kl[rows]
        kl = (t_logp.exp() * (t_logp - logp[tok_kl])).sum(-1)
        per_token = per_token.clone()
        per_token[tok_kl] = kl
    num = torch.zeros(len(kinds), device=device).index_add(0, rows, per_token * token_w)
    den = torch.zeros(len(kinds), device=device).index_add(0, rows, token_w)
    return num / den.clamp_min(1e-8)


@torch.no_grad()
def answer_losses(model: Any, tok: Any, prompts: Sequence[str], answers: Sequence[str], diffs: Sequence[Any],
                  max_answer_tokens: int = 96, batch_size: int = 32) -> list[float]:
    """Mean cross-entropy of each answer given its prompt, row i under `diffs[i]`."""
    out: list[float] = []
    for s in range(0, len(prompts), batch_size):
        batch = encode_samples(tok, prompts[s : s + batch_size], answers[s : s + batch_size], max_answer_tokens)
        n = batch["input_ids"].shape[0]
        out += row_losses(model, batch, ["ce"] * n, list(diffs[s : s + batch_size])).tolist()
    return out


@torch.no_grad()
def prompt_answer_losses(model: Any, tok: Any, prompt: str, answers: Sequence[str], diff: Any,
                         max_answer_tokens: int = 96, batch_size: int = 32) -> list[float]:
    """`answer_losses` of many answers to one prompt under one diff (None: no diff), the prompt run once: every
    batch of answers (grouped by length) reuses its keys and values. Likelihood ranking scores n labels of ~4 tokens
    after the same ~20-token question, so this runs ~1/5 of the tokens."""
    import copy

    eot = tok.convert_tokens_to_ids(end_of_turn(tok))
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], device=device)
    with use_diffs(model, [diff]) as one:  # the diff's factors, stacked once and expanded for every answer batch
        first = model(input_ids=prompt_ids, use_cache=True)
    first_logp = F.log_softmax(first.logits[0, -1].float(), dim=-1)  # predicts every answer's first token
    seqs = [answer_ids(tok, a, max_answer_tokens, eot) for a in answers]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # batches of like lengths: little padding
    out = [0.0] * len(seqs)
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        ids, mask, _ = right_pad([seqs[i] for i in rows], [[1.0] * len(seqs[i]) for i in rows], eot)
        ids, mask, n = ids.to(device), mask.to(device), len(rows)
        cache = copy.deepcopy(first.past_key_values)  # the forward below appends to it
        cache.batch_repeat_interleave(n)
        full_mask = torch.cat([torch.ones(n, prompt_ids.shape[1], dtype=mask.dtype, device=device), mask], dim=1)
        with use_diffs(model, one.repeated(n)):
            logits = model(input_ids=ids, attention_mask=full_mask, past_key_values=cache).logits
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None])[..., 0]
        logp = torch.cat([first_logp[ids[:, 0]][:, None], logp], dim=1) * mask
        for i, loss in zip(rows, (-logp.sum(1) / mask.sum(1)).tolist()):
            out[i] = loss
    return out
