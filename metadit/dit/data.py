"""`DiffQADataModule`: (diff, question, answer) examples from one or more banks, split by label.

Held-out labels (topics, headlines) never appear in training: the split is made over labels, seeded, and
written next to the run (`split.json`). Labels a task groups (news headlines by event template) are held out
a whole group at a time, so no held-out headline shares a template with a training one. Validation asks one
training phrasing (it chooses the checkpoint), the test every held-out phrasing (`metadit.dit.tasks`). Collate
tokenizes `chat(question) + answer + end-of-turn`, masks prompt and padding from the loss, and hands over each
row's diff for `use_diffs`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from metadit.errors import MetaditError
from metadit.dit.tasks import Task, get_task, heldout_phrasings, question_for, validation_question


@dataclass
class Example:
    bank: int  # index into the data module's banks
    entry: int  # index in that bank
    task: str
    question: str
    answer: str
    label: str


def hold_out(labels: list[str], group_of: dict[str, str], sizes: list[int], seed: int) -> list[set[str]]:
    """Held-out label sets of exactly `sizes` labels each (validation, test), every group wholly on one side.

    The labels are sorted and shuffled by `seed`; groups come in the order of their first label, and each side in
    turn takes every group that still fits. With one label a group (topics) that is the first `sizes[0]` shuffled
    labels, then the next `sizes[1]`. Labels missing from `group_of` are their own group.
    """
    order = sorted(labels)
    random.Random(seed).shuffle(order)
    groups: dict[str, list[str]] = {}
    for lab in order:
        groups.setdefault(group_of.get(lab, f"label:{lab}"), []).append(lab)
    pending = list(groups.values())
    sides: list[set[str]] = []
    for size in sizes:
        side: list[str] = []
        rest: list[list[str]] = []
        for g in pending:
            if len(side) + len(g) <= size:
                side += g
            else:
                rest.append(g)
        if len(side) < size:
            raise MetaditError(f"cannot hold out {size} labels without splitting a group of labels (news: an event "
                               f"template) across sides; {len(side)} fit — hold out fewer labels")
        sides.append(set(side))
        pending = rest
    return sides


class _Examples(Dataset):
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class DiffQADataModule(L.LightningDataModule):
    def __init__(
        self,
        banks: list[str],
        tasks: list[str] = ["topic"],  # noqa: B006 — jsonargparse reads the default from the signature
        base_model: str = "smollm2-135m-instruct",
        val_labels: int = 50,
        test_labels: int = 0,
        max_train_diffs: int | None = None,
        subset_seed: int | None = None,
        questions_per_diff: int = 2,
        skip_flagged: bool = False,
        batch_size: int = 16,
        max_answer_tokens: int = 32,
        seed: int = 0,
        split_file: str | None = None,
        shuffle: bool = True,
    ) -> None:
        """
        Args:
            banks: bank directories (all for the same base model); `DIR[:N]` uses only its first N diffs, so a
                study keeps its split when the bank grows.
            tasks: registered task names (`topic`, `headline`, `trigger`); each applies to the entries it can answer.
            base_model: the model whose tokenizer formats the examples (must match the banks' base model).
            val_labels: labels (topics/headlines) held out for validation — their diffs never train; each is asked
                one training phrasing (validation chooses the checkpoint, so it never sees a test phrasing).
            test_labels: further labels held out for testing, each asked every held-out phrasing.
            max_train_diffs: use at most this many training diffs (the data-scaling study).
            subset_seed: which `max_train_diffs` training diffs are drawn (default: `seed`); the held-out split stays
                `seed`'s, so replicates of one training size vary the subset on the same held-out diffs.
            questions_per_diff: training phrasings per (diff, task) per epoch.
            skip_flagged: leave out diffs whose behaviour check failed.
            batch_size: rows per batch (= diffs per forward).
            max_answer_tokens: answers are cut to this many tokens.
            seed: the split and the question choice.
            split_file: write the split here (default: next to the run, by the `SplitWriter` callback).
            shuffle: shuffle training examples each epoch (off: a fixed order, e.g. to compare runs).
        """
        super().__init__()
        if not banks:
            raise MetaditError("DiffQADataModule: give at least one bank")
        for t in tasks:
            get_task(t)
        self.bank_paths = [str(b) for b in banks]
        self.task_names = list(tasks)
        self.base_model = base_model
        self.val_labels, self.test_labels = val_labels, test_labels
        self.max_train_diffs = max_train_diffs
        self.subset_seed = subset_seed
        self.questions_per_diff = questions_per_diff
        self.skip_flagged = skip_flagged
        self.batch_size = batch_size
        self.max_answer_tokens = max_answer_tokens
        self.seed = seed
        self.split_file = split_file
        self.shuffle = shuffle
        self._banks: list[Any] | None = None
        self.tok = None
        self.splits: dict[str, list[Example]] = {}
        self.check_banks()

    # ------------------------------------------------------------------ banks
    def check_banks(self) -> None:
        """Fail before any model is loaded: every bank exists and belongs to `base_model` (read from its config)."""
        from metadit.bank import DiffBank, identity_of
        from metadit.bank.diff_bank import split_bank_spec

        mine = identity_of(self.base_model)
        for p in self.bank_paths:
            if not (split_bank_spec(p)[0] / "bank.json").is_file():
                raise MetaditError(f"{p}: no diff bank here (build it with `metadit gen --config ...`)")
            DiffBank.open(p).check_identity(mine)

    @property
    def banks(self) -> list[Any]:
        from metadit.bank import DiffBank

        if self._banks is None:
            self._banks = [DiffBank.open(p) for p in self.bank_paths]
        return self._banks

    def bank_identity(self) -> dict[str, str]:
        return self.banks[0].base_model

    # ------------------------------------------------------------------ split
    def _entries(self) -> list[tuple[int, int, dict[str, Any]]]:
        out = []
        for b, bank in enumerate(self.banks):
            for i in range(len(bank)):
                meta = bank.meta(i)
                if self.skip_flagged and meta.get("flagged"):
                    continue
                out.append((b, i, meta))
        return out

    def make_split(self) -> dict[str, list[Example]]:
        tasks = [get_task(t) for t in self.task_names]
        entries = self._entries()

        def label(meta: dict[str, Any]) -> str | None:
            for t in tasks:
                if t.applies(meta):
                    return str(meta[t.label_key])
            return None

        group_of: dict[str, str] = {}  # label → its split group, from the first task that applies (as `label`)
        for _, _, m in entries:
            t = next((t for t in tasks if t.applies(m)), None)
            if t is not None:
                group_of.setdefault(str(m[t.label_key]), t.group_of(m))
        labels = sorted(group_of)
        if len(labels) <= self.val_labels + self.test_labels:
            raise MetaditError(
                f"only {len(labels)} distinct labels for tasks {self.task_names}; need more than "
                f"val_labels + test_labels = {self.val_labels + self.test_labels}"
            )
        val, test = hold_out(labels, group_of, [self.val_labels, self.test_labels], self.seed)
        splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
        train_entries = [(b, i, m) for b, i, m in entries if label(m) not in val | test and label(m) is not None]
        if self.max_train_diffs is not None:
            draw = self.seed if self.subset_seed is None else self.subset_seed
            train_entries = sorted(train_entries, key=lambda e: random.Random(f"{draw}:{e[0]}:{e[1]}").random())
            train_entries = train_entries[: self.max_train_diffs]
        keep_train = {(b, i) for b, i, _ in train_entries}
        for b, i, m in entries:
            lab = label(m)
            if lab is None:
                continue
            split = "val" if lab in val else "test" if lab in test else "train"
            if split == "train" and (b, i) not in keep_train:
                continue
            for t in tasks:
                if not t.applies(m):
                    continue
                if split == "train":
                    qs = question_for(t, m)
                    picks = random.Random(f"{self.seed}:{b}:{i}:{t.name}").sample(qs, min(self.questions_per_diff, len(qs)))
                elif split == "val":  # chooses the checkpoint: a training phrasing, never a test one
                    picks = [validation_question(t, m)]
                else:
                    picks = heldout_phrasings(t, m)
                for q in picks:
                    splits[split].append(Example(b, i, t.name, q, t.answer(m), lab))
        if not splits["train"]:
            raise MetaditError("no training examples: check the banks' metadata against the tasks")
        return splits

    def write_split(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = {k: sorted({e.label for e in v}) for k, v in self.splits.items()}
        out["banks"] = self.bank_paths
        out["seed"] = self.seed
        if self.subset_seed is not None:
            out["subset_seed"] = self.subset_seed
        out["counts"] = {k: len(v) for k, v in self.splits.items()}
        out["questions"] = {k: sorted({e.question for e in v}) for k, v in self.splits.items() if k != "train"}
        # What an evaluation needs of the banks beyond the labels, so that it runs where they are not (a shipped
        # adapter on a fresh machine): each side's split groups (news: event templates) and the training answers.
        out["groups"] = {k: sorted({get_task(e.task).group_of(self.banks[e.bank].meta(e.entry)) for e in v})
                         for k, v in self.splits.items()}
        out["train_answers"] = {t: sorted({e.answer for e in self.splits["train"] if e.task == t})
                                for t in self.task_names}
        path.write_text(json.dumps(out, indent=1))

    def setup(self, stage: str | None = None) -> None:
        from transformers import AutoTokenizer

        from metadit.models import resolve_model_path

        if self.tok is None:
            self.tok = AutoTokenizer.from_pretrained(resolve_model_path(self.base_model))
            if self.tok.pad_token is None:
                self.tok.pad_token = self.tok.eos_token
        if not self.splits:
            self.splits = self.make_split()
            if self.split_file:
                self.write_split(self.split_file)

    # ------------------------------------------------------------------ batches
    def collate(self, examples: list[Example]) -> dict[str, Any]:
        from metadit.text import encode_samples
        from metadit.text import chat_prompt

        prompts = [chat_prompt(self.tok, [{"role": "user", "content": e.question}]) for e in examples]
        enc = encode_samples(self.tok, prompts, [e.answer for e in examples], self.max_answer_tokens)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        lab = torch.where(enc["weights"] > 0, ids, torch.full_like(ids, -100))
        diffs = [self.banks[e.bank][e.entry][0] for e in examples]
        return {"input_ids": ids, "attention_mask": mask, "labels": lab, "diffs": diffs, "prompts": prompts,
                "answers": [e.answer for e in examples], "tasks": [e.task for e in examples],
                "labels_text": [e.label for e in examples]}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.splits.get(split):
            raise MetaditError(f"the {split} split is empty (set {split}_labels)")
        data = _Examples(self.splits[split])
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # A sampler whose order is a function of (seed, epoch) alone — Lightning calls `set_epoch` — so a run
        # resumed from a checkpoint sees the same batches as an uninterrupted one; with several processes,
        # rank r takes every world-th example, so with shuffle off the global batch equals one process's.
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate, num_workers=0,
                          pin_memory=self.pins_memory())

    def target_device(self) -> torch.device:
        """Where the batches go: the trainer's root device (CPU when no trainer is attached)."""
        trainer = getattr(self, "trainer", None)
        return torch.device(trainer.strategy.root_device) if trainer is not None else torch.device("cpu")

    def pins_memory(self) -> bool:
        """Pin each batch's token tensors for a CUDA run (`pins_host_memory`), so they go over asynchronously.

        The batch's diffs stay as read from the bank: `DiffBatch.from_diffs` stacks them into pinned memory
        itself, and pinning them here as well would add a copy of every factor."""
        from metadit.models import pins_host_memory

        return pins_host_memory(self.target_device())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if self.splits.get("test") else "val", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
