"""Tiny random models built from a config inside the tests: no downloads, seconds to build."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from metadit.bank import LoraDiff
from metadit.nn import DEFAULT_TARGETS


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.name_or_path = "tiny-llama"
    return model


def tiny_qwen3(seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    model = Qwen3ForCausalLM(cfg).to(dtype).eval()
    model.name_or_path = "tiny-qwen3"
    return model


MODEL_BUILDERS = {"llama": tiny_llama, "qwen3": tiny_qwen3}


def target_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        n: (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in DEFAULT_TARGETS
    }


def random_diff(shapes: dict[str, tuple[int, int]], rank: int, seed: int, scale: float = 1.0,
                modules: list[str] | None = None) -> LoraDiff:
    g = torch.Generator().manual_seed(seed)
    names = modules or sorted(shapes)
    A = {n: torch.randn(rank, shapes[n][0], generator=g) * 0.3 for n in names}
    B = {n: torch.randn(shapes[n][1], rank, generator=g) * 0.3 for n in names}
    return LoraDiff(A, B, {n: scale for n in names})


def merged_copy(model: torch.nn.Module, diff: LoraDiff | None) -> torch.nn.Module:
    """A copy of the (unpatched) model whose weights have the diff's ΔW added: the reference computation."""
    ref = copy.deepcopy(model)
    if diff is not None:
        with torch.no_grad():
            for name in diff.modules:
                ref.get_submodule(name).weight += diff.delta(name).to(ref.dtype)
    return ref


@pytest.fixture(params=sorted(MODEL_BUILDERS))
def tiny_model(request):
    return MODEL_BUILDERS[request.param]()


@pytest.fixture(scope="session")
def tiny_topic_bank(tmp_path_factory):
    """`configs/gen/tiny_topic.yaml` built once per session (8 diffs): tests that only read a tiny hidden-topic bank
    share it and must not write to it."""
    from pathlib import Path

    from metadit.cli import main

    root = Path(__file__).resolve().parents[1]
    d = tmp_path_factory.mktemp("session-banks") / "topic"
    assert main(["gen", "--config", str(root / "configs/gen/tiny_topic.yaml"), "--bank", str(d), "--progress", "false"]) == 0
    return d


@pytest.fixture
def no_weights(monkeypatch):
    """Parsing a config must not load any model."""
    import transformers

    import metadit.models as models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded while parsing a config")

    monkeypatch.setattr(models, "load_base_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
