"""`tdreward lora`'s settings: each field is a flag (tdreward.flags). No heavy imports, so
`tdreward --help` stays fast and `lora_setup` can name the config without a circle."""

from __future__ import annotations

from dataclasses import dataclass, field

from tdreward.errors import TDRewardError
from tdreward.flags import setting
from tdreward.hardware import TrainingHardwareSettings
from tdreward.reward_settings import RewardSettings
from tdreward.specs import DEFAULT_MODEL
from tdreward.training.tracking import REPORT_TO, check_report_to
from tdreward.validation import check_choice, check_output_dir, validate

# Flag ranges, checked when the config is built (tdreward.validation).
LORA_RULES = {
    "max_length": ">=2", "max_examples": ">=1", "lora_r": ">=1", "lora_alpha": ">=1",
    "lora_dropout": "[0, 1)", "batch_size": ">=1", "gradient_accumulation_steps": ">=1",
    "epochs": ">0", "max_steps": ">=1", "lr": ">0", "weight_decay": ">=0",
    "warmup_steps": ">=0", "max_grad_norm": ">0", "temperature": ">0",
    "w_max": ">0", "reward_scale": "[0, 1]", "eval_examples": ">=0", "logging_steps": ">=1",
}
# Fields whose flag is not `--FIELD` (for error messages).
FLAG_NAMES = {"epochs": "--epochs (--num_epochs)",
              "gradient_checkpointing": "--no_gradient_checkpointing",
              "cache_deltas": "--no_cache_deltas", "progress": "--no_progress"}
WEIGHTINGS = ("token", "sequence")
BASELINES = ("batch", "none")
# transformers' schedulers that need no settings beyond the warmup.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt")

LORA, TRAINING, TD = "LoRA", "training", "TD reward"


