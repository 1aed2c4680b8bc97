"""LoraDiff conversions (peft, full finetunes) and DiffBank storage."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from metadit.bank import DiffBank, LoraDiff, config_identity, model_identity
from metadit.errors import BaseModelMismatchError, MetaditError
from metadit.nn import patch_model, use_diffs
from tests.conftest import merged_copy, random_diff, target_shapes, tiny_llama, tiny_qwen3


def _peft_adapter(tmp_path, model, **cfg):
    config = LoraConfig(init_lora_weights=False, **cfg)  # random A and B, so the check is not vacuous
    torch.manual_seed(3)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", peft_model


@pytest.mark.parametrize(
    "cfg",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(r=2, lora_alpha=3, use_rslora=True, target_modules="all-linear"),
        dict(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "up_proj"],
             rank_pattern={"k_proj": 2}, alpha_pattern={"model.layers.1.self_attn.q_proj": 16}),
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_from_peft_matches_peft_model(tmp_path, cfg):
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    adapter_dir, peft_model = _peft_adapter(tmp_path, tiny_llama(), **cfg)
    with torch.no_grad():
        want = peft_model(ids).logits
    diff = LoraDiff.from_peft(adapter_dir)
    patch_model(model, targets=sorted({n.rsplit(".", 1)[-1] for n in diff.modules}))
    with torch.no_grad(), use_diffs(model, [diff, diff]):
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - tiny_llama()(ids).logits).abs().max() > 1e-3


def test_save_peft_round_trip_loads_in_peft(tmp_path):
    shapes = target_shapes(tiny_qwen3())
    diff = random_diff(shapes, 2, 7, scale=0.25)
    diff.A["model.layers.0.mlp.up_proj"] = diff.A["model.layers.0.mlp.up_proj"][:1]  # one module of rank 1
    diff.B["model.layers.0.mlp.up_proj"] = diff.B["model.layers.0.mlp.up_proj"][:, :1]
    diff.scale["model.layers.0.self_attn.k_proj"] = 3.0
    diff.save_peft(tmp_path / "out", base_model_name_or_path="tiny-qwen3")
    back = LoraDiff.from_peft(tmp_path / "out")
    assert back.modules == diff.modules
    for n in diff.modules:
        assert torch.equal(back.A[n], diff.A[n]) and torch.equal(back.B[n], diff.B[n])
        assert back.scale[n] == pytest.approx(diff.scale[n])
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    peft_model = PeftModel.from_pretrained(tiny_qwen3(), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged_copy(tiny_qwen3(), diff)(ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_from_peft_refuses_pickles_and_bad_configs(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1}))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(MetaditError, match="never unpickles"):
        LoraDiff.from_peft(d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    (d / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MetaditError, match="only LORA"):
        LoraDiff.from_peft(d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1}))
    with pytest.raises(MetaditError, match="not a readable safetensors"):
        LoraDiff.from_peft(d)


@pytest.mark.parametrize("true_rank,r", [(1, 1), (3, 4), (2, 2)])
def test_from_full_diff_is_exact_for_low_rank(true_rank, r):
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    diff = random_diff(target_shapes(model), true_rank, 4)
    tuned = merged_copy(model, diff).state_dict()
    got = LoraDiff.from_full_diff(base, tuned, rank=r)
    assert got.modules == diff.modules
    assert got.info["relative_error"] < 1e-5
    for n in diff.modules:
        torch.testing.assert_close(got.delta(n), diff.delta(n), rtol=1e-4, atol=1e-5)


def test_from_full_diff_reports_truncation_error():
    model = tiny_llama()
    base = model.state_dict()
    tuned = merged_copy(model, random_diff(target_shapes(model), 8, 4)).state_dict()
    got = LoraDiff.from_full_diff(base, tuned, rank=2)
    assert 0.2 < got.info["relative_error"] < 1.0
    n = got.modules[0]
    dw = (tuned[f"{n}.weight"] - base[f"{n}.weight"]).double()
    err = (dw - got.delta(n).double()).norm() / dw.norm()
    assert got.info["relative_error_per_module"][n] == pytest.approx(float(err), rel=1e-4)


def test_bank_random_access_and_metadata(tmp_path):
    model = tiny_llama()
    shapes = target_shapes(model)
    bank = DiffBank.create(tmp_path / "bank", base_model=model, info={"recipe": "test"})
    diffs = [random_diff(shapes, r, s) for s, r in enumerate([1, 2, 4, 1, 2])]
    bank.append(diffs[0], {"topic": "volcanoes", "n": 0})
    bank.append_many(diffs[1:], [{"topic": f"t{i}", "n": i} for i in range(1, 5)])
    reopened = DiffBank.open(tmp_path / "bank")
    assert len(reopened) == 5 and reopened.problems == []
    for i in [3, 0, 4]:
        diff, meta = reopened[i]
        assert meta["n"] == i and diff.rank == diffs[i].rank
        assert all(torch.equal(diff.A[n], diffs[i].A[n]) and torch.equal(diff.B[n], diffs[i].B[n]) for n in diff.modules)
    ds = reopened.to_dataset()
    assert ds["topic"] == ["volcanoes", "t1", "t2", "t3", "t4"] and ds["rank"] == [1, 2, 4, 1, 2]
    assert reopened.verify() == []
    bf = DiffBank.create(tmp_path / "bf16", base_model=model)
    bf.append(diffs[2], {}, dtype=torch.bfloat16)
    assert bf[0][0].dtype == torch.bfloat16


def test_bank_view_of_the_first_n_entries_stays_fixed_as_the_bank_grows(tmp_path):
    """`PATH[:N]` reads the same N diffs after the bank has grown; it is read-only and refuses N > size."""
    from metadit.dit.data import DiffQADataModule

    model = tiny_llama()
    shapes = target_shapes(model)
    bank = DiffBank.create(tmp_path / "bank", base_model=model)
    bank.append_many([random_diff(shapes, 1, s) for s in range(3)], [{"topic": f"t{i}"} for i in range(3)])
    view = DiffBank.open(f"{tmp_path / 'bank'}[:2]")
    before = [view.meta(i)["topic"] for i in range(len(view))]
    bank.append_many([random_diff(shapes, 1, s) for s in range(3, 6)], [{"topic": f"t{i}"} for i in range(3, 6)])
    grown = DiffBank.open(f"{tmp_path / 'bank'}[:2]")
    assert before == [grown.meta(i)["topic"] for i in range(len(grown))] == ["t0", "t1"]
    assert len(DiffBank.open(tmp_path / "bank")) == 6 and grown.problems == [] and grown.verify() == []
    assert torch.equal(grown[1][0].A[grown[1][0].modules[0]], bank[1][0].A[bank[1][0].modules[0]])
    with pytest.raises(MetaditError, match="read-only view"):
        grown.append(random_diff(shapes, 1, 9), {})
    with pytest.raises(MetaditError, match="holds only 6 diffs"):
        DiffBank.open(f"{tmp_path / 'bank'}[:7]")
    # a diff's evaluation id (which seeds its baselines' questions) does not depend on the view
    from metadit.eval.heldout import HeldOut

    ids = [HeldOut(b, 1, None, {}, "topic", "t1", True).id for b in (str(tmp_path / "bank"), f"{tmp_path / 'bank'}[:2]")]
    assert ids == ["bank:1", "bank:1"]
    # the DIT data module takes the same spelling: its bank check finds PATH's bank.json and reads its header
    with pytest.raises(MetaditError, match=r"bank\[:2\]: bank was made for base model 'tiny-llama'"):
        DiffQADataModule(banks=[f"{tmp_path / 'bank'}[:2]"], base_model="tiny-random-smollm2")


def test_bank_reads_only_the_requested_entry(tmp_path, monkeypatch):
    model = tiny_llama()
    bank = DiffBank.create(tmp_path / "bank", base_model=model)
    bank.append_many([random_diff(target_shapes(model), 1, s) for s in range(4)], [{}] * 4)
    bank = DiffBank.open(tmp_path / "bank")
    handle, _ = bank._handle(bank.rows[2]["shard"])
    read = []
    real = type(handle).get_tensor
    monkeypatch.setattr(type(handle), "get_tensor", lambda self, k: (read.append(k), real(self, k))[1])
    bank[2]
    assert read and all(k.startswith("e2/") for k in read)


def test_bank_refuses_another_base_model(tmp_path):
    bank = DiffBank.create(tmp_path / "bank", base_model=tiny_llama())
    bank.check_model(tiny_llama(seed=5))  # same architecture: fine
    with pytest.raises(BaseModelMismatchError, match="tiny-llama.*not 'tiny-qwen3'"):
        bank.check_model(tiny_qwen3())
    with pytest.raises(BaseModelMismatchError):
        DiffBank.create(tmp_path / "bank", base_model=tiny_qwen3(), exist_ok=True)
    # the identity from the config alone equals the loaded model's (checks run before any weights load)
    m = tiny_qwen3()
    assert config_identity(m.config, "x")["fingerprint"] == model_identity(m)["fingerprint"]
    patch_model(m)
    assert model_identity(m)["fingerprint"] == config_identity(m.config, "x")["fingerprint"]


def test_bank_verify_names_corrupt_entries(tmp_path):
    model = tiny_llama()
    bank = DiffBank.create(tmp_path / "bank", base_model=model)
    bank.append_many([random_diff(target_shapes(model), 1, s) for s in range(3)], [{}] * 3)
    shard = tmp_path / "bank" / bank.rows[0]["shard"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # flip a bit in the last tensor's payload
    shard.write_bytes(bytes(data))
    bad = DiffBank.open(tmp_path / "bank").verify()
    assert len(bad) == 1 and "checksum mismatch" in bad[0]


def test_bank_torn_tail_is_detected_and_repaired(tmp_path):
    model = tiny_llama()
    shapes = target_shapes(model)
    bank = DiffBank.create(tmp_path / "bank", base_model=model)
    bank.append_many([random_diff(shapes, 1, s) for s in range(2)], [{"k": 0}, {"k": 1}])
    bank.append(random_diff(shapes, 1, 9), {"k": 2})
    index = tmp_path / "bank" / "index" / "main.jsonl"
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(b"".join(lines[:2]) + lines[2][:20])  # killed while writing the last row
    (tmp_path / "bank" / "shards" / ".tmp-main-000009.safetensors").write_bytes(b"partial")
    torn = DiffBank.open(tmp_path / "bank")
    assert len(torn) == 2 and len(torn.problems) == 3
    with pytest.raises(MetaditError, match="bank repair"):
        torn.append(random_diff(shapes, 1, 10), {})
    removed = torn.repair()
    assert len(removed) == 3
    fixed = DiffBank.open(tmp_path / "bank")
    assert fixed.problems == [] and [m["k"] for _, m in fixed] == [0, 1] and fixed.verify() == []
    fixed.append(random_diff(shapes, 1, 10), {"k": 3})
    assert [m["k"] for _, m in DiffBank.open(tmp_path / "bank")] == [0, 1, 3]
