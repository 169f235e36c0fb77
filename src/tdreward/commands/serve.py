"""`tdreward serve`: llama.cpp's OpenAI-compatible server (llama-cpp-python) for a model.

A transformers model is exported to GGUF first (once; cached). The evaluation backends reach the
server as `openai:http://HOST:PORT/v1#ALIAS` (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import logging

from tdreward.commands import DEFAULT_MODEL, flag

ORDER = 64
log = logging.getLogger("tdreward")


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve", parents=[common], help="serve a model with llama.cpp's OpenAI-compatible server",
        description="Run llama-cpp-python's OpenAI-compatible server (/v1/models, "
        "/v1/completions, /v1/chat/completions) for a GGUF file or any model spec; "
        "transformers models are exported to GGUF first (cached).")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a .gguf file or model spec (default {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="listen port (default 8080)")
    p.add_argument("--alias", help="the model's name in the API (default: the spec)")
    flag(p, "--n_ctx", type=int, default=4096, help="context length (4096)")
    flag(p, "--n_threads", type=int, help="CPU threads (default: half the usable CPUs)")
    p.add_argument("--outtype", choices=("f32", "f16", "q8_0"), default="f16",
                   help="GGUF type when a transformers model is exported (f16)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tdreward.errors import TDRewardError
    from tdreward.workflows.export_gguf import cached_gguf

    if not 0 < args.port < 65536:
        raise TDRewardError(f"--port must be in 1..65535, got {args.port}")
    try:
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise TDRewardError("`tdreward serve` needs llama-cpp-python's server extra: "
                            "pip install 'llama-cpp-python[server]'") from e
    from tdreward.backends.hf import check_gguf
    from tdreward.backends.llamacpp import _usable_cpus

    path = cached_gguf(args.model, args.outtype)
    check_gguf(path)  # llama.cpp aborts the process on some malformed files
    threads = args.n_threads or max(1, _usable_cpus() // 2)
    alias = args.alias or args.model
    app = create_app(
        server_settings=ServerSettings(host=args.host, port=args.port),
        model_settings=[ModelSettings(model=str(path), model_alias=alias, n_ctx=args.n_ctx,
                                      n_threads=threads, n_threads_batch=threads,
                                      logits_all=False, verbose=args.verbose)])
    url = f"http://{args.host}:{args.port}/v1"
    print(f"serving {path} as {alias!r} at {url}  (spec: openai:{url}#{alias})", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port,
                    log_level="info" if args.verbose else "warning")
    except OSError as e:  # the port is taken, the address is not ours, ...
        raise TDRewardError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    return 0
