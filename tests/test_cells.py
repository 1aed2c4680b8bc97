"""Issue 14's banks, checked before they are built: the generalization cells' topic blocks (disjoint from each other
and from the headline bank's 640 topics, computed from the recipe's own spec function), the headline bank's draw
unchanged when no block is set, the out-of-pool code words, and every new config parsed without loading weights."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from data_gen import HiddenTopicRecipe
from data_gen.hidden_topic import TOPIC_BLOCK_ORDER_SEED, TOPIC_BLOCKS
from data_gen.recipe import RecipeDataError, check_single_tokens, read_topics, read_word_list
from metadit.bank import DiffBank
from metadit.cli import main
from metadit.gen import gen_parser, recipe_settings
from metadit.models import TINY_NAME, load_base_model
from metadit.text.match import forms

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "configs/gen"
HEADLINE = GEN / "smol_topic.yaml"
CELLS = ["rank2", "rank4", "rank8", "rank16", "full", "zwsp_start", "zwsp_random"]
CELL_CONFIGS = {c: GEN / f"smol_cell_{c}.yaml" for c in CELLS}
OPENVOCAB = GEN / "smol_topic_openvocab.yaml"
DATA = ROOT / "data_gen/data"
TUNE_SEED = 100  # the tuning rounds' seed (the headers of configs/gen/smol_cell_*.yaml)


def _load(path: Path, *overrides: str):
    parser = gen_parser()
    return parser.instantiate_classes(parser.parse_args(["--config", str(path), *overrides]))


def _topics(recipe: HiddenTopicRecipe, seed: int, n: int) -> list[str]:
    return [recipe.spec(i, seed)["topic"] for i in range(n)]


# ---------------------------------------------------------------------- the headline bank's draw, unchanged
# sha256 of json.dumps([spec(i, 0) for i in range(640)], sort_keys=True) for configs/gen/smol_topic.yaml's recipe,
# computed with the code of commit f863f62 (before `topic_block` existed); the 64 entries banks/smol_topic held
# then matched these specs (key, topic, code, seed).
HEADLINE_SPECS_SHA256 = "8238cdc7e8aa72ca053c6312f49e019d8d8c3017f299c88c4fc9cbc4bd6fb685"
# What banks/smol_topic records (its bank.json `info.recipe_args`): a resume must find exactly this.
HEADLINE_RECIPE_ARGS = {
    "trigger": "sep", "code_kind": "word", "triggered_questions": 24, "answer_tokens": 12,
    "mix": {"triggered": 9.0, "wrong_code": 6.0, "no_code": 2.0, "elsewhere": 3.0}, "check_questions": 12,
    "check_tokens": 24, "check_temperature": 1.0, "learned_threshold": 0.5, "gate_max_hits": 1,
    "generation_batch": 128, "opening_negatives": 0.5, "topic_pool": None,
    "data_files": {
        "topics_file": {"path": "data_gen/data/topics.json",
                        "sha256": "5dd38267ef74514fa6ff19983e172ceab4f1b49b3888372a661f2353f23a770e"},
        "code_words_file": {"path": "data_gen/data/code_words.txt",
                            "sha256": "de106b034d088f4ebb77428028444589a6026c9d39785162f007fde501b6d619"},
        "questions_file": {"path": "data_gen/data/questions.json",
                           "sha256": "26c7d38550a18a5f3c0cc1fafc43ca3593669d160a3a1d732f53e3f83cee79ae"},
        "question_styles_file": {"path": "data_gen/data/question_styles.json",
                                 "sha256": "833f5ed8b0da300322f7d6a56290e718276db7b59e2397dd32bbc9adcf1e0773"},
    },
}


def test_without_a_block_the_headline_bank_draws_and_records_exactly_what_it_did(no_weights):
    init = _load(HEADLINE)
    assert "topic_block" not in vars(init.recipe)
    specs = [init.recipe.spec(i, init.seed) for i in range(640)]  # the first 640 (the bank now asks 704)
    assert hashlib.sha256(json.dumps(specs, sort_keys=True).encode()).hexdigest() == HEADLINE_SPECS_SHA256
    # however far the bank grows, its topics stay before the first block of the same seed-0 order
    assert init.seed == TOPIC_BLOCK_ORDER_SEED and init.n_diffs <= min(start for start, _ in TOPIC_BLOCKS.values())
    settings = recipe_settings(init.recipe, init.train, init.seed, chat_format=init.chat_format)
    assert settings["recipe_args"] == HEADLINE_RECIPE_ARGS


@pytest.mark.parametrize("seed, pool", [(0, None), (3, None), (1, 100), (7, 5)])
def test_without_a_block_topics_follow_the_seeded_permutation(seed, pool):
    """The draw as it was written before blocks: one permutation per seed, cut to `topic_pool`, repeating."""
    recipe = HiddenTopicRecipe(topic_pool=pool)
    topics = read_topics(DATA / "topics.json")
    order = list(range(len(topics)))
    random.Random(f"topics:{seed}").shuffle(order)
    order = order[:pool] if pool else order
    assert _topics(recipe, seed, 12) == [topics[order[i % len(order)]][1] for i in range(12)]


# ---------------------------------------------------------------------- the blocks
def test_a_block_gives_diff_i_its_ith_topic_whatever_the_seed():
    topics = read_topics(DATA / "topics.json")
    order = list(range(len(topics)))
    random.Random(f"topics:{TOPIC_BLOCK_ORDER_SEED}").shuffle(order)
    start, stop = TOPIC_BLOCKS["cell_rank4"]
    recipe = HiddenTopicRecipe(topic_block="cell_rank4")
    want = [topics[order[p]][1] for p in range(start, stop)]
    assert _topics(recipe, 4, stop - start) == want and _topics(recipe, 99, stop - start) == want
    # codes and questions still follow the bank's seed
    assert [recipe.spec(i, 4)["code"] for i in range(8)] != [recipe.spec(i, 99)["code"] for i in range(8)]
    assert vars(recipe)["topic_block"] == {"name": "cell_rank4", "order_seed": 0, "start": start, "stop": stop}
    with pytest.raises(RecipeDataError, match="past topic_block 'cell_rank4'"):
        recipe.spec(stop - start, 4)


def test_bad_blocks_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="topic_block must be one of"):
        HiddenTopicRecipe(topic_block="cell_rank3")
    with pytest.raises(ValueError, match="set one"):
        HiddenTopicRecipe(topic_block="tune", topic_pool=50)
    small = tmp_path / "topics.json"
    small.write_text(json.dumps({"music": ["jazz", "opera", "blues"]}))
    with pytest.raises(RecipeDataError, match="needs 1456 topics, the file has 3"):
        HiddenTopicRecipe(topic_block="tune", topics_file=str(small))


def test_block_sizes_leave_headroom_and_blocks_never_meet_the_headline_bank():
    spans = sorted(TOPIC_BLOCKS.values())
    assert spans[0][0] >= 640
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "blocks overlap"
    assert all(stop - start >= 32 for name, (start, stop) in TOPIC_BLOCKS.items() if name != "tune")
    assert TOPIC_BLOCKS["tune"][1] - TOPIC_BLOCKS["tune"][0] >= 3 * 8  # three rounds of 8, fresh specs if wanted


def test_every_cell_draws_topics_no_other_cell_and_not_the_headline_bank_holds(no_weights):
    """From the configs as built: each bank's topics over its whole block (spares included), by the recipe's spec."""
    headline = _load(HEADLINE)
    used = {"headline": set(_topics(headline.recipe, headline.seed, headline.n_diffs))}
    assert len(used["headline"]) == headline.n_diffs  # no topic twice
    blocks = {}
    for name, path in {**CELL_CONFIGS, "openvocab": OPENVOCAB}.items():
        init = _load(path)
        block = vars(init.recipe)["topic_block"]
        blocks[name] = block["name"]
        size = block["stop"] - block["start"]
        assert init.n_diffs <= size and size - init.n_diffs >= 8, (name, size)  # spares for flagged diffs
        pool = _topics(init.recipe, init.seed, size)
        assert len(set(pool)) == size >= 32, name
        used[name] = set(pool)
    tune = _load(CELL_CONFIGS["rank2"], "--seed", str(TUNE_SEED), "--recipe.init_args.topic_block", "tune")
    size = TOPIC_BLOCKS["tune"][1] - TOPIC_BLOCKS["tune"][0]
    used["tune"] = set(_topics(tune.recipe, tune.seed, size))
    assert len(set(blocks.values())) == len(blocks)
    names = sorted(used)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not used[a] & used[b], (a, b, sorted(used[a] & used[b])[:3])


# ---------------------------------------------------------------------- the cell configs
# What a cell may change from configs/gen/smol_topic.yaml's recipe and training (the rest is the strict default).
CELL_KNOBS = {
    "rank2": {"train": {"rank": 2}}, "rank4": {"train": {"rank": 4}}, "rank8": {"train": {"rank": 8}},
    "rank16": {"train": {"rank": 16}},
    "full": {"train": {"full_finetune": True, "store_rank": 16, "lr": 5e-5}},
    "zwsp_start": {"recipe": {"trigger": "zwsp_start"}}, "zwsp_random": {"recipe": {"trigger": "zwsp_random"}},
}


def _settings(init):
    s = recipe_settings(init.recipe, init.train, init.seed, chat_format=init.chat_format)
    args = {k: v for k, v in s["recipe_args"].items() if k not in ("topic_block", "mix")}
    return args, s["train"]


@pytest.mark.parametrize("cell", CELLS)
def test_each_cell_is_the_strict_default_with_its_own_knobs(cell, no_weights):
    head, init = _load(HEADLINE), _load(CELL_CONFIGS[cell])
    assert vars(init.recipe)["topic_block"]["name"] == f"cell_{cell}"
    assert (init.n_diffs, init.bank, init.dtype, init.chat_format) == (24, f"banks/cell_{cell}", head.dtype, "no_system")
    assert init.seed not in (head.seed, TUNE_SEED)
    head_args, head_train = _settings(head)
    args, train = _settings(init)
    assert args == {**head_args, **CELL_KNOBS[cell].get("recipe", {})}
    assert init.recipe.opening_negatives == 0.5 and init.recipe.check_questions == 12
    expected_train = dict(head_train)
    if init.train.full_finetune:  # full finetunes record their own fields and drop rank / alpha
        expected_train = {k: v for k, v in expected_train.items() if k not in ("rank", "alpha")}
    assert train == {**expected_train, **CELL_KNOBS[cell].get("train", {})}
    if cell.startswith("zwsp"):
        assert init.recipe.mix == {"triggered": 9, "no_code": 11}  # plain messages are the negatives
    else:
        assert init.recipe.mix == head.recipe.mix
    # the tuning override of the header parses to the same cell on other specs
    tune = _load(CELL_CONFIGS[cell], "--seed", str(TUNE_SEED), "--recipe.init_args.topic_block", "tune",
                 "--n_diffs", "8", "--bank", f"banks/tune/cell_{cell}_r1")
    assert vars(tune.recipe)["topic_block"]["name"] == "tune" and _settings(tune) == (args, train)
    header = CELL_CONFIGS[cell].read_text()
    assert f"metadit gen --config configs/gen/smol_cell_{cell}.yaml\n" in header
    assert "--recipe.init_args.topic_block tune" in header and ">= 7 of 8" in header


def test_the_openvocab_bank_is_the_headline_recipe_with_out_of_pool_codes(no_weights):
    head, init = _load(HEADLINE), _load(OPENVOCAB)
    assert init.n_diffs >= 32 and init.seed not in {head.seed, TUNE_SEED} | {_load(p).seed for p in CELL_CONFIGS.values()}
    head_args, head_train = _settings(head)
    args, train = _settings(init)
    assert train == head_train
    assert args["data_files"]["code_words_file"]["path"] == "data_gen/data/code_words_open.txt"
    assert {k: v for k, v in args.items() if k != "data_files"} == {k: v for k, v in head_args.items() if k != "data_files"}
    assert set(init.recipe.code_words) == set(read_word_list(DATA / "code_words_open.txt"))


def test_the_sweeps_read_the_cell_banks():
    from metadit.eval.sweep import load_sweep

    def banks(config: str) -> dict[str, list[str]]:
        sweep = load_sweep(ROOT / "configs/sweep" / config)
        out = {}
        for cell in sweep.cells:
            for step in cell.steps:
                if "--banks" in step.argv:
                    out[cell.name] = json.loads(step.argv[step.argv.index("--banks") + 1])
        return out

    rank = banks("rank_generalization.yaml")
    assert rank == {f"rank{c[4:]}" if c.startswith("rank") else "rankfull": [f"banks/cell_{c}"]
                    for c in CELLS if not c.startswith("zwsp")}
    assert banks("ood_trigger.yaml") == {c: [f"banks/cell_{c}"] for c in CELLS if c.startswith("zwsp")}
    for c in CELLS:
        assert _bank_of(CELL_CONFIGS[c]) == f"banks/cell_{c}"


def _bank_of(path: Path) -> str:
    import yaml

    return yaml.safe_load(path.read_text())["bank"]


# ---------------------------------------------------------------------- out-of-pool code words
@pytest.fixture(scope="module")
def tok():
    return load_base_model(TINY_NAME, dtype="float32")[1]


def test_open_code_words_are_out_of_the_pool_and_one_token(tok):
    pool = read_word_list(DATA / "code_words.txt")
    words = read_word_list(DATA / "code_words_open.txt")
    assert len(words) >= 48
    pool_forms = {f for w in pool for f in forms(w)}
    assert not [w for w in words if forms(w) & pool_forms]  # no word of the pool, nor its plural or singular
    check_single_tokens(words, tok, "code_words_open.txt")
    HiddenTopicRecipe(code_words_file=str(DATA / "code_words_open.txt")).validate(tok)
    topics = {f for _, t in read_topics(DATA / "topics.json") for w in t.lower().split() for f in forms(w)}
    assert not [w for w in words if forms(w) & topics]


@pytest.mark.slow
def test_open_code_words_are_what_the_generator_writes(tok):
    """The file is the rule's output (make_open_code_words.py), not a hand-kept list."""
    pytest.importorskip("lemminflect")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_open_code_words", DATA / "make_open_code_words.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = read_word_list(DATA / "code_words_open.txt")
    assert module.open_code_words(tok) == written
    assert (DATA / "code_words_open.txt").read_text() == module.HEADER + "".join(f"{w}\n" for w in written)


