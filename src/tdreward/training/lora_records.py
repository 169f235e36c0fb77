"""What a LoRA adapter (or merged model) records about its base: the model spec the user named,
not the folder transformers happened to load.

Embedded and gguf: bases are trained from a dequantised copy in the tdreward cache, so PEFT
writes that cache path (`/root/.cache/tdreward/models/<sha>`) as `base_model_name_or_path`: a
path of one machine, meaningless on another. Here the adapter records the spec instead
(`embedded:NAME`, `gguf:/abs/path.gguf`, a hub id or an absolute folder) and, for a GGUF, the
file's sha256, so the base can be checked (and found in the cache) wherever the adapter goes.
`tdreward.backends.adapters` maps the record back to a loadable model.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from tdreward.errors import TDRewardError
from tdreward.io import write_json, write_text
from tdreward.model_card import adapter_card
from tdreward.specs import parse_spec

ADAPTER_CONFIG = "adapter_config.json"
CARD_NAME = "README.md"


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def base_record(spec: str) -> dict:
    """{"base_model": the spec as it loads from anywhere, "base_model_sha256": the GGUF's
    sha256 or None}. Relative paths become absolute (the adapter may be used elsewhere)."""
    from tdreward.backends.hf import resolve_gguf

    s = parse_spec(spec)
    sha = None
    gguf = resolve_gguf(s) if s.kind in ("gguf", "embedded", "llamacpp") else None
    if gguf is not None and gguf.is_file():
        st = gguf.stat()
        sha = _sha256(str(gguf.resolve()), st.st_size, st.st_mtime_ns)
    if s.kind == "gguf" and not s.target.startswith("embedded:"):
        spec = f"gguf:{Path(s.target).expanduser().resolve()}"
    elif s.kind == "hf" and Path(s.target).expanduser().is_dir():
        spec = str(Path(s.target).expanduser().resolve())
    return {"base_model": spec, "base_model_sha256": sha}


def set_adapter_base(folder: Path, record: dict) -> None:
    """Make `folder`'s adapter_config.json name the spec, not the loaded folder; PEFT's own
    README.md (it names the cache path too) is dropped: `write_adapter_card` replaces it."""
    path = folder / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TDRewardError(f"{path} was not written as expected ({e})") from e
    cfg["base_model_name_or_path"] = record["base_model"]
    write_json(path, cfg)
    (folder / CARD_NAME).unlink(missing_ok=True)


def write_adapter_card(folder: Path, record: dict, metrics: dict | None = None,
                       merged: bool = False) -> None:
    """README.md (model card) of the adapter or merged model in `folder`, written atomically."""
    text = adapter_card(record["base_model"], record.get("base_model_sha256"), metrics, merged)
    write_text(folder / CARD_NAME, text)


__all__ = ["base_record", "set_adapter_base", "write_adapter_card"]
