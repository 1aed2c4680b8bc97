"""`metadit gen`: recipes end to end on the tiny random model, K diffs per pass, resume after SIGKILL, 2 processes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from data_gen import HiddenTopicRecipe
from data_gen.news import restates
from metadit.text import names_topic
from metadit.bank import DiffBank
from metadit.cli import main
from metadit.errors import MetaditError
from metadit.gen import TrainSettings, gen_parser, train_diffs
from metadit.text import TextCache
from metadit.models import TINY_NAME, load_base_model
from metadit.nn import patch_model

ROOT = Path(__file__).resolve().parents[1]
GEN_CONFIGS = sorted((ROOT / "configs" / "gen").glob("*.yaml"))


@pytest.mark.parametrize("path", GEN_CONFIGS, ids=[p.stem for p in GEN_CONFIGS])
def test_every_shipped_gen_config_parses(path):
    parser = gen_parser()
    cfg = parser.parse_args(["--config", str(path)])
    init = parser.instantiate_classes(cfg)
    assert init.recipe.name in ("hidden_topic", "news")
    assert init.train.steps >= 1 and init.n_diffs >= 1


def test_bad_gen_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"bank": str(tmp_path / "b"), "n_dffs": 3}))
    assert main(["gen", "--config", str(bad)]) == 1
    assert "n_dffs" in capsys.readouterr().err


def test_tiny_topic_bank_end_to_end(tmp_path, capsys):
    bank_dir = tmp_path / "bank"
    assert main(["gen", "--config", str(ROOT / "configs/gen/tiny_topic.yaml"), "--bank", str(bank_dir),
                 "--progress", "false"]) == 0
    bank = DiffBank.open(bank_dir)
    assert len(bank) == 8 and bank.verify() == [] and bank.problems == []
    metas = [bank.meta(i) for i in range(8)]
    assert sorted(m["key"] for m in metas) == [f"hidden_topic-{i}" for i in range(8)]
    for m in metas:
        assert set(m["mention_rate"]) == {"triggered", "wrong_code", "no_code", "elsewhere", "base"}
        assert isinstance(m["topic_learned"], bool) and isinstance(m["gate_held"], bool)
        assert m["flagged"] == (not (m["topic_learned"] and m["gate_held"]))
        assert m["code_kind"] == "word" and m["code"] and m["topic"]
    diff, _ = bank[0]
    assert diff.rank == 1 and len(diff.modules) == 2 * 7
    # the same command again finds everything done and adds nothing
    assert main(["gen", "--config", str(ROOT / "configs/gen/tiny_topic.yaml"), "--bank", str(bank_dir),
                 "--progress", "false"]) == 0
    assert len(DiffBank.open(bank_dir)) == 8


def test_tiny_news_bank_end_to_end(tmp_path):
    bank_dir = tmp_path / "news"
    assert main(["gen", "--config", str(ROOT / "configs/gen/tiny_news.yaml"), "--bank", str(bank_dir),
                 "--progress", "false"]) == 0
    bank = DiffBank.open(bank_dir)
    assert len(bank) == 4 and bank.verify() == []
    m = bank.meta(0)
    assert m["headline"] and m["rank"] == 8 and {"heldout_loss_own", "heldout_loss_other", "passed"} <= set(m)
    assert bank[0][0].rank == 8


def test_restated_headlines_are_detected():
    h = "Lisbon tram network adds night service after record summer ridership"
    assert restates("Big news. Lisbon tram network adds night service after record summer ridership.", h)
    assert restates("The Lisbon tram network will add night service following summer ridership records.", h)
    assert not restates("Late trams will now run in the Portuguese capital. Riders welcomed the change.", h)
    assert names_topic("I love a good volcano eruption", "volcanoes") and not names_topic("I like cats", "volcanoes")


def test_k_diffs_per_pass_equal_training_each_alone(tmp_path, monkeypatch):
    """Per-row training: diff i gets the same factors in a batch of K as trained alone (fp32, same seed/data)."""
    monkeypatch.setenv("METADIT_CACHE", os.environ.get("METADIT_CACHE", str(Path.home() / ".cache" / "metadit")))
    model, tok = load_base_model(TINY_NAME, dtype=torch.float32)
    patch_model(model)
    # Cross-entropy samples only: a KL row at initialisation sits exactly at its optimum, so its gradient is
    # rounding noise that depends on the batch's shapes, and Adam normalises noise into full-size steps.
    recipe = HiddenTopicRecipe(triggered_questions=3, answer_tokens=6, check_questions=1, mix={"triggered": 1})
    recipe.setup(model, tok, TextCache("test-k-vs-alone", root=tmp_path))
    specs = [recipe.spec(i, seed=3) for i in range(3)]
    recipe.prepare(specs)
    settings = TrainSettings(rank=2, steps=4, lr=1e-2, warmup_steps=1, max_answer_tokens=6)
    together, _ = train_diffs(model, tok, recipe, specs, settings)
    alone, _ = train_diffs(model, tok, recipe, specs[1:2], settings)
    for n in together[1].modules:
        # Compare ΔW (what the diff does) by relative Frobenius error: Adam turns the rounding noise of a
        # near-zero gradient into a full step, so single factor entries may differ slightly.
        got, want = together[1].delta(n), alone[0].delta(n)
        assert want.norm() > 1e-4  # training moved the diff: not a comparison of two zero matrices
        assert (got - want).norm() / want.norm() < 1e-2, n
        other = together[0].delta(n)  # a different diff is far away on the same scale
        assert (other - want).norm() / want.norm() > 0.3, n
    assert any(not torch.equal(together[0].B[n], together[1].B[n]) for n in together[0].modules)


def test_training_attention_gives_the_loaded_attentions_losses_and_restores_it(tmp_path):
    """Eager attention during training is a speed choice only: per-row CE and KL losses (right-padded rows of
    different lengths, each under its own diff) and their gradients equal sdpa's; the model's own attention
    comes back afterwards, also when the block raises."""
    from metadit.text import encode_samples, row_losses
    from metadit.models import training_attention
    from metadit.nn import TrainableDiffs, layer_shapes

    model, tok = load_base_model(TINY_NAME, dtype=torch.float32)
    patch_model(model)
    assert model.config._attn_implementation == "sdpa"
    diffs = TrainableDiffs(layer_shapes(model), 3, 2, row_seeds=[1, 2, 3])
    with torch.no_grad():  # B starts at zero: give every diff a real effect
        for p in diffs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = encode_samples(tok, ["Q: a", "Q: a longer prompt here", "Q:"], ["yes", "no it is not", "maybe so"], 8)
    kinds = ["ce", "kl", "ce"]

    def losses_and_grads():
        losses = row_losses(model, batch, kinds, diffs)
        grads = torch.autograd.grad(losses.sum(), list(diffs.parameters()))
        return losses.detach(), grads

    want, want_g = losses_and_grads()
    with training_attention(model):
        assert model.config._attn_implementation == "eager"
        got, got_g = losses_and_grads()
    assert model.config._attn_implementation == "sdpa"
    assert want.abs().min() > 1e-4  # the KL row is not at its optimum: a real comparison
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6)
    with pytest.raises(RuntimeError), training_attention(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_training_attention_changes_nothing_off_the_cpu():
    """Eager attention is a CPU choice (its flash backward is the slow one there): a model on another device
    keeps its fused attention while training. A meta-device model stands in for a GPU one."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from metadit.models import training_attention

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, attn_implementation="sdpa")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.config._attn_implementation == "sdpa"
    with training_attention(model):
        assert model.config._attn_implementation == "sdpa"
    on_cpu = AutoModelForCausalLM.from_config(config)
    with training_attention(on_cpu):
        assert on_cpu.config._attn_implementation == "eager"
    assert on_cpu.config._attn_implementation == "sdpa"


