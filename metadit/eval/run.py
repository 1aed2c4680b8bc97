"""`metadit eval`: DIT and the baselines on a fit run's held-out diffs, scored by the judges.

Reads the run's `split.json` (which labels were held out), `config.yaml` (tasks, base model) and `adapter/`,
runs every method on the same held-out diffs, scores each prediction with each judge, and writes
`eval.json` (rows, per-method summary split into gated / leaky diffs, sections for likelihood ranking,
answer verification and trigger search, and how it was made) and `rows.jsonl` beside it (the per-item rows,
`metadit.eval.rows`: question, prediction, truth, every judge's score, the match columns, the strict gate
verdict; what `metadit report` computes its tables from). Each finished method is saved at once under
`<out>/methods/`, so a killed evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from metadit.bank.diff_bank import banks_chat_format
from metadit.dit.adapter import adapter_mode
from metadit.errors import MetaditError
from metadit.eval.baselines import METHODS, Evaluator, MethodContext, check_guesser, get_guesser, get_method, reguess
from metadit.eval.heldout import HeldOut, label_groups, load_heldout, per_phrasing, read_split
from metadit.eval.results import run_info, summarize, write_json
from metadit.eval.rows import ROW_FIELDS, gate_verdict, match_columns, write_rows
from metadit.dit.tasks import get_task

DEFAULT_METHODS = ["dit", "no_diff", "base_question", "base_question_trigger", "twenty_questions",
                   "twenty_questions_trigger", "generated_story", "random_label", "likelihood", "likelihood_base",
                   "activation_lens"]
RUBRIC_JUDGES = ("embedding", "llm")  # judges on the 1-5 scale; the first one given is the tables' headline score


def default_methods(mode: str | None) -> list[str]:
    """`DEFAULT_METHODS` that run with an adapter of `mode` (None: no adapter, only the methods that need none)."""
    return [m for m in DEFAULT_METHODS
            if not METHODS[m].needs_adapter or (mode is not None and mode in METHODS[m].adapter_modes)]


def _run_config(run: Path) -> dict[str, Any]:
    cfg = run / "config.yaml"
    if not cfg.is_file():
        return {}
    import yaml

    return yaml.safe_load(cfg.read_text()) or {}


def _split_groups(sp: dict[str, Any], sides: tuple[str, ...], tasks: list[str]) -> set[str]:
    """The split groups of the labels on `sides` of a split: recorded in the split file, or (split files written
    before it recorded them) read from its banks."""
    if "groups" in sp:
        return {g for side in sides for g in sp["groups"].get(side, [])}
    return label_groups(list(sp["banks"]), {lab for side in sides for lab in sp.get(side, [])}, tasks)


def _train_labels(banks: list[str], train: set[str], tasks: list[str],
                  recorded: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Per task, the answers of the training labels: recorded in the split file, else read from its banks."""
    if recorded is not None:
        return {t: sorted(recorded.get(t, [])) for t in tasks}
    from metadit.bank import DiffBank

    out: dict[str, set[str]] = {t: set() for t in tasks}
    for path in banks:
        bank = DiffBank.open(path)
        for i in range(len(bank)):
            meta = bank.meta(i)
            for t in map(get_task, tasks):
                if t.applies(meta) and str(meta.get(t.label_key)) in train:
                    out[t.name].add(t.answer(meta))
    return {t: sorted(v) for t, v in out.items()}


def _score(rows: list[dict[str, Any]], judges: list[str], judge_calibration: str | None = None) -> None:
    from metadit.eval.judges import get_judge

    for name in judges:
        judge = get_judge(name, calibration_path=judge_calibration) if name == "embedding" else get_judge(name)
        for task in sorted({r["task"] for r in rows}):
            sel = [r for r in rows if r["task"] == task]
            if name in RUBRIC_JUDGES and task == "trigger":
                continue  # codes are scored by exact match only
            vals = judge.score([r["prediction"] for r in sel], [r["truth"] for r in sel], task=task)
            for r, v in zip(sel, vals):
                r["scores"][name] = float(v)


