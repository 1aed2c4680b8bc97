"""Import the paper's released diffs and DIT adapters into metadit's formats (a bank; a peft adapter directory).

The reference code (Goel et al. 2025, repository Aviously/diff-interpretation-tuning) releases, per experiment
and model (`hidden-topic/qwen3-8b/`, `news-summary/qwen3-4b/`, ...):

    index.csv                  lora_path, lora_idx, n_params, topic, trigger, split (one row per diff)
    weight-diffs/*.pt          each a pickled list of {"topic", "trigger", "weight_diff": {module: (A, B)}}
    dit-adapter*.pt            a pickled dict {module: (A, B)}: the DIT adapter

Module names are the causal LM's own (`model.layers.0.self_attn.q_proj`). Factor conventions (its
`multi_task_lora.py`, `multi_lora.py`):

- a diff's `A` is `[r, out]`, `B` is `[in, r]`, and `ΔW = (B A)ᵀ / r`: in peft's convention `A = Bᵀ`, `B = Aᵀ`,
  scale `1/r`;
- the adapter's `A` is `[out, r]`, `B` is `[r, in]`, and `ΔW = A B / r`: `A = B`, `B = A`, scale `1/r`.

Quirks of the released files, all handled here: `lora_path` is relative to the index's folder or to its
`weight-diffs/` (the internal indexes name absolute paths); triggers are integers that lost their leading zeros
(71 means the SEP code prefix "071"), or a word for the zero-width-space variants, or empty / `N/A` for news;
`split` is `train`, `test` or `extra`; news indexes put the headline in `topic`; a leading unnamed column is a
pandas index. The diffs and adapters were trained on prompts rendered with Qwen3's `enable_thinking=False`: the
bank and the adapter record chat format `no_thinking`, which renders prompts the same way.

These files are pickles. They are read with torch's restricted loader only (`torch.load(weights_only=True)`,
which builds tensors and plain containers and cannot run code); whatever it rejects is refused, naming the
file. There is no fallback to a full unpickle. What comes out is safetensors.
"""

from __future__ import annotations

import csv
import hashlib
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metadit.diff.lora_diff import LoraDiff
from metadit.errors import MetaditError

SOURCE = "diff-interpretation-tuning"  # recorded in what we import: where it came from
REFERENCE_CHAT_FORMAT = "no_thinking"  # the reference rendered every prompt with enable_thinking=False
SPLITS = ("train", "test", "extra")
_REQUIRED_COLUMNS = ("lora_path", "lora_idx", "topic", "split")
_NO_TRIGGER = {"", "n/a", "na", "nan", "none", "null"}
_INTEGER = re.compile(r"^\d+(?:\.0*)?$")  # 71, or 71.0 where pandas wrote a column with gaps as floats
_ROWS_PER_SHARD = 64
# Released files that name modules under another prefix than the model metadit loads (Gemma 3's multimodal
# checkpoint, written by an older transformers): tried in order, the first that maps every name is used.
MODULE_PREFIX_REWRITES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "model.language_model."),
    ("language_model.model.", "model."),
)


# ---------------------------------------------------------------------- reading the pickles
def load_reference_file(path: str | Path) -> Any:
    """A released `.pt` file's content, read with torch's restricted loader (`weights_only=True`) only.

    Anything the restricted loader rejects (a pickle that would import or call something) is refused with one
    line naming the file; nothing in it runs. Zip-format files are memory-mapped, so a large file is not read
    into memory before its content is checked.
    """
    path = Path(path)
    if not path.is_file():
        raise MetaditError(f"{path}: no such file")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise MetaditError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MetaditError(
            f"{path}: refused: torch's restricted loader (weights_only=True) rejects it ({first[:300]}); "
            "metadit never unpickles a file fully"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError,
            zipfile.BadZipFile) as e:
        raise MetaditError(f"{path}: not a readable torch file ({type(e).__name__}: {str(e)[:300]})") from e


