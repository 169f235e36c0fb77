"""`tdreward score`: per-token TD traces of texts, with JSON / HTML / PNG output."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tdreward.errors import TDRewardError
from tdreward.reward.config import RewardConfig
from tdreward.reward_model import TDRewardModel, TextScore
from tdreward.specs import parse_spec
from tdreward.workflows import trace
from tdreward.workflows.io import write_json

log = logging.getLogger("tdreward")

UNTRAINED_WARNING = (
    "no --reward_model_path: the belief and value heads are untrained, so V and delta are not "
    "yet meaningful (delta = r); r needs no learning. Train a critic with `tdreward train-critic`."
)


@dataclass
class ScoreOptions:
    model: str
    reward_model_path: str | None = None
    batch_size: int = 8
    max_length: int | None = None
    stride: int | None = None
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    state: str | None = None
    terminal_at_end: bool = False
    verbose: bool = False


def load_reward_model(opts: ScoreOptions) -> TDRewardModel:
    """The reward model for `opts`: a trained critic when given, else an untrained one."""
    spec = parse_spec(opts.model)
    if not spec.can_score or spec.kind == "llamacpp":
        raise TDRewardError(
            f"{opts.model!r} cannot score text here: use a hub id, a directory, gguf:PATH or "
            "embedded:NAME (servers do not return log-probs of a given text)"
        )
    overrides = {k: getattr(opts, k) for k in ("alpha", "beta", "gamma", "state")
                 if getattr(opts, k) is not None}
    if opts.reward_model_path:
        model = TDRewardModel.from_pretrained(
            opts.reward_model_path, base_model=opts.model, verbose=opts.verbose
        )
        if overrides:
            if "state" in overrides:
                raise TDRewardError("--state cannot change the state model of a trained critic")
            cfg = model.config.to_dict() | overrides
            model.critic.config = RewardConfig.from_dict(cfg)
    else:
        log.warning(UNTRAINED_WARNING)
        model = TDRewardModel.from_base(
            opts.model, RewardConfig(**overrides), verbose=opts.verbose
        )
    return model


def score_texts(model: TDRewardModel, texts: list[str], opts: ScoreOptions) -> list[TextScore]:
    return model.score(texts, batch_size=opts.batch_size, max_length=opts.max_length,
                       stride=opts.stride, progress=True, terminal_at_end=opts.terminal_at_end)


def score_report(model: TDRewardModel, scores: list[TextScore]) -> dict:
    """The --json document: {"model", "reward_model", "trained", "texts": [...]}."""
    return {
        "model": model.base_model,
        "trained_critic": model.trained,
        "reward_config": model.config.to_dict(),
        "texts": [s.to_dict() for s in scores],
    }


def save_outputs(model: TDRewardModel, scores: list[TextScore], json_path=None, html_path=None,
                 plot_path=None) -> None:
    if json_path:
        write_json(json_path, score_report(model, scores))
    if html_path:
        trace.write_html(html_path, scores, model.base_model, model.trained)
    if plot_path:
        trace.write_plot(plot_path, scores, model.base_model)
