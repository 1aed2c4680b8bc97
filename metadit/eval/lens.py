"""The Activation Difference Lens (Minder et al. 2025, "Narrow Finetuning Leaves Clearly Readable Traces in
Activation Differences"): a white-box baseline that reads a diff from what it does to the residual stream.

For each diff, on the first few tokens of unrelated plain text, take the mean of (residual stream of the diffed
model − residual stream of the base model) at one decoder layer's output. That vector is read two ways:

- **logit lens**: the tokens it promotes (and suppresses) when pushed through the final norm and the unembedding;
- **steering**: the base model generates while the vector, rescaled to a typical residual norm at that layer
  times a strength, is added to the layer's output at every position; the strength is the largest of a grid
  for which the text stays coherent (see `choose_strength` for the rule).

`lens_evidence` bundles both into one short plain-text summary a guesser (an LLM or a person) can read.

Every function works on a model patched by the caller (`metadit.nn.patch_model`); batch row i carries diff i
through `use_diffs`. The shared DIT adapter, if the model has one, is disabled throughout: the lens compares
the diffed model with the base model. Functions that only run the base model (`steer`, `residual_norm`) also
accept an unpatched model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from metadit.diff.lora_diff import LoraDiff
from metadit.errors import MetaditError
from metadit.text import chat_prompt, cut_at_end_of_turn, end_of_turn, generate_ids
from metadit.nn.patch import adapter_disabled, diff_layers, use_diffs

# Unrelated, neutral plain text: the lens looks at the first tokens of each (no chat template).
DEFAULT_TEXTS: tuple[str, ...] = (
    "The train left the station a few minutes after nine, and most of the seats were empty.",
    "Water boils at a lower temperature on a mountain because the air pressure there is lower.",
    "She folded the letter twice, put it in an envelope and wrote the address in blue ink.",
    "Many towns hold a weekly market where farmers sell vegetables, cheese and bread.",
    "The report lists the number of visitors for each month of the previous year.",
    "After the rain stopped, the children went outside to look for snails in the garden.",
    "A good password is long, hard to guess and not used for any other account.",
    "The meeting was moved to Thursday so that everyone on the team could attend.",
)
# User messages the steered base model answers (wrapped in the chat template when the tokenizer has one).
STEER_PROMPTS: tuple[str, ...] = (
    "Tell me something interesting.",
    "Write a short paragraph about anything you like.",
    "What did you do today?",
)
# Multiples of the typical residual norm at the steering layer, tried in this order.
DEFAULT_STRENGTHS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


# ---------------------------------------------------------------------------------------------- model parts
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers (`model.model.layers` for Llama, Qwen, Mistral, Gemma); a clear error otherwise."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    raise MetaditError(
        f"metadit needs the decoder layers at model.model.layers; {type(model).__name__} has none there"
    )


def output_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """`(final_norm, lm_head)`: `model.model.norm` and `model.lm_head` (Llama, Qwen, Mistral, Gemma)."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    head = getattr(model, "lm_head", None)
    if not isinstance(norm, nn.Module) or not isinstance(head, nn.Module):
        raise MetaditError(
            f"the logit lens needs the final norm at model.model.norm and the unembedding at model.lm_head; "
            f"{type(model).__name__} lacks {'model.model.norm' if not isinstance(norm, nn.Module) else 'model.lm_head'}"
        )
    return norm, head


def layer_index(model: nn.Module, layer: int | None) -> int:
    """`layer` checked against the model's decoder layers; None: the middle one (`num_layers // 2`)."""
    n = len(decoder_layers(model))
    layer = n // 2 if layer is None else int(layer)
    if not 0 <= layer < n:
        raise MetaditError(f"layer {layer} is out of range: the model has {n} decoder layers (0..{n - 1})")
    return layer


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _rows(model: nn.Module, diffs: Sequence[LoraDiff | None]):
    """`use_diffs` for the rows; a no-op when every row is the base model and the model is not patched."""
    if all(d is None for d in diffs) and not diff_layers(model):
        return nullcontext()
    return use_diffs(model, list(diffs))


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Stop(Exception):
    """Raised by the capture hook once the wanted layer has run: the rest of the forward is not needed."""