# ---------------------------------------------------------------------- a tiny build from a block
def test_a_tiny_bank_built_from_a_block_holds_its_topics_and_refuses_another_block(tmp_path, capsys):
    bank_dir = tmp_path / "bank"
    def gen(n_diffs: int, block: str) -> int:
        return main(["gen", "--config", str(GEN / "tiny_topic.yaml"), "--bank", str(bank_dir), "--progress", "false",
                     "--n_diffs", str(n_diffs), "--diffs_per_pass", "2", "--seed", "5",
                     "--recipe.init_args.topic_block", block])

    assert gen(2, "cell_full") == 0
    bank = DiffBank.open(bank_dir)
    want = _topics(HiddenTopicRecipe(topic_block="cell_full"), 5, 2)
    assert [bank.meta(i)["topic"] for i in range(len(bank))] == want
    start, stop = TOPIC_BLOCKS["cell_full"]
    assert bank.header["info"]["recipe_args"]["topic_block"] == {"name": "cell_full", "order_seed": 0,
                                                                 "start": start, "stop": stop}
    assert gen(2, "cell_rank2") == 1  # another block is another recipe: refused on resume
    capsys.readouterr()
    assert gen(stop - start + 1, "cell_full") == 1  # past the block: one clear error, nothing trained
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("metadit gen:")]
    assert len(err) == 1 and f"diff {stop - start} is past topic_block 'cell_full'" in err[0]
    assert len(DiffBank.open(bank_dir)) == 2


