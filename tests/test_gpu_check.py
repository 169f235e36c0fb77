"""benchmarks/gpu_check.py, the script for a lent GPU, run here as a user runs it: a real
subprocess on the CPU with the tiny random Llama, every check for real (scoring, one
train-critic epoch, one PPO step with LoRA, one lora step), nothing mocked. So the script a
GPU session gets minutes for is known to run before the GPU is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SMOKE = ["--device", "cpu", "--dtype", "float32", "--size", "tiny", "--rounds", "2",
         "--seq_len", "64", "--batch_size", "4", "--new_tokens", "8"]
COLUMNS = ["check", "model", "device", "dtype", "tokens/s", "peak GiB", "seconds", "finite",
           "TD/bare"]
CHECKS = ["score: forward, logits only", "score: forward + log p (bare)",
          "score: TD (score_batch)", "train-critic: 1 epoch", "PPO: 1 step, LoRA",
          "lora: 1 step, TD-weighted"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_cpu_smoke_run_prints_one_table_and_writes_the_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = run(*SMOKE, "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    lines = p.stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if line.split()[:1] == ["check"]]
    assert len(heads) == 1, p.stdout  # one table, nothing from the trainers in between
    assert lines[heads[0]].split("  ")[0] == "check"
    assert [c for c in COLUMNS if c not in lines[heads[0]]] == []
    body = lines[heads[0] + 2 : heads[0] + 2 + len(CHECKS)]
    for name, row in zip(CHECKS, body):
        assert row.startswith(name), (name, row)
        assert "llama-tiny" in row and " cpu " in row and " float32 " in row, row
        assert " yes " in row or row.rstrip().endswith("yes"), row
    assert lines[heads[0] + 2 + len(CHECKS)] == ""  # the table ends there
    assert "TD / bare throughput (ratio of medians)" in p.stdout
    assert "all checks passed" in p.stdout

    result = json.loads(out.read_text())
    assert result["ok"] is True
    assert [c["check"] for c in result["checks"]] == CHECKS
    assert all(c["finite"] is True and "error" not in c for c in result["checks"])
    assert isinstance(result["td_bare_ratio"], float) and result["td_bare_ratio"] > 0
    assert result["goal"] == 0.9 and isinstance(result["goal_met"], bool)
    for c in result["checks"]:
        tok_s = c["tokens_per_s"]
        tok_s = tok_s["median"] if isinstance(tok_s, dict) else tok_s
        assert tok_s > 0 and c["seconds"] > 0 and c["peak_gib"] > 0, c
    td = result["checks"][2]
    assert td["td_bare_ratio"] == result["td_bare_ratio"]
    assert td["logp_max_abs_diff"] <= 1e-3  # the TD path's log p is the bare forward's
    assert len(td["times_s"]) == 2 and td["tokens_per_s"]["n"] == 2  # --rounds 2
    assert result["checks"][4]["stats"]["nan_skipped"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_a_one_line_error():
    p = run("--json", "unused.json", timeout=120)  # --device cuda is the default
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.py: error: --device cuda"), p.stderr
    assert "CUDA is not available" in lines[0] and p.stdout == ""


@pytest.mark.parametrize("bad, words", [
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--size", "huge"], "--size"),
    (["--json", "/nonexistent-folder/out.json"], "does not exist"),
])
def test_bad_flags_are_one_line_errors(bad, words):
    p = run("--device", "cpu", "--dtype", "float32", "--size", "tiny", *bad, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.py: error:"), p.stderr
    assert words in lines[0]
