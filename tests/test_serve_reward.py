"""`tdreward serve-reward`: the real server on 127.0.0.1 with the embedded SmolLM2, asked over
real HTTP (urllib, http.client) as OpenRLHF's `remote_rm_fn` asks it.

The rewards are held to `TDRewardModel.score` (what `tdreward score` prints) and
`TDRewardModel.compute_td_reward` (a response after its prompt, scored alone) within 1e-5, not
exactly: the server scores each text padded into a batch with other requests' texts, and float32
matrix products over a batch of another shape may round differently in the last bits.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import EMBEDDED, REPO
from tdreward.integrations.reward_server import Job, RewardServer
from tdreward.integrations.reward_server_config import RewardServerConfig

KEY = "test-key"
TOL = 1e-5
PROMPT = "User: Name a colour of the sky.\nAssistant:"
SAMPLES = [  # (query, prompt): OpenRLHF's query is prompt + response, template applied
    (PROMPT + " Blue, on a clear day.", PROMPT),
    (PROMPT + " The sky is often grey in winter.", PROMPT),
    ("The rat pressed the lever and sugar water arrived.", None),
    ("A text that does not start with its prompt.", "Some other prompt"),
]


@pytest.fixture(scope="module")
def model():
    from tdreward.reward_model import load_reward_model
    from tdreward.reward_settings import RewardSettings

    return load_reward_model(EMBEDDED, RewardSettings(), warn_untrained=False)


def server_config(**kw) -> RewardServerConfig:
    base = {"base_model": EMBEDDED, "port": 0, "api_key": KEY, "batch_size": 4,
            "max_wait_ms": 50.0, "max_request_bytes": 64 * 1024, "max_texts": 16}
    return RewardServerConfig(**(base | kw))


@pytest.fixture(scope="module")
def server(model):
    srv = RewardServer(model, server_config()).start()
    yield srv
    srv.close()


def post(url: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def expected_reward(model, query: str, prompt: str | None) -> float:
    """The rule the server follows, computed by other code: the response after its prompt by
    `compute_td_reward`, a whole text by `score` (tdreward score's td_reward)."""
    if prompt and query.startswith(prompt):
        return model.compute_td_reward(prompt, query[len(prompt):])
    return model.score([query])[0].summary["td_reward"]


def test_get_reward_is_openrlhf_shaped_and_matches_the_library(server, model):
    queries = [q for q, _ in SAMPLES]
    prompts = [p or "" for _, p in SAMPLES]
    status, out = post(server.url + "/get_reward",
                       {"query": queries, "prompts": prompts, "labels": ["", "", "", ""]})
    assert status == 200, out
    assert set(out) == {"rewards", "scores", "extra_logs"} and out["scores"] == out["rewards"]
    want = [expected_reward(model, q, p) for q, p in SAMPLES]
    diffs = [abs(a - b) for a, b in zip(out["rewards"], want)]
    assert max(diffs) <= TOL, (out["rewards"], want)
    # The response's tokens only: fewer than the whole query's, none of the prompt's.
    n_full = [len(model.encode([q])[0]) - 1 for q in queries]
    n = out["extra_logs"]["td_response_tokens"]
    assert n[0] < n_full[0] and n[1] < n_full[1] and n[2:] == n_full[2:]
    # Without "prompts" every query counts whole: tdreward score's number.
    status, whole = post(server.url + "/get_reward", {"query": queries[:1]})
    assert status == 200
    assert abs(whole["rewards"][0] - model.score(queries[:1])[0].summary["td_reward"]) <= TOL


def test_an_empty_response_gets_zero_not_an_error(server):
    status, out = post(server.url + "/get_reward", {"query": [PROMPT, ""], "prompts": [PROMPT, ""]})
    assert status == 200, out
    assert out["rewards"] == [0.0, 0.0] and out["extra_logs"]["td_response_tokens"] == [0, 0]


def test_score_returns_the_trace(server, model):
    text = SAMPLES[2][0]
    status, out = post(server.url + "/score", {"texts": [text]})
    assert status == 200, out
    (res,) = out["results"]
    ref = model.score([text])[0]
    assert res["tokens"] == ref.tokens
    for key in ("r", "rbar", "V", "delta"):
        assert max(abs(a - b) for a, b in zip(res[key], getattr(ref, key))) <= TOL, key
    assert abs(res["td_reward"] - ref.summary["td_reward"]) <= TOL
    assert out["model"] == EMBEDDED and out["trained_critic"] is False


def test_concurrent_requests_are_batched_and_each_answered_right(server, model):
    texts = [f"Request {i}: the cue came and {i % 5 + 1} drops of sugar water followed."
             for i in range(10)]
    want = [s.summary["td_reward"] for s in model.score(texts)]
    before = post_health(server)
    barrier = threading.Barrier(len(texts))
    got: dict[int, tuple[int, dict]] = {}

    def ask(i: int) -> None:
        barrier.wait()  # all at once, so that the worker has something to gather
        got[i] = post(server.url + "/get_reward", {"query": [texts[i]]})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(got) == list(range(len(texts)))
    for i, (status, out) in got.items():
        assert status == 200, out
        assert abs(out["rewards"][0] - want[i]) <= TOL, (i, out, want[i])
    after = post_health(server)
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == len(texts) and batches < requests, (requests, batches)


def post_health(server) -> dict:
    with urllib.request.urlopen(server.url + "/health", timeout=30) as r:  # no key needed
        assert r.status == 200
        return json.loads(r.read())


@pytest.mark.parametrize(("path", "body", "words"), [
    ("/get_reward", b"not json", "not JSON"),
    ("/get_reward", b"\xff\xfe{}", "not JSON"),
    ("/get_reward", b"[1, 2]", "JSON object"),
    ("/get_reward", b"{}", '"query" is missing'),
    ("/get_reward", b'{"query": "one string"}', "list of strings"),
    ("/get_reward", b'{"query": [1, 2]}', "list of strings"),
    ("/get_reward", b'{"query": []}', "empty list"),
    ("/get_reward", b'{"query": ["a"], "prompts": ["x", "y"]}', '"prompts"'),
    ("/score", b'{"texts": ["fine", "  "]}', '"texts"[1] is empty'),
    ("/score", b'{"query": ["wrong key"]}', '"texts" is missing'),
])
def test_malformed_bodies_are_400(server, path, body, words):
    status, out = post(server.url + path, body)
    assert status == 400 and words in out["error"]["message"], out


def test_too_large_is_413(server):
    status, out = post(server.url + "/get_reward", {"query": ["x" * 70_000]})
    assert status == 413 and "--max_request_bytes" in out["error"]["message"], out
    status, out = post(server.url + "/get_reward", {"query": ["a text"] * 17})
    assert status == 413 and "at most 16" in out["error"]["message"], out


def test_the_key_is_required(server):
    body = {"query": ["hi there"]}
    for key in (None, "wrong", ""):
        status, out = post(server.url + "/get_reward", body, key=key)
        assert status == 401 and "API key" in out["error"]["message"], (key, out)
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/score", body=b"{}", headers={"Authorization": f"Basic {KEY}"})
    assert conn.getresponse().status == 401
    conn.close()


def test_unknown_paths_and_chunked_bodies(server):
    status, out = post(server.url + "/v1/completions", {"query": ["x"]})
    assert status == 404, out
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/get_reward", body=iter([b'{"query": ["hi"]}']), encode_chunked=True,
                 headers={"Authorization": f"Bearer {KEY}"})
    assert conn.getresponse().status == 411
    conn.close()


