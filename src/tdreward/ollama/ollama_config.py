"""`tdreward ollama`'s settings: each field is a flag (tdreward.flags). No heavy imports, so
`tdreward --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from tdreward.export.export_config import OUTTYPES
from tdreward.flags import setting
from tdreward.reward_settings import RewardSettings
from tdreward.specs import DEFAULT_MODEL
from tdreward.validation import check_choice, check_output_dir, check_output_file, validate

ACTIONS = ("create", "run", "evaluate", "delete")
OLLAMA_HOST_HELP = "$OLLAMA_HOST or 127.0.0.1:11434"


@dataclass
class OllamaConfig:
    """Everything `tdreward ollama` takes."""

    action: str = setting(choices=ACTIONS, help="create, run, evaluate or delete the model")
    model_name: str = setting(help="the Ollama model name, e.g. td-smollm2")
    model_path: str | None = setting(
        None, help="create: directory, hub id, .gguf file, gguf:PATH or embedded:NAME")
    prompt: list[str] = setting(default_factory=list, append=True,
                                help="run/evaluate: a prompt (repeatable)")
    prompts: str | None = setting(
        None, help="evaluate: a .jsonl/.txt prompt file when no --prompt is given",
        default_help="the bundled eval_prompts.jsonl")
    base_model: str | None = setting(None, help="evaluate: the reward model's reference LM",
                                     default_help=f"the critic's own, else {DEFAULT_MODEL}")
    reward: RewardSettings = field(default_factory=RewardSettings, metadata={"help": "nested"})
    ollama_host: str | None = setting(None, help="Ollama server", default_help=OLLAMA_HOST_HELP)
    output_dir: str | None = setting(None, help="create: where the GGUF and Modelfile go",
                                     default_help="./ollama_MODEL_NAME")
    outtype: str = setting("f16", choices=OUTTYPES,
                           help="create: GGUF type when the model is exported")
    system: str | None = setting(None, help="create: SYSTEM prompt",
                                 default_help="the chat template's own")
    template: str | None = setting(None, help="create: a file with an Ollama Go template to use "
                                   "instead of the one derived from the chat template")
    via: str = setting("api", choices=("api", "cli"),
                       help="create through the HTTP API or the `ollama` CLI")
    num_samples: int = setting(4, help="evaluate: generations")
    max_new_tokens: int = setting(128, help="run/evaluate: new tokens per generation")
    temperature: float = setting(0.7, help="run/evaluate: sampling temperature")
    seed: int = setting(0, help="run/evaluate: sampling seed")
    output: str | None = setting(None, help="evaluate: write the results as JSON")
    verbose: bool = False

    def __post_init__(self) -> None:
        validate(self, {"num_samples": ">=1", "max_new_tokens": ">=1", "temperature": ">=0"})
        check_choice("--action", self.action, ACTIONS)
        check_choice("--outtype", self.outtype, OUTTYPES)
        check_choice("--via", self.via, ("api", "cli"))
        check_output_file(self.output, "--output")
        if self.action == "create":
            check_output_dir(self.output_dir, "--output_dir")


__all__ = ["ACTIONS", "OLLAMA_HOST_HELP", "OllamaConfig"]
