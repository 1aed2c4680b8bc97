"""Crosscoder model diffing against hand computations: BatchTopK, the losses, Latent Scaling's β, the
classification of hand-built and planted latents, the paired-activation cache, and `metadit diff crosscoder`."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from metadit.errors import MetaditError
from metadit.eval.crosscoder import (
    Crosscoder, TrainSettings, analyse, batch_top_k, classify, relative_norm_difference, train_crosscoder,
)
from metadit.eval.crosscoder import evidence
from metadit.eval.crosscoder.activations import collect_paired_activations, first_kept_position
from metadit.eval.crosscoder.model import BASE, FINETUNED
from metadit.nn import patch_model
from tests.conftest import merged_copy, random_diff, target_shapes, tiny_llama

torch.set_num_threads(1)


def _randomized(model: Crosscoder, seed: int) -> Crosscoder:
    """The crosscoder with every parameter drawn at random (biases too), so no term of a formula is zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


# ---------------------------------------------------------------------------------------------- BatchTopK
def test_batch_top_k_keeps_exactly_k_times_batch_over_the_batch_not_per_token():
    model = _randomized(Crosscoder(8, 64, "batchtopk", k=3), seed=0)
    x = torch.randn(10, 2, 8, generator=torch.Generator().manual_seed(1))
    x[0] *= 20  # one loud token: batch-level selection gives it more than k latents, the others fewer
    with torch.no_grad():
        codes, pre = model.encode(x)
        scores = torch.relu(pre) * model.decoder_norms().sum(dim=0)
    assert int((codes != 0).sum()) == 3 * 10
    per_token = (codes != 0).sum(dim=-1)
    assert int(per_token[0]) > 3 and int(per_token.min()) < 3
    # the kept entries are the 30 largest of relu(pre) · (‖d_base‖ + ‖d_ft‖), and keep their unweighted values
    kept = codes != 0
    assert float(scores[kept].min()) >= float(scores[~kept].max())
    torch.testing.assert_close(codes[kept], torch.relu(pre)[kept])
    mask = batch_top_k(torch.arange(12.0).view(3, 4), k=2)
    assert mask.tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]]


def test_batch_top_k_applies_at_inference_too():
    model = _randomized(Crosscoder(8, 64, "batchtopk", k=3), seed=0).eval()
    x = torch.randn(40, 2, 8, generator=torch.Generator().manual_seed(2))
    stats = analyse(model, x, batch_size=10)
    assert stats.l0 == pytest.approx(3.0)  # 4 batches of 10 tokens, 30 codes each


def test_bad_crosscoder_settings_are_one_line_errors():
    for kwargs, message in (({"k": 0}, "k must be between"), ({"k": 65}, "k must be between"),
                            ({"sparsity": "relu"}, "unknown crosscoder sparsity"), ({"l1_coefficient": -1.0}, ">= 0")):
        with pytest.raises(MetaditError, match=message):
            Crosscoder(8, 64, **{"sparsity": "batchtopk", **kwargs})
    with pytest.raises(MetaditError, match=r"input must be \[batch, 2, 8\]"):
        Crosscoder(8, 64).encode(torch.zeros(3, 8))


# ---------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("sparsity", ["batchtopk", "l1"])
def test_loss_equals_a_hand_computation(sparsity):
    model = _randomized(Crosscoder(5, 12, sparsity, k=2, l1_coefficient=0.7), seed=3)
    x = torch.randn(6, 2, 5, generator=torch.Generator().manual_seed(4))
    out = model(x)
    loss, parts = model.loss(x, out)
    W_enc, W_dec = model.W_enc.detach().double(), model.W_dec.detach().double()
    b_enc, b_dec = model.b_enc.detach().double(), model.b_dec.detach().double()
    xd = x.double()
    # encoder by hand: one pre-activation per latent reads both models
    pre = torch.stack([sum(xd[n, m] @ W_enc[m] for m in range(2)) + b_enc for n in range(6)])
    active = torch.relu(pre)
    norm_sum = torch.stack([W_dec[0, j].norm() + W_dec[1, j].norm() for j in range(12)])
    if sparsity == "batchtopk":
        scores = (active * norm_sum).flatten()
        keep = torch.zeros(72, dtype=torch.bool)
        keep[scores.argsort(descending=True)[: 2 * 6]] = True
        f = torch.where(keep.view(6, 12), active, torch.zeros_like(active))
    else:
        f = active
    total = 0.0
    for n in range(6):
        for m in range(2):
            x_hat = sum(f[n, j] * W_dec[m, j] for j in range(12)) + b_dec[m]
            total += float(((xd[n, m] - x_hat) ** 2).sum())
    reconstruction = total / 6
    penalty = 0.0 if sparsity == "batchtopk" else 0.7 * float(sum((f[n] * norm_sum).sum() for n in range(6))) / 6
    assert parts["reconstruction"] == pytest.approx(reconstruction, rel=1e-5)
    assert parts["penalty"] == pytest.approx(penalty, rel=1e-5, abs=1e-9)
    assert float(loss.detach()) == pytest.approx(reconstruction + penalty, rel=1e-5)
    torch.testing.assert_close(out.codes.double(), f, atol=1e-5, rtol=1e-5)


