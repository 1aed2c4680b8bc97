"""Text: chat prompts, the one generation loop, training batches and losses, the text cache, topic matching."""

from metadit.text.batches import encode_samples, right_pad
from metadit.text.cache import TextCache
from metadit.text.generate import generate_texts
from metadit.text.losses import answer_logits, answer_losses, row_losses
from metadit.text.match import content_words, names_topic
from metadit.text.prompts import chat_prompt, end_of_turn

__all__ = ["TextCache", "answer_logits", "answer_losses", "chat_prompt", "content_words", "encode_samples",
           "end_of_turn", "generate_texts", "names_topic", "right_pad", "row_losses"]