def _fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate(
    run: str | None = None,
    adapter: str | None = None,
    split_file: str | None = None,
    banks: list[str] | None = None,
    split: str = "test",
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    judges: list[str] | None = None,
    base_model: str | None = None,
    limit: int | None = None,
    n_questions: int = 20,
    batch_size: int = 32,
    max_new_tokens: int = 24,
    guesser: str = "base_model",
    verify: bool = True,
    trigger_search: bool = False,
    trigger_search_diffs: int = 25,
    trigger_search_vocab: str = "pool",
    trigger_search_rerank: int = 256,
    trigger_search_prerank: str = "gradient",
    judge_calibration: str | None = None,
    out: str | None = None,
    reuse: str | None = None,
    seed: int = 0,
    fresh: bool = False,
) -> dict[str, Any]:
    """Evaluate DIT and the baselines on held-out diffs.

    Args:
        run: a fit run's log directory (holds split.json, config.yaml, adapter/); sets the defaults below.
        adapter: the DIT adapter directory (default: RUN/adapter) or a shipped adapter's short name
            (`smollm2-topic`; its split.json is then the default split), of any mode (`dit`, `encoder`,
            `dit+encoder`: an encoder mode's DiffEncoder is read from the directory). Without one, only no-adapter
            methods run.
        split_file: the split (default: RUN/split.json). Without a run or a split file, `--split unseen` takes
            every entry of `--banks` (nothing was trained on them: for methods that need no adapter).
        banks: banks to take held-out diffs from (default: the split's banks; give others to evaluate on other
            ranks or triggers — their labels must be held out from training too, or they are skipped).
        split: which held-out labels: `test` or `val`; `unseen`: every entry of `banks` whose label is in no
            split of the run (neither trained on nor used to pick the checkpoint) — for other banks (other ranks,
            other triggers).
        tasks: tasks to evaluate (default: the run's tasks).
        methods: methods from the registry (default: all that apply, `default_methods`).
        judges: `embedding` (calibrated 1-5), `llm` (OpenAI-compatible, 1-5), `similarity`, `exact`.
        base_model: default: the run's.
        limit: evaluate at most this many held-out (diff, task) items (seeded choice).
        n_questions: questions per diff for the 20-questions baselines.
        batch_size: rows per `generate` call (diffs per batch).
        max_new_tokens: answer length for the task question.
        guesser: `base_model` (offline: the base model prompted to guess), `keywords` (offline: the phrase the
            evidence repeats most distinctively) or `llm` (the OpenAI-compatible endpoint from the environment).
        verify: answer verification of DIT's topic answers (needs the diff's trigger).
        trigger_search: rank every candidate code per diff (white-box trigger inversion).
        trigger_search_diffs: search the codes of at most this many held-out diffs (it costs one forward per
            candidate code x question x diff: ~10 s per diff for the 134-word pool on SmolLM2 here).
        trigger_search_vocab: `pool` (closed set: the bank's recorded code words, the SEP template known) or
            `open` (every word token of the tokenizer under 4 fixed templates, the search picks one: a gradient
            step ranks all, the best `trigger_search_rerank` per template are scored exactly; see
            `metadit.eval.trigger_search.search_trigger_open`). Per-diff rows: `<out>/trigger_search_<vocab>.jsonl`.
        trigger_search_rerank: `open` only: candidates per template re-scored exactly (the number of word tokens,
            e.g. 100000: no gradient step, every candidate exactly scored).
        trigger_search_prerank: `open` only: what ranks every candidate before the exact re-score: `gradient`
            (one gradient step per template, GCG-style) or `projection` (the size of the diff's effect on the
            modules that read the candidate token's own embedding: no forward pass;
            `metadit.eval.trigger_search.projection_scores`).
        judge_calibration: the labelled pairs the `embedding` judge's thresholds are fitted on (default: the
            shipped hand-written pairs, `metadit/eval/data/judge_calibration.jsonl`); e.g. the fitting half of real
            outputs labelled blind, `reports/judges/real_outputs_calibration.jsonl` (topic task only; written by
            `metadit judge calibrate`). Scores only: `--reuse` an evaluation to re-score it without recomputing.
        out: output directory (default: RUN/eval).
        reuse: another evaluation's output directory: methods and sections it saved with the same settings are
            copied instead of recomputed; guesser-based methods saved with another guesser are re-guessed from
            their saved evidence (e.g. `--guesser keywords --reuse RUN/eval --out RUN/eval-keywords`).
        seed: sampling and choices.
        fresh: ignore methods saved by an earlier, interrupted evaluation.
    """
    started = time.time()
    run_dir = Path(run) if run else None
    if run_dir is not None and not run_dir.is_dir():
        raise MetaditError(f"--run {run}: no such directory")
    cfg = _run_config(run_dir) if run_dir else {}
    adapter = adapter or (str(run_dir / "adapter") if run_dir and (run_dir / "adapter").is_dir() else None)
    if adapter is not None:
        from metadit.models import resolve_adapter

        adapter = str(resolve_adapter(adapter))
    split_path = split_file or (str(run_dir / "split.json") if run_dir else None)
    if split_path is None and adapter is not None and (Path(adapter) / "split.json").is_file():
        split_path = str(Path(adapter) / "split.json")  # a shipped adapter carries the split it was trained on
    if split_path is None and not (split == "unseen" and banks and adapter is None):
        raise MetaditError("give --run RUN_DIR or --split_file SPLIT.json (which labels are held out), or, with no "
                           "adapter, --banks with --split unseen (every entry)")
    # No run, no split file, no adapter: nothing was trained on the banks, so every entry is unseen (what a
    # white-box method such as the trigger search needs). An adapter without its split could have trained on them.
    sp = read_split(split_path) if split_path is not None else {"train": [], "banks": list(banks)}
    if split != "unseen" and split not in sp:
        raise MetaditError(f"{split_path}: no {split!r} split (choose test, val or unseen)")
    banks = list(banks or sp["banks"])
    tasks = list(tasks or cfg.get("data", {}).get("tasks") or ["topic"])
    base_model = base_model or cfg.get("model", {}).get("base_model")
    if base_model is None:
        from metadit.bank import DiffBank

        base_model = DiffBank.open(banks[0]).base_model["name"]
    judges = list(judges or ["embedding", "similarity", "exact"])
    mode = adapter_mode(adapter) if adapter is not None else None
    methods = list(methods or default_methods(mode))
    check_guesser(guesser)
    for m in methods:
        method = get_method(m)
        if method.needs_adapter and adapter is None:
            raise MetaditError(f"method {m!r} needs a DIT adapter: give --run or --adapter")
        if method.needs_adapter and mode not in method.adapter_modes:
            raise MetaditError(f"method {m!r} takes {' or '.join(method.adapter_modes)}-mode adapters; {adapter} was "
                               f"trained in mode {mode!r}")
    out_dir = Path(out) if out else (run_dir / "eval" if run_dir else None)
    if out_dir is None:
        raise MetaditError("give --out DIR (or --run, whose eval/ directory is the default)")
    if reuse and not (Path(reuse) / "methods").is_dir():
        raise MetaditError(f"--reuse {reuse}: not an evaluation's output directory (it has no methods/)")
    if trigger_search_vocab not in ("pool", "open"):
        raise MetaditError(f"--trigger_search_vocab must be pool or open, got {trigger_search_vocab!r}")
    if trigger_search_rerank < 1:
        raise MetaditError(f"--trigger_search_rerank must be >= 1, got {trigger_search_rerank}")
    from metadit.eval.trigger_search import PRERANKS

    if trigger_search_prerank not in PRERANKS:
        raise MetaditError(f"--trigger_search_prerank must be one of {', '.join(PRERANKS)}, got {trigger_search_prerank!r}")
    calibration = None
    if judge_calibration is not None:
        if not Path(judge_calibration).is_file():
            raise MetaditError(f"--judge_calibration {judge_calibration}: no such file")
        if "embedding" not in judges:
            raise MetaditError("--judge_calibration calibrates the embedding judge: add embedding to --judges")
        calibration = {"path": judge_calibration,
                       "sha256": hashlib.sha256(Path(judge_calibration).read_bytes()).hexdigest()}

    config = {"run": run, "adapter": adapter, "adapter_mode": mode, "split_file": split_path, "banks": banks,
              "split": split, "tasks": tasks,
              "methods": methods, "judges": judges, "base_model": base_model, "limit": limit, "n_questions": n_questions,
              "max_new_tokens": max_new_tokens, "guesser": guesser, "verify": verify, "trigger_search": trigger_search,
              "trigger_search_diffs": trigger_search_diffs, "trigger_search_vocab": trigger_search_vocab,
              "trigger_search_rerank": trigger_search_rerank,
              "trigger_search_prerank": trigger_search_prerank, "judge_calibration": calibration, "seed": seed, "train_labels": len(sp["train"]), "reuse": reuse,
              "questions": "every held-out phrasing"}
    # No scored diff shares a split group (news: an event template) with a label the run saw: splits written
    # before groups existed held out headlines whose template trained; those diffs are left out and counted.
    if split == "unseen":
        used = {lab for k in ("train", "val", "test") for lab in sp.get(k, [])}
        seen_groups = _split_groups(sp, ("train", "val", "test"), tasks)
        items = load_heldout(banks, None, tasks, limit=limit, seed=seed, exclude=used, exclude_groups=seen_groups)
        candidates = load_heldout(banks, None, tasks, exclude=used, load_diffs=False)
    else:
        seen_groups = _split_groups(sp, ("train",), tasks)
        items = load_heldout(banks, set(sp[split]), tasks, limit=limit, seed=seed, exclude_groups=seen_groups)
        candidates = load_heldout(banks, set(sp[split]), tasks, load_diffs=False)
    config["left_out_shared_group"] = sum(get_task(h.task).group_of(h.meta) in seen_groups for h in candidates)
    if not items:
        raise MetaditError(f"no held-out diffs: none of {banks} has an entry with a {split} label for tasks {tasks}"
                           + (" whose template no training label shares" if config["left_out_shared_group"] else ""))
    ev = Evaluator(base_model, adapter, batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed,
                   chat_format=banks_chat_format(banks))
    guess = get_guesser(guesser, ev)
    ctx = MethodContext(ev, guess, _train_labels(list(sp["banks"]), set(sp["train"]), tasks, sp.get("train_answers")), n_questions=n_questions, seed=seed)

    from rich.console import Console

    console = Console(stderr=True)
    if config["left_out_shared_group"]:
        console.print(f"[yellow]{config['left_out_shared_group']} {split} diffs left out: their headline's event "
                      "template (split group) is shared with a training label[/yellow]")
    saved = out_dir / "methods"
    # The guesser is not part of the key: a guesser-based method's evidence does not depend on it (re-guessed below).
    # Nor is the adapter's mode: the adapter's path is, and keys from before the mode was recorded stay valid.
    key = _fingerprint({k: v for k, v in config.items() if k not in (
        "methods", "judges", "verify", "trigger_search", "trigger_search_diffs", "trigger_search_vocab",
        "trigger_search_rerank", "trigger_search_prerank", "train_labels", "guesser", "reuse", "adapter_mode",
        "judge_calibration")})
    sources = [saved] + ([Path(reuse) / "methods"] if reuse else [])
    rows: list[dict[str, Any]] = []
    for name in methods:
        method = get_method(name)
        chosen = [h for h in items if method.applies(h)]
        if not chosen:
            continue
        if method.per_phrasing:  # it asks the task's question: once in every held-out phrasing
            chosen = per_phrasing(chosen)
        cache = saved / f"{name}.json"
        data = None if fresh else _saved(sources, f"{name}.json", key)
        if data is not None:
            method_rows = data["rows"]
            if method.evidence and data.get("guesser") != guesser:
                reguess(ctx, method, method_rows)
                console.print(f"{name}: {len(method_rows)} predictions re-guessed by the {guesser} guesser from saved evidence")
                write_json(cache, {**data, "guesser": guesser, "rows": method_rows})
            else:
                console.print(f"[dim]{name}: {len(method_rows)} predictions from an earlier run[/dim]")
                if not cache.is_file():
                    write_json(cache, data)  # the output directory stays self-contained
            rows += method_rows
            continue
        t0 = time.time()
        preds = method.predict(ctx, chosen)
        method_rows = [{"diff": h.id, "bank": h.bank, "index": h.index, "task": h.task, "truth": h.truth,
                        "label": str(h.meta.get(get_task(h.task).label_key)), "gated": h.gated,
                        **gate_verdict(h.meta), "method": name, "prediction": p, "scores": {},
                        "extra": extra} for h, (p, extra) in zip(chosen, preds)]
        write_json(cache, {"key": key, "guesser": guesser if method.evidence else None, "rows": method_rows,
                           "seconds": round(time.time() - t0, 1)})
        console.print(f"{name}: {len(chosen)} diffs in {time.time() - t0:.0f} s")
        rows += method_rows

    _score(rows, judges, judge_calibration)
    by_item = {(h.id, h.task): h for h in items}
    _complete(rows, by_item, seed)
    sections: dict[str, Any] = {}
    headline_judge = next((j for j in judges if j in RUBRIC_JUDGES), judges[0])
    if verify and "dit" in methods:
        dit_rows = [r for r in rows if r["method"] == "dit" and r["task"] == "topic"
                    and by_item[(r["diff"], "topic")].meta.get("trigger")]
        if dit_rows:
            from metadit.eval.verify import verify_predictions

            checks = _cached(sources, "verification.json", key, fresh, lambda: verify_predictions(
                ev, [by_item[(r["diff"], "topic")] for r in dit_rows], [r["prediction"] for r in dit_rows], seed=seed))
            for r, c in zip(dit_rows, checks):
                r["extra"]["verify"] = c
            sections["verification"] = _verification_section(dit_rows, headline_judge)
    if trigger_search:
        sections["trigger_search"] = _trigger_search(ev, items, rows, sources, key, fresh, seed,
                                                   trigger_search_diffs, trigger_search_vocab, trigger_search_rerank,
                                                   trigger_search_prerank)
    result = {"info": run_info(started, config), "config": config, "headline_judge": headline_judge,
              "rows": rows, "summary": summarize(rows), "sections": sections}
    write_json(out_dir / "eval.json", result)
    write_rows(out_dir / "rows.jsonl", ({k: r.get(k) for k in ROW_FIELDS} for r in rows))
    print_summary(result, console)
    console.print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'rows.jsonl'}")
    return result


