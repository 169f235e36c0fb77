"""Generation backends against real models and real servers on 127.0.0.1.

llama.cpp and transformers run the embedded SmolLM2; the OpenAI-compatible backend talks to
llama.cpp's own server (`python -m llama_cpp.server`, started here); the Ollama backend uses the
official `ollama` client against tests/ollama_api_server.py (the documented Ollama endpoints on
llama-cpp-python: no Ollama server can be installed on these machines).
"""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from ollama_api_server import serve_ollama_api
from tdreward.backends.embedded import gguf_path
from tdreward.backends.registry import BackendOptions, backend_for, make_generator
from tdreward.errors import TDRewardError

SMOL = "embedded:smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smol_gguf():
    return gguf_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def cpp_raw():
    gen = make_generator(SMOL, options=BackendOptions(prompt_format="raw"))
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def cpp_greedy(cpp_raw):
    """The llama.cpp backend's greedy completions: the reference the servers must match."""
    return cpp_raw.generate(PROMPTS, max_new_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def ollama_url(smol_gguf):
    with serve_ollama_api({"smollm2": smol_gguf}, library={"smollm2-lib": smol_gguf}) as url:
        yield url


@pytest.fixture(scope="module")
def openai_url(smol_gguf, tmp_path_factory):
    """llama.cpp's OpenAI-compatible server on the embedded GGUF."""
    port = free_port()
    log = (tmp_path_factory.mktemp("llama_server") / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(smol_gguf), "--host",
         "127.0.0.1", "--port", str(port), "--model_alias", "smollm2", "--n_ctx", "1024",
         "--logits_all", "true", "--n_threads", "1", "--n_threads_batch", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, "llama_cpp.server exited; see its log"
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "llama_cpp.server did not start in 120 s"
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(30)
    log.close()


def test_backend_defaults_and_forcing() -> None:
    assert backend_for("gpt2") == "transformers"
    assert backend_for(SMOL) == "llamacpp"  # the fast path for GGUF models
    assert backend_for("gguf:/x.gguf") == "llamacpp"
    assert backend_for(SMOL, "transformers") == "transformers"
    assert backend_for("ollama:llama3") == "ollama"
    assert backend_for("openai:http://h:1/v1#m") == "openai"
    with pytest.raises(TDRewardError, match="cannot run"):
        backend_for("gpt2", "llamacpp")
    with pytest.raises(TDRewardError, match="prompt format"):
        make_generator(SMOL, options=BackendOptions(prompt_format="fancy"))


def test_llamacpp_logprobs_are_the_models(cpp_raw, cpp_greedy) -> None:
    """The reported log-probs are llama.cpp's log-probs of the generated tokens. The first one
    comes from the prompt's evaluation and equals one-pass scoring exactly; later ones come from
    token-by-token decoding, which on quantised weights differs from one-pass scoring by up to
    ~0.2 nats (measured; the llama.cpp and Ollama servers report the decoding values too)."""
    model = cpp_raw.model
    checked = 0
    for p, g in zip(PROMPTS, cpp_greedy):
        assert g.n_tokens == len(g.logprobs) <= 10 and g.text.strip()
        assert all(x <= 0 for x in g.logprobs)
        prompt_ids = model.tokenize(p)
        gen_ids = model.tokenize(p + g.text)[len(prompt_ids):]
        if len(gen_ids) != g.n_tokens:  # retokenisation can merge at the boundary
            continue
        lp = model.token_logprobs(prompt_ids + gen_ids)[len(prompt_ids) - 1 :]
        assert abs(lp[0] - g.logprobs[0]) < 1e-4
        assert np.abs(lp - np.asarray(g.logprobs)).mean() < 0.15
        checked += 1
    assert checked


def test_llamacpp_sampling_is_seeded(cpp_raw) -> None:
    a = cpp_raw.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=7)
    b = cpp_raw.generate(PROMPTS[::-1], max_new_tokens=12, temperature=1.0, seeds=[8, 7])
    # Prompt i gets seed + i whatever else is in the call: the same sample, the same text.
    assert a[0].text == b[1].text and a[1].text == b[0].text
    assert [g.seed for g in a] == [7, 8]
    with pytest.raises(TDRewardError, match="temperature"):
        cpp_raw.generate(PROMPTS, temperature=-1)


def test_transformers_batched_left_padding(smollm2) -> None:
    """Batched generation (left padding) gives the completions one prompt at a time gives, and
    its log-probs are the model's log-probs of the generated tokens."""
    import torch

    prompts = ["Hi", *PROMPTS]
    batched = make_generator(SMOL, "transformers", BackendOptions(prompt_format="raw",
                                                                  batch_size=3))
    single = make_generator(SMOL, "transformers", BackendOptions(prompt_format="raw",
                                                                 batch_size=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster than a contended thread pool on a busy machine
    try:
        a = batched.generate(prompts, max_new_tokens=6, temperature=0)
        b = single.generate(prompts, max_new_tokens=6, temperature=0)
        assert [g.text for g in a] == [g.text for g in b]
        model, tok = batched.model, batched.tok
        for p, g in zip(prompts, a):
            ids = tok(p)["input_ids"]
            gen_ids = tok(p + g.text)["input_ids"][len(ids):]
            if len(gen_ids) != g.n_tokens:
                continue
            with torch.no_grad():
                logits = model(torch.tensor([ids + gen_ids])).logits[0].double()
            lp = torch.log_softmax(logits, -1)[len(ids) - 1 : -1].gather(
                1, torch.tensor(gen_ids)[:, None])[:, 0]
            np.testing.assert_allclose(lp.numpy(), g.logprobs, atol=2e-3)
    finally:
        torch.set_num_threads(threads)
    # The chat template is the same text in both backends.
    chat_hf = make_generator(SMOL, "transformers", BackendOptions())
    chat_cpp = make_generator(SMOL, options=BackendOptions())
    assert chat_hf.chat and chat_cpp.chat
    assert chat_hf.format("Name a colour.") == chat_cpp.format("Name a colour.")
    assert "<|im_start|>user\nName a colour.<|im_end|>" in chat_cpp.format("Name a colour.")
    chat_cpp.close()


# --------------------------------------------------------------------------- Ollama
def test_ollama_matches_llamacpp(ollama_url, cpp_greedy) -> None:
    """Greedy raw completions over the Ollama API equal the llama.cpp backend's, log-probs too
    (the test server runs llama-cpp-python's own completion code, an independent path)."""
    gen = make_generator("ollama:smollm2", options=BackendOptions(
        ollama_host=ollama_url, prompt_format="raw", concurrency=2))
    outs = gen.generate(PROMPTS, max_new_tokens=10, temperature=0)
    for o, ref in zip(outs, cpp_greedy):
        assert o.text == ref.text
        assert o.n_tokens == ref.n_tokens
        np.testing.assert_allclose(o.logprobs, ref.logprobs, atol=1e-4)
    gen.close()


def test_ollama_chat_template_and_stream(ollama_url) -> None:
    import ollama

    gen = make_generator("ollama:smollm2", options=BackendOptions(ollama_host=ollama_url))
    assert gen.chat  # the model has a template: Ollama applies it (raw: false)
    cpp = make_generator(SMOL, options=BackendOptions())
    a = gen.generate(["Name a colour."], max_new_tokens=8, temperature=0)[0]
    b = cpp.generate(["Name a colour."], max_new_tokens=8, temperature=0)[0]
    cpp.close()
    assert a.text == b.text and a.text.strip()
    client = ollama.Client(host=ollama_url)
    opts = {"num_predict": 6, "temperature": 0}
    parts = list(client.generate(model="smollm2", prompt=PROMPTS[0], raw=True, stream=True,
                                 options=opts))
    whole = client.generate(model="smollm2", prompt=PROMPTS[0], raw=True, options=opts)
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].eval_count == whole.eval_count == 6


def test_ollama_missing_model_and_pull(ollama_url) -> None:
    import ollama

    with pytest.raises(TDRewardError, match="--pull") as e:
        make_generator("ollama:smollm2-lib", options=BackendOptions(ollama_host=ollama_url))
    assert ollama_url in str(e.value) and "\n" not in str(e.value)
    gen = make_generator("ollama:smollm2-lib", options=BackendOptions(
        ollama_host=ollama_url, pull=True))
    assert gen.generate(["Hi"], max_new_tokens=3)[0].n_tokens >= 1
    names = [m.model for m in ollama.Client(host=ollama_url).list().models]
    assert "smollm2-lib:latest" in names
    with pytest.raises(TDRewardError, match="could not pull"):
        make_generator("ollama:no-such-model", options=BackendOptions(
            ollama_host=ollama_url, pull=True))


def test_ollama_blobs_create_delete(ollama_url, smol_gguf, tmp_path) -> None:
    """The endpoints `tdreward ollama create` uses, through the official client."""
    import ollama

    client = ollama.Client(host=ollama_url)
    digest = client.create_blob(smol_gguf)
    assert httpx.head(f"{ollama_url}/api/blobs/{digest}").status_code == 200
    assert httpx.head(f"{ollama_url}/api/blobs/sha256:{'0' * 64}").status_code == 404
    bad = httpx.post(f"{ollama_url}/api/blobs/sha256:{'0' * 64}", content=b"not that")
    assert bad.status_code == 400 and "digest mismatch" in bad.json()["error"]
    res = client.create(model="mine:v1", files={"smol.gguf": digest}, system="Be brief.",
                        parameters={"temperature": 0})
    assert res.status == "success"
    shown = client.show("mine:v1")
    assert "SYSTEM \"\"\"Be brief.\"\"\"" in shown.modelfile and "temperature" in shown.parameters
    out = client.generate(model="mine:v1", prompt=PROMPTS[0], raw=True,
                          options={"num_predict": 4})
    assert out.eval_count == 4
    with pytest.raises(ollama.ResponseError):
        client.create(model="broken", files={"x.gguf": f"sha256:{'1' * 64}"})
    assert client.delete("mine:v1").status == "success"
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("mine:v1")
    assert e.value.status_code == 404


def test_ollama_down_is_one_line() -> None:
    host = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TDRewardError) as e:
        make_generator("ollama:smollm2", options=BackendOptions(ollama_host=host))
    assert host in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- OpenAI-compatible
EXTRA = {"openai_extra_body": {"repeat_penalty": 1.0, "top_k": 0}}


def test_openai_matches_llamacpp(openai_url, cpp_greedy) -> None:
    gen = make_generator(f"openai:{openai_url}#smollm2", options=BackendOptions(
        concurrency=2, extra=EXTRA))
    outs = gen.generate(PROMPTS, max_new_tokens=10, temperature=0)
    for o, ref in zip(outs, cpp_greedy):
        assert o.text == ref.text
        assert o.n_tokens == ref.n_tokens and o.finish_reason == ref.finish_reason
        np.testing.assert_allclose(o.logprobs, ref.logprobs, atol=1e-4)
    chat = make_generator(f"openai:{openai_url}#smollm2", options=BackendOptions(
        prompt_format="chat", extra=EXTRA))
    assert chat.generate(["Name a colour."], max_new_tokens=6, temperature=0)[0].text.strip()
    gen.close()
    chat.close()


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 (Retry-After: 0) to the first `fail` POSTs, then forwards to `target`."""

    protocol_version = "HTTP/1.1"
    fail = 2
    seen: list[int] = []
    target = ""
    delay = 0.0

    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._forward("GET", None)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append(1)
        time.sleep(self.delay)
        if len(self.seen) <= self.fail:
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._forward("POST", body)

    def _forward(self, method: str, body: bytes | None) -> None:
        try:
            r = httpx.request(method, self.target + self.path.removeprefix("/v1"), content=body,
                              headers={"Content-Type": "application/json"}, timeout=60)
        except httpx.HTTPError:  # the backend went away (module teardown)
            r = httpx.Response(502, content=b"{}")
        self.send_response(r.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)


def _proxy(target: str, fail: int, delay: float = 0.0):
    handler = type("Flaky", (_Flaky,), {"fail": fail, "seen": [], "target": target,
                                         "delay": delay})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, handler, f"http://127.0.0.1:{srv.server_address[1]}/v1"


def test_openai_retries_and_timeouts(openai_url, cpp_greedy) -> None:
    srv, handler, url = _proxy(openai_url, fail=2)
    try:
        gen = make_generator(f"openai:{url}#smollm2", options=BackendOptions(
            retries=3, extra=EXTRA | {"backoff": 0.05}))
        out = gen.generate(PROMPTS[:1], max_new_tokens=10, temperature=0)[0]
        assert out.text == cpp_greedy[0].text
        assert len(handler.seen) == 3  # two 503s, then the answer
        handler.seen.clear()
        gen.retries = 1
        with pytest.raises(TDRewardError, match="503") as e:
            gen.generate(PROMPTS[:1], max_new_tokens=2)
        assert "\n" not in str(e.value)
    finally:
        srv.shutdown()
    srv, handler, url = _proxy(openai_url, fail=0, delay=3.0)
    try:
        gen = make_generator(f"openai:{url}#smollm2", options=BackendOptions(
            retries=0, timeout=1.0))
        with pytest.raises(TDRewardError, match="did not answer within 1 s"):
            gen.generate(PROMPTS[:1], max_new_tokens=2)
    finally:
        srv.shutdown()


def test_openai_down_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(TDRewardError) as e:
        make_generator(f"openai:{url}#m", options=BackendOptions(
            retries=1, extra={"backoff": 0.01}))
    assert url in str(e.value) and "\n" not in str(e.value)
