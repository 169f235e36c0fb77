"""Log-probabilities of a given text from an OpenAI-compatible server (`openai:URL#MODEL`).

One request per text to `URL/completions` with `echo: true`, `logprobs: K`, `max_tokens: 1`
and vLLM's extra `prompt_logprobs: K`. Two answer shapes are read:

* vLLM: `choices[0].prompt_logprobs`, one entry per prompt token, `null` for the first and
  otherwise `{token_id: {"logprob", "rank", "decoded_token"}}` holding the seen token and the
  top K. Token ids come with it (the first token's from the echoed `token_id:N` strings that
  vLLM's `return_tokens_as_token_ids` asks for).
* the legacy OpenAI echo shape (llama-cpp-python's server, vLLM's echo): `choices[0].logprobs`
  with `tokens`, `token_logprobs` and `top_logprobs` (`{token_string: logprob}`), prompt
  tokens first, then the generated one. No ids: a token's string is its identity.

llama-cpp-python (its /v1/models says `owned_by: "me"`) pairs each echoed token with the
distribution that *follows* it unless the prompt starts with the model's BOS token, which it
strips (llama_cpp/llama.py, `_create_completion`): for a model that adds no BOS (SmolLM2,
GPT-2, Qwen) every log-prob would be one token off. So for that server the text is sent after
the model's BOS text, found once by probing a few well-known BOS strings and keeping the one
the server strips. That is also the prefix `tdreward score`'s transformers path reads a text
after (TDRewardModel.prefix_token_id), so the numbers line up with it.

The first text token never has a log-prob (the API nulls it); every later one does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from tdreward.backends.openai_compat import OpenAICompatGenerator, OpenAIServerError
from tdreward.backends.registry import BackendOptions
from tdreward.errors import TDRewardError
from tdreward.specs import ModelSpec, parse_spec

log = logging.getLogger("tdreward")

DEFAULT_TOP_K = 20  # vLLM's default --max-logprobs: the most it serves without a flag
# BOS texts of common GGUF vocabularies; a candidate counts only if the server strips it.
BOS_CANDIDATES = ("<|im_start|>", "<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>",
                  "<|startoftext|>", "<｜begin▁of▁sentence｜>", "[CLS]")
# A probe text whose continuation is surely a token, not EOS (see _aligned).
PROBE = "1, 2, 3,"
NEEDS = ("start llama-cpp-python's server with logits_all=True (`tdreward serve --logprobs`); "
         "vLLM serves them with --max-logprobs >= {k}")


@dataclass
class PromptLogprobs:
    """One text as the server saw it. `tokens[i]` is the i-th token's string, `ids[i]` its id
    (None where the server sends none), `logp[i]` log p(x_i | x_<i) (None for the first),
    `top[i]` the top-K alternatives of that prediction keyed like `identity` (None for the
    first) and `final_top` the top-K of the prediction after the last token (None when the
    server sent none)."""

    tokens: list[str]
    ids: list[int] | None
    logp: list[float | None]
    top: list[dict[str, float] | None]
    final_top: dict[str, float] | None = None

    def identity(self, i: int) -> str:
        """What counts as "the same token" for the association c_t: the id when the server
        sends one, else the token's string (two ids with one string count as one token)."""
        return f"#{self.ids[i]}" if self.ids is not None else self.tokens[i]


class ServerLogprobs:
    """Prompt log-probs of texts from the server an `openai:URL#MODEL` spec names."""

    def __init__(self, spec: str | ModelSpec, top_k: int = DEFAULT_TOP_K,
                 options: BackendOptions | None = None) -> None:
        self.spec = parse_spec(spec) if isinstance(spec, str) else spec
        if self.spec.kind != "openai":
            raise TDRewardError(f"{self.spec} is not an openai:URL#MODEL spec")
        self.top_k = top_k
        # The generator's HTTP client: its retries, timeouts, API key and one-line errors.
        self.http = OpenAICompatGenerator(self.spec, options or BackendOptions(retries=2))
        self.url = self.http.url
        info = self._model_info()
        self.llama_cpp_python = info.get("owned_by") == "me"
        meta = info.get("meta") if isinstance(info.get("meta"), dict) else {}
        # llama.cpp's llama-server reports the vocabulary (c_t's uniform p0 needs it).
        size = meta.get("n_vocab") or info.get("vocab_size") or info.get("n_vocab")
        self.vocab_size: int | None = int(size) if size else None
        self.bos_text = ""  # set by the probe where the server needs it

    def _model_info(self) -> dict:
        try:
            data = self.http.request("GET", "/models").json().get("data") or []
        except (OpenAIServerError, ValueError, AttributeError):
            return {}
        mine = [m for m in data if isinstance(m, dict) and m.get("id") == self.http.model]
        return mine[0] if mine else (data[0] if len(data) == 1 and isinstance(data[0], dict)
                                     else {})

    # --- requests ----------------------------------------------------------------------------
    def _complete(self, prompt: str, k: int) -> dict:
        body: dict[str, Any] = {"model": self.http.model, "prompt": prompt, "max_tokens": 1,
                                "temperature": 0.0, "echo": True, "logprobs": k,
                                "stream": False}
        if not self.llama_cpp_python:
            # vLLM's extras (others ignore them): the prompt's log-probs, and the echoed tokens
            # as "token_id:N", the only place the first token's id comes back.
            body.update(prompt_logprobs=k, return_tokens_as_token_ids=True)
        try:
            r = self.http.request("POST", "/completions", body)
        except OpenAIServerError as e:
            if "logprob" in (e.detail or "").lower():
                raise TDRewardError(f"{self.url} returns no prompt log-probs ({e.detail}): "
                                    + NEEDS.format(k=k)) from e
            raise
        try:
            data = r.json()
            choice = data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise TDRewardError(f"{self.url}/completions sent no completion choice: "
                                f"{r.text[:200]!r}") from e
        return {"choice": choice, "usage": data.get("usage") or {}}

    def text_logprobs(self, text: str) -> PromptLogprobs:
        """log p of every token of `text` after the first, and each prediction's top K."""
        if self.llama_cpp_python and not self.bos_text:
            self._probe_bos()
        answer = self._complete(self.bos_text + text, self.top_k)
        out = parse_answer(answer["choice"], answer["usage"])
        if out is None:
            raise TDRewardError(f"{self.url} returned no prompt log-probs (neither "
                                "prompt_logprobs nor echoed logprobs): " + NEEDS.format(
                                    k=self.top_k))
        if len(out.tokens) < 2:
            raise TDRewardError(f"text {text[:30]!r} is {len(out.tokens)} token(s) for the "
                                "server: at least 2 are needed (is it empty?)")
        return out

    def _probe_bos(self) -> None:
        """Find the BOS text llama-cpp-python strips (see the module docstring). A model that
        adds BOS itself needs none."""
        if _aligned(self._complete(PROBE, 1), PROBE):
            self.llama_cpp_python = False  # aligned: read it like any other server
            return
        for bos in BOS_CANDIDATES:
            if _aligned(self._complete(bos + PROBE, 1), PROBE):
                self.bos_text = bos
                log.info("%s: reading texts after its BOS %r", self.url, bos)
                return
        raise TDRewardError(
            f"{self.url} is llama-cpp-python's server on a model that adds no BOS and whose "
            f"BOS is none of {', '.join(BOS_CANDIDATES)}: its echoed log-probs would be one "
            "token off; serve the model with vLLM or llama.cpp's llama-server instead")

    def close(self) -> None:
        self.http.close()


