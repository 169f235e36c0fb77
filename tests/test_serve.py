"""`tdreward serve` as a real subprocess on 127.0.0.1 (the embedded SmolLM2 on llama.cpp's
OpenAI-compatible server), reached over real HTTP by `tdreward compare`, the openai backend and
httpx: the printed spec works with the defaults, the API key, the request size limit, no local
path in answers, and which server errors are retried.

One server for the module, started with --api_key and a small --max_request_bytes.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tdreward.backends.embedded import gguf_path
from tdreward.backends.openai_compat import OpenAIServerError
from tdreward.backends.registry import BackendOptions, make_generator
from tdreward.cli import main
from tdreward.commands.serve import default_alias
from tdreward.errors import TDRewardError

SMOL = "embedded:smollm2-135m-instruct"
KEY = "test-key-3f9a"
LIMIT = 64 * 1024


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, spec: str, log: Path) -> None:
        self.spec = spec
        self.url = spec.removeprefix("openai:").partition("#")[0]
        self.alias = spec.partition("#")[2]
        self.log = log

    def http(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`tdreward serve` with the defaults, plus an API key and a 64 KiB request limit."""
    tmp = tmp_path_factory.mktemp("serve")
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("TDREWARD_API_KEY", "API_KEY")}
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tdreward.cli", "serve", "--model", SMOL, "--port",
             str(_free_port()), "--n_ctx", "1024", "--n_threads", "1", "--api_key", KEY,
             "--max_request_bytes", str(LIMIT),
             # -1 (all layers) reaches llama.cpp's server; a CPU-only build runs on the CPU.
             "--n_gpu_layers", "-1"], stdout=fo, stderr=fe, env=env)
    try:
        deadline = time.time() + 120
        spec = None
        while spec is None:  # the line serve prints once the model is loaded
            assert proc.poll() is None, f"tdreward serve exited: {err.read_text()[-2000:]}"
            assert time.time() < deadline, "tdreward serve printed no spec in 120 s"
            m = re.search(r"\(spec: (openai:\S+)\)", out.read_text())
            spec = m.group(1) if m else time.sleep(0.2)
        srv = Server(spec, err)
        with srv.http() as http:
            while True:  # uvicorn listens a moment after the line
                try:
                    if http.get("/models").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, f"tdreward serve exited: {err.read_text()[-2000:]}"
                assert time.time() < deadline, "tdreward serve did not answer in 120 s"
                time.sleep(0.2)
        yield srv
    finally:
        proc.terminate()
        proc.wait(30)


def test_compare_with_the_printed_spec(server, tmp_path, monkeypatch, capsys) -> None:
    """The issue: serve's defaults (no log-probs) and the spec it prints, exactly as
    docs/deploy.md shows it, work in compare."""
    assert re.fullmatch(r"openai:http://127\.0\.0\.1:\d+/v1#embedded:smollm2-135m-instruct",
                        server.spec)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "cmp"
    assert main(["compare", "--models", server.spec, "--num_samples", "2", "--max_new_tokens",
                 "8", "--output_dir", str(out), "--no_cache"]) == 0
    err = capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    samples = results["models"][server.spec]["samples"]
    assert len(samples) == 2
    for s in samples:
        # A raw completion may end at once (SmolLM2 answers one of the two prompts with EOS):
        # then there is no response to score.
        assert 0 <= s["gen_tokens"] <= 8 and s["finish_reason"] in ("stop", "length")
        assert isinstance(s["td_reward"], float) == bool(s["response"])
        assert s["gen_mean_logprob"] is None  # the server has no log-probs: none invented
    assert any(s["gen_tokens"] > 0 and s["response"].strip() for s in samples)
    # The server refused log-probs (500, not retried), then answered without them: one
    # warning naming its reason.
    assert err.count("gives no log-probs") == 1 and "logits_all=False" in err


