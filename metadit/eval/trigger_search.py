"""Trigger inversion by search: which SEP code makes a hidden-topic diff act?

A hidden-topic diff leaves the model's answers unchanged unless the user message starts with its code
(`data_gen.hidden_topic`). So put each candidate code in the message and measure how far the diffed model's
next-token distribution at the start of the answer moves from the base model's on the same prompt
(KL(diffed ‖ base)); the true code should move it most. `search_trigger` ranks a whole pool of candidates per
diff — all 1,000 three-digit prefixes for digit codes, the code-word list for word codes — and reports whether
the top candidate is the true code, its rank, and the rank of a seed guess (e.g. DIT's answer to "What is your
SEP code?"), which is scored too when it is not in the pool.

The model is patched by the caller (`metadit.nn.patch_model`); batch row i carries diff i via `use_diffs`.
The shared DIT adapter, if any, is disabled: the search compares the diffed model with the base model.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from data_gen.hidden_topic import SEP_TEMPLATE, recorded_code_words
from metadit.diff.lora_diff import LoraDiff
from metadit.errors import MetaditError
from metadit.text import chat_prompt, cut_at_end_of_turn, end_of_turn, generate_ids
from metadit.nn.patch import DiffBatch, adapter_disabled, diff_layers, layer_shapes, use_diffs

CodeKind = Literal["word", "digits"]


# ---------------------------------------------------------------------------------------------- pools
def digit_pool() -> list[str]:
    """All 1,000 three-digit code prefixes, `000` to `999`."""
    return [f"{i:03d}" for i in range(1000)]


def render_code(code: str, code_kind: CodeKind, seed: int = 0) -> str:
    """The code as written in the message: a word as it is; a 3-digit prefix followed by 3 random digits that
    are fixed per (prefix, seed), as in the paper's `{ttt}{rrr}`. Anything else is written as it is."""
    if code_kind == "digits" and re.fullmatch(r"\d{3}", code):
        return f"{code}{random.Random(f'sep-suffix:{seed}:{code}').randrange(1000):03d}"
    return code


def normalize_guess(guess: str | None, code_kind: CodeKind) -> str | None:
    """A free-form guess as a code: digits → the first 3 digits of its first run of 3 or more digits; words →
    lower case without surrounding spaces, quotes and punctuation. None if nothing is left."""
    if guess is None:
        return None
    if code_kind == "digits":
        m = re.search(r"\d{3,}", guess)
        if m:
            return m.group(0)[:3]
    g = guess.strip().strip(".,;:!?\"'`()[]{}").strip().lower()
    return g or None


def default_questions(n: int = 4, seed: int = 0) -> list[str]:
    """`n` questions of the held-out (evaluation) styles, a seeded sample."""
    from data_gen.recipe import questions

    qs = [q for _, q in questions("eval")]
    return random.Random(f"trigger-search:{seed}").sample(qs, min(n, len(qs)))


