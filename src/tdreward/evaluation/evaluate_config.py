"""`tdreward evaluate`'s settings: each field is a flag (tdreward.flags). No heavy imports."""

from __future__ import annotations

from dataclasses import dataclass, field

from tdreward.errors import TDRewardError
from tdreward.evaluation.compare_config import GenerationSettings, restate
from tdreward.flags import setting
from tdreward.reward_settings import RewardSettings
from tdreward.specs import DEFAULT_MODEL, parse_spec
from tdreward.validation import check_output_dir, validate


@dataclass(kw_only=True)
class EvaluateConfig(GenerationSettings):
    """Everything `tdreward evaluate` takes: each field is a flag (tdreward.flags)."""

    prompts: str | None = restate(
        GenerationSettings, "prompts",
        default_help="the first --prompt_words words of each document of the dataset")
    max_new_tokens: int = restate(GenerationSettings, "max_new_tokens", 64)
    base_model: str = setting(DEFAULT_MODEL, help="the base model (reward reference)")
    fine_tuned_model: str = setting(help="the fine-tuned model (dir, hub id, ...)")
    dataset: str = setting(help="HF dataset name or local file/folder")
    dataset_config: str | None = setting(None, help="HF dataset config, e.g. wikitext-2-raw-v1")
    split: str = setting("test", help="HF dataset split")
    output_dir: str = setting("evaluate_out", help="where evaluation.json and the plot go")
    max_chars: int = setting(20_000, help="dataset characters scored for perplexity")
    prompt_words: int = setting(12, help="words of each document used as a prompt when "
                                "--prompts is not given")
    reward: RewardSettings = field(default_factory=RewardSettings, metadata={"help": "nested"})
    verbose: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        # The critic against the reference LM, before any generation or model load.
        self.reward.check_fits(self.base_model, "--base_model")
        validate(self, {"prompt_words": ">=1", "max_chars": ">=1"})
        if not self.fine_tuned_model:
            raise TDRewardError("give --fine_tuned_model (a directory, hub id, gguf: or "
                                "embedded:)")
        if not self.dataset:
            raise TDRewardError("--dataset is required (HF dataset name or local file/folder)")
        for m in (self.base_model, self.fine_tuned_model):
            if not parse_spec(m).can_score:
                raise TDRewardError(f"{m!r} cannot score text (a server): evaluate needs models "
                                    "that give log-probs of a given text")
        check_output_dir(self.output_dir, "--output_dir")


__all__ = ["EvaluateConfig"]
