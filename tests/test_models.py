"""The embedded SmolLM2: dequantized once from the wheel's GGUF, cached as safetensors, chat template works."""

from __future__ import annotations

import time

import pytest
import torch

from metadit import load_base_model
from metadit.models import EMBEDDED_NAME, cache_dir


@pytest.mark.slow
def test_embedded_smollm2_loads_from_cache_and_chats(tmp_path, monkeypatch):
    monkeypatch.setenv("METADIT_CACHE", str(tmp_path / "cache"))
    model, tok = load_base_model(EMBEDDED_NAME)
    cached = cache_dir() / "models" / EMBEDDED_NAME
    assert (cached / "model.safetensors").is_file() and cache_dir() == tmp_path / "cache"
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30
    assert not any(p.requires_grad for p in model.parameters())
    t = time.perf_counter()
    again, _ = load_base_model(EMBEDDED_NAME, dtype=torch.float32)
    assert time.perf_counter() - t < 15  # read from the cache, not dequantized again (that takes ~20 s)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    assert tok.decode(enc["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = again.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


def test_missing_model_is_a_clear_error(tmp_path):
    from metadit.errors import MetaditError

    with pytest.raises(MetaditError, match="cannot load base model"):
        load_base_model(str(tmp_path / "no-such-model"))
