"""The LM features a critic learns from: every corpus document read whole by the frozen
reference LM exactly as `score` reads a text (the same prefix token, window and stride), so V
learns the level and position effects users see; cached on disk (safetensors) under a key of
the corpus content, the model's fingerprint and the settings, so that editing the corpus
recomputes them and moving it does not.

The cache is flat over tokens: input_ids [N], hidden [N, D] (fp16), logp [N] (log p of the
next token; 0 at a document's last token), entropy [N], expected_c [N] (E_p[c_t], which rbar
needs, under the corpus base rate), offsets [n_docs + 1] and log_p0 [V].

Under `accelerate launch` the LM batches are shared out between the processes; the main
process gathers them (part files, tdreward.parallel) and writes the same cache one process
would have written, bit for bit (docs/distributed.md).
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
from tdreward.parallel import Ranks, WorkerDone, current_ranks, part_path
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


MIN_CORPUS_TOKENS = 64


def unigram_counts(rows: list[list[int]], vocab_size: int) -> torch.Tensor:
    flat = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    return torch.bincount(flat, minlength=vocab_size)[:vocab_size]


def lm_batches(rows: list[list[int]], lm_batch_size: int, window: int) -> list[list[int]]:
    """Documents grouped for the reference LM, shortest first. Padding costs attention:
    documents share a pass only while the padded batch holds no more tokens than one window;
    longer ones are read alone (sliding windows). The plan depends on the corpus and the
    settings only, so each batch is computed the same way on one process or several."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    batches, batch = [], []
    for pos, i in enumerate(order):
        batch.append(i)
        nxt = order[pos + 1] if pos + 1 < len(order) else None
        if (nxt is not None and len(batch) < lm_batch_size
                and (len(batch) + 1) * len(rows[nxt]) <= window):
            continue
        batches.append(batch)
        batch = []
    return batches


FEATURE_KEYS = ("input_ids", "hidden", "logp", "entropy", "expected_c")


def extract_rows(rm: TDRewardModel, rows: list[list[int]], batches: list[list[int]],
                 window: int, stride: int | None, bar) -> dict[int, dict[str, torch.Tensor]]:
    """The LM features of the documents in `batches`, by document index."""
    done_rows: dict[int, dict[str, torch.Tensor]] = {}
    for batch in batches:
        ids, mask = rm.pad([rows[j] for j in batch])
        f = rm.features(ids, mask, torch.zeros_like(ids, dtype=torch.bool), max_length=window,
                        stride=stride)
        for b, j in enumerate(batch):
            n = len(rows[j])
            done_rows[j] = {
                "input_ids": ids[b, :n], "hidden": f.hidden[b, :n].half(),
                "logp": torch.cat([f.logp[b, : n - 1], f.logp.new_zeros(1)]),
                "entropy": f.entropy[b, :n], "expected_c": f.expected_c[b, :n],
            }
            bar.update(n)
    return done_rows


def gather_rows(done_rows: dict[int, dict[str, torch.Tensor]], data_path: Path,
                ranks: Ranks) -> dict[int, dict[str, torch.Tensor]]:
    """Under `accelerate launch`: every process's documents on the main process. The others
    hand theirs over in a safetensors part file beside the cache and stop (WorkerDone): the
    heads train on the main process alone, the LM pass being what costs."""
    if not ranks.is_main:
        docs = sorted(done_rows)
        packed = {k: torch.cat([done_rows[j][k] for j in docs]).contiguous() if docs
                  else torch.zeros(0) for k in FEATURE_KEYS}
        packed["docs"] = torch.tensor(docs, dtype=torch.long)
        packed["lengths"] = torch.tensor([len(done_rows[j]["input_ids"]) for j in docs],
                                         dtype=torch.long)
        part = part_path(data_path, ranks.index)
        try:
            save_file(packed, str(part))
            ranks.gather(str(part))  # from here the main process owns the part
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        raise WorkerDone
    parts = [Path(p) for p in ranks.gather(None)[1:]]
    try:
        for p in parts:
            if not p.is_file():
                raise TDRewardError(f"another process's LM features {p} are not visible here: "
                                    "the output folder must be on a filesystem every process "
                                    "shares")
            t = load_file(str(p))
            ends = t["lengths"].cumsum(0).tolist()
            for j, a, b in zip(t["docs"].tolist(), [0, *ends[:-1]], ends):
                done_rows[j] = {k: t[k][a:b] for k in FEATURE_KEYS}
    finally:
        for p in parts:
            p.unlink(missing_ok=True)
    return done_rows


