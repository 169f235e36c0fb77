"""`tdreward ollama-finetune`'s settings: each field is a flag (tdreward.flags). No heavy
imports, so `tdreward --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from tdreward.export.export_config import OUTTYPES
from tdreward.flags import setting
from tdreward.ollama.ollama_config import OLLAMA_HOST_HELP
from tdreward.reward_settings import RewardSettings
from tdreward.validation import check_choice, check_output_dir, validate

LORA = "LoRA"


@dataclass
class FinetuneConfig:
    """Everything `tdreward ollama-finetune` takes."""

    base_model: str = setting(help="Ollama model (llama3.2:1b), gguf:PATH, embedded:NAME, a "
                              ".gguf file or a transformers directory")
    output_model: str = setting(help="name of the new Ollama model")
    dataset: str = setting(help="a .jsonl of {prompt, completion} pairs, a text file/folder or "
                           "an HF dataset")
    dataset_config: str | None = setting(None, help="HF dataset config")
    epochs: float = setting(3.0, help="epochs")
    reward: RewardSettings = field(default_factory=RewardSettings, metadata={"help": "nested"})
    reward_base_model: str | None = setting(
        None, help="the reward model's reference LM for the before/after comparison",
        default_help="the critic's own, else the base model")
    ollama_host: str | None = setting(None, help="Ollama server", default_help=OLLAMA_HOST_HELP)
    output_dir: str | None = setting(
        None, help="where the adapter, merged model, GGUF and Modelfile go",
        default_help="./ollama_finetune_OUTPUT_MODEL")
    lora_r: int = setting(8, help="LoRA rank", group=LORA)
    lora_alpha: int = setting(16, help="LoRA scaling alpha", group=LORA)
    lora_dropout: float = setting(0.05, help="LoRA dropout", group=LORA)
    batch_size: int = setting(4, help="training batch size", group=LORA)
    lr: float = setting(2e-4, help="learning rate")
    max_length: int = setting(256, help="tokens per training example", group=LORA)
    max_steps: int | None = setting(None, help="stop after this many optimizer steps",
                                    group=LORA)
    max_examples: int | None = setting(None, help="train on at most this many examples",
                                       group=LORA)
    outtype: str = setting("f16", choices=OUTTYPES, help="GGUF type of the result")
    eval_samples: int = setting(8, help="prompts generated with before/after for the TD-reward "
                                "comparison (0 skips it)")
    max_new_tokens: int = setting(64, help="new tokens per response of the comparison")
    temperature: float = setting(0.0, help="sampling temperature of the comparison (0 = greedy)")
    seed: int = setting(42, help="random seed")
    verbose: bool = False

    def __post_init__(self) -> None:
        validate(self, {
            "epochs": ">0", "lora_r": ">=1", "lora_alpha": ">=1",
            "lora_dropout": "[0, 1)", "batch_size": ">=1", "lr": ">0", "max_length": ">=2",
            "max_steps": ">=1", "max_examples": ">=1", "eval_samples": ">=0",
            "max_new_tokens": ">=1", "temperature": ">=0"})
        check_choice("--outtype", self.outtype, OUTTYPES)
        check_output_dir(self.output_dir, "--output_dir")


__all__ = ["FinetuneConfig"]
