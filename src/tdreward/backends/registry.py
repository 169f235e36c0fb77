"""One generation interface over every backend: prompts in, texts (+ token log-probs) out.

    gen = make_generator("embedded:smollm2-135m-instruct")       # llama.cpp, the fast CPU path
    outs = gen.generate(["Why is the sky blue?"], max_new_tokens=64, temperature=0.7, seed=0)
    outs[0].text, outs[0].logprobs, outs[0].n_tokens, outs[0].finish_reason
    gen.close()

This module is the interface (`Generation`, `BackendOptions`, the `Generator` protocol,
`PerPromptGenerator`, `sample_seeds`, `check_sampling`, `use_chat`) and the registry: a map
name -> "module:Class" whose module is imported only when a generator of that backend is made,
as lm-evaluation-harness's `lm_eval.models` does. Backend modules import this one; it imports
none of them. `backend_for(spec)` picks the default for a spec's kind:

    hub id / directory        transformers   (tdreward.backends.transformers_gen: batched,
                                              left padding)
    gguf:, embedded:          llamacpp       (tdreward.backends.llamacpp_gen: the quantised
                                              weights, 5-8x faster on a CPU);
                              `backend="transformers"` forces the dequantised transformers path
    llamacpp:                 llamacpp
    ollama:NAME[:TAG]         ollama         (tdreward.backends.ollama)
    openai:URL#MODEL          openai         (tdreward.backends.openai_compat)

Prompt i is sampled with seed `seed + i` (or `seeds[i]` when given), so a sample's seed does not
depend on which other prompts share its call. `prompt_format="auto"` wraps a prompt in the
model's chat template when the model has one (instruction-tuned models), else passes it raw
(the rule: tdreward.data.prompts).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from tdreward.data.prompts import PROMPT_FORMATS, use_chat
from tdreward.errors import TDRewardError
from tdreward.hardware import HardwareSettings, Placement
from tdreward.specs import ModelSpec, parse_spec

log = logging.getLogger("tdreward")


@dataclass
class Generation:
    """One completion. `logprobs` are the model's log-probs of the generated tokens (None when
    the backend does not report them); `n_tokens` counts generated tokens in the model's own
    tokenisation (None when unknown)."""

    prompt: str
    text: str
    n_tokens: int | None = None
    logprobs: list[float] | None = None
    finish_reason: str = "stop"  # "stop" (end of turn / EOS) or "length" (max_new_tokens)
    seed: int = 0
    chat: bool = False  # whether the prompt was wrapped in the chat template

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, "n_tokens": self.n_tokens,
                "logprobs": self.logprobs, "finish_reason": self.finish_reason,
                "seed": self.seed, "chat": self.chat}

    @classmethod
    def from_dict(cls, d: dict) -> Generation:
        return cls(**{k: d[k] for k in ("prompt", "text", "n_tokens", "logprobs",
                                        "finish_reason", "seed", "chat") if k in d})


class Generator(Protocol):
    """What every backend offers (made as cls(spec, options))."""

    name: str  # backend name
    spec: ModelSpec

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0, top_p: float = 1.0,
                 seeds: Sequence[int] | None = None) -> list[Generation]: ...

    def close(self) -> None: ...


@dataclass
class BackendOptions:
    """Settings a backend may use; each takes the ones it needs."""

    prompt_format: str = "auto"  # auto | chat | raw
    batch_size: int = 8  # prompts generated together (transformers: a padded batch;
    # llama.cpp: sequences sharing each decode call)
    ollama_host: str | None = None
    pull: bool = False  # ollama: pull a missing model
    concurrency: int = 4  # servers: requests in flight
    timeout: float = 300.0  # servers: seconds per request
    retries: int = 3  # openai: attempts after the first on connection errors / 5xx / 429
    # transformers: where and in what dtype the model loads (None: float32 on the CPU)
    hardware: HardwareSettings | Placement | None = None
    n_gpu_layers: int | None = None  # llamacpp: layers on the GPU (None: all if it can, -1 all)
    extra: dict[str, Any] = field(default_factory=dict)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise TDRewardError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise TDRewardError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise TDRewardError(f"top_p must be in (0, 1], got {top_p}")


def sample_seeds(n: int, seed: int, seeds: Sequence[int] | None) -> list[int]:
    """The seed of each of `n` prompts: `seeds` when given, else seed + i (31 bits)."""
    if seeds is not None:
        if len(seeds) != n:
            raise TDRewardError(f"{len(seeds)} seeds for {n} prompts")
        return [int(s) for s in seeds]
    return [(seed + i) & 0x7FFFFFFF for i in range(n)]


class PerPromptGenerator:
    """Base of the server backends (ollama, openai): one request per prompt, `concurrency`
    requests in flight. A subclass sets `concurrency` and writes `generate_one`."""

    concurrency: int = 1

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0, top_p: float = 1.0,
                 seeds: Sequence[int] | None = None) -> list[Generation]:
        check_sampling(max_new_tokens, temperature, top_p)
        jobs = list(zip(prompts, sample_seeds(len(prompts), seed, seeds), strict=True))

        def one(job: tuple[str, int]) -> Generation:
            return self.generate_one(job[0], job[1], max_new_tokens, temperature, top_p)

        if self.concurrency == 1 or len(jobs) == 1:
            return [one(j) for j in jobs]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, jobs))

    def generate_one(self, prompt: str, seed: int, max_new_tokens: int, temperature: float,
                     top_p: float) -> Generation:
        raise NotImplementedError


# --------------------------------------------------------------------------- registry
# name -> "module:Class"; the module is imported by make_generator, when the backend is used.
BACKENDS: dict[str, str] = {
    "transformers": "tdreward.backends.transformers_gen:TransformersGenerator",
    "llamacpp": "tdreward.backends.llamacpp_gen:LlamaCppGenerator",
    "ollama": "tdreward.backends.ollama:OllamaGenerator",
    "openai": "tdreward.backends.openai_compat:OpenAICompatGenerator",
}
# The backends that can run each spec kind, its default first.
_RUNS = {"hf": ("transformers",), "gguf": ("llamacpp", "transformers"),
         "embedded": ("llamacpp", "transformers"), "llamacpp": ("llamacpp", "transformers"),
         "ollama": ("ollama",), "openai": ("openai",)}


def register_backend(name: str, target: str) -> None:
    """Register a generator class, named as "module:Class" (imported when first used)."""
    if ":" not in target:
        raise ValueError(f"backend target must be 'module:Class', got {target!r}")
    BACKENDS[name] = target


def backend_for(spec: str | ModelSpec, backend: str = "auto") -> str:
    """The backend that runs `spec`: its kind's default, or `backend` when it can run it."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    allowed = _RUNS[spec.kind]
    if backend in (None, "", "auto"):
        return allowed[0]
    if backend not in allowed:
        raise TDRewardError(
            f"--backend {backend} cannot run {spec.raw!r}; it runs on: {', '.join(sorted(allowed))}"
        )
    return backend


def generator_class(name: str) -> type:
    """The generator class registered as `name` (its module imported now)."""
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_generator(spec: str | ModelSpec, backend: str = "auto",
                   options: BackendOptions | None = None) -> Generator:
    """Load the generator for `spec` (see the module docstring for the defaults)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    options = options or BackendOptions()
    if options.prompt_format not in PROMPT_FORMATS:
        raise TDRewardError(
            f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {options.prompt_format!r}"
        )
    return generator_class(backend_for(spec, backend))(spec, options)


__all__ = [
    "BACKENDS", "BackendOptions", "Generation", "Generator", "PROMPT_FORMATS",
    "PerPromptGenerator", "backend_for", "check_sampling", "generator_class", "make_generator",
    "register_backend", "sample_seeds", "use_chat",
]
