"""Ollama deployment: Modelfiles that parse as Ollama parses them, the official client against
the local Ollama-API test server (real HTTP, real GGUF models on llama.cpp), a server that is
down, `tdreward ollama-finetune` with and without a server, and `tdreward serve`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from conftest import EMBEDDED, REPO
from ollama_api_server import OllamaAPIServer, _Handler
from tdreward.backends.embedded import gguf_path
from tdreward.cli import main
from tdreward.errors import TDRewardError
from tdreward.export.gguf_writer import write_gguf
from tdreward.export.tokenizer import chat_template_of
from tdreward.ollama.deploy import OllamaAPI
from tdreward.ollama.modelfile import (
    CHATML_TEMPLATE,
    Modelfile,
    ModelfileError,
    chat_format,
    create_fields,
    parse_modelfile,
)

pytestmark = pytest.mark.integration

SMOLLM2_GGUF = gguf_path(EMBEDDED.removeprefix("embedded:"))
GEMMA3_TEMPLATE = (  # the shape of Gemma 3 instruct's Jinja template
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content']"
    " + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] "
    "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<start_of_turn>model\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- Modelfile
def test_modelfile_round_trips_through_ollamas_parser():
    system = 'You are "TD", a careful assistant.\nRules:\n\t- be brief\n  - cite "sources"'
    mf = Modelfile("/models/td model.gguf", CHATML_TEMPLATE, system,
                   [("stop", "<|im_start|>"), ("stop", "<|im_end|>"), ("temperature", "0.7"),
                    ("stop", "end of turn")])
    text = mf.render()
    assert 'SYSTEM """You are "TD"' in text
    cmds = parse_modelfile(text)
    assert cmds == [("model", "/models/td model.gguf"), ("template", CHATML_TEMPLATE),
                    ("system", system), ("stop", "<|im_start|>"), ("stop", "<|im_end|>"),
                    ("temperature", "0.7"), ("stop", "end of turn")]
    fields = create_fields(text, Path("/nonexistent"))
    assert fields.from_path is None and fields.from_model == "/models/td model.gguf"
    assert fields.parameters == {"stop": ["<|im_start|>", "<|im_end|>", "end of turn"],
                                 "temperature": 0.7}
    assert fields.system == system and fields.template == CHATML_TEMPLATE


def test_parser_follows_ollama():
    text = ('# a comment\nfrom llama3.2\nparameter num_ctx 4096\nPARAMETER stop "<|eot_id|>"\n'
            'template """{{ .Prompt }}"""\nSYSTEM "one line"\nMESSAGE user Hi there\n'
            'LICENSE """MIT\n\nText"""\n')
    assert parse_modelfile(text) == [
        ("model", "llama3.2"), ("num_ctx", "4096"), ("stop", "<|eot_id|>"),
        ("template", "{{ .Prompt }}"), ("system", "one line"), ("message", "user: Hi there"),
        ("license", "MIT\n\nText")]
    for bad, why in [('FROM x\nSYSTEM """never closed\n', "quoted value"),
                     ("SYSTEM hello\n", "no FROM"), ("FROM x\nBOGUS y\n", "unknown command"),
                     ("FROM x\nMESSAGE robot hi\n", "role")]:
        with pytest.raises(ModelfileError, match=why):
            parse_modelfile(bad)
    with pytest.raises(TDRewardError, match='"""'):
        Modelfile("x.gguf", system='a """ b').render()
    with pytest.raises(TDRewardError, match="control character"):
        Modelfile("x.gguf", system="a \x07 b").render()


def test_chat_templates_become_ollama_templates():
    smol = chat_format(chat_template_of(SMOLLM2_GGUF))
    assert smol.kind == "chatml" and smol.template == CHATML_TEMPLATE
    assert smol.stops == ["<|im_start|>", "<|im_end|>"]
    assert smol.default_system.startswith("You are a helpful AI assistant named SmolLM")
    gemma = chat_format(GEMMA3_TEMPLATE)
    assert gemma.kind == "gemma" and gemma.stops == ["<end_of_turn>"]
    assert "{{ .System }}" in gemma.template and "<start_of_turn>model" in gemma.template
    assert chat_format(None).template == "{{ .Prompt }}"
    llama2 = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    with pytest.raises(TDRewardError, match="supported: ChatML"):
        chat_format(llama2)


