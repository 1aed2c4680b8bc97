"""Chat prompts: the template text up to the assistant's turn, in the tokenizer's chat format, and its end token."""

from __future__ import annotations

from typing import Any

from metadit.models import CHAT_TEMPLATE_KWARGS, chat_format_of


def chat_prompt(tok: Any, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
    """The chat-template text up to the assistant's turn, optionally with the start of its answer.

    Under the `no_system` chat format a system turn the template adds on its own (one the caller did not
    give) is dropped; a template that adds none is unaffected. Under `no_thinking` the template is rendered with
    `enable_thinking=False` (`metadit.models.CHAT_TEMPLATE_KWARGS`).
    """
    kwargs = CHAT_TEMPLATE_KWARGS.get(chat_format_of(tok), {})
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
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