def _complete(rows: list[dict[str, Any]], by_item: dict[tuple[str, str], HeldOut], seed: int) -> None:
    """The rows' columns that follow from the item and the prediction (also for methods saved by an earlier
    evaluation): the question the method asked, the match columns, the strict gate verdict."""
    for r in rows:
        h = by_item[(r["diff"], r["task"])]
        method = get_method(r["method"])
        asked = (r.get("extra") or {}).get("question")  # a per-phrasing method's row: the phrasing it asked
        phrasings = h.questions() if method.per_phrasing else []
        if asked in phrasings:
            h = replace(h, phrasing=phrasings.index(asked))
        r["question"] = method.question(h, seed)
        r["match"] = match_columns(r["prediction"], r["truth"])
        r.update(gate_verdict(h.meta))


def _saved(sources: list[Path], name: str, key: str) -> dict[str, Any] | None:
    """The first file `name` in `sources` saved under `key` (this evaluation's own directory comes first)."""
    for d in sources:
        if (d / name).is_file():
            data = json.loads((d / name).read_text())
            if data.get("key") == key:
                return data
    return None


def _cached(sources: list[Path], name: str, key: str, fresh: bool, compute):
    data = None if fresh else _saved(sources, name, key)
    if data is not None:
        if not (sources[0] / name).is_file():
            write_json(sources[0] / name, data)
        return data["value"]
    value = compute()
    write_json(sources[0] / name, {"key": key, "value": value})
    return value


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _verification_section(dit_rows: list[dict[str, Any]], judge: str) -> dict[str, Any]:
    out: dict[str, Any] = {"judge": judge}
    for name, flag in (("verified", True), ("unverified", False)):
        sel = [r for r in dit_rows if r["extra"]["verify"]["verified"] is flag]
        out[name] = {"n": len(sel), judge: _mean([r["scores"][judge] for r in sel if judge in r["scores"]]),
                     "exact": _mean([r["scores"]["exact"] for r in sel if "exact" in r["scores"]])}
    return out


