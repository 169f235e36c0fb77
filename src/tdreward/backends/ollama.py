"""Generation with a model served by Ollama, through the official `ollama` Python client.

`ollama:NAME[:TAG]` specs. Each prompt is one `/api/generate` request (`stream: false`) with
`options.num_predict` = max new tokens, `temperature`, `top_p`, `seed`, top-k and the repeat
penalty switched off (so sampling matches the llama.cpp and transformers backends) and
`logprobs: true`; servers too old to return log-probs simply give none. The host comes from
`--ollama_host`, else $OLLAMA_HOST, else http://127.0.0.1:11434. A model missing on the server
is pulled only when asked (`--pull`); a server that is down fails with one line naming the host.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tdreward.backends.registry import BackendOptions, Generation, PerPromptGenerator, use_chat
from tdreward.errors import TDRewardError
from tdreward.specs import ModelSpec

log = logging.getLogger("tdreward")

DEFAULT_HOST = "http://127.0.0.1:11434"


def ollama_host(host: str | None = None) -> str:
    """The Ollama server to talk to: `host`, else $OLLAMA_HOST, else the local default."""
    host = host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
    return host if "://" in host else f"http://{host}"


def _import_ollama() -> Any:
    try:
        import ollama
    except ImportError as e:
        raise TDRewardError("Ollama models need the ollama client: pip install 'tdreward[ollama]'") \
            from e
    return ollama


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "error", "") or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def ollama_error(e: BaseException, host: str, what: str = "",
                 timeout: float | None = None) -> TDRewardError:
    """The one line (to `raise ... from e`) that a failed call to the Ollama server at `host`
    becomes: a server that cannot be reached, one that did not answer within `timeout`, or the
    first line of the error it answered with (`ollama.ResponseError`, an httpx error). `what`
    names the call as a verb phrase ("create 'td-smol'"). The one mapping of Ollama failures:
    generation here, and `tdreward ollama` / `ollama-finetune` (tdreward.ollama.deploy)."""
    import httpx

    if isinstance(e, (ConnectionError, httpx.ConnectError)):
        to = f" to {what}" if what else ""
        return TDRewardError(f"cannot reach the Ollama server at {host}{to}: is `ollama serve` "
                             "running? (set --ollama_host or OLLAMA_HOST)")
    if isinstance(e, httpx.TimeoutException):
        within = f" within {timeout:g} s" if timeout else ""
        could_not = f" (could not {what})" if what else ""
        return TDRewardError(f"the Ollama server at {host} did not answer{within}{could_not}")
    could_not = f"could not {what}: " if what else ""
    return TDRewardError(f"Ollama at {host}: {could_not}{_first_line(e)}")


class OllamaGenerator(PerPromptGenerator):
    """An Ollama model behind the generation interface (`generate`: PerPromptGenerator's,
    one request per prompt)."""

    name = "ollama"

    def __init__(self, spec: ModelSpec, options: BackendOptions) -> None:
        ollama = _import_ollama()
        self.spec = spec
        self.model = spec.target
        self.host = ollama_host(options.ollama_host)
        self.concurrency = max(1, options.concurrency)
        self.timeout = options.timeout
        self._ollama = ollama
        self.client = ollama.Client(host=self.host, timeout=options.timeout)
        info = self._show(pull=options.pull)
        self.chat = use_chat(options.prompt_format, bool(getattr(info, "template", None)), spec.raw)
        self.logprobs_supported = True

    # --- errors ------------------------------------------------------------------------------
    def _call(self, fn, *args, **kw):
        """Run a client call; connection problems become one line naming the host."""
        import httpx

        try:
            return fn(*args, **kw)
        except (ConnectionError, httpx.HTTPError) as e:
            raise ollama_error(e, self.host, timeout=self.timeout) from e

    def _show(self, pull: bool):
        try:
            return self._call(self.client.show, self.model)
        except self._ollama.ResponseError as e:
            if e.status_code != 404:
                raise ollama_error(e, self.host) from e
        if not pull:
            raise TDRewardError(
                f"model {self.model!r} is not on the Ollama server at {self.host}; "
                f"add --pull to pull it, or run `ollama pull {self.model}`"
            )
        self.pull()
        try:
            return self._call(self.client.show, self.model)
        except self._ollama.ResponseError as e:
            raise ollama_error(e, self.host) from e

    def pull(self) -> None:
        """Pull the model, with a progress bar over the bytes of its layers."""
        from tqdm.auto import tqdm

        log.warning("pulling %s on the Ollama server at %s", self.model, self.host)
        bar = tqdm(desc=f"pull {self.model}", unit="B", unit_scale=True)
        try:
            for part in self._call(self.client.pull, self.model, stream=True):
                if part.total:
                    bar.total = part.total
                if part.completed is not None:
                    bar.n = part.completed
                    bar.refresh()
                bar.set_postfix_str(part.status or "")
        except self._ollama.ResponseError as e:
            raise ollama_error(e, self.host, f"pull {self.model!r}") from e
        finally:
            bar.close()

    # --- generation --------------------------------------------------------------------------
    def generate_one(self, prompt: str, seed: int, max_new_tokens: int, temperature: float,
                     top_p: float) -> Generation:
        options = {"num_predict": max_new_tokens, "temperature": temperature, "seed": seed,
                   "top_p": top_p, "top_k": 0, "repeat_penalty": 1.0}
        kw = {"model": self.model, "prompt": prompt, "raw": not self.chat, "stream": False,
              "options": options}
        try:
            res = self._call(self.client.generate, **kw,
                             **({"logprobs": True} if self.logprobs_supported else {}))
        except self._ollama.ResponseError as e:
            if self.logprobs_supported and "logprob" in _first_line(e).lower():
                self.logprobs_supported = False  # an older server: generate without them
                return self.generate_one(prompt, seed, max_new_tokens, temperature, top_p)
            raise ollama_error(e, self.host, f"generate with {self.model!r}") from e
        logprobs = [float(lp.logprob) for lp in res.logprobs] if res.logprobs else None
        n = res.eval_count
        reason = res.done_reason or ("length" if n is not None and n >= max_new_tokens else "stop")
        return Generation(prompt=prompt, text=res.response or "", n_tokens=n, logprobs=logprobs,
                          finish_reason=reason, seed=seed, chat=self.chat)

    def close(self) -> None:
        self.client.close()


__all__ = ["DEFAULT_HOST", "OllamaGenerator", "ollama_error", "ollama_host"]
