"""The callbacks that write a DIT run's files (`metadit.dit.callbacks`), and the base model `DITModule` is given.

One tiny `metadit fit` and one `metadit test` from its best checkpoint, as a user runs them; each file is checked
against what it must hold: the split against the bank's labels, the exported adapter against the best checkpoint,
the test's loss against peft's on the same held-out examples, and `metadit eval`'s answers (which `metadit test` no
longer writes) against peft answering the same questions under the same diffs.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from peft import PeftModel

from metadit.bank import DiffBank, LoraDiff
from metadit.cli import main
from metadit.dit import DITModule, DiffQADataModule, PatchedBaseModel
from metadit.dit.callbacks import AdapterExport, SplitWriter, default_callbacks
from metadit.errors import MetaditError
from metadit.lightning_cli import lightning_main
from metadit.models import TINY_NAME, load_base_model
from metadit.nn import diff_layers

ROOT = Path(__file__).resolve().parents[1]
FIT = ROOT / "configs" / "fit" / "tiny_topic.yaml"
QUIET = ["--trainer.enable_progress_bar", "false"]


def _rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "metrics.csv")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_topic_bank) -> dict[str, Path]:
    """`metadit fit` (2 epochs; lr high enough that the adapter's answers are not empty; a second checkpoint callback
    keeps every epoch's weights), then `metadit test` from the best checkpoint in fp32 (so peft in fp32 is the exact
    reference for its loss)."""
    d = tmp_path_factory.mktemp("callbacks")
    every_epoch = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                   "init_args": {"filename": "every-{epoch}", "save_top_k": -1}}
    assert main(["fit", "--config", str(FIT), "--data.banks", f'["{tiny_topic_bank}"]', "--model.lr", "0.02",
                 "--model.dtype", "float32", f"--trainer.callbacks+={json.dumps(every_epoch)}",
                 "--trainer.default_root_dir", str(d / "fit"), *QUIET]) == 0
    fit = d / "fit" / "lightning_logs" / "version_0"
    best = json.loads((fit / "adapter" / "metadit_best.json").read_text())["checkpoint"]
    assert main(["test", "--config", str(fit / "config.yaml"), "--ckpt_path", best, "--trainer.precision", "32",
                 "--trainer.default_root_dir", str(d / "test"), *QUIET]) == 0
    return {"fit": fit, "test": d / "test" / "lightning_logs" / "version_0", "bank": Path(tiny_topic_bank)}


def test_split_writer_writes_the_label_split_at_every_stage(runs):
    split = json.loads((runs["fit"] / "split.json").read_text())
    bank = DiffBank.open(runs["bank"])
    topics = [bank.meta(i)["topic"] for i in range(len(bank))]
    train, val, test = set(split["train"]), set(split["val"]), set(split["test"])
    assert len(val) == 2 and len(test) == 2  # tiny_topic.yaml: val_labels 2, test_labels 2
    assert train | val | test == set(topics) and not (train & val or train & test or val & test)
    # questions_per_diff (2) per training diff, one per validation diff (a training phrasing), and one per test diff
    # and held-out phrasing (the test asks every one)
    from metadit.dit.tasks import get_task

    phrasings = len(get_task("topic").heldout_questions)
    assert split["counts"] == {"train": 2 * sum(t in train for t in topics), "val": sum(t in val for t in topics),
                               "test": phrasings * sum(t in test for t in topics)}
    assert split["banks"] == [str(runs["bank"])] and split["seed"] == 0
    assert json.loads((runs["test"] / "split.json").read_text()) == split  # the test run records the same split


def test_adapter_export_saves_the_best_checkpoints_adapter(runs):
    adapter = runs["fit"] / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "metadit.json",
                                                   "metadit_best.json", "split.json"}
    # the folder ships alone: it carries the split its run trained on, byte for byte
    assert (adapter / "split.json").read_bytes() == (runs["fit"] / "split.json").read_bytes()
    assert json.loads((adapter / "metadit.json").read_text()) == {"chat_format": "default"}
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == TINY_NAME
    val = {int(r["epoch"]): float(r["val/loss"]) for r in _rows(runs["fit"]) if r.get("val/loss")}
    best_epoch = min(val, key=val.get)
    record = json.loads((adapter / "metadit_best.json").read_text())
    assert record["checkpoint"] == str(runs["fit"] / "checkpoints" / f"best-epoch={best_epoch}.ckpt")
    assert record["best_val_loss"] == pytest.approx(val[best_epoch])

    saved = LoraDiff.from_peft(adapter)

    def matches(ckpt: Path) -> bool:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        return all(torch.equal(saved.A[n], state[f"model.{n}.adapter_A"].float()) and
                   torch.equal(saved.B[n], state[f"model.{n}.adapter_B"].float()) for n in saved.modules)

    assert len(saved.modules) == 14 and matches(Path(record["checkpoint"]))
    if best_epoch != max(val):  # the final weights moved on: the export is the best epoch's, not the last
        assert not matches(runs["fit"] / "checkpoints" / f"every-epoch={max(val)}.ckpt")


def _peft_model(base, diff, adapter_dir: Path | None):
    """The reference: the diff merged into the weights, the saved adapter loaded by peft on top (or not)."""
    model = copy.deepcopy(base)
    if diff is not None:
        with torch.no_grad():
            for n in diff.modules:
                model.get_submodule(n).weight += diff.delta(n)
    return PeftModel.from_pretrained(model, adapter_dir).eval() if adapter_dir is not None else model


def _peft_answer(base, diff, adapter_dir: Path | None, tok, prompt: str, max_new_tokens: int) -> str:
    model = _peft_model(base, diff, adapter_dir)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_test_reports_the_held_out_loss_and_writes_no_answers(runs):
    """`metadit test` reports losses only: `test/loss` is the mean over the held-out examples of each one's mean
    answer-token cross-entropy, computed here with peft (the diff merged, the exported adapter on top)."""
    assert not (runs["test"] / "test_predictions.json").exists() and not (runs["test"] / "rows.jsonl").exists()
    (logged,) = [r for r in _rows(runs["test"]) if r.get("test/loss")]
    assert [k for k, v in logged.items() if k.startswith("test/") and v] == ["test/loss"]  # no answer scores
    base, _ = load_base_model(TINY_NAME, dtype=torch.float32)
    dm = DiffQADataModule([str(runs["bank"])], tasks=["topic"], base_model=TINY_NAME, val_labels=2, test_labels=2,
                          max_answer_tokens=8)
    dm.setup("test")
    losses = []
    for batch in dm.test_dataloader():
        for i, diff in enumerate(batch["diffs"]):
            model = _peft_model(base, diff, runs["fit"] / "adapter")
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1]).logits
            target = batch["labels"][i, 1:]
            keep = target != -100
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1][keep].float(), target[keep]).item())
    split = json.loads((runs["fit"] / "split.json").read_text())
    assert len(losses) == split["counts"]["test"] > 0
    assert float(logged["test/loss"]) == pytest.approx(sum(losses) / len(losses), rel=1e-4)


# What `metadit test` answered before, `metadit eval` answers now: DIT and its two controls on the same held-out
# diffs — (diff applied, adapter on) per method.
CONDITIONS = {"dit": (True, True), "base_question": (True, False), "no_diff": (False, True)}


def test_eval_answers_the_held_out_diffs_as_peft_does(runs):
    """Each of DIT's controls is what it says: peft with the diff merged and/or the exported adapter answers the same
    held-out questions the same way (the answers `metadit test` used to write, now `metadit eval`'s methods)."""
    from metadit.eval.baselines import METHODS, Evaluator, MethodContext
    from metadit.eval.heldout import load_heldout, per_phrasing

    split = json.loads((runs["fit"] / "split.json").read_text())
    items = per_phrasing(load_heldout([str(runs["bank"])], set(split["test"]), ["topic"]))
    assert len({h.id for h in items}) == 2 and len(items) > 2  # every held-out phrasing of both test diffs
    adapter = runs["fit"] / "adapter"
    ev = Evaluator(TINY_NAME, str(adapter), dtype="float32", max_new_tokens=6)
    base, tok = load_base_model(TINY_NAME, dtype=torch.float32)
    answers = {}
    for name, (with_diff, with_adapter) in CONDITIONS.items():
        answers[name] = [p for p, _ in METHODS[name].predict(MethodContext(ev, None), items)]
        for h, got in zip(items, answers[name]):
            want = _peft_answer(base, h.diff if with_diff else None, adapter if with_adapter else None, tok,
                                ev.chat(h.question()), max_new_tokens=6)
            assert got == want, (name, h.id, h.question())
    every = [a for texts in answers.values() for a in texts]
    assert any(every) and not all(every)  # the conditions differ


def _callback_types(trainer: L.Trainer) -> list[type]:
    return [type(c) for c in trainer.callbacks if isinstance(c, (SplitWriter, AdapterExport))]


def test_the_cli_adds_each_default_callback_once(tiny_topic_bank, tmp_path):
    common = ["--config", str(FIT), "--data.banks", f'["{tiny_topic_bank}"]', "--trainer.fast_dev_run", "1",
              "--data.test_labels", "0", "--trainer.default_root_dir", str(tmp_path)]
    cli = lightning_main("fit", common)
    assert _callback_types(cli.trainer) == [SplitWriter, AdapterExport]
    cli = lightning_main("fit", [*common, "--trainer.callbacks", "[]"])  # a config without callbacks still gets them
    assert _callback_types(cli.trainer) == [SplitWriter, AdapterExport]
    cli = lightning_main("fit", [*common, "--trainer.callbacks+=metadit.dit.callbacks.AdapterExport"])
    assert sorted(t.__name__ for t in _callback_types(cli.trainer)) == ["AdapterExport", "SplitWriter"]


def test_a_trainer_without_the_callbacks_writes_no_run_files(tiny_topic_bank, tmp_path):
    """The module writes nothing itself: the same fit with and without `default_callbacks()`."""
    def fit(root: Path, callbacks: list) -> Path:
        module = DITModule(base_model=TINY_NAME, adapter_rank=2, generate_in_validation=False, similarity=False)
        data = DiffQADataModule([str(tiny_topic_bank)], base_model=TINY_NAME, val_labels=2, batch_size=4)
        trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=1, num_sanity_val_steps=0,
                            default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
                            callbacks=callbacks)
        trainer.fit(module, data)
        return Path(trainer.log_dir)

    bare = fit(tmp_path / "bare", [])
    assert not (bare / "split.json").exists() and not (bare / "adapter").exists()
    full = fit(tmp_path / "full", default_callbacks())
    assert (full / "split.json").is_file() and (full / "adapter" / "adapter_config.json").is_file()


