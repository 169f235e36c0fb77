"""`tdreward train-critic`'s settings: each field is a flag (tdreward.flags). No heavy imports.

The reward and the critic's own hyperparameters are a nested `RewardConfig` (`cfg.reward`),
saved with the trained critic; the fields here say how it is trained and on what.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tdreward.critic_files import check_state_name
from tdreward.errors import TDRewardError
from tdreward.flags import setting
from tdreward.hardware import HardwareSettings
from tdreward.reward.config import RewardConfig
from tdreward.specs import DEFAULT_MODEL
from tdreward.training.tracking import REPORT_TO, check_report_to
from tdreward.validation import check_output_dir, validate
from tdreward.version import __version__

# Flag ranges, checked when the config is built (tdreward.validation); the reward's own are
# RewardConfig's.
CRITIC_RULES = {
    "max_tokens": ">=2", "epochs": ">=1", "batch_size": ">=1", "lr": ">0", "weight_decay": ">=0",
    "window": ">=2", "stride": ">=1",
    "val_fraction": "(0, 1)", "patience": ">=1", "lm_batch_size": ">=1",
}


@dataclass(kw_only=True)
class CriticTrainingConfig:
    """Everything `tdreward train-critic` takes: each field is a flag (tdreward.flags)."""

    base_model: str = setting(DEFAULT_MODEL, help="reference LM spec (frozen)")
    dataset: str = setting(help="HF dataset name or local file/folder")
    dataset_config: str | None = setting(None, help="HF dataset config, e.g. wikitext-2-raw-v1")
    split: str = setting("train", help="HF dataset split")
    max_tokens: int | None = setting(None, help="read at most this many corpus tokens")
    output_dir: str = setting(help="where the reward model is written")
    epochs: int = setting(60, help="epochs at most (early stopping may end sooner)")
    batch_size: int = setting(1, help="documents per step (each read whole)")
    lr: float = setting(3e-3, help="learning rate (AdamW)")
    weight_decay: float = setting(1e-4, help="AdamW weight decay")
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "nested"})
    hardware: HardwareSettings = field(default_factory=HardwareSettings,
                                       metadata={"help": "nested"})
    seed: int = setting(0, help="seed of the initial weights, the validation split and the "
                        "shuffling")
    window: int | None = setting(None, help="the reference LM's reading window in tokens: "
                                 "documents longer than it are read with sliding windows, as "
                                 "`score` reads a text", default_help="the model's context")
    stride: int | None = setting(None, help="sliding-window stride for long documents",
                                 default_help="half the window")
    val_fraction: float = setting(0.1, help="share of the documents held out for validation")
    patience: int = setting(8, help="early-stopping patience: epochs without a better "
                            "held-out EV_MC (explained variance of the Monte-Carlo returns)")
    # A corpus document's end is where its text stops, not necessarily where the reader's
    # episode ends: by default it bootstraps like a cut window and only EOS is terminal.
    doc_end_terminal: bool = setting(
        False, help="treat each corpus document's end as terminal (default: only EOS is)")
    lm_batch_size: int = setting(8, help="documents per reference-LM pass while the features "
                                 "are cached (a document longer than the window is read alone)")
    report_to: str = setting("none", help="also log the per-epoch held-out diagnostics to: "
                             f"{', '.join(REPORT_TO)} (TensorBoard under OUTPUT_DIR/runs)")
    push_to_hub: str | None = setting(None, help="after training, upload the critic, its model "
                                      "card and metrics to this hub repo (org/name)")

    def __post_init__(self) -> None:
        validate(self, CRITIC_RULES)
        if not self.dataset:
            raise TDRewardError("--dataset is required (HF dataset name or local file/folder)")
        check_state_name(self.reward.state)
        if self.stride and self.window and self.stride > self.window:
            raise TDRewardError(f"--stride ({self.stride}) must not exceed --window ({self.window})")
        check_report_to(self.report_to)
        if self.push_to_hub is not None and self.push_to_hub.count("/") != 1:
            raise TDRewardError(f"--push_to_hub must be a hub repo id org/name, got "
                                f"{self.push_to_hub!r}")
        check_output_dir(self.output_dir, "--output_dir")

    def cache_key(self) -> dict:
        """The settings the LM-feature cache depends on. The corpus and the reference model
        count by content, not by name (`feature_cache_key`)."""
        keys = ("max_tokens", "window", "stride")
        reward = {k: getattr(self.reward, k) for k in ("tau", "lam")}  # E_p[c_t] depends on them
        return {k: getattr(self, k) for k in keys} | reward | {"tdreward_version": __version__}


__all__ = ["CRITIC_RULES", "CriticTrainingConfig"]
