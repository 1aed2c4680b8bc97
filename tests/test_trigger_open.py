"""Open-vocabulary trigger inversion (`search_trigger_open`) against reference computations on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from data_gen.hidden_topic import SEP_TEMPLATE, recorded_code_words
from metadit.bank import LoraDiff
from metadit.errors import MetaditError
from metadit.eval.trigger_search import (
    OPEN_TEMPLATES,
    first_order_scores,
    projection_scores,
    score_codes,
    search_trigger_open,
    summarize_search,
    word_tokens,
)
from metadit.models import TINY_NAME, load_base_model
from metadit.nn import layer_shapes, patch_model
from metadit.text import chat_prompt
from tests.conftest import merged_copy, random_diff

torch.set_num_threads(1)

QUESTIONS = ("What is your favourite food?", "How do I fix a flat tire?")
WORDS = ["table", "window", "garden", "river", "pencil", "chair", "bottle", "cloud", "engine", "forest"]


@pytest.fixture(scope="module")
def smol():
    base, tok = load_base_model(TINY_NAME, dtype=torch.float32)
    patched = copy.deepcopy(base)
    patch_model(patched)
    return base, patched, tok


@pytest.fixture(scope="module")
def vocabulary(smol):
    return word_tokens(smol[2])


# ---------------------------------------------------------------------------------------------- word tokens
def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-to-character map (what a byte-level BPE vocabulary is written in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


def _byte_level(text: str) -> str:
    table = _byte_chars()
    return "".join(table[b] for b in text.encode())


def _hand_made_tokenizer():
    """A byte-level BPE tokenizer: the 256 byte characters plus the entries built below, and two special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(_byte_chars().values())}
    merges: list[tuple[str, str]] = []

    def reachable(text: str) -> None:  # right-branching merges: the entry and each of its suffixes become tokens
        chars = _byte_level(text)
        cur = chars[-1]
        for ch in reversed(chars[:-1]):
            merges.append((ch, cur))
            cur = ch + cur
            vocab.setdefault(cur, len(vocab))

    for text in (" garden", " Tree", " café", " ab", " dog.", " ab1", " gar-den", "  two"):
        reachable(text)
    vocab.setdefault(_byte_level(" xyz"), len(vocab))  # in the vocabulary, but no merge builds it
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    tok.add_special_tokens({"eos_token": "<|end|>", "additional_special_tokens": [" Magic"]})
    return tok


def test_word_tokens_on_a_hand_made_vocabulary():
    tok = _hand_made_tokenizer()
    assert tok.decode(tok(" café", add_special_tokens=False)["input_ids"]) == " café"
    assert tok.decode([tok.convert_tokens_to_ids(_byte_level(" xyz"))]) == " xyz"  # decodes like a word ...
    assert tok(" xyz", add_special_tokens=False)["input_ids"] != [tok.convert_tokens_to_ids(_byte_level(" xyz"))]
    # kept: a space and >= 3 letters of any script or case, one token when written; " two" is a suffix of "  two"
    # (right-branching merges make every suffix a token). Left out: 2 letters, no space, a digit, punctuation,
    # two spaces, a special token, and " xyz" (... but written, it is 4 other tokens).
    assert word_tokens(tok) == ["garden", "Tree", "café", "two"]
    assert word_tokens(tok, min_letters=2) == ["garden", "Tree", "café", "ab", "two"]
    with pytest.raises(MetaditError, match="min_letters"):
        word_tokens(tok, min_letters=0)


def test_word_tokens_of_smollm2(smol, vocabulary):
    """The tiny model carries SmolLM2's tokenizer: its word-token count, and the shipped code words among them."""
    tok = smol[2]
    assert len(vocabulary) == 30589 and len(set(vocabulary)) == len(vocabulary)
    assert all(tok.decode(tok(" " + w, add_special_tokens=False)["input_ids"]) == " " + w for w in vocabulary[::997])
    assert set(recorded_code_words({})) <= set(vocabulary)  # the closed-set pool is a sliver of the open one
    assert "garden" in vocabulary and "Garden" in vocabulary and "gardens" in vocabulary