def build_feature_cache(cfg: CriticTrainingConfig, rm: TDRewardModel, docs: list[str],
                        cache_dir: Path, key: str | None = None,
                        progress: bool = True) -> dict[str, torch.Tensor]:
    """Run the frozen LM over every document once; reuse the on-disk cache when it was computed
    from the same texts, model and settings (`key`, default `feature_cache_key`). Sets the
    critic's base rate p0 (the corpus's unigram rate), which E_p[c_t] depends on.

    Under `accelerate launch` the LM batches are split across the processes; the main process
    assembles and writes the cache and returns it, the others raise WorkerDone once their
    share is handed over (tdreward.parallel)."""
    key = key or feature_cache_key(cfg, rm, docs)
    ranks = current_ranks()
    meta_path, data_path = cache_dir / "meta.json", cache_dir / "features.safetensors"
    ranks.check_same("corpora, models or settings (their feature-cache keys differ)", key)
    cached = cached_features(data_path, key) if ranks.is_main else None
    # The main process decides for all: a cache it cannot read is recomputed by everyone.
    if ranks.gather(cached is not None)[0]:
        if not ranks.is_main:
            raise WorkerDone
        log.info("reusing the LM feature cache in %s", cache_dir)
        rm.critic.log_p0.copy_(cached["log_p0"])
        return cached
    rows, total = tokenise_corpus(rm, docs, cfg.max_tokens)
    if total < MIN_CORPUS_TOKENS:
        raise TDRewardError(
            f"corpus {cfg.dataset!r} has {total} tokens: too few to train a critic (at least "
            f"{MIN_CORPUS_TOKENS}, some of them held out)")
    rm.critic.set_base_rate(unigram_counts(rows, rm.critic.vocab_size))
    from tdreward.reward.lm import context_length

    window = cfg.window or context_length(rm.lm)
    from tqdm.auto import tqdm

    batches = lm_batches(rows, cfg.lm_batch_size, window)
    # Shares balanced by padded tokens, what a batch costs.
    mine = [batches[k] for k in ranks.share(
        [len(b) * max(len(rows[j]) for j in b) for b in batches])]
    if ranks.launched:
        log.info("reference LM: %d of %d batches on process %d of %d", len(mine), len(batches),
                 ranks.index, ranks.count)
    bar = tqdm(total=sum(len(rows[j]) for b in mine for j in b), desc="reference LM",
               unit="tok", disable=not (progress and ranks.is_main))
    done_rows = extract_rows(rm, rows, mine, window, cfg.stride, bar)
    bar.close()
    if ranks.launched:
        done_rows = gather_rows(done_rows, data_path, ranks)
    parts = {k: [done_rows[j][k] for j in range(len(rows))] for k in FEATURE_KEYS}  # corpus order
    lengths = torch.tensor([len(r) for r in rows])
    data = {k: torch.cat(v) for k, v in parts.items()}
    data["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    data["log_p0"] = rm.critic.log_p0.clone()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(data_path) as tmp:
        save_file({k: v.contiguous() for k, v in data.items()}, str(tmp), metadata={"key": key})
    write_json(meta_path, {"key": key, "settings": cfg.cache_key(), "n_documents": len(rows),
                           "n_tokens": total})  # for people: the key in the file decides
    return data


__all__ = ["build_feature_cache", "cached_features", "extract_rows", "feature_cache_key",
           "gather_rows", "lm_batches", "model_fingerprint", "tokenise_corpus",
           "unigram_counts"]
