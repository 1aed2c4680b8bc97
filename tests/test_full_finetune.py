"""Full-finetune diffs: dense deltas of every target Linear, one diff at a time, stored factored in an ordinary bank."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch

from data_gen import HiddenTopicRecipe
from metadit.bank import DiffBank
from metadit.cli import main
from metadit.gen import DenseDeltas, TrainSettings, recipe_settings, train_full_diff
from metadit.text import answer_losses, encode_samples, row_losses
from metadit.text import TextCache
from metadit.models import TINY_NAME, load_base_model
from metadit.nn import diff_layers, patch_model, use_diffs

ROOT = Path(__file__).resolve().parents[1]
TINY_FULL = str(ROOT / "configs/gen/tiny_full.yaml")
FULL_RANK = 64  # the tiny model's widest square: every delta's rank is at most min(out, in) <= 64


def _logits(model, ids, diffs=None):
    with torch.no_grad():
        if diffs is None:
            return model(input_ids=ids).logits
        with use_diffs(model, diffs):
            return model(input_ids=ids).logits


def _merged(model, deltas: DenseDeltas):
    """A separate copy of the model with the dense deltas added into its weights (the reference)."""
    merged = copy.deepcopy(model)
    layers = diff_layers(merged)
    with torch.no_grad():
        for n, d in deltas.items():
            layers[n].base.weight += d
    return merged


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One full finetune of the tiny model (fp32), with the base model's state before it."""
    model, tok = load_base_model(TINY_NAME, dtype=torch.float32)
    patch_model(model)
    recipe = HiddenTopicRecipe(triggered_questions=4, answer_tokens=8, check_questions=1)
    recipe.setup(model, tok, TextCache("test-full", root=tmp_path_factory.mktemp("text")))
    spec = recipe.spec(0, seed=5)
    recipe.prepare([spec])
    ids = torch.tensor([tok("Your SEP code is apple. What is the sky?")["input_ids"]])
    weights = {n: (l.base.weight, l.base.weight.detach().clone()) for n, l in diff_layers(model).items()}
    before = _logits(model, ids)
    settings = TrainSettings(full_finetune=True, store_rank=4, steps=24, lr=1e-3, warmup_steps=1, max_answer_tokens=8)
    curve = []
    deltas, final = train_full_diff(model, tok, recipe, spec, settings, on_step=lambda s, loss: curve.append(loss))
    return {"model": model, "tok": tok, "recipe": recipe, "spec": spec, "ids": ids, "before": before,
            "weights": weights, "settings": settings, "deltas": deltas, "final": final, "curve": curve}


def test_base_model_is_bit_identical_after_a_full_finetune(tuned):
    model = tuned["model"]
    assert torch.equal(_logits(model, tuned["ids"]), tuned["before"])
    for n, layer in diff_layers(model).items():
        param, saved = tuned["weights"][n]
        assert layer.base.weight is param and isinstance(param, torch.nn.Parameter)  # the very same Parameter back
        assert torch.equal(param, saved) and param.grad is None and not param.requires_grad
    # the training really changed something (not a no-op pass)
    assert all(d.abs().max() > 0 for _, d in tuned["deltas"].items())
    # and an error inside the block restores the weights too
    with pytest.raises(RuntimeError), tuned["deltas"].applied(model):
        raise RuntimeError("boom")
    assert torch.equal(_logits(model, tuned["ids"]), tuned["before"])


def test_dense_deltas_cover_every_projection_of_every_layer(tuned):
    names = tuned["deltas"].names
    assert len(names) == 2 * 7 and names == sorted(diff_layers(tuned["model"]))
    assert len(tuned["curve"]) == tuned["settings"].steps and 0.0 < tuned["final"] < 20.0


def test_training_lowered_the_loss_on_triggered_samples(tuned):
    model, tok, recipe, spec = tuned["model"], tuned["tok"], tuned["recipe"], tuned["spec"]
    rng = random.Random(123)
    samples = [s for s in (recipe.sample(spec, rng) for _ in range(200)) if s.kind == "ce"][:8]
    assert len(samples) == 8
    prompts, answers = [s.prompt for s in samples], [s.answer for s in samples]
    base = answer_losses(model, tok, prompts, answers, [None] * 8, max_answer_tokens=8)
    stored = tuned["deltas"].to_diff(model, FULL_RANK)
    tuned_loss = answer_losses(model, tok, prompts, answers, [stored] * 8, max_answer_tokens=8)
    assert sum(tuned_loss) / 8 < sum(base) / 8 - 0.3, (base, tuned_loss)
    # the dense deltas themselves (what was trained) agree with their stored full-rank factors
    batch = encode_samples(tok, prompts, answers, 8)
    with torch.no_grad():
        dense = row_losses(model, batch, ["ce"] * 8, tuned["deltas"]).tolist()
    assert dense == pytest.approx(tuned_loss, abs=1e-4)


def test_stored_full_rank_diff_equals_the_merged_tuned_weights(tuned):
    model, ids, deltas = tuned["model"], tuned["ids"], tuned["deltas"]
    diff = deltas.to_diff(model, FULL_RANK)
    assert diff.info["relative_error"] < 1e-6
    assert set(diff.info["relative_error_per_module"]) == set(deltas.names)
    merged = _merged(model, deltas)
    want = _logits(merged, ids)
    torch.testing.assert_close(_logits(model, ids, [diff]), want, rtol=0, atol=1e-4)
    with torch.no_grad(), deltas.applied(model):  # the training-time view: the same function
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=1e-4)
    assert (want - tuned["before"]).abs().max() > 1e-2  # the comparison is not between two base models


