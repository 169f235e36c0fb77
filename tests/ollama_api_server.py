"""A small, real Ollama-API server for tests: Python's http.server on 127.0.0.1 (a free port),
running GGUF models with llama-cpp-python. No Ollama server can be installed on these machines;
this one implements the documented endpoints (Ollama's docs/api.md) that tdreward uses, so
the official `ollama` client is tested over real HTTP against real models.

Python API::

    from ollama_api_server import serve_ollama_api

    with serve_ollama_api({"smollm2": gguf_path}, library={"gemma3": other_gguf}) as url:
        ollama.Client(host=url).generate(model="smollm2", prompt="Hi", options={"num_predict": 8})

    server = OllamaAPIServer(models={...}, library={...}, root=tmp_dir)  # or start/stop yourself
    server.start(); server.url; server.stop()

`models` are served from the start (name -> GGUF path); `library` stands in for ollama.com:
`/api/pull` copies a library model into the server's blob store. Names without a tag get
`:latest`, as in Ollama.

Endpoints:

    GET    /api/version
    GET    /api/tags                       models with size, digest, details
    POST   /api/show                       modelfile, parameters, template, details, model_info
    POST   /api/generate                   stream (default) or not; options num_predict,
                                           temperature, seed, top_p, top_k, min_p,
                                           repeat_penalty, stop; raw, system, template;
                                           logprobs and top_logprobs
    POST   /api/pull                       from `library`; streamed progress or one object
    HEAD   /api/blobs/sha256:<hex>         200 if the blob exists, else 404
    POST   /api/blobs/sha256:<hex>         201 Created; 400 if the body's digest differs
    POST   /api/create                     {model, files: {name: digest}} (one GGUF) or
                                           {model, from}; template, system, parameters,
                                           license; streamed statuses or one object
    POST   /api/copy                       {source, destination}
    DELETE /api/delete                     {model}: 200, or 404 if there is no such model

Differences from Ollama, on purpose: prompts are templated with the GGUF's own Jinja chat
template (Ollama converts it to a Go template) unless a template is given on create or in the
request, of which the `{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}` fields and
`{{ if .X }}...{{ end }}` blocks are rendered; `quantize` and `adapters` are refused (400); one
generation runs at a time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_BLOB = re.compile(r"^/api/blobs/(sha256[:-])([0-9a-f]{64})$")
_CHUNK = 1 << 20


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def normalise(name: str) -> str:
    """`name` -> `name:latest`, as Ollama names models."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def render_go_template(template: str, values: dict[str, str]) -> str:
    """The subset of Go templates Ollama's simple templates use: {{ if .X }}..{{ end }} and
    {{ .X }} fields."""
    def block(m: re.Match) -> str:
        return m.group(2) if values.get(m.group(1)) else ""

    out = re.sub(r"{{-?\s*if\s+\.(\w+)\s*-?}}(.*?){{-?\s*end\s*-?}}", block, template, flags=re.S)
    return re.sub(r"{{-?\s*\.(\w+)\s*-?}}", lambda m: values.get(m.group(1), ""), out)


@dataclass
class Model:
    name: str
    gguf: Path
    digest: str
    size: int
    modified_at: str = field(default_factory=_now)
    template: str | None = None  # a Go template given on create; None: the GGUF's own
    system: str | None = None
    parameters: dict = field(default_factory=dict)
    license: str | list | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class OllamaAPIServer:
    """See the module docstring. Thread-safe; generations are serialised."""

    def __init__(self, models: dict[str, str | os.PathLike] | None = None,
                 library: dict[str, str | os.PathLike] | None = None,
                 root: str | os.PathLike | None = None, n_ctx: int = 1024) -> None:
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="ollama-api-")
        self.root = Path(root or self._tmp.name)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.library = {normalise(k): Path(v) for k, v in (library or {}).items()}
        self.n_ctx = n_ctx
        self.models: dict[str, Model] = {}
        self._llamas: dict[Path, Any] = {}
        self._lock = threading.RLock()  # models dict and llama.cpp (not thread-safe)
        for name, path in (models or {}).items():
            path = Path(path)
            self.models[normalise(name)] = Model(normalise(name), path, sha256_file(path),
                                                 path.stat().st_size)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifetime ----------------------------------------------------------------------------
    def start(self) -> OllamaAPIServer:
        server = self

        class Handler(_Handler):
            api = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self._lock:
            for llm in self._llamas.values():
                llm.close()
            self._llamas.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    # --- models ------------------------------------------------------------------------------
    def get(self, name: str) -> Model:
        with self._lock:
            m = self.models.get(normalise(name or ""))
        if m is None:
            raise ApiError(404, f"model '{name}' not found")
        return m

    def llama(self, path: Path):
        with self._lock:
            if path not in self._llamas:
                import llama_cpp

                self._llamas[path] = llama_cpp.Llama(
                    model_path=str(path), n_ctx=self.n_ctx, logits_all=True, verbose=False,
                    n_threads=1, n_threads_batch=1)
            return self._llamas[path]

    def blob_path(self, hexdigest: str) -> Path:
        return self.blobs / f"sha256-{hexdigest}"

    def details(self, m: Model) -> dict:
        from gguf import LlamaFileType

        md = self.llama(m.gguf).metadata
        arch = md.get("general.architecture", "")
        try:
            quant = LlamaFileType(int(md.get("general.file_type", -1))).name
        except ValueError:
            quant = md.get("general.file_type", "")
        return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
                "parameter_size": md.get("general.size_label", ""),
                "quantization_level": quant.removeprefix("MOSTLY_")}