def test_api_key(server, monkeypatch) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 2}
    for key in (None, "wrong"):
        with server.http(key) as http:
            assert http.get("/models").status_code == 401
            assert http.post("/completions", json=body).status_code == 401
    with server.http() as http:
        r = http.post("/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
    # The openai backend sends $OPENAI_API_KEY; without it the refusal says what to set.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(TDRewardError) as e:
        make_generator(server.spec, options=BackendOptions(retries=3))
    assert "answered 401" in str(e.value) and "OPENAI_API_KEY" in str(e.value)
    assert "\n" not in str(e.value) and "retries" not in str(e.value)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    gen = make_generator(server.spec, options=BackendOptions())
    assert gen.generate(["The capital of France is"], max_new_tokens=2)[0].text
    gen.close()


def test_request_size_limit(server) -> None:
    big = {"prompt": "word " * (LIMIT // 5 + 100), "max_tokens": 1}
    with server.http() as http:
        r = http.post("/completions", json=big)  # Content-Length over the limit
        assert r.status_code == 413, r.text
        assert str(LIMIT) in r.json()["error"]["message"]
        # Chunked (no Content-Length): counted while read, refused before the app parses it.
        data = json.dumps(big).encode()
        r = http.post("/completions", content=iter([data[i:i + 8192]
                                                     for i in range(0, len(data), 8192)]),
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        small = {"prompt": "word " * 10, "max_tokens": 1}
        data = json.dumps(small).encode()
        r = http.post("/completions", content=iter([data[:20], data[20:]]),
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text  # a chunked body under the limit reaches the app


def test_no_local_path_in_answers(server) -> None:
    path = str(gguf_path("smollm2-135m-instruct"))
    with server.http() as http:
        models = http.get("/models")
        assert [m["id"] for m in models.json()["data"]] == [server.alias]
        # Without "model" in the request, llama-cpp-python would answer with the GGUF's path.
        done = http.post("/completions", json={"prompt": "Hello", "max_tokens": 2})
        assert done.json()["model"] == server.alias
        chat = http.post("/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert chat.status_code == 200
        error = http.post("/completions", json={"prompt": "Hello", "max_tokens": 2,
                                                "logprobs": 1})
        assert error.status_code == 500
    for r in (models, done, chat, error):
        assert path not in r.text and os.path.dirname(path) not in r.text, r.text


def test_server_errors_are_not_retried(server, monkeypatch) -> None:
    """llama.cpp's answers with an error body are its verdict on the request: one request,
    one line naming the server's message (a retry would cost backoff 5 + 10 + 20 s)."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    gen = make_generator(server.spec, options=BackendOptions(retries=3,
                                                            extra={"backoff": 5.0}))
    cases = [({"prompt": "Hi", "max_tokens": 2, "logprobs": 1}, 500, "logits_all=False"),
             ({"prompt": "word " * 1500, "max_tokens": 2}, 400, "maximum context length")]
    for body, status, message in cases:
        start = time.perf_counter()
        with pytest.raises(OpenAIServerError) as e:
            gen.request("POST", "/completions", {"model": server.alias} | body)
        assert time.perf_counter() - start < 4.0
        assert e.value.status == status and message in str(e.value)
        assert f"answered {status}" in str(e.value) and "retries" not in str(e.value)
        assert "\n" not in str(e.value)
    gen.close()


class _Answers500(http.server.BaseHTTPRequestHandler):
    """A server whose POSTs all get 500: with an OpenAI-style error body or a bare one."""

    error_body = b""
    posts: list[int] = []

    def log_message(self, *a) -> None:
        pass

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200, b'{"object": "list", "data": [{"id": "m"}]}')

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).posts.append(1)
        self._answer(500, self.error_body)


@pytest.mark.parametrize("error_body,requests", [
    (b'{"error": {"message": "boom", "type": "internal_server_error"}}', 1),
    (b"", 3),  # no error body: maybe a crash or a proxy, worth another try
])
def test_which_500_is_retried(error_body: bytes, requests: int) -> None:
    handler = type("H", (_Answers500,), {"error_body": error_body, "posts": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        gen = make_generator(f"openai:http://127.0.0.1:{srv.server_address[1]}/v1#m",
                             options=BackendOptions(retries=2, extra={"backoff": 0.01}))
        with pytest.raises(OpenAIServerError, match="answered 500") as e:
            gen.generate(["x"], max_new_tokens=1)
        assert len(handler.posts) == requests
        assert ("after 2 retries" in str(e.value)) == (requests > 1)
        gen.close()
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("host,warned", [("0.0.0.0", True), ("localhost", False),
                                         ("127.0.0.1", False), ("::1", False)])
def test_warning_beyond_loopback(host: str, warned: bool, capsys) -> None:
    """The warning comes before the model loads (here: a file that does not exist)."""
    assert main(["serve", "--host", host, "--model", "/nonexistent/m.gguf"]) == 2
    err = capsys.readouterr().err
    assert ("reachable" in err or "anyone who can reach" in err) == warned, err
    assert "model not found" in err


def test_default_alias_hides_local_paths(tmp_path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    merged = tmp_path / "lora_output" / "merged"
    merged.mkdir(parents=True)
    assert default_alias(str(gguf)) == "m" and default_alias(f"gguf:{gguf}") == "m"
    assert default_alias(str(merged) + "/") == "merged"
    assert default_alias(SMOL) == SMOL and default_alias("gpt2") == "gpt2"  # not local paths