def _trigger_search(ev: Evaluator, items: list[HeldOut], rows: list[dict[str, Any]], sources: list[Path], key: str,
                    fresh: bool, seed: int, max_diffs: int, vocab: str = "pool", rerank: int = 256,
                    prerank: str = "gradient") -> dict[str, Any]:
    """Rank every candidate code per diff by how far it moves the diffed model from the base model: over the
    bank's code-word pool (`pool`) or over every word token under 4 templates (`open`). Either way the per-diff
    rows go to `<out>/trigger_search_<vocab>.jsonl`, from which `summarize_search` recomputes the table."""
    from metadit.eval.baselines import eval_questions
    from metadit.eval.trigger_search import search_trigger, summarize_search, write_search_rows
    from metadit.nn import adapter_disabled

    seen: dict[str, HeldOut] = {}
    for h in items:
        if h.meta.get("trigger") == "sep" and "code" in h.meta:
            seen.setdefault(h.id, h)
    targets = list(seen.values())[:max_diffs]
    if not targets:
        return {"n": 0, "note": "no held-out diff has a SEP code"}
    kinds = {h.meta.get("code_kind", "word") for h in targets}
    if vocab == "open":
        if kinds != {"word"}:
            return {"n": 0, "vocab": "open", "note": "the open-vocabulary search needs word codes (digit codes: use pool)"}
        return _open_trigger_search(ev, targets, sources, key, fresh, seed, rerank, prerank)
    dit_guess = {r["diff"]: r["prediction"] for r in rows if r["method"] == "dit" and r["task"] == "trigger"}
    if kinds != {"word"}:
        pool = [f"{i:03d}" for i in range(1000)]
    else:
        from data_gen.hidden_topic import recorded_code_words
        from metadit.bank import DiffBank

        pool = list(dict.fromkeys(w for b in dict.fromkeys(h.bank for h in targets)
                                 for w in recorded_code_words(DiffBank.open(b).header.get("info") or {})))

    def compute():
        t0 = time.time()
        with adapter_disabled(ev.model):
            res = search_trigger(ev.model, ev.tok, [h.diff for h in targets],
                                 [str(h.meta["code"])[:3] if h.meta.get("code_kind") == "digits" else h.meta["code"]
                                  for h in targets],
                                 pool, eval_questions(targets[0], 2, seed),
                                 seed_guesses=[dit_guess.get(h.id) for h in targets] if dit_guess else None)
        per = round((time.time() - t0) / len(targets), 3)  # one batched search over every diff: its mean cost
        return [{k: v for k, v in r.items() if k != "ranking"} | {"diff": h.id, "ranking": r.get("ranking", [])[:10],
                                                                  "seconds": per}
                for h, r in zip(targets, res)]

    per_diff = _cached(sources, "trigger_search.json", f"{key}:{max_diffs}", fresh, compute)
    from metadit.text import exact_match

    dit_exact = [exact_match(dit_guess[d["diff"]], seen[d["diff"]].meta["code"]) for d in per_diff
                 if d["diff"] in dit_guess]
    rows_file = write_search_rows(sources[0].parent / "trigger_search_pool.jsonl", per_diff, seen, "pool")
    return {"vocab": "pool", "n": len(per_diff), "pool": len(pool),
            "recovered_top1": _mean([float(d["recovered"]) for d in per_diff]),
            "recovered_top5": _mean([float(d["in_top"]) for d in per_diff]),
            "recovered_top10": summarize_search(per_diff)["top10"],
            "mean_true_rank": _mean([float(d["true_rank"]) for d in per_diff]),
            "seconds_per_diff": summarize_search(per_diff)["seconds_per_diff"],
            "dit_exact": _mean([float(x) for x in dit_exact]), "rows_file": str(rows_file), "per_diff": per_diff,
            "paper": "trigger inversion by DIT: 0/100 (Goel et al. 2025)"}


