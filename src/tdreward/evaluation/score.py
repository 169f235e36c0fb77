"""`tdreward score`: per-token TD traces of texts, with JSON / JSON Lines / HTML / PNG output."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tdreward.errors import TDRewardError
from tdreward.evaluation import trace
from tdreward.evaluation.score_config import ScoreConfig
from tdreward.io import atomic_path, write_json
from tdreward.parallel import Ranks, part_path
from tdreward.reward_model import TDRewardModel, TextScore, load_reward_model

log = logging.getLogger("tdreward")


def load_scorer(cfg: ScoreConfig, warn_untrained: bool = True) -> TDRewardModel:
    """The reward model `cfg` names (a trained critic, else untrained heads); for an
    openai:URL#MODEL spec the server-side scorer (tdreward.evaluation.server_score), which
    scores like one."""
    if cfg.model and cfg.model.startswith("openai:"):
        from tdreward.evaluation.server_score import ServerScorer
        from tdreward.reward.config import RewardConfig

        return ServerScorer(cfg.model, RewardConfig(**cfg.reward.overrides()))  # type: ignore[return-value]
    return load_reward_model(cfg.model, cfg.reward, state=cfg.state, verbose=cfg.verbose,
                             model_flag="--model", warn_untrained=warn_untrained,
                             hardware=cfg.hardware)


def score_texts(model: TDRewardModel, texts: list[str], cfg: ScoreConfig) -> list[TextScore]:
    return model.score(texts, batch_size=cfg.batch_size, max_length=cfg.max_length,
                       stride=cfg.stride, progress=True, terminal_at_end=cfg.terminal_at_end)


def score_report(model: TDRewardModel, scores: list[TextScore]) -> dict:
    """The --json document: {"model", "reward_model", "trained", "texts": [...]}."""
    return {
        "model": model.base_model,
        "trained_critic": model.trained,
        "reward_config": model.config.to_dict(),
        "texts": [s.to_dict() for s in scores],
    }


def save_outputs(model: TDRewardModel, scores: list[TextScore], json_path=None, html_path=None,
                 plot_path=None, names: list[str] | None = None) -> None:
    if json_path:
        write_json(json_path, score_report(model, scores))
    if html_path:
        trace.write_html(html_path, scores, model.base_model, model.trained)
    if plot_path:
        trace.write_plot(plot_path, scores, model.base_model, names)


# --------------------------------------------------------------------------- --jsonl
# Up to this many texts the command prints a row per text; beyond, one line of totals (the
# summaries of a large corpus are not kept: the JSONL file has them).
TABLE_ROWS = 50


@dataclass
class JsonlTotals:
    """What a --jsonl run tells the user: counts, token-weighted means and, for a few texts,
    each text's summary as (index, summary)."""

    n_texts: int = 0
    n_tokens: int = 0
    sum_delta: float = 0.0
    sum_r: float = 0.0
    summaries: list[tuple[int, dict]] = field(default_factory=list)

    def add(self, other: JsonlTotals) -> None:
        self.n_texts += other.n_texts
        self.n_tokens += other.n_tokens
        self.sum_delta += other.sum_delta
        self.sum_r += other.sum_r
        self.summaries += other.summaries


def text_chunks(n_texts: int, batch_size: int) -> list[range]:
    """The texts in order, `batch_size` at a time: the unit of work. A chunk is scored the same
    way (one padded batch, longer texts alone) whichever process gets it, so the numbers do not
    depend on the number of processes."""
    return [range(a, min(a + batch_size, n_texts)) for a in range(0, n_texts, batch_size)]


def jsonl_record(model: TDRewardModel, score: TextScore, index: int, meta: dict) -> dict:
    """One line of --jsonl: the text's place and origin, then what --json writes per text."""
    return {"index": index, **meta, "model": model.base_model,
            "trained_critic": model.trained, **score.to_dict()}


def _score_share(f: TextIO, model: TDRewardModel, texts: Sequence[str], meta: Sequence[dict],
                 chunks: list[range], cfg: ScoreConfig, keep_summaries: bool,
                 progress: bool) -> JsonlTotals:
    """Score `chunks` in order, writing each text's line as soon as its chunk is done."""
    from tqdm.auto import tqdm

    totals = JsonlTotals()
    bar = tqdm(total=sum(len(c) for c in chunks), desc="scoring", unit="text",
               disable=not progress)
    for chunk in chunks:
        scores = model.score([texts[i] for i in chunk], batch_size=cfg.batch_size,
                             max_length=cfg.max_length, stride=cfg.stride,
                             terminal_at_end=cfg.terminal_at_end)
        for i, s in zip(chunk, scores):
            f.write(json.dumps(jsonl_record(model, s, i, meta[i]), ensure_ascii=False) + "\n")
            n = s.summary["n_tokens"]
            totals.n_texts += 1
            totals.n_tokens += n
            totals.sum_delta += s.summary["td_reward"] * n
            totals.sum_r += s.summary["mean_r"] * n
            if keep_summaries:
                totals.summaries.append((i, s.summary))
        bar.update(len(chunk))
    bar.close()
    return totals


def write_jsonl(model: TDRewardModel, texts: Sequence[str], meta: Sequence[dict],
                cfg: ScoreConfig, ranks: Ranks, progress: bool = True) -> JsonlTotals | None:
    """Stream one JSON object per text into `cfg.jsonl`; only one chunk of traces is held at a
    time. Under `accelerate launch` each process scores a contiguous share of the chunks into a
    part file; the main process writes its own share straight into the output's temporary
    file, appends the others' parts in rank order (= text order), removes them and renames the
    file into place. Returns the totals on the main process, None on the others."""
    if ranks.launched:
        h = hashlib.sha256()
        for t, m in zip(texts, meta):
            h.update(json.dumps([t, m]).encode())
        ranks.check_same("texts", h.hexdigest())
    chunks = text_chunks(len(texts), cfg.batch_size)
    # Characters stand in for tokens: the share of each process is balanced without
    # tokenising the corpus first.
    mine = [chunks[k] for k in ranks.share([sum(len(texts[i]) for i in c) for c in chunks])]
    keep = len(texts) <= TABLE_ROWS
    out = Path(cfg.jsonl)
    if ranks.launched:
        n_mine = sum(len(c) for c in mine)
        log.info("process %d of %d: %d of %d texts%s", ranks.index, ranks.count, n_mine,
                 len(texts), f" ({mine[0].start}-{mine[-1].stop - 1})" if mine else "")
    if not ranks.is_main:
        part = part_path(out, ranks.index)
        try:
            with part.open("w", encoding="utf-8") as f:
                totals = _score_share(f, model, texts, meta, mine, cfg, keep, progress=False)
            ranks.gather((str(part), totals))  # from here the main process owns the part
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return None
    # The temporary output exists (and stale parts are swept) before any part is handed over.
    with atomic_path(out) as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            totals = _score_share(f, model, texts, meta, mine, cfg, keep, progress)
        shared = ranks.gather((None, totals))
        parts = [Path(p) for p, _ in shared[1:]]
        try:
            with tmp.open("a", encoding="utf-8") as f:
                for p, (_, t) in zip(parts, shared[1:]):
                    if not p.is_file():
                        raise TDRewardError(
                            f"--jsonl: another process's part {p} is not visible here: the "
                            "output folder must be on a filesystem every process shares")
                    with p.open(encoding="utf-8") as src:
                        shutil.copyfileobj(src, f)
                    totals.add(t)
        finally:
            for p in parts:
                with contextlib.suppress(OSError):
                    p.unlink()
    totals.summaries.sort()
    return totals
