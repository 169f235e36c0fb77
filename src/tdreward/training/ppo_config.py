"""`tdreward train`'s settings (PPO): each field is a flag (tdreward.flags). No heavy imports,
so `tdreward --help` stays fast and `ppo_checkpoint` can name the config without a circle."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from tdreward.errors import TDRewardError
from tdreward.flags import setting
from tdreward.hardware import HardwareSettings
from tdreward.reward_settings import RewardSettings
from tdreward.specs import DEFAULT_MODEL
from tdreward.validation import check_choice, check_output_dir, validate

# Flag ranges, checked when the config is built (tdreward.validation).
PPO_RULES = {
    "prompt_tokens": ">=1", "max_prompts": ">=1", "epochs": ">=1",
    "steps_per_epoch": ">=1", "batch_size": ">=1", "mini_batch_size": ">=1", "ppo_epochs": ">=1",
    "max_new_tokens": ">=1", "temperature": ">0", "max_length": ">=1", "lr": ">0",
    "kl_coef": ">=0", "cliprange": ">0", "cliprange_value": ">0", "vf_coef": ">=0",
    "ent_coef": ">=0", "value_norm_momentum": "[0, 1)", "gae_lambda": "[0, 1]",
    "max_grad_norm": ">0", "critic_lr": ">0", "lora_r": ">=1", "lora_alpha": ">=1",
    "lora_dropout": "[0, 1)", "save_steps": ">=0", "save_total_limit": ">=1",
    "max_nan_streak": ">=1",
}
# Fields whose flag is not `--FIELD` (for error messages).
FLAG_NAMES = {"gae_lambda": "--gae_lambda (--lam)", "critic_updates": "--freeze_critic",
              "chat_template": "--no_chat_template", "progress": "--no_progress",
              "normalize_values": "--no_normalize_values",
              "whiten_advantages": "--no_whiten_advantages"}
KL_ESTIMATORS = ("k1", "k3")
TRACKERS = ("tensorboard", "wandb")

DATA, SCHEDULE, GENERATION = "model and data", "schedule", "generation"
PPO, LORA, RUN = "PPO", "LoRA", "run"


@dataclass
class PPOConfig:
    """Everything `tdreward train` takes: each field is a flag (tdreward.flags)."""

    # --- models and data
    base_model: str = setting(DEFAULT_MODEL, help="policy to fine-tune", group=DATA)
    # The TD reward: a trained critic (None: untrained heads, warned) and overrides of its
    # alpha, beta, gamma. gamma is also the GAE discount, so the shaping telescopes exactly.
    reward: RewardSettings = field(default_factory=RewardSettings, metadata={"help": "nested"})
    # --device cpu keeps accelerate off the GPU; --dtype is the policy's and the reference's.
    hardware: HardwareSettings = field(default_factory=HardwareSettings,
                                       metadata={"help": "nested"})
    prompts: str | None = setting(None, help="prompt file (.jsonl with a 'prompt' key, or .txt)",
                                  group=DATA)
    dataset: str | None = setting(
        None, help="corpus (HF dataset name or local file/folder) whose windows become prompts, "
        "when no --prompts", group=DATA)
    dataset_config: str | None = setting(None, help="HF dataset config, e.g. wikitext-2-raw-v1",
                                         group=DATA)
    split: str = setting("train", help="HF dataset split", group=DATA)
    text_field: str = setting("text", help="text column of the dataset", group=DATA)
    prompt_tokens: int = setting(64, help="tokens per corpus window", group=DATA)
    max_prompts: int = setting(10_000, help="corpus windows to keep", group=DATA)
    chat_template: bool = setting(
        True, flag="--no_chat_template", group=DATA,
        help="do not wrap prompt-file prompts in the tokenizer's chat template")
    max_length: int = setting(
        512, help="longest prompt in tokens; longer prompts are cut from the left", group=DATA)
    output_dir: str = setting("output", help="where models, critic and metrics go", group=DATA)
    # --- schedule
    epochs: int = setting(3, help="passes over the prompts", group=SCHEDULE)
    steps_per_epoch: int | None = setting(None, help="PPO steps per epoch", group=SCHEDULE,
                                          default_help="one pass over the prompts")
    batch_size: int = setting(4, help="prompts per step per process", group=SCHEDULE)
    mini_batch_size: int = setting(2, help="rollouts per gradient step", group=SCHEDULE)
    ppo_epochs: int = setting(4, help="passes over each rollout batch", group=SCHEDULE)
    # --- generation
    max_new_tokens: int = setting(48, help="response length limit", group=GENERATION)
    temperature: float = setting(1.0, help="sampling temperature", group=GENERATION)
    # --- PPO
    lr: float | None = setting(None, help="learning rate", group=PPO,
                               default_help="1e-4 with LoRA, else 1e-5")
    kl_coef: float = setting(0.05, help="per-token KL penalty weight", group=PPO)
    kl_estimator: str = setting("k1", help="per-token KL estimate: k1 = log pi/ref, "
                                "k3 = (r-1) - log r", choices=KL_ESTIMATORS, group=PPO)
    cliprange: float = setting(0.2, help="policy ratio clip", group=PPO)
    cliprange_value: float = setting(0.2, help="value clip", group=PPO)
    vf_coef: float = setting(0.1, help="value loss weight", group=PPO)
    # Entropy bonus. 0 by default, as in TRL: over a 50k-token vocabulary it soon pays for noise,
    # and the TD reward already carries an exploration term (beta * H).
    ent_coef: float = setting(0.0, help="entropy bonus weight", group=PPO)
    # PopArt-style value normalisation (see PolicyWithValue)
    normalize_values: bool = setting(
        True, flag="--no_normalize_values", group=PPO,
        help="no PopArt normalisation of the value head (it follows the returns by default)")
    value_norm_momentum: float = setting(
        0.9, help="momentum of the value normalisation's running mean and std", group=PPO)
    gae_lambda: float = setting(0.95, help="GAE lambda", aliases=["--lam"], group=PPO)
    max_grad_norm: float = setting(1.0, help="gradient clipping", group=PPO)
    whiten_advantages: bool = setting(
        True, flag="--no_whiten_advantages", group=PPO,
        help="do not whiten the advantages over all processes' tokens")
    # --- online critic
    critic_lr: float = setting(1e-4, help="online critic learning rate", group=PPO)
    critic_updates: bool = setting(True, flag="--freeze_critic", group=PPO,
                                   help="no online TD learning of the critic")
    # Whether an EOS token ends the critic's episode (V = 0 after it). Off by default: a critic
    # trained on running text values every state at about mean(r) / (1 - gamma) (some -350 nats
    # for SmolLM2 on WikiText), so a terminal EOS would earn delta = r - V(s) of about +350 and
    # PPO would learn to stop at once. Off, the response's end bootstraps from V like a cut
    # window, and length is judged by the tokens, not by escaping the future.
    eos_terminal: bool = setting(
        False, group=PPO,
        help="EOS ends the critic's episode (V = 0 after it); off by default, see docs/ppo.md")
    # --- LoRA
    use_lora: bool = setting(
        False, group=LORA,
        help="train a LoRA adapter; the reference is the base with the adapter disabled")
    lora_r: int = setting(16, help="LoRA rank", group=LORA)
    lora_alpha: int = setting(32, help="LoRA scaling alpha", group=LORA)
    # Dropout makes the PPO ratio noisy, so none by default.
    lora_dropout: float = setting(0.0, help="LoRA dropout", group=LORA)
    target_modules: list[str] | None = setting(
        None, help="modules to adapt (or all-linear)", group=LORA,
        default_help="PEFT's default for the architecture")
    merge: bool = setting(False, help="save model_epoch_N with the adapter merged into the "
                          "weights", group=LORA)
    # --- run
    seed: int = setting(0, help="random seed", group=RUN)
    save_steps: int = setting(
        0, help="checkpoint every N steps as well as at each epoch end (0: only there)",
        group=RUN)
    save_total_limit: int = setting(2, help="checkpoints to keep", group=RUN)
    resume_from_checkpoint: str | None = setting(
        None, help="a checkpoint directory, an output directory, or `latest`", group=RUN)
    report_to: str | None = setting(None, help="also log to this tracker (through accelerate)",
                                    choices=TRACKERS, group=RUN)
    max_nan_streak: int = setting(5, help="stop after this many NaN/inf losses in a row",
                                  group=RUN)
    progress: bool = setting(True, flag="--no_progress", help="no progress bar", group=RUN)
    extra: dict = field(default_factory=dict)  # free-form notes stored with the config

    def __post_init__(self) -> None:
        validate(self, PPO_RULES, FLAG_NAMES)
        if self.mini_batch_size > self.batch_size:
            raise TDRewardError("--mini_batch_size must not exceed --batch_size")
        check_choice("--kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("--report_to", self.report_to, (None, *TRACKERS))
        if self.merge and not self.use_lora:
            raise TDRewardError("--merge needs --use_lora (without LoRA the full model is saved)")
        self.reward.check_fits(self.base_model, "--base_model")  # before the policy loads
        check_ppo_hardware(self.hardware)
        if not self.prompts and not self.dataset:
            raise TDRewardError("no prompts: pass --prompts FILE or --dataset NAME_OR_PATH")
        check_output_dir(self.output_dir, "--output_dir")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.use_lora else 1e-5)

    @classmethod
    def from_dict(cls, saved: dict) -> PPOConfig:
        """A config from `config_dict(cfg)` as saved in ppo_config.json, a checkpoint's
        state.json or ppo_training.json, by this version or an older one (see
        `upgrade_config_dict`); keys that are not settings (num_processes) are ignored."""
        d = upgrade_config_dict(saved)
        names = {f.name for f in fields(cls) if f.init}
        d["reward"] = RewardSettings(**d.get("reward", {}))
        d["hardware"] = HardwareSettings(**d.get("hardware", {}))
        return cls(**{k: v for k, v in d.items() if k in names})


def check_ppo_hardware(hw: HardwareSettings) -> None:
    """What PPO can do with the hardware settings: accelerate puts one copy of the policy on
    each process's device, so no device index, no device_map, and no quantised policy."""
    if hw.bits:
        raise TDRewardError(f"train does not take {hw.quant_flag}: its policy trains whole or "
                            "through LoRA in --dtype (QLoRA: tdreward lora --load_in_4bit)")
    if hw.device_map or ":" in hw.device:
        raise TDRewardError("train runs each process where accelerate puts it: choose the GPUs "
                            "with CUDA_VISIBLE_DEVICES, not --device cuda:N or --device_map")


# Settings renamed since configs were first saved: old key -> field.
RENAMED = {"lam": "gae_lambda"}
REWARD_KEYS = ("reward_model_path", "alpha", "beta", "gamma")


def upgrade_config_dict(saved: dict) -> dict:
    """A saved PPO config in today's shape: `lam` is `gae_lambda`, and the reward settings
    that were flat (reward_model_path, alpha, beta, gamma) are nested under `reward`."""
    d = {RENAMED.get(k, k): v for k, v in saved.items()}
    flat = {k: d.pop(k) for k in REWARD_KEYS if k in d}
    if flat:
        d["reward"] = dict(d.get("reward") or {}) | flat
    return d


__all__ = ["PPOConfig", "PPO_RULES", "check_ppo_hardware", "upgrade_config_dict"]
