"""Data parallelism under `accelerate launch` (docs/distributed.md), with real processes: two
CPU processes over gloo, each scoring (or reading for the critic's features) its share of a
small WikiText corpus, against one plain process on the same corpus.

The launcher: `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate
1.16 (its CPU mode expects MPI), so the tests launch with `--multi_gpu`, which runs torchrun
with 2 processes; on a machine without GPUs tdreward then joins them over gloo
(tdreward.parallel.current_ranks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import EMBEDDED, REPO, WIKITEXT, run_cli
from tdreward.parallel import split_contiguous

pytestmark = pytest.mark.integration

# Every process, launched or plain, computes with one thread: the comparison is about how the
# work is split, and accelerate gives each launched process one thread anyway.
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
ACCELERATE = Path(sys.executable).with_name("accelerate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(*args: str, processes: int = 2, config: Path | None = None) -> list[str]:
    head = [str(ACCELERATE), "launch"]
    head += ["--config_file", str(config)] if config else ["--multi_gpu", "--num_machines", "1",
                                                          "--dynamo_backend", "no"]
    return [*head, "--num_processes", str(processes), "--mixed_precision", "no",
            "--main_process_port", str(free_port()), "-m", "tdreward.cli", *args]


def launch(*args: str, config: Path | None = None, timeout: float = 300):
    return subprocess.run(launch_cmd(*args, config=config), capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **ENV))


def plain(*args: str, timeout: float = 300):
    return run_cli(*args, env=ENV, timeout=timeout)


def plain_checked(*args: str, timeout: float = 300):
    """`tdreward ARGS` in a plain process that then says whether anything joined a process
    group or set up accelerate's state: without the launcher nothing should."""
    code = ("import sys, torch.distributed as d; from tdreward.cli import main; "
            "rc = main(sys.argv[1:]); from accelerate.state import PartialState; "
            "print('PROCESS GROUP', d.is_initialized(), PartialState._shared_state != {}); "
            "sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, **ENV))
    assert "PROCESS GROUP False False" in p.stdout, (p.stdout[-1000:], p.stderr[-2000:])
    return p


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six WikiText articles, each its title and about 300 characters (60-95 tokens)."""
    from tdreward.data.corpus import split_wikitext_articles

    arts = split_wikitext_articles(WIKITEXT.read_text(encoding="utf-8"))[:6]
    cut = []
    for a in arts:
        title, _, body = a.partition("\n")
        cut.append(title + "\n" + body[:300].rsplit(" ", 1)[0])
    path = tmp_path_factory.mktemp("corpus") / "small.raw"
    path.write_text("\n".join(cut) + "\n", encoding="utf-8")
    return path


def leftovers(folder: Path) -> list[str]:
    """Temporary files (parts, half-written outputs) left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_split_contiguous_balances_weight_and_keeps_order():
    assert split_contiguous([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert split_contiguous([10, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 5)]
    assert split_contiguous([5], 3) == [range(0, 0), range(0, 1), range(1, 1)]
    assert split_contiguous([], 2) == [range(0, 0), range(0, 0)]
    parts = split_contiguous([3, 1, 4, 1, 5, 9, 2, 6], 3)
    assert [i for r in parts for i in r] == list(range(8))


def test_score_jsonl_two_processes_equals_one(tmp_path, corpus):
    """The issue's check: `--jsonl` on 2 processes is byte for byte the 1-process file: same
    order, same per-token values and summaries (each batch of texts is scored identically
    whichever process gets it), and nothing is left behind."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["score", "--model", EMBEDDED, "--documents", "--file", str(corpus),
            "A rat pressed the lever.", "--batch_size", "2", "--verbose"]
    t0 = time.perf_counter()
    one = plain_checked(*args, "--jsonl", str(out / "one.jsonl"))
    t1 = time.perf_counter()
    two = launch(*args, "--jsonl", str(out / "two.jsonl"))
    t2 = time.perf_counter()
    print(f"\nscore --jsonl, 7 texts: 1 process {t1 - t0:.1f} s, 2 processes {t2 - t1:.1f} s")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    # Both processes scored a share, and the table is printed once, by the main process.
    assert "process 0 of 2:" in two.stderr and "process 1 of 2:" in two.stderr, two.stderr
    assert two.stdout.count("TD reward") == 1 and "small.raw #6" in two.stdout
    a = (out / "one.jsonl").read_text(encoding="utf-8").splitlines()
    b = (out / "two.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(x) for x in a]
    assert [r["index"] for r in rows] == list(range(7))
    assert rows[0]["source"] is None and rows[0]["document"] is None
    assert [r["document"] for r in rows[1:]] == list(range(6))
    assert {r["source"] for r in rows[1:]} == {str(corpus)}
    assert rows[1]["name"] == "small.raw #1" and rows[1]["tokens"][0]["token"] == " ="
    for r in rows:  # the keys --json writes for one text
        assert set(r) >= {"summary", "state_names", "tokens"}
        assert len(r["tokens"]) == r["summary"]["n_tokens"]
    assert [json.loads(x) for x in b] == rows  # every float equal, not close
    assert a == b
    assert leftovers(out) == []


def test_killed_process_leaves_no_output_and_the_rerun_sweeps_its_part(tmp_path, corpus):
    """One process killed mid-run: the launcher stops the other (SIGTERM), which removes its
    half-written output; the killed one's part is swept by the next write of the output."""
    out = tmp_path / "k.jsonl"
    args = ["score", "--model", EMBEDDED, "--documents", "--file", str(corpus), "--batch_size",
            "1", "--jsonl", str(out)]
    p = subprocess.Popen(launch_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, **ENV))
    deadline = time.monotonic() + 240
    killed = None
    while time.monotonic() < deadline and p.poll() is None and killed is None:
        for part in tmp_path.glob(".k.jsonl.pid*.rank1.*.tmp"):
            # The part's name carries its owner's pid (tdreward.cache_files.temp_prefix).
            pid = int(part.name.split(".pid", 1)[1].split("-", 1)[0])
            os.kill(pid, signal.SIGKILL)
            killed = part
        time.sleep(0.02)
    _, err = p.communicate(timeout=120)
    assert killed is not None, f"the second process never started its share: {err[-2000:]}"
    assert p.returncode != 0
    assert not out.exists()
    assert [x.name for x in tmp_path.glob(".k.jsonl*")] == [killed.name], leftovers(tmp_path)
    again = plain(*args)  # one process is enough to sweep: any write of the output does
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(out.read_text(encoding="utf-8").splitlines()) == 6
    assert leftovers(tmp_path) == []


def test_score_bad_input_under_launch_and_plain(tmp_path, capsys):
    """Under the launcher score needs --jsonl (each process says so in one line, before any
    model loads); plain, --jsonl refuses the outputs that hold every trace at once; and
    `score --help` imports neither accelerate nor torch."""
    from tdreward.cli import main

    p = launch("score", "--model", EMBEDDED, "hi", timeout=120)
    assert p.returncode != 0
    errors = [x for x in p.stderr.splitlines() if x.startswith("tdreward: error:")]
    assert errors and all("under accelerate launch (2 processes)" in x and "--jsonl" in x
                          for x in errors), p.stderr[-2000:]
    capsys.readouterr()
    for argv, words in (
            (["hi", "--jsonl", str(tmp_path / "a.jsonl"), "--json", str(tmp_path / "a.json")],
             ("--jsonl", "--json")),
            (["hi", "--documents"], ("--documents", "--file")),
            (["--documents", "--file", str(tmp_path / "none.raw"), "--jsonl",
              str(tmp_path / "b.jsonl")], ("not found",))):
        assert main(["score", "--model", EMBEDDED, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tdreward: error:"), err
        assert all(w in err[0] for w in words), err
    assert list(tmp_path.iterdir()) == []
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "tdreward.cli", "score",
                        "--help"], capture_output=True, text=True, timeout=60)
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines()}
    assert "torch" not in imported and "accelerate" not in imported


def test_train_critic_feature_cache_two_processes_equals_one(tmp_path, corpus):
    """train-critic's LM pass split over 2 processes: the cache the main process writes holds
    exactly the 1-process tensors, and the heads trained on it (main process only) are the
    same."""
    args = ["train-critic", "--base_model", EMBEDDED, "--dataset", str(corpus), "--max_tokens",
            "400", "--epochs", "1", "--lm_batch_size", "2", "--verbose"]
    t0 = time.perf_counter()
    one = plain_checked(*args, "--output_dir", str(tmp_path / "one"))
    t1 = time.perf_counter()
    two = launch(*args, "--output_dir", str(tmp_path / "two"))
    t2 = time.perf_counter()
    print(f"\ntrain-critic, 400 tokens, 1 epoch: 1 process {t1 - t0:.1f} s, 2 processes "
          f"{t2 - t1:.1f} s")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on process 0 of 2" in two.stderr and "on process 1 of 2" in two.stderr
    assert two.stdout.count("held-out:") == 1  # trained and reported by the main process
    from safetensors import safe_open
    from safetensors.torch import load_file

    fa, fb = (tmp_path / d / "cache" / "features.safetensors" for d in ("one", "two"))
    a, b = load_file(str(fa)), load_file(str(fb))
    assert a.keys() == b.keys() >= {"input_ids", "hidden", "logp", "entropy", "expected_c",
                                    "offsets", "log_p0"}
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with safe_open(str(fa), "pt") as x, safe_open(str(fb), "pt") as y:
        assert x.metadata() == y.metadata()  # the same cache key
    ca, cb = (load_file(str(tmp_path / d / "critic.safetensors")) for d in ("one", "two"))
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    assert leftovers(tmp_path / "two" / "cache") == []


def test_shipped_accelerate_configs():
    """examples/accelerate/*.yaml are accelerate config files of the kinds they claim (the
    runs themselves need GPUs and, for DeepSpeed, the deepspeed package: docs/distributed.md)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    fsdp = load_config_from_file(str(REPO / "examples" / "accelerate" / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_version"] == 2
    ds = load_config_from_file(str(REPO / "examples" / "accelerate" / "deepspeed_zero2.yaml"))
    assert ds.distributed_type == DistributedType.DEEPSPEED
    assert ds.deepspeed_config["zero_stage"] == 2