def _aligned(answer: dict, text: str) -> bool:
    """Whether llama-cpp-python lined the echoed tokens up with their predictions. It scores
    as many entries as it evaluated tokens: when it stripped a leading BOS those are the text's
    tokens plus the generated one, which starts where the text ends (its text_offset is
    len(text)); otherwise the generated token is cut off and the last entry starts inside the
    prompt. (Token counts cannot tell: they are equal either way.)"""
    lp = answer["choice"].get("logprobs")
    if not isinstance(lp, dict):
        return False
    offsets, tokens = lp.get("text_offset") or [], lp.get("tokens") or []
    return bool(offsets) and offsets[-1] == len(text) and "".join(tokens).startswith(text)


def parse_answer(choice: dict, usage: dict) -> PromptLogprobs | None:
    """A completion choice with prompt log-probs in either shape; None when it has none."""
    if isinstance(choice.get("prompt_logprobs"), list):
        # The prediction after the last prompt token is not in vLLM's prompt_logprobs (its
        # generated token's top K are keyed by string, not id): final_top stays None.
        out = parse_vllm(choice["prompt_logprobs"])
        echoed = (choice.get("logprobs") or {}).get("tokens") or [""]
        if str(echoed[0]).startswith("token_id:"):
            out.ids[0] = int(str(echoed[0]).removeprefix("token_id:"))  # type: ignore[index]
        return out
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("token_logprobs"), list):
        return None
    n_gen = int(usage.get("completion_tokens") or 0)
    if not any(v is not None for v in lp["token_logprobs"]):
        return None
    return parse_echo(lp, n_gen)


def parse_vllm(entries: list) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: [null, {id: {"logprob", "rank", "decoded_token"}}, ...]; the
    seen token is the entry's key that is not among the ranks 1..K, or the rank-1 one when it
    is the top token: vLLM lists the prompt token first (it adds it to the top K)."""
    tokens: list[str] = []
    ids: list[int] = []
    logp: list[float | None] = []
    top: list[dict[str, float] | None] = []
    for i, entry in enumerate(entries):
        if entry is None:
            if i:
                raise TDRewardError(f"prompt_logprobs entry {i} is null: only the first may be")
            tokens.append("")
            ids.append(-1)  # the first token's id is not sent; it has no prediction
            logp.append(None)
            top.append(None)
            continue
        items = [(int(k), v) for k, v in entry.items()]
        seen_id, seen = items[0]  # vLLM puts the prompt token first
        tokens.append(str(seen.get("decoded_token", "")))
        ids.append(seen_id)
        logp.append(_finite(seen["logprob"]))
        top.append({f"#{k}": _finite(v["logprob"]) for k, v in items})
    return PromptLogprobs(tokens, ids, logp, top)


def parse_echo(lp: dict | None, n_gen: int) -> PromptLogprobs | None:
    """The legacy echo shape: prompt tokens, then `n_gen` generated ones (their first entry's
    top K is the prediction after the last prompt token: `final_top`)."""
    if not isinstance(lp, dict):
        return None
    tokens = [str(t) for t in lp.get("tokens") or []]
    values = list(lp.get("token_logprobs") or [])
    tops = list(lp.get("top_logprobs") or [None] * len(tokens))
    if not tokens or len(values) != len(tokens):
        return None
    n = len(tokens) - n_gen
    top = [None if t is None else {str(k): _finite(v) for k, v in t.items()} for t in tops]
    logp = [None if v is None else _finite(v) for v in values]
    return PromptLogprobs(tokens[:n], None, logp[:n], top[:n],
                          final_top=top[n] if n_gen and n < len(top) else None)


def _finite(v: Any) -> float:
    x = float(v)
    # vLLM sends -inf (as -9999.0 or null) for impossible tokens: a very small probability.
    return x if math.isfinite(x) else -1e4


__all__ = ["DEFAULT_TOP_K", "PromptLogprobs", "ServerLogprobs", "parse_answer"]
