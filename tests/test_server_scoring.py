"""`tdreward score --model openai:URL#MODEL` against a real llama.cpp server: `tdreward serve
--logprobs` (llama-cpp-python's OpenAI-compatible server, logits_all=True) on 127.0.0.1 with
the embedded SmolLM2 GGUF, as tests/test_serve.py starts it. The server path's log p agrees
with the local llama.cpp backend on the same GGUF (the same engine: to rounding) and with the
transformers path (within test_llamacpp.py's tolerance); c is exact; H and E_p[c] are the
documented lower bounds. vLLM's `prompt_logprobs` shape is read from a recorded answer.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tdreward.backends.server_logprobs import ServerLogprobs, parse_answer
from tdreward.cli import main
from tdreward.evaluation.server_score import ServerScorer, entropy_lower_bound
from tdreward.reward.config import RewardConfig

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.integration

SMOL = "embedded:smollm2-135m-instruct"
VOCAB = 49152  # SmolLM2's: the transformers path's p0 = 1/VOCAB
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and "
        "the tallest structure in Paris. Its base is square, measuring 125 metres on each "
        "side. During its construction, the Eiffel Tower surpassed the Washington Monument to "
        "become the tallest man-made structure in the world, a title it held for 41 years "
        "until the Chrysler Building in New York City was finished in 1930. The tower has "
        "three levels for visitors, with restaurants on the first and second levels.")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp: Path, *flags: str) -> Iterator[str]:
    """`tdreward serve` as a subprocess; yields the spec it prints once it answers."""
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("TDREWARD_API_KEY", "API_KEY")}
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tdreward.cli", "serve", "--model", SMOL, "--port",
             str(_free_port()), "--n_ctx", "1024", "--n_threads", "1", *flags],
            stdout=fo, stderr=fe, env=env)
    try:
        deadline = time.time() + 120
        spec = None
        while spec is None:
            assert proc.poll() is None, f"tdreward serve exited: {err.read_text()[-2000:]}"
            assert time.time() < deadline, "tdreward serve printed no spec in 120 s"
            m = re.search(r"\(spec: (openai:\S+)\)", out.read_text())
            spec = m.group(1) if m else time.sleep(0.2)
        url = spec.removeprefix("openai:").partition("#")[0]
        while True:  # uvicorn listens a moment after the line
            try:
                if httpx.get(url + "/models", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "tdreward serve did not answer in 120 s"
            time.sleep(0.2)
        yield spec
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Iterator[str]:
    yield from _serve(tmp_path_factory.mktemp("serve"), "--logprobs")


@pytest.fixture(scope="module")
def local_scores():
    """The transformers path on the same GGUF (dequantised): untrained critic, default reward."""
    from tdreward.reward_model import load_reward_model
    from tdreward.reward_settings import RewardSettings

    model = load_reward_model(SMOL, RewardSettings(), warn_untrained=False)
    return model.score([TEXT])[0]


def test_logp_matches_local_llamacpp(spec: str) -> None:
    """Same engine, same GGUF, same context (BOS, then the text): the same numbers."""
    from tdreward.backends.llamacpp import LlamaCppModel

    client = ServerLogprobs(spec)
    got = client.text_logprobs(TEXT)
    client.close()
    assert client.bos_text == "<|im_start|>"  # found by the probe: SmolLM2 adds no BOS
    llm = LlamaCppModel(SMOL, n_ctx=1024)
    try:
        ids = llm.tokenize(TEXT, add_bos=False)
        want = llm.token_logprobs([llm.llm.token_bos(), *ids])
    finally:
        llm.close()
    assert len(got.tokens) == len(ids) and got.logp[0] is None
    np.testing.assert_allclose(np.array(got.logp[1:], dtype=float), want[1:], atol=2e-3)


def test_score_matches_transformers(spec: str, local_scores) -> None:
    s = local_scores
    scorer = ServerScorer(spec, RewardConfig(), vocab_size=VOCAB)
    start = time.perf_counter()
    srv = scorer.score([TEXT])[0]
    elapsed = time.perf_counter() - start
    scorer.close()
    # The server cannot predict the first token: it scores the 2nd to the last.
    assert srv.tokens == s.tokens[1:] and srv.summary["n_tokens"] == len(s.tokens) - 1
    a, b = np.array(srv.logp), np.array(s.logp[1:])
    mad, corr = float(np.abs(a - b).mean()), float(np.corrcoef(a, b)[0, 1])
    print(f"\nserver vs transformers on {len(a)} tokens: mean|dlogp|={mad:.4f} "
          f"pearson={corr:.5f}; scored in {elapsed:.2f} s")
    assert mad <= 0.1 and corr >= 0.999  # tests/test_llamacpp.py's tolerance (Q4_1 engine)
    # c needs only the tokens and p0: exact.
    np.testing.assert_allclose(srv.c, s.c[1:], atol=1e-4)
    # H and E_p[c] are lower bounds (up to the engines' rounding). With K = 20 the entropy
    # bound was 0.33 nat low on average here (2.1 at the text's start, where p is flat).
    H, H_ref = np.array(srv.H), np.array(s.H[1:])
    gap = float((H_ref - H).mean())
    print(f"H lower bound: mean gap {gap:.3f} nat, tail mass "
          f"{srv.summary['mean_tail_mass']:.3f}")
    assert np.all(H_ref + 0.1 >= H) and gap < 0.5
    assert srv.summary["mean_tail_mass"] < 0.3
    # E_p[c] from rbar = (beta - 1) H - alpha E_p[c]; a bound up to the engines' p (Q4_1
    # llama.cpp vs dequantised transformers: up to 0.17 nat apart on single tokens here).
    ec_ref = (np.array(s.rbar[1:]) + 0.99 * H_ref) / -0.1
    ec = (np.array(srv.rbar) + 0.99 * H) / -0.1
    ec_gap = float((ec_ref - ec).mean())
    print(f"E_p[c] lower bound: mean gap {ec_gap:.3f} nat")
    assert np.all(ec <= ec_ref + 0.25) and -0.05 < ec_gap < 0.5
    r_diff = np.abs(np.array(srv.r) - np.array(s.r[1:]))
    assert float(r_diff.mean()) <= 0.1
    assert all(math.isfinite(x) for x in srv.rbar + srv.V + srv.delta)


def test_cli_score_through_the_server(spec: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "trace.json"
    jsonl = tmp_path / "trace.jsonl"
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT, encoding="utf-8")
    assert main(["score", "--model", spec, "--alpha", "0", "--json", str(out),
                 "The cat sat on the mat."]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == spec and report["trained_critic"] is False
    tokens = report["texts"][0]["tokens"]
    assert [t["token"] for t in tokens] == [" cat", " sat", " on", " the", " mat", "."]
    assert all(t["c"] == 0.0 for t in tokens)  # alpha 0 and no vocabulary size: c not computed
    assert main(["score", "--model", spec, "--alpha", "0", "--file", str(doc),
                 "--jsonl", str(jsonl)]) == 0
    line = json.loads(jsonl.read_text().splitlines()[0])
    assert line["source"] == str(doc) and line["summary"]["n_tokens"] > 50
    assert "doc.txt" in capsys.readouterr().out


def test_one_line_errors(spec: str, capsys) -> None:
    cases = [
        (["score", "--model", spec, "hi there"], "does not report its vocabulary size"),
        (["score", "--model", spec, "--reward_model_path", "/nonexistent", "hi"],
         "--reward_model_path cannot score through the server"),
        (["score", "--model", f"openai:http://127.0.0.1:{_free_port()}/v1#m", "--alpha", "0",
          "hi"], "cannot connect"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_server_without_logprobs_says_which_option(tmp_path: Path, capsys) -> None:
    """`tdreward serve` without --logprobs (logits_all=False) gives no log-probs at all."""
    for plain in _serve(tmp_path):
        assert main(["score", "--model", plain, "--alpha", "0", "hi there"]) == 2
        err = capsys.readouterr().err.strip()
        assert "returns no prompt log-probs" in err and "tdreward serve --logprobs" in err
        assert len(err.splitlines()) == 1, err


# A /v1/completions choice as vLLM answers `prompt_logprobs: 2` (vllm/logprobs.py: a list with
# None first, then {token_id: {logprob, rank, decoded_token}}, the prompt token first).
VLLM_CHOICE = {
    "index": 0, "text": " mat", "finish_reason": "length", "logprobs": None,
    "prompt_logprobs": [
        None,
        {"8144": {"logprob": -9.4, "rank": 812, "decoded_token": " cat"},
         "338": {"logprob": -1.3, "rank": 1, "decoded_token": " is"},
         "314": {"logprob": -2.1, "rank": 2, "decoded_token": " of"}},
        {"338": {"logprob": -0.7, "rank": 1, "decoded_token": " is"},
         "3101": {"logprob": -2.5, "rank": 2, "decoded_token": " was"}},
    ],
}


def test_vllm_prompt_logprobs_shape() -> None:
    out = parse_answer(VLLM_CHOICE, {"prompt_tokens": 3, "completion_tokens": 1})
    assert out is not None and out.ids == [-1, 8144, 338]
    assert out.tokens[1:] == [" cat", " is"] and out.logp == [None, -9.4, -0.7]
    assert out.top[2] == {"#338": -0.7, "#3101": -2.5} and out.identity(2) == "#338"
    # With echo and return_tokens_as_token_ids the first token's id comes back too.
    echoed = VLLM_CHOICE | {"logprobs": {"tokens": ["token_id:504", "token_id:8144",
                                                    "token_id:338", "token_id:260"],
                                         "token_logprobs": [None, -9.4, -0.7, -1.0]}}
    got = parse_answer(echoed, {"prompt_tokens": 3, "completion_tokens": 1})
    assert got is not None and got.ids == [504, 8144, 338]


def test_entropy_lower_bound() -> None:
    p = np.array([0.5, 0.25, 0.125, 0.125])
    full = float(-(p * np.log(p)).sum())
    top = {str(i): math.log(v) for i, v in enumerate(p)}
    assert entropy_lower_bound(top, 4) == pytest.approx((full, 0.0))
    h, tail = entropy_lower_bound({k: top[k] for k in ("0", "1")}, 2)
    assert tail == pytest.approx(0.25) and h <= full
