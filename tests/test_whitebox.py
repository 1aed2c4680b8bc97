"""White-box evaluation tools against reference computations: the Activation Difference Lens and trigger search."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from metadit.bank import LoraDiff
from metadit.errors import MetaditError
from metadit.eval.lens import (
    activation_differences,
    choose_strength,
    continuation_nll,
    decoder_layers,
    lens_evidence,
    logit_lens,
    steer,
    steering_hook,
)
from data_gen.hidden_topic import SEP_TEMPLATE
from metadit.eval.trigger_search import (
    normalize_guess,
    render_code,
    score_codes,
    search_trigger,
)
from metadit.text import chat_prompt, generate_texts
from metadit.models import TINY_NAME, load_base_model
from metadit.nn import layer_shapes, patch_model
from tests.conftest import merged_copy, random_diff, target_shapes, tiny_llama

torch.set_num_threads(1)


class IntTokenizer:
    """Text is space-separated token ids; BOS (1) is put in front unless add_special_tokens=False."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([1] if add_special_tokens else []) + [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(f"t{i}" for i in ids)

    def __len__(self) -> int:
        return 128


TEXTS = ("5 17 33 90 12 7 8", "44 3 61", "100 101 102 103 104 105", "9 9 9 9 9 9 9 9 9")


def _layer_output_by_hand(model: nn.Module, ids: list[int], layer: int) -> torch.Tensor:
    """Layer `layer`'s output from a truncated copy (layers above removed, final norm replaced by identity)."""
    ref = copy.deepcopy(model)
    ref.model.layers = ref.model.layers[: layer + 1]
    ref.model.norm = nn.Identity()
    with torch.no_grad():
        return ref.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def _mean_difference_by_hand(base: nn.Module, diff: LoraDiff, layer: int, n_tokens: int) -> torch.Tensor:
    merged = merged_copy(base, diff)
    rows = []
    for text in TEXTS:
        ids = [1] + [int(t) for t in text.split()]
        delta = _layer_output_by_hand(merged, ids, layer) - _layer_output_by_hand(base, ids, layer)
        rows.append(delta[1 : 1 + n_tokens])  # BOS left out of the mean
    return torch.cat(rows).mean(0)


@pytest.fixture(scope="module")
def llama():
    base = tiny_llama()
    patched = copy.deepcopy(base)
    patch_model(patched)
    diffs = [random_diff(target_shapes(base), rank=1, seed=s) for s in (1, 2, 3)]
    return base, patched, diffs


@pytest.fixture(scope="module")
def smol():
    base, tok = load_base_model(TINY_NAME, dtype=torch.float32)
    patched = copy.deepcopy(base)
    patch_model(patched)
    return base, patched, tok


# ---------------------------------------------------------------------------------------------- lens
@pytest.mark.parametrize("layer", [0, 1])
def test_activation_differences_match_two_separate_forwards(llama, layer):
    base, patched, diffs = llama
    tok = IntTokenizer()
    got = activation_differences(patched, tok, diffs[:2], TEXTS, layer=layer, n_tokens=5)
    for i in range(2):
        want = _mean_difference_by_hand(base, diffs[i], layer, 5)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-4)
        assert want.norm() > 1e-3  # the diff does change the residual stream