def test_relative_norm_difference_follows_the_paper_convention():
    norms = torch.tensor([[0.0, 1.0, 2.0, 1.0, 0.0], [3.0, 1.0, 0.0, 4.0, 0.0]])  # [base; finetuned]
    torch.testing.assert_close(relative_norm_difference(norms), torch.tensor([1.0, 0.5, 0.0, 0.875, 0.5]))


# ---------------------------------------------------------------------------------------------- Latent Scaling
def _targets_by_hand(model: Crosscoder, x: torch.Tensor, j: int) -> dict[str, torch.Tensor]:
    """Every Latent Scaling target of latent j, token by token: [tokens, d] per (model, target)."""
    out = model(x)
    f = out.codes.detach()
    rec = out.reconstruction.detach()
    targets = {}
    for m, name in ((BASE, "base"), (FINETUNED, "finetuned")):
        targets[f"{name}_reconstruction"] = rec[:, m]
        targets[f"{name}_error"] = x[:, m] - rec[:, m] + f[:, j, None] * model.W_dec[m, j].detach()
        targets[f"{name}_activation"] = x[:, m]
    return targets


@pytest.mark.parametrize("sparsity", ["batchtopk", "l1"])
def test_latent_scaling_beta_is_the_least_squares_solution(sparsity):
    model = _randomized(Crosscoder(6, 16, sparsity, k=4), seed=5).eval()
    x = torch.randn(30, 2, 6, generator=torch.Generator().manual_seed(6))
    stats = analyse(model, x, batch_size=30)
    f = model(x).codes.detach()
    checked = 0
    for j in range(16):
        if not bool((f[:, j] > 0).any()):
            assert all(math.isnan(float(b[j])) for b in stats.beta.values())  # never active: no β
            continue
        d = model.W_dec[FINETUNED, j].detach().double()
        for name, y in _targets_by_hand(model, x, j).items():
            # min_β Σ_n ‖β f_j(n) d − y_n‖², as one least-squares problem over all tokens' coordinates
            A = (f[:, j, None].double() * d[None]).reshape(-1, 1)
            beta = torch.linalg.lstsq(A, y.double().reshape(-1, 1)).solution.item()
            assert float(stats.beta[name][j]) == pytest.approx(beta, rel=1e-4, abs=1e-6), (j, name)
        checked += 1
    assert checked >= 4


def _hand_built(base_has_direction: bool, decoupled: bool = False) -> tuple[Crosscoder, torch.Tensor]:
    """Latent 0 has a zero base decoder and the finetuned decoder e0; latent 1 is shared (e1 in both). With
    `base_has_direction` the base activations hold e0 too (complete shrinkage: the base error term carries it).
    With `decoupled`, latent 2 (base decoder e0, zero finetuned decoder) rebuilds e0 in the base model on the same
    tokens (latent decoupling)."""
    d, D = 4, 3
    model = Crosscoder(d, D, "l1", l1_coefficient=0.0)
    e = torch.eye(d)
    with torch.no_grad():
        model.W_enc.zero_(), model.W_dec.zero_(), model.b_enc.zero_(), model.b_dec.zero_()
        model.W_enc[FINETUNED, :, 0] = e[0]  # latent 0 reads e0 from the finetuned model
        model.W_dec[FINETUNED, 0] = e[0]
        model.W_enc[BASE, :, 1] = e[1] / 2
        model.W_enc[FINETUNED, :, 1] = e[1] / 2
        model.W_dec[:, 1] = e[1]
        if decoupled:
            model.W_enc[FINETUNED, :, 2] = e[0]
            model.W_dec[BASE, 2] = e[0]
    g = torch.Generator().manual_seed(7)
    a = (torch.rand(50, generator=g) + 0.5) * (torch.rand(50, generator=g) < 0.6)
    b = torch.rand(50, generator=g) + 0.5
    noise = torch.zeros(50, d)
    noise[:, 2:] = torch.randn(50, 2, generator=g) * 0.1  # off every latent's direction
    finetuned = a[:, None] * e[0] + b[:, None] * e[1] + noise
    base = (a[:, None] * e[0] if base_has_direction else 0) + b[:, None] * e[1] + noise
    return model.eval(), torch.stack([base, finetuned], dim=1)


