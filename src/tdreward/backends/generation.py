"""One generation interface over every backend: prompts in, texts (+ token log-probs) out.

    gen = make_generator("embedded:smollm2-135m-instruct")       # llama.cpp, the fast CPU path
    outs = gen.generate(["Why is the sky blue?"], max_new_tokens=64, temperature=0.7, seed=0)
    outs[0].text, outs[0].logprobs, outs[0].n_tokens, outs[0].finish_reason
    gen.close()

Backends are a registry keyed by name (`register_backend`); `backend_for(spec)` picks the
default for a spec's kind:

    hub id / directory        transformers   (batched, left padding)
    gguf:, embedded:          llamacpp       (the quantised weights, 5-8x faster on a CPU);
                              `backend="transformers"` forces the dequantised transformers path
    llamacpp:                 llamacpp
    ollama:NAME[:TAG]         ollama         (tdreward.backends.ollama)
    openai:URL#MODEL          openai         (tdreward.backends.openai_compat)

Prompt i is sampled with seed `seed + i` (or `seeds[i]` when given), so a sample's seed does not
depend on which other prompts share its call. `prompt_format="auto"` wraps a prompt in the
model's chat template when the model has one (instruction-tuned models), else passes it raw.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tdreward.errors import TDRewardError
from tdreward.specs import ModelSpec, parse_spec

log = logging.getLogger("tdreward")

PROMPT_FORMATS = ("auto", "chat", "raw")


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
    """What every backend offers."""

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
    extra: dict[str, Any] = field(default_factory=dict)


_BACKENDS: dict[str, Callable[[ModelSpec, BackendOptions], Generator]] = {}


def register_backend(name: str):
    """Decorator: register a generator class (called as cls(spec, options)) under `name`."""

    def deco(cls):
        _BACKENDS[name] = cls
        return cls

    return deco


def backend_for(spec: str | ModelSpec, backend: str = "auto") -> str:
    """The backend that runs `spec`: its kind's default, or `backend` when it can run it."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    default = {"hf": "transformers", "gguf": "llamacpp", "embedded": "llamacpp",
               "llamacpp": "llamacpp", "ollama": "ollama", "openai": "openai"}[spec.kind]
    if backend in (None, "", "auto"):
        return default
    allowed = {"hf": {"transformers"}, "gguf": {"transformers", "llamacpp"},
               "embedded": {"transformers", "llamacpp"}, "llamacpp": {"transformers", "llamacpp"},
               "ollama": {"ollama"}, "openai": {"openai"}}[spec.kind]
    if backend not in allowed:
        raise TDRewardError(
            f"--backend {backend} cannot run {spec.raw!r}; it runs on: {', '.join(sorted(allowed))}"
        )
    return backend