# --------------------------------------------------------------------------- the test server
class OllamaServer(OllamaAPIServer):
    """The project's Ollama-API test server, plus two things real Ollama does that it lacks:
    a `.Prompt`-style template is cut after `{{ .Response }}` for the turn being generated
    (Ollama's template.Execute), and blob uploads are counted."""

    def start(self) -> OllamaServer:
        server = self
        self.blob_posts = 0

        class Handler(_Handler):
            api = server

            def _prompt(self, m, body, llm):
                template = body.get("template") or m.template
                if template and not body.get("raw"):
                    cut = re.split(r"{{-?\s*\.Response\s*-?}}", template)[0]
                    body = dict(body, template=cut)
                return super()._prompt(m, body, llm)

            def _blob(self, hexdigest):
                if self.command == "POST":
                    server.blob_posts += 1
                return super()._blob(hexdigest)

        import threading
        from http.server import ThreadingHTTPServer

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self


@pytest.fixture()
def server(tmp_path):
    srv = OllamaServer(root=tmp_path / "ollama").start()
    yield srv
    srv.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_create_run_evaluate_delete(server, tmp_path, capsys):
    out = tmp_path / "deploy"
    assert main(["ollama", "--action", "create", "--model_path", EMBEDDED, "--model_name",
                 "td-smol", "--ollama_host", server.url, "--output_dir", str(out)]) == 0
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM {SMOLLM2_GGUF.resolve()}" in modelfile
    # The blob is the GGUF, byte for byte: its digest was checked by the server on upload.
    digest = hashlib.sha256(SMOLLM2_GGUF.read_bytes()).hexdigest()
    assert server.blob_path(digest).is_file() and server.blob_posts == 1
    with httpx.Client(base_url=server.url) as http:
        assert http.head(f"/api/blobs/sha256:{digest}").status_code == 200
        assert http.head(f"/api/blobs/sha256:{'0' * 64}").status_code == 404
        tags = [m["name"] for m in http.get("/api/tags").json()["models"]]
        show = http.post("/api/show", json={"model": "td-smol"}).json()
    assert "td-smol:latest" in tags
    assert show["template"] == CHATML_TEMPLATE
    assert show["system"].startswith("You are a helpful AI assistant named SmolLM")
    assert "<|im_end|>" in show["parameters"]

    # A second create finds the blob on the server (HEAD) and uploads nothing.
    assert main(["ollama", "--action", "create", "--model_path", str(SMOLLM2_GGUF),
                 "--model_name", "td-smol2", "--ollama_host", server.url, "--output_dir",
                 str(tmp_path / "d2")]) == 0
    assert server.blob_posts == 1
    with httpx.Client(base_url=server.url) as http:  # the server refuses a wrong digest
        bad = http.post(f"/api/blobs/sha256:{'0' * 64}", content=b"not the file")
    assert bad.status_code == 400 and "digest mismatch" in bad.text
    capsys.readouterr()

    assert main(["ollama", "--action", "run", "--model_name", "td-smol", "--prompt",
                 "What is the capital of France?", "--temperature", "0", "--max_new_tokens",
                 "24", "--ollama_host", server.url]) == 0
    assert "Paris" in capsys.readouterr().out

    report = tmp_path / "eval.json"
    assert main(["ollama", "--action", "evaluate", "--model_name", "td-smol", "--prompt",
                 "Name a large animal.", "--num_samples", "1", "--max_new_tokens", "16",
                 "--ollama_host", server.url, "--output", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["samples"][0]["response"].strip()
    assert isinstance(result["samples"][0]["td_reward"], float)
    assert result["td_reward"]["n"] == 1

    assert main(["ollama", "--action", "delete", "--model_name", "td-smol",
                 "--ollama_host", server.url]) == 0
    with httpx.Client(base_url=server.url) as http:
        assert "td-smol:latest" not in [m["name"] for m in http.get("/api/tags").json()["models"]]
    capsys.readouterr()
    assert main(["ollama", "--action", "delete", "--model_name", "td-smol",
                 "--ollama_host", server.url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err


def test_server_down_is_one_line(tmp_path, capsys):
    host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for argv in (["--action", "run", "--prompt", "hi"], ["--action", "delete"],
                 ["--action", "create", "--model_path", EMBEDDED, "--output_dir",
                  str(tmp_path / "d")]):
        rc = main(["ollama", "--model_name", "m", "--ollama_host", host, *argv])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert f"cannot reach the Ollama server at {host}" in err
    # create still leaves a usable GGUF reference and Modelfile behind, and says where.
    assert "ollama create m -f" in err
    assert parse_modelfile((tmp_path / "d" / "Modelfile").read_text())[0] == (
        "model", str(SMOLLM2_GGUF.resolve()))
    with pytest.raises(TDRewardError, match="cannot reach"):
        OllamaAPI(host).push_blob(SMOLLM2_GGUF)


# --------------------------------------------------------------------------- ollama-finetune
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama model as a GGUF file (SmolLM2's tokenizer and chat template)."""
    from conftest import make_tiny_lm

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    with torch.no_grad():
        write_gguf(make_tiny_lm(len(tokenizer)), tokenizer, path, "f32")
    return path


def _finetune_args(base: str, out: Path, host: str, eval_samples: int = 2) -> list[str]:
    return ["ollama-finetune", "--base_model", base, "--output_model", "td-tiny", "--dataset",
            str(REPO / "data" / "sample_training_data.jsonl"), "--epochs", "1", "--max_steps",
            "2", "--max_examples", "8", "--batch_size", "4", "--lr", "1e-2", "--eval_samples",
            str(eval_samples), "--max_new_tokens", "8", "--output_dir", str(out),
            "--ollama_host", host]


def test_finetune_without_a_server_writes_gguf_and_modelfile(tiny_gguf, tmp_path, capsys):
    host = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "ft"
    assert main(_finetune_args(f"gguf:{tiny_gguf}", out, host)) == 0
    captured = capsys.readouterr()
    assert f"could not reach an Ollama server at {host}" in captured.err
    gguf = out / "td-tiny.f16.gguf"
    cmds = dict(parse_modelfile((out / "Modelfile").read_text()))
    assert cmds["model"] == str(gguf.resolve()) and cmds["template"] == CHATML_TEMPLATE
    report = json.loads((out / "ollama_finetune.json").read_text())
    assert report["ollama"] == {"host": host, "reachable": False, "created": False}
    assert report["lora"]["global_steps"] == 2
    comp = report["comparison"]
    assert comp["before"]["n"] == 2 and comp["after"]["n"] == 2
    assert "after - before" in captured.out or comp["difference"]["diff"] is None
    # Before and after answered the same (prompt, seed) samples: paired unless a response
    # left no scored token, and then results and output say so.
    d = comp["difference"]
    assert d["paired"] is True or d["unpaired_reason"]
    said = f"; {d['n_pairs']} pairs)" if d["paired"] else "; unpaired ("
    assert d["diff"] is None or said in captured.out
    # The fine-tuned GGUF is the merged model: llama.cpp agrees with transformers on it.
    import llama_cpp
    import numpy as np

    from tdreward.backends.hf import load_model
    from tdreward.backends.llamacpp import gathered_logprobs

    merged, tok = load_model(str(out / "adapter" / "merged"))
    ids = tok("The quick brown fox jumps over the lazy dog near the river bank.",
              add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(merged(torch.tensor([ids])).logits[0, :-1].double(), -1)
    ref = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    llm = llama_cpp.Llama(model_path=str(gguf), logits_all=True, verbose=False, n_ctx=128)
    llm.eval(ids)
    got = gathered_logprobs(llm.scores[: len(ids) - 1], np.asarray(ids[1:]))
    llm.close()
    assert np.abs(ref - got).mean() < 0.05


def test_finetune_finds_the_base_through_the_server(tiny_gguf, tmp_path, capsys):
    srv = OllamaServer(models={"tiny": tiny_gguf}, root=tmp_path / "ollama").start()
    try:
        assert main(_finetune_args("tiny", tmp_path / "ft", srv.url, eval_samples=0)) == 0
        out = capsys.readouterr().out
        assert f"created Ollama model td-tiny at {srv.url}" in out
        report = json.loads((tmp_path / "ft" / "ollama_finetune.json").read_text())
        assert report["base"]["found_via"] == "ollama"
        assert report["base"]["gguf"] == str(tiny_gguf)
        with httpx.Client(base_url=srv.url) as http:
            names = [m["name"] for m in http.get("/api/tags").json()["models"]]
        assert "td-tiny:latest" in names
    finally:
        srv.stop()
    rc = main(_finetune_args("no-such-model", tmp_path / "ft2", f"http://127.0.0.1:{free_port()}"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "gguf:PATH" in err[-1]


# --------------------------------------------------------------------------- serve
def test_serve_answers_openai_models(tiny_gguf, tmp_path):
    port = free_port()
    env = dict(os.environ, TDREWARD_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tdreward.cli", "serve", "--model", str(tiny_gguf), "--port",
         str(port), "--alias", "tiny", "--n_ctx", "256", "--n_threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline, models = time.time() + 90, None
        while time.time() < deadline and proc.poll() is None:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert models is not None, proc.stdout.read() if proc.poll() is not None else "timeout"
        assert [m["id"] for m in models["data"]] == ["tiny"]
        res = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                         json={"model": "tiny", "prompt": "Hello", "max_tokens": 4,
                               "temperature": 0}).json()
        assert res["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_bad_model_is_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.gguf" in err
