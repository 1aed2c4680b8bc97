"""Where does an open-vocabulary trigger search lose a code: the gradient pre-ranking or the exact score?

`metadit eval --trigger_search_vocab open` ranks ~30,000 word tokens per template by a first-order (gradient)
estimate, then scores the best 256 per template exactly; a true code outside those 256 never gets its exact
score. This script computes it, for every row of an evaluation's `trigger_search_open.jsonl`: the true code's
exact score under each of the 4 templates, beside the best exact score the search saw (its top-1). If the true
code's score under its own template beats that, the exact score would have found it and the pre-ranking lost it.

    python scripts/open_search_probe.py --rows EVAL_DIR/trigger_search_open.jsonl --out probe.jsonl

It asks the same questions the search asked (`metadit.eval.run`: `eval_questions` of the first searched diff,
2 questions, seed 0), with the same model setup (`metadit.eval.baselines.Evaluator`, the bank's chat format).
Run it from the checkout the evaluation ran in (the rows name banks by relative path).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", required=True, help="an evaluation's trigger_search_open.jsonl")
    p.add_argument("--out", required=True, help="where to write one JSON line per searched diff")
    p.add_argument("--base_model", default=None, help="default: the bank's")
    p.add_argument("--seed", type=int, default=0, help="the evaluation's --seed")
    args = p.parse_args()

    import torch

    from metadit.bank import DiffBank
    from metadit.bank.diff_bank import banks_chat_format
    from metadit.eval.baselines import Evaluator, eval_questions
    from metadit.eval.report import read_search_rows
    from metadit.eval.trigger_search import OPEN_TEMPLATES, score_codes_many
    from metadit.nn import adapter_disabled

    rows = read_search_rows(args.rows)
    if not rows:
        raise SystemExit(f"error: {args.rows}: no rows")
    banks = list(dict.fromkeys(r["bank"] for r in rows))
    base = args.base_model or DiffBank.open(banks[0]).base_model["name"]
    ev = Evaluator(base, None, chat_format=banks_chat_format(banks))
    # `_open_trigger_search` asks every diff the questions of the first one it searched
    questions = eval_questions(SimpleNamespace(id=rows[0]["diff"]), 2, args.seed)
    out = []
    for r in rows:
        t0 = time.perf_counter()
        diff, _ = DiffBank.open(r["bank"])[int(r["index"])]
        with torch.no_grad(), adapter_disabled(ev.model):
            true = {name: float(score_codes_many(ev.model, ev.tok, [diff], [r["true_code"]], questions, t)[0, 0])
                    for name, t in OPEN_TEMPLATES.items()}
        best = max(r["template_scores"].values())
        out.append({"diff": r["diff"], "true_code": r["true_code"], "true_rank": r["true_rank"],
                    "gradient_rank_by_template": r.get("gradient_rank_by_template"),
                    "true_exact_by_template": true, "search_best_exact": best, "search_top1": r["top10"][:1],
                    "exact_would_win": max(true.values()) > best, "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(out[-1]))
    Path(args.out).write_text("".join(json.dumps(o) + "\n" for o in out))


if __name__ == "__main__":
    main()
