"""A model's dimensions read from its metadata, without loading its weights.

Used to check a critic against a reference LM before the LM loads: dequantising a GGUF takes
tens of seconds, a mismatch found afterwards wastes them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tdreward.specs import ModelSpec, parse_spec

log = logging.getLogger("tdreward")


def _gguf_dims(path: Path) -> tuple[int, int] | None:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception:  # a damaged file is reported by the loader, with its remedy
        return None
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            hidden, vocab = (int(x) for x in t.shape[:2])  # GGUF lists dimensions innermost first
            return hidden, vocab
    return None


def _config_dims(cfg: dict) -> tuple[int, int] | None:
    text_cfg = cfg.get("text_config", cfg)  # multimodal configs nest the LM's
    hidden = next((text_cfg[k] for k in ("hidden_size", "n_embd", "d_model") if k in text_cfg),
                  None)
    vocab = text_cfg.get("vocab_size")
    return (int(hidden), int(vocab)) if hidden and vocab else None


def model_dims(spec: str | ModelSpec) -> tuple[int, int] | None:
    """(hidden size, vocabulary size) of a scoring spec, or None when it cannot be read cheaply
    (then the caller checks after loading)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind in ("embedded", "gguf"):
        from tdreward.backends.hf import resolve_gguf

        try:
            path = resolve_gguf(spec)
        except Exception:  # a missing package or file is reported by the loader
            return None
        return _gguf_dims(path) if path is not None and path.is_file() else None
    if spec.kind == "hf":
        cfg_path = Path(spec.target).expanduser() / "config.json"
        if cfg_path.is_file():
            try:
                return _config_dims(json.loads(cfg_path.read_text()))
            except (OSError, ValueError):
                return None
    return None  # hub ids and servers: checked once loaded