@dataclass(kw_only=True)
class LoraTrainingConfig:
    """Everything `tdreward lora` takes: each field is a flag (tdreward.flags)."""

    base_model: str = setting(
        DEFAULT_MODEL, help="model spec to fine-tune: hub id (gpt2), directory, gguf:PATH or "
        "embedded:NAME")
    dataset: str = setting(help="HF dataset name (wikitext), local .txt/.jsonl/.parquet file or "
                           "folder, or a .jsonl of {prompt, completion} pairs")
    dataset_config: str | None = setting(None, help="HF dataset config, e.g. wikitext-2-raw-v1")
    split: str = setting("train", help="HF dataset split")
    output_dir: str = setting(
        "./lora_output", help="where the adapter (adapter_config.json + safetensors) is written")
    # LoRA
    lora_r: int = setting(8, help="rank", group=LORA)
    lora_alpha: int = setting(16, help="scaling alpha", group=LORA)
    lora_dropout: float = setting(0.05, help="dropout", group=LORA)
    target_modules: list[str] | None = setting(
        None, group=LORA, help="layer names to adapt (space or comma separated)",
        default_help="per architecture: GPT-2 c_attn c_proj c_fc, Llama/Gemma "
        "q,k,v,o,gate,up,down_proj, else all linear")
    # Device, dtype and quantisation of the frozen base (--load_in_4bit, alias --use_4bit, is
    # QLoRA): the settings every command that loads an LM nests; here bitsandbytes may also
    # run on the CPU.
    hardware: TrainingHardwareSettings = field(default_factory=TrainingHardwareSettings,
                                               metadata={"help": "nested"})
    merge: bool = setting(
        False, help="also write the adapter merged into the fp32 base to OUTPUT_DIR/merged",
        group=LORA)
    # Optimisation
    batch_size: int = setting(4, help="examples per step", group=TRAINING)
    gradient_accumulation_steps: int = setting(
        1, help="batches per optimizer step", group=TRAINING)
    epochs: float = setting(3.0, help="epochs", aliases=["--num_epochs"], group=TRAINING)
    max_steps: int | None = setting(
        None, help="stop after this many optimizer steps (before --epochs ends)", group=TRAINING)
    lr: float = setting(2e-4, help="learning rate", group=TRAINING)
    max_length: int = setting(
        256, help="tokens per example (text is cut into windows of this length)", group=TRAINING)
    weight_decay: float = setting(0.0, help="AdamW weight decay", group=TRAINING)
    warmup_steps: int = setting(0, help="learning-rate warmup steps", group=TRAINING)
    lr_scheduler: str = setting(
        "linear", group=TRAINING,
        help=f"learning-rate schedule (transformers'): {', '.join(LR_SCHEDULERS)}")
    max_grad_norm: float = setting(1.0, help="gradient clipping", group=TRAINING)
    gradient_checkpointing: bool = setting(
        True, flag="--no_gradient_checkpointing", help="keep activations (faster, more memory)",
        group=TRAINING)
    chat_template: bool = setting(
        False, help="wrap prompts of prompt/completion pairs in the tokenizer's chat template",
        group=TRAINING)
    max_examples: int | None = setting(
        None, help="use at most this many training examples", group=TRAINING)
    eval_examples: int = setting(
        64, help="training examples whose loss is measured before and after (0 skips)",
        group=TRAINING)
    logging_steps: int = setting(1, help="log the loss every N optimizer steps", group=TRAINING)
    report_to: str = setting("none", group=TRAINING,
                             help=f"also log the training logs to: {', '.join(REPORT_TO)} "
                             "(TensorBoard under OUTPUT_DIR/runs)")
    seed: int = setting(42, help="random seed", group=TRAINING)
    progress: bool = setting(True, flag="--no_progress",
                             help="no progress bars (training and the loss probes)",
                             group=TRAINING)
    # TD reward: a trained critic (None: untrained heads, warned) and overrides of its alpha,
    # beta, gamma (None: the critic's own values, 0.1, 0.01, 0.99 untrained)
    reward: RewardSettings = field(default_factory=RewardSettings, metadata={"help": "nested"})
    weighting: str = setting("token", choices=WEIGHTINGS, group=TD,
                             help="token: w_t per token; sequence: one weight per example from "
                             "its mean delta")
    temperature: float = setting(1.0, help="temperature of exp(delta / temperature)", group=TD)
    w_max: float = setting(5.0, help="weights are clipped at this", group=TD)
    baseline: str = setting("batch", choices=BASELINES, group=TD,
                            help="batch: the advantage is delta minus its batch mean (weights "
                            "average near 1); none: delta as is")
    reward_scale: float = setting(
        1.0, help="0 = plain SFT, 1 = fully TD-weighted, between = a blend", group=TD)
    # The reference is frozen: its deltas per example never change.
    cache_deltas: bool = setting(
        True, flag="--no_cache_deltas", group=TD,
        help="compute the reference's deltas again at every visit of an example")

    def __post_init__(self) -> None:
        if not self.dataset:
            raise TDRewardError("--dataset is required (HF dataset, text file/folder or .jsonl)")
        if self.target_modules:  # "--target_modules q_proj,v_proj" as well as "q_proj v_proj"
            self.target_modules = [n.strip() for item in self.target_modules
                                   for n in item.split(",") if n.strip()] or None
        if ":" in self.hardware.device or self.hardware.device_map:
            raise TDRewardError(
                "lora trains on the device the trainer picks: choose it with --device "
                "auto/cpu/cuda/mps (and CUDA_VISIBLE_DEVICES), not --device cuda:N or "
                "--device_map")
        if self.weighting not in WEIGHTINGS:
            raise TDRewardError(f"--weighting must be one of {', '.join(WEIGHTINGS)}")
        if self.baseline not in BASELINES:
            raise TDRewardError(f"--baseline must be one of {', '.join(BASELINES)}")
        check_choice("--lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        check_report_to(self.report_to)
        validate(self, LORA_RULES, FLAG_NAMES)
        self.reward.check_fits(self.base_model, "--base_model")  # before the base model loads
        check_output_dir(self.output_dir, "--output_dir")


__all__ = ["LoraTrainingConfig", "LORA_RULES", "WEIGHTINGS", "BASELINES", "LR_SCHEDULERS"]