def test_a_full_queue_is_503(model):
    """A server whose worker is not running: one queued job fills it, the next request is
    told to come back."""
    srv = RewardServer(model, server_config(max_queue=1))
    t = threading.Thread(target=srv.httpd.serve_forever, daemon=True)
    t.start()
    try:
        assert srv.submit(Job(texts=["queued"], prompts=[None], traces=False))
        req = urllib.request.Request(srv.url + "/get_reward", method="POST",
                                     data=json.dumps({"query": ["hi"]}).encode(),
                                     headers={"Authorization": f"Bearer {KEY}"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 503 and e.value.headers["Retry-After"] == "1"
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


def test_the_command_serves(tmp_path: Path):
    """`tdreward serve-reward` as a user starts it: the URL it prints answers."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TDREWARD_API_KEY="")
    p = subprocess.Popen([sys.executable, "-m", "tdreward.cli", "serve-reward", "--base_model",
                          EMBEDDED, "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        line = p.stdout.readline()  # the model loads first: this waits for it
        assert "serving the TD reward" in line, (line, p.stderr.read() if p.poll() else "")
        url = line.split(" at ")[1].split()[0]
        status, out = post(url + "/get_reward", {"query": [SAMPLES[2][0]]}, key=None)
        assert status == 200 and len(out["rewards"]) == 1, out
    finally:
        p.terminate()
        p.wait(30)


def test_flags_reach_the_nested_settings():
    """--device/--dtype (HardwareSettings) and the reward flags (RewardSettings) are the ones
    every scoring command takes, declared once."""
    from tdreward.cli import build_parser
    from tdreward.flags import from_args

    args = build_parser().parse_args(["serve-reward", "--device", "cpu", "--dtype", "bfloat16",
                                      "--gamma", "0.9", "--api_key", "k", "--batch_size", "2"])
    cfg = from_args(RewardServerConfig, args)
    assert (cfg.hardware.device, cfg.hardware.dtype, cfg.reward.gamma) == ("cpu", "bfloat16", 0.9)
    assert (cfg.api_key, cfg.batch_size, cfg.host, cfg.base_model) == ("k", 2, "127.0.0.1",
                                                                        EMBEDDED)