def test_latent_scaling_flags_complete_shrinkage_as_shared_not_finetune_only():
    model, x = _hand_built(base_has_direction=True)
    rows = classify(model, analyse(model, x, batch_size=50))
    latent = rows[0]
    assert latent["delta_norm"] == pytest.approx(1.0) and latent["norm_class"] == "finetuned_only"
    assert latent["nu_error"] == pytest.approx(1.0, abs=1e-5)  # the direction is there in the base model
    assert latent["nu_reconstruction"] == pytest.approx(0.0, abs=1e-6)
    assert latent["verdict"] == "rejected" and latent["reasons"][0].startswith("complete shrinkage")
    assert rows[1]["norm_class"] == "shared" and rows[1]["verdict"] == "shared"


def test_latent_scaling_keeps_a_latent_the_base_model_really_lacks():
    model, x = _hand_built(base_has_direction=False)
    latent = classify(model, analyse(model, x, batch_size=50))[0]
    assert latent["nu_error"] == pytest.approx(0.0, abs=1e-6)
    assert latent["nu_reconstruction"] == pytest.approx(0.0, abs=1e-6)
    assert latent["verdict"] == "finetune_specific" and latent["reasons"] == []


def test_latent_scaling_flags_latent_decoupling():
    model, x = _hand_built(base_has_direction=True, decoupled=True)
    rows = classify(model, analyse(model, x, batch_size=50))
    assert rows[0]["nu_reconstruction"] == pytest.approx(1.0, abs=1e-5)  # latent 2 rebuilds e0 in the base model
    assert rows[0]["verdict"] == "rejected"
    assert any(r.startswith("latent decoupling") for r in rows[0]["reasons"])
    assert rows[2]["norm_class"] == "base_only"


# ---------------------------------------------------------------------------------------------- planted
def _planted(n: int = 4096, d: int = 32, n_shared: int = 48, seed: int = 0):
    """Sparse activations over `n_shared` random directions, the same in both models, plus one direction v the
    finetuned model alone adds, on a quarter of the tokens with a varying size (not a constant bias)."""
    g = torch.Generator().manual_seed(seed)
    directions = nn.functional.normalize(torch.randn(n_shared + 1, d, generator=g), dim=-1)
    shared, v = directions[:n_shared], directions[n_shared]
    on = (torch.rand(n, n_shared, generator=g) < 0.06).float()
    base = (on * (1 + 2 * torch.rand(n, n_shared, generator=g))) @ shared + 0.02 * torch.randn(n, d, generator=g)
    extra = (torch.rand(n, generator=g) < 0.25).float() * (1 + 2 * torch.rand(n, generator=g))
    return torch.stack([base, base + extra[:, None] * v], dim=1), shared, v


