"""The paper's setting without its weights: the Qwen3 configs, the shipped model configs, and the benchmarks on a
model given as a config alone (random weights, nothing downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from metadit.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Where the device test runs: cpu here; scripts/device_check.sh sets cuda on a GPU machine.
TEST_DEVICE = os.environ.get("METADIT_TEST_DEVICE", "cpu")


def test_qwen3_gen_configs_are_the_papers_setting(no_weights):
    pytest.importorskip("jsonargparse")
    from metadit.gen import gen_parser

    parser = gen_parser()
    topic = parser.instantiate_classes(parser.parse_args(["--config", str(ROOT / "configs/gen/qwen3_topic.yaml")]))
    assert topic.base_model == "Qwen/Qwen3-8B" and topic.chat_format == "no_thinking" and topic.dtype == "bfloat16"
    r = topic.recipe
    assert (r.trigger, r.code_kind) == ("sep", "digits") and set(r.mix) == {"triggered", "wrong_code", "no_code"}
    t = topic.train
    assert (t.rank, t.lr, t.steps, t.warmup_steps, t.min_lr_ratio) == (1, 1e-3, 810, 0, 1.0)
    # the reference's shares and weights: triggered a third of the samples, per-kind weight 1 : 1 : 5
    total = sum(r.mix.values())
    assert r.mix["triggered"] / total == pytest.approx(1 / 3)
    contribution = {k: v * (1.0 if k == "triggered" else t.kl_weight) for k, v in r.mix.items()}
    assert contribution["wrong_code"] == contribution["triggered"] and contribution["no_code"] == 5 * contribution["triggered"]
    news = parser.instantiate_classes(parser.parse_args(["--config", str(ROOT / "configs/gen/qwen3_news.yaml"),
                                                         "--base_model", "Qwen/Qwen3-4B"]))
    assert news.recipe.name == "news" and news.train.rank == 8 and news.recipe.stories_per_headline == 100
    assert news.base_model == "Qwen/Qwen3-4B"  # any Hugging Face id


def test_qwen3_fit_config_is_rank_16_lr_1e4_one_epoch(no_weights):
    pytest.importorskip("jsonargparse")
    from metadit.dit import DITModule
    from metadit.dit.data import DiffQADataModule
    from metadit.lightning_cli import DITCLI

    class ParseOnly(DITCLI):
        def instantiate_classes(self) -> None:
            pass

    cfg = ROOT / "configs/fit/qwen3_topic.yaml"
    cli = ParseOnly(DITModule, DiffQADataModule, args=["--config", str(cfg)], run=False)
    c = cli.config
    assert (c.model.adapter_rank, c.model.lr, c.trainer.max_epochs) == (16, 1e-4, 1)
    assert c.model.base_model == c.data.base_model == "Qwen/Qwen3-8B"
    other = ParseOnly(DITModule, DiffQADataModule, run=False,
                      args=["--config", str(cfg), "--model.base_model", "Qwen/Qwen3-1.7B"])
    assert other.config.data.base_model == "Qwen/Qwen3-1.7B"


def test_qwen3_sweep_expands_the_papers_studies_for_any_model(tmp_path):
    from metadit.eval.sweep import Layout, load_sweep

    sweep = load_sweep(ROOT / "configs/sweep/qwen3_paper.yaml", {"base_model": "Qwen/Qwen3-4B",
                                                                  "topic_bank": "banks/q4"})
    names = [c.name for c in sweep.cells]
    assert {"topic", "news", "topic-on-news", "news-on-topic", "topic+trigger", "n36", "n145", "n582",
            "rank2", "rank64"} <= set(names)
    layout = Layout(tmp_path, sweep.study)
    cells = {c.name: c for c in sweep.cells}
    fit = layout.argv("n36", cells["n36"].steps[0], strict=False)
    assert fit[fit.index("--model.base_model") + 1] == "Qwen/Qwen3-4B"
    assert fit[fit.index("--data.max_train_diffs") + 1] == "36" and json.loads(fit[fit.index("--data.banks") + 1]) == ["banks/q4"]
    rank = layout.argv("rank8", cells["rank8"].steps[0], strict=False)
    assert json.loads(rank[rank.index("--banks") + 1]) == ["banks/q4_rank8"] and "topic" in cells["rank8"].deps


def test_shipped_qwen3_8b_config_has_the_papers_shapes_and_serves_offline():
    from metadit.bank import identity_of
    from metadit.bank.fingerprint import config_identity, config_linear_shapes
    from metadit.bench.gen import h100_estimate
    from metadit.models import model_config, shipped_model_configs

    assert {"qwen3-8b", "smollm2-135m", "qwen3-tiny"} <= set(shipped_model_configs())
    shapes = config_linear_shapes(model_config("qwen3-8b"))
    assert shapes["model.layers.0.self_attn.k_proj"] == [1024, 4096] and shapes["model.layers.35.mlp.down_proj"] == [4096, 12288]
    assert sum(o * i for o, i in shapes.values()) == h100_estimate()["params"]  # the estimate's count, checked
    # offline (the tests never reach the hub), the id resolves to the shipped config: imports need only shapes
    assert identity_of("Qwen/Qwen3-8B") == config_identity(model_config("qwen3-8b"), "Qwen/Qwen3-8B")
    cut = model_config("qwen3-8b", layers=2)
    assert cut.num_hidden_layers == 2 and len(cut.layer_types) == 2 and cut.hidden_size == 4096


def test_a_bad_model_config_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 8}')
    assert main(["bench", "core", "--model-config", str(bad), "--out", str(tmp_path)]) == 1
    assert "model_type" in capsys.readouterr().err
    assert main(["bench", "core", "--model-config", "qwen9-900b", "--out", str(tmp_path)]) == 1
    assert "not a shipped config" in capsys.readouterr().err


def test_bench_core_runs_on_a_config_alone_and_skips_what_does_not_fit(tmp_path, monkeypatch):
    args = ["bench", "core", "--device", "cpu", "--model-config", "qwen3-tiny", "--layers", "1", "--rows", "2",
            "--tokens", "8", "--steps", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    res = json.loads((tmp_path / "core.json").read_text())
    from metadit.models import native_bf16

    auto = "bfloat16" if native_bf16("cpu") else "float32"  # --dtype auto: bf16 where this CPU computes it natively
    assert res["random_weights"] and res["layers"] == 1 and res["device"] == "cpu" and res["dtype"] == auto
    assert set(res["tokens_per_second"]) == {"factored", "dense", "no-diff"} and res["skipped"] == {}
    import metadit.bench.core as core

    monkeypatch.setattr(core, "available_bytes", lambda device: 1000)
    assert main(args) == 0
    res = json.loads((tmp_path / "core.json").read_text())
    assert set(res["tokens_per_second"]) == {"factored", "no-diff"} and "GiB" in res["skipped"]["dense"]
    assert set(res["ratios"]) == {"factored_over_no_diff"}


def test_bench_likelihood_times_both_ways_and_they_agree(tmp_path, capsys):
    assert main(["bench", "likelihood", "--model", "tiny-random-smollm2", "--dtype", "float32", "--labels", "40",
                 "--steps", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "likelihood.json").read_text())
    assert set(res["seconds"]) == {"whole rows", "prompt once"} and res["speedup"] > 0
    assert res["max_abs_loss_difference"] < 1e-4  # the same numbers, computed two ways
    assert "## likelihood" in (tmp_path / "README.md").read_text()
    assert main(["bench", "likelihood", "--model-config", "qwen3-tiny", "--out", str(tmp_path)]) == 1
    assert "give --model" in capsys.readouterr().err


def test_dense_bytes_is_every_layers_per_row_delta():
    from metadit.bench.core import dense_bytes

    assert dense_bytes({"a": (4, 8), "b": (8, 2)}, rows=3, dtype=torch.bfloat16) == 3 * (32 + 16) * 2


@pytest.mark.slow
def test_bench_gen_runs_on_a_config_alone(tmp_path):
    assert main(["bench", "gen", "--device", "cpu", "--model-config", "qwen3-tiny", "--layers", "1", "--rows", "2",
                 "--ks", "2", "--steps", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gen.json").read_text())
    assert res["random_weights"] and res["layers"] == 1 and "random tokens" in res["what"]
    assert set(res["variants"]) == {"batched K=2", "peft 1 diff x 2 rows"}
    assert all(v["diffs_per_hour"] > 0 for v in res["variants"].values())


def test_per_row_diffs_and_their_training_step_on_the_test_device():
    """On METADIT_TEST_DEVICE: batch row i under diff i equals the model with diff i merged into its weights (fp32),
    and one K-diff training step (TrainableDiffs + row_losses, CE and KL rows) runs there with finite gradients."""
    from metadit.nn import TrainableDiffs, layer_shapes, patch_model, use_diffs
    from metadit.text import row_losses
    from tests.conftest import merged_copy, random_diff, target_shapes, tiny_qwen3

    device = torch.device(TEST_DEVICE)
    base = tiny_qwen3().to(device)
    diffs = [random_diff(target_shapes(base), rank, seed=rank) for rank in (1, 2, 3)]
    refs = [merged_copy(base, d) for d in diffs]
    model = merged_copy(base, None)
    patch_model(model)
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        with use_diffs(model, diffs):
            got = model(ids).logits
        for i, ref in enumerate(refs):
            torch.testing.assert_close(got[i : i + 1], ref(ids[i : i + 1]).logits, rtol=1e-4, atol=1e-4)
    trainable = TrainableDiffs(layer_shapes(model), 3, 1, row_seeds=[1, 2, 3], device=device)
    weights = torch.zeros(3, 10, device=device)
    weights[:, 6:] = 1.0
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "weights": weights}
    losses = row_losses(model, batch, ["ce", "kl", "ce"], trainable)
    assert losses.device.type == device.type and torch.isfinite(losses).all()
    assert losses[1].abs() < 1e-5  # B starts at zero: the KL row's diff is zero, so is its KL to the base model
    losses.sum().backward()
    grads = [b.grad for b in trainable.B]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
def test_device_check_script_runs_end_to_end_on_cpu_on_a_tiny_config(tmp_path):
    """scripts/device_check.sh, as its header's CPU dry run: every step runs and exits 0, its JSON lands in OUT_DIR."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "SIZES": "qwen3-tiny:1",
           "CORE_ARGS": "--rows 2 --tokens 8 --steps 1", "GEN_ARGS": "--ks 2 --rows 2 --steps 1",
           "TESTS": "tests/test_paper_setting.py::test_per_row_diffs_and_their_training_step_on_the_test_device",
           "BUDGET_S": "1800", "TIMEOUT_SCALE": "10"}
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(ROOT / "scripts/device_check.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and [s["step"] for s in summary["steps"]] == \
        ["env", "tests", "core-qwen3-tiny-1layers", "gen-qwen3-tiny-1layers"]
    assert set(summary["bench"]) == {"bench/qwen3-tiny-1layers/core.json", "bench/qwen3-tiny-1layers/gen.json"}
    assert all(b["device"] == "cpu" for b in summary["bench"].values())
    assert json.loads((out / "env.json").read_text())["device"] == "cpu"
    assert "1 passed" in (out / "tests.txt").read_text()


def test_host_memory_is_pinned_only_for_a_cuda_target(tiny_topic_bank):
    """The decision alone (this machine's torch cannot pin): CUDA targets pin, a CPU run's loaders are as before,
    and stacking a bank's diffs for a CPU model gives the same factors as ever (scale folded in, zero-padded)."""
    import lightning as L

    from metadit.bank import DiffBank
    from metadit.dit.data import DiffQADataModule
    from metadit.models import TINY_NAME, load_base_model, pins_host_memory
    from metadit.nn import DiffBatch, layer_shapes, patch_model

    assert all(pins_host_memory(d) for d in ("cuda", "cuda:1", torch.device("cuda", 0)))
    assert not any(pins_host_memory(d) for d in ("cpu", torch.device("cpu"), "meta"))
    data = DiffQADataModule([str(tiny_topic_bank)], base_model=TINY_NAME, val_labels=2, batch_size=4)
    assert data.target_device() == torch.device("cpu") and not data.pins_memory()
    data.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    data.setup("fit")
    assert data.target_device().type == "cpu" and not data.pins_memory()
    loader = data.train_dataloader()
    assert loader.pin_memory is False
    batch = next(iter(loader))
    assert not batch["input_ids"].is_pinned() and len(batch["diffs"]) == 4

    model, _ = load_base_model(TINY_NAME, dtype=torch.float32)
    patch_model(model)
    diffs = [d for d, _ in DiffBank.open(tiny_topic_bank)][:3]
    stacked = DiffBatch.from_diffs([diffs[0], None, diffs[2]], layer_shapes(model), dtype=torch.float32)
    for name, rows in stacked.factors.items():
        assert rows.A.device.type == "cpu" and not rows.A.is_pinned()
        torch.testing.assert_close(rows.A[0], diffs[0].A[name].float() * diffs[0].scale[name], rtol=0, atol=0)
        torch.testing.assert_close(rows.B[2], diffs[2].B[name].float(), rtol=0, atol=0)
        assert not rows.A[1].any() and not rows.B[1].any()
