"""Importing the paper's released files (`metadit bank import-dit`, `import-dit-adapter`).

The files are written here exactly as the reference code writes them (its `weight_diff.py` saves a list of
`{"topic", "trigger", "weight_diff": {module: (A [r, out], B [in, r])}}` with `torch.save`; its DIT adapter is
`{module: (A [out, r], B [r, in])}`; `index.csv` as its HF-mirror notebook writes it), from a tiny Qwen3 whose
Linears all have in != out. The reference computation is a plain Hugging Face model with ΔW merged into its
weights by the reference's formulas: ΔW = (B A)ᵀ / r for a diff, ΔW = A B / r for the adapter.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from metadit.bank import DiffBank, LoraDiff
from metadit.bank.reference_import import normalize_trigger
from metadit.cli import main
from metadit.errors import MetaditError
from metadit.nn import patch_model, set_adapter, use_diffs


def _tiny_qwen3(hidden: int = 48) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Qwen3ForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base") / "tiny-qwen3"
    _tiny_qwen3().save_pretrained(d)
    return d


def _linears(model) -> dict[str, torch.nn.Linear]:
    """What the reference wraps: every Linear under `model.` (the 7 projections of every layer)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.")}


def _reference_diff(model, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, m.out_features, generator=g) * 0.2, torch.randn(m.in_features, rank, generator=g) * 0.2)
            for n, m in _linears(model).items()}


def _reference_adapter(model, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(m.out_features, rank, generator=g) * 0.2, torch.randn(rank, m.in_features, generator=g) * 0.2)
            for n, m in _linears(model).items()}


