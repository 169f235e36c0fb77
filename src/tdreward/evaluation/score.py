"""`tdreward score`: per-token TD traces of texts, with JSON / HTML / PNG output."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tdreward.errors import TDRewardError
from tdreward.reward.config import RewardConfig
from tdreward.reward_model import (
    TDRewardModel,
    TextScore,
    check_critic_fits,
    check_state_name,
)
from tdreward.specs import DEFAULT_MODEL, parse_spec
from tdreward.validation import validate
from tdreward.evaluation import trace
from tdreward.io import write_json

log = logging.getLogger("tdreward")

UNTRAINED_WARNING = (
    "no --reward_model_path: the belief and value heads are untrained, so V and delta are not "
    "yet meaningful (delta = r); r needs no learning. Train a critic with `tdreward train-critic`."
)


# Flag ranges, checked when the options are built (tdreward.validation); the reward settings
# (None = the critic's own) are checked again, with the critic's, by RewardConfig.
RULES = {"batch_size": ">=1", "max_length": ">=2", "stride": ">=1", "gamma": "[0, 1]"}


@dataclass
class ScoreOptions:
    model: str | None = None  # None: the critic's base model, else the default model
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

    def __post_init__(self) -> None:
        validate(self, RULES)
        if self.stride and self.max_length and self.stride > self.max_length:
            raise TDRewardError(f"--stride ({self.stride}) must not exceed --max_length "
                                f"({self.max_length})")
        if self.state is not None:
            check_state_name(self.state)
            if self.reward_model_path:
                raise TDRewardError("--state cannot change the state model of a trained critic")
        if self.reward_model_path:
            # The critic's own reference LM unless --model names another; a model whose
            # dimensions do not fit the critic fails here, before it is loaded.
            meta = check_critic_fits(self.reward_model_path, self.model, "--model")
            self.model = self.model or meta["base_model"]
        self.model = self.model or DEFAULT_MODEL
        check_scoring_spec(self.model)


def check_scoring_spec(model: str) -> None:
    spec = parse_spec(model)
    if not spec.can_score or spec.kind == "llamacpp":
        raise TDRewardError(
            f"{model!r} cannot score text here: use a hub id, a directory, gguf:PATH or "
            "embedded:NAME (servers do not return log-probs of a given text)"
        )


def load_reward_model(opts: ScoreOptions) -> TDRewardModel:
    """The reward model for `opts`: a trained critic when given, else an untrained one."""
    overrides = {k: getattr(opts, k) for k in ("alpha", "beta", "gamma", "state")
                 if getattr(opts, k) is not None}
    if opts.reward_model_path:
        model = TDRewardModel.from_pretrained(
            opts.reward_model_path, base_model=opts.model, verbose=opts.verbose,
            model_flag="--model",
        )
        if overrides:
            cfg = model.config.to_dict() | overrides
            model.critic.config = RewardConfig.from_dict(cfg)
    else:
        model = TDRewardModel.from_base(
            opts.model, RewardConfig(**overrides), verbose=opts.verbose
        )
        log.warning(UNTRAINED_WARNING)  # once the model is there: a bad spec is one line
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
                 plot_path=None, names: list[str] | None = None) -> None:
    if json_path:
        write_json(json_path, score_report(model, scores))
    if html_path:
        trace.write_html(html_path, scores, model.base_model, model.trained)
    if plot_path:
        trace.write_plot(plot_path, scores, model.base_model, names)
