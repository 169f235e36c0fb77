"""Generation with any OpenAI-compatible server (vLLM, llama.cpp's server, Ollama's /v1, ...).

`openai:URL#MODEL` specs, e.g. `openai:http://127.0.0.1:8080/v1#smollm2`. Prompts go to
`URL/completions` (raw text; `--prompt_format chat` uses `URL/chat/completions` and the server's
chat template) with `max_tokens`, `temperature`, `top_p`, `seed` and `logprobs`; several requests
are in flight at once (`concurrency`); connection errors, timeouts, 408, 429, 502, 503, 504
and a 500 without an error body are retried with exponential backoff (honouring Retry-After).
An answer that carries the server's own error (any other 4xx, or a 500 with a JSON error, e.g.
llama.cpp's) is deterministic: it fails at once with one line naming the server's message.
Every request has a timeout. A server that is down fails with one line naming the host. The API
key, when the server wants one (`tdreward serve --api_key`), comes from $OPENAI_API_KEY and is
sent as `Authorization: Bearer KEY`. A server that cannot give log-probs of the generated
tokens (llama.cpp's server without logits_all: `tdreward serve` without `--logprobs`) is asked
again without them: the generations then have `logprobs=None` (a warning says so once).
Server-specific sampling fields (llama.cpp's `top_k`, `repeat_penalty`) go in `extra_body`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import httpx

from tdreward.backends.registry import BackendOptions, Generation, PerPromptGenerator
from tdreward.errors import TDRewardError, first_line
from tdreward.specs import ModelSpec

log = logging.getLogger("tdreward")

# Answers worth repeating: the server or a proxy may answer differently next time. A 500 is
# retried only without an error body (see _transient): with one it is the server's verdict on
# this request (llama.cpp answers every exception in a handler with a 500 and its message).
_RETRY_STATUS = {408, 429, 502, 503, 504}
_MAX_BACKOFF_S = 30.0


class OpenAIServerError(TDRewardError):
    """A request that failed for good (after its retries); `status` and `detail` are the HTTP
    status and the server's error message of the last answer (None when there was none:
    connection error, timeout)."""

    def __init__(self, message: str, status: int | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class OpenAICompatGenerator(PerPromptGenerator):
    """Completions from an OpenAI-compatible server, several requests at a time (`generate`:
    PerPromptGenerator's, one request per prompt)."""

    name = "openai"

    def __init__(self, spec: ModelSpec, options: BackendOptions) -> None:
        self.spec = spec
        self.url = spec.target  # ends in /v1 (or wherever the API lives)
        self.model = spec.model or ""
        self.chat = options.prompt_format == "chat"  # auto: raw /completions
        self.concurrency = max(1, options.concurrency)
        self.retries = max(0, options.retries)
        self.timeout = options.timeout
        self.backoff = float(options.extra.get("backoff", 0.5))
        self.extra_body = dict(options.extra.get("openai_extra_body") or {})
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        self.client = httpx.Client(
            base_url=self.url, headers=headers,
            timeout=httpx.Timeout(options.timeout, connect=min(10.0, options.timeout)),
            limits=httpx.Limits(max_connections=self.concurrency),
        )
        self.logprobs_supported = True
        self._logprobs_lock = threading.Lock()  # requests run in threads: warn once
        self._check_server()

    # --- HTTP --------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        """One request with retries and backoff; raises OpenAIServerError with one line."""
        status: int | None = None
        detail: str | None = None
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2**attempt
            try:
                r = self.client.request(method, path, json=body)
            except httpx.ConnectError as e:
                problem = f"cannot connect to the OpenAI-compatible server at {self.url} " \
                          f"({first_line(e)})"
            except httpx.TimeoutException:
                problem = f"the server at {self.url} did not answer within {self.timeout:g} s"
            except httpx.HTTPError as e:
                problem = f"request to {self.url} failed: {first_line(e)}"
            else:
                if r.status_code < 400:
                    return r
                status, detail = r.status_code, _error_text(r)
                problem = f"{self.url}{path} answered {status}: {detail}"
                if status in (401, 403):
                    problem += ("; the API key in $OPENAI_API_KEY was refused"
                                if "Authorization" in self.client.headers
                                else "; set $OPENAI_API_KEY to the server's API key")
                if not _transient(r):  # the same body would get the same answer
                    raise OpenAIServerError(problem, status, detail)
                wait = _retry_after(r, wait)
            if attempt < self.retries:
                log.info("%s; retry %d/%d in %.1f s", problem, attempt + 1, self.retries, wait)
                time.sleep(min(wait, _MAX_BACKOFF_S))
        raise OpenAIServerError(
            problem + (f" (after {self.retries} retries)" if self.retries else ""), status, detail)

    def _check_server(self) -> None:
        """Fail fast when the server is down; warn when it does not list the model."""
        try:
            r = self.request("GET", "/models")
        except OpenAIServerError as e:
            if e.status == 404:  # some servers do not list models
                return
            raise
        try:
            ids = [m.get("id") for m in r.json().get("data", [])]
        except (ValueError, AttributeError):
            return
        if ids and self.model not in ids:
            log.warning("%s lists models %s, not %r; trying it anyway", self.url, ids, self.model)

    # --- generation --------------------------------------------------------------------------
    def _body(self, prompt: str, seed: int, max_new_tokens: int, temperature: float,
              top_p: float) -> tuple[str, dict]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_new_tokens,
                                "temperature": temperature, "top_p": top_p, "seed": seed,
                                "stream": False}
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
            if self.logprobs_supported:
                body["logprobs"] = True
        else:
            body["prompt"] = prompt
            if self.logprobs_supported:
                body["logprobs"] = 1  # the sampled token's log-prob (+ the top one)
        body.update(self.extra_body)
        return ("/chat/completions" if self.chat else "/completions"), body

    def generate_one(self, prompt: str, seed: int, max_new_tokens: int, temperature: float,
                     top_p: float) -> Generation:
        path, body = self._body(prompt, seed, max_new_tokens, temperature, top_p)
        try:
            r = self.request("POST", path, body)
        except OpenAIServerError as e:
            # A server that cannot give log-probs says so in its error: llama.cpp's server
            # built without logits_all answers 500 "logprobs is not supported for models
            # created with logits_all=False", others 400. The text does not need them (they
            # only fill gen_mean_logprob), so ask again without, and say so once.
            if body.get("logprobs") is not None and e.status in (400, 422, 500) \
                    and "logprob" in (e.detail or "").lower():
                with self._logprobs_lock:
                    if self.logprobs_supported:
                        self.logprobs_supported = False
                        log.warning("%s gives no log-probs of generated tokens (%s); generating "
                                    "without them (gen_mean_logprob stays empty; "
                                    "`tdreward serve --logprobs` serves them)",
                                    self.url, e.detail)
                return self.generate_one(prompt, seed, max_new_tokens, temperature, top_p)
            raise
        try:
            data = r.json()
            choice = data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise OpenAIServerError(f"{self.url}{path} sent no completion choice: "
                                    f"{r.text[:200]!r}") from e
        text = (choice.get("message") or {}).get("content") if self.chat else choice.get("text")
        logprobs = _logprobs(choice.get("logprobs"))
        usage = data.get("usage") or {}
        n = usage.get("completion_tokens")
        if n is None and logprobs is not None:
            n = len(logprobs)
        reason = choice.get("finish_reason") or ("length" if n and n >= max_new_tokens else "stop")
        return Generation(prompt=prompt, text=text or "", n_tokens=n, logprobs=logprobs,
                          finish_reason=reason, seed=seed, chat=self.chat)

    def close(self) -> None:
        self.client.close()


