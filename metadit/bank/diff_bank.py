"""`DiffBank`: an append-only directory of diffs as safetensors shards plus a JSON-lines metadata index.

    BANK/bank.json                      format version, base model name + fingerprint, creation info
    BANK/shards/<writer>-<seq>.safetensors   one shard per `append`/`append_many` call
    BANK/index/<writer>.jsonl           one row per diff: id, shard, rank, sha256, user metadata

Each writer (a process, e.g. one rank of a distributed `metadit gen`) appends to its own index file and
its own shards, so writers never contend; readers see the union. Durability order: the shard is written to
a temporary name, fsynced and renamed; only then are its index rows appended (one write, fsynced). A crash
therefore leaves at most a *torn tail* — a temporary file, a shard no index row points to, or an incomplete
group of rows — which `open` reports and `repair` removes. Nothing is ever unpickled: only safetensors.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from metadit.bank.fingerprint import model_identity
from metadit.bank.lora_diff import UNSAFE_SUFFIXES, LoraDiff
from metadit.errors import BaseModelMismatchError, MetaditError

FORMAT = "metadit-diffbank"
VERSION = 1
_WRITER = re.compile(r"^[A-Za-z0-9_.-]+$")
_SCALE_KEY = "__scale__"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def entry_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype, shape, raw bytes) of an entry's tensors in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _entry_tensors(diff: LoraDiff, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for name in diff.modules:
        out[f"{name}/A"] = diff.A[name].detach().to(dtype or diff.A[name].dtype).contiguous().cpu()
        out[f"{name}/B"] = diff.B[name].detach().to(dtype or diff.B[name].dtype).contiguous().cpu()
    out[_SCALE_KEY] = torch.tensor([diff.scale[n] for n in diff.modules], dtype=torch.float64)
    return out


@dataclass
class BankProblem:
    """One piece of a torn tail or damage found when opening a bank."""

    path: str
    what: str

    @property
    def writer(self) -> str:
        """The writer whose file this is (index `<writer>.jsonl`, shard `<writer>-<seq>.safetensors`)."""
        name = Path(self.path).name.removeprefix(".tmp-")
        return name[: -len(".jsonl")] if name.endswith(".jsonl") else name.rsplit("-", 1)[0]

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


class DiffBank:
    """Append-only store of `LoraDiff`s with metadata; `bank[i] -> (diff, meta)` reads only that diff."""

    def __init__(self, path: Path, header: dict[str, Any], writer: str) -> None:
        self.path = path
        self.header = header
        self.writer = writer
        self.rows: list[dict[str, Any]] = []
        self.problems: list[BankProblem] = []
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._reload()

    # ------------------------------------------------------------------ creating and opening
    @classmethod
    def create(
        cls,
        path: str | Path,
        base_model: Any,
        info: dict[str, Any] | None = None,
        exist_ok: bool = False,
        writer: str = "main",
    ) -> "DiffBank":
        """Create an empty bank for `base_model` (a model, or an identity dict `{"name", "fingerprint"}`).

        With `exist_ok`, an existing bank for the same base model is opened instead (a resumed build).
        """
        path = Path(path)
        identity = base_model if isinstance(base_model, dict) else model_identity(base_model)
        if not {"name", "fingerprint"} <= set(identity):
            raise MetaditError("DiffBank.create: base_model must be a model or {'name': ..., 'fingerprint': ...}")
        if (path / "bank.json").exists():
            if not exist_ok:
                raise MetaditError(f"{path}: a bank already exists here (use DiffBank.open)")
            bank = cls.open(path, writer=writer)
            bank.check_identity(identity)
            return bank
        if path.exists() and any(path.iterdir()):
            raise MetaditError(f"{path}: directory exists and is not empty; refusing to create a bank in it")
        (path / "shards").mkdir(parents=True, exist_ok=True)
        (path / "index").mkdir(exist_ok=True)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "base_model": {"name": identity["name"], "fingerprint": identity["fingerprint"]},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "info": info or {},
        }
        tmp = path / ".bank.json.tmp"
        tmp.write_text(json.dumps(header, indent=2))
        os.replace(tmp, path / "bank.json")
        _fsync_dir(path)
        return cls(path, header, writer)

    @classmethod
    def open(cls, path: str | Path, writer: str = "main") -> "DiffBank":
        path = Path(path)
        header_file = path / "bank.json"
        if not header_file.is_file():
            raise MetaditError(f"{path}: not a diff bank (no bank.json)")
        try:
            header = json.loads(header_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MetaditError(f"{header_file}: not valid JSON ({e})") from e
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise MetaditError(f"{header_file}: not a metadit diff bank header")
        if header.get("version") != VERSION:
            raise MetaditError(f"{header_file}: bank format version {header.get('version')} (this metadit reads {VERSION})")
        if not _WRITER.match(writer):
            raise MetaditError(f"writer name {writer!r} may only hold letters, digits, '_', '.', '-'")
        return cls(path, header, writer)

    # ------------------------------------------------------------------ identity
    @property
    def base_model(self) -> dict[str, str]:
        return dict(self.header["base_model"])

    def check_identity(self, identity: dict[str, str]) -> None:
        mine = self.base_model
        if identity["fingerprint"] != mine["fingerprint"]:
            raise BaseModelMismatchError(
                f"{self.path}: bank was made for base model {mine['name']!r} (fingerprint {mine['fingerprint']}), "
                f"not {identity['name']!r} (fingerprint {identity['fingerprint']})"
            )

    def check_model(self, model: Any) -> None:
        """Raise `BaseModelMismatchError` unless `model` has this bank's architecture and linear shapes."""
        self.check_identity(model_identity(model))

    # ------------------------------------------------------------------ index
    def _index_files(self) -> list[Path]:
        d = self.path / "index"
        return sorted(d.glob("*.jsonl")) if d.is_dir() else []

    def _parse_index(self, file: Path) -> tuple[list[dict[str, Any]], int, list[BankProblem]]:
        """Rows of complete groups whose shard exists, the byte length of that good prefix, and problems."""
        problems: list[BankProblem] = []
        data = file.read_bytes()
        rows: list[dict[str, Any]] = []
        good_end = 0
        pos = 0
        group: list[dict[str, Any]] = []
        group_end = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                problems.append(BankProblem(str(file), f"unterminated last line ({len(data) - pos} bytes)"))
                break
            line = data[pos:nl]
            pos = nl + 1
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not {"id", "shard", "prefix", "group_size", "sha256"} <= set(row):
                    raise ValueError("missing fields")
            except (ValueError, UnicodeDecodeError):
                problems.append(BankProblem(str(file), f"unreadable index line at byte {pos - len(line) - 1}"))
                break
            if group and row["shard"] != group[0]["shard"]:
                problems.append(BankProblem(str(file), f"incomplete row group for {group[0]['shard']}"))
                group = []
                break
            group.append(row)
            if len(group) == row["group_size"]:
                shard = self.path / row["shard"]
                if not shard.is_file():
                    problems.append(BankProblem(str(file), f"rows point to missing shard {row['shard']}"))
                    group = []
                    break
                rows += group
                group_end = pos
                good_end = group_end
                group = []
        if group:
            problems.append(BankProblem(str(file), f"incomplete row group for {group[0]['shard']}"))
        return rows, good_end, problems

    def _reload(self) -> None:
        self.rows, self.problems = [], []
        referenced: set[str] = set()
        for file in self._index_files():
            rows, _, problems = self._parse_index(file)
            self.rows += rows
            self.problems += problems
            referenced |= {r["shard"] for r in rows}
        shard_dir = self.path / "shards"
        if shard_dir.is_dir():
            for f in sorted(shard_dir.iterdir()):
                rel = f"shards/{f.name}"
                if f.name.startswith(".tmp-"):
                    self.problems.append(BankProblem(str(f), "temporary file of an interrupted write"))
                elif f.suffix in UNSAFE_SUFFIXES:
                    self.problems.append(BankProblem(str(f), "pickle-format file in a bank; it is never read"))
                elif rel not in referenced:
                    self.problems.append(BankProblem(str(f), "shard with no index rows (interrupted append)"))
        self._by_id = {r["id"]: i for i, r in enumerate(self.rows)}

    def refresh(self) -> None:
        """Re-read the index (e.g. to see what other writers appended)."""
        self._handles.clear()
        self._reload()

    def repair(self, writers: Sequence[str] | None = None) -> list[str]:
        """Remove the torn tail: temp files, shards without rows, incomplete or dangling row groups.

        `writers` limits the repair to those writers' files (a resuming rank repairs only its own).
        Returns a description of each thing removed. Never touches complete entries.
        """
        removed: list[str] = []
        referenced: set[str] = set()
        mine = lambda p: writers is None or BankProblem(str(p), "").writer in writers  # noqa: E731
        for file in self._index_files():
            rows, good_end, problems = self._parse_index(file)
            referenced |= {r["shard"] for r in rows}
            if problems and mine(file):
                size = file.stat().st_size
                with open(file, "r+b") as f:
                    f.truncate(good_end)
                    f.flush()
                    os.fsync(f.fileno())
                removed.append(f"{file}: truncated {size - good_end} bytes of torn index tail ({problems[0].what})")
        shard_dir = self.path / "shards"
        for f in sorted(shard_dir.iterdir()) if shard_dir.is_dir() else []:
            if mine(f) and (f.name.startswith(".tmp-") or f"shards/{f.name}" not in referenced):
                f.unlink()
                removed.append(f"{f}: removed ({'temporary file' if f.name.startswith('.tmp-') else 'shard with no index rows'})")
        _fsync_dir(shard_dir)
        self.refresh()
        return removed

    # ------------------------------------------------------------------ writing
    def _next_seq(self) -> int:
        seqs = [-1]
        for f in (self.path / "shards").glob(f"{self.writer}-*.safetensors"):
            m = re.fullmatch(rf"{re.escape(self.writer)}-(\d+)\.safetensors", f.name)
            if m:
                seqs.append(int(m.group(1)))
        return max(seqs) + 1

    def append(self, diff: LoraDiff, meta: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> str:
        """Append one diff; returns its id."""
        return self.append_many([diff], [meta or {}], dtype=dtype)[0]

    def append_many(
        self, diffs: Sequence[LoraDiff], metas: Sequence[dict[str, Any]], dtype: torch.dtype | None = None
    ) -> list[str]:
        """Append several diffs as one shard (one fsync for all); returns their ids.

        `dtype` stores the factors in another dtype (e.g. bf16 to halve the size); default: as given.
        """
        if len(diffs) != len(metas) or not diffs:
            raise MetaditError("append_many: need as many metadata dicts as diffs, and at least one diff")
        mine = [p for p in self.problems if p.writer == self.writer]
        if mine:
            raise MetaditError(f"{self.path}: torn tail from an interrupted write ({mine[0]}); run `metadit bank repair`")
        for m in metas:
            try:
                json.dumps(m)
            except TypeError as e:
                raise MetaditError(f"append: metadata must be JSON-serializable ({e})") from e
        seq = self._next_seq()
        shard_name = f"{self.writer}-{seq:06d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        rows = []
        for j, (diff, meta) in enumerate(zip(diffs, metas)):
            diff.check_finite(f"append: diff {j}")
            et = _entry_tensors(diff, dtype)
            prefix = f"e{j}"
            tensors.update({f"{prefix}/{k}": t for k, t in et.items()})
            rows.append({
                "id": f"{self.writer}-{seq:06d}-{j}",
                "shard": f"shards/{shard_name}",
                "prefix": prefix,
                "group_size": len(diffs),
                "rank": diff.rank,
                "n_modules": len(diff.modules),
                "dtype": str(et[f"{diff.modules[0]}/A"].dtype).removeprefix("torch."),
                "sha256": entry_checksum(et),
                "meta": meta,
            })
        shard_dir = self.path / "shards"
        tmp = shard_dir / f".tmp-{shard_name}"
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, shard_dir / shard_name)
        _fsync_dir(shard_dir)
        index_file = self.path / "index" / f"{self.writer}.jsonl"
        payload = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
        with open(index_file, "ab") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self._by_id[r["id"]] = len(self.rows)
            self.rows.append(r)
        return [r["id"] for r in rows]

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[LoraDiff, dict[str, Any]]:
        if not -len(self.rows) <= i < len(self.rows):
            raise IndexError(f"bank index {i} out of range for a bank of {len(self.rows)} diffs")
        row = self.rows[i]
        return self._read(row), dict(row["meta"])

    def __iter__(self) -> Iterator[tuple[LoraDiff, dict[str, Any]]]:
        for i in range(len(self)):
            yield self[i]

    def get(self, entry_id: str) -> tuple[LoraDiff, dict[str, Any]]:
        if entry_id not in self._by_id:
            raise MetaditError(f"{self.path}: no entry with id {entry_id!r}")
        return self[self._by_id[entry_id]]

    def meta(self, i: int) -> dict[str, Any]:
        return dict(self.rows[i]["meta"])

    def _handle(self, shard: str) -> tuple[Any, dict[str, list[str]]]:
        """An open safetensors handle (memory-mapped) plus its keys grouped by entry prefix; LRU-cached."""
        if shard in self._handles:
            self._handles.move_to_end(shard)
            return self._handles[shard]
        path = self.path / shard
        try:
            handle = safe_open(str(path), framework="pt")
            keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise MetaditError(f"{path}: not a readable safetensors file ({e})") from e
        by_prefix: dict[str, list[str]] = {}
        for k in keys:
            prefix, _, rest = k.partition("/")
            by_prefix.setdefault(prefix, []).append(rest)
        self._handles[shard] = (handle, by_prefix)
        if len(self._handles) > 64:
            self._handles.popitem(last=False)
        return handle, by_prefix

    def _read_tensors(self, row: dict[str, Any]) -> dict[str, torch.Tensor]:
        handle, by_prefix = self._handle(row["shard"])
        keys = by_prefix.get(row["prefix"])
        path = self.path / row["shard"]
        if not keys:
            raise MetaditError(f"{path}: entry {row['id']} has no tensors in its shard")
        try:
            return {k: handle.get_tensor(f"{row['prefix']}/{k}") for k in keys}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise MetaditError(f"{path}: cannot read entry {row['id']} ({e})") from e

    def _read(self, row: dict[str, Any]) -> LoraDiff:
        tensors = self._read_tensors(row)
        path = self.path / row["shard"]
        if _SCALE_KEY not in tensors:
            raise MetaditError(f"{path}: entry {row['id']} lacks its scales")
        modules = sorted({k.rsplit("/", 1)[0] for k in tensors if k != _SCALE_KEY})
        scales = tensors[_SCALE_KEY].tolist()
        if len(scales) != len(modules):
            raise MetaditError(f"{path}: entry {row['id']} has {len(scales)} scales for {len(modules)} modules")
        try:
            diff = LoraDiff(
                {m: tensors[f"{m}/A"] for m in modules},
                {m: tensors[f"{m}/B"] for m in modules},
                dict(zip(modules, scales)),
                {"bank": str(self.path), "id": row["id"], "base_model": self.base_model["name"]},
            )
        except KeyError as e:
            raise MetaditError(f"{path}: entry {row['id']} lacks tensor {e}") from e
        return diff

    def verify(self) -> list[str]:
        """Recompute every entry's checksum; return one line per corrupt or unreadable entry (empty = all good)."""
        bad = []
        for row in self.rows:
            try:
                tensors = self._read_tensors(row)
                if entry_checksum(tensors) != row["sha256"]:
                    bad.append(f"{row['id']} ({row['shard']}): checksum mismatch")
            except MetaditError as e:
                bad.append(f"{row['id']} ({row['shard']}): {e}")
        return bad

    def to_dataset(self) -> "datasets.Dataset":  # noqa: F821
        """The metadata index as a `datasets.Dataset`: bank columns plus one column per metadata key."""
        import datasets

        records = []
        for i, r in enumerate(self.rows):
            rec = {"index": i, "id": r["id"], "shard": r["shard"], "rank": r["rank"], "sha256": r["sha256"]}
            rec.update({k: v for k, v in r["meta"].items() if k not in rec})
            records.append(rec)
        try:
            return datasets.Dataset.from_list(records)
        except Exception:  # metadata whose types differ across rows: keep it as JSON text
            return datasets.Dataset.from_list(
                [{**{k: rec[k] for k in ("index", "id", "shard", "rank", "sha256")}, "meta": json.dumps(r["meta"])}
                 for rec, r in zip(records, self.rows)]
            )

    def summary(self) -> dict[str, Any]:
        ranks: dict[int, int] = {}
        for r in self.rows:
            ranks[r["rank"]] = ranks.get(r["rank"], 0) + 1
        size = sum(f.stat().st_size for f in (self.path / "shards").glob("*.safetensors"))
        return {
            "path": str(self.path),
            "base_model": self.base_model,
            "created": self.header.get("created"),
            "diffs": len(self.rows),
            "ranks": {str(k): v for k, v in sorted(ranks.items())},
            "writers": [f.stem for f in self._index_files()],
            "shards": len({r["shard"] for r in self.rows}),
            "bytes": size,
            "problems": [str(p) for p in self.problems],
            "info": self.header.get("info", {}),
        }
