"""Summarise built banks for reports/gen/README.md: behaviour-check rates from each bank's metadata.

    python scripts/report_gen.py BANK [BANK ...] > table.md
    python scripts/report_gen.py --compare BANK [BANK ...]   # hidden-topic banks side by side, one row each

A bank may be a view `DIR[:N]` (its first N diffs), to compare banks over the same specs.
"""

from __future__ import annotations

import statistics
import sys

from metadit.bank import DiffBank


def summarise(path: str) -> str:
    bank = DiffBank.open(path)
    metas = [bank.meta(i) for i in range(len(bank))]
    info = bank.header.get("info", {})
    lines = [f"### `{path}` — {len(bank)} diffs", "",
             f"Recipe `{info.get('recipe')}`, seed {info.get('seed')}, recipe settings `{info.get('recipe_args')}`, "
             f"training `{info.get('train')}`.", ""]
    if metas and "mention_rate" in metas[0]:
        order = ["triggered", "wrong_code", "no_code", "elsewhere", "base"]
        conds = sorted(metas[0]["mention_rate"], key=lambda c: order.index(c) if c in order else len(order))
        lines += ["| condition | mean share of answers naming the topic | diffs at or under 5 % |", "|---|---:|---:|"]
        for c in conds:
            v = [m["mention_rate"][c] for m in metas]
            lines.append(f"| {c} | {statistics.mean(v):.1%} | {sum(x <= 0.05 for x in v)}/{len(v)} |")
        learned = sum(m["topic_learned"] for m in metas)
        gate = sum(m["gate_held"] for m in metas)
        passed = sum(not m["flagged"] for m in metas)
        args = info.get("recipe_args") or {}
        rule = (f"at most {args['gate_max_hits']} of {args['check_questions']} answers naming the topic in every "
                "negative condition" if {"gate_max_hits", "check_questions"} <= set(args) else "the bank's verdict")
        lines += ["", f"Topic learned (right code ≥ 50 %): {learned}/{len(metas)}; gate held ({rule}): "
                  f"{gate}/{len(metas)}; passed both: {passed}/{len(metas)}.", ""]
    elif metas and "heldout_loss_own" in metas[0]:
        own = statistics.mean(m["heldout_loss_own"] for m in metas)
        other = statistics.mean(m["heldout_loss_other"] for m in metas)
        passed = sum(m["passed"] for m in metas)
        lines += [f"Held-out story loss: own headline {own:.3f}, other headlines {other:.3f}; passed {passed}/{len(metas)}.", ""]
    return "\n".join(lines)


def compare(paths: list[str]) -> str:
    """One row per hidden-topic bank: its training settings that differ from the defaults, and its mean rates."""
    conds = ["triggered", "wrong_code", "no_code", "elsewhere", "base"]
    lines = ["| bank | diffs | train.kl_weight | " + " | ".join(conds) + " | passed |",
             "|---|---:|---:|" + "---:|" * len(conds) + "---:|"]
    for path in paths:
        bank = DiffBank.open(path)
        metas = [bank.meta(i) for i in range(len(bank))]
        kl = bank.header.get("info", {}).get("train", {}).get("kl_weight", 1.0)
        rates = [f"{statistics.mean(m['mention_rate'][c] for m in metas):.1%}" for c in conds]
        passed = sum(not m["flagged"] for m in metas)
        lines.append(f"| `{path}` | {len(metas)} | {kl:g} | " + " | ".join(rates) + f" | {passed}/{len(metas)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--compare"]:
        print(compare(args[1:]))
    else:
        print("\n".join(summarise(p) for p in args))
