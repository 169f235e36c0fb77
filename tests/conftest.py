"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models built on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# 12 WikiText-2 test articles shipped with the repository (data/README.md: source, licence).
WIKITEXT = REPO / "data" / "wikitext-2" / "wiki.test.small.raw"
EMBEDDED = "embedded:smollm2-135m-instruct"

# Tests never reach a hub: everything comes from packages, the cache or tmp files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(*args: str, env: dict | None = None, timeout: float = 300,
            cwd: str | os.PathLike | None = None, stdin: str | None = None
            ) -> subprocess.CompletedProcess:
    """`tdreward ARGS` as a user runs it: a real subprocess."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "tdreward.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=e, cwd=cwd,
                          input=stdin if stdin is not None else "")


def assert_one_line_error(p: subprocess.CompletedProcess, *words: str) -> None:
    """Bad input: exit code 2 and exactly one line on stderr, `tdreward: error: ...`, holding
    each of `words`."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("tdreward: error:"), p.stderr
    for w in words:
        assert w in lines[0], p.stderr


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2 (model, tokenizer), loaded once."""
    from tdreward.backends.hf import load_model

    return load_model(EMBEDDED)


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


def make_tiny_lm(vocab_size: int, seed: int = 0, max_positions: int = 256, hidden_size: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_lm(tokenizer):
    lm = make_tiny_lm(len(tokenizer))
    lm.config.pad_token_id = tokenizer.pad_token_id
    return lm


@pytest.fixture(scope="session")
def wikitext_text() -> str:
    return WIKITEXT.read_text(encoding="utf-8")
