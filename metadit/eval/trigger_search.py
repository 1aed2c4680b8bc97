"""Trigger inversion by search: which SEP code makes a hidden-topic diff act?

A hidden-topic diff leaves the model's answers unchanged unless the user message starts with its code
(`data_gen.hidden_topic`). So put each candidate code in the message and measure how far the diffed model's
next-token distribution at the start of the answer moves from the base model's on the same prompt
(KL(diffed ‖ base)); the true code should move it most. `search_trigger` ranks a whole pool of candidates per
diff — all 1,000 three-digit prefixes for digit codes, the code-word list for word codes — and reports whether
the top candidate is the true code, its rank, and the rank of a seed guess (e.g. DIT's answer to "What is your
SEP code?"), which is scored too when it is not in the pool.

`search_trigger_open` is the open-vocabulary version: it is not told the pool nor the template. Its candidates
are every word token of the tokenizer (`word_tokens`: ~30,000 for SmolLM2), under each of 4 fixed templates
(`OPEN_TEMPLATES`); a first-order (gradient) estimate of the same KL score ranks all candidates at once
(`first_order_scores`), and the best `rerank` of each template are re-scored exactly by `score_codes_many`.

The model is patched by the caller (`metadit.nn.patch_model`); batch row i carries diff i via `use_diffs`.
The shared DIT adapter, if any, is disabled: the search compares the diffed model with the base model.
"""

from __future__ import annotations

import functools
import json
import random
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from data_gen.hidden_topic import SEP_TEMPLATE, recorded_code_words
from metadit.diff.lora_diff import LoraDiff
from metadit.errors import MetaditError
from metadit.eval.lens import decoder_layers
from metadit.eval.rows import gate_verdict, strict_group
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


# ---------------------------------------------------------------------------------------------- open vocabulary
# The 4 templates the open search chooses from, fixed before any diff was looked at: the recipe's own (read from
# `data_gen.hidden_topic`, not copied) and 3 other plausible ways to put a code in a message. In each the code
# follows a space (a word token carries it) and is followed by punctuation, so it stays one token in context.
OPEN_TEMPLATES: dict[str, str] = {
    "sep": SEP_TEMPLATE,
    "access": "My access code is {code}. {question}",
    "password": "Password: {code}. {question}",
    "suffix": "{question} (code: {code})",
}


def word_tokens(tok: Any, min_letters: int = 3) -> list[str]:
    """Every "word" token of the tokenizer, as the word without its space, in vocabulary-id order.

    A word token is a vocabulary entry (not a special token) that decodes to a leading space followed by at
    least `min_letters` letters (`str.isalpha`: any script, either case) and nothing else, and that the
    tokenizer writes back as that one token when it encodes the decoded text (so a message holding the word
    holds that token). 30,589 entries for SmolLM2's tokenizer.
    """
    if min_letters < 1:
        raise MetaditError(f"min_letters must be >= 1, got {min_letters}")
    special = set(getattr(tok, "all_special_ids", []) or [])
    texts = {i: tok.decode([i]) for i in range(len(tok)) if i not in special}
    shaped = [(i, t) for i, t in texts.items() if len(t) > min_letters and t[0] == " " and t[1:].isalpha()]
    if not shaped:
        return []
    encoded = _encode_each(tok, [t for _, t in shaped])
    return [t[1:] for (i, t), ids in zip(shaped, encoded) if ids == [i]]


