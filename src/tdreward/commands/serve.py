"""`tdreward serve`: llama.cpp's OpenAI-compatible server (llama-cpp-python) for a model.

A transformers model is exported to GGUF first (once; cached). The evaluation backends reach the
server as `openai:http://HOST:PORT/v1#ALIAS` (docs/deploy.md). What the server exposes: the
alias (never the local file path) as the model's id and name; requests larger than
--max_request_bytes are refused with 413 before they are parsed; with --api_key every API call
needs `Authorization: Bearer KEY`; binding beyond loopback logs a warning.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdreward.commands import add_command
from tdreward.errors import TDRewardError
from tdreward.export.export_config import OUTTYPES
from tdreward.flags import from_args, setting
from tdreward.hardware import LlamaCppSettings
from tdreward.specs import DEFAULT_MODEL
from tdreward.validation import check_choice, validate

ORDER = 64
log = logging.getLogger("tdreward")

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a full 4096-token prompt is ~20 kB of JSON
API_KEY_ENV = "TDREWARD_API_KEY"  # not OPENAI_API_KEY: that one may be a real OpenAI key


@dataclass
class ServeConfig:
    """Everything `tdreward serve` takes: each field is a flag (tdreward.flags)."""

    model: str = setting(DEFAULT_MODEL, help="a .gguf file or model spec")
    host: str = setting("127.0.0.1", help="listen address")
    port: int = setting(8080, help="listen port")
    alias: str | None = setting(None, help="the model's name in the API", default_help=(
        "the spec; for a local file or directory its name, so that no path is exposed"))
    api_key: str | None = setting(
        None, help="require `Authorization: Bearer KEY` on every API call",
        default_help=f"${API_KEY_ENV}; clients: $OPENAI_API_KEY")
    max_request_bytes: int = setting(DEFAULT_MAX_REQUEST_BYTES,
                                     help="refuse larger request bodies with 413")
    logprobs: bool = setting(
        False, help="serve log-probs of generated tokens (llama.cpp's logits_all: keeps "
        "n_ctx x vocabulary floats, 0.8 GB for SmolLM2 at n_ctx 4096); without it `compare` "
        "records no gen_mean_logprob")
    n_ctx: int = setting(4096, help="context length")
    n_threads: int | None = setting(None, help="CPU threads",
                                    default_help="half the usable CPUs")
    llamacpp: LlamaCppSettings = field(default_factory=LlamaCppSettings,
                                       metadata={"help": "nested"})
    outtype: str = setting("f16", choices=OUTTYPES,
                           help="GGUF type when a transformers model is exported")
    verbose: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise TDRewardError(f"--port must be in 1..65535, got {self.port}")
        if self.max_request_bytes < 1024:
            raise TDRewardError(f"--max_request_bytes must be at least 1024, got "
                                f"{self.max_request_bytes}")
        validate(self, {"n_ctx": ">=1", "n_threads": ">=1"})
        check_choice("--outtype", self.outtype, OUTTYPES)
        if self.api_key is None:  # read when the config is built, not when the module loads
            self.api_key = os.environ.get(API_KEY_ENV) or None


def register(sub, common: argparse.ArgumentParser) -> None:
    add_command(
        sub, common, "serve", ServeConfig, run,
        help="serve a model with llama.cpp's OpenAI-compatible server",
        description="Run llama-cpp-python's OpenAI-compatible server (/v1/models, "
        "/v1/completions, /v1/chat/completions) for a GGUF file or any model spec; "
        "transformers models are exported to GGUF first (cached).", config_file=False)


def run(args: argparse.Namespace) -> int:
    cfg = from_args(ServeConfig, args, verbose=args.verbose)
    from tdreward.export.gguf_writer import cached_gguf

    warn_if_exposed(cfg.host, cfg.api_key is not None)  # before the minutes an export takes
    try:
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ServerSettings
    except ImportError as e:
        raise TDRewardError("`tdreward serve` needs llama-cpp-python's server extra: "
                            "pip install 'llama-cpp-python[server]'") from e
    from tdreward.backends.hf import check_gguf

    path = cached_gguf(cfg.model, cfg.outtype)
    check_gguf(path)  # llama.cpp aborts the process on some malformed files
    alias = cfg.alias or default_alias(cfg.model)
    # api_key is passed even when None: ServerSettings is a pydantic BaseSettings and would
    # otherwise take $API_KEY from the environment (a key the user never gave serve).
    app = create_app(
        server_settings=ServerSettings(host=cfg.host, port=cfg.port, api_key=cfg.api_key),
        model_settings=[model_settings(cfg, path, alias)])
    hide_model_path(alias)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host  # an IPv6 literal
    url = f"http://{host}:{cfg.port}/v1"
    print(f"serving {path} as {alias!r} at {url}  (spec: openai:{url}#{alias})", flush=True)
    try:
        uvicorn.run(BodySizeLimit(app, cfg.max_request_bytes), host=cfg.host, port=cfg.port,
                    log_level="info" if cfg.verbose else "warning")
    except OSError as e:  # the port is taken, the address is not ours, ...
        raise TDRewardError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from e
    return 0


def model_settings(cfg: ServeConfig, path: Path, alias: str) -> Any:
    """llama-cpp-python's ModelSettings of the served model."""
    from llama_cpp.server.settings import ModelSettings

    from tdreward.backends.llamacpp import resolve_gpu_layers, usable_cpus

    threads = cfg.n_threads or max(1, usable_cpus() // 2)
    return ModelSettings(model=str(path), model_alias=alias, n_ctx=cfg.n_ctx, n_threads=threads,
                         n_threads_batch=threads,
                         n_gpu_layers=resolve_gpu_layers(cfg.llamacpp.n_gpu_layers),
                         logits_all=cfg.logprobs, verbose=cfg.verbose)


def default_alias(model: str) -> str:
    """The spec, except for a local file or directory: its name (the .gguf stem), because the
    alias is what /v1/models and every answer show to clients."""
    from tdreward.specs import parse_spec

    try:
        spec = parse_spec(model)
    except TDRewardError:
        return model
    local = Path(spec.target).expanduser()
    if spec.kind in ("hf", "gguf", "llamacpp") and local.exists():
        return local.stem if local.suffix == ".gguf" else local.resolve().name
    return model


def hide_model_path(alias: str) -> None:
    """Answer with the alias where llama-cpp-python would show the GGUF's path.

    A completion request without a "model" field gets `"model": Llama.model_path` in its answer
    (llama_cpp/llama.py: `model if model is not None else self.model_path`). The path is only
    read there (and when pickling) once the model is loaded, so the loaded model's attribute is
    set to the alias. The server keeps its single model in llama_cpp.server.app._llama_proxy.
    """
    from llama_cpp.server import app as server_app

    proxy = server_app._llama_proxy
    if proxy is not None:
        proxy(alias).model_path = alias


def warn_if_exposed(host: str, has_api_key: bool) -> None:
    """A warning when the server listens beyond this machine."""
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name
        loopback = host.lower() in ("localhost", "localhost.localdomain")
    if loopback:
        return
    if has_api_key:
        log.warning("listening on %s: the server is reachable from the network; the API key "
                    "travels in clear text over HTTP (put a TLS proxy in front)", host)
    else:
        log.warning("listening on %s without --api_key: anyone who can reach this machine can "
                    "run the model; pass --api_key or bind to 127.0.0.1", host)


ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[dict]],
                    Callable[[dict], Awaitable[None]]], Awaitable[None]]


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before the app parses it.

    A declared Content-Length is checked before anything is read. A body without one (chunked)
    is read here up to the limit and handed on; uvicorn (h11/httptools) stops a body longer
    than its declared Content-Length, so counting the declared length is enough there.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: MutableMapping[str, Any],
                       receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                await self._refuse(send, 400, "invalid Content-Length header")
                return
            if declared > self.max_bytes:
                await self._refuse(send, 413, f"request body of {declared} bytes exceeds the "
                                   f"server's limit of {self.max_bytes} bytes")
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length: read the body (up to the limit) before the app sees any of it.
        chunks: list[dict] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send, 413, f"request body exceeds the server's limit of "
                                   f"{self.max_bytes} bytes")
                return
            chunks.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            # The buffered body first, then the connection's own messages (http.disconnect,
            # which the server polls while it generates).
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Callable[[dict], Awaitable[None]], status: int, message: str) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                     "param": None, "code": None}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
