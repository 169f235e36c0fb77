"""Generation with llama.cpp on a GGUF file (the `llamacpp` backend of
tdreward.backends.registry), through tdreward.backends.llamacpp.LlamaCppModel."""

from __future__ import annotations

from collections.abc import Sequence

from tdreward.backends.llamacpp import LlamaCppModel
from tdreward.backends.registry import (
    BackendOptions,
    Generation,
    check_sampling,
    sample_seeds,
    use_chat,
)
from tdreward.specs import ModelSpec


class GenerationLlama(LlamaCppModel):
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


class LlamaCppGenerator:
    """GGUF generation with llama.cpp through tdreward.backends.llamacpp.LlamaCppModel."""

    name = "llamacpp"
    n_ctx = 2048  # tokens of context per sequence

    def __init__(self, spec: ModelSpec, options: BackendOptions) -> None:
        self.spec = spec
        threads = options.extra.get("n_threads")  # default: LlamaCppModel's (half the CPUs)
        self.model = GenerationLlama(spec.raw, n_ctx=self.n_ctx,
                                     n_threads=int(threads) if threads else None,
                                     n_parallel=max(1, options.batch_size),
                                     n_gpu_layers=options.n_gpu_layers)
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
        """The prompt as llama.cpp reads it: the GGUF's own chat template (jinja), as
        tdreward.data.prompts.format_prompt applies a transformers tokenizer's."""
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


__all__ = ["GenerationLlama", "LlamaCppGenerator"]
