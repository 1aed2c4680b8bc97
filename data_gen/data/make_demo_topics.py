"""Write `demo_topics.json`: topics for `make demo` that share no content word with any topic of the headline bank.

The demo evaluates the shipped adapter (`smollm2-topic`, trained on `banks/smol_topic`) on a fresh bank. Its
topics must be ones the adapter never trained or validated on; this takes the stronger rule: no topic whose
content words (`metadit.text.match.content_words`, plural-insensitive) meet any of the headline bank's
topics, train, validation and test alike. The headline bank's topics are a function of its seed and size
(`HiddenTopicRecipe.spec`), so no model is needed. Deterministic:

    python data_gen/data/make_demo_topics.py     # from the repository root
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from data_gen.hidden_topic import HiddenTopicRecipe
from metadit.text.match import content_words, forms

HERE = Path(__file__).parent
HEADLINE_CONFIG = HERE.parents[1] / "configs" / "gen" / "smol_topic.yaml"
PER_CATEGORY, CATEGORIES = 1, 24


def headline_topics() -> set[str]:
    """Every topic the headline bank holds when complete: configs/gen/smol_topic.yaml's recipe, seed and n_diffs."""
    config = yaml.safe_load(HEADLINE_CONFIG.read_text())
    recipe = HiddenTopicRecipe(**config["recipe"].get("init_args", {}))
    return {recipe.spec(i, config["seed"])["topic"] for i in range(config["n_diffs"])}


def main() -> None:
    used = headline_topics()
    used_forms = {f for t in used for w in content_words(t) for f in forms(w)}
    topics = json.loads((HERE / "topics.json").read_text())
    rng = random.Random("demo-topics")
    demo: dict[str, list[str]] = {}
    for category in sorted(topics):
        free = [t for t in topics[category] if not any(forms(w) & used_forms for w in content_words(t))]
        if free:
            demo[category] = sorted(rng.sample(free, min(PER_CATEGORY, len(free))))
    chosen = dict(sorted(rng.sample(sorted(demo.items()), min(CATEGORIES, len(demo)))))
    (HERE / "demo_topics.json").write_text(json.dumps(chosen, indent=1) + "\n")
    print(f"{sum(map(len, chosen.values()))} demo topics in {len(chosen)} categories "
          f"(none shares a content word with the {len(used)} topics of the headline bank)")


if __name__ == "__main__":
    main()