def _open_trigger_search(ev: Evaluator, targets: list[HeldOut], sources: list[Path], key: str, fresh: bool, seed: int,
                         rerank: int, prerank: str = "gradient") -> dict[str, Any]:
    from metadit.eval.baselines import eval_questions
    from metadit.eval.trigger_search import open_search_section, search_trigger_open, word_tokens, write_search_rows
    from metadit.nn import adapter_disabled

    from rich.console import Console

    words = word_tokens(ev.tok)
    questions = eval_questions(targets[0], 2, seed)
    # Saved after every diff (minutes each on a CPU): a killed evaluation resumes at the next one.
    # the gradient pre-ranking keeps the key it had before there was a choice: its saved searches stay valid
    name, cache_key = "trigger_search_open.json", f"{key}:{rerank}" + ("" if prerank == "gradient" else f":{prerank}")
    saved = None if fresh else _saved(sources, name, cache_key)
    done = {d["diff"]: d for d in (saved["value"] if saved else [])}
    for i, h in enumerate(targets):
        if h.id not in done:
            with adapter_disabled(ev.model):
                (r,) = search_trigger_open(ev.model, ev.tok, [h.diff], [h.meta["code"]], questions, candidates=words,
                                           rerank=rerank, top=min(10, rerank), prerank=prerank)
            done[h.id] = r | {"diff": h.id}
            write_json(sources[0] / name, {"key": cache_key, "value": list(done.values())})
            Console(stderr=True).print(f"trigger search (open) {i + 1}/{len(targets)}: {h.id} code {r['true_code']!r} "
                                       f"rank {r['true_rank']} (template {r['template']}), {r['seconds']:.0f} s")
    write_json(sources[0] / name, {"key": cache_key, "value": list(done.values())})
    per_diff = [done[h.id] for h in targets]
    seen = {h.id: h for h in targets}
    rows_file = write_search_rows(sources[0].parent / "trigger_search_open.jsonl", per_diff, seen, "open")
    return open_search_section(per_diff, seen, len(words), rerank) | {"rows_file": str(rows_file), "prerank": prerank}