class _Handler(BaseHTTPRequestHandler):
    api: OllamaAPIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # --- plumbing ----------------------------------------------------------------------------
    def _body_chunks(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            block = self.rfile.read(min(_CHUNK, left))
            if not block:
                return
            left -= len(block)
            yield block

    def _json_body(self) -> dict:
        raw = b"".join(self._body_chunks())
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            raise ApiError(400, f"invalid JSON: {e}") from e
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _send(self, status: int, obj: Any = None) -> None:
        data = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        if obj is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    def _stream(self, parts: Iterator[dict]) -> None:
        """NDJSON, chunked; an error after the headers goes out as {"error": ...}."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def write(obj: dict) -> None:
            line = json.dumps(obj).encode() + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()

        try:
            for part in parts:
                write(part)
        except ApiError as e:
            write({"error": str(e)})
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _dispatch(self, routes: dict) -> None:
        path = self.path.split("?", 1)[0]
        try:
            m = _BLOB.match(path)
            if m and self.command in ("HEAD", "POST"):
                return self._blob(m.group(2))
            handler = routes.get(path)
            if handler is None:
                raise ApiError(404, f"{self.command} {path}: no such endpoint")
            handler()
        except ApiError as e:
            self._send(e.status, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch({"/api/tags": self._tags, "/api/version": self._version,
                        "/": lambda: self._send(200, "Ollama is running")})

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch({"/": lambda: self._send(200)})

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch({"/api/generate": self._generate, "/api/show": self._show,
                        "/api/pull": self._pull, "/api/create": self._create,
                        "/api/copy": self._copy})

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch({"/api/delete": self._delete})

    # --- endpoints ---------------------------------------------------------------------------
    def _version(self) -> None:
        self._send(200, {"version": "0.0.0-tdreward-test"})

    def _tags(self) -> None:
        api = self.api
        with api._lock:
            models = list(api.models.values())
        self._send(200, {"models": [
            {"name": m.name, "model": m.name, "modified_at": m.modified_at, "size": m.size,
             "digest": m.digest, "details": api.details(m)} for m in models]})

    def _show(self) -> None:
        body = self._json_body()
        api = self.api
        m = api.get(body.get("model") or body.get("name"))
        md = api.llama(m.gguf).metadata
        template = m.template or md.get("tokenizer.chat_template", "")
        params = "\n".join(f"{k:<30} {v}" for k, v in m.parameters.items())
        modelfile = f"# Modelfile generated by \"ollama show\"\nFROM {m.gguf}\n" + (
            f'TEMPLATE """{template}"""\n' if template else "") + (
            f'SYSTEM """{m.system}"""\n' if m.system else "") + "".join(
            f"PARAMETER {k} {v}\n" for k, v in m.parameters.items())
        info = {}
        for k, v in md.items():
            if k == "tokenizer.chat_template":
                continue
            try:
                info[k] = json.loads(v)
            except ValueError:
                info[k] = v
        self._send(200, {"modelfile": modelfile, "parameters": params, "template": template,
                         "system": m.system or "", "license": m.license or "",
                         "details": api.details(m), "model_info": info,
                         "modified_at": m.modified_at})

    def _prompt(self, m: Model, body: dict, llm) -> str:
        prompt = body.get("prompt") or ""
        if body.get("raw"):
            return prompt
        system = body.get("system", m.system) or ""
        template = body.get("template") or m.template
        if template:
            return render_go_template(template, {"System": system, "Prompt": prompt,
                                                 "Response": ""})
        jinja = llm.metadata.get("tokenizer.chat_template")
        if not jinja:
            return prompt
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        text = lambda t: llm.detokenize([t], special=True).decode("utf-8", "replace") \
            if t >= 0 else ""  # noqa: E731
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        return Jinja2ChatFormatter(jinja, text(llm.token_eos()), text(llm.token_bos()))(
            messages=messages).prompt

    def _generate(self) -> None:
        body = self._json_body()
        api = self.api
        m = api.get(body.get("model"))
        opts = {**m.parameters, **(body.get("options") or {})}
        want_lp = bool(body.get("logprobs"))
        top = int(body.get("top_logprobs") or 0)

        def parts() -> Iterator[dict]:
            start = time.perf_counter_ns()
            with api._lock:  # one generation at a time (llama.cpp is not thread-safe)
                llm = api.llama(m.gguf)
                load_ns = time.perf_counter_ns() - start
                prompt = self._prompt(m, body, llm)
                n_prompt = len(llm.tokenize(prompt.encode(), add_bos=True, special=True))
                stream = llm.create_completion(
                    prompt, max_tokens=int(opts.get("num_predict", 128)),
                    temperature=float(opts.get("temperature", 0.8)),
                    top_p=float(opts.get("top_p", 0.9)), top_k=int(opts.get("top_k", 40)),
                    min_p=float(opts.get("min_p", 0.0)),
                    repeat_penalty=float(opts.get("repeat_penalty", 1.1)),
                    seed=int(opts["seed"]) if "seed" in opts else None,
                    stop=opts.get("stop") or [], logprobs=max(top, 1) if want_lp else None,
                    stream=True)
                gen_start = time.perf_counter_ns()
                text, reason, n = "", "stop", 0
                for chunk in stream:
                    choice = chunk["choices"][0]
                    piece = choice.get("text") or ""
                    lp = choice.get("logprobs")
                    n += len(lp["tokens"]) if lp else 0
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
                    if not piece and not lp:
                        continue
                    text += piece
                    part = {"model": m.name, "created_at": _now(), "response": piece,
                            "done": False}
                    if want_lp and lp:
                        part["logprobs"] = _logprobs(lp, top)
                    yield part
                end = time.perf_counter_ns()
                completion = llm.tokenize(text.encode(), add_bos=False, special=True)
            final = {"model": m.name, "created_at": _now(), "response": "", "done": True,
                     "done_reason": reason, "total_duration": end - start,
                     "load_duration": load_ns, "prompt_eval_count": n_prompt,
                     "prompt_eval_duration": 0, "eval_count": n if want_lp else len(completion),
                     "eval_duration": end - gen_start}
            if not body.get("raw"):
                final["context"] = llm.tokenize(prompt.encode(), add_bos=True,
                                                special=True) + completion
            yield final

        if body.get("stream", True):
            self._stream(parts())
            return
        # Not streamed: one object with the whole response and every log-prob.
        text, lps, final = "", [], {}
        for part in parts():
            if part["done"]:
                final = part
            else:
                text += part["response"]
                lps += part.get("logprobs", [])
        final["response"] = text
        if want_lp:
            final["logprobs"] = lps
        self._send(200, final)

    def _pull(self) -> None:
        body = self._json_body()
        api = self.api
        name = normalise(body.get("model") or body.get("name") or "")

        def parts() -> Iterator[dict]:
            yield {"status": "pulling manifest"}
            src = api.library.get(name)
            if src is None:
                raise ApiError(500, "pull model manifest: file does not exist")
            size, digest = src.stat().st_size, sha256_file(src)  # the "manifest"
            tmp = api.blobs / f".pull-{os.getpid()}-{threading.get_ident()}"
            done, h = 0, hashlib.sha256()
            with src.open("rb") as f, tmp.open("wb") as out:
                for block in iter(lambda: f.read(16 * _CHUNK), b""):
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    yield {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}",
                           "total": size, "completed": done}
            yield {"status": "verifying sha256 digest"}
            if h.hexdigest() != digest:
                tmp.unlink()
                raise ApiError(500, "digest mismatch: the library file changed while pulling")
            os.replace(tmp, api.blob_path(digest))
            yield {"status": "writing manifest"}
            with api._lock:
                api.models[name] = Model(name, api.blob_path(digest), f"sha256:{digest}", size)
            yield {"status": "success"}

        if body.get("stream", True):
            self._stream(parts())
        else:
            try:
                self._send(200, _last(parts()))
            except ApiError as e:
                self._send(e.status, {"error": str(e)})

    def _blob(self, hexdigest: str) -> None:
        path = self.api.blob_path(hexdigest)
        if self.command == "HEAD":
            self._send(200 if path.is_file() else 404)
            return
        h = hashlib.sha256()
        tmp = path.with_name(f".upload-{threading.get_ident()}")
        with tmp.open("wb") as out:
            for block in self._body_chunks():
                h.update(block)
                out.write(block)
        if h.hexdigest() != hexdigest:
            tmp.unlink()
            raise ApiError(400, f"digest mismatch, expected \"sha256:{hexdigest}\", "
                           f"got \"sha256:{h.hexdigest()}\"")
        os.replace(tmp, path)
        self._send(201)

    def _create(self) -> None:
        body = self._json_body()
        api = self.api
        name = body.get("model") or body.get("name")
        if not name:
            raise ApiError(400, "missing model name")
        if body.get("quantize") or body.get("adapters"):
            raise ApiError(400, "quantize and adapters are not supported by this test server")
        files = body.get("files") or {}
        if not files and not body.get("from"):
            raise ApiError(400, "neither 'from' nor 'files' was specified")

        def parts() -> Iterator[dict]:
            if files:
                ggufs = [(f, d) for f, d in files.items() if f.endswith(".gguf")]
                if len(ggufs) != 1:
                    raise ApiError(400, "files must name exactly one .gguf file")
                fname, digest = ggufs[0]
                m = re.fullmatch(r"sha256[:-]([0-9a-f]{64})", digest or "")
                if not m or not api.blob_path(m.group(1)).is_file():
                    raise ApiError(400, f"blob {digest} for {fname} was not found: push it to "
                                   "/api/blobs first")
                path = api.blob_path(m.group(1))
                yield {"status": "parsing GGUF"}
                with path.open("rb") as f:
                    if f.read(4) != b"GGUF":
                        raise ApiError(400, f"{fname} is not a GGUF file")
                yield {"status": f"using existing layer sha256:{m.group(1)}"}
                model = Model(normalise(name), path, f"sha256:{m.group(1)}", path.stat().st_size)
            else:
                src = api.get(body["from"])
                yield {"status": "reading model metadata"}
                model = Model(normalise(name), src.gguf, src.digest, src.size, _now(),
                              src.template, src.system, dict(src.parameters), src.license)
            for key in ("template", "system", "license"):
                if body.get(key) is not None:
                    setattr(model, key, body[key])
                    yield {"status": f"creating {key} layer"}
            if body.get("parameters"):
                model.parameters.update(body["parameters"])
                yield {"status": "creating parameters layer"}
            yield {"status": "writing manifest"}
            with api._lock:
                api.models[model.name] = model
            yield {"status": "success"}

        if body.get("stream", True):
            self._stream(parts())
        else:
            self._send(200, _last(parts()))  # an ApiError becomes the status via _dispatch

    def _copy(self) -> None:
        body = self._json_body()
        api = self.api
        src = api.get(body.get("source"))
        dst = normalise(body.get("destination") or "")
        if dst == ":latest":
            raise ApiError(400, "missing destination")
        with api._lock:
            api.models[dst] = Model(dst, src.gguf, src.digest, src.size, _now(), src.template,
                                    src.system, dict(src.parameters), src.license)
        self._send(200)

    def _delete(self) -> None:
        body = self._json_body()
        api = self.api
        name = normalise(body.get("model") or body.get("name") or "")
        with api._lock:
            m = api.models.pop(name, None)
            if m is None:
                raise ApiError(404, f"model '{body.get('model') or body.get('name')}' not found")
            in_use = any(o.gguf == m.gguf for o in api.models.values())
            if not in_use and m.gguf.parent == api.blobs:
                llm = api._llamas.pop(m.gguf, None)
                if llm is not None:
                    llm.close()
                m.gguf.unlink(missing_ok=True)
        self._send(200)


def _last(parts: Iterator[dict]) -> dict:
    """The final object of a would-be stream: the answer when streaming is off."""
    last: dict = {}
    for last in parts:  # noqa: B007
        pass
    return last


def _logprobs(lp: dict, top: int) -> list[dict]:
    """llama-cpp-python completion log-probs -> Ollama's [{token, logprob, bytes,
    top_logprobs}]."""
    out = []
    for tok, val, alts in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        entry = {"token": tok, "logprob": float(val), "bytes": list(tok.encode())}
        if top:
            ranked = sorted((alts or {}).items(), key=lambda kv: -kv[1])[:top]
            entry["top_logprobs"] = [{"token": t, "logprob": float(v), "bytes": list(t.encode())}
                                     for t, v in ranked]
        out.append(entry)
    return out


@contextlib.contextmanager
def serve_ollama_api(models: dict[str, str | os.PathLike] | None = None,
                     library: dict[str, str | os.PathLike] | None = None,
                     root: str | os.PathLike | None = None,
                     n_ctx: int = 1024) -> Iterator[str]:
    """Run an OllamaAPIServer for the `with` block; yields its base URL."""
    server = OllamaAPIServer(models, library, root, n_ctx).start()
    try:
        yield server.url
    finally:
        server.stop()


__all__ = ["OllamaAPIServer", "normalise", "render_go_template", "serve_ollama_api",
           "sha256_file"]
