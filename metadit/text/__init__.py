"""Text: chat prompts, the one generation loop, training batches and losses, the text cache, topic matching."""

from metadit.text.batches import encode_samples, right_pad
from metadit.text.cache import TextCache, text_cache_key
from metadit.text.generate import cut_at_end_of_turn, generate_ids, generate_texts
from metadit.text.losses import answer_logits, answer_losses, prompt_answer_losses, row_losses
from metadit.text.match import content_words, exact_match, names_topic, normalize
from metadit.text.prompts import chat_prompt, end_of_turn

__all__ = ["TextCache", "text_cache_key", "answer_logits", "answer_losses", "prompt_answer_losses", "chat_prompt", "content_words", "encode_samples",
           "cut_at_end_of_turn", "end_of_turn", "exact_match", "generate_ids", "generate_texts", "names_topic", "normalize", "right_pad", "row_losses"]