def print_summary(result: dict[str, Any], console: Any = None) -> None:
    """Per task and per group of the strict split (strictly gated first): n, the headline score's mean and 95 %
    bootstrap interval, DIT minus the method (paired), and the exact and names-the-topic rates; then, in words,
    whether DIT beats each control (`tables.verdicts`)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from metadit.eval.rows import STRICT_GROUPS
    from metadit.eval.tables import interval_tables, verdicts

    console = console or Console()
    judge = result.get("headline_judge", "embedding")
    for task in sorted({r["task"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["task"] == task]
        score = judge if any(judge in (r.get("scores") or {}) for r in rows) else "exact"
        wanted = list(dict.fromkeys([score, "exact", "names_topic"]))
        tables = interval_tables(rows, wanted)
        head = tables.get(score, {})
        for group, cells in head.items():
            table = Table(title=escape(f"task {task}, {STRICT_GROUPS[group].title}: {score}, mean [95 % interval]"))
            for col in ("method", "n", score, "dit − method (p)", *[w for w in wanted if w != score]):
                table.add_column(escape(col), justify="left" if col == "method" else "right")
            for method, c in cells.items():
                vs = c.get("vs_dit")
                rates = [tables.get(w, {}).get(group, {}).get(method) for w in wanted if w != score]
                table.add_row(escape(method), str(c["n"]), f"{c['mean']:.2f} [{c['low']:.2f}, {c['high']:.2f}]",
                              f"{vs['difference']:+.2f} (p={vs['p']:.3g})" if vs else "-",
                              *(f"{x['mean']:.2f}" if x else "-" for x in rates))
            console.print(table)
            for line in verdicts(cells, score):
                console.print(escape(line))


def eval_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="metadit eval", description=evaluate.__doc__.split("\n")[0])
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(evaluate)
    return parser


def eval_main(argv: list[str]) -> int:
    parser = eval_parser()
    cfg = parser.parse_args(argv)
    kwargs = {k: v for k, v in vars(parser.instantiate_classes(cfg)).items() if k != "config"}
    evaluate(**kwargs)
    return 0
