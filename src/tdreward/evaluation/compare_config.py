"""Settings of `compare`, `experiment` and `test-instruct`, and the generation settings that
`evaluate` shares: each field is a flag (tdreward.flags). No heavy imports.

The commands differ only in defaults and in a few flags of their own, so each has its config
class: a subclass restates a field (`restate`) with its own default, or without a flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tdreward.errors import TDRewardError
from tdreward.flags import setting
from tdreward.hardware import HardwareSettings, LlamaCppSettings
from tdreward.reward_settings import RewardSettings
from tdreward.specs import DEFAULT_MODEL, DEFAULT_MODELS, parse_spec
from tdreward.validation import check_choice, check_output_dir, validate

BACKENDS = ("auto", "llamacpp", "transformers")
PROMPT_FORMATS = ("auto", "chat", "raw")

# Ranges of the generation and scoring flags that compare, experiment, test-instruct and
# evaluate share (tdreward.validation); the reward's own are RewardSettings'.
GENERATION_RULES = {
    "num_samples": ">=1", "max_new_tokens": ">=1", "temperature": ">=0", "top_p": "(0, 1]",
    "batch_size": ">=1", "threads": ">=1",
}
SERVER_RULES = {"concurrency": ">=1", "timeout": ">0", "retries": ">=0"}

# Their flags have help sections of their own, after each command's own flags.
_generation = partial(setting, group="generation and scoring")
_server = partial(setting, group="servers (Ollama, OpenAI-compatible)")


def restate(cls: type, name: str, default: Any = dataclasses.MISSING, *,
            default_factory: Any = dataclasses.MISSING, flag: bool = True, **meta: Any):
    """Field `name` of dataclass `cls` declared again for a subclass: with another default,
    more metadata (`meta`, e.g. another `default_help`), or (flag=False) without its flag."""
    f = cls.__dataclass_fields__[name]
    if default is dataclasses.MISSING and default_factory is dataclasses.MISSING:
        default, default_factory = f.default, f.default_factory
    metadata = {**f.metadata, **meta} if flag else {}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def _n_boot() -> int:
    from tdreward.evaluation.stats import N_BOOT  # numpy: only once a config is built

    return N_BOOT


@dataclass
class GenerationSettings:
    """How every model generates its samples and how the responses are scored: the settings
    `compare`, `experiment`, `test-instruct` and `evaluate` share."""

    num_samples: int = _generation(10, help="samples per model; prompts are cycled")
    prompts: str | None = _generation(
        None, help="prompt file, .jsonl with a 'prompt' key or .txt one per line",
        default_help="the bundled data/eval_prompts.jsonl")
    max_new_tokens: int = _generation(100, help="tokens generated per sample at most")
    temperature: float = _generation(0.7, help="0 is greedy")
    top_p: float = _generation(1.0, help="nucleus sampling", default_help="1: off")
    seed: int = _generation(0, help="sample i uses seed + i")
    backend: str = _generation("auto", choices=BACKENDS,
                           help="GGUF / embedded models run on llama.cpp by default (fast); "
                           "transformers forces the dequantised path")
    prompt_format: str = _generation(
        "auto", choices=PROMPT_FORMATS,
        help="auto: the model's chat template when it has one (instruct models), else raw")
    batch_size: int = _generation(8, help="prompts generated together (transformers: one padded "
                              "batch; llama.cpp: sequences sharing each decode) and the reward "
                              "scoring batch")
    threads: int | None = _generation(
        None, help="llama.cpp threads", default_help="half the CPUs, which stays fast when "
        "other processes want cores; all of them is faster on an otherwise idle machine")
    cache_dir: str | None = _generation(None, help="generation cache",
                                    default_help="$TDREWARD_CACHE/generations")
    no_cache: bool = _generation(False, help="neither read nor write the cache")
    # Where the transformers models (generators and the reward's reference LMs) run, and
    # llama.cpp's GPU offload.
    hardware: HardwareSettings = field(default_factory=HardwareSettings,
                                       metadata={"help": "nested"})
    llamacpp: LlamaCppSettings = field(default_factory=LlamaCppSettings,
                                       metadata={"help": "nested"})

    def __post_init__(self) -> None:
        validate(self, GENERATION_RULES)
        check_choice("--backend", self.backend, BACKENDS)
        check_choice("--prompt_format", self.prompt_format, PROMPT_FORMATS)


@dataclass
class ServerSettings(GenerationSettings):
    """Generation settings for models that servers run (Ollama, OpenAI-compatible)."""

    ollama_host: str | None = _server(None, help="Ollama server",
                                      default_help="$OLLAMA_HOST or http://127.0.0.1:11434")
    pull: bool = _server(False, help="pull an Ollama model that the server does not have")
    concurrency: int = _server(4, help="requests in flight to a server")
    timeout: float = _server(300.0, help="seconds per server request")
    retries: int = _server(3, help="retries of a failed OpenAI-compatible request")
    openai_extra_body: dict = _server(
        default_factory=dict, help="JSON merged into every OpenAI-compatible request, e.g. "
        "'{\"top_k\": 0, \"repeat_penalty\": 1.0}' for llama.cpp's server")

    def __post_init__(self) -> None:
        super().__post_init__()
        validate(self, SERVER_RULES)


@dataclass
class CompareConfig(ServerSettings):
    """Everything `tdreward compare` takes: each field is a flag (tdreward.flags)."""

    models: list[str] = setting(default_factory=lambda: list(DEFAULT_MODELS),
                                help="model specs (`tdreward models`)",
                                default_help="the two embedded models")
    output_dir: str = setting("compare_out", help="where results.json and the plot go")
    base_model: str = setting(DEFAULT_MODEL, help="the reward model's reference LM (must "
                              "match --reward_model_path)")
    reward: RewardSettings = field(default_factory=RewardSettings, metadata={"help": "nested"})
    reference_models: list[str] | None = setting(
        None, help="score every response with each of these reference LMs, to see "
        "self-preference (a reference judging its own model's text): a models x references "
        "matrix of TD rewards, paired differences under each reference and the self-preference "
        "gap; the first replaces --base_model in the table, differences, traces and "
        "self-scores; --reward_model_path serves the references with its dimensions, the "
        "others get an untrained critic",
        default_help="--base_model alone")
    self_score: bool = setting(False, help="also score models that can score text on a "
                               "corpus by their own predictions")
    self_score_corpus: str | None = setting(
        None, help="corpus for --self_score (file, folder or dataset)",
        default_help="the bundled data/sample_training_data.jsonl")
    self_score_config: str | None = setting(None, help="dataset config for "
                                            "--self_score_corpus")
    self_score_split: str = "test"
    self_score_chars: int = setting(20_000, help="characters of the corpus to self-score")
    html_report: bool = False
    trace_samples: int = 3  # dopamine traces per model in the HTML report
    bootstrap: int = field(default_factory=_n_boot)  # bootstrap resamples of every CI
    verbose: bool = False
    command: str = "compare"  # recorded in results.json
    def __post_init__(self) -> None:
        super().__post_init__()
        # The critic against the reference LM(s), before any generation or model load.
        if self.reference_models is None:
            self.reward.check_fits(self.base_model, "--base_model")
        else:
            check_reference_models(self.reference_models, self.reward)
        validate(self, {"self_score_chars": ">=1", "trace_samples": ">=0", "bootstrap": ">=1"})
        if not self.models:
            raise TDRewardError("no models to compare: give --models")
        if len(set(self.models)) != len(self.models):
            raise TDRewardError("--models names a model twice")
        for m in self.models:
            parse_spec(m)  # a bad spec fails here, before any work
        check_output_dir(self.output_dir, "--output_dir")


def check_reference_models(refs: list[str], reward: RewardSettings) -> None:
    """--reference_models, before anything loads: known specs that can score text (hub ids,
    directories, gguf:, embedded:), each once, and a critic that fits one of them."""
    flag = "--reference_models"
    if not refs:
        raise TDRewardError(f"{flag} names no model")
    if len(set(refs)) != len(refs):
        raise TDRewardError(f"{flag} names a model twice")
    for ref in refs:
        try:
            spec = parse_spec(ref)  # an unknown prefix fails here
        except TDRewardError as e:
            raise TDRewardError(f"{flag}: {e}") from e
        if spec.kind not in ("hf", "gguf", "embedded"):
            hint = (f" (for its weights in transformers give gguf:{spec.target})"
                    if spec.kind == "llamacpp" else
                    " (servers do not return log-probs of a given text)")
            raise TDRewardError(f"{flag} {ref!r} cannot score text here: give a hub id, a "
                                f"directory, gguf:PATH or embedded:NAME{hint}")
        name = (spec.target if spec.kind == "embedded" else
                spec.target.removeprefix("embedded:") if spec.target.startswith("embedded:")
                else None)
        if name is not None:
            from tdreward.backends.embedded import EMBEDDED, is_installed

            if name not in EMBEDDED:
                raise TDRewardError(f"{flag} {ref!r}: unknown embedded model {name!r}; "
                                    f"available: {', '.join(EMBEDDED)}")
            if not is_installed(name):
                raise TDRewardError(f"{flag} {ref!r}: embedded model {name!r} is not "
                                    f"installed; run `{EMBEDDED[name].install}`")
        elif spec.kind == "gguf" and not Path(spec.target).expanduser().is_file():
            raise TDRewardError(f"{flag} {ref!r}: no GGUF file at {spec.target}")
    if reward.reward_model_path:
        meta = reward.check_fits(None, flag)
        from tdreward.backends.model_info import model_dims

        want = (meta["hidden_size"], meta["vocab_size"])
        dims = [model_dims(ref) for ref in refs]
        if all(d is not None and d != want for d in dims):
            raise TDRewardError(
                f"--reward_model_path {reward.reward_model_path} was trained on "
                f"{meta['base_model']} (hidden size {want[0]}, vocabulary {want[1]}), and no "
                f"model of {flag} has those dimensions: add {meta['base_model']} to {flag}")


@dataclass
class ExperimentConfig(CompareConfig):
    """`tdreward experiment`: compare on more samples, with an HTML report of traces."""

    num_samples: int = restate(CompareConfig, "num_samples", 50)
    output_dir: str = restate(CompareConfig, "output_dir", "experiment_out")
    html_report: bool = True
    trace_samples: int = setting(3, help="dopamine traces per model")
    command: str = "experiment"


@dataclass(kw_only=True)
class TestInstructConfig(CompareConfig):
    """`tdreward test-instruct`: an Ollama model (and, --with_base, the reward's reference LM)
    compared. `models` follows from --ollama_model and --with_base."""

    __test__ = False  # not a pytest test class, whatever its name

    ollama_model: str = setting(help="the Ollama model (NAME[:TAG])")
    with_base: bool = setting(False, help="also generate with --base_model and compare")
    models: list[str] = field(default_factory=list, init=False)
    output_dir: str = restate(CompareConfig, "output_dir", "test_instruct_out")
    reference_models: list[str] | None = restate(CompareConfig, "reference_models", flag=False)
    self_score: bool = restate(CompareConfig, "self_score", flag=False)
    self_score_corpus: str | None = restate(CompareConfig, "self_score_corpus", flag=False)
    self_score_config: str | None = restate(CompareConfig, "self_score_config", flag=False)
    self_score_chars: int = restate(CompareConfig, "self_score_chars", flag=False)
    command: str = "test-instruct"

    def __post_init__(self, *flat) -> None:
        name = self.ollama_model.removeprefix("ollama:")
        if not name:
            raise TDRewardError("--ollama_model is empty")
        self.models = [f"ollama:{name}"] + ([self.base_model] if self.with_base else [])
        super().__post_init__(*flat)


__all__ = ["DEFAULT_MODELS", "GENERATION_RULES", "CompareConfig", "ExperimentConfig",
           "GenerationSettings", "ServerSettings", "TestInstructConfig",
           "check_reference_models", "restate"]