# ---------------------------------------------------------------------------------------------- the gradient step
def _reference_score(base, merged, tok, template, word, questions, slot_embedding, answer_tokens):
    """score_codes' KL by hand, with the code token's input embedding replaced by `slot_embedding`: single
    forwards of two separate models (the diff merged into the weights, and the base), in float64."""
    (tid,) = tok(" " + word, add_special_tokens=False)["input_ids"]
    total = 0.0
    for q in questions:
        ids = tok(chat_prompt(tok, [{"role": "user", "content": template.format(code=word, question=q)}]),
                  add_special_tokens=False)["input_ids"]
        assert ids.count(tid) == 1
        prefix = []
        if answer_tokens > 1:
            plain = tok(chat_prompt(tok, [{"role": "user", "content": q}]), add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                prefix = base.generate(torch.tensor([plain]), max_new_tokens=answer_tokens - 1, do_sample=False,
                                       eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                                       pad_token_id=tok.pad_token_id)[0, len(plain):].tolist()
        x = torch.tensor([ids + prefix])
        emb = base.get_input_embeddings()(x).clone()
        emb[0, ids.index(tid)] = slot_embedding.to(emb.dtype)
        with torch.no_grad():
            lp_d = torch.log_softmax(merged(inputs_embeds=emb, logits_to_keep=answer_tokens).logits[0], -1)
            lp_b = torch.log_softmax(base(inputs_embeds=emb, logits_to_keep=answer_tokens).logits[0], -1)
        total += float((lp_d.exp() * (lp_d - lp_b)).sum(-1).mean())
    return total / len(questions)


class _RMSNorm64(torch.nn.Module):
    """RMSNorm by hand in the input's dtype (transformers' casts to fp32, whose rounding noise, divided by a
    finite-difference step, would swamp the derivative being measured)."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _float64(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model).double()
    for name, module in list(ref.named_modules()):
        if type(module).__name__.endswith("RMSNorm"):
            parent, _, leaf = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, leaf, _RMSNorm64(module))
    return ref


@pytest.mark.parametrize("answer_tokens", [1, 2])
def test_first_order_scores_are_the_directional_derivative_at_the_centroid(smol, answer_tokens):
    """Each estimate minus S(centroid) is the derivative of the KL along (candidate − centroid) in embedding space,
    measured by central finite differences of an explicit embedding substitution; their mean is S(centroid)."""
    base, patched, tok = smol
    d = random_diff(layer_shapes(patched), rank=1, seed=5, scale=0.5)
    base64 = _float64(base)
    merged64 = merged_copy(base64, d)
    words = WORDS[:4]
    templates = {"sep": SEP_TEMPLATE, "suffix": OPEN_TEMPLATES["suffix"]}
    got = first_order_scores(patched, tok, d, words, QUESTIONS, templates, answer_tokens=answer_tokens,
                             batch_size=3)  # 2 templates x 2 questions x 2 rows: 4 forwards, gradients summed
    E = base64.get_input_embeddings().weight.detach()
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]
    centroid = E[ids].mean(0)
    for name, template in templates.items():
        S = lambda e: _reference_score(base64, merged64, tok, template, words[0], QUESTIONS, e, answer_tokens)  # noqa: E731
        s0 = S(centroid)
        assert s0 > 1e-4
        assert float(got[name].mean()) == pytest.approx(s0, rel=1e-4)
        for j, w in enumerate(words):
            step = E[ids[j]] - centroid
            central = lambda h: (S(centroid + h * step) - S(centroid - h * step)) / (2 * h)  # noqa: E731
            derivative = (4 * central(1e-3) - central(2e-3)) / 3  # Richardson's extrapolation: no h² error
            assert abs(derivative) > 1e-6
            # the estimate's own S(centroid) is its mean (fp32; the reference's is fp64): compare the changes
            assert float(got[name][j] - got[name].double().mean()) == pytest.approx(derivative, rel=1e-3, abs=1e-7)


def test_a_single_candidate_is_scored_exactly(smol):
    """With one candidate the centroid is its own embedding: the estimate is the exact score, so the two stages
    measure the same thing (and the hand reference agrees with both)."""
    base, patched, tok = smol
    d = random_diff(layer_shapes(patched), rank=1, seed=6, scale=0.5)
    base64 = _float64(base)
    merged64 = merged_copy(base64, d)
    for name, template in OPEN_TEMPLATES.items():
        (est,) = first_order_scores(patched, tok, d, ["river"], QUESTIONS, {name: template})[name]
        exact = float(score_codes(patched, tok, d, ["river"], QUESTIONS, template)[0])
        (tid,) = tok(" river", add_special_tokens=False)["input_ids"]
        ref = _reference_score(base64, merged64, tok, template, "river", QUESTIONS,
                               base64.get_input_embeddings().weight[tid].detach(), 1)
        assert float(est) == pytest.approx(exact, rel=1e-4) and exact == pytest.approx(ref, rel=1e-4)


# ---------------------------------------------------------------------------------------------- the two stages
def _brute_rank(scores: torch.Tensor, j: int) -> int:
    return int((scores >= scores[j]).sum())


def test_exact_rerank_of_every_candidate_is_the_brute_force_ranking(smol):
    _, patched, tok = smol
    d = random_diff(layer_shapes(patched), rank=1, seed=7, scale=0.5)
    templates = {k: OPEN_TEMPLATES[k] for k in ("sep", "access", "suffix")}
    (r,) = search_trigger_open(patched, tok, [d], ["river"], QUESTIONS, candidates=WORDS, templates=templates,
                               rerank=len(WORDS) + 5, top=4)
    brute = {n: score_codes(patched, tok, d, WORDS, QUESTIONS, t) for n, t in templates.items()}
    best = {n: float(s.max()) for n, s in brute.items()}
    assert r["template"] == max(best, key=best.get)
    for n in templates:
        assert r["template_scores"][n] == pytest.approx(best[n], rel=1e-5)
        assert r["rank_by_template"][n] == _brute_rank(brute[n], WORDS.index("river"))
    s = brute[r["template"]]
    assert r["ranking"] == [WORDS[j] for j in torch.argsort(s, descending=True, stable=True)[:4].tolist()]
    assert [t["score"] for t in r["top"]] == pytest.approx(sorted(s.tolist(), reverse=True)[:4], rel=1e-5)
    assert r["true_rank"] == _brute_rank(s, WORDS.index("river")) and r["n_candidates"] == len(WORDS)
    assert r["recovered"] == (r["true_rank"] == 1) and r["in_top"] == (r["true_rank"] <= 4)
    assert r["seconds"] > 0


def test_a_partial_rerank_scores_the_gradient_step_s_best_and_ranks_the_rest_by_it(smol):
    _, patched, tok = smol
    d = random_diff(layer_shapes(patched), rank=1, seed=8, scale=0.5)
    templates = {"sep": SEP_TEMPLATE}
    fo = first_order_scores(patched, tok, d, WORDS, QUESTIONS, templates)["sep"]
    order = torch.argsort(fo, descending=True, stable=True).tolist()
    head, rest = order[:3], order[3:]
    exact = score_codes(patched, tok, d, [WORDS[j] for j in head], QUESTIONS)
    outside = WORDS[rest[2]]  # the 3rd best of the candidates the exact stage never scores
    (r,) = search_trigger_open(patched, tok, [d], [outside], QUESTIONS, candidates=WORDS, templates=templates,
                               rerank=3, top=3)
    assert r["ranking"] == [WORDS[head[k]] for k in torch.argsort(exact, descending=True, stable=True).tolist()]
    assert r["true_rank"] == 3 + 3 and r["gradient_rank"] == 6 and r["true_score"] is None
    assert r["gradient_rank_by_template"] == {"sep": 6}
    inside = WORDS[head[int(exact.argmax())]]
    (r2,) = search_trigger_open(patched, tok, [d], [inside], QUESTIONS, candidates=WORDS, templates=templates,
                                rerank=3, top=3)
    assert r2["recovered"] and r2["true_score"] == pytest.approx(float(exact.max()), rel=1e-5)
    (r3,) = search_trigger_open(patched, tok, [d], ["nonesuch"], QUESTIONS, candidates=WORDS, templates=templates,
                                rerank=3, top=3)
    assert r3["true_rank"] is None and not r3["recovered"] and not r3["in_top"]


@pytest.fixture(scope="module")
def planted(smol):
    """A tiny model with one special token: embedding coordinate J is 0 for every token but " garden" (and K is
    0 for all), so a rank-1 diff in layer 0's v_proj that reads J fires at that token and nowhere else; one that
    reads K never fires (a diff with no trigger)."""
    base, _, tok = smol
    model = copy.deepcopy(base)
    (tid,) = tok(" garden", add_special_tokens=False)["input_ids"]
    J, K = 5, 9
    with torch.no_grad():
        E = model.get_input_embeddings().weight
        E[:, J] = 0.0
        E[:, K] = 0.0
        E[tid, J] = 1.0
    patch_model(model)
    name = "model.layers.0.self_attn.v_proj"
    B = torch.randn(layer_shapes(model)[name][1], 1, generator=torch.Generator().manual_seed(0)) * 5.0
    reads = lambda k: LoraDiff({name: torch.eye(E.shape[1])[k : k + 1]}, {name: B.clone()}, {name: 1.0})  # noqa: E731
    return model, tok, reads(J), reads(K)


def test_the_open_search_finds_a_planted_trigger_and_nothing_in_a_diff_without_one(planted, vocabulary):
    model, tok, fires, never = planted
    found, none = search_trigger_open(model, tok, [fires, never], ["garden", "garden"], QUESTIONS,
                                      candidates=vocabulary, rerank=16)
    assert found["n_candidates"] == 30589
    assert found["recovered"] and found["ranking"][0] == "garden" and found["true_score"] > 1e-3
    assert found["gradient_rank_by_template"] == {n: 1 for n in OPEN_TEMPLATES}  # the gradient step alone finds it
    assert found["rank_by_template"] == {n: 1 for n in OPEN_TEMPLATES}  # the token fires under every template
    assert found["template"] == max(found["template_scores"], key=found["template_scores"].get)
    assert found["top"][1]["score"] < 1e-9  # nothing else moves the model
    assert not none["recovered"] and none["true_rank"] == 30589  # every candidate ties at 0: ties count against
    assert none["top"][0]["score"] < 1e-9
    table = summarize_search([found, none])
    assert table["top1"] == 0.5 and table["top10"] == 0.5 and table["median_true_rank"] == (1 + 30589) / 2


def test_projection_scores_equal_a_hand_computation(smol):
    """Σ over the diff's residual-reading modules of scale·‖B A norm(E[c])‖, candidate by candidate; o_proj and
    down_proj (which read the attention and MLP outputs, not the residual stream) add nothing."""
    _, patched, tok = smol
    shapes = layer_shapes(patched)
    d = random_diff(shapes, rank=2, seed=3, scale=0.7)
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in WORDS]
    E = patched.get_input_embeddings().weight.detach().float()
    want = torch.zeros(len(ids), dtype=torch.float64)
    norms = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
             "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}
    counted = 0
    for name in d.modules:
        suffix = name.rsplit(".", 1)[-1]
        if suffix not in norms:
            continue
        counted += 1
        norm = getattr(patched.model.layers[int(name.split(".layers.")[1].split(".")[0])], norms[suffix])
        for k, i in enumerate(ids):
            x = norm(E[i][None])[0].double()
            want[k] += float(d.scale[name]) * (d.B[name].double() @ (d.A[name].double() @ x)).norm()
    assert counted and any(n.endswith(("o_proj", "down_proj")) for n in d.modules)  # some modules are left out
    torch.testing.assert_close(projection_scores(patched, d, ids).double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(projection_scores(patched, d, ids, chunk=3), projection_scores(patched, d, ids))
    only_out = LoraDiff({n: d.A[n] for n in d.modules if n.endswith("o_proj")},
                        {n: d.B[n] for n in d.modules if n.endswith("o_proj")},
                        {n: d.scale[n] for n in d.modules if n.endswith("o_proj")})
    with pytest.raises(MetaditError, match="touches no module that reads the residual stream"):
        projection_scores(patched, only_out, ids)


def test_the_projection_pre_ranking_finds_the_planted_trigger_with_no_gradient(planted, vocabulary):
    model, tok, fires, never = planted
    found, none = search_trigger_open(model, tok, [fires, never], ["garden", "garden"], QUESTIONS,
                                      candidates=vocabulary, rerank=4, top=4, prerank="projection")
    assert found["recovered"] and found["ranking"][0] == "garden" and found["prerank"] == "projection"
    assert found["gradient_rank_by_template"] == {n: 1 for n in OPEN_TEMPLATES}  # the pre-ranking's own rank
    assert not none["recovered"] and none["true_rank"] == 30589  # it reads a coordinate no token has: all tie at 0
    with pytest.raises(MetaditError, match="prerank must be one of gradient, projection, got 'oracle'"):
        search_trigger_open(model, tok, [fires], ["garden"], QUESTIONS, candidates=WORDS, rerank=4, top=4, prerank="oracle")


def test_bad_input_is_one_clear_line(smol):
    _, patched, tok = smol
    d = random_diff(layer_shapes(patched), rank=1, seed=9, scale=0.5)
    cases = [
        (dict(diffs=[d], true_codes=["a", "b"]), "2 true codes for 1 diffs"),
        (dict(rerank=0), "rerank and top must be >= 1"),
        (dict(rerank=2, top=3), "exceeds rerank"),
        (dict(candidates=["table", "a much longer code"]), "is 4 tokens, not one"),
        (dict(candidates=["table", "table"]), "duplicate"),
        (dict(candidates=[]), "no candidates"),
        (dict(templates={}), "at least one template"),
        (dict(templates={"x": "Code: {code}."}), "exactly one {code} and one {question}"),
        (dict(templates={"glued": "Code:{code}. {question}"}), "not one token in context"),
        (dict(templates={"plural": "Your codes are {code}s. {question}"}), "not one token in context"),
        (dict(diffs=[None]), "must be a LoraDiff"),
        (dict(questions=[]), "at least one question"),
        (dict(answer_tokens=0), "answer_tokens must be >= 1"),
        (dict(batch_size=1), "batch_size must be >= 2"),
    ]
    for kw, message in cases:
        args = dict(diffs=[d], true_codes=["table"], questions=QUESTIONS, candidates=WORDS[:4], rerank=4, top=2) | kw
        with pytest.raises(MetaditError, match=message) as err:
            search_trigger_open(patched, tok, **args)
        assert "\n" not in str(err.value)
    with pytest.raises(MetaditError, match="need a LoraDiff"):
        first_order_scores(patched, tok, None, WORDS, QUESTIONS)


# ---------------------------------------------------------------------------------------------- through metadit eval
def test_open_search_through_eval_writes_rows_that_recompute_the_table(tiny_topic_bank, tmp_path):
    from metadit.bank import DiffBank
    from metadit.cli import main
    from metadit.eval.run import evaluate

    bank = DiffBank.open(tiny_topic_bank)
    topics = [bank.meta(i)["topic"] for i in range(len(bank))]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": topics[:4], "val": [], "test": topics[4:], "banks": [str(tiny_topic_bank)]}))
    kw = dict(split_file=str(split), methods=["random_label"], judges=["exact"], trigger_search=True,
              trigger_search_vocab="open", trigger_search_rerank=8, trigger_search_diffs=2, out=str(tmp_path / "e"))
    sec = evaluate(**kw)["sections"]["trigger_search"]
    assert sec["vocab"] == "open" and sec["n"] == 2 and sec["candidates"] == 30589 and sec["rerank"] == 8
    rows = [json.loads(x) for x in (tmp_path / "e" / "trigger_search_open.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and sec["rows_file"] == str(tmp_path / "e" / "trigger_search_open.jsonl")
    codes = {f"{tiny_topic_bank.name}:{i}": bank.meta(i)["code"] for i in range(len(bank))}
    for row in rows:
        assert row["vocab"] == "open" and row["true_code"] == codes[row["diff"]]
        assert row["template"] in OPEN_TEMPLATES and len(row["top10"]) == 8  # top-10, cut to the 8 re-scored
        assert 1 <= row["true_rank"] <= 30589 and row["recovered"] == (row["true_rank"] == 1)
        assert row["seconds"] > 0 and set(row["rank_by_template"]) == set(OPEN_TEMPLATES)
    table = summarize_search(rows)
    assert (sec["recovered_top1"], sec["recovered_top10"]) == (table["top1"], table["top10"])
    assert sec["seconds_per_diff"] == pytest.approx(table["seconds_per_diff"])
    again = evaluate(**kw)["sections"]["trigger_search"]  # saved per diff: read back, not searched again
    assert again["per_diff"] == sec["per_diff"]
    pool = evaluate(**(kw | {"trigger_search_vocab": "pool"}))["sections"]["trigger_search"]  # the closed set
    pool_rows = [json.loads(x) for x in (tmp_path / "e" / "trigger_search_pool.jsonl").read_text().splitlines()]
    assert pool["vocab"] == "pool" and [r["diff"] for r in pool_rows] == [r["diff"] for r in rows]
    assert all(r["template"] == "sep" and r["n_candidates"] == pool["pool"] and len(r["top10"]) == 10
               and 1 <= r["true_rank"] <= pool["pool"] for r in pool_rows)
    assert summarize_search(pool_rows)["top1"] == pool["recovered_top1"]
    assert main(["eval", "--split_file", str(split), "--out", str(tmp_path / "x"), "--trigger_search", "true",
                 "--trigger_search_vocab", "nope"]) == 1
