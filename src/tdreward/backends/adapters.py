"""A LoRA adapter directory used wherever a model is named: its base loaded, the adapter merged.

`tdreward lora` and `tdreward train --use_lora` save adapters (adapter_config.json, no
config.json). Every command that loads a model by spec accepts such a directory, so
`export --model_path OUT/model_epoch_1` and `ollama --action create` work without a merge step.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from tdreward.errors import TDRewardError, first_line

log = logging.getLogger("tdreward")

ADAPTER_CONFIG = "adapter_config.json"
# Where our trainers record the model spec the adapter was trained on (PEFT's own
# base_model_name_or_path is the folder transformers loaded, often a cache path).
BASE_RECORDS = ("tdreward_lora.json", "ppo_training.json")
# Adapters written since tdreward lora records its base by spec: PEFT's file names it too.
SHA_KEY = "base_model_sha256"


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base_model(path: Path) -> str | None:
    """The spec of the model an adapter was trained on: our record, else PEFT's."""
    for name in (*BASE_RECORDS, ADAPTER_CONFIG):
        record = path / name
        if not record.is_file():
            continue
        try:
            meta = json.loads(record.read_text())
        except (OSError, ValueError) as e:
            raise TDRewardError(f"{record} is not valid JSON ({e}); the adapter is damaged") from e
        base = meta.get("base_model") or meta.get("base_model_name_or_path")
        if base:
            return str(base)
    return None


def adapter_base_sha256(path: Path) -> str | None:
    """The recorded sha256 of the GGUF the adapter's base was made from, if any."""
    for name in BASE_RECORDS:
        try:
            sha = json.loads((path / name).read_text()).get(SHA_KEY)
        except (OSError, ValueError):
            continue
        if isinstance(sha, str) and len(sha) == 64:
            return sha
    return None


def loadable_base(path: Path, base: str) -> str:
    """The spec to load for recorded base `base`: itself, unless it is a gguf: file that is
    gone (the adapter moved to another machine) and its dequantised copy, found by the
    recorded sha256, is in this machine's tdreward cache."""
    from tdreward.backends.embedded import cache_dir

    if not base.startswith("gguf:") or Path(base[5:]).expanduser().is_file():
        return base
    sha = adapter_base_sha256(path)
    cached = cache_dir() / "models" / sha[:24] if sha else None  # hf.cached_model_dir's name
    if cached is not None and (cached / "config.json").is_file():
        log.info("%s is gone; loading its dequantised copy %s (same sha256)", base[5:], cached)
        return str(cached)
    return base


def import_peft(quiet_bitsandbytes: bool = True):
    """Import peft. peft imports bitsandbytes whenever it is installed, and bitsandbytes then
    logs "Failed to load CPU gemm_4bit_forward ..." about a 4-bit kernel: noise unless 4-bit is
    used, so its loggers are muted for this one import (a no-op once peft is imported)."""
    if not quiet_bitsandbytes or "bitsandbytes" in sys.modules:
        import peft

        return peft
    bnb_log = logging.getLogger("bitsandbytes")
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    try:
        import peft
    finally:
        bnb_log.setLevel(level)
    return peft


def load_merged_adapter(path: Path, load_base):
    """(model, tokenizer): the adapter's base loaded by `load_base(spec)`, the adapter merged
    into it, the adapter's own tokenizer when it saved one."""
    import_peft()  # first: keeps bitsandbytes' 4-bit kernel notice out of the output
    from peft import PeftModel

    base = adapter_base_model(path)
    if not base:
        raise TDRewardError(f"{path} is a LoRA adapter whose base model is not recorded; merge "
                            "it with `tdreward lora --merge` or export with --adapter")
    log.info("%s is a LoRA adapter: loading its base %s and merging it", path, base)
    model, tok = load_base(loadable_base(path, base))
    try:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        first = first_line(e)
        raise TDRewardError(f"cannot apply adapter {path} to its base {base}: {first}") from e
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    return model.eval(), tok
