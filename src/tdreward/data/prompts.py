"""Prompt sets: JSON Lines with a `prompt` key, or plain text with one prompt per line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tdreward.data.corpus import _iter_jsonl, read_text_file
from tdreward.errors import TDRewardError

PROMPT_SUFFIXES = (".jsonl", ".txt")


@dataclass
class PromptExample:
    """A prompt, with the reference completion when the file gives one."""

    prompt: str
    completion: str | None = None


def _from_jsonl(path: Path) -> list[PromptExample]:
    examples = []
    for number, record in _iter_jsonl(path):
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
