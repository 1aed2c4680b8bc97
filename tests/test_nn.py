"""The per-row diff layer against a reference: a merged copy of the model for each row."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metadit.errors import MetaditError
from metadit.nn import (
    DiffLinear, TrainableDiffs, add_adapter, adapter_parameters, diff_layers, get_adapter, layer_shapes,
    patch_model, set_adapter, use_diffs,
)
from tests.conftest import merged_copy, random_diff, target_shapes, tiny_llama


def _batch(n: int = 4, t: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n, t), generator=g)


def test_logits_match_merged_models_row_by_row(tiny_model):
    shapes = target_shapes(tiny_model)
    diffs = [random_diff(shapes, 1, 10), random_diff(shapes, 2, 11, scale=0.5), None, random_diff(shapes, 4, 12, 2.0)]
    refs = [merged_copy(tiny_model, d) for d in diffs]
    ids = _batch(len(diffs))
    patch_model(tiny_model)
    with torch.no_grad(), use_diffs(tiny_model, diffs):
        got = tiny_model(ids).logits
    for i, ref in enumerate(refs):
        with torch.no_grad():
            want = ref(ids[i : i + 1]).logits[0]
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    # Outside the block the model is the base model again, and the diffs changed the logits (else: vacuous).
    with torch.no_grad():
        base = tiny_model(ids).logits
    torch.testing.assert_close(base[2], got[2], rtol=1e-5, atol=1e-5)
    assert (base[0] - got[0]).abs().max() > 1e-2


def test_a_repeated_one_row_batch_is_that_diff_on_every_row(tiny_model):
    from metadit.nn import DiffBatch

    shapes = target_shapes(tiny_model)
    diff = random_diff(shapes, 2, 30)
    ids = _batch(3)
    patch_model(tiny_model)
    one = DiffBatch.from_diffs([diff], layer_shapes(tiny_model))
    with torch.no_grad(), use_diffs(tiny_model, one.repeated(3)):
        got = tiny_model(ids).logits
    with torch.no_grad(), use_diffs(tiny_model, [diff] * 3):
        want = tiny_model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert all(f.A.shape[0] == 3 and f.A.stride(0) == 0 for f in one.repeated(3).factors.values())  # not copied
    with pytest.raises(MetaditError, match="one-row batch"):
        one.repeated(3).repeated(2)


def test_generate_with_left_padding_and_kv_cache(tiny_model):
    shapes = target_shapes(tiny_model)
    diffs = [random_diff(shapes, 1, 20), None, random_diff(shapes, 4, 21)]
    refs = [merged_copy(tiny_model, d) for d in diffs]
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    patch_model(tiny_model)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), use_diffs(tiny_model, diffs):
        out = tiny_model.generate(input_ids=ids, attention_mask=mask, **kw)
    for i, (p, ref) in enumerate(zip(prompts, refs)):
        with torch.no_grad():
            want = ref.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
        assert out[i, width:].tolist() == want[0, len(p):].tolist()


def test_patch_is_idempotent_and_reports_unknown_targets():
    model = tiny_llama()
    names = patch_model(model)
    assert len(names) == 2 * 7
    assert patch_model(model) == names
    assert sum(isinstance(m, DiffLinear) for m in model.modules()) == 14
    with pytest.raises(MetaditError, match=r"match no linear layer.*model\.layers\.\*\.self_attn\.q_proj"):
        patch_model(tiny_llama(), targets=["c_attn"])


def test_only_what_should_train_gets_gradients():
    model = tiny_llama()
    patch_model(model)
    model.requires_grad_(False)
    shapes = layer_shapes(model)
    frozen = [random_diff(shapes, 2, 1), None]
    ad = add_adapter(model, rank=4, seed=0)
    ids = _batch(2)
    with use_diffs(model, frozen):
        model(ids).logits.sum().backward()
    assert all(p.grad is not None for p in ad)
    assert all(p.grad is None for p in model.parameters() if not any(p is q for q in ad))
    assert not any(t.requires_grad for d in frozen if d for t in list(d.A.values()) + list(d.B.values()))

    trainable = TrainableDiffs(shapes, n_diffs=2, rank=1, generator=torch.Generator().manual_seed(0))
    for p in ad:
        p.grad = None
        p.requires_grad_(False)
    with use_diffs(model, trainable):
        model(ids).logits.sum().backward()
    assert all(p.grad is not None for p in trainable.parameters())
    assert all(p.grad is None for p in ad)


def test_trainable_rows_are_independent():
    """Row i's loss gives gradient to diff i only: K diffs per pass train as K separate runs would."""
    model = tiny_llama()
    patch_model(model)
    trainable = TrainableDiffs(layer_shapes(model), n_diffs=3, rank=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in trainable.B:
            b.normal_()  # B = 0 would make A's gradient vanish and the check vacuous
    with use_diffs(model, trainable):
        model(_batch(3))[0][1].sum().backward()
    for a, b in zip(trainable.A, trainable.B):
        assert a.grad[0].abs().max() == 0 and a.grad[2].abs().max() == 0 and a.grad[1].abs().max() > 0
        assert b.grad[0].abs().max() == 0 and b.grad[2].abs().max() == 0 and b.grad[1].abs().max() > 0


def test_adapter_and_diff_compose_like_merged_weights():
    model = tiny_llama()
    shapes = target_shapes(model)
    adapter = random_diff(shapes, 3, 5, scale=0.7)
    diff = random_diff(shapes, 1, 6)
    ref = merged_copy(merged_copy(model, adapter), diff)
    patch_model(model)
    set_adapter(model, adapter)
    ids = _batch(1)
    with torch.no_grad(), use_diffs(model, [diff]):
        got = model(ids).logits
    torch.testing.assert_close(got, ref(ids).logits, rtol=1e-5, atol=1e-5)
    back = get_adapter(model)
    assert back.modules == adapter.modules and all(torch.equal(back.A[n], adapter.A[n]) for n in adapter.modules)


def test_bad_inputs_are_clear_errors():
    model = tiny_llama()
    with pytest.raises(MetaditError, match="not patched"):
        with use_diffs(model, [None]):
            pass
    shapes = target_shapes(model)
    patch_model(model)
    wrong = random_diff({n: (s[0] + 1, s[1]) for n, s in shapes.items()}, 1, 0)
    with pytest.raises(MetaditError, match="do not fit"):
        with use_diffs(model, [wrong]):
            pass
    alien = random_diff({"model.layers.9.self_attn.q_proj": (32, 32)}, 1, 0)
    with pytest.raises(MetaditError, match="lacks"):
        with use_diffs(model, [alien]):
            pass
    with pytest.raises(MetaditError, match="2 rows but use_diffs was given 1"):
        with use_diffs(model, [random_diff(shapes, 1, 0)]):
            model(_batch(2))
