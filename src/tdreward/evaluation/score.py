"""`tdreward score`: per-token TD traces of texts, with JSON / HTML / PNG output."""

from __future__ import annotations

import logging

from tdreward.evaluation import trace
from tdreward.evaluation.score_config import ScoreConfig
from tdreward.io import write_json
from tdreward.reward_model import TDRewardModel, TextScore, load_reward_model

log = logging.getLogger("tdreward")


def load_scorer(cfg: ScoreConfig) -> TDRewardModel:
    """The reward model `cfg` names (a trained critic, else untrained heads)."""
    return load_reward_model(cfg.model, cfg.reward, state=cfg.state, verbose=cfg.verbose,
                             model_flag="--model")


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