def _logprobs(lp: Any) -> list[float] | None:
    """Completions: {"token_logprobs": [...]}; chat: {"content": [{"logprob": ...}]}."""
    if not isinstance(lp, dict):
        return None
    if isinstance(lp.get("token_logprobs"), list):
        vals = lp["token_logprobs"]
    elif isinstance(lp.get("content"), list):
        vals = [c.get("logprob") for c in lp["content"] if isinstance(c, dict)]
    else:
        return None
    return [float(v) for v in vals if v is not None]


def _error_text(r: httpx.Response) -> str:
    try:
        err = r.json().get("error", r.text)
        if isinstance(err, dict):
            err = err.get("message", err)
    except (ValueError, AttributeError):
        err = r.text
    text = " ".join(str(err).split())
    return text[:200] or r.reason_phrase


def _transient(r: httpx.Response) -> bool:
    """Whether repeating the same request may get another answer."""
    if r.status_code in _RETRY_STATUS:
        return True
    if r.status_code != 500:
        return False
    # A 500 that carries an OpenAI-style error object is the server's answer to this request
    # (llama.cpp's, vLLM's); a bare 500 (a proxy, a crash while answering) may pass next time.
    try:
        err = r.json().get("error")
    except (ValueError, AttributeError):
        return True
    return not err


def _retry_after(r: httpx.Response, default: float) -> float:
    try:
        return max(0.0, float(r.headers.get("retry-after", default)))
    except ValueError:
        return default


__all__ = ["OpenAICompatGenerator", "OpenAIServerError"]