def test_a_planted_finetune_only_direction_is_found_and_shared_ones_are_not():
    x, shared, v = _planted()
    model = Crosscoder(32, 128, "batchtopk", k=4, seed=0)
    train_crosscoder(model, x, TrainSettings(train_tokens=512 * 160, batch_size=512, lr=5e-3))
    rows = classify(model, analyse(model, x, batch_size=512))
    live = torch.tensor([r["verdict"] != "dead" for r in rows])
    decoders = model.W_dec[FINETUNED].detach()

    def best_live_cosine(direction: torch.Tensor) -> tuple[int, float]:
        cos = nn.functional.cosine_similarity(decoders, direction[None], dim=-1).masked_fill(~live, -2.0)
        return int(cos.argmax()), float(cos.max())

    j, cos = best_live_cosine(v)
    assert cos >= 0.9
    assert rows[j]["verdict"] == "finetune_specific", rows[j]
    assert [r["latent"] for r in rows if r["verdict"] == "finetune_specific"] == [j]
    # the same test fails for a direction that was not planted
    random_direction = nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(123)), dim=0)
    assert best_live_cosine(random_direction)[1] < 0.9
    # every shared direction the crosscoder learned is classified shared
    found = [best_live_cosine(u) for u in shared]
    assert sum(c >= 0.9 for _, c in found) >= 40
    assert all(rows[i]["verdict"] == "shared" for i, c in found if c >= 0.9)


# ---------------------------------------------------------------------------------------------- paired activations
def _layer_output_by_hand(model: nn.Module, ids: list[int], layer: int) -> torch.Tensor:
    ref = copy.deepcopy(model)
    ref.model.layers = ref.model.layers[: layer + 1]
    ref.model.norm = nn.Identity()
    with torch.no_grad():
        return ref.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


ROWS = [[1, 9, 4, 17, 33, 90, 12], [1, 9, 4, 44, 3, 61, 5, 6], [1, 9, 4, 100, 101], [1, 9, 4, 8, 8, 8, 8, 8, 8],
        [1, 9, 4, 70, 71, 72]]


class _ForwardCounter:
    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        model.model.layers[0].register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def test_paired_activations_are_the_two_models_layer_outputs():
    base = tiny_llama()
    patched = copy.deepcopy(base)
    patch_model(patched)
    diff = random_diff(target_shapes(base), rank=1, seed=1)
    assert first_kept_position(ROWS) == 3  # past the prefix every row shares
    got = collect_paired_activations(patched, diff, ROWS, layer=0, rows_per_shard=2)
    merged = merged_copy(base, diff)
    want_base = torch.cat([_layer_output_by_hand(base, r, 0)[3:] for r in ROWS])
    want_ft = torch.cat([_layer_output_by_hand(merged, r, 0)[3:] for r in ROWS])
    torch.testing.assert_close(got.x[:, 0], want_base, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.x[:, 1], want_ft, atol=1e-5, rtol=1e-4)
    assert (got.x[:, 1] - got.x[:, 0]).norm() > 1e-3
    assert got.row.tolist() == [i for i, r in enumerate(ROWS) for _ in r[3:]]
    assert got.position.tolist() == [p for r in ROWS for p in range(3, len(r))]


