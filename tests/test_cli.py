"""The command line, run as a user runs it (a real subprocess on the embedded SmolLM2)."""

from __future__ import annotations

import json
import time

import pytest

from conftest import EMBEDDED, assert_one_line_error, run_cli

pytestmark = pytest.mark.integration


def run(*args: str, env: dict | None = None, timeout: float = 300):
    return run_cli(*args, env=env, timeout=timeout)


def test_version_help_and_models():
    assert run("--version").stdout.startswith("tdreward ")
    assert "score" in run("--help").stdout
    out = run("models").stdout
    assert "embedded:smollm2-135m-instruct" in out and "embedded:gemma3-270m" in out
    assert "gguf:PATH" in out


def test_score_json_html_plot(tmp_path, smollm2):
    a = "The rat pressed the lever and a drop of sugar water arrived after a short delay."
    b = "The rat pressed the lever and a drop of salty water arrived after a short delay."
    out = tmp_path / "out.json"
    p = run("score", "--model", EMBEDDED, a, b, "--json", str(out), "--html",
            str(tmp_path / "t.html"), "--plot", str(tmp_path / "t.png"))
    assert p.returncode == 0, p.stderr
    assert "untrained" in p.stderr  # no critic given: says V and delta are not meaningful yet
    # The table names each text by its first words (both start alike: numbered), in full
    # although stdout is a pipe.
    assert "The rat pressed… (1)" in p.stdout and "The rat pressed… (2)" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["model"] == EMBEDDED
    ta, tb = doc["texts"]
    assert set(ta["summary"]) >= {"td_reward", "mean_r", "return", "perplexity", "n_tokens"}
    tok = smollm2[1]
    # Every token is scored, the first too: texts are read after a prefix token (BOS, else
    # EOS), as lm-evaluation-harness reads them.
    ids = tok(a, add_special_tokens=False)["input_ids"]
    assert len(ta["tokens"]) == ta["summary"]["n_tokens"] == len(ids)
    assert [t["token"] for t in ta["tokens"]] == [tok.decode([i]) for i in ids]
    row = ta["tokens"][0]
    assert set(row) == {"token", "logp", "c", "H", "r", "rbar", "V", "delta", "belief"}
    # The texts differ in one token: r differs there and nowhere before.
    k = next(i for i, (x, y) in enumerate(zip(ta["tokens"], tb["tokens"]))
             if x["token"] != y["token"])
    assert ta["tokens"][k]["r"] != pytest.approx(tb["tokens"][k]["r"], abs=1e-4)
    for i in range(k):
        assert ta["tokens"][i]["r"] == pytest.approx(tb["tokens"][i]["r"], abs=1e-4)
    # rbar_t is what the LM expects before it sees x_{t+1}: equal up to and including k.
    for i in range(k + 1):
        assert ta["tokens"][i]["rbar"] == pytest.approx(tb["tokens"][i]["rbar"], abs=1e-4)
    for t in ta["tokens"]:
        assert sum(t["belief"]) == pytest.approx(1.0, abs=1e-5)
    html = (tmp_path / "t.html").read_text()
    assert html.startswith("<!doctype html>")
    assert "logp = " in html and "rbar = " in html and "delta = " in html  # per-token tooltips
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("score", "--model", "foo:bar", "hi"), ("unknown model spec prefix",)),
        (("score", "--model", "gguf:/no/such/file.gguf", "hi"), ("not found",)),
        (("score", "--file", "/no/such/text.txt"), ("not found",)),
        (("score", "--model", "embedded:nope", "hi"), ("unknown embedded model",)),
    ],
)
def test_bad_input_gives_one_line_error(args, words):
    assert_one_line_error(run(*args), *words)


def test_non_utf8_file_and_truncated_gguf(tmp_path, smollm2):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    assert_one_line_error(run("score", "--file", str(bad)), "UTF-8", "byte offset 3")
    from tdreward.backends.embedded import gguf_path

    trunc = tmp_path / "trunc.gguf"
    with gguf_path("smollm2-135m-instruct").open("rb") as f:
        trunc.write_bytes(f.read(1 << 20))
    assert_one_line_error(run("score", "--model", f"gguf:{trunc}", "hi"), "truncated or corrupt")
    assert_one_line_error(run("score", "--model", f"gguf:{bad}", "hi"), "not a GGUF file")


def test_unreachable_hub_model_fails_fast():
    env = {k: "" for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    start = time.monotonic()
    p = run("score", "--model", "no-such-org/no-such-model", "hi", env=env, timeout=60)
    assert time.monotonic() - start < 30
    assert_one_line_error(p, "no-such-org/no-such-model", "embedded:")