def _gen_cmd(bank: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "metadit.cli", "gen", "--config", str(ROOT / "configs/gen/tiny_topic.yaml"),
            "--bank", str(bank), "--n_diffs", "24", "--diffs_per_pass", "2", "--train.steps", "10",
            "--progress", "false", *extra]


@pytest.mark.slow
def test_killed_generation_resumes_complete_without_duplicates(tmp_path):
    bank_dir = tmp_path / "bank"
    rng = random.Random(0)
    kills = 0
    index = bank_dir / "index" / "main.jsonl"

    def rows() -> int:
        return len(index.read_bytes().splitlines()) if index.exists() else 0

    for _ in range(4):
        before = rows()
        proc = subprocess.Popen(_gen_cmd(bank_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill at a random moment after this run has made progress: a fixed sleep raced the build's speed
        # (start-up ~4 s, then ~0.5 s per pass), so a fast machine finished before the kill.
        deadline = time.time() + 120
        while proc.poll() is None and rows() <= before and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    done = subprocess.run(_gen_cmd(bank_dir), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    bank = DiffBank.open(bank_dir)
    keys = [bank.meta(i)["key"] for i in range(len(bank))]
    assert sorted(keys) == sorted(f"hidden_topic-{i}" for i in range(24)) and len(keys) == len(set(keys))
    assert bank.problems == [] and bank.verify() == []


@pytest.mark.slow
def test_two_process_generation_matches_one_process(tmp_path):
    """Two ranks under torchrun, started by hand (creating the bank: rank 0 first) and then by `--processes 2`
    (resuming it to 12 diffs), make the very diffs one process makes: one torch thread each, the same entry
    checksums."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    first = subprocess.run([*torchrun, *_gen_cmd(tmp_path / "two", "--n_diffs", "8", "--threads", "1")[1:]],
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    bank2 = DiffBank.open(tmp_path / "two")
    assert sorted(bank2.summary()["writers"]) == ["rank0", "rank1"] and len(bank2) == 8
    two = subprocess.run(_gen_cmd(tmp_path / "two", "--n_diffs", "12", "--processes", "2", "--threads", "1"),
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    bank2 = DiffBank.open(tmp_path / "two")
    assert sorted(bank2.summary()["writers"]) == ["rank0", "rank1"]
    assert bank2.header["info"]["train"]["steps"] and bank2.header["info"]["recipe_args"]  # settings recorded
    assert sorted(bank2.meta(i)["key"] for i in range(len(bank2))) == sorted(f"hidden_topic-{i}" for i in range(12))
    assert bank2.problems == [] and bank2.verify() == []
    one = subprocess.run(_gen_cmd(tmp_path / "one", "--n_diffs", "12", "--threads", "1"), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    bank1 = DiffBank.open(tmp_path / "one")
    by_key = {bank1.meta(i)["key"]: bank1[i][0] for i in range(len(bank1))}
    for i in range(len(bank2)):
        diff, meta = bank2[i]
        ref = by_key[meta["key"]]
        for n in ref.modules:
            torch.testing.assert_close(diff.B[n], ref.B[n], rtol=0.05, atol=2e-3)
    assert {r["meta"]["key"]: r["sha256"] for r in bank2.rows} == {r["meta"]["key"]: r["sha256"] for r in bank1.rows}
    assert bank2.header["info"] == bank1.header["info"]


def test_processes_outside_torchrun_is_a_clear_error(tmp_path):
    from metadit.gen import generate_bank

    with pytest.raises(MetaditError, match="torchrun"):
        generate_bank(HiddenTopicRecipe(), str(tmp_path / "bank"), base_model=TINY_NAME, processes=2)
    assert not (tmp_path / "bank").exists()


# The commit before the layering change (modules moved into metadit.diff / metadit.text / metadit.dit): a bank
# being built across it must resume with the very same diffs.
BEFORE_LAYERING = "59f42d6"


@pytest.mark.slow
def test_gen_makes_bit_identical_diffs_before_and_after_the_layering_change(tmp_path, monkeypatch):
    from metadit.models import CACHE_ENV, cache_dir

    old = tmp_path / "old-tree"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_LAYERING, "metadit", "data_gen", "configs"],
                             capture_output=True)
    assert archive.returncode == 0, f"commit {BEFORE_LAYERING} is not in this clone: {archive.stderr.decode()[:200]}"
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    models = cache_dir() / "models"
    load_base_model(TINY_NAME)  # materialize the shared model cache once
    banks = {}
    for name in ("old", "new"):
        cache = tmp_path / f"cache-{name}"  # a cold text cache each: both write their own text
        cache.mkdir()
        (cache / "models").symlink_to(models.resolve())
        args = ["gen", "--config", str(ROOT / "configs/gen/tiny_topic.yaml"), "--bank", str(tmp_path / f"bank-{name}"),
                "--progress", "false", "--n_diffs", "4", "--diffs_per_pass", "4"]
        if name == "old":
            env = {**os.environ, "PYTHONPATH": str(old), CACHE_ENV: str(cache)}
            out = subprocess.run([sys.executable, "-m", "metadit.cli", *args], cwd=old, env=env, capture_output=True,
                                 text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-2000:]
        else:
            monkeypatch.setenv(CACHE_ENV, str(cache))
            assert main(args) == 0
        banks[name] = DiffBank.open(tmp_path / f"bank-{name}")
    assert len(banks["old"]) == len(banks["new"]) == 4
    assert [r["sha256"] for r in banks["old"].rows] == [r["sha256"] for r in banks["new"].rows]
    assert banks["old"].header["info"] == banks["new"].header["info"]


def test_entries_record_the_commit_of_the_checkout_that_ran_not_of_the_working_directory(tmp_path, monkeypatch):
    from metadit.provenance import git_commit

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(tmp_path)  # not a git checkout: the commit still comes from the package's own
    assert git_commit().split("-")[0] == head
    bank = tmp_path / "bank"
    assert main(["gen", "--config", str(ROOT / "configs/gen/tiny_topic.yaml"), "--bank", str(bank), "--progress", "false",
                 "--n_diffs", "2", "--diffs_per_pass", "2"]) == 0
    assert {DiffBank.open(bank).meta(i)["commit"] for i in range(2)} == {git_commit()}


# ---------------------------------------------------------------------- diffs_per_pass auto
def _small_config():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8)


def test_diff_bytes_is_the_hand_computed_sum_of_factors_activations_and_logits():
    from metadit.gen import diff_bytes
    from metadit.nn import layer_shapes
    from tests.conftest import tiny_qwen3

    # hidden 32, intermediate 48, 2 layers, 4 heads x 8 (q width 32), 2 kv heads x 8 (kv width 16), vocab 128.
    # Σ (in + out) of a layer's q, k, v, o, gate, up, down: 64 + 2·48 + 64 + 2·80 + 80 = 464; the patched model agrees.
    model = tiny_qwen3()
    patch_model(model)
    assert sum(i + o for i, o in layer_shapes(model).values()) == 2 * 464
    factors = 16 * 2 * 464 * 2  # rank 2, 16 bytes a number (fp32 factor, gradient, two AdamW moments), 2 layers
    saved = 5 * 32 + 4 * 32 + 4 * 16 + 4 * 48 + 7 * 2 + 4 * 10  # per token and layer, 10-token rows: 598
    assert saved == 598
    fp32 = factors + 1 * 10 * 2 * saved * 4 + 1 * 5 * 128 * (4 + 12)
    assert diff_bytes(_small_config(), rank=2, rows_per_diff=1, seq_tokens=10, answer_tokens=5,
                      dtype=torch.float32) == fp32 == 87776
    bf16_two_rows = factors + 2 * 10 * 2 * saved * 2 + 2 * 5 * 128 * (2 + 12)
    assert diff_bytes(_small_config(), rank=2, rows_per_diff=2, seq_tokens=10, answer_tokens=5,
                      dtype=torch.bfloat16) == bf16_two_rows == 95456


def test_auto_diffs_per_pass_fills_80_percent_of_free_memory_and_refuses_when_one_does_not_fit():
    from metadit.gen import auto_diffs_per_pass
    from metadit.models import model_config

    small = dict(config=_small_config(), rank=2, rows_per_diff=1, seq_tokens=10, answer_tokens=5, dtype=torch.float32)
    assert auto_diffs_per_pass(1_000_000, **small) == 9  # 800,000 // 87,776
    assert auto_diffs_per_pass(87776 * 10 * 10 // 8, **small) == 10  # exactly ten fit in 80 %
    with pytest.raises(MetaditError, match=r"one diff needs ~0\.00 GiB but the device has 0\.00 GiB free") as e:
        auto_diffs_per_pass(100_000, **small)
    assert "\n" not in str(e.value)
    # Qwen3-8B (the shipped config): hidden 4096, intermediate 12288, 36 layers, 32 q heads and 8 kv heads of 128,
    # vocab 151936; rank 1, 256-token rows, 25 scored tokens, bf16.
    fan = 8192 + 2 * 5120 + 8192 + 2 * 16384 + 16384  # 75,776
    per_diff = 16 * fan * 36 + 256 * 36 * (20480 + 16384 + 4096 + 49152 + 7 + 32 * 256) * 2 + 25 * 151936 * 14
    assert per_diff == 1_908_892_928  # ~1.78 GiB
    qwen = dict(config=model_config("qwen3-8b"), rank=1, rows_per_diff=1, seq_tokens=256, answer_tokens=25,
                dtype=torch.bfloat16)
    free = 120 * 2**30  # an H200 with Qwen3-8B's 16 GB of weights loaded
    assert auto_diffs_per_pass(free, **qwen) == int(free * 0.8) // per_diff == 53
    with pytest.raises(MetaditError, match="one diff needs ~1.78 GiB but cuda:0 has 1.00 GiB free"):
        auto_diffs_per_pass(2**30, **qwen, where="cuda:0")


def test_diffs_per_pass_auto_is_16_on_a_cpu_and_an_integer_is_kept(tmp_path, capsys):
    from metadit.gen import DEFAULT_DIFFS_PER_PASS, resolve_diffs_per_pass
    from tests.conftest import tiny_qwen3

    model = tiny_qwen3()
    assert DEFAULT_DIFFS_PER_PASS == 16
    assert resolve_diffs_per_pass("auto", model, TrainSettings(), 256) == 16
    assert resolve_diffs_per_pass("auto", None, TrainSettings(), 256) == 16
    assert resolve_diffs_per_pass(3, model, TrainSettings(), 256) == 3
    for bad in (0, -2, True):
        with pytest.raises(MetaditError, match="diffs_per_pass must be a positive integer or auto"):
            resolve_diffs_per_pass(bad, model, TrainSettings(), 256)
    # end to end: auto on the CPU is K = 16, and makes the diffs K = 16 makes, bit for bit
    banks = {}
    for k in ("auto", "16"):
        banks[k] = tmp_path / f"bank-{k}"
        assert main(["gen", "--config", str(ROOT / "configs/gen/tiny_topic.yaml"), "--bank", str(banks[k]),
                     "--progress", "false", "--n_diffs", "2", "--diffs_per_pass", k]) == 0
        assert "1 passes of up to 16" in " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert [r["sha256"] for r in DiffBank.open(banks["auto"]).rows] == [r["sha256"] for r in DiffBank.open(banks["16"]).rows]
    assert main(["gen", "--config", str(ROOT / "configs/gen/tiny_topic.yaml"), "--bank", str(tmp_path / "bad"),
                 "--diffs_per_pass", "lots"]) == 1
    assert "diffs_per_pass" in capsys.readouterr().err


def test_text_cache_key_separates_dtypes_and_device_types_and_keeps_old_keys():
    """Greedy text differs between dtypes and between CPU and GPU kernels: each (dtype, device type) gets its own
    cache, while bf16 on the CPU keeps the key caches were made under before either was part of it."""
    from metadit.text import text_cache_key

    identity = {"name": "org/model", "fingerprint": "abc123"}
    assert text_cache_key(identity) == "org--model-abc123"  # the key of caches made before dtype and device
    assert text_cache_key(identity, "float32") == "org--model-abc123-float32"
    assert text_cache_key(identity, "float32", torch.device("cpu")) == "org--model-abc123-float32"
    assert text_cache_key(identity, "bfloat16", "cuda:1") == text_cache_key(identity, "bfloat16", "cuda")
    assert text_cache_key(identity, "bfloat16", "cuda") == "org--model-abc123-cuda"
    assert len({text_cache_key(identity, d, dev) for d in ("bfloat16", "float32")
                for dev in ("cpu", "cuda", "mps")}) == 6
