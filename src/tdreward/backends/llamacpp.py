"""Score and sample with llama.cpp (llama-cpp-python) on a GGUF file, without dequantising.

The transformers path (`tdreward.backends.hf`) dequantises GGUF weights to float32; this backend
runs the quantised weights as llama.cpp does, which is what a deployed model computes. Specs:
`llamacpp:PATH`, `llamacpp:embedded:NAME`, `gguf:PATH`, `embedded:NAME`, or a Path.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from tdreward.backends.embedded import cache_dir
from tdreward.backends.hf import check_gguf, resolve_gguf
from tdreward.cache_files import read_json_dict, update_json_dict
from tdreward.errors import TDRewardError
from tdreward.specs import parse_spec

# Rows of logits turned into log-probs at a time: a float64 copy of a whole 2048 x 262k
# (Gemma) score matrix would take 4 GiB.
_LOGSOFTMAX_ROWS = 256


_LOG_CALLBACK = None  # kept alive here: llama.cpp holds only a C pointer to it
_GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


def _import_llama_cpp() -> Any:
    """Import llama_cpp on first use, so the rest of tdreward works without it."""
    global _LOG_CALLBACK
    try:
        import llama_cpp
    except ImportError as e:
        raise TDRewardError(
            "the llama.cpp backend needs llama-cpp-python: pip install 'tdreward[llamacpp]'"
        ) from e
    if _LOG_CALLBACK is None:
        # llama-cpp-python's own callback maps ggml's levels one off, so with verbose=False
        # llama.cpp's warnings still reach the terminal; pass on only real errors.
        import ctypes
        import sys

        @llama_cpp.llama_log_callback
        def _errors_only(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level == _GGML_LOG_LEVEL_ERROR:
                print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr)

        _LOG_CALLBACK = _errors_only
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    return llama_cpp


def resolve_gpu_layers(n_gpu_layers: int | None) -> int:
    """Layers to offload to the GPU: `n_gpu_layers` as given (-1 all, 0 none), or for None
    all of them when this llama-cpp-python was built with GPU offload (CUDA, Metal, ...)
    and none otherwise: a CPU-only build given -1 would only ignore it."""
    if n_gpu_layers is not None:
        return n_gpu_layers
    return -1 if _import_llama_cpp().llama_supports_gpu_offload() else 0


def usable_cpus() -> int:
    """CPUs this process may run on (affinity/cgroup-aware where the OS says so)."""
    if hasattr(os, "sched_getaffinity"):  # not on macOS or Windows
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _resolve_path(path_or_spec: str | Path) -> Path:
    """The GGUF file named by a Path, a llamacpp:/gguf:/embedded: spec or a plain file path."""
    if isinstance(path_or_spec, Path):
        return path_or_spec.expanduser()
    spec = parse_spec(path_or_spec)
    path = resolve_gguf(spec)
    if path is not None:
        return path
    if spec.kind == "hf":  # no prefix: a plain path to a .gguf file
        return Path(spec.target).expanduser()
    raise TDRewardError(
        f"{spec.raw!r} cannot run on llama.cpp; use llamacpp:PATH, gguf:PATH or embedded:NAME"
    )


def _check_gguf_once(path: Path) -> None:
    """check_gguf, skipped for a file already found complete with the same size and mtime.

    Parsing the metadata in Python takes seconds (longer than llama.cpp's own load), so a
    passing check is remembered under $TDREWARD_CACHE; a file changed since fails the key.
    """
    try:
        st = path.stat()
    except OSError:
        check_gguf(path)  # raises the one-line "not found" / "cannot read" error
        return
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    record = cache_dir() / "llamacpp" / "checked.json"
    # A damaged record reads as empty: the check runs again and the record is rewritten.
    if read_json_dict(record).get(key) is True:
        return
    check_gguf(path)
    # Best effort: an unwritable cache only costs the check next time. Merged under a lock,
    # so concurrent processes checking different files keep each other's entries.
    with contextlib.suppress(OSError):
        update_json_dict(record, {key: True})


def gathered_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log_softmax(logits)[i, targets[i]] for each row, in float64 and in row chunks."""
    out = np.empty(len(targets), dtype=np.float64)
    for start in range(0, len(targets), _LOGSOFTMAX_ROWS):
        rows = logits[start : start + _LOGSOFTMAX_ROWS].astype(np.float64)
        tgt = targets[start : start + _LOGSOFTMAX_ROWS]
        peak = rows.max(axis=1, keepdims=True)
        lse = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
        out[start : start + len(tgt)] = rows[np.arange(len(tgt)), tgt] - lse
    return out


class LlamaCppModel:
    """A GGUF model run by llama.cpp: per-token log-probs of a text, and generation."""

    def __init__(
        self,
        path_or_spec: str | Path,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        seed: int = 0,
        n_parallel: int = 8,
        n_gpu_layers: int | None = None,
    ) -> None:
        """Load the model; raises TDRewardError on a missing, truncated or unloadable file.
        `n_gpu_layers`: layers on the GPU (-1 all; None: all when llama.cpp can offload)."""
        llama_cpp = _import_llama_cpp()
        self.path = _resolve_path(path_or_spec)
        # llama.cpp aborts the whole process on some malformed files, so validate first.
        _check_gguf_once(self.path)
        self.n_ctx = n_ctx
        self.seed = seed
        # llama-cpp-python defaults to half the CPUs for decoding but all of them for prompt
        # batches; its spinning thread barrier then collapses (10x slower measured on 2 CPUs)
        # as soon as any other process wants a core. Half the usable CPUs for both is robust.
        threads = n_threads or max(1, usable_cpus() // 2)
        if n_parallel < 1:
            raise TDRewardError(f"n_parallel must be >= 1, got {n_parallel}")
        self.n_parallel = n_parallel  # sequences decoded together by generate()
        self.n_gpu_layers = resolve_gpu_layers(n_gpu_layers)
        if self.n_gpu_layers < -1:
            raise TDRewardError(f"n_gpu_layers must be >= -1 (-1: all), got {n_gpu_layers}")
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(self.path),
                logits_all=True,  # scores for every position, not just the last one
                n_ctx=n_ctx,
                verbose=False,  # keeps llama.cpp's load log out of the terminal
                seed=seed,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=self.n_gpu_layers,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise TDRewardError(f"llama.cpp could not load {self.path}: {e}") from e
        self._llama_cpp = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)  # for end-of-turn ids
        self.n_vocab: int = self._llm.n_vocab()

    @property
    def llm(self) -> Any:
        """The underlying llama_cpp.Llama; a clear error once the model was closed."""
        if self._llm is None:
            raise TDRewardError(f"the llama.cpp model {self.path.name} was already closed")
        return self._llm

    # --- scoring ------------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text` (BOS added only if requested and the model's vocab uses one)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False))

    def token_logprobs(self, tokens: list[int]) -> np.ndarray:
        """log p(tokens[i+1] | tokens[:i+1]) for i in 0..len-2, from one evaluation (float64)."""
        tokens = [int(t) for t in tokens]
        if len(tokens) > self.n_ctx:
            raise TDRewardError(
                f"{len(tokens)} tokens exceed the llama.cpp context of {self.n_ctx}; "
                "raise n_ctx or score with the transformers backend (sliding windows)"
            )
        if len(tokens) < 2:
            return np.zeros(0, dtype=np.float64)
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:  # an out-of-range id would fail (or abort) deep inside llama_decode
            raise TDRewardError(f"token id {bad[0]} is outside the vocabulary of {self.n_vocab}")
        llm = self.llm
        llm.reset()
        try:
            llm.eval(tokens)
        except RuntimeError as e:
            raise TDRewardError(f"llama.cpp failed to evaluate {len(tokens)} tokens: {e}") from e
        # Row i of `scores` holds the logits after tokens[:i+1], i.e. the prediction of i+1.
        logits = llm.scores[: len(tokens) - 1]
        return gathered_logprobs(logits, np.asarray(tokens[1:], dtype=np.int64))

    def text_logprobs(self, text: str) -> tuple[list[int], np.ndarray]:
        """(tokenize(text), log-prob of each of those tokens after the first)."""
        tokens = self.tokenize(text)
        return tokens, self.token_logprobs(tokens)

    # --- generation ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        top_p: float = 1.0,
        seeds: list[int] | None = None,
    ) -> list[dict]:
        """Complete each raw-text prompt; greedy at temperature 0, else seeded sampling.

        Up to `n_parallel` prompts are decoded together (continuous batching, see
        tdreward.backends.llamacpp_batch). Prompt i is sampled with seeds[i], by default
        seed + i: reproducible, yet repeated prompts get distinct samples. Returns one
        {"prompt", "text", "tokens", "logprobs"} per prompt; `logprobs` are the model's
        (untempered) log-probs of the generated tokens, the log-softmax of the raw logits.
        """
        from tdreward.backends.llamacpp_batch import generate_batched
        from tdreward.backends.registry import sample_seeds

        if temperature < 0:
            raise TDRewardError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise TDRewardError(f"top_p must be in (0, 1], got {top_p}")
        seeds = sample_seeds(len(prompts), seed, seeds)
        llm = self.llm
        tokenized, budgets = [], []
        for prompt in prompts:
            tokens = self.tokenize(prompt)
            if not tokens:  # llama.cpp needs at least one token to predict from
                bos = llm.token_bos()
                tokens = [bos if bos >= 0 else llm.token_eos()]
            budget = min(max_new_tokens, self.n_ctx - len(tokens))
            if budget < 0:
                raise TDRewardError(
                    f"the prompt has {len(tokens)} tokens, more than the context of {self.n_ctx}"
                )
            tokenized.append(tokens)
            budgets.append(budget)
        outs = generate_batched(self._llama_cpp, llm.model, self._vocab, llm.context_params,
                                tokenized, budgets, seeds, temperature, top_p,
                                self.n_parallel)
        results = []
        for prompt, ptoks, (tokens, logprobs) in zip(prompts, tokenized, outs, strict=True):
            text = llm.detokenize(tokens, prev_tokens=ptoks).decode("utf-8", errors="replace")
            results.append({"prompt": prompt, "text": text, "tokens": tokens,
                            "logprobs": np.asarray(logprobs, dtype=np.float64)})
        return results

    # --- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Free the llama.cpp model and context now rather than at garbage collection."""
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None

    def __del__(self) -> None:
        # Freeing here, while the interpreter is still whole, avoids llama-cpp-python's own
        # finaliser failing noisily at shutdown on a model that was never closed. A bare
        # try (not contextlib.suppress): module globals may already be gone at shutdown.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