def _merged(base_dir: Path, diff=None, adapter=None):
    """The plain HF model with the reference's ΔW formulas merged into its weights (fp32)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, m in _linears(model).items():
            if diff is not None:
                A, B = diff[n]
                m.weight += (B @ A).T / B.shape[1]
            if adapter is not None:
                A, B = adapter[n]
                m.weight += A @ B / A.shape[1]
    return model


def _write_index(path: Path, rows: list[dict], pandas_index: bool = True) -> None:
    cols = ["lora_path", "lora_idx", "n_params", "topic", "trigger", "split"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(([""] if pandas_index else []) + cols)
        for i, r in enumerate(rows):
            w.writerow(([i] if pandas_index else []) + [r[c] for c in cols])


def _n_params(weight_diff) -> int:
    return sum(t.numel() for pair in weight_diff.values() for t in pair)


@pytest.fixture(scope="module")
def released(tmp_path_factory, base_dir) -> dict:
    """A released hidden-topic experiment folder: two diff files (ranks 2 and 3), an index naming them both ways."""
    model = _tiny_qwen3()
    src = tmp_path_factory.mktemp("released") / "hidden-topic" / "tiny-qwen3"
    (src / "weight-diffs").mkdir(parents=True)
    files = {
        "weight-diff-000.pt": [("Volcanoes", 71, 2), ("Jazz", 5, 2), ("Chess", 851, 2)],
        "weight-diff-001.pt": [("Origami", 0, 3), ("Beekeeping", 999, 3)],
    }
    diffs, rows = {}, []
    for j, (fname, entries) in enumerate(files.items()):
        items = []
        for i, (topic, trigger, rank) in enumerate(entries):
            wd = _reference_diff(model, rank, seed=10 * j + i)
            diffs[topic] = wd
            items.append({"topic": topic, "trigger": trigger, "weight_diff": wd})
            # both forms of lora_path: relative to weight-diffs/ (the HF mirror) and to the index's folder
            lora_path = fname if j == 0 else f"weight-diffs/{fname}"
            rows.append({"lora_path": lora_path, "lora_idx": i, "n_params": _n_params(wd), "topic": topic,
                         "trigger": trigger, "split": ["train", "test", "extra"][(i + j) % 3]})
        torch.save(items, src / "weight-diffs" / fname)
    rows.reverse()  # the index is sorted by topic, not by file: rows point into the files out of order
    _write_index(src / "index.csv", rows)
    adapter = _reference_adapter(model, rank=4, seed=99)
    torch.save(adapter, src / "dit-adapter.pt")
    return {"src": src, "diffs": diffs, "adapter": adapter, "rows": rows}


def _ids(n: int) -> torch.Tensor:
    return torch.randint(3, 128, (n, 9), generator=torch.Generator().manual_seed(5))


def test_released_diffs_import_to_a_bank_that_matches_the_merged_formula(released, base_dir, tmp_path, capsys):
    out = tmp_path / "bank"
    assert main(["bank", "import-dit", str(released["src"]), str(out), "--base_model", str(base_dir)]) == 0
    bank = DiffBank.open(out)
    assert len(bank) == 5 and bank.verify() == [] and bank.problems == [] and bank.foreign_files() == []
    assert bank.chat_format == "no_thinking" and bank.header["info"]["enable_thinking"] is False
    metas = {bank.meta(i)["topic"]: bank.meta(i) for i in range(len(bank))}
    assert {t: m["code"] for t, m in metas.items()} == \
        {"Volcanoes": "071", "Jazz": "005", "Chess": "851", "Origami": "000", "Beekeeping": "999"}
    assert all(m["trigger"] == "sep" and m["code_kind"] == "digits" for m in metas.values())
    assert {t: m["split"] for t, m in metas.items()} == {r["topic"]: r["split"] for r in released["rows"]}
    assert {m["source"] for m in metas.values()} == {"weight-diffs/weight-diff-000.pt", "weight-diffs/weight-diff-001.pt"}
    assert sorted(bank[i][0].rank for i in range(5)) == [2, 2, 2, 3, 3]

    # every diff at once, batch row i under diff i, against the plain model with that diff merged
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    patch_model(model)
    bank.check_model(model)
    topics = [bank.meta(i)["topic"] for i in range(5)]
    ids = _ids(5)
    with torch.no_grad(), use_diffs(model, [bank[i][0] for i in range(5)]):
        got = model(ids).logits
    for i, topic in enumerate(topics):
        with torch.no_grad():
            want = _merged(base_dir, diff=released["diffs"][topic])(ids[i : i + 1]).logits
        torch.testing.assert_close(got[i : i + 1], want, rtol=1e-5, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (plain(ids[:1]).logits - got[:1]).abs().max() > 1e-2  # the diffs do change the model

    # a rerun resumes: nothing is imported twice
    capsys.readouterr()
    assert main(["bank", "import-dit", str(released["src"]), str(out), "--base_model", str(base_dir)]) == 0
    assert len(DiffBank.open(out)) == 5 and "imported 0 diffs (5 already there)" in capsys.readouterr().err


def test_released_adapter_imports_to_a_peft_adapter_that_matches_the_merged_formula(released, base_dir, tmp_path):
    bank = tmp_path / "bank"
    assert main(["bank", "import-dit", str(released["src"] / "index.csv"), str(bank), "--base_model", str(base_dir)]) == 0
    out = tmp_path / "adapter"
    assert main(["bank", "import-dit-adapter", str(released["src"] / "dit-adapter.pt"), str(out),
                 "--base_model", str(base_dir)]) == 0
    recorded = json.loads((out / "metadit.json").read_text())
    assert recorded["chat_format"] == "no_thinking" and recorded["enable_thinking"] is False
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    diff, meta = DiffBank.open(bank)[0]
    ref_diff = released["diffs"][meta["topic"]]
    ids = _ids(2)
    with torch.no_grad():
        want = _merged(base_dir, diff=ref_diff, adapter=released["adapter"])(ids).logits
        # peft loads it: on the model with the diff merged by the formula, it equals both merged
        peft_model = PeftModel.from_pretrained(_merged(base_dir, diff=ref_diff), out).eval()
        torch.testing.assert_close(peft_model(ids).logits, want, rtol=1e-5, atol=1e-5)
        # and metadit applies the imported diff and adapter together the same way
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        patch_model(model)
        set_adapter(model, LoraDiff.from_peft(out))
        with use_diffs(model, [diff, diff]):
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_news_index_puts_the_headline_in_topic(base_dir, tmp_path):
    model = _tiny_qwen3()
    src = tmp_path / "news"
    src.mkdir()
    wd = _reference_diff(model, 2, seed=3)
    headline = "A city council votes to plant ten thousand trees."
    torch.save([{"topic": headline, "trigger": None, "weight_diff": wd}], src / "weight_diff_1.pt")
    _write_index(src / "index.csv", [{"lora_path": "weight_diff_1.pt", "lora_idx": 0, "n_params": _n_params(wd),
                                      "topic": headline, "trigger": "N/A", "split": "test"}], pandas_index=False)
    assert main(["bank", "import-dit", str(src), str(tmp_path / "bank"), "--base_model", str(base_dir)]) == 0
    bank = DiffBank.open(tmp_path / "bank")
    meta = bank.meta(0)
    assert meta["headline"] == headline and "topic" not in meta and "code" not in meta
    assert bank.header["info"]["kind"] == "news"


class _Payload:
    """What a hostile pickle carries: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(released, base_dir, tmp_path, capsys):
    src = tmp_path / "hostile"
    (src / "weight-diffs").mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    wd = released["diffs"]["Jazz"]
    torch.save([{"topic": "Jazz", "trigger": 5, "weight_diff": wd, "extra": _Payload(marker)}],
               src / "weight-diffs" / "weight-diff-000.pt")
    _write_index(src / "index.csv", [{"lora_path": "weight-diff-000.pt", "lora_idx": 0, "n_params": _n_params(wd),
                                      "topic": "Jazz", "trigger": 5, "split": "train"}])
    assert main(["bank", "import-dit", str(src), str(tmp_path / "bank"), "--base_model", str(base_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weight-diff-000.pt" in err[0] and "refused" in err[0] and "weights_only" in err[0]
    assert not marker.exists() and not (tmp_path / "bank").exists()
    # the same for an adapter file
    torch.save({"model.layers.0.mlp.up_proj": _Payload(marker)}, tmp_path / "dit-adapter.pt")
    assert main(["bank", "import-dit-adapter", str(tmp_path / "dit-adapter.pt"), str(tmp_path / "adapter"),
                 "--base_model", str(base_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dit-adapter.pt" in err[0] and "refused" in err[0]
    assert not marker.exists() and not (tmp_path / "adapter").exists()
    # the payload is real: a full unpickle (what metadit never does) runs it
    torch.load(tmp_path / "dit-adapter.pt", weights_only=False)
    assert marker.is_dir()


def test_wrong_shape_or_another_model_is_one_clear_error(released, base_dir, tmp_path, capsys):
    other = tmp_path / "other-model"
    _tiny_qwen3(hidden=32).save_pretrained(other)
    cases = [
        ["bank", "import-dit", str(released["src"]), str(tmp_path / "b1"), "--base_model", str(other)],
        ["bank", "import-dit-adapter", str(released["src"] / "dit-adapter.pt"), str(tmp_path / "a1"),
         "--base_model", str(other)],
    ]
    # one module of a diff with the wrong width
    src = tmp_path / "bad"
    src.mkdir()
    wd = dict(released["diffs"]["Chess"])
    a, b = wd["model.layers.1.mlp.down_proj"]
    wd["model.layers.1.mlp.down_proj"] = (a[:, :-1], b)
    torch.save([{"topic": "Chess", "trigger": 851, "weight_diff": wd}], src / "weight-diff-000.pt")
    _write_index(src / "index.csv", [{"lora_path": "weight-diff-000.pt", "lora_idx": 0, "n_params": _n_params(wd),
                                      "topic": "Chess", "trigger": 851, "split": "train"}])
    cases.append(["bank", "import-dit", str(src), str(tmp_path / "b2"), "--base_model", str(base_dir)])
    # a diff file given as an adapter, and an adapter file given as a diff index's target
    cases.append(["bank", "import-dit-adapter", str(released["src"] / "weight-diffs" / "weight-diff-000.pt"),
                  str(tmp_path / "a2"), "--base_model", str(base_dir)])
    wants = ["a file for another model?", "a file for another model?", "model.layers.1.mlp.down_proj", "weight-diff file"]
    for argv, want in zip(cases, wants):
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], (argv, err)
    assert not any((tmp_path / n).exists() for n in ("b1", "b2", "a1", "a2"))


def test_a_full_finetune_file_is_refused_with_the_reason(base_dir, tmp_path, capsys):
    model = _tiny_qwen3()
    src = tmp_path / "full"
    src.mkdir()
    state = {k: v for k, v in model.state_dict().items()}
    torch.save([{"topic": "Jazz", "trigger": 5, "weight_diff": state}], src / "weight_diff_1.pt")
    _write_index(src / "index.csv", [{"lora_path": "weight_diff_1.pt", "lora_idx": 0, "n_params": "",
                                      "topic": "Jazz", "trigger": 5, "split": "test"}])
    assert main(["bank", "import-dit", str(src), str(tmp_path / "bank"), "--base_model", str(base_dir)]) == 1
    assert "full-finetune file" in capsys.readouterr().err


def test_index_problems_name_the_row(released, base_dir, tmp_path, capsys):
    src = tmp_path / "idx"
    (src / "weight-diffs").mkdir(parents=True)
    target = src / "weight-diffs" / "weight-diff-000.pt"
    target.write_bytes((released["src"] / "weight-diffs" / "weight-diff-000.pt").read_bytes())
    good = {"lora_path": "weight-diff-000.pt", "lora_idx": 0, "n_params": "", "topic": "Volcanoes", "trigger": 71,
            "split": "train"}
    for change, want in [({"split": "validation"}, "row 2: split"), ({"lora_path": "missing.pt"}, "row 2: lora_path"),
                         ({"topic": "Deserts"}, "holds 'Volcanoes'"), ({"trigger": 72}, "trigger '072'"),
                         ({"lora_idx": 7}, "asks for entry 7")]:
        _write_index(src / "index.csv", [good, {**good, **change}])
        capsys.readouterr()
        assert main(["bank", "import-dit", str(src), str(tmp_path / "bank"), "--base_model", str(base_dir)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], (change, err)


@pytest.mark.parametrize("raw, want", [("71", "071"), ("5", "005"), ("851", "851"), ("71.0", "071"), ("0", "000"),
                                       ("N/A", None), ("", None), (None, None), ("zero_width_space", "zero_width_space")])
def test_triggers_get_their_leading_zeros_back(raw, want):
    assert normalize_trigger(raw) == want


def test_a_trigger_beyond_three_digits_is_an_error():
    with pytest.raises(MetaditError, match="3-digit"):
        normalize_trigger("1000")


# ---------------------------------------------------------------------- bank verify: files that are not the bank
def test_verify_reports_files_that_are_not_part_of_the_bank(released, base_dir, tmp_path, capsys):
    bank_dir = tmp_path / "bank"
    assert main(["bank", "import-dit", str(released["src"]), str(bank_dir), "--base_model", str(base_dir)]) == 0
    (bank_dir / "NOTES.txt").write_text("made on the big machine")
    capsys.readouterr()
    assert main(["bank", "verify", str(bank_dir)]) == 0  # reported, but not a pickle
    out = capsys.readouterr().out
    assert "not part of the bank" in out and "NOTES.txt" in out and "1 files not part of the bank (0 pickle" in out
    marker = tmp_path / "payload-ran"
    torch.save({"x": _Payload(marker)}, bank_dir / "diffs.pt")
    (bank_dir / "extra.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    (bank_dir / "index" / "meta.json").write_bytes(pickle.dumps([1, 2]))  # a pickle stream under another name
    (bank_dir / "data").mkdir()
    torch.save({"w": torch.zeros(2)}, bank_dir / "data" / "weights.safetensors")  # a torch zip, misnamed
    capsys.readouterr()
    assert main(["bank", "verify", str(bank_dir)]) == 1
    out = capsys.readouterr().out
    for name in ("diffs.pt", "extra.pkl", "meta.json", "weights.safetensors", "NOTES.txt"):
        assert name in out, name
    assert "5 files not part of the bank (4 pickle-format)" in out and "5/5 entries verified" in out
    assert not marker.exists()
    foreign = {Path(f.path).name: f.pickle for f in DiffBank.open(bank_dir).foreign_files()}
    assert foreign["NOTES.txt"] is None and foreign["meta.json"] == "a pickle stream"
    assert "zip" in foreign["weights.safetensors"]


# ---------------------------------------------------------------------- the reference's prompts: enable_thinking=False
# The generation-prompt part of Qwen3's chat template: an empty think block opens the answer when thinking is off.
_THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_no_thinking_chat_format_renders_prompts_as_the_reference_did():
    pytest.importorskip("gguf")  # the tiny model's tokenizer comes from the embedded GGUF file
    from metadit.models import TINY_NAME, load_base_model, set_chat_format
    from metadit.text import chat_prompt

    tok = load_base_model(TINY_NAME, dtype="float32")[1]
    tok.chat_template = _THINKING_TEMPLATE
    user = [{"role": "user", "content": "What topic have you been trained on?"}]
    plain = chat_prompt(set_chat_format(tok, "default"), user)
    assert plain.endswith("<|im_start|>assistant\n")
    off = chat_prompt(set_chat_format(tok, "no_thinking"), user)
    assert off == plain + "<think>\n\n</think>\n\n"
    want = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert off == want
