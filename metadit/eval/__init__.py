"""Evaluation on held-out diffs: judges, the paper's baselines, likelihood ranking, answer verification,
trigger search, the activation difference lens; sweeps and reports."""