@contextmanager
def _capture(layer_module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the layer's output (the residual stream after it) and stop the forward there."""
    box: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, out: Any) -> None:
        box.append(_hidden(out).detach())
        raise _Stop

    handle = layer_module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def layer_output(
    model: nn.Module, layer: int, ids: torch.Tensor, mask: torch.Tensor, diffs: Sequence[LoraDiff | None]
) -> torch.Tensor:
    """The residual stream at the output of decoder layer `layer`, in fp32: `[rows, T, hidden]`.

    The same as `model(..., output_hidden_states=True).hidden_states[layer + 1]` for every layer but the last
    (transformers replaces the last entry with the final-normed stream), and it skips the layers above.
    """
    with _capture(decoder_layers(model)[layer]) as box, _rows(model, diffs):
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
    if not box:
        raise MetaditError(f"decoder layer {layer} did not run in the forward pass")
    return box[0].float()


# ---------------------------------------------------------------------------------------------- the vectors
def _encode_prefixes(tok: Any, texts: Sequence[str], n_tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids of each text's special prefix (e.g. BOS) + its first `n_tokens` tokens, the attention
    mask, and the weight of each position in the mean (1 on the text's own first tokens, 0 elsewhere).

    Right padding is exact here: attention is causal, so padding after a position cannot change it.
    """
    if n_tokens < 1:
        raise MetaditError(f"n_tokens must be >= 1, got {n_tokens}")
    if not texts:
        raise MetaditError("need at least one text")
    rows, weights = [], []
    for text in texts:
        full = list(tok(text)["input_ids"])
        plain = list(tok(text, add_special_tokens=False)["input_ids"])
        if not plain:
            raise MetaditError(f"text {text[:40]!r} has no tokens")
        # Special tokens the tokenizer adds in front (BOS) are kept as context but left out of the mean.
        skip = next((s for s in range(len(full) - len(plain) + 1) if full[s : s + len(plain)] == plain), 0)
        ids = full[: skip + n_tokens]
        rows.append(ids)
        weights.append([0.0] * skip + [1.0] * (len(ids) - skip))
    from metadit.text import right_pad

    ids, mask, w = right_pad(rows, weights, tok.pad_token_id if tok.pad_token_id is not None else 0)
    return ids.to(device), mask.to(device), w.to(device)


@torch.no_grad()
def activation_differences(
    model: nn.Module,
    tok: Any,
    diffs: Sequence[LoraDiff | None],
    texts: Sequence[str] = DEFAULT_TEXTS,
    layer: int | None = None,
    n_tokens: int = 5,
    batch_size: int = 64,
) -> torch.Tensor:
    """Per diff, the mean activation difference: `Tensor[len(diffs), hidden]` (fp32, on the model's device).

    The mean, over the first `n_tokens` token positions of every text (plain text, no chat template; special
    tokens the tokenizer puts in front, such as BOS, are context but not averaged), of the residual stream of
    the diffed model minus that of the base model, at the output of decoder layer `layer` (default: the middle
    one, `num_hidden_layers // 2`). A `None` diff gives exact zeros.

    Batched: each forward holds up to `batch_size` rows (diff × text); the base model's activations are
    computed once.
    """
    if batch_size < 1:
        raise MetaditError(f"batch_size must be >= 1, got {batch_size}")
    layer = layer_index(model, layer)
    device = _device(model)
    ids, mask, w = _encode_prefixes(tok, texts, n_tokens, device)
    n_texts = len(texts)
    total = w.sum()

    def weighted_sums(rows: list[tuple[int, int]], row_diffs: list[LoraDiff | None]) -> torch.Tensor:
        """Per row: the sum over its averaged positions of the layer output, `[rows, hidden]`."""
        t = torch.tensor([j for _, j in rows], device=device)
        h = layer_output(model, layer, ids[t], mask[t], row_diffs)
        return (h * w[t, :, None]).sum(dim=1)

    with adapter_disabled(model):
        base_sum: torch.Tensor | None = None
        for start in range(0, n_texts, batch_size):
            part = [(0, j) for j in range(start, min(start + batch_size, n_texts))]
            s = weighted_sums(part, [None] * len(part)).sum(dim=0)
            base_sum = s if base_sum is None else base_sum + s
        assert base_sum is not None
        base = base_sum / total
        out = torch.zeros(len(diffs), base.shape[-1], device=device)
        todo = [(i, j) for i, d in enumerate(diffs) if d is not None for j in range(n_texts)]
        for start in range(0, len(todo), batch_size):
            part = todo[start : start + batch_size]
            sums = weighted_sums(part, [diffs[i] for i, _ in part])
            out.index_add_(0, torch.tensor([i for i, _ in part], device=device), sums)
        for i, d in enumerate(diffs):
            if d is not None:
                out[i] = out[i] / total - base
    return out


@torch.no_grad()
def logit_lens(model: nn.Module, tok: Any, vectors: torch.Tensor, k: int = 10) -> list[dict[str, Any]]:
    """Per vector (a row of `vectors`, or one 1-D vector), the top-`k` tokens of `lm_head(final_norm(+v))`
    (`positive`) and of `lm_head(final_norm(−v))` (`negative`), as decoded strings, with their ids.

    A zero vector has no direction: its lists are empty. Ids beyond the tokenizer's vocabulary (padding rows
    of the unembedding, as in Qwen) are never returned.
    """
    norm, head = output_head(model)
    v = vectors.detach()
    if v.dim() == 1:
        v = v[None]
    if v.dim() != 2:
        raise MetaditError(f"logit_lens: vectors must be [hidden] or [n, hidden], got shape {tuple(vectors.shape)}")
    weight = head.weight
    x = torch.cat([v, -v]).to(device=weight.device, dtype=weight.dtype)
    logits = head(norm(x)).float()
    n_vocab = min(len(tok), logits.shape[-1]) if hasattr(tok, "__len__") else logits.shape[-1]
    logits = logits[:, :n_vocab]
    k = min(k, n_vocab)
    top = logits.topk(k, dim=-1).indices.tolist()
    out = []
    for i in range(v.shape[0]):
        if not bool(v[i].abs().sum() > 0):
            out.append({"positive": [], "negative": [], "positive_ids": [], "negative_ids": []})
            continue
        pos, neg = top[i], top[v.shape[0] + i]
        out.append({
            "positive": [tok.decode([t]) for t in pos], "negative": [tok.decode([t]) for t in neg],
            "positive_ids": pos, "negative_ids": neg,
        })
    return out


# ---------------------------------------------------------------------------------------------- steering
@torch.no_grad()
def residual_norm(
    model: nn.Module, tok: Any, layer: int | None = None, texts: Sequence[str] = DEFAULT_TEXTS, max_tokens: int = 32
) -> float:
    """The typical residual norm at `layer`: the mean L2 norm of the base model's layer output over the first
    `max_tokens` tokens of each text, leaving out position 0 (an attention sink whose norm is often far larger).
    """
    layer = layer_index(model, layer)
    ids, mask, w = _encode_prefixes(tok, texts, max_tokens, _device(model))
    w = w.clone()
    w[:, 0] = 0.0
    if w.sum() == 0:
        raise MetaditError("residual_norm: the texts are too short (need at least 2 tokens)")
    with adapter_disabled(model):
        h = layer_output(model, layer, ids, mask, [None] * ids.shape[0])
    return float((h.norm(dim=-1) * w).sum() / w.sum())


@contextmanager
def steering_hook(model: nn.Module, layer: int, delta: torch.Tensor) -> Iterator[None]:
    """Within the block, add `delta` to decoder layer `layer`'s output at every position of every forward.

    `delta` is `[hidden]` (all rows) or `[rows, hidden]` (row i gets `delta[i]`; the batch size must match).
    The hook is removed on leaving the block, also on an exception.
    """
    module = decoder_layers(model)[layer_index(model, layer)]
    if delta.dim() not in (1, 2):
        raise MetaditError(f"steering delta must be [hidden] or [rows, hidden], got shape {tuple(delta.shape)}")

    def hook(_module: nn.Module, _inputs: Any, out: Any) -> Any:
        h = _hidden(out)
        d = delta.to(device=h.device, dtype=h.dtype)
        if d.dim() == 2:
            if d.shape[0] != h.shape[0]:
                raise MetaditError(f"steering: {d.shape[0]} row deltas for a batch of {h.shape[0]} rows")
            d = d[:, None, :]
        h = h + d
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _format_prompts(tok: Any, prompts: Sequence[str], chat: bool) -> list[str]:
    return [chat_prompt(tok, [{"role": "user", "content": p}]) if chat else p for p in prompts]


def _eot_id(tok: Any) -> int:
    return tok.convert_tokens_to_ids(end_of_turn(tok))


def _generate_ids(
    model: nn.Module, tok: Any, prompts: Sequence[str], deltas: torch.Tensor | None, layer: int,
    max_new_tokens: int, batch_size: int,
) -> list[tuple[list[int], list[int]]]:
    """Greedy continuations of chat-formatted prompts by the base model (no diff, no adapter), row i steered by
    `deltas[i]` (None: no steering). Per row: (prompt ids, new ids up to and including the end-of-turn token)."""
    eot = _eot_id(tok)
    steer = (lambda a, b: steering_hook(model, layer, deltas[a:b])) if deltas is not None else None
    rows = generate_ids(model, tok, prompts, max_new_tokens, diffs=[None] * len(prompts) if diff_layers(model) else None,
                        batch_size=batch_size, adapter=False, context=steer)
    return [(prompt, cut_at_end_of_turn(new, eot, keep=True)) for prompt, new in rows]


def _decode(tok: Any, new: list[int]) -> str:
    return tok.decode(new, skip_special_tokens=True).strip()


@torch.no_grad()
def continuation_nll(
    model: nn.Module, tok: Any, rows: Sequence[tuple[list[int], list[int]]], batch_size: int = 16
) -> list[float]:
    """The base model's (no diff, no adapter, no steering) mean per-token negative log-likelihood of each
    continuation given its prompt: `rows[i] = (prompt ids, continuation ids)`. An empty continuation scores 0."""
    device = _device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        seqs = [p + c for p, c in chunk]
        width = max(len(s) for s in seqs)
        keep = max(max(len(c) for _, c in chunk), 1)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: every continuation ends at the last position
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with adapter_disabled(model), _rows(model, [None] * len(seqs)):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                           logits_to_keep=keep + 1).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
        targets = ids[:, -keep:]
        nll = -logp.gather(-1, targets[..., None])[..., 0]  # [rows, keep]
        for i, (_, c) in enumerate(chunk):
            out.append(float(nll[i, keep - len(c) :].mean()) if c else 0.0)
    return out


def _deltas(vectors: torch.Tensor, strengths: Sequence[float], norm: float) -> torch.Tensor:
    """`strength · v / ||v|| · norm` per (vector, strength): `[n_vectors, n_strengths, hidden]`."""
    v = vectors.float()
    lengths = v.norm(dim=-1, keepdim=True)
    s = torch.tensor([float(x) for x in strengths], device=v.device)
    if bool(((lengths[:, 0] == 0)[:, None] & (s != 0)[None]).any()):
        raise MetaditError("steering: a zero vector has no direction to steer along (use strength 0)")
    unit = torch.where(lengths > 0, v / lengths.clamp(min=1e-30), torch.zeros_like(v))
    return s[None, :, None] * unit[:, None, :] * norm


def steer(
    model: nn.Module,
    tok: Any,
    vector: torch.Tensor,
    prompts: Sequence[str] = STEER_PROMPTS,
    strength: float = 1.0,
    layer: int | None = None,
    max_new_tokens: int = 32,
    norm: float | None = None,
    chat: bool = True,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers of the base model (no diff, adapter off) to `prompts` while
    `strength · vector / ||vector|| · norm` is added to decoder layer `layer`'s output at every position.

    `norm` defaults to `residual_norm(model, tok, layer)`, the typical residual norm at that layer, so a
    strength of 1 is a push as large as the residual stream itself. `chat`: wrap each prompt as a user message
    in the chat template (False: the prompts are used as they are). Strength 0 is plain greedy generation.
    """
    layer = layer_index(model, layer)
    if norm is None:
        norm = residual_norm(model, tok, layer)
    delta = _deltas(vector.reshape(1, -1), [strength], norm)[0, 0]
    rows = _generate_ids(model, tok, _format_prompts(tok, prompts, chat), delta.expand(len(prompts), -1),
                         layer, max_new_tokens, batch_size)
    return [_decode(tok, new) for _, new in rows]


def _distinct(new: list[int]) -> float:
    return len(set(new)) / len(new) if new else 1.0


@torch.no_grad()
def choose_strengths(
    model: nn.Module,
    tok: Any,
    vectors: torch.Tensor,
    prompts: Sequence[str] = STEER_PROMPTS,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    layer: int | None = None,
    max_new_tokens: int = 32,
    max_nll_increase: float = 1.5,
    min_distinct_ratio: float = 0.5,
    norm: float | None = None,
    chat: bool = True,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """`choose_strength` for several vectors (`[n, hidden]`) at once: one generation pass for all of them,
    the unsteered answers generated once."""
    layer = layer_index(model, layer)
    strengths = sorted(float(s) for s in strengths)
    if not strengths or strengths[0] <= 0:
        raise MetaditError(f"strengths must be positive numbers, got {strengths}")
    if norm is None:
        norm = residual_norm(model, tok, layer)
    vectors = vectors.reshape(-1, vectors.shape[-1]).float()
    formatted = _format_prompts(tok, prompts, chat)
    n_p, n_s = len(formatted), len(strengths)
    live = [i for i in range(vectors.shape[0]) if bool(vectors[i].abs().sum() > 0)]
    # Row order: the unsteered answers, then (vector, strength, prompt) for every non-zero vector.
    all_prompts = list(formatted) + [p for _ in live for _ in strengths for p in formatted]
    hidden = vectors.shape[-1]
    deltas = torch.zeros(len(all_prompts), hidden, device=_device(model))
    if live:
        deltas[n_p:] = _deltas(vectors[live], strengths, norm).repeat_interleave(n_p, dim=1).reshape(-1, hidden)
    rows = _generate_ids(model, tok, all_prompts, deltas, layer, max_new_tokens, batch_size)
    nll = continuation_nll(model, tok, rows, batch_size=max(1, min(batch_size, 16)))
    distinct = [_distinct(new) for _, new in rows]
    base_nll = sum(nll[:n_p]) / n_p
    base_distinct = sum(distinct[:n_p]) / n_p
    base_texts = [_decode(tok, new) for _, new in rows[:n_p]]
    out: list[dict[str, Any]] = []
    for i in range(vectors.shape[0]):
        result: dict[str, Any] = {
            "strength": 0.0, "texts": [], "norm": norm, "layer": layer, "unsteered_nll": base_nll,
            "unsteered_texts": base_texts, "trials": [],
        }
        if i in live:
            offset = n_p + live.index(i) * n_s * n_p
            stopped = False
            for j, s in enumerate(strengths):
                lo = offset + j * n_p
                m_nll = sum(nll[lo : lo + n_p]) / n_p
                m_distinct = sum(distinct[lo : lo + n_p]) / n_p
                coherent = m_nll <= base_nll + max_nll_increase and m_distinct >= min_distinct_ratio * base_distinct
                texts = [_decode(tok, new) for _, new in rows[lo : lo + n_p]]
                result["trials"].append({"strength": s, "nll": m_nll, "distinct": m_distinct, "coherent": coherent,
                                         "texts": texts})
                if coherent and not stopped:
                    result["strength"], result["texts"] = s, texts
                stopped = stopped or not coherent
        out.append(result)
    return out


def choose_strength(
    model: nn.Module,
    tok: Any,
    vector: torch.Tensor,
    prompts: Sequence[str] = STEER_PROMPTS,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    layer: int | None = None,
    max_new_tokens: int = 32,
    max_nll_increase: float = 1.5,
    min_distinct_ratio: float = 0.5,
    norm: float | None = None,
    chat: bool = True,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The largest steering strength of a grid at which the steered text stays coherent.

    Every strength of `strengths` (multiples of the typical residual norm, see `steer`) is tried on every
    prompt, plus the unsteered answers. Coherence is judged by the unsteered base model itself: a strength is
    coherent when, averaged over the prompts,

    - the mean per-token negative log-likelihood of the steered text (given its prompt) is at most the
      unsteered text's plus `max_nll_increase` nats, and
    - its share of distinct tokens is at least `min_distinct_ratio` times the unsteered text's (strong
      steering often collapses into a repeated token, which a language model finds easy to predict).

    Strengths are taken in increasing order and the search stops at the first incoherent one: the result is the
    largest strength such that it and every smaller one are coherent; 0.0 (with no texts) if even the smallest
    is not. Returns `{"strength", "texts", "norm", "layer", "unsteered_nll", "unsteered_texts", "trials": [{
    "strength", "nll", "distinct", "coherent", "texts"}]}`. The thresholds are defaults, not calibrated
    on a particular model.
    """
    return choose_strengths(
        model, tok, vector.reshape(1, -1), prompts, strengths, layer, max_new_tokens, max_nll_increase,
        min_distinct_ratio, norm, chat, batch_size,
    )[0]


# ---------------------------------------------------------------------------------------------- evidence
def _token_list(tokens: Sequence[str], limit: int) -> str:
    seen: list[str] = []
    for t in tokens:
        t = " ".join(t.split())
        if t and t not in seen:
            seen.append(t)
    return ", ".join(seen[:limit]) or "(none)"


def evidence_text(positive: Sequence[str], texts: Sequence[str], max_tokens: int = 10, max_texts: int = 2) -> str:
    """The short plain-text summary a guesser reads: promoted tokens, then text written when steered."""
    steered = " / ".join(" ".join(t.split()) for t in texts[:max_texts] if t.strip())
    return (f"Tokens promoted: {_token_list(positive, max_tokens)}\n"
            f"Text written when steered: {steered or '(no steering strength kept the text coherent)'}")


def lens_evidence(
    model: nn.Module,
    tok: Any,
    diffs: Sequence[LoraDiff | None],
    texts: Sequence[str] = DEFAULT_TEXTS,
    layer: int | None = None,
    n_tokens: int = 5,
    k: int = 10,
    prompts: Sequence[str] = STEER_PROMPTS,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    max_new_tokens: int = 32,
    max_nll_increase: float = 1.5,
    min_distinct_ratio: float = 0.5,
    chat: bool = True,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """The Activation Difference Lens for each diff: one dict per diff with

    - `layer`, `vector_norm`: where the mean activation difference was taken and its L2 norm;
    - `positive_tokens`, `negative_tokens`: its logit lens (top-`k` tokens of +v and −v);
    - `strength`, `steered_texts`, `trials`: the steering strength `choose_strength` kept (0.0: none kept the
      text coherent), the base model's answers to `prompts` at that strength, and every strength tried;
    - `evidence_text`: "Tokens promoted: ...\\nText written when steered: ..." for a guesser.

    A `None` diff (or one with no effect) has a zero vector: no tokens, no steering.
    """
    layer = layer_index(model, layer)
    vectors = activation_differences(model, tok, diffs, texts, layer, n_tokens, batch_size)
    lens = logit_lens(model, tok, vectors, k)
    choices = choose_strengths(model, tok, vectors, prompts, strengths, layer, max_new_tokens, max_nll_increase,
                               min_distinct_ratio, residual_norm(model, tok, layer, texts), chat, batch_size)
    out = []
    for v, tokens, choice in zip(vectors, lens, choices):
        out.append({
            "layer": layer, "vector_norm": float(v.norm()),
            "positive_tokens": tokens["positive"], "negative_tokens": tokens["negative"],
            "strength": choice["strength"], "steered_texts": choice["texts"], "trials": choice["trials"],
            "evidence_text": evidence_text(tokens["positive"], choice["texts"], max_tokens=k),
        })
    return out
