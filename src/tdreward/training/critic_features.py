"""The LM features a critic learns from: the corpus read once by the frozen reference LM,
cut into windows, cached on disk (safetensors) under a key of the corpus content, the model's
fingerprint and the settings, so that editing the corpus recomputes them and moving it does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tdreward.errors import TDRewardError, first_line
from tdreward.io import atomic_path, write_json
from tdreward.reward_model import TDRewardModel
from tdreward.training.critic_config import CriticTrainingConfig

log = logging.getLogger("tdreward")


def tokenise_corpus(rm: TDRewardModel, docs: list[str], max_tokens: int | None):
    rows: list[list[int]] = []
    total = 0
    for doc in docs:
        ids = rm.encode([doc])[0]  # after the prefix token, as `score` reads a text
        if max_tokens is not None and total + len(ids) > max_tokens:
            ids = ids[: max_tokens - total]
        if len(ids) >= 2:
            rows.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return rows, total


def cut_windows(rows: list[list[int]], window: int):
    """Non-overlapping windows: (doc index, token ids, ends its document?)."""
    out = []
    for d, ids in enumerate(rows):
        for start in range(0, len(ids), window):
            piece = ids[start : start + window]
            if len(piece) >= 2:
                out.append((d, piece, start + window >= len(ids)))
    return out


def model_fingerprint(lm, tokenizer) -> str:
    """sha256 of what a reference model computes with: its configuration, every parameter
    and buffer (tied weights once) and its tokenizer. Paths and spec strings are left out: the
    same model reached another way is the same model, and a file changed in place is not."""
    h = hashlib.sha256()
    config = {k: v for k, v in lm.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in [*lm.named_parameters(), *lm.named_buffers()]:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the whole pipeline: vocabulary, merges, added BOS/EOS
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def feature_cache_key(cfg: CriticTrainingConfig, rm: TDRewardModel, docs: list[str]) -> str:
    """sha256 naming the LM features of a corpus: the texts themselves, the reference model's
    fingerprint and the settings that cut the windows. Editing the corpus file (or pointing
    --base_model at a changed model) changes it; renaming or moving the file does not."""
    h = hashlib.sha256()
    h.update(json.dumps(cfg.cache_key(), sort_keys=True).encode())
    h.update(model_fingerprint(rm.lm, rm.tokenizer).encode())
    for doc in docs:
        raw = doc.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))  # so that document boundaries count
        h.update(raw)
    return h.hexdigest()


def cached_features(data_path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached features when they were computed for `key`; None otherwise. The key is read
    from the file's own header (one atomic file: never new features with an old key)."""
    if not data_path.is_file():
        return None
    try:
        with safe_open(str(data_path), framework="pt") as f:
            stored = (f.metadata() or {}).get("key")
        if stored != key:
            log.info("the LM feature cache in %s is for another corpus, model or settings: "
                     "recomputing it", data_path.parent)
            return None
        return load_file(str(data_path))
    except (SafetensorError, OSError) as e:
        first = first_line(e)
        log.warning("the LM feature cache %s is damaged (%s); recomputing it", data_path, first)
        return None


def build_feature_cache(cfg: CriticTrainingConfig, rm: TDRewardModel, docs: list[str],
                        cache_dir: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Run the frozen LM over the corpus once; reuse the on-disk cache when it was computed
    from the same texts, model and settings (`key`, default `feature_cache_key`)."""
    key = key or feature_cache_key(cfg, rm, docs)
    meta_path, data_path = cache_dir / "meta.json", cache_dir / "features.safetensors"
    cached = cached_features(data_path, key)
    if cached is not None:
        log.info("reusing the LM feature cache in %s", cache_dir)
        return cached
    rows, total = tokenise_corpus(rm, docs, cfg.max_tokens)
    if total < cfg.window:
        raise TDRewardError(
            f"corpus {cfg.dataset!r} has {total} tokens, fewer than one window ({cfg.window}); "
            "give more text or a smaller --window"
        )
    wins = cut_windows(rows, cfg.window)
    ids, mask = rm.pad([w[1] for w in wins])
    done = torch.zeros_like(ids, dtype=torch.bool)
    for i, (_, piece, ends_doc) in enumerate(wins):
        done[i, len(piece) - 1] = ends_doc  # a window cut mid-document bootstraps
    hidden, logp, ent = [], [], []
    from tqdm.auto import tqdm

    for a in tqdm(range(0, len(wins), cfg.lm_batch_size), desc="reference LM", unit="batch"):
        b = slice(a, a + cfg.lm_batch_size)
        f = rm.features(ids[b], mask[b], done[b], max_length=cfg.window)
        hidden.append(f.hidden.half())
        logp.append(f.logp)
        ent.append(f.entropy)
    data = {
        "input_ids": ids, "mask": mask, "done": done, "hidden": torch.cat(hidden),
        "logp": torch.cat(logp), "entropy": torch.cat(ent),
        "doc": torch.tensor([w[0] for w in wins]),
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(data_path) as tmp:
        save_file({k: v.contiguous() for k, v in data.items()}, str(tmp), metadata={"key": key})
    write_json(meta_path, {"key": key, "settings": cfg.cache_key(), "n_windows": len(wins),
                           "n_tokens": total})  # for people: the key in the file decides
    return data


__all__ = ["build_feature_cache", "cached_features", "cut_windows", "feature_cache_key",
           "model_fingerprint", "tokenise_corpus"]
