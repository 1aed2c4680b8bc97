"""`metadit fit|validate|test|predict`: LightningCLI over `DITModule` and `DiffQADataModule`.

`--config configs/fit/FILE.yaml`, `--print_config`, `--trainer.*`, `class_path`/`init_args` as usual.
`model.base_model` is linked to `data.base_model` (the tokenizer must be the model's), and `model.chat_format` is
computed from `data.banks` (a DIT adapter asks in the chat format its banks' diffs were made with).
Every run gets the callbacks that write its files (`metadit.dit.callbacks.default_callbacks`: `split.json`,
`adapter/`), whatever `trainer.callbacks` says; one the config lists itself is not added twice. `metadit test` reports
the held-out diffs' loss (`test/loss`, in the logger's metrics); answering them is `metadit eval`'s.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from metadit.dit import DiffQADataModule, DITModule
from metadit.dit.callbacks import default_callbacks


def data_chat_format(banks: Sequence[str]) -> str:
    """`model.chat_format` from `data.banks`. Never fails the parse: banks that are missing, unreadable or of mixed
    formats give `default`, and the data module or `DITModule.setup` then reports them."""
    from metadit.bank.diff_bank import banks_chat_format
    from metadit.errors import MetaditError

    try:
        return banks_chat_format(list(banks or []), skip_missing=True)
    except MetaditError:
        return "default"


class DITCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.base_model", "data.base_model")
        parser.link_arguments("data.banks", "model.chat_format", compute_fn=data_chat_format)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer with `default_callbacks()` after the configured ones, less any whose class (or a subclass) is configured."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        listed = config["trainer"].get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        added = [cb for cb in default_callbacks() if not any(isinstance(c, type(cb)) for c in listed)]
        return super().instantiate_trainer(**{"callbacks": [*listed, *added], **kwargs})


def lightning_main(subcommand: str, argv: Sequence[str]) -> DITCLI:
    with warnings.catch_warnings():
        # `metadit fit ...` hands its own argv over as `args`; LightningCLI warns whenever sys.argv is not empty too.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = _cli(subcommand, argv)
    return cli


def _cli(subcommand: str, argv: Sequence[str]) -> DITCLI:
    return DITCLI(
        DITModule,
        DiffQADataModule,
        args=[subcommand, *argv],
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # DITModule takes `optimizer` / `lr_scheduler` itself (over its trainable parameters)
        seed_everything_default=0,
        trainer_defaults={"accelerator": "cpu"},
        parser_kwargs={"prog": f"metadit {subcommand}"},
    )