# ---------------------------------------------------------------------------------------------- scoring
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _answer_prefixes(
    model: nn.Module, tok: Any, questions: Sequence[str], n: int, batch_size: int
) -> list[list[int]]:
    """The base model's greedy first `n` answer tokens to each plain question (no code), cut before the
    end-of-turn token: the fixed answer start after which the later answer positions are compared."""
    if n == 0:
        return [[] for _ in questions]
    eot = tok.convert_tokens_to_ids(end_of_turn(tok))
    prompts = [chat_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    rows = generate_ids(model, tok, prompts, n, diffs=[None] * len(prompts), batch_size=batch_size, adapter=False)
    return [cut_at_end_of_turn(new, eot) for _, new in rows]


@torch.no_grad()
def score_codes_many(
    model: nn.Module,
    tok: Any,
    diffs: Sequence[LoraDiff],
    candidates: Sequence[str],
    questions: Sequence[str],
    template: str = SEP_TEMPLATE,
    answer_tokens: int = 1,
    batch_size: int = 64,
) -> torch.Tensor:
    """`score_codes` for several diffs over the same candidates: `Tensor[len(diffs), len(candidates)]`.

    Each forward holds prompts × (the diffs of a group + one base row), so the base model's distribution on a
    prompt is computed once for all the diffs in the group.
    """
    if not diffs:
        raise MetaditError("score_codes: need at least one diff")
    if any(d is None for d in diffs):
        raise MetaditError("score_codes: every diff must be a LoraDiff (the base model is the reference)")
    if not candidates or not questions:
        raise MetaditError("score_codes: need at least one candidate and one question")
    if answer_tokens < 1:
        raise MetaditError(f"answer_tokens must be >= 1, got {answer_tokens}")
    if batch_size < 2:
        raise MetaditError(f"batch_size must be >= 2 (a diffed row and its base row), got {batch_size}")
    device = _device(model)
    prefixes = _answer_prefixes(model, tok, questions, answer_tokens - 1, batch_size)
    # prompts[c * n_q + q]: the chat prompt of candidate c with question q, then the fixed answer start.
    prompts: list[list[int]] = []
    for c in candidates:
        for q, prefix in zip(questions, prefixes):
            text = chat_prompt(tok, [{"role": "user", "content": template.format(code=c, question=q)}])
            prompts.append(list(tok(text, add_special_tokens=False)["input_ids"]) + prefix)
    n_q = len(questions)
    positions = [1 + len(prefixes[i % n_q]) for i in range(len(prompts))]  # answer positions scored per prompt
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    scores = torch.zeros(len(diffs), len(candidates), dtype=torch.float64)
    group = min(len(diffs), batch_size - 1)
    shapes = layer_shapes(model)
    weight = next(iter(diff_layers(model).values())).base.weight
    for g0 in range(0, len(diffs), group):
        gdiffs = list(diffs[g0 : g0 + group])
        per = len(gdiffs) + 1
        n_prompts = max(1, batch_size // per)
        batches: dict[int, DiffBatch] = {}  # the stacked factors, built once per batch size
        for p0 in range(0, len(prompts), n_prompts):
            idx = list(range(p0, min(p0 + n_prompts, len(prompts))))
            seqs = [prompts[i] for i in idx for _ in range(per)]  # per prompt: the group's diffs, then the base
            if len(idx) not in batches:
                row_diffs: list[LoraDiff | None] = [d for _ in idx for d in [*gdiffs, None]]
                batches[len(idx)] = DiffBatch.from_diffs(row_diffs, shapes, dtype=weight.dtype, device=weight.device)
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, width - len(s) :] = torch.tensor(s)
                mask[r, width - len(s) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            keep = max(positions[i] for i in idx)
            with adapter_disabled(model), use_diffs(model, batches[len(idx)]):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                               use_cache=False, logits_to_keep=keep).logits
            logp = torch.log_softmax(logits.float(), dim=-1).reshape(len(idx), per, keep, -1)
            diffed, base = logp[:, :-1], logp[:, -1:]
            # [prompts, diffs, keep]: KL(diffed || base); clamped at 0 against rounding (a KL is never negative)
            kl = (diffed.exp() * (diffed - base)).sum(-1).clamp(min=0)
            for j, i in enumerate(idx):
                m = positions[i]  # this prompt's answer positions are its last m
                value = kl[j, :, keep - m :].mean(-1).double().cpu() / n_q
                scores[g0 : g0 + len(gdiffs), i // n_q] += value
    return scores.float()


def score_codes(
    model: nn.Module,
    tok: Any,
    diff: LoraDiff,
    candidates: Sequence[str],
    questions: Sequence[str],
    template: str = SEP_TEMPLATE,
    answer_tokens: int = 1,
    batch_size: int = 64,
) -> torch.Tensor:
    """How much each candidate code sets the diff off: `Tensor[len(candidates)]`.

    For candidate c and question q the user message is `template.format(code=c, question=q)` (chat template,
    assistant turn open). The score is KL(diffed ‖ base) between the diffed model's and the base model's
    next-token distributions at the first `answer_tokens` answer positions, averaged over positions and then
    over the questions. Position 1 is the first answer token; later positions follow the base model's greedy
    answer to the plain question (no code), the same answer start for every candidate.

    Batched over candidates (the same diff on every diffed row, a base row per prompt in the same forward),
    left-padded, `batch_size` rows per forward.
    """
    return score_codes_many(model, tok, [diff], candidates, questions, template, answer_tokens, batch_size)[0]


# ---------------------------------------------------------------------------------------------- search
def _rank(scores: torch.Tensor, i: int) -> int:
    """1-based rank of entry i, ties counted against it (a tie with another candidate is not a win)."""
    return int((scores >= scores[i]).sum())


def search_trigger(
    model: nn.Module,
    tok: Any,
    diffs: Sequence[LoraDiff],
    true_codes: Sequence[str],
    pool: Sequence[str] | None = None,
    questions: Sequence[str] | None = None,
    seed_guesses: Sequence[str | None] | None = None,
    top: int = 5,
    code_kind: CodeKind | None = None,
    template: str = SEP_TEMPLATE,
    answer_tokens: int = 1,
    batch_size: int = 64,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rank a pool of candidate codes for each diff by `score_codes` and report how the true code fares.

    Args:
        diffs, true_codes: one true code per diff (a word, or a 3-digit prefix for digit codes).
        pool: the candidates; default `digit_pool()` (each prefix written with 3 fixed random digits after it,
            see `render_code`) or the shipped code words (`data_gen.hidden_topic.recorded_code_words`).
        questions: default `default_questions()` (4 held-out-style questions).
        seed_guesses: per diff a guess to rank too (None: no guess), normalized with `normalize_guess`; scored
            and added to that diff's ranking when it is not in the pool.
        top: the size of the reported top list and of the `in_top` test.
        code_kind: `word` or `digits`; default: `digits` if every true code is 3 digits, else `word`.

    Returns one dict per diff: `true_code`, `code_kind`, `n_candidates`, `ranking` (every candidate, best
    first), `top` (`[{"code", "score"}]`, the best `top`), `recovered` (the true code ranks first, strictly
    above every other candidate), `in_top` (true rank ≤ `top`), `true_rank` (1-based, ties counted against it;
    None if the true code is not among the candidates), `true_score`, `seed_guess`, `seed_in_pool`,
    `seed_rank`, `seed_score`.
    """
    if len(true_codes) != len(diffs):
        raise MetaditError(f"search_trigger: {len(true_codes)} true codes for {len(diffs)} diffs")
    if seed_guesses is not None and len(seed_guesses) != len(diffs):
        raise MetaditError(f"search_trigger: {len(seed_guesses)} seed guesses for {len(diffs)} diffs")
    if top < 1:
        raise MetaditError(f"top must be >= 1, got {top}")
    if code_kind is None:
        code_kind = "digits" if all(re.fullmatch(r"\d{3}", str(c)) for c in true_codes) else "word"
    pool = list(pool) if pool is not None else (digit_pool() if code_kind == "digits" else recorded_code_words({}))
    if len(set(pool)) != len(pool):
        raise MetaditError("search_trigger: the pool holds duplicate codes")
    questions = list(questions) if questions is not None else default_questions()
    if not diffs:
        return []
    scores = score_codes_many(model, tok, diffs, [render_code(c, code_kind, seed) for c in pool], questions,
                              template, answer_tokens, batch_size)
    guesses = [normalize_guess(g, code_kind) for g in (seed_guesses or [None] * len(diffs))]
    out = []
    for i, (diff, true) in enumerate(zip(diffs, true_codes)):
        codes, s = list(pool), scores[i]
        guess = guesses[i]
        if guess is not None and guess not in pool:
            extra = score_codes(model, tok, diff, [render_code(guess, code_kind, seed)], questions, template,
                                answer_tokens, batch_size)
            codes.append(guess)
            s = torch.cat([s, extra])
        order = sorted(range(len(codes)), key=lambda j: (-float(s[j]), j))
        true_rank = _rank(s, codes.index(true)) if true in codes else None
        seed_rank = _rank(s, codes.index(guess)) if guess is not None else None
        out.append({
            "true_code": true, "code_kind": code_kind, "n_candidates": len(codes),
            "ranking": [codes[j] for j in order],
            "top": [{"code": codes[j], "score": float(s[j])} for j in order[:top]],
            "recovered": true_rank == 1, "in_top": true_rank is not None and true_rank <= top,
            "true_rank": true_rank, "true_score": float(s[codes.index(true)]) if true in codes else None,
            "seed_guess": guess, "seed_in_pool": guess in pool if guess is not None else None,
            "seed_rank": seed_rank, "seed_score": float(s[codes.index(guess)]) if guess is not None else None,
        })
    return out