def test_an_injected_base_sets_the_modules_base_model_keys(tiny_topic_bank, tmp_path):
    base = PatchedBaseModel(TINY_NAME, dtype="float32", adapter_rank=2, seed=3)
    module = DITModule(base=base)
    assert module.base is base and module.model is None  # nothing loaded until configure_model
    assert {k: module.hparams[k] for k in ("base_model", "dtype", "adapter_rank", "seed")} == \
        {"base_model": TINY_NAME, "dtype": "float32", "adapter_rank": 2, "seed": 3}
    module.configure_model()
    layers = diff_layers(module.model)
    assert layers and all(l.adapter_A.shape[0] == 2 and l.base.weight.dtype == torch.float32 for l in layers.values())
    again, _ = base.load()  # the same seed initialises the same adapter
    assert all(torch.equal(l.adapter_A, diff_layers(again)[n].adapter_A) for n, l in layers.items())
    assert DITModule(adapter_rank=2, base=base).hparams.adapter_rank == 2  # a key that agrees is fine
    with pytest.raises(MetaditError, match="model.adapter_rank is 8 but the injected base has adapter_rank=2"):
        DITModule(adapter_rank=8, base=base)
    # and from the command line: `model.base` as a class with its init args; tiny_topic.yaml's adapter_rank is 4
    args = ["--config", str(FIT), "--data.banks", f'["{tiny_topic_bank}"]', "--trainer.fast_dev_run", "1",
            "--data.test_labels", "0", "--trainer.default_root_dir", str(tmp_path), "--model.base.name", TINY_NAME]
    cli = lightning_main("fit", [*args, "--model.base.adapter_rank", "4", "--model.base.seed", "5"])
    assert isinstance(cli.model.base, PatchedBaseModel) and cli.model.hparams.seed == 5
    assert cli.model.hparams.chat_format == "default"  # still linked from data.banks
    with pytest.raises((SystemExit, MetaditError)):
        lightning_main("fit", [*args, "--model.base.adapter_rank", "2"])