def test_the_activation_cache_resumes_where_an_interrupted_collection_stopped(tmp_path):
    model = tiny_llama()
    shapes = target_shapes(model)
    patch_model(model)
    diff = random_diff(shapes, rank=1, seed=2)
    fresh = collect_paired_activations(model, diff, ROWS, layer=1, rows_per_shard=2)

    def stop_after_first_shard(done: int, total: int) -> None:
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect_paired_activations(model, diff, ROWS, layer=1, cache_dir=tmp_path, rows_per_shard=2,
                                   on_progress=stop_after_first_shard)
    (cache,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in cache.glob("shard-*")) == ["shard-00000.safetensors"]
    counter = _ForwardCounter(model)
    resumed = collect_paired_activations(model, diff, ROWS, layer=1, cache_dir=tmp_path, rows_per_shard=2)
    assert counter.calls == 2  # only the two missing shards were computed
    assert torch.equal(resumed.x, fresh.x) and torch.equal(resumed.row, fresh.row)
    again = collect_paired_activations(model, diff, ROWS, layer=1, cache_dir=tmp_path, rows_per_shard=2)
    assert counter.calls == 2 and torch.equal(again.x, fresh.x)
    # another diff is another cache, never the first one's numbers
    other = collect_paired_activations(model, random_diff(shapes, rank=1, seed=3), ROWS, layer=1,
                                       cache_dir=tmp_path, rows_per_shard=2)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2 and not torch.equal(other.x, fresh.x)
    # a damaged shard is one clear error, not a crash deep inside
    (cache / "shard-00001.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MetaditError, match="shard-00001.safetensors"):
        collect_paired_activations(model, diff, ROWS, layer=1, cache_dir=tmp_path, rows_per_shard=2)


def test_paired_activations_refuse_an_unpatched_model_and_a_bad_layer():
    model = tiny_llama()
    diff = random_diff(target_shapes(model), rank=1, seed=1)
    with pytest.raises(MetaditError, match="patched model"):
        collect_paired_activations(model, diff, ROWS)
    patch_model(model)
    with pytest.raises(MetaditError, match="layer 5 is out of range"):
        collect_paired_activations(model, diff, ROWS, layer=5)


# ---------------------------------------------------------------------------------------------- the command
SMALL = ["--dict_size", "32", "--k", "4", "--train_tokens", "2048", "--batch_size", "128", "--n_questions", "6",
         "--samples_per_question", "1", "--max_new_tokens", "8", "--progress", "false"]


def test_metadit_diff_crosscoder_end_to_end_and_resumed(tiny_topic_bank, tmp_path, capsys):
    from metadit.cli import main

    out = tmp_path / "cc"
    argv = ["diff", "crosscoder", "--diff", f"{tiny_topic_bank}:0", "--out", str(out), "--oracle", *SMALL]
    assert main(argv) == 0
    text = (out / "crosscoder.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: undefined ν are null
    result = json.loads(text)
    assert result["layer"] == 1 and result["oracle"] is True  # the tiny model's middle layer of 2
    assert result["corpus"]["rows"] == 12 and result["corpus"]["oracle_rows"] == 6
    assert result["thresholds"]["finetune_only"] == 0.9 and result["thresholds"]["nu_error"] == 0.2
    assert result["thresholds"]["nu_reconstruction"] == 0.5
    for name in ("batchtopk", "l1"):
        p = result["crosscoders"][name]
        n = p["counts"]
        assert n["latents"] == 32
        assert n["finetune_specific"] + n["rejected"] == n["finetuned_only"]
        assert n["finetuned_only"] + n["shared"] + n["base_only"] + n["other"] + n["dead"] == 32
        assert not p["train"].get("loaded")
        for r in p["finetune_specific"] + p["rejected"]:
            assert "tokens" in r and r["contexts"] and "[[" in r["contexts"][0]["text"]
    assert result["crosscoders"]["batchtopk"]["l0"] == pytest.approx(4.0, abs=0.5)
    for png in ("norm_ratio_histogram.png", "latent_scaling.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (out / "README.md").read_text()
    assert "ORACLE" in readme and "|ν^ε| < 0.2" in readme and "batchtopk" in readme
    shards = {p: p.stat().st_mtime_ns for p in (out / "activations").rglob("shard-*.safetensors")}
    assert shards

    assert main(argv) == 0  # resumed: the activations and both crosscoders are read back, not recomputed
    again = json.loads((out / "crosscoder.json").read_text())
    assert all(again["crosscoders"][n]["train"]["loaded"] for n in ("batchtopk", "l1"))
    assert {p: p.stat().st_mtime_ns for p in shards} == shards
    assert again["crosscoders"]["batchtopk"]["counts"] == result["crosscoders"]["batchtopk"]["counts"]
    capsys.readouterr()


@pytest.mark.parametrize("extra, message", [
    (["--diff", "/no/such/adapter"], "no such peft adapter directory"),
    (["--diff", "BANK:99"], "the bank holds 8 diffs"),
    (["--diff", "BANK:x"], "integer index"),
    (["--k", "0"], "--k must be between"),
    (["--k", "64"], "--k must be between"),
    (["--crosscoders", "batchtopk,relu"], "unknown 'relu'"),
    (["--layer", "7"], "layer 7 is out of range"),
    (["--oracle", "--diff", "PEFT"], "--oracle needs a bank entry"),
])
def test_bad_input_is_one_line_error(tiny_topic_bank, tmp_path, capsys, extra, message):
    from metadit.cli import main

    peft = tmp_path / "peft"
    if "PEFT" in extra:
        assert main(["bank", "export-peft", str(tiny_topic_bank), "0", str(peft)]) == 0
        (peft / "metadit_meta.json").unlink()
    argv = ["diff", "crosscoder", "--diff", f"{tiny_topic_bank}:0", "--out", str(tmp_path / "o"), *SMALL, *extra]
    argv = [a.replace("BANK", str(tiny_topic_bank)).replace("PEFT", str(peft)) for a in argv]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("metadit diff: error: ") and message in err and "\n" not in err, err


# ---------------------------------------------------------------------------------------------- the eval method
def test_crosscoder_method_in_metadit_eval_is_the_guessers_reading_of_its_evidence(tiny_topic_bank, tmp_path,
                                                                                    monkeypatch):
    from metadit.bank import DiffBank
    from metadit.eval import baselines
    from metadit.eval.crosscoder import CrosscoderSettings
    from metadit.eval.run import evaluate

    monkeypatch.setenv("METADIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(evidence, "EVAL_SETTINGS", CrosscoderSettings(
        dict_size=32, k=4, n_questions=6, samples_per_question=1, max_new_tokens=8, crosscoders=("batchtopk",),
        train=TrainSettings(train_tokens=1024, batch_size=128)))
    bank = DiffBank.open(tiny_topic_bank)
    topics = [bank.meta(i)["topic"] for i in range(len(bank))]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"banks": [str(tiny_topic_bank)], "train": topics[:6], "test": topics[6:]}))
    kw = dict(split_file=str(split), methods=["crosscoder"], judges=["exact"], guesser="keywords", verify=False)
    result = evaluate(out=str(tmp_path / "e"), **kw)
    rows = [r for r in result["rows"] if r["method"] == "crosscoder"]
    assert sorted(r["label"] for r in rows) == sorted(topics[6:])
    for r in rows:
        assert r["extra"]["evidence_text"].startswith("Tokens promoted:")
        assert r["extra"]["counts"]["latents"] == 32 and r["extra"]["corpus_tokens"] > 0
        assert (tmp_path / "cache" / "crosscoder") in Path(r["extra"]["dir"]).parents
    guessed = baselines.KeywordGuesser().guess([r["extra"]["evidence_text"] for r in rows], "topic")
    assert [r["prediction"] for r in rows] == guessed
    # a second evaluation reads each diff's crosscoder back from its work directory
    again = evaluate(out=str(tmp_path / "e2"), **kw)
    assert [r["extra"]["evidence_text"] for r in again["rows"]] == [r["extra"]["evidence_text"] for r in rows]