def _encode_each(tok: Any, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids, in one batched call (a vocabulary's worth of texts: per-text calls take ~10 s; a
    fast tokenizer's backend skips the per-text Python wrapping of `tok(...)` and gives the same ids)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [list(x) for x in tok(list(texts), add_special_tokens=False)["input_ids"]]


def _word_ids(tok: Any, words: Sequence[str]) -> list[int]:
    """The token id of each word as written after a space; a word that is not one such token is an error.
    Remembered for the last few (tokenizer, candidates) pairs: an evaluation searches diff after diff over the
    same ~30,000 words, whose encoding takes seconds."""
    return list(_word_ids_cached(tok, tuple(words)))


@functools.lru_cache(maxsize=4)
def _word_ids_cached(tok: Any, words: tuple[str, ...]) -> tuple[int, ...]:
    ids = []
    for w, got in zip(words, _encode_each(tok, [" " + w for w in words])):
        if len(got) != 1:
            raise MetaditError(f"candidate {w!r}: ' {w}' is {len(got)} tokens, not one (see word_tokens)")
        ids.append(got[0])
    if len(set(ids)) != len(ids):
        raise MetaditError("the candidates hold duplicate words")
    return tuple(ids)


def _check_template(name: str, template: str) -> None:
    if template.count("{code}") != 1 or template.count("{question}") != 1:
        raise MetaditError(f"template {name!r}: needs exactly one {{code}} and one {{question}}, got {template!r}")


def _template_slots(tok: Any, name: str, template: str, questions: Sequence[str], probes: Sequence[tuple[int, str]]
                    ) -> list[tuple[list[int], list[int]]]:
    """Per question, the prompt's token ids before and after the code token: (prefix, suffix).

    Found from the prompts of up to 3 probe candidates, which must agree everywhere but at one position, where
    each holds its own token: a template under which a code is not one token in context is refused.
    """
    _check_template(name, template)
    out = []
    for q in questions:
        seqs = [list(tok(chat_prompt(tok, [{"role": "user", "content": template.format(code=w, question=q)}]),
                         add_special_tokens=False)["input_ids"]) for _, w in probes]
        first = seqs[0]
        if len(probes) > 1:
            differ = [j for j in range(len(first)) if any(j >= len(s) or s[j] != first[j] for s in seqs[1:])]
            at = differ[0] if differ else -1
        else:
            at = first.index(probes[0][0]) if first.count(probes[0][0]) == 1 else -1
        ok = at >= 0 and all(len(s) == len(first) and s[at] == tid and s[:at] == first[:at]
                             and s[at + 1 :] == first[at + 1 :] for s, (tid, _) in zip(seqs, probes))
        if not ok:
            raise MetaditError(f"template {name!r}: a code word is not one token in context (question {q!r})")
        out.append((first[:at], first[at + 1 :]))
    return out


def _probes(ids: Sequence[int], words: Sequence[str]) -> list[tuple[int, str]]:
    picks = sorted({0, len(ids) // 2, len(ids) - 1})
    return [(ids[j], words[j]) for j in picks]


def first_order_scores(
    model: nn.Module,
    tok: Any,
    diff: LoraDiff,
    candidates: Sequence[str],
    questions: Sequence[str],
    templates: Mapping[str, str] | None = None,
    answer_tokens: int = 1,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """A first-order estimate of `score_codes` for every candidate at once: `{template: Tensor[len(candidates)]}`.

    The exact score of candidate c is S(one_hot(c)), where S(x) is `score_codes`' KL(diffed ‖ base) at the
    answer positions, averaged the same way, with the code's token given as a vector x over the vocabulary:
    its input embedding is Eᵀx (E the embedding matrix), so S is differentiable in x. One forward and one
    backward pass (per `batch_size` rows) give ∇S at a point x₀, and for every candidate

        S(one_hot(c)) ≈ S(x₀) + ∇S(x₀) · (one_hot(c) − x₀),   with ∇S = E ∇_e S: one dot product per candidate

    (GCG's linearization, Zou et al. 2023, here maximizing the divergence). x₀ is the centroid of the
    candidates (uniform weights; the slot holds their mean embedding), not a one-hot: the KL is 0 where the
    diff is inert, and a gated diff is inert at almost every word, so at a one-hot it sits at its minimum and
    its gradient vanishes — no signal at all. The centroid holds the trigger's embedding with weight 1/N; if
    the other words leave the gate shut, the centroid's departure from "shut" points toward the trigger, the
    KL's gradient there points the same way, and its dot products rank the trigger high. The estimate is first
    order only (a nonlinear gate can hide the trigger from it), hence `search_trigger_open`'s exact re-rank.
    The mean of the estimates over the candidates is S(x₀) itself (the correction terms sum to zero there).

    Each template's slot is found as in `_template_slots`; the answer positions and their prefixes are those
    of `score_codes` (the base model's greedy answer start to the plain question).
    """
    templates = dict(OPEN_TEMPLATES if templates is None else templates)
    if diff is None:
        raise MetaditError("first_order_scores: need a LoraDiff (the base model is the reference)")
    if not candidates or not questions or not templates:
        raise MetaditError("first_order_scores: need at least one candidate, one question and one template")
    if answer_tokens < 1:
        raise MetaditError(f"answer_tokens must be >= 1, got {answer_tokens}")
    if batch_size < 2:
        raise MetaditError(f"batch_size must be >= 2 (a diffed row and its base row), got {batch_size}")
    return _first_order(model, tok, diff, candidates, _word_ids(tok, candidates), questions, templates,
                        answer_tokens, batch_size)


def _first_order(model: nn.Module, tok: Any, diff: LoraDiff, candidates: Sequence[str], ids: Sequence[int],
                 questions: Sequence[str], templates: Mapping[str, str], answer_tokens: int, batch_size: int
                 ) -> dict[str, torch.Tensor]:
    probes = _probes(ids, candidates)
    slots = {name: _template_slots(tok, name, t, questions, probes) for name, t in templates.items()}
    device = _device(model)
    answer = _answer_prefixes(model, tok, questions, answer_tokens - 1, batch_size)
    E = model.get_input_embeddings().weight.detach()
    cand = E[torch.tensor(ids, device=E.device)].float()  # [N, d]
    names = list(templates)
    # One slot embedding per template, shared by its questions' prompts, diffed and base rows alike: the leaves
    # the gradient is taken with respect to (fp32, cast to the model's dtype inside the graph).
    leaves = [cand.mean(0).clone().requires_grad_(True) for _ in names]
    # prompts: (template index, ids with a placeholder at the slot, slot index, answer positions scored)
    prompts = [(ti, pre + [ids[0]] + suf + answer[qi], len(pre), 1 + len(answer[qi]))
               for ti, name in enumerate(names) for qi, (pre, suf) in enumerate(slots[name])]
    n_q = len(questions)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    shapes = layer_shapes(model)
    weight = next(iter(diff_layers(model).values())).base.weight
    value = torch.zeros(len(names), dtype=torch.float64)
    grads = [torch.zeros_like(leaf) for leaf in leaves]
    per_forward = max(1, batch_size // 2)
    with torch.enable_grad(), adapter_disabled(model):
        for p0 in range(0, len(prompts), per_forward):
            chunk = prompts[p0 : p0 + per_forward]
            rows = DiffBatch.from_diffs([d for _ in chunk for d in (diff, None)], shapes, dtype=weight.dtype,
                                        device=weight.device)
            width = max(len(p[1]) for p in chunk)
            ids_t = torch.full((2 * len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros(2 * len(chunk), width, dtype=torch.long)
            slot = torch.zeros(2 * len(chunk), width, dtype=torch.bool)
            for j, (_, seq, at, _) in enumerate(chunk):
                for r in (2 * j, 2 * j + 1):
                    ids_t[r, width - len(seq) :] = torch.tensor(seq)
                    mask[r, width - len(seq) :] = 1
                    slot[r, width - len(seq) + at] = True
            ids_t, mask, slot = ids_t.to(device), mask.to(device), slot.to(device)
            row_slot = torch.stack([leaves[p[0]] for p in chunk for _ in (0, 1)]).to(E.dtype)  # [rows, d]
            embeds = torch.where(slot[..., None], row_slot[:, None, :], E[ids_t])
            keep = max(p[3] for p in chunk)
            with use_diffs(model, rows):
                logits = model(inputs_embeds=embeds, attention_mask=mask,
                               position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                               logits_to_keep=keep).logits
            logp = torch.log_softmax(logits.float(), dim=-1).reshape(len(chunk), 2, keep, -1)
            diffed, base = logp[:, 0], logp[:, 1]
            kl = (diffed.exp() * (diffed - base)).sum(-1)  # [prompts, keep]; no clamp: it would cut the gradient
            per_template = [torch.zeros((), device=kl.device) for _ in names]
            for j, (ti, _, _, m) in enumerate(chunk):
                per_template[ti] = per_template[ti] + kl[j, keep - m :].mean() / n_q
            used = sorted({p[0] for p in chunk})
            total = sum(per_template[ti] for ti in used)
            got = torch.autograd.grad(total, [leaves[ti] for ti in used])
            for ti, g in zip(used, got):
                grads[ti] += g
                value[ti] += float(per_template[ti].detach())
    out = {}
    for ti, name in enumerate(names):
        g = cand @ grads[ti]  # ∇_x S at the candidates' coordinates: [N]
        out[name] = (value[ti] + (g - g.mean()).double()).float().cpu()
    return out


# The modules a token's own embedding reaches through a norm: (module suffix, the decoder layer's norm before it).
RESIDUAL_READERS: dict[str, str] = {"q_proj": "input_layernorm", "k_proj": "input_layernorm",
                                    "v_proj": "input_layernorm", "gate_proj": "post_attention_layernorm",
                                    "up_proj": "post_attention_layernorm"}
PRERANKS = ("gradient", "projection")


def projection_scores(model: nn.Module, diff: LoraDiff, ids: Sequence[int], chunk: int = 8192) -> torch.Tensor:
    """A context-free score of every candidate token: how much the diff changes the modules that read the residual
    stream when that stream holds the token's own embedding. `Tensor[len(ids)]`.

    For each diffed module m that reads the residual stream through its layer's norm (`RESIDUAL_READERS`: q, k, v
    through `input_layernorm`, gate and up through `post_attention_layernorm`), with x_c = norm_m(E[c]) the
    normed input embedding of candidate c, the score adds ‖ΔW_m x_c‖ = scale_m · ‖B_m (A_m x_c)‖: the size of the
    diff's output change on m for that input. A trigger-gated LoRA has to tell its code token from every other
    word, and the token's identity stays in the residual stream at its position, so the directions A_m read tend
    to align with the code's embedding (on two gated SmolLM2 diffs the code ranks 1st and 5th of 30,589 this way,
    `reports/trigger-inversion/`). No forward pass: one matmul per module; the same for every template.
    """
    E = model.get_input_embeddings().weight.detach()
    x0 = E[torch.tensor(list(ids), device=E.device)].float()
    layers = decoder_layers(model)
    total = torch.zeros(len(ids), dtype=torch.float64)
    used = 0
    for name in diff.modules:
        suffix = name.rsplit(".", 1)[-1]
        if suffix not in RESIDUAL_READERS or ".layers." not in name:
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        norm = getattr(layers[layer], RESIDUAL_READERS[suffix], None)
        if norm is None:
            continue
        A, B = diff.A[name].float().to(E.device), diff.B[name].float().to(E.device)
        gram = B.T @ B  # ‖B y‖² = yᵀ (BᵀB) y: no [N, out] product
        with torch.no_grad():
            for c0 in range(0, len(ids), chunk):
                y = norm(x0[c0 : c0 + chunk].to(norm.weight.dtype)).float() @ A.T  # [n, r]
                total[c0 : c0 + chunk] += (float(diff.scale[name]) * ((y @ gram) * y).sum(-1).clamp(min=0).sqrt()
                                           ).double().cpu()
        used += 1
    if not used:
        raise MetaditError("projection_scores: the diff touches no module that reads the residual stream "
                           f"({', '.join(RESIDUAL_READERS)} of a decoder layer with those norms)")
    return total.float()


def search_trigger_open(
    model: nn.Module,
    tok: Any,
    diffs: Sequence[LoraDiff],
    true_codes: Sequence[str],
    questions: Sequence[str] | None = None,
    candidates: Sequence[str] | None = None,
    templates: Mapping[str, str] | None = None,
    rerank: int = 256,
    top: int = 10,
    answer_tokens: int = 1,
    batch_size: int = 64,
    prerank: str = "gradient",
) -> list[dict[str, Any]]:
    """Open-vocabulary trigger inversion: find a diff's code word without being told the pool or the template.

    Per diff and per template (`OPEN_TEMPLATES` by default): rank every candidate by the pre-ranking `prerank`
    — `gradient`: `first_order_scores` (one gradient step, per template); `projection`: `projection_scores`
    (the diff's effect on the modules reading the token's own embedding; the same for every template) — then
    re-score that template's best `rerank` by the exact `score_codes`; the ranking is those `rerank` by exact
    score, then the rest by the pre-ranking's score. The template picked is the one whose
    best exact score is highest (ties: the first in `templates`' order); the diff's ranking is that template's.
    So the top candidate is the best (template, word) pair any exact score saw. Cost per diff: one forward and
    backward over templates x questions x 2 rows, then templates x `rerank` x questions x 2 rows forward.

    Args:
        diffs, true_codes: one true code word per diff (it need not be a candidate: then its rank is None).
        questions: default `default_questions()`; every stage and template uses the same ones.
        candidates: default `word_tokens(tok)`: every word token of the vocabulary.
        rerank: candidates per template re-scored exactly (at most the number of candidates).
        top: the size of the reported top list and of the `in_top` test (at most `rerank`).

    Returns one dict per diff: `true_code`, `n_candidates`, `template` (picked), `template_scores` (each
    template's best exact score), `ranking` (the best `top` words), `top` (`[{"code", "score"}]`, exact scores),
    `true_rank` (1-based under the picked template, ties counted against it; None if not a candidate),
    `recovered` (rank 1), `in_top` (rank ≤ `top`), `true_score` (its exact score, None if not re-scored),
    `gradient_rank` (its pre-ranking rank under the picked template, whichever `prerank`), `prerank`,
    `rank_by_template` and
    `gradient_rank_by_template` (the same under each template: e.g. the rank a search told the template would
    give), `seconds` (both stages for this diff).
    """
    if len(true_codes) != len(diffs):
        raise MetaditError(f"search_trigger_open: {len(true_codes)} true codes for {len(diffs)} diffs")
    if any(d is None for d in diffs):
        raise MetaditError("search_trigger_open: every diff must be a LoraDiff (the base model is the reference)")
    if rerank < 1 or top < 1:
        raise MetaditError(f"rerank and top must be >= 1, got rerank={rerank}, top={top}")
    if answer_tokens < 1:
        raise MetaditError(f"answer_tokens must be >= 1, got {answer_tokens}")
    if batch_size < 2:
        raise MetaditError(f"batch_size must be >= 2 (a diffed row and its base row), got {batch_size}")
    if prerank not in PRERANKS:
        raise MetaditError(f"prerank must be one of {', '.join(PRERANKS)}, got {prerank!r}")
    templates = dict(OPEN_TEMPLATES if templates is None else templates)
    if not templates:
        raise MetaditError("search_trigger_open: need at least one template")
    for name, t in templates.items():
        _check_template(name, t)
    words = list(candidates) if candidates is not None else word_tokens(tok)
    if not words:
        raise MetaditError("search_trigger_open: no candidates (the tokenizer has no word tokens)")
    ids = _word_ids(tok, words)  # every candidate is one token after a space, and none repeats
    rerank = min(rerank, len(words))
    if top > rerank:
        raise MetaditError(f"top={top} exceeds rerank={rerank}: the top list must be exactly scored")
    questions = list(questions) if questions is not None else default_questions()
    if not questions:
        raise MetaditError("search_trigger_open: need at least one question")
    index = {w: j for j, w in enumerate(words)}
    out = []
    for diff, true in zip(diffs, true_codes):
        t0 = time.perf_counter()
        if prerank == "gradient":
            first = _first_order(model, tok, diff, words, ids, questions, templates, answer_tokens, batch_size)
        else:
            shared = projection_scores(model, diff, ids)
            first = {name: shared for name in templates}
        per: dict[str, dict[str, Any]] = {}
        for name, template in templates.items():
            fo = first[name]
            by_first = torch.sort(fo, descending=True, stable=True).indices.tolist()  # ties: vocabulary order
            head = by_first[:rerank]
            exact = score_codes_many(model, tok, [diff], [words[j] for j in head], questions, template,
                                     answer_tokens, batch_size)[0]
            order = sorted(range(len(head)), key=lambda k: (-float(exact[k]), k))
            ranking = [head[k] for k in order] + by_first[rerank:]
            per[name] = {"fo": fo, "head": head, "exact": exact, "ranking": ranking, "best": float(exact.max())}
        picked = max(templates, key=lambda n: (per[n]["best"], -list(templates).index(n)))

        def rank_of(name: str, j: int) -> int:
            p = per[name]
            if j in p["head"]:
                k = p["head"].index(j)
                return int((p["exact"] >= p["exact"][k]).sum())
            rest = torch.tensor(p["ranking"][len(p["head"]) :], dtype=torch.long)
            return len(p["head"]) + int((p["fo"][rest] >= p["fo"][j]).sum())

        def gradient_rank(name: str, j: int) -> int:
            return int((per[name]["fo"] >= per[name]["fo"][j]).sum())

        p = per[picked]
        j_true = index.get(true)
        head_pos = {j: k for k, j in enumerate(p["head"])}
        out.append({
            "true_code": true, "n_candidates": len(words), "template": picked,
            "template_scores": {n: per[n]["best"] for n in templates},
            "ranking": [words[j] for j in p["ranking"][:top]],
            "top": [{"code": words[j], "score": float(p["exact"][head_pos[j]])} for j in p["ranking"][:top]],
            "true_rank": rank_of(picked, j_true) if j_true is not None else None,
            "true_score": float(p["exact"][head_pos[j_true]]) if j_true in head_pos else None,
            "gradient_rank": gradient_rank(picked, j_true) if j_true is not None else None,
            "rank_by_template": {n: rank_of(n, j_true) if j_true is not None else None for n in templates},
            "gradient_rank_by_template": {n: gradient_rank(n, j_true) if j_true is not None else None
                                          for n in templates},
            "prerank": prerank, "seconds": round(time.perf_counter() - t0, 3),
        })
        out[-1]["recovered"] = out[-1]["true_rank"] == 1
        out[-1]["in_top"] = out[-1]["true_rank"] is not None and out[-1]["true_rank"] <= top
    return out


def summarize_search(per_diff: Sequence[Mapping[str, Any]], top: int = 10) -> dict[str, Any]:
    """The table a report prints, recomputed from per-diff rows (either mode): n, the share whose true code
    ranks first (`top1`) and within `top` (`top{top}`), the median true rank and the mean seconds per diff
    (rows without `seconds` are left out of that mean)."""
    # A true code that is no candidate (rank None) counts as a miss in the shares and is left out of the median.
    known = [int(r["true_rank"]) for r in per_diff if r.get("true_rank") is not None]
    secs = [float(r["seconds"]) for r in per_diff if r.get("seconds") is not None]
    n = len(per_diff)
    return {"n": n,
            "top1": sum(x == 1 for x in known) / n if n else None,
            f"top{top}": sum(x <= top for x in known) / n if n else None,
            "median_true_rank": float(statistics.median(known)) if known else None,
            "seconds_per_diff": sum(secs) / len(secs) if secs else None}


# ---------------------------------------------------------------------------------------------- rows and tables
# Fields of an open search's result that its per-diff rows keep beside the common ones.
_OPEN_ROW_FIELDS = ("gradient_rank", "rank_by_template", "gradient_rank_by_template", "template_scores", "prerank")


def search_rows(per_diff: Sequence[Mapping[str, Any]], items: Mapping[str, Any], vocab: str) -> list[dict[str, Any]]:
    """The per-diff rows of a search, one schema for both modes: `diff`, `bank`, `index`, `vocab`, `true_code`,
    `template` (picked; `sep` for the pool search, which is told it), `true_rank`, `recovered`, `top10`,
    `n_candidates`, `seconds`, `gated`, `gate_held`, `passed` (the strict verdict), plus the open search's diagnostics (`gradient_rank`, ...).

    `per_diff` are a search's results with the diff's id added (`diff`); `items` maps that id to its
    `metadit.eval.heldout.HeldOut` (bank, index and gate verdicts).
    """
    out = []
    for d in per_diff:
        h = items[d["diff"]]
        ranking = d.get("ranking") or []
        out.append({"diff": d["diff"], "bank": h.bank, "index": h.index, "vocab": vocab, "true_code": d["true_code"],
                    "template": d.get("template", "sep"), "true_rank": d["true_rank"], "recovered": d["recovered"],
                    "top10": list(ranking[:10]), "n_candidates": d["n_candidates"], "seconds": d.get("seconds"),
                    "gated": h.gated, **gate_verdict(h.meta),
                    **{k: d[k] for k in _OPEN_ROW_FIELDS if k in d}})
    return out


def write_search_rows(path: str | Path, per_diff: Sequence[Mapping[str, Any]], items: Mapping[str, Any],
                      vocab: str) -> Path:
    """`search_rows` as JSON lines at `path` (replaced): what a report recomputes the table from."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in search_rows(per_diff, items, vocab)))
    return path


def open_search_section(per_diff: Sequence[Mapping[str, Any]], items: Mapping[str, Any], n_candidates: int,
                        rerank: int) -> dict[str, Any]:
    """The evaluation's `trigger_search` section for an open search: the table over all searched diffs and
    over the strictly gated ones (the bank's strict check passed), how often the recipe's own template was picked, the cost."""
    table = summarize_search(per_diff)
    strict = [d for d in per_diff if strict_group(gate_verdict(items[d["diff"]].meta)) == "strict_gated"]
    picked_sep = [float(d["template"] == "sep") for d in per_diff]
    return {"vocab": "open", "n": len(per_diff), "candidates": n_candidates, "templates": list(OPEN_TEMPLATES),
            "rerank": min(rerank, n_candidates), "recovered_top1": table["top1"], "recovered_top10": table["top10"],
            "median_true_rank": table["median_true_rank"], "seconds_per_diff": table["seconds_per_diff"],
            "picked_sep_template": sum(picked_sep) / len(picked_sep) if picked_sep else None,
            "strict_gated": summarize_search(strict), "per_diff": list(per_diff),
            "note": "open vocabulary: the search is told neither the code pool nor the template"}
