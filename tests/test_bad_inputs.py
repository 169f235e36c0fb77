"""A battery of bad inputs across the commands: each gives exit 2 and one clear line on stderr,
loads no model, and leaves nothing behind in the working folder.

Most cases run the CLI in-process (`tdreward.cli.main`) with model loading replaced by a
sentinel that fails the test: a bad input that could be checked first must never cost a model
load. A few run as real subprocesses to check the exit code a shell sees.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import EMBEDDED, assert_one_line_error, run_cli
from tdreward import cli

WIKI = "data/wikitext-2/wiki.test.small.raw"


class ModelLoaded(AssertionError):
    pass


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Any model load fails the test (the lazy imports look the functions up at call time)."""
    import tdreward.backends.hf as hf
    import tdreward.reward_model as rm

    def boom(*args, **kwargs):
        raise ModelLoaded(f"a model was loaded for a bad input: {args}")

    monkeypatch.setattr(hf, "load_model", boom)
    monkeypatch.setattr(rm.TDRewardModel, "from_base", classmethod(boom))
    monkeypatch.setattr(rm.TDRewardModel, "from_lm", classmethod(boom))


@pytest.fixture()
def files(tmp_path) -> dict[str, str]:
    """Paths a battery case refers to: a plain file, a folder, a broken critic, a critic that
    does not fit the default model, an empty text file."""
    plain = tmp_path / "plain.txt"
    plain.write_text("some text\n", encoding="utf-8")
    folder = tmp_path / "folder"
    folder.mkdir()
    bad_json = tmp_path / "bad_critic"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json", encoding="utf-8")
    (bad_json / "critic.safetensors").write_bytes(b"\0" * 16)
    other = tmp_path / "other_critic"  # a critic trained on a model of other dimensions
    other.mkdir()
    (other / "config.json").write_text(json.dumps({
        "format": "tdreward-critic", "base_model": "embedded:gemma3-270m", "hidden_size": 640,
        "vocab_size": 262144, "reward_config": {}, "trained": True}), encoding="utf-8")
    save_file({"x": torch.zeros(1)}, str(other / "critic.safetensors"))
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    return {"FILE": str(plain), "DIR": str(folder), "BADCRITIC": str(bad_json),
            "OTHERCRITIC": str(other), "EMPTY": str(empty), "TMP": str(tmp_path)}