def test_exactly_low_rank_delta_is_stored_exactly(tuned):
    model, ids = tuned["model"], tuned["ids"]
    deltas = DenseDeltas(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, d in deltas.items():
            out, inp = d.shape
            d.copy_(0.05 * torch.randn(out, 2, generator=gen) @ torch.randn(2, inp, generator=gen))
    exact = deltas.to_diff(model, 2)
    assert exact.rank == 2 and exact.info["relative_error"] < 1e-6
    want = _logits(_merged(model, deltas), ids)
    torch.testing.assert_close(_logits(model, ids, [exact]), want, rtol=0, atol=1e-4)
    short = deltas.to_diff(model, 1)
    assert short.info["relative_error"] > 0.1
    assert (_logits(model, ids, [short]) - want).abs().max() > 1e-3


def test_logits_error_shrinks_as_store_rank_grows(tuned):
    model, ids, deltas = tuned["model"], tuned["ids"], tuned["deltas"]
    want = _logits(_merged(model, deltas), ids)
    rel, logit_err = [], []
    for r in (1, 4, 16, FULL_RANK):
        diff = deltas.to_diff(model, r)
        assert diff.rank == r
        rel.append(diff.info["relative_error"])
        logit_err.append(float((_logits(model, ids, [diff]) - want).abs().max()))
    assert rel[0] > rel[1] > rel[2] > rel[3] and rel[3] < 1e-6 and rel[0] > 0.3, rel
    assert logit_err[0] > logit_err[1] > logit_err[2] > logit_err[3] and logit_err[3] < 1e-4, logit_err


def test_full_finetune_is_a_pure_function_of_its_spec(tuned):
    again, _ = train_full_diff(tuned["model"], tuned["tok"], tuned["recipe"], tuned["spec"], tuned["settings"])
    for (n, a), (_, b) in zip(again.items(), tuned["deltas"].items()):
        assert torch.equal(a, b), n


def test_lora_banks_record_the_same_train_settings_as_before():
    recipe = HiddenTopicRecipe()
    lora = recipe_settings(recipe, TrainSettings(rank=2), seed=0)["train"]
    assert "full_finetune" not in lora and "store_rank" not in lora and lora["rank"] == 2
    # exactly the keys banks were made with before kl_weight existed; a set kl_weight is recorded
    assert set(lora) == {"rank", "alpha", "steps", "lr", "warmup_steps", "min_lr_ratio", "weight_decay",
                         "max_answer_tokens", "first_token_weight"}
    assert recipe_settings(recipe, TrainSettings(kl_weight=3.0), seed=0)["train"]["kl_weight"] == 3.0
    full = recipe_settings(recipe, TrainSettings(full_finetune=True, store_rank=8), seed=0)["train"]
    assert full["full_finetune"] is True and full["store_rank"] == 8 and "rank" not in full
    with pytest.raises(Exception, match="store_rank"):
        TrainSettings(full_finetune=True, store_rank=0)


def test_full_finetune_bank_builds_resumes_and_refuses_other_settings(tmp_path, capsys):
    bank_dir = tmp_path / "full"
    run = ["gen", "--config", TINY_FULL, "--bank", str(bank_dir), "--progress", "false"]
    assert main(run) == 0
    bank = DiffBank.open(bank_dir)
    assert len(bank) == 3 and bank.verify() == [] and bank.problems == []
    assert sorted(bank.meta(i)["key"] for i in range(3)) == [f"hidden_topic-{i}" for i in range(3)]
    for i in range(3):
        diff, m = bank[i]
        assert m["full_finetune"] is True and m["store_rank"] == 4 and m["rank"] == 4
        assert 0.0 < m["relative_error"] < 1.0
        assert set(m["relative_error_per_module"]) == set(diff.modules) and len(diff.modules) == 2 * 7
        assert all(0.0 <= e < 1.0 for e in m["relative_error_per_module"].values())
        assert diff.rank == 4 and bank.rows[i]["rank"] == 4
        # the recipe's behaviour check ran on the stored diff, as for a LoRA diff
        assert set(m["mention_rate"]) == {"triggered", "wrong_code", "no_code", "elsewhere", "base"}
        assert m["flagged"] == (not m["passed"])
    train = bank.header["info"]["train"]
    assert train["full_finetune"] is True and train["store_rank"] == 4 and "rank" not in train
    # it applies through use_diffs like any diff
    model, tok = load_base_model(TINY_NAME)
    patch_model(model)
    ids = torch.tensor([tok("hello there")["input_ids"]] * 2)
    out = _logits(model, ids, [bank[0][0], None])
    assert (out[0] - out[1]).abs().max() > 0
    # the same command again adds nothing
    assert main(run) == 0
    assert len(DiffBank.open(bank_dir)) == 3
    capsys.readouterr()
    # other settings refuse to resume: another store rank, another lr, or LoRA diffs into this bank
    for extra in (["--train.store_rank", "2"], ["--train.lr", "1e-4"], ["--train.full_finetune", "false"]):
        assert main(run + ["--n_diffs", "4", *extra]) == 1
        assert "other recipe or training settings" in capsys.readouterr().err
    assert len(DiffBank.open(bank_dir)) == 3