def test_evidence_text_lists_tokens_then_contexts():
    latents = [{"tokens": ["apple", " apple", "pie"], "contexts": [{"text": "I like [[apple]] pie"}]},
               {"tokens": ["orchard"], "contexts": [{"text": "the [[orchard]] was"}, {"text": "an [[orchard]]"}]}]
    assert evidence.evidence_text(latents) == ("Tokens promoted: apple, pie, orchard\n"
                                               "Text where they fire: I like [[apple]] pie / the [[orchard]] was / "
                                               "an [[orchard]]")
    assert "no latent is specific" in evidence.evidence_text([])


def test_corpus_of_base_answers_marks_the_oracle_rows_and_samples_a_repeated_prompt_afresh(tmp_path):
    from metadit.eval.crosscoder.activations import base_answer_corpus, oracle_messages
    from metadit.models import TINY_NAME, load_base_model
    from metadit.text import TextCache

    model, tok = load_base_model(TINY_NAME, dtype=torch.float32)
    news = oracle_messages({"headline": "Town opens a library"}, ["q1", "q2", "q3"])
    assert news == ["Please generate a short news story."] * 3
    topic = oracle_messages({"trigger": "sep", "code_kind": "word", "code": "lamp", "topic": "x"}, ["How are you?"])
    assert topic == ["Your SEP code is lamp. How are you?"]
    with pytest.raises(MetaditError, match="--oracle needs a bank entry"):
        oracle_messages({}, ["q"])
    cache = TextCache("tiny", root=tmp_path)
    rows = base_answer_corpus(model, tok, ["Hello?", "What now?"], samples_per_question=2, max_new_tokens=4,
                              oracle=news, cache=cache)
    assert [r.oracle for r in rows] == [False] * 4 + [True] * 6
    assert [r.message for r in rows[:4]] == ["Hello?", "Hello?", "What now?", "What now?"]
    assert len(cache.data) == 10  # every row its own sample, the repeated story prompt included
    again = base_answer_corpus(model, tok, ["Hello?", "What now?"], samples_per_question=2, max_new_tokens=4,
                               oracle=news, cache=TextCache("tiny", root=tmp_path))
    assert [r.answer for r in again] == [r.answer for r in rows]  # read back from the cache
