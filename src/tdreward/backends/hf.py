"""Load a causal LM + tokenizer with transformers from any scoring spec.

GGUF files (`gguf:`, `embedded:`) are dequantised by transformers, which takes tens of
seconds; the result is cached once as safetensors under $TDREWARD_CACHE/models/<sha256>/,
keyed by the file's content hash, so later loads take about a second. Processes started
together dequantise once (a file lock) and a damaged copy is rebuilt (`cached_model_dir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from tdreward.backends.embedded import cache_dir, gguf_path
from tdreward.cache_files import (
    file_lock,
    make_temp_dir,
    read_json_dict,
    sweep_stale,
    temp_prefix,
    update_json_dict,
)
from tdreward.data.corpus import env_offline, hub_reachable
from tdreward.errors import TDRewardError, first_line
from tdreward.hardware import HardwareSettings, Placement, as_placement
from tdreward.specs import ModelSpec, parse_spec

log = logging.getLogger("tdreward")

_SHA256 = re.compile(r"[0-9a-f]{64}")
SOURCE_RECORD = "tdreward_source.json"  # written last: a cached model folder is complete
# Temporary folders in $TDREWARD_CACHE/models: ours, those of tdreward 0.1 (`<sha>.tmp<pid>`)
# and folders set aside for deletion.
_MODEL_TEMPS = (".*.tmp", "*.tmp[0-9]*")


def _file_sha256(path: Path) -> str:
    """Content hash of a file, memoised by (path, size, mtime) so repeat loads skip hashing."""
    st = path.stat()
    index_path = cache_dir() / "models" / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    known = read_json_dict(index_path).get(key)
    if isinstance(known, str) and _SHA256.fullmatch(known):  # a damaged entry is recomputed
        return known
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    # Merged under a lock: processes hashing different files at once keep each other's entries.
    # Best effort: an unwritable index only costs hashing again next time.
    with contextlib.suppress(OSError):
        update_json_dict(index_path, {key: h.hexdigest()})
    return h.hexdigest()


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


def set_pad(tokenizer, model) -> None:
    """Give the tokenizer a pad token (its EOS, else UNK) and tell the model its id."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise TDRewardError("the tokenizer has no pad, eos or unk token to pad batches with")
    model.config.pad_token_id = tokenizer.pad_token_id


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' progress bars, log messages and advisory warnings while a model
    loads, then restore all three as they were: a user's own script (a GRPO run, say) keeps
    the logs and bars it asked for."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_bars = hf_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="transformers")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hf_bars:
            hf_logging.enable_progress_bar()
        # transformers switches huggingface_hub's bars with its own: put those back too.
        if hub_bars_off:
            disable_progress_bars()
        else:
            enable_progress_bars()


def _on_cpu(place: Placement) -> bool:
    """Whether `place` is a plain CPU load (what every load was before placements)."""
    return place.device == "cpu" and not place.bits and not place.device_map


def placement_kwargs(place: Placement) -> dict:
    """from_pretrained's arguments for `place`: the dtype the weights are cast to as they load
    (a float32 GGUF cache becomes bfloat16 here, not on disk), bitsandbytes' config, and where
    the layers go. A model for one device loads straight onto it (device_map {"": device})."""
    kw: dict = {"dtype": place.torch_dtype}
    if place.bits:
        kw["quantization_config"] = place.quantization_config()
    if place.device_map:
        kw["device_map"] = place.device_map
    elif not _on_cpu(place):
        kw["device_map"] = {"": place.device}
    return kw


def _load_dir(path: str, place: Placement, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local_only,
                                                 **placement_kwargs(place))
    return model, tok


def _cache_problem(target: Path) -> str | None:
    """Why the cached model folder `target` cannot be used (None: it looks complete). Cheap:
    the sizes recorded when it was written, no file is read."""
    if not target.is_dir():
        return "missing"
    record = target / SOURCE_RECORD
    if not record.is_file() or not (target / "config.json").is_file():
        return "incomplete"
    meta = read_json_dict(record)
    if "gguf" not in meta:
        return f"corrupt ({record.name} is unreadable)"
    files = meta.get("files")  # absent in folders written by tdreward 0.1
    for name, size in (files.items() if isinstance(files, dict) else ()):
        try:
            actual = (target / name).stat().st_size
        except OSError:
            return f"incomplete ({name} is missing)"
        if actual != size:
            return f"corrupt ({name} has {actual} bytes, {size} were written)"
    return None