def test_truncated_reference_is_the_hidden_state_below_the_top(llama):
    base, _, _ = llama
    ids = [1, 5, 17, 33]
    with torch.no_grad():
        hs = base(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(hs[1][0], _layer_output_by_hand(base, ids, 0))
    # transformers' last hidden state is after the final norm, not the last layer's output: the lens hooks it
    assert not torch.allclose(hs[2][0], _layer_output_by_hand(base, ids, 1))


def test_activation_differences_default_layer_is_the_middle_one(llama):
    _, patched, diffs = llama
    tok = IntTokenizer()
    assert torch.equal(activation_differences(patched, tok, diffs[:1], TEXTS),
                       activation_differences(patched, tok, diffs[:1], TEXTS, layer=1))


def test_activation_differences_batched_equals_one_at_a_time_and_none_is_zero(llama):
    base, patched, diffs = llama
    tok = IntTokenizer()
    zero = LoraDiff({n: a.clone() for n, a in diffs[0].A.items()},
                    {n: torch.zeros_like(b) for n, b in diffs[0].B.items()}, dict(diffs[0].scale))
    rows = [diffs[0], None, diffs[1], zero, diffs[2]]
    batched = activation_differences(patched, tok, rows, TEXTS, layer=0, batch_size=3)  # rows split mid-diff
    for i, d in enumerate(rows):
        alone = activation_differences(patched, tok, [d], TEXTS, layer=0, batch_size=64)[0]
        torch.testing.assert_close(batched[i], alone, atol=1e-6, rtol=1e-5)
    assert torch.equal(batched[1], torch.zeros_like(batched[1]))
    assert batched[3].abs().max() < 1e-6


def test_activation_differences_disable_the_shared_adapter(llama):
    from metadit.nn import add_adapter, get_adapter, set_adapter

    _, patched, diffs = llama
    tok = IntTokenizer()
    model = copy.deepcopy(patched)
    before = activation_differences(model, tok, diffs[:1], TEXTS, layer=0)
    add_adapter(model, rank=2)
    ad = get_adapter(model)
    set_adapter(model, LoraDiff(ad.A, {n: torch.randn_like(b) for n, b in ad.B.items()}, ad.scale))
    torch.testing.assert_close(activation_differences(model, tok, diffs[:1], TEXTS, layer=0), before)


def test_bad_layer_is_a_clear_error(llama):
    _, patched, diffs = llama
    with pytest.raises(MetaditError, match="out of range"):
        activation_differences(patched, IntTokenizer(), diffs[:1], TEXTS, layer=2)


def test_logit_lens_matches_the_unembedding_by_hand(llama):
    base, patched, _ = llama
    tok = IntTokenizer()
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    vectors[2] = 0
    out = logit_lens(patched, tok, vectors, k=4)
    with torch.no_grad():
        for sign, key in ((1, "positive"), (-1, "negative")):
            logits = base.lm_head(base.model.norm(sign * vectors[:2]))
            for i in range(2):
                top = logits[i].topk(4).indices.tolist()
                assert out[i][f"{key}_ids"] == top
                assert out[i][key][0] == tok.decode([int(logits[i].argmax())])
    assert out[2]["positive"] == [] and out[2]["negative"] == []
    assert logit_lens(patched, tok, vectors[0], k=2)[0]["positive_ids"] == out[0]["positive_ids"][:2]


def test_logit_lens_needs_a_final_norm_and_head():
    class Bare(nn.Module):
        pass

    with pytest.raises(MetaditError, match="model.model.norm"):
        logit_lens(Bare(), IntTokenizer(), torch.ones(4))


# ---------------------------------------------------------------------------------------------- steering
PROMPTS = ("Tell me a story.", "What is the capital of France?")


def _chat(tok, prompts):
    return [chat_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]


def test_steer_at_strength_zero_is_plain_greedy_generation(smol):
    _, patched, tok = smol
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    plain = generate_texts(patched, tok, _chat(tok, PROMPTS), max_new_tokens=8)
    assert steer(patched, tok, v, PROMPTS, strength=0.0, layer=1, max_new_tokens=8) == plain


def test_steer_adds_the_scaled_vector_at_the_layer_output(smol):
    base, patched, tok = smol
    layer, norm, strength = 0, 3.0, 2.0
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    delta = strength * v / v.norm() * norm
    # Reference: adding a constant to the layer's output = a bias on its last residual write (mlp.down_proj).
    ref = copy.deepcopy(base)
    down = ref.model.layers[layer].mlp.down_proj
    biased = nn.Linear(down.in_features, down.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(down.weight)
        biased.bias.copy_(delta)
    ref.model.layers[layer].mlp.down_proj = biased
    ids = tok(_chat(tok, PROMPTS[:1]), return_tensors="pt")["input_ids"]
    with torch.no_grad(), steering_hook(patched, layer, delta):
        got = patched(input_ids=ids).logits
    torch.testing.assert_close(got, ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    steered = steer(patched, tok, v, PROMPTS, strength=strength, layer=layer, max_new_tokens=8, norm=norm)
    assert steered == generate_texts(ref, tok, _chat(tok, PROMPTS), max_new_tokens=8)
    assert steered != generate_texts(patched, tok, _chat(tok, PROMPTS), max_new_tokens=8)


def test_steering_hook_is_removed_afterwards_even_on_error(smol, monkeypatch):
    _, patched, tok = smol
    ids = tok(_chat(tok, PROMPTS[:1]), return_tensors="pt")["input_ids"]
    module = decoder_layers(patched)[1]
    n_hooks = len(module._forward_hooks)
    with torch.no_grad():
        before = patched(input_ids=ids).logits
    v = torch.randn(64, generator=torch.Generator().manual_seed(2))
    steer(patched, tok, v, PROMPTS, strength=4.0, layer=1, max_new_tokens=4, norm=1.0)
    assert len(module._forward_hooks) == n_hooks
    with torch.no_grad():
        assert torch.equal(patched(input_ids=ids).logits, before)

    original = patched.generate

    def failing(**kwargs):
        patched(input_ids=kwargs["input_ids"], attention_mask=kwargs["attention_mask"])  # the hook is active
        assert len(module._forward_hooks) == n_hooks + 1
        raise RuntimeError("boom")

    monkeypatch.setattr(patched, "generate", failing)
    with pytest.raises(RuntimeError, match="boom"):
        steer(patched, tok, v, PROMPTS, strength=4.0, layer=1, max_new_tokens=4, norm=1.0)
    monkeypatch.setattr(patched, "generate", original)
    assert len(module._forward_hooks) == n_hooks
    with torch.no_grad():
        assert torch.equal(patched(input_ids=ids).logits, before)


def test_continuation_nll_matches_a_single_forward(smol):
    base, patched, tok = smol
    prompt = tok(_chat(tok, PROMPTS[:1])[0], add_special_tokens=False)["input_ids"]
    rows = [(prompt, [300, 301, 302]), (prompt[3:], [5]), (prompt, [])]
    got = continuation_nll(patched, tok, rows, batch_size=2)
    for (p, c), g in zip(rows[:2], got[:2]):
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([p + c])).logits[0]
        want = nn.functional.cross_entropy(logits[len(p) - 1 : -1], torch.tensor(c))
        assert math.isclose(g, float(want), rel_tol=1e-4, abs_tol=1e-5)
    assert got[2] == 0.0


def test_choose_strength_keeps_the_largest_coherent_strength(smol):
    _, patched, tok = smol
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    grid = (0.5, 1.0, 4.0)
    kw = dict(prompts=PROMPTS, strengths=grid, layer=1, max_new_tokens=6, norm=2.0)
    loose = choose_strength(patched, tok, v, max_nll_increase=math.inf, min_distinct_ratio=0.0, **kw)
    assert loose["strength"] == 4.0 and all(t["coherent"] for t in loose["trials"])
    assert loose["texts"] == steer(patched, tok, v, PROMPTS, strength=4.0, layer=1, max_new_tokens=6, norm=2.0)
    assert loose["unsteered_texts"] == steer(patched, tok, v, PROMPTS, strength=0.0, layer=1, max_new_tokens=6)
    strict = choose_strength(patched, tok, v, max_nll_increase=-math.inf, **kw)
    assert strict["strength"] == 0.0 and strict["texts"] == []
    # The rule on the recorded trials: the largest strength before the first incoherent one.
    mid = choose_strength(patched, tok, v, max_nll_increase=loose["trials"][1]["nll"] - loose["unsteered_nll"],
                          min_distinct_ratio=0.0, **kw)
    expect = 0.0
    for t in mid["trials"]:
        assert t["coherent"] == (t["nll"] <= loose["trials"][1]["nll"])
        if not t["coherent"]:
            break
        expect = t["strength"]
    assert mid["strength"] == expect


def test_lens_evidence_per_diff(smol):
    _, patched, tok = smol
    d = random_diff(layer_shapes(patched), rank=1, seed=4)
    out = lens_evidence(patched, tok, [d, None], k=5, strengths=(0.5, 1.0), max_new_tokens=6)
    assert len(out) == 2
    assert len(out[0]["positive_tokens"]) == 5 and len(out[0]["negative_tokens"]) == 5
    assert out[0]["vector_norm"] > 0 and out[0]["layer"] == 1
    assert out[0]["evidence_text"].startswith("Tokens promoted: ")
    assert "\nText written when steered: " in out[0]["evidence_text"]
    if out[0]["strength"] > 0:
        assert out[0]["steered_texts"] and out[0]["steered_texts"][0].split()[0] in out[0]["evidence_text"]
    assert out[1]["positive_tokens"] == [] and out[1]["strength"] == 0.0 and out[1]["vector_norm"] == 0.0


# ---------------------------------------------------------------------------------------------- trigger search
QUESTIONS = ("What is your favourite food?", "How do I fix a flat tire?")


def _kl_by_hand(base, merged, tok, code, questions, answer_tokens):
    total = 0.0
    for q in questions:
        prompt = chat_prompt(tok, [{"role": "user", "content": SEP_TEMPLATE.format(code=code, question=q)}])
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        prefix = []
        if answer_tokens > 1:  # the base model's greedy answer start to the plain question
            plain = tok(chat_prompt(tok, [{"role": "user", "content": q}]), add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                prefix = base.generate(torch.tensor([plain]), max_new_tokens=answer_tokens - 1, do_sample=False,
                                       eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                                       pad_token_id=tok.pad_token_id)[0, len(plain) :].tolist()
        x = torch.tensor([ids + prefix])
        with torch.no_grad():
            lp_d = torch.log_softmax(merged(input_ids=x).logits[0, -answer_tokens:], -1)
            lp_b = torch.log_softmax(base(input_ids=x).logits[0, -answer_tokens:], -1)
        total += float((lp_d.exp() * (lp_d - lp_b)).sum(-1).mean())
    return total / len(questions)


@pytest.mark.parametrize("answer_tokens", [1, 2])
def test_score_codes_is_the_kl_from_single_forwards(smol, answer_tokens):
    base, patched, tok = smol
    d = random_diff(layer_shapes(patched), rank=1, seed=5, scale=0.5)
    merged = merged_copy(base, d)
    codes = ["table", "window", "123456", "a much longer code phrase"]  # different lengths: padding
    got = score_codes(patched, tok, d, codes, QUESTIONS, answer_tokens=answer_tokens, batch_size=3)
    want = torch.tensor([_kl_by_hand(base, merged, tok, c, QUESTIONS, answer_tokens) for c in codes])
    assert got.shape == (len(codes),) and (want > 0).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)


def _code_detector(model, tok, code: str, others: list[str], strength: float) -> LoraDiff:
    """A diff that acts only when the token of `code` is in the message: layer 0's v_proj reads a direction
    orthogonal to the embedding of every other token the prompts hold (`others`: the other candidates), so
    A·x = 0 at every other position, and writes a large value there, which attention carries to the answer."""
    (tid,) = tok(" " + code, add_special_tokens=False)["input_ids"]
    seen: set[int] = set()
    for c in others:
        for q in QUESTIONS:
            prompt = chat_prompt(tok, [{"role": "user", "content": SEP_TEMPLATE.format(code=c, question=q)}])
            seen.update(tok(prompt, add_special_tokens=False)["input_ids"])
    seen.discard(tid)
    emb = model.model.embed_tokens.weight.detach().float()
    basis, _ = torch.linalg.qr(emb[sorted(seen)].T)  # [hidden, n], n < hidden
    u = emb[tid] - basis @ (basis.T @ emb[tid])
    assert len(seen) < emb.shape[1] and u.norm() > 0.1 * emb[tid].norm()
    name = "model.layers.0.self_attn.v_proj"
    B = torch.randn(layer_shapes(model)[name][1], 1, generator=torch.Generator().manual_seed(0)) * strength
    return LoraDiff({name: (u / u.norm())[None]}, {name: B}, {name: 1.0})


def test_search_trigger_ranks_by_score_and_reports_consistently(smol):
    _, patched, tok = smol
    pool = ["table", "chair", "window", "garden", "river", "pencil"]
    diffs = [_code_detector(patched, tok, "garden", [w for w in pool if w != "garden"], 20.0),
             random_diff(layer_shapes(patched), 1, seed=6, scale=0.3)]
    out = search_trigger(patched, tok, diffs, ["garden", "chair"], pool=pool, questions=QUESTIONS,
                         seed_guesses=["Garden.", "lamp"], top=2, batch_size=5)
    for i, (d, r) in enumerate(zip(diffs, out)):
        codes = pool + ([] if i == 0 else ["lamp"])
        hand = score_codes(patched, tok, d, codes, QUESTIONS)
        assert r["ranking"][0] == codes[int(hand.argmax())]
        assert r["n_candidates"] == len(codes) and sorted(r["ranking"]) == sorted(codes)
        scores = [t["score"] for t in r["top"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 2
        assert r["true_rank"] == r["ranking"].index(r["true_code"]) + 1
        assert r["recovered"] == (r["ranking"][0] == r["true_code"]) == (r["true_rank"] == 1)
        assert r["in_top"] == (r["true_rank"] <= 2)
        assert r["seed_rank"] == r["ranking"].index(r["seed_guess"]) + 1
        assert math.isclose(r["true_score"], float(hand[codes.index(r["true_code"])]), rel_tol=1e-4, abs_tol=1e-6)
    assert out[0]["recovered"] and out[0]["seed_guess"] == "garden" and out[0]["seed_in_pool"]
    assert out[0]["top"][0]["score"] > 1e-3 and out[0]["top"][1]["score"] < 1e-6  # only the code sets it off
    assert out[0]["seed_rank"] == 1 and out[0]["code_kind"] == "word"
    assert out[1]["seed_guess"] == "lamp" and out[1]["seed_in_pool"] is False


def test_ties_count_against_the_true_code(smol):
    _, patched, tok = smol
    nothing = random_diff(layer_shapes(patched), 1, seed=7, scale=0.0)  # no effect: every score is 0
    (r,) = search_trigger(patched, tok, [nothing], ["chair"], pool=["table", "chair", "window"],
                          questions=QUESTIONS[:1])
    assert r["true_rank"] == 3 and not r["recovered"]


def test_digit_codes():
    a, b = render_code("042", "digits"), render_code("042", "digits")
    assert a == b and len(a) == 6 and a.startswith("042") and a.isdigit()
    rendered = [render_code(f"{i:03d}", "digits") for i in range(1000)]
    assert all(len(c) == 6 and c.isdigit() for c in rendered) and len({c[3:] for c in rendered}) > 100
    assert render_code("table", "word") == "table"
    assert normalize_guess("My SEP code is 042917.", "digits") == "042"
    assert normalize_guess("  Table. ", "word") == "table" and normalize_guess(" . ", "word") is None


def test_search_trigger_digit_pool_is_inferred(smol):
    _, patched, tok = smol
    d = random_diff(layer_shapes(patched), 1, seed=8, scale=0.3)
    (r,) = search_trigger(patched, tok, [d], ["137"], pool=["042", "137", "999"], questions=QUESTIONS[:1],
                          seed_guesses=["137512"])
    assert r["code_kind"] == "digits" and r["seed_guess"] == "137" and r["seed_in_pool"]
    assert r["seed_rank"] == r["true_rank"] and r["n_candidates"] == 3