OUT = ["--output_dir", "{TMP}/out"]
CASES = [
    # score: numbers
    (["score", "--alpha", "nan", "hi"], ["--alpha", "finite"]),
    (["score", "--beta", "inf", "hi"], ["--beta", "finite"]),
    (["score", "--gamma", "1.5", "hi"], ["--gamma", "[0, 1]"]),
    (["score", "--gamma", "-0.1", "hi"], ["--gamma"]),
    (["score", "--batch_size", "0", "hi"], ["--batch_size", "at least 1"]),
    (["score", "--stride", "0", "hi"], ["--stride"]),
    (["score", "--max_length", "1", "hi"], ["--max_length"]),
    (["score", "--max_length", "64", "--stride", "128", "hi"], ["--stride", "--max_length"]),
    (["score", "--batch_size", "x", "hi"], ["--batch_size", "invalid int"]),
    (["score", "--state", "nope", "hi"], ["--state", "belief"]),
    # score: outputs, critics, specs, texts
    (["score", "--json", "{DIR}", "hi"], ["--json", "directory"]),
    (["score", "--json", "{FILE}/out.json", "hi"], ["--json", "plain.txt"]),
    (["score", "--html", "{FILE}/t.html", "hi"], ["--html"]),
    (["score", "--plot", "{FILE}/t.png", "hi"], ["--plot"]),
    (["score", "--reward_model_path", "{TMP}/nothing", "hi"], ["not a tdreward reward model"]),
    (["score", "--reward_model_path", "{BADCRITIC}", "hi"], ["bad_critic"]),
    (["score", "--reward_model_path", "{OTHERCRITIC}", "--model", EMBEDDED, "hi"],
     ["--model", "hidden size 576", "640"]),
    (["score", "--reward_model_path", "{OTHERCRITIC}", "--state", "csc", "hi"], ["--state"]),
    (["score", "--model", "foo:bar", "hi"], ["unknown model spec prefix"]),
    (["score", "--model", "ollama:llama3", "hi"], ["cannot score text"]),
    (["score", "--file", "{TMP}/no_such.txt"], ["not found"]),
    (["score", "--file", "{EMPTY}"], ["nothing to score"]),
    # train-critic
    (["train-critic", "--dataset", WIKI, "--max_tokens", "-1", *OUT], ["--max_tokens"]),
    (["train-critic", "--dataset", WIKI, "--batch_size", "0", *OUT], ["--batch_size"]),
    (["train-critic", "--dataset", WIKI, "--epochs", "0", *OUT], ["--epochs"]),
    (["train-critic", "--dataset", WIKI, "--lr", "0", *OUT], ["--lr"]),
    (["train-critic", "--dataset", WIKI, "--td_lambda", "2", *OUT], ["--td_lambda"]),
    (["train-critic", "--dataset", WIKI, "--window", "1", *OUT], ["--window"]),
    (["train-critic", "--dataset", WIKI, "--patience", "0", *OUT], ["--patience"]),
    (["train-critic", "--dataset", WIKI, "--gamma", "nan", *OUT], ["--gamma", "finite"]),
    (["train-critic", "--dataset", WIKI, "--state", "bogus", *OUT], ["--state"]),
    (["train-critic", "--dataset", WIKI, "--output_dir", "{FILE}/sub"], ["--output_dir"]),
    (["train-critic", "--dataset", "{TMP}/no_such.txt", *OUT], ["no_such.txt"]),
    (["train-critic", "--dataset", "{EMPTY}", *OUT], ["empty"]),
    # compare / experiment / evaluate
    (["compare", "--num_samples", "0", *OUT], ["--num_samples"]),
    (["compare", "--temperature", "-1", *OUT], ["--temperature"]),
    (["compare", "--top_p", "0", *OUT], ["--top_p"]),
    (["compare", "--concurrency", "0", *OUT], ["--concurrency"]),
    (["compare", "--timeout", "0", *OUT], ["--timeout"]),
    (["compare", "--retries", "-1", *OUT], ["--retries"]),
    (["compare", "--models", EMBEDDED, EMBEDDED, *OUT], ["--models", "twice"]),
    (["compare", "--output_dir", "{FILE}/out"], ["--output_dir"]),
    (["experiment", "--reward_model_path", "{TMP}/nothing", *OUT], ["not a tdreward"]),
    (["experiment", "--reward_model_path", "{OTHERCRITIC}", *OUT], ["--base_model", "640"]),
    (["compare", "--reference_models", EMBEDDED, "ollama:x", *OUT],
     ["--reference_models", "ollama:x", "cannot score text"]),
    (["compare", "--reference_models", "embedded:nope", *OUT],
     ["--reference_models", "unknown embedded model 'nope'"]),
    (["compare", "--reference_models", "bogus:x", *OUT], ["--reference_models", "bogus:"]),
    (["compare", "--reference_models", "gguf:{TMP}/missing.gguf", *OUT],
     ["--reference_models", "no GGUF file"]),
    (["compare", "--reference_models", EMBEDDED, EMBEDDED, *OUT], ["--reference_models", "twice"]),
    (["experiment", "--reference_models", EMBEDDED, "--reward_model_path", "{OTHERCRITIC}", *OUT],
     ["--reward_model_path", "--reference_models", "640"]),
    (["evaluate", "--fine_tuned_model", "ollama:x", "--dataset", WIKI, *OUT],
     ["cannot score text"]),
    (["evaluate", "--fine_tuned_model", "{DIR}", "--dataset", WIKI, "--max_chars", "0", *OUT],
     ["--max_chars"]),
    # train (PPO)
    (["train", "--prompts", "{FILE}", "--kl_coef", "-1", *OUT], ["--kl_coef"]),
    (["train", "--prompts", "{FILE}", "--mini_batch_size", "8", "--batch_size", "4", *OUT],
     ["--mini_batch_size"]),
    (["train", "--prompts", "{FILE}", "--lam", "1.5", *OUT], ["--lam"]),
    (["train", "--prompts", "{FILE}", "--cliprange", "0", *OUT], ["--cliprange"]),
    (["train", *OUT], ["no prompts"]),
    # lora
    (["lora", "--dataset", WIKI, "--lora_dropout", "1", *OUT], ["--lora_dropout"]),
    (["lora", "--dataset", WIKI, "--reward_scale", "2", *OUT], ["--reward_scale"]),
    (["lora", "--dataset", WIKI, "--num_epochs", "0", *OUT], ["--num_epochs"]),
    (["lora", "--dataset", WIKI, "--lr", "nan", *OUT], ["--lr", "finite"]),
    (["lora", "--dataset", WIKI, "--reward_model_path", "{OTHERCRITIC}", *OUT],
     ["--base_model", "640"]),
    # serve-reward
    (["serve-reward", "--host", "0.0.0.0"], ["--host", "--allow_remote"]),
    (["serve-reward", "--port", "70000"], ["--port"]),
    (["serve-reward", "--max_queue", "0"], ["--max_queue"]),
    (["serve-reward", "--base_model", EMBEDDED, "--reward_model_path", "{OTHERCRITIC}"],
     ["--base_model", "640"]),
    # export, ollama, quickstart, parser
    (["export", "--model_path", EMBEDDED, "--outfile", "{DIR}"], ["--outfile", "directory"]),
    (["export", "--model_path", EMBEDDED, "--outfile", "x.gguf", "--outtype", "q4"],
     ["--outtype"]),
    (["ollama", "--action", "run", "--model_name", "x", "--num_samples", "0"],
     ["--num_samples"]),
    (["ollama", "--action", "evaluate", "--model_name", "x", "--output", "{DIR}"],
     ["--output", "directory"]),
    (["quickstart", "--num_samples", "0"], ["--num_samples"]),
    (["score", "--no_such_flag", "hi"], ["unrecognized arguments"]),
    (["no-such-command"], ["invalid choice"]),
]


