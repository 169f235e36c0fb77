"""Load a causal LM + tokenizer with transformers from any scoring spec.

GGUF files (`gguf:`, `embedded:`) are dequantised by transformers, which takes tens of
seconds; the result is cached once as safetensors under $TDREWARD_CACHE/models/<sha256>/,
keyed by the file's content hash, so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from tdreward.backends.embedded import cache_dir, gguf_path
from tdreward.data.corpus import env_offline, hub_reachable
from tdreward.errors import TDRewardError
from tdreward.specs import ModelSpec, parse_spec

log = logging.getLogger("tdreward")

def _file_sha256(path: Path) -> str:
    """Content hash of a file, memoised by (path, size, mtime) so repeat loads skip hashing."""
    st = path.stat()
    index_path = cache_dir() / "models" / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    index[key] = h.hexdigest()
    index_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)
    return index[key]


def check_gguf(path: Path) -> None:
    """Fail with one line when `path` is not a readable, complete GGUF file."""
    if not path.is_file():
        raise TDRewardError(f"GGUF file not found: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise TDRewardError(f"cannot read {path}: {e.strerror}") from e
    if magic != b"GGUF":
        raise TDRewardError(f"{path} is not a GGUF file (bad magic {magic!r})")
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except Exception as e:  # truncated files fail in many ways inside the reader
        raise TDRewardError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from e


def resolve_gguf(spec: ModelSpec) -> Path | None:
    """The GGUF file a spec names, or None for transformers directories / hub ids."""
    if spec.kind == "embedded":
        return gguf_path(spec.target)
    if spec.kind in ("gguf", "llamacpp"):
        if spec.target.startswith("embedded:"):
            return gguf_path(spec.target.removeprefix("embedded:"))
        return Path(spec.target).expanduser()
    return None


def _set_pad(tokenizer, model) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise TDRewardError("the tokenizer has no pad, eos or unk token to pad batches with")
    model.config.pad_token_id = tokenizer.pad_token_id


def _quiet():
    """Silence transformers' progress bars and advisory warnings while loading."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def _load_dir(path: str, dtype: torch.dtype, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only)
    return model, tok


def _load_gguf(path: Path, dtype: torch.dtype, verbose: bool):
    """Dequantise once, then load the safetensors copy from the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path.expanduser()
    if not path.is_file():
        raise TDRewardError(f"GGUF file not found: {path}")
    target = cache_dir() / "models" / _file_sha256(path)[:24]
    if not (target / "config.json").is_file():
        check_gguf(path)  # only files not yet cached: a cached hash was a complete file
        if verbose:
            log.info("dequantising %s once (cached in %s)", path.name, target)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        # The weights are plain float32 once dequantised: drop the GGUF "quantizer" marker,
        # which would otherwise forbid save_pretrained.
        model.hf_quantizer = None
        for attr in ("quantization_config",):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tdreward_source.json").write_text(json.dumps({"gguf": str(path.resolve())}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    tok = AutoTokenizer.from_pretrained(str(target))
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
    return model, tok


def load_model(spec: str | ModelSpec, dtype: torch.dtype = torch.float32, verbose: bool = False):
    """Load (model, tokenizer) for a scoring spec: pad token set, model in eval mode."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    t0 = time.perf_counter()
    _quiet()
    import transformers.modeling_utils  # noqa: F401  (import cost is reported apart)

    start = time.perf_counter()
    if spec.kind in ("embedded", "gguf"):
        model, tok = _load_gguf(resolve_gguf(spec), dtype, verbose)
    elif spec.kind == "hf":
        model, tok = _load_hub_or_dir(spec.target, dtype)
    else:
        raise TDRewardError(
            f"{spec.raw!r} cannot be loaded into transformers; use a hub id, a directory, "
            "gguf:PATH or embedded:NAME"
        )
    _set_pad(tok, model)
    model.eval()
    if verbose:
        log.info("loaded %s in %.2f s (+ %.1f s importing transformers)", spec.raw,
                 time.perf_counter() - start, start - t0)
    return model, tok


def _load_hub_or_dir(target: str, dtype: torch.dtype):
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TDRewardError(f"{path} has no config.json: not a transformers model directory")
        return _load_dir(str(path), dtype, local_only=True)
    if target.startswith((".", "/", "~")) or target.count("/") > 1:
        raise TDRewardError(f"model directory not found: {target}")
    local_only = env_offline() or not hub_reachable()
    try:
        return _load_dir(target, dtype, local_only=local_only)
    except OSError as e:
        if local_only:
            raise TDRewardError(
                f"model {target!r} is not cached and the Hugging Face hub cannot be reached; "
                "use an embedded model (embedded:smollm2-135m-instruct) or gguf:PATH"
            ) from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TDRewardError(
            f"cannot load {target!r} from the hub ({first}); check the name, or use "
            "embedded:smollm2-135m-instruct or gguf:PATH"
        ) from e
