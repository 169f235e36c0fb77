"""Generation with transformers `generate` (the `transformers` backend of
tdreward.backends.registry): batched with left padding; log-probs from the raw logits."""

from __future__ import annotations

from collections.abc import Sequence

from tdreward.backends.registry import BackendOptions, Generation, check_sampling, sample_seeds
from tdreward.data.prompts import format_prompt, has_chat_template, use_chat
from tdreward.specs import ModelSpec, parse_spec


def to_transformers_spec(spec: ModelSpec) -> ModelSpec:
    """llamacpp:PATH names a GGUF file: transformers loads it as gguf:PATH."""
    if spec.kind == "llamacpp":
        target = spec.target
        return parse_spec(target if target.startswith("embedded:") else f"gguf:{target}")
    return spec


class TransformersGenerator:
    """transformers `generate`, batched with left padding; log-probs from the raw logits."""

    name = "transformers"

    def __init__(self, spec: ModelSpec, options: BackendOptions) -> None:
        from tdreward.backends.hf import load_model

        self.spec = spec
        self.batch_size = max(1, options.batch_size)
        self.model, self.tok = load_model(to_transformers_spec(spec), hardware=options.hardware)
        self.chat = use_chat(options.prompt_format, has_chat_template(self.tok), spec.raw)
        # End of turn: the tokenizer's EOS plus the generation config's (e.g. <end_of_turn>).
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = sorted({int(t) for t in [*eos, self.tok.eos_token_id] if t is not None})

    def format(self, prompt: str) -> str:
        return format_prompt(self.tok, prompt, "chat" if self.chat else "raw")

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
        enc = enc.to(self.model.get_input_embeddings().weight.device)  # where the LM reads
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
        new, lp = new.cpu(), lp.cpu()  # one copy each, not one per token read below
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


__all__ = ["TransformersGenerator", "to_transformers_spec"]