def make_generator(spec: str | ModelSpec, backend: str = "auto",
                   options: BackendOptions | None = None) -> Generator:
    """Load the generator for `spec` (see the module docstring for the defaults)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    options = options or BackendOptions()
    if options.prompt_format not in PROMPT_FORMATS:
        raise TDRewardError(
            f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {options.prompt_format!r}"
        )
    name = backend_for(spec, backend)
    if name == "ollama":
        import tdreward.backends.ollama  # noqa: F401  (registers itself)
    elif name == "openai":
        import tdreward.backends.openai_compat  # noqa: F401
    return _BACKENDS[name](spec, options)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise TDRewardError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise TDRewardError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise TDRewardError(f"top_p must be in (0, 1], got {top_p}")


def sample_seeds(n: int, seed: int, seeds: Sequence[int] | None) -> list[int]:
    if seeds is not None:
        if len(seeds) != n:
            raise TDRewardError(f"{len(seeds)} seeds for {n} prompts")
        return [int(s) for s in seeds]
    return [(seed + i) & 0x7FFFFFFF for i in range(n)]


def use_chat(prompt_format: str, has_template: bool, model: str) -> bool:
    """auto: the chat template when the model has one; chat: required; raw: never."""
    if prompt_format == "chat" and not has_template:
        raise TDRewardError(f"{model} has no chat template; use --prompt_format raw or auto")
    return prompt_format == "chat" or (prompt_format == "auto" and has_template)


def to_transformers_spec(spec: ModelSpec) -> ModelSpec:
    """llamacpp:PATH names a GGUF file: transformers loads it as gguf:PATH."""
    if spec.kind == "llamacpp":
        target = spec.target
        return parse_spec(target if target.startswith("embedded:") else f"gguf:{target}")
    return spec


# --------------------------------------------------------------------------- transformers
@register_backend("transformers")
class TransformersGenerator:
    """transformers `generate`, batched with left padding; log-probs from the raw logits."""

    name = "transformers"

    def __init__(self, spec: ModelSpec, options: BackendOptions) -> None:
        from tdreward.backends.hf import load_model

        self.spec = spec
        self.batch_size = max(1, options.batch_size)
        self.model, self.tok = load_model(to_transformers_spec(spec))
        self.chat = use_chat(options.prompt_format, bool(getattr(self.tok, "chat_template", None)),
                             spec.raw)
        # End of turn: the tokenizer's EOS plus the generation config's (e.g. <end_of_turn>).
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = sorted({int(t) for t in [*eos, self.tok.eos_token_id] if t is not None})

    def format(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        return self.tok.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=False)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0, top_p: float = 1.0,
                 seeds: Sequence[int] | None = None) -> list[Generation]:
        check_sampling(max_new_tokens, temperature, top_p)
        seeds = sample_seeds(len(prompts), seed, seeds)
        out: list[Generation] = []
        for a in range(0, len(prompts), self.batch_size):
            out += self._batch(list(prompts[a : a + self.batch_size]), seeds[a : a + self.batch_size],
                               max_new_tokens, temperature, top_p)
        return out

    def _batch(self, prompts: list[str], seeds: list[int], max_new_tokens: int,
               temperature: float, top_p: float) -> list[Generation]:
        import torch

        tok = self.tok
        side = tok.padding_side
        tok.padding_side = "left"  # generation appends on the right: pad on the left
        try:
            # The chat template writes its own BOS where the model wants one.
            enc = tok([self.format(p) for p in prompts], return_tensors="pt", padding=True,
                      add_special_tokens=not self.chat)
        finally:
            tok.padding_side = side
        # Sampling draws from torch's global generator: seeded by the batch's first sample, so
        # with temperature > 0 a sample depends on its batch (greedy does not).
        torch.manual_seed(seeds[0])
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
            if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            res = self.model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                eos_token_id=self.eos_ids, output_logits=True, return_dict_in_generate=True,
                **sampling,
            )
        new = res.sequences[:, enc["input_ids"].shape[1] :]
        logits = torch.stack(res.logits, dim=1).float()  # [B, steps, V], untempered
        lp = torch.log_softmax(logits, dim=-1).gather(2, new[:, : logits.shape[1], None])[..., 0]
        gens = []
        for i, p in enumerate(prompts):
            ids = new[i].tolist()
            n = next((j for j, t in enumerate(ids) if t in self.eos_ids), len(ids))
            gens.append(Generation(
                prompt=p, text=tok.decode(ids[:n], skip_special_tokens=True), n_tokens=n,
                logprobs=[float(x) for x in lp[i, :n]],
                finish_reason="length" if n >= max_new_tokens else "stop",
                seed=seeds[i], chat=self.chat,
            ))
        return gens

    def close(self) -> None:
        self.model = None


# --------------------------------------------------------------------------- llama.cpp
def _llamacpp_model_class():
    from tdreward.backends.llamacpp import LlamaCppModel

    class _GenerationLlama(LlamaCppModel):
        """LlamaCppModel for generation: a chat-formatted prompt's markers (<|im_start|>, ...)
        must become their special tokens, not text, and a template that writes BOS itself
        must not get a second one."""

        parse_special = False

        def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
            ids = list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos,
                                         special=self.parse_special))
            bos = self.llm.token_bos()
            if len(ids) >= 2 and ids[0] == ids[1] == bos:
                ids = ids[1:]
            return ids

    return _GenerationLlama


@register_backend("llamacpp")
class LlamaCppGenerator:
    """GGUF generation with llama.cpp through tdreward.backends.llamacpp.LlamaCppModel."""

    name = "llamacpp"

    def __init__(self, spec: ModelSpec, options: BackendOptions) -> None:
        self.spec = spec
        threads = options.extra.get("n_threads")  # default: LlamaCppModel's (half the CPUs)
        self.model = _llamacpp_model_class()(spec.raw, n_ctx=int(options.extra.get("n_ctx", 2048)),
                                             n_threads=int(threads) if threads else None,
                                             n_parallel=max(1, options.batch_size))
        template = self.model.llm.metadata.get("tokenizer.chat_template")
        self.chat = use_chat(options.prompt_format, bool(template), spec.raw)
        self.model.parse_special = self.chat
        self._formatter = None
        if self.chat:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            llm = self.model.llm
            text = lambda t: llm.detokenize([t], special=True).decode("utf-8", "replace") \
                if t >= 0 else ""  # noqa: E731
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=text(llm.token_eos()),
                                                  bos_token=text(llm.token_bos()))

    def format(self, prompt: str) -> str:
        if self._formatter is None:
            return prompt
        return self._formatter(messages=[{"role": "user", "content": prompt}]).prompt

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0, top_p: float = 1.0,
                 seeds: Sequence[int] | None = None) -> list[Generation]:
        check_sampling(max_new_tokens, temperature, top_p)
        seeds = sample_seeds(len(prompts), seed, seeds)
        outs = self.model.generate([self.format(p) for p in prompts],
                                   max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, seeds=seeds)
        gens = []
        for p, s, r in zip(prompts, seeds, outs, strict=True):
            n = len(r["tokens"])
            gens.append(Generation(
                prompt=p, text=r["text"], n_tokens=n, logprobs=[float(x) for x in r["logprobs"]],
                finish_reason="length" if n >= max_new_tokens else "stop", seed=s, chat=self.chat,
            ))
        return gens

    def close(self) -> None:
        self.model.close()


__all__ = [
    "BackendOptions", "Generation", "Generator", "LlamaCppGenerator", "PROMPT_FORMATS",
    "TransformersGenerator", "backend_for", "make_generator", "register_backend",
]
