"""`tdreward quickstart`'s settings: each field is a flag (tdreward.flags). No heavy imports."""

from __future__ import annotations

from dataclasses import dataclass, field

from tdreward.flags import setting
from tdreward.hardware import HardwareSettings
from tdreward.validation import check_output_dir, validate


@dataclass
class QuickstartConfig:
    """Everything `tdreward quickstart` takes: each field is a flag (tdreward.flags)."""

    output_dir: str = setting("tdreward_quickstart", help="where the results go")
    num_samples: int = setting(10, help="samples per model")
    max_new_tokens: int = setting(64, help="tokens per response")
    critic_dir: str | None = setting(None, help="where the critic is cached",
                                     default_help="$TDREWARD_CACHE/critics/quickstart-smollm2")
    retrain: bool = setting(False, help="train the critic again")
    max_tokens: int = setting(6000, help="corpus tokens the critic learns from")
    epochs: int = setting(30, help="critic epochs at most")
    seed: int = setting(0, help="seed of the critic's training and of the samples")
    cache_dir: str | None = setting(None, help="generation cache",
                                    default_help="$TDREWARD_CACHE/generations")
    # The critic's LM pass and the experiment's scoring (llama.cpp generates the samples).
    hardware: HardwareSettings = field(default_factory=HardwareSettings,
                                       metadata={"help": "nested"})
    verbose: bool = False

    def __post_init__(self) -> None:
        validate(self, {"num_samples": ">=1", "max_new_tokens": ">=1", "max_tokens": ">=2",
                        "epochs": ">=1"})
        check_output_dir(self.output_dir, "--output_dir")


__all__ = ["QuickstartConfig"]
