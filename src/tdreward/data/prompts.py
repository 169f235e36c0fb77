"""Prompt sets (JSON Lines with a `prompt` key, or plain text with one prompt per line), and
the one rule for how a prompt reaches a model (`format_prompt`).

Prompt formats: `auto` wraps a prompt as a user turn in the model's chat template when the
model has one (instruction-tuned models) and passes it raw otherwise; `chat` always wraps it
(an error without a template); `raw` never does. A chat-formatted prompt is tokenised without
added special tokens (the template writes its own BOS where the model wants one), a raw one
with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tdreward.data.corpus import iter_jsonl, read_text_file
from tdreward.errors import TDRewardError

PROMPT_SUFFIXES = (".jsonl", ".txt")
PROMPT_FORMATS = ("auto", "chat", "raw")


@dataclass
class PromptExample:
    """A prompt, with the reference completion when the file gives one."""

    prompt: str
    completion: str | None = None


def _from_jsonl(path: Path) -> list[PromptExample]:
    examples = []
    for number, record in iter_jsonl(path):
        if "prompt" not in record:
            raise TDRewardError(
                f"{path}, line {number}: missing 'prompt' key; "
                'each line must look like {"prompt": "...", "completion": "..."}'
            )
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise TDRewardError(f"{path}, line {number}: 'prompt' must be a non-empty string")
        completion = record.get("completion", record.get("response"))
        if completion is not None and not isinstance(completion, str):
            raise TDRewardError(f"{path}, line {number}: 'completion' must be a string")
        examples.append(PromptExample(prompt=prompt, completion=completion))
    return examples


def load_prompts(path: str) -> list[PromptExample]:
    """Load prompts from a .jsonl file (`prompt`, optional `completion`/`response`) or a .txt file."""
    file = Path(path).expanduser()
    if not file.exists():
        raise TDRewardError(f"prompt file not found: {path}; check the path")
    if file.is_dir():
        raise TDRewardError(f"{path} is a folder; pass a .jsonl or .txt prompt file")
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        examples = _from_jsonl(file)
    elif suffix == ".txt":
        # Blank lines separate nothing here; they are simply skipped.
        lines = read_text_file(file).split("\n")
        examples = [PromptExample(prompt=line.strip()) for line in lines if line.strip()]
    else:
        raise TDRewardError(
            f"unsupported prompt file type {suffix or '(no extension)'!r} for {path}; "
            f"supported: {', '.join(PROMPT_SUFFIXES)}"
        )
    if not examples:
        raise TDRewardError(f"prompt file {path} is empty; add at least one prompt")
    return examples


# --------------------------------------------------------------------------- prompt format
def has_chat_template(tokenizer) -> bool:
    """Whether a transformers tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat(mode: str, has_template: bool, model: str = "this tokenizer",
             fix: str = "use --prompt_format raw or auto") -> bool:
    """Whether a prompt is wrapped as a chat turn: auto = when the model has a chat template,
    chat = always (a TDRewardError naming `model` and `fix` when it has none), raw = never."""
    if mode not in PROMPT_FORMATS:
        raise TDRewardError(
            f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {mode!r}")
    if mode == "chat" and not has_template:
        raise TDRewardError(f"{model} has no chat template; {fix}")
    return mode == "chat" or (mode == "auto" and has_template)


def format_prompt(tokenizer, prompt: str | Sequence[Mapping[str, str]], mode: str = "auto", *,
                  tokenize: bool = False, model: str = "this tokenizer",
                  fix: str = "use --prompt_format raw or auto") -> str | list[int]:
    """A prompt as a transformers model reads it: the text, or its token ids (`tokenize`).

    `prompt` is a text (wrapped as one user turn) or a conversation (a list of
    {"role", "content"} messages; raw, its contents joined by newlines). In chat form the
    template's assistant header follows, so the model answers; see the module docstring for
    the modes and the special tokens.
    """
    chat = use_chat(mode, has_chat_template(tokenizer), model, fix)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if chat:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in messages)
    if not tokenize:
        return text
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]