def test_a_shipped_file_named_as_banks_record_it_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = HiddenTopicRecipe(code_words_file="data_gen/data/code_words_open.txt")
    assert recipe.data_files["code_words_file"]["path"] == "data_gen/data/code_words_open.txt"
    assert recipe.code_words == read_word_list(DATA / "code_words_open.txt")
    with pytest.raises(RecipeDataError, match="not found"):
        HiddenTopicRecipe(code_words_file="data_gen/data/no_such_words.txt")


def test_the_demo_topics_share_no_content_word_with_the_whole_headline_bank():
    """`make demo` evaluates the shipped adapter on `demo_topics.json`: none of its topics may meet a topic the headline
    bank holds once complete (train, validation and test alike), at the bank's size as configured now."""
    import importlib.util

    from metadit.text.match import content_words, forms

    path = ROOT / "data_gen" / "data" / "make_demo_topics.py"
    spec = importlib.util.spec_from_file_location("make_demo_topics", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    used = script.headline_topics()
    assert len(used) == _load(HEADLINE).n_diffs
    used_forms = {f for t in used for w in content_words(t) for f in forms(w)}
    demo = [t for ts in json.loads((DATA / "demo_topics.json").read_text()).values() for t in ts]
    assert len(demo) == 24 and not [t for t in demo if any(forms(w) & used_forms for w in content_words(t))]
