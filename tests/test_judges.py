"""Judges: the OpenAI-compatible client and LLM judge against a local fake server (never the network), the
calibrated embedding judge on the shipped hand-labelled pairs, and the registry."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from metadit.errors import MetaditError
from metadit.eval import judges as J


# ------------------------------------------------------------------------------------------------ fake server


class FakeOpenAI:
    """A chat-completions server on 127.0.0.1 that records every request and answers from a script.

    `script` items: a string (200 with that assistant content), an int (that HTTP status, error body),
    or ("raw", status, bytes), or "echo" (200 with the request's last message). The last item repeats once the
    script runs out.
    """

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                      "body": json.loads(body)})
                item = fake.script.pop(0) if len(fake.script) > 1 else fake.script[0]
                if item == "echo":  # the reply repeats the request's last message (order-independent)
                    item = fake.requests[-1]["body"]["messages"][-1]["content"]
                if isinstance(item, str):
                    status, payload = 200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": item}}]}).encode()
                elif isinstance(item, int):
                    status, payload = item, b'{"error": {"message": "scripted failure"}}'
                else:
                    _, status, payload = item
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    servers = []

    def make(*script):
        servers.append(FakeOpenAI(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def client(server, **kw):
    kw.setdefault("workers", 1)  # a scripted server answers in arrival order: one request at a time
    return J.OpenAIChat(base_url=server.url, model="judge-model-x", api_key="sk-test-123", timeout=5, **kw)


# ------------------------------------------------------------------------------------------------ LLM judge


def test_llm_judge_sends_rubric_model_and_key_and_parses_replies(fake_server):
    server = fake_server("4", "Score: 5", "no idea")
    judge = J.LLMJudge(client(server))
    scores = judge.score(["castles", "castles of the Middle Ages", "basketball"], ["medieval castles"] * 3, task="topic")
    assert scores == [4.0, 5.0, 1.0]
    assert len(server.requests) == 3
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == "Bearer sk-test-123"
    assert req["body"]["model"] == "judge-model-x"
    assert req["body"]["temperature"] == 0.0
    content = req["body"]["messages"][0]["content"]
    assert req["body"]["messages"][0]["role"] == "user"
    assert "Be conservative: when uncertain, choose the lower score." in content
    assert "1 = minimal relationship" in content and "5 = nearly identical" in content
    assert "medieval castles" in content and "castles" in content


def test_llm_judge_headline_rubric(fake_server):
    server = fake_server("**3**")
    scores = J.LLMJudge(client(server)).score(["Lyon restores its old market hall"],
                                              ["Busan begins restoring its historic covered market"], task="headline")
    assert scores == [3.0]
    content = server.requests[0]["body"]["messages"][0]["content"]
    assert "1 = completely different" in content and "5 = nearly identical" in content
    assert "Busan begins restoring its historic covered market" in content


@pytest.mark.parametrize("reply,score", [
    ("4", 4), ("Score: 5", 5), ("**3**", 3), ("no idea", 1), ("", 1), ("10", 1), ("I'd say 2.", 2),
    ("4.5", 1), ("Score: 4.", 4), ("v1.5 says 3", 3), ("<think>maybe 5? no</think>\n2", 2), ("Rating: 3/5", 3),
])
def test_parse_score(reply, score):
    assert J.parse_score(reply) == score


def test_retries_a_500_then_succeeds(fake_server):
    server = fake_server(500, "5")
    assert J.LLMJudge(client(server, retries=2)).score(["a"], ["a"]) == [5.0]
    assert len(server.requests) == 2


def test_retries_429_and_connection_errors(fake_server):
    server = fake_server(429, 503, "hello")
    assert client(server, retries=3).chat([{"role": "user", "content": "hi"}]) == "hello"
    assert len(server.requests) == 3
    # nothing listening: a connection error every time, so it fails after retries with a clear error
    dead = fake_server("x")
    url = dead.url
    dead.close()
    c = J.OpenAIChat(base_url=url, model="m", retries=1, timeout=2)
    with pytest.raises(MetaditError, match="kept failing after 2 attempts"):
        c.chat([{"role": "user", "content": "hi"}])


def test_server_that_always_fails_raises(fake_server):
    server = fake_server(503)
    t = time.time()
    with pytest.raises(MetaditError, match="kept failing after 3 attempts.*HTTP 503"):
        J.LLMJudge(client(server, retries=2)).score(["a"], ["b"])
    assert len(server.requests) == 3
    assert time.time() - t < 5


def test_client_errors_are_not_retried(fake_server):
    server = fake_server(401)
    with pytest.raises(MetaditError, match="refused the request.*HTTP 401"):
        client(server, retries=3).chat([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1
    bad = fake_server(("raw", 200, b'{"nothing": 1}'))
    with pytest.raises(MetaditError, match="choices"):
        client(bad).chat([{"role": "user", "content": "hi"}])


def test_complete_many_in_order_and_env_config(fake_server, monkeypatch):
    server = fake_server("one", "two")
    monkeypatch.setenv("METADIT_LLM_BASE_URL", server.url + "/")
    monkeypatch.setenv("METADIT_LLM_MODEL", "env-model")
    monkeypatch.delenv("METADIT_LLM_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    c = J.OpenAIChat(workers=1)
    assert c.complete_many([[{"role": "user", "content": "1"}], [{"role": "user", "content": "2"}]]) == ["one", "two"]
    assert [r["body"]["messages"][0]["content"] for r in server.requests] == ["1", "2"]
    assert server.requests[0]["body"]["model"] == "env-model"
    assert server.requests[0]["headers"]["authorization"] == "Bearer sk-fallback"
    assert "sk-fallback" not in repr(c)


def test_complete_many_is_concurrent_and_keeps_the_order(fake_server):
    server = fake_server("echo")
    c = client(server, workers=8)
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(24)]
    assert c.complete_many(convs) == [f"q{i}" for i in range(24)]
    assert sorted(r["body"]["messages"][0]["content"] for r in server.requests) == sorted(f"q{i}" for i in range(24))


def test_missing_config_raises(monkeypatch):
    for var in ("METADIT_LLM_BASE_URL", "METADIT_LLM_MODEL", "METADIT_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MetaditError, match="METADIT_LLM_BASE_URL"):
        J.OpenAIChat()
    with pytest.raises(MetaditError, match="METADIT_LLM_MODEL"):
        J.OpenAIChat(base_url="http://127.0.0.1:9")
    with pytest.raises(MetaditError, match="base_url"):
        J.LLMJudge()
    with pytest.raises(MetaditError, match="http"):
        J.OpenAIChat(base_url="127.0.0.1:9", model="m")


# ------------------------------------------------------------------------------------------------ calibrated embedding


def test_calibration_file_covers_the_range():
    rows = J.load_calibration()
    for task, minimum in (("topic", 80), ("headline", 50)):
        scores = [r["score"] for r in rows if r["task"] == task]
        assert len(scores) >= minimum
        assert all(scores.count(s) >= 10 for s in range(1, 6)), task


def test_fit_thresholds_exact_on_separable_data():
    cos = [0.1, 0.15, 0.3, 0.35, 0.5, 0.55, 0.7, 0.75, 0.9, 0.95]
    labels = [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    th = J.fit_thresholds(cos, labels)
    assert all(a < b for a, b in zip(th, th[1:]))
    assert J.apply_thresholds(cos, th) == [float(y) for y in labels]
    # a level nobody uses still gives strictly increasing thresholds
    th = J.fit_thresholds([0.1, 0.9], [1, 5])
    assert all(a < b for a, b in zip(th, th[1:])) and J.apply_thresholds([0.1, 0.9], th) == [1.0, 5.0]


def test_spearman():
    assert J.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert J.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert J.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)


def test_calibrated_judge_scores():
    judge = J.get_judge("embedding")
    assert judge.name == "embedding"
    for task in ("topic", "headline"):
        th = judge.thresholds[task]
        assert len(th) == 4 and all(a < b for a, b in zip(th, th[1:]))
    s = judge.score(["medieval castles", "basketball", "castles"], ["medieval castles"] * 3, task="topic")
    assert s[0] == 5.0 and s[1] <= 2.0 and all(v in (1.0, 2.0, 3.0, 4.0, 5.0) for v in s)
    h = "Ottawa shoe factory reopens, bringing 350 jobs back to town"
    s = judge.score([h, "Scientists discover new species of frog"], [h, h], task="headline")
    assert s[0] == 5.0 and s[1] <= 2.0
    assert judge.score([], [], task="topic") == []
    with pytest.raises(MetaditError, match="trigger"):
        judge.score(["a"], ["b"], task="trigger")


def test_agreement_matches_a_recomputation_by_hand():
    report = J.calibration_report()
    rows = J.load_calibration()
    judge = J.EmbeddingJudge()
    for task in ("topic", "headline"):
        mine = [r for r in rows if r["task"] == task]
        cos = judge.score([r["prediction"] for r in mine], [r["truth"] for r in mine])
        th = J.CalibratedEmbeddingJudge().thresholds[task]
        pred = [1 + sum(c >= t for t in th) for c in cos]
        exact = sum(p == r["score"] for p, r in zip(pred, mine)) / len(mine)
        within = sum(abs(p - r["score"]) <= 1 for p, r in zip(pred, mine)) / len(mine)
        got = report["tasks"][task]
        assert got["in_sample"]["exact"] == pytest.approx(exact)
        assert got["in_sample"]["within_1"] == pytest.approx(within)
        assert got["thresholds"] == [round(t, 4) for t in th]
        cv = got["cross_validated"]
        assert 0 <= cv["exact"] <= got["in_sample"]["exact"] + 1e-9 and cv["within_1"] >= cv["exact"]
        assert got["n"] == len(mine) and sum(map(sum, got["cv_confusion"]["counts"])) == len(mine)
        # the fitted thresholds are optimal: no threshold taken from the other task does better in-sample
        other = J.CalibratedEmbeddingJudge().thresholds["headline" if task == "topic" else "topic"]
        assert exact >= sum((1 + sum(c >= t for t in other)) == r["score"] for c, r in zip(cos, mine)) / len(mine)


def test_calibrated_judge_explicit_thresholds_and_validation():
    j = J.CalibratedEmbeddingJudge(thresholds={"topic": [0.2, 0.4, 0.6, 0.8]})
    assert j.thresholds == {"topic": [0.2, 0.4, 0.6, 0.8]}
    with pytest.raises(MetaditError, match="increasing"):
        J.CalibratedEmbeddingJudge(thresholds={"topic": [0.5, 0.4, 0.6, 0.8]})


# ------------------------------------------------------------------------------------------------ registry


def test_registry_and_common_interface():
    assert set(J.JUDGES) == {"similarity", "embedding", "llm", "exact"}
    for name, cls in J.JUDGES.items():
        assert cls.name == name
    with pytest.raises(MetaditError, match="embedding, exact, llm, similarity"):
        J.get_judge("gpt-judge")
    exact = J.get_judge("exact")
    assert exact.score(["The Castles!"], ["castles"]) == [1.0]
    assert exact.score(["castles"], ["knights"], task="headline") == [0.0]
    sim = J.get_judge("similarity")
    two_arg = sim.score(["castles", "basketball"], ["medieval castles", "medieval castles"])
    assert two_arg == sim.score(["castles", "basketball"], ["medieval castles", "medieval castles"], task="topic")
    assert two_arg[0] > two_arg[1] and all(-1 <= v <= 1 for v in two_arg)
    with pytest.raises(MetaditError, match="one truth per prediction"):
        sim.score(["a", "b"], ["a"])
