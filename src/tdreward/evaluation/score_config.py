"""`tdreward score`'s settings: each field is a flag (tdreward.flags). No heavy imports."""

from __future__ import annotations

from dataclasses import dataclass, field

from tdreward.critic_files import check_state_name
from tdreward.errors import TDRewardError
from tdreward.flags import setting
from tdreward.hardware import HardwareSettings
from tdreward.parallel import world_size
from tdreward.reward_settings import RewardSettings
from tdreward.specs import DEFAULT_MODEL, parse_spec
from tdreward.validation import check_output_file, validate


@dataclass
class ScoreConfig:
    """Everything `tdreward score` takes: each field is a flag (tdreward.flags)."""

    text: list[str] = setting(default_factory=list, help="text(s) to score", positional=True)
    model: str | None = setting(None, help="model spec", default_help=(
        f"the critic's base model with --reward_model_path, else {DEFAULT_MODEL}"))
    file: list[str] = setting(default_factory=list, append=True,
                              help="score a file's text (repeatable)")
    documents: bool = setting(
        False, help="read each --file as a corpus, one text per document "
        "(tdreward.data.load_corpus: WikiText articles split at ' = Title = ' headings, a "
        ".jsonl's records, a .parquet's rows, a folder's files); by default a file is one text")
    reward: RewardSettings = field(default_factory=RewardSettings, metadata={"help": "nested"})
    hardware: HardwareSettings = field(default_factory=HardwareSettings,
                                       metadata={"help": "nested"})
    state: str | None = setting(None, help="state model of an untrained critic: belief, csc, "
                                "hidden", default_help="belief")
    json: str | None = setting(None, help="write the full per-token trace as JSON")
    html: str | None = setting(None, help="write an HTML dopamine trace")
    plot: str | None = setting(None, help="write a PNG of r, V, delta and the belief")
    trace: bool = setting(False, help="print tokens coloured by delta")
    jsonl: str | None = setting(
        None, help="stream one JSON object per text to this file (index, name, source, "
        "document, summary, tokens), written as each batch is scored, so no corpus is too big; "
        "the one output under `accelerate launch`, which splits the texts across processes")
    batch_size: int = setting(8, help="texts per forward pass")
    max_length: int | None = setting(None, help="context window", default_help="the model's")
    stride: int | None = setting(None, help="sliding-window stride for long texts",
                                 default_help="half the window")
    terminal_at_end: bool = setting(
        False, help="treat each text's end as the real end of its document (V = 0 after it); "
        "by default only an EOS token is terminal and a text's end bootstraps from V")
    verbose: bool = False

    def __post_init__(self) -> None:
        validate(self, {"batch_size": ">=1", "max_length": ">=2", "stride": ">=1"})
        if self.stride and self.max_length and self.stride > self.max_length:
            raise TDRewardError(f"--stride ({self.stride}) must not exceed --max_length "
                                f"({self.max_length})")
        if self.state is not None:
            check_state_name(self.state)
            if self.reward.reward_model_path:
                raise TDRewardError("--state cannot change the state model of a trained critic")
        # The critic's own reference LM unless --model names another; a model whose
        # dimensions do not fit the critic fails here, before it is loaded.
        if self.model:  # a server is refused with a critic before the critic is read
            check_scoring_spec(self.model, self.reward.reward_model_path, servers=True)
        meta = self.reward.check_fits(self.model, "--model")
        self.model = self.model or (meta or {}).get("base_model") or DEFAULT_MODEL
        check_scoring_spec(self.model, self.reward.reward_model_path, servers=True)
        check_jsonl_settings(self)
        for name in ("json", "html", "plot", "jsonl"):
            check_output_file(getattr(self, name), f"--{name}")


def check_jsonl_settings(cfg: ScoreConfig) -> None:
    """--jsonl streams: the outputs that hold every text's trace at once do not go with it,
    and several processes (accelerate launch) can only write it."""
    if cfg.documents and not cfg.file:
        raise TDRewardError("--documents splits the --file corpora into texts: give --file")
    if cfg.jsonl:
        held = [f"--{n}" for n in ("json", "html", "plot", "trace") if getattr(cfg, n)]
        if held:
            raise TDRewardError(f"--jsonl streams texts one batch at a time and cannot be "
                                f"combined with {', '.join(held)} (they hold every trace at once)")
    elif world_size() > 1:
        raise TDRewardError(f"under accelerate launch ({world_size()} processes) score writes "
                            "--jsonl OUT only: give --jsonl")


def check_scoring_spec(model: str, reward_model_path: str | None = None,
                       servers: bool = False) -> None:
    """Refuse a spec that cannot score text. With `servers` (tdreward score), an
    openai:URL#MODEL server scores from its prompt log-probs (evaluation/server_score.py),
    but not with a trained critic: that needs the LM's hidden states, which no server sends."""
    spec = parse_spec(model)
    if servers and spec.kind == "openai":
        if reward_model_path:
            raise TDRewardError(f"--reward_model_path cannot score through the server {model!r}: "
                                "a trained critic reads the LM's hidden states, which servers do "
                                "not return; use a local model spec")
        return
    if not spec.can_score or spec.kind == "llamacpp":
        raise TDRewardError(
            f"{model!r} cannot score text here: use a hub id, a directory, gguf:PATH, "
            "embedded:NAME" + (" or openai:URL#MODEL (a server that returns prompt log-probs)"
                               if servers else " (servers do not return log-probs of a given "
                               "text)")
        )