def _factor_pair(value: Any, where: str, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        raise MetaditError(
            f"{where}: module {module} holds one tensor {tuple(value.shape)}, not (A, B) LoRA factors: a full-finetune "
            "file (the reference stores the tuned weights themselves there, not a diff); not supported"
        )
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(t, torch.Tensor) for t in value)):
        raise MetaditError(f"{where}: module {module} holds a {type(value).__name__}, expected a pair of tensors (A, B)")
    a, b = value
    if a.dim() != 2 or b.dim() != 2 or not a.is_floating_point() or not b.is_floating_point():
        raise MetaditError(f"{where}: module {module}: A{tuple(a.shape)} {a.dtype} and B{tuple(b.shape)} {b.dtype} "
                           "are not 2-D floating-point factors")
    return a, b


def _factors(mapping: Any, where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if not isinstance(mapping, dict) or not mapping:
        raise MetaditError(f"{where}: expected a non-empty dict module name -> (A, B), got a {type(mapping).__name__}")
    out = {}
    for name, value in mapping.items():
        if not isinstance(name, str):
            raise MetaditError(f"{where}: module names must be strings, got {type(name).__name__}")
        out[name] = _factor_pair(value, where, name)
    return out


def diff_from_reference(weight_diff: Any, where: str) -> LoraDiff:
    """One released diff (`{module: (A [r, out], B [in, r])}`, ΔW = (B A)ᵀ / r) as a `LoraDiff`."""
    A, B, scale = {}, {}, {}
    for name, (a, b) in _factors(weight_diff, where).items():
        if a.shape[0] != b.shape[1]:
            raise MetaditError(f"{where}: module {name}: A{tuple(a.shape)} B{tuple(b.shape)} are not a diff's factors "
                               "(the reference's diffs have A: [r, out], B: [in, r])")
        A[name] = b.detach().t().contiguous().clone()  # clone: own the memory (the file may be memory-mapped)
        B[name] = a.detach().t().contiguous().clone()
        scale[name] = 1.0 / a.shape[0]
    diff = LoraDiff(A, B, scale, {"source": where})
    diff.check_finite(where)
    return diff


def adapter_from_reference(params: Any, where: str) -> LoraDiff:
    """A released DIT adapter (`{module: (A [out, r], B [r, in])}`, ΔW = A B / r) as a `LoraDiff`."""
    if isinstance(params, list):
        raise MetaditError(f"{where}: holds a list (a weight-diff file?); a DIT adapter file holds a dict module -> (A, B)")
    A, B, scale = {}, {}, {}
    for name, (a, b) in _factors(params, where).items():
        if a.shape[1] != b.shape[0]:
            raise MetaditError(f"{where}: module {name}: A{tuple(a.shape)} B{tuple(b.shape)} are not an adapter's "
                               "factors (the reference's DIT adapter has A: [out, r], B: [r, in])")
        A[name] = b.detach().contiguous().clone()
        B[name] = a.detach().contiguous().clone()
        scale[name] = 1.0 / a.shape[1]
    adapter = LoraDiff(A, B, scale, {"source": where})
    adapter.check_finite(where)
    return adapter


# ---------------------------------------------------------------------- checking against the base model
@dataclass
class BaseShapes:
    """The base model's Linear shapes (`{name: [out, in]}`, from its config alone) and its name."""

    name: str
    shapes: dict[str, list[int]]

    @classmethod
    def of(cls, base_model: str, config: Any = None) -> "BaseShapes":
        from metadit.bank.fingerprint import config_linear_shapes
        from metadit.models import load_config

        if config is None:
            try:
                config = load_config(base_model)
            except (OSError, ValueError) as e:
                raise MetaditError(f"cannot read the config of base model {base_model!r}: {e}") from e
        return cls(base_model, config_linear_shapes(config))

    def rename(self, names: list[str], where: str) -> Callable[[str], str]:
        """How the file's module names map onto this model's (identity, or a `MODULE_PREFIX_REWRITES` rule)."""
        if all(n in self.shapes for n in names):
            return lambda n: n
        for old, new in MODULE_PREFIX_REWRITES:
            if all(n.startswith(old) and new + n[len(old):] in self.shapes for n in names):
                return lambda n, old=old, new=new: new + n[len(old):]
        missing = next(n for n in names if n not in self.shapes)
        example = next(iter(self.shapes), "?")
        raise MetaditError(f"{where}: module {missing} is not a Linear of base model {self.name!r} (whose names look "
                           f"like {example}): a file for another model?")

    def fit(self, diff: LoraDiff, where: str) -> LoraDiff:
        """The diff with its modules named as in the base model, every factor checked against its Linear."""
        rename = self.rename(diff.modules, where)
        A, B, scale = {}, {}, {}
        for n in diff.modules:
            target = rename(n)
            out_f, in_f = self.shapes[target]
            a, b = diff.A[n], diff.B[n]
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise MetaditError(
                    f"{where}: module {n}: its factors give a ΔW of [{b.shape[0]}, {a.shape[1]}] but base model "
                    f"{self.name!r} has Linear [{out_f}, {in_f}] there: a file for another model?"
                )
            if a.shape[0] > min(in_f, out_f):
                raise MetaditError(f"{where}: module {n}: rank {a.shape[0]} exceeds the layer size")
            A[target], B[target], scale[target] = a, b, diff.scale[n]
        return LoraDiff(A, B, scale, dict(diff.info))


# ---------------------------------------------------------------------- the index
@dataclass
class IndexRow:
    """One row of a released `index.csv`, its diff file resolved."""

    number: int  # 1-based data row number in the CSV (for messages)
    lora_path: str  # as written in the index
    file: Path  # where it was found
    lora_idx: int
    label: str  # the `topic` column: the topic, or a news index's headline
    trigger: str | None  # normalized: "071" for integers, a word as is, None for none
    split: str
    n_params: int | None

    @property
    def key(self) -> str:
        """What identifies the diff in the bank (a rerun skips the rows already imported)."""
        return f"{SOURCE}:{self.lora_path}:{self.lora_idx}"


def normalize_trigger(raw: str | None) -> str | None:
    """The index's trigger as metadit records it: integers get back their leading zeros (71 -> "071": the
    3-digit SEP code prefix), words (the zero-width-space variants) stay as they are, blanks and `N/A` are None."""
    text = (raw or "").strip()
    if text.lower() in _NO_TRIGGER:
        return None
    if _INTEGER.match(text):
        value = int(float(text))
        if value >= 1000:
            raise MetaditError(f"trigger {text!r} is not a 3-digit SEP code prefix (0..999)")
        return f"{value:03d}"
    return text


def _resolve(index_dir: Path, lora_path: str) -> Path:
    """`lora_path` relative to the index's folder or to its `weight-diffs/` (or, in the internal indexes, absolute)."""
    candidates = [index_dir / lora_path, index_dir / "weight-diffs" / lora_path]
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise MetaditError(f"lora_path {lora_path!r}: no such file (tried {tried})")


def read_index(index_csv: str | Path) -> list[IndexRow]:
    """Every row of a released `index.csv`, validated and with its diff file found; errors name the row."""
    index_csv = Path(index_csv)
    try:
        with open(index_csv, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [h for h in (reader.fieldnames or []) if h]  # a leading "" column: pandas' index
            missing = [c for c in _REQUIRED_COLUMNS if c not in header]
            if missing:
                raise MetaditError(f"{index_csv}: not a released index (missing columns {missing}; has {header})")
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MetaditError(f"{index_csv}: cannot read ({e})") from e
    rows = []
    for number, rec in enumerate(records, start=1):
        where = f"{index_csv} row {number}"
        try:
            lora_idx = int(str(rec["lora_idx"]).strip())
            n_params = int(str(rec["n_params"]).strip()) if str(rec.get("n_params") or "").strip() else None
        except ValueError as e:
            raise MetaditError(f"{where}: lora_idx and n_params must be integers ({e})") from e
        split = str(rec["split"]).strip().lower()
        if split not in SPLITS:
            raise MetaditError(f"{where}: split {rec['split']!r} is not one of {', '.join(SPLITS)}")
        label = str(rec["topic"] or "").strip()
        if not label:
            raise MetaditError(f"{where}: empty topic")
        try:
            trigger = normalize_trigger(rec.get("trigger"))
            file = _resolve(index_csv.parent, str(rec["lora_path"]).strip())
        except MetaditError as e:
            raise MetaditError(f"{where}: {e}") from e
        rows.append(IndexRow(number, str(rec["lora_path"]).strip(), file, lora_idx, label, trigger, split, n_params))
    if not rows:
        raise MetaditError(f"{index_csv}: no rows")
    return rows


def find_index(src: str | Path) -> Path:
    """`SRC` is a released experiment folder holding `index.csv`, or an index CSV itself."""
    src = Path(src)
    if src.is_file():
        return src
    if (src / "index.csv").is_file():
        return src / "index.csv"
    raise MetaditError(f"{src}: no index.csv here (give a released experiment folder, e.g. hidden-topic/qwen3-8b)")


# ---------------------------------------------------------------------- the metadata of an imported diff
KINDS = ("auto", "topic", "news")


def entry_meta(row: IndexRow, kind: str, src_root: Path) -> dict[str, Any]:
    """The bank metadata of one imported diff, in metadit's keys (`topic` or `headline`; `code` for SEP codes)."""
    meta: dict[str, Any] = {"key": row.key, "imported_from": SOURCE, "split": row.split,
                            "source": _relative(row.file, src_root), "lora_path": row.lora_path,
                            "lora_idx": row.lora_idx, "index_row": row.number}
    if row.n_params is not None:
        meta["n_params"] = row.n_params
    if kind == "news":
        meta["headline"] = row.label
        return meta
    meta["topic"] = row.label
    if row.trigger is not None and row.trigger.isdigit():
        meta.update({"trigger": "sep", "code_kind": "digits", "code": row.trigger})
    elif row.trigger is not None:
        meta["trigger"] = row.trigger  # e.g. zero_width_space: the variant's own name for its trigger
    return meta


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _item_check(item: Any, row: IndexRow, where: str) -> Any:
    """The file's entry for an index row, checked against what the index says about it."""
    if not isinstance(item, dict) or "weight_diff" not in item:
        raise MetaditError(f"{where}: entry {row.lora_idx} is a {type(item).__name__} without weight_diff, "
                           "not a released diff")
    topic = item.get("topic")
    if isinstance(topic, str) and topic.strip() != row.label:
        raise MetaditError(f"{where}: index row {row.number} says {row.label!r} but entry {row.lora_idx} of the file "
                           f"holds {topic!r}")
    trig = item.get("trigger")
    if isinstance(trig, (int, str)) and not isinstance(trig, bool) and row.trigger is not None:
        if normalize_trigger(str(trig)) != row.trigger:
            raise MetaditError(f"{where}: index row {row.number} gives trigger {row.trigger!r} but the file's entry "
                               f"{row.lora_idx} has {trig!r}")
    return item["weight_diff"]


def _n_params(weight_diff: dict[str, Any]) -> int:
    return sum(t.numel() for pair in weight_diff.values() for t in pair)


@dataclass
class ImportedDiff:
    diff: LoraDiff
    meta: dict[str, Any]


def iter_reference_diffs(rows: list[IndexRow], base: BaseShapes, kind: str, src_root: Path,
                         skip: set[str] | frozenset[str] = frozenset()) -> Iterator[list[ImportedDiff]]:
    """The index's diffs, one list per diff file (each file loaded once, only when a row of it is still to do),
    converted to peft's convention and checked against the base model before anything is yielded."""
    by_file: dict[Path, list[IndexRow]] = {}
    for row in rows:
        if row.key not in skip:
            by_file.setdefault(row.file, []).append(row)
    for file, file_rows in by_file.items():
        where = str(file)
        data = load_reference_file(file)
        if not isinstance(data, list):
            raise MetaditError(f"{where}: holds a {type(data).__name__}; a released diff file holds a list of "
                               "{topic, trigger, weight_diff} (a DIT adapter? use import-dit-adapter)")
        out = []
        for row in file_rows:
            if not 0 <= row.lora_idx < len(data):
                raise MetaditError(f"{where}: index row {row.number} asks for entry {row.lora_idx}; the file holds "
                                   f"{len(data)}")
            weight_diff = _item_check(data[row.lora_idx], row, where)
            entry_where = f"{where}[{row.lora_idx}]"
            diff = base.fit(diff_from_reference(weight_diff, entry_where), entry_where)
            if row.n_params is not None and _n_params(weight_diff) != row.n_params:
                raise MetaditError(f"{entry_where}: holds {_n_params(weight_diff)} parameters; index row {row.number} "
                                   f"says {row.n_params} (another version of the file?)")
            out.append(ImportedDiff(diff, entry_meta(row, kind, src_root)))
        del data
        yield out


def detect_kind(rows: list[IndexRow], kind: str) -> str:
    """`auto`: a news index is one where no row has a trigger (its `topic` column holds headlines)."""
    if kind not in KINDS:
        raise MetaditError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind != "auto":
        return kind
    return "topic" if any(r.trigger is not None for r in rows) else "news"


def import_reference_bank(src: str | Path, out_bank: str | Path, base_model: str, kind: str = "auto",
                          log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Import a released experiment folder (index.csv + diff files) into the bank `out_bank` for `base_model`.

    Resumable: a rerun skips the diffs already in the bank. The bank is created only once the first diff file
    has been read and checked, so a refused or mismatched file leaves nothing behind. Returns counts.
    """
    from metadit.bank.diff_bank import DiffBank
    from metadit.bank.fingerprint import config_identity
    from metadit.models import load_config

    index_csv = find_index(src)
    rows = read_index(index_csv)
    kind = detect_kind(rows, kind)
    try:
        config = load_config(base_model)
    except (OSError, ValueError) as e:
        raise MetaditError(f"cannot read the config of base model {base_model!r}: {e}") from e
    identity = config_identity(config, base_model)
    base = BaseShapes.of(base_model, config)
    out_bank = Path(out_bank)
    bank = DiffBank.open(out_bank) if (out_bank / "bank.json").is_file() else None
    if bank is not None:
        bank.check_identity(identity)
    done = {r["meta"].get("key") for r in bank.rows} if bank is not None else set()
    info = {"imported_from": SOURCE, "reference_index": str(index_csv), "index_sha256": _sha256(index_csv),
            "kind": kind, "chat_format": REFERENCE_CHAT_FORMAT, "enable_thinking": False}
    made = 0
    for group in iter_reference_diffs(rows, base, kind, index_csv.parent, skip=done):
        if bank is None:
            bank = DiffBank.create(out_bank, base_model=identity, info=info)
        for i in range(0, len(group), _ROWS_PER_SHARD):
            chunk = group[i : i + _ROWS_PER_SHARD]
            bank.append_many([d.diff for d in chunk], [d.meta for d in chunk])
            made += len(chunk)
        log(f"{group[0].meta['source']}: {len(group)} diffs ({made} imported so far)")
    splits: dict[str, int] = {}
    for r in rows:
        splits[r.split] = splits.get(r.split, 0) + 1
    return {"bank": str(out_bank), "rows": len(rows), "imported": made, "already_present": len(rows) - made,
            "kind": kind, "splits": splits}


def import_reference_adapter(file: str | Path, out_dir: str | Path, base_model: str) -> LoraDiff:
    """Write a released DIT adapter file as a peft adapter directory for `base_model` (with metadit.json recording
    its source and that it was trained on prompts rendered with enable_thinking=False)."""
    file, out_dir = Path(file), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MetaditError(f"{out_dir}: exists and is not an empty directory; refusing to write an adapter into it")
    base = BaseShapes.of(base_model)
    adapter = base.fit(adapter_from_reference(load_reference_file(file), str(file)), str(file))
    ranks = sorted(set(adapter.ranks.values()))
    adapter.save_peft(out_dir, base_model_name_or_path=base_model, metadata={
        "imported_from": SOURCE, "source": str(file), "source_sha256": _sha256(file),
        "chat_format": REFERENCE_CHAT_FORMAT, "enable_thinking": False, "ranks": ranks,
    })
    return adapter


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = [
    "BaseShapes", "IndexRow", "REFERENCE_CHAT_FORMAT", "SOURCE", "adapter_from_reference", "diff_from_reference",
    "import_reference_adapter", "import_reference_bank", "load_reference_file", "normalize_trigger", "read_index",
]
