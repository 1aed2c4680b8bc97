"""Batched chat generation (K diffs per `generate` call) and an on-disk cache of generated text."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from metadit.models import cache_dir


# How prompts are laid out. `default`: the model's chat template as it is (SmolLM2's adds a ~20-token default
# system prompt to every conversation without one). `no_system`: that default system turn is left out, so
# every row is ~20 tokens shorter in every stage (gen, fit, eval, ask). A bank and an adapter record theirs.
CHAT_FORMATS = ("default", "no_system")
_FORMAT_ATTR = "metadit_chat_format"


def set_chat_format(tok: Any, chat_format: str) -> Any:
    """Make every `chat_prompt` with this tokenizer use `chat_format`; returns the tokenizer."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {', '.join(CHAT_FORMATS)}, got {chat_format!r}")
    setattr(tok, _FORMAT_ATTR, chat_format)
    return tok


def chat_format_of(tok: Any) -> str:
    return getattr(tok, _FORMAT_ATTR, "default")


def chat_prompt(tok: Any, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
    """The chat-template text up to the assistant's turn, optionally with the start of its answer.

    Under the `no_system` chat format a system turn the template adds on its own (one the caller did not
    give) is dropped; a template that adds none is unaffected.
    """
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if chat_format_of(tok) == "no_system" and not any(m["role"] == "system" for m in messages):
        text = _drop_default_system(text)
    return text + assistant_prefix


def _drop_default_system(text: str) -> str:
    """Remove a leading ChatML system turn (`<|im_start|>system ... <|im_end|>` and its newline)."""
    head, end = "<|im_start|>system\n", "<|im_end|>"
    if text.startswith(head) and end in text:
        cut = text.index(end) + len(end)
        return text[cut + 1:] if text[cut : cut + 1] == "\n" else text[cut:]
    return text


def end_of_turn(tok: Any) -> str:
    """The token that ends an assistant turn (`<|im_end|>` for SmolLM2/Qwen; else eos)."""
    # A round trip through the id is O(1); `t in tok.get_vocab()` rebuilt the whole vocabulary dict on every
    # call, and this runs once per training step.
    for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        i = tok.convert_tokens_to_ids(t)
        if i is not None and tok.convert_ids_to_tokens(i) == t:
            return t
    return tok.eos_token


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
    from metadit.nn import use_diffs

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


class TextCache:
    """Generated text keyed by (model fingerprint, prompt, settings), appended to JSON-lines files.

    Each writer (process) appends to its own file so concurrent ranks never interleave lines; all
    files are read on open. A torn last line (a killed process) is skipped.
    """

    def __init__(self, model_key: str, writer: str = "main", root: Path | None = None) -> None:
        self.dir = (root or cache_dir() / "text") / model_key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / f"{writer}.jsonl"
        self.data: dict[str, str] = {}
        for f in sorted(self.dir.glob("*.jsonl")):
            for line in f.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    self.data[row["k"]] = row["v"]
                except (ValueError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(prompt: str, settings: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps([prompt, settings], sort_keys=True).encode()).hexdigest()

    def get_or_generate(
        self, prompts: Sequence[str], settings: dict[str, Any], generate, tags: Sequence[Any] | None = None
    ) -> list[str]:
        """Return cached texts; call `generate(missing_prompts)` once for the rest and store them.

        `tags` (one per prompt) make otherwise equal prompts distinct entries, e.g. the k-th sampled story.
        """
        tags = list(tags) if tags is not None else [None] * len(prompts)
        keys = [self.key(p, {**settings, "tag": t} if t is not None else settings) for p, t in zip(prompts, tags)]
        missing = sorted({(k, p) for k, p in zip(keys, prompts) if k not in self.data})
        if missing:
            texts = generate([p for _, p in missing])
            with open(self.file, "a") as f:
                for (k, _), t in zip(missing, texts):
                    self.data[k] = t
                    f.write(json.dumps({"k": k, "v": t}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return [self.data[k] for k in keys]