@pytest.mark.parametrize(("argv", "words"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input(argv, words, files, no_model_loads, capfd, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative outputs would land here: nothing may
    argv = [a.format(**files) for a in argv]
    argv = [str(Path(__file__).resolve().parents[1] / a) if a == WIKI else a for a in argv]
    before = set(Path(files["TMP"]).rglob("*"))
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse exits
        code = e.code
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("tdreward: error:"), err
    for w in words:
        assert w in lines[0], lines[0]
    assert list(work.iterdir()) == []
    assert set(Path(files["TMP"]).rglob("*")) == before, "a bad input left files behind"


def test_battery_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize(("argv", "words"), [
    (["score", "--alpha", "nan", "hi"], ["--alpha"]),
    (["train-critic", "--dataset", WIKI, "--batch_size", "0", "--output_dir", "unused"],
     ["--batch_size"]),
    (["score", "--batch_size", "x", "hi"], ["invalid int"]),
])
def test_bad_input_subprocess(argv, words, tmp_path):
    """The exit code and the one line as a shell sees them."""
    p = run_cli(*argv, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert_one_line_error(p, *words)


def test_debug_and_verbose_before_the_subcommand(tmp_path):
    """`tdreward --debug score ...`: the global flag is not reset by the subcommand."""
    p = run_cli("--debug", "score", "--gamma", "2", "hi", timeout=120)
    assert p.returncode != 0 and "Traceback" in p.stderr
    assert "--gamma" in p.stderr
    p = run_cli("score", "--debug", "--gamma", "2", "hi", timeout=120)
    assert "Traceback" in p.stderr
    p = run_cli("score", "--gamma", "2", "hi", timeout=120)
    assert_one_line_error(p, "--gamma")
    env = {"TDREWARD_TEST_ARGS": "1"}
    from tdreward.cli import build_parser

    args = build_parser().parse_args(["--verbose", "score", "hi"])
    assert args.verbose is True and args.debug is False
    args = build_parser().parse_args(["score", "--verbose", "hi"])
    assert args.verbose is True
    args = build_parser().parse_args(["score", "hi"])
    assert args.verbose is False and args.debug is False
    assert os.environ.get("TDREWARD_TEST_ARGS") is None and env