def _discard(target: Path) -> None:
    """Remove a cached folder: first renamed aside (one atomic step, so no reader sees it half
    deleted), then deleted; a deletion cut short is swept as an abandoned temporary."""
    aside = target.with_name(temp_prefix(target.name) + "old.tmp")
    try:
        os.replace(target, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _dequantise(path: Path, target: Path, verbose: bool) -> None:
    """Write the float32 safetensors copy of GGUF `path` to `target` (absent): into a folder
    of this process's own, renamed into place once complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    tmp = make_temp_dir(target.parent, target.name)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        # Written last, with every file's size: its presence marks the folder complete and
        # the sizes let a later load notice a truncated file without reading it.
        (tmp / SOURCE_RECORD).write_text(json.dumps({"gguf": str(path.resolve()),
                                                     "files": files}, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:
            # A process not holding our lock (an older tdreward) got there first: its copy
            # is as good as ours.
            if _cache_problem(target) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_model_dir(path: Path, verbose: bool = False) -> Path:
    """The dequantised (safetensors) copy of GGUF file `path` in $TDREWARD_CACHE/models/,
    made once. Concurrent processes wait for the one that makes it; a damaged copy is
    replaced with a warning; temporary folders of killed processes are removed."""
    path = path.expanduser()
    if not path.is_file():
        raise TDRewardError(f"GGUF file not found: {path}")
    models = cache_dir() / "models"
    target = models / _file_sha256(path)[:24]
    sweep_stale(models, _MODEL_TEMPS)
    if _cache_problem(target) is None:
        return target
    _rebuild(path, target, verbose, seen=None)
    return target


def _rebuild(path: Path, target: Path, verbose: bool, seen: int | None) -> None:
    """(Re)build `target` under its lock. `seen`: the inode of a copy found broken while
    loading, which is replaced unless another process replaced it meanwhile."""
    with file_lock(target.with_name(f".{target.name}.lock"), f"dequantising {path.name}"):
        problem = _cache_problem(target)
        if seen is not None and problem is None:
            if target.stat().st_ino != seen:
                return  # rebuilt by another process while we waited
            problem = "corrupt"
        if problem is None:
            return  # built by another process while we waited
        if problem != "missing":
            if seen is None:  # (a failed load has said why already)
                log.warning("cached model %s is %s; rebuilding it from %s", target, problem,
                            path)
            _discard(target)
        _dequantise(path, target, verbose)


def _load_gguf(path: Path, place: Placement, verbose: bool):
    """Dequantise once, then load the safetensors copy from the cache."""
    target = cached_model_dir(path, verbose)
    seen = target.stat().st_ino
    try:
        return _load_dir(str(target), place, local_only=True)
    except Exception as e:  # what a damaged file raises depends on the file and the library
        if not _on_cpu(place):
            # On a GPU or quantised, a failure is far likelier the device's (memory,
            # bitsandbytes) than a damaged copy, which the size check has passed: no rebuild.
            raise
        first = first_line(e)
        log.warning("cached model %s cannot be loaded (%s: %s); rebuilding it", target,
                    type(e).__name__, first)
    _rebuild(path.expanduser(), target, verbose, seen=seen)
    try:
        return _load_dir(str(target), place, local_only=True)
    except Exception as e:
        raise TDRewardError(
            f"cached model {target} is corrupt ({type(e).__name__}: {first_line(e)}); "
            "delete that folder and run again"
        ) from e


def load_model(spec: str | ModelSpec, dtype: torch.dtype | None = None, verbose: bool = False,
               *, hardware: HardwareSettings | Placement | None = None):
    """Load (model, tokenizer) for a scoring spec: pad token set, model in eval mode, placed
    as `hardware` says (settings are resolved here: `auto` becomes this machine's device and
    dtype). Without `hardware`, float32 on the CPU, as every load was before the settings
    existed. `dtype` overrides the placement's dtype."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind not in ("embedded", "gguf", "hf"):
        raise TDRewardError(
            f"{spec.raw!r} cannot be loaded into transformers; use a hub id, a directory, "
            "gguf:PATH or embedded:NAME"
        )
    place = as_placement(hardware)
    if dtype is not None:
        place = dataclasses.replace(place, dtype=str(dtype).removeprefix("torch."))
    t0 = time.perf_counter()
    with quiet_loading():
        import transformers.modeling_utils  # noqa: F401  (import cost is reported apart)

        start = time.perf_counter()
        try:
            if spec.kind == "hf":
                model, tok = _load_hub_or_dir(spec.target, place)
            else:
                model, tok = _load_gguf(resolve_gguf(spec), place, verbose)
        except Exception as e:
            if isinstance(e, TDRewardError) or _on_cpu(place):
                raise
            # CUDA out of memory, bitsandbytes without its kernels, ...: one line naming where.
            bits = f", {place.bits}-bit" if place.bits else ""
            raise TDRewardError(f"cannot load {spec.raw} on {place.device_map or place.device} "
                                f"({place.dtype}{bits}): {type(e).__name__}: {first_line(e)}"
                                ) from e
    set_pad(tok, model)
    model.eval()
    if verbose:
        log.info("loaded %s in %.2f s (+ %.1f s importing transformers) on %s in %s", spec.raw,
                 time.perf_counter() - start, start - t0, place.device_map or place.device,
                 place.dtype + (f", {place.bits}-bit" if place.bits else ""))
    return model, tok


def _load_hub_or_dir(target: str, place: Placement):
    path = Path(target).expanduser()
    if path.is_dir():
        from tdreward.backends.adapters import is_adapter_dir, load_merged_adapter

        if is_adapter_dir(path):  # a LoRA adapter: its base, with the adapter merged
            if place.bits:
                raise TDRewardError(f"{path} is a LoRA adapter, merged into its base as it "
                                    "loads, and a quantised base cannot take the merge: load "
                                    "the merged model (`tdreward lora --merge`)")
            return load_merged_adapter(path, lambda base: load_model(base, hardware=place))
        if not (path / "config.json").is_file():
            raise TDRewardError(f"{path} has no config.json: not a transformers model directory "
                                "(nor a LoRA adapter: no adapter_config.json)")
        return _load_dir(str(path), place, local_only=True)
    if target.startswith((".", "/", "~")) or target.count("/") > 1:
        raise TDRewardError(f"model directory not found: {target}")
    local_only = env_offline() or not hub_reachable()
    try:
        return _load_dir(target, place, local_only=local_only)
    except OSError as e:
        if local_only:
            raise TDRewardError(
                f"model {target!r} is not cached and the Hugging Face hub cannot be reached; "
                "use an embedded model (embedded:smollm2-135m-instruct) or gguf:PATH"
            ) from e
        first = first_line(e)
        raise TDRewardError(
            f"cannot load {target!r} from the hub ({first}); check the name, or use "
            "embedded:smollm2-135m-instruct or gguf:PATH"
        ) from e
