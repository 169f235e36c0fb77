"""train-critic (issue 4): TD(lambda) learns exact returns, resumes after SIGKILL exactly,
and refuses corpora it cannot train on with one line."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_lm
from tdreward.reward.config import RewardConfig
from tdreward.reward.td import discounted_return
from tdreward.reward_model import TDRewardModel
from tdreward.training.critic_trainer import CriticTrainingConfig, train_critic

WORDS = ["river", "stone", "lamp", "quiet", "orbit", "velvet", "cedar", "harbor", "signal", "maple", "copper", "violin", "thunder", "meadow", "prism", "falcon", "lantern", "glacier", "ember", "saddle"]


def _templates(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def _exact_returns(rm: TDRewardModel, texts: list[str]):
    """V(s_t) and the exact discounted return of every non-terminal state of each text,
    when each text's end is terminal: G_t = sum_k gamma^k r_{t+k}."""
    ids, mask = rm.pad(rm.encode(texts))
    done = rm.terminal_states(ids, mask, terminal_at_end=True)
    out = rm.score_batch(ids, mask, done=done)
    v_all, g_all = [], []
    for b in range(len(texts)):
        n = int(mask[b].sum())
        r = out["r"][b, : n - 1]
        for t in range(n - 1):
            g_all.append(float(discounted_return(r[None, t:], torch.ones(1, n - 1 - t),
                                                 rm.config.gamma)))
            v_all.append(float(out["values"][b, t]))
    return torch.tensor(v_all), torch.tensor(g_all)


def test_td_lambda_learns_exact_discounted_returns(tokenizer, tmp_path):
    """Six word sequences, each repeated: every state recurs, its return is fixed and known."""
    texts = _templates(6, 12, seed=1)
    docs = texts * 8
    lm = make_tiny_lm(len(tokenizer), seed=3)
    lm.config.pad_token_id = tokenizer.pad_token_id
    rm = TDRewardModel.from_lm(lm, tokenizer, "tiny")
    cfg = CriticTrainingConfig(
        base_model="tiny", dataset="synthetic", output_dir=str(tmp_path / "critic"),
        epochs=25, batch_size=8, lr=1e-2, reward=RewardConfig(gamma=0.9, td_lambda=0.9),
        window=32, doc_end_terminal=True, patience=100, val_fraction=0.15, seed=0,
    )
    metrics = train_critic(cfg, rm=rm, docs=docs, progress=False)
    trained = TDRewardModel.from_pretrained(tmp_path / "critic", lm=lm, tokenizer=tokenizer)
    v, g = _exact_returns(trained, texts)
    r2 = 1 - float(((g - v) ** 2).mean() / g.var())
    assert r2 >= 0.9, f"R^2 of V against the exact returns: {r2:.3f}"
    # Episodes end at each text's end (terminal): the held-out Monte-Carlo returns are exact.
    assert metrics["validation"]["ev_mc"] > 0.9
    assert metrics["validation"]["ev_mc"] > metrics["untrained_validation"]["ev_mc"] + 0.1


def _tiny_model_dir(tokenizer, path: Path) -> Path:
    lm = make_tiny_lm(len(tokenizer), seed=5)
    lm.config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tdreward.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ | {"HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory):
    return _tiny_model_dir(tokenizer, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, wikitext_text):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(wikitext_text[:6000], encoding="utf-8")
    return path


def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_dir, corpus, tmp_path):
    args = ["train-critic", "--base_model", str(tiny_dir), "--dataset", str(corpus),
            "--epochs", "5", "--window", "32", "--batch_size", "4", "--state", "belief",
            "--patience", "100", "--seed", "3"]
    whole = _cli(*args, "--output_dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tdreward.cli", *args, "--output_dir",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoint" / "checkpoint.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and json.loads(ckpt.read_text())["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    killed_at = json.loads(ckpt.read_text())["epoch"]
    assert 2 <= killed_at < 5

    resumed = _cli(*args, "--output_dir", str(out), "--verbose")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {killed_at}" in resumed.stderr
    assert "reusing the LM feature cache" in resumed.stderr
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert a["epochs"] == b["epochs"]
    wa = load_file(str(tmp_path / "whole" / "critic.safetensors"))
    wb = load_file(str(out / "critic.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_empty_or_too_short_corpus_is_one_line_error(tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of words here.", encoding="utf-8")
    for path, words in ((empty, "empty"), (short, "too few to train a critic")):
        res = _cli("train-critic", "--base_model", str(tiny_dir), "--dataset", str(path),
                   "--output_dir", str(tmp_path / "out"))
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tdreward: error:"), res.stderr
        assert words in lines[0], lines[0]
        assert "Traceback" not in res.stderr
