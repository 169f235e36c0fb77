"""One model-spec string everywhere (docs/design.md §3).

    gpt2, org/name, ./dir         transformers (hub id or local directory)
    gguf:PATH                     transformers, GGUF dequantised (cached as safetensors)
    llamacpp:PATH                 llama-cpp-python on a GGUF file
    embedded:NAME                 a GGUF model shipped as a PyPI package (works offline)
    ollama:NAME[:TAG]             a model served by Ollama
    openai:URL#MODEL              an OpenAI-compatible server

`llamacpp:` also takes `embedded:NAME` as its path, e.g. `llamacpp:embedded:gemma3-270m`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tdreward.errors import TDRewardError

# The reference LM and policy when none is named: small, instruction-tuned, shipped on PyPI.
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
# The models `compare` and `experiment` set side by side when none are named.
DEFAULT_MODELS = (DEFAULT_MODEL, "embedded:gemma3-270m")

KINDS = ("hf", "gguf", "llamacpp", "embedded", "ollama", "openai")
_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*):(.*)$")

SPEC_SYNTAX = """\
  NAME_OR_DIR                hub id (e.g. gpt2) or a local transformers directory
  gguf:PATH                  GGUF file loaded by transformers (dequantised, cached)
  llamacpp:PATH              GGUF file run by llama-cpp-python (also llamacpp:embedded:NAME)
  embedded:NAME              a model shipped as a PyPI package (offline)
  ollama:NAME[:TAG]          a model served by Ollama (--ollama_host)
  openai:URL#MODEL           an OpenAI-compatible server, e.g. openai:http://127.0.0.1:8080/v1#m"""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: `kind` says which backend runs it, `target` what it names."""

    kind: str
    target: str
    raw: str
    model: str | None = None  # the model name of an openai: spec

    def __str__(self) -> str:
        return self.raw

    @property
    def can_score(self) -> bool:
        """Whether the backend gives log-probabilities of a given text."""
        return self.kind in ("hf", "gguf", "llamacpp", "embedded")


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec string; raises TDRewardError on a malformed or unknown one."""
    spec = spec.strip()
    if not spec:
        raise TDRewardError("empty model spec; see `tdreward models` for the syntax")
    m = _PREFIX.match(spec)
    # A local path that happens to contain ':' (or a Windows drive) is a directory spec.
    if m is None or Path(spec).exists() or len(m.group(1)) == 1:
        return ModelSpec("hf", spec, spec)
    prefix, rest = m.group(1).lower(), m.group(2)
    if not rest:
        raise TDRewardError(f"model spec {spec!r} names nothing after '{prefix}:'")
    if prefix == "gguf":
        return ModelSpec("gguf", rest, spec)
    if prefix == "llamacpp":
        return ModelSpec("llamacpp", rest, spec)
    if prefix == "embedded":
        return ModelSpec("embedded", rest, spec)
    if prefix == "ollama":
        return ModelSpec("ollama", rest, spec)
    if prefix == "openai":
        url, sep, model = rest.partition("#")
        if not sep or not model or not url.startswith(("http://", "https://")):
            raise TDRewardError(
                f"openai spec {spec!r} must look like openai:http://HOST:PORT/v1#MODEL"
            )
        return ModelSpec("openai", url.rstrip("/"), spec, model=model)
    if prefix in ("hf", "hub"):
        return ModelSpec("hf", rest, spec)
    raise TDRewardError(
        f"unknown model spec prefix '{prefix}:' in {spec!r}; use one of gguf:, llamacpp:, "
        "embedded:, ollama:, openai: or a hub id / local directory (`tdreward models`)"
    )
