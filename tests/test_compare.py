"""compare / experiment / test-instruct / evaluate / quickstart, end to end on real models."""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest

from conftest import make_tiny_lm
from ollama_api_server import serve_ollama_api
from tdreward.backends.embedded import gguf_path
from tdreward.cli import main
from tdreward.evaluation import stats
from tdreward.evaluation.compare import CompareConfig, compare_models, score_responses
from tdreward.reward_model import TDRewardModel

SMOL = "embedded:smollm2-135m-instruct"
GEMMA = "embedded:gemma3-270m"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread: on a small shared machine torch's spinning thread pool is many times
    slower than a single thread (measured on 2 CPUs); llama.cpp already uses one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rm(smollm2):
    model, tok = smollm2
    return TDRewardModel.from_lm(model, tok, SMOL)


def _free_host() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_statistics() -> None:
    x = [-1.0, 0.5, 2.0, 3.5, -0.25, 1.0]
    d = stats.describe(x)
    assert d["n"] == 6 and d["mean"] == pytest.approx(np.mean(x))
    assert d["median"] == pytest.approx(np.median(x))
    assert d["std"] == pytest.approx(np.std(x, ddof=1))
    assert (d["min"], d["max"]) == (-1.0, 3.5)
    lo, hi = d["ci95"]
    assert lo < d["mean"] < hi and lo > min(x) and hi < max(x)
    assert stats.describe(x)["ci95"] == d["ci95"]  # seeded: reproducible
    wide = stats.bootstrap_ci(x[:3])
    narrow = stats.bootstrap_ci(x * 20)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    c = stats.compare_means([0.0, 0.1, -0.1, 0.05], [1.0, 1.1, 0.9, 1.05])
    assert c["diff"] == pytest.approx(1.0) and c["ci95"][0] > 0.8 and c["cohens_d"] > 5
    assert stats.share_negative([-1, 2, None, -3]) == pytest.approx(2 / 3)
    assert stats.describe([None])["n"] == 0


def test_response_scores_count_only_the_response(rm) -> None:
    from tdreward.backends.registry import Generation

    gens = [Generation(prompt="The capital of France is", text=" Paris, a city on the Seine."),
            Generation(prompt="Name a colour.", text="Blue is a colour.", chat=True),
            Generation(prompt="Say nothing.", text="")]
    summaries, traces = score_responses(rm, gens)
    for g, s in zip(gens[:2], summaries[:2]):
        ctx = g.prompt + ("\n" if g.chat else "")
        assert s["td_reward"] == pytest.approx(rm.compute_td_reward(ctx, g.text), abs=1e-5)
    assert summaries[2] is None and traces[2] is None
    assert "".join(traces[0].tokens).strip() == "Paris, a city on the Seine."


def test_compare_cli_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(["compare", "--models", SMOL, GEMMA, "--num_samples", "2", "--max_new_tokens",
               "8", "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["models"]) == [SMOL, GEMMA]
    for m in res["models"].values():
        assert m["backend"] == "llamacpp"
        assert len(m["rewards"]) == 2 and all(isinstance(r, float) for r in m["rewards"])
        assert m["td_reward"]["mean"] == pytest.approx(np.mean(m["rewards"]))
        assert len(m["response_lengths"]["words"]) == 2
        assert all(1 <= t <= 8 for t in m["response_lengths"]["tokens"])
        assert 0 <= m["negative_share"] <= 1
    assert res["models"][SMOL]["prompt_format"] == "chat"  # instruct: its chat template
    assert res["models"][GEMMA]["prompt_format"] == "raw"  # base model: no template
    assert res["comparisons"][0]["a"] == SMOL and res["comparisons"][0]["b"] == GEMMA
    assert "reference_matrix" not in res  # one reference without --reference_models
    assert all("by_reference" not in m for m in res["models"].values())
    # Both models answered the same (prompt, seed) samples: the difference is paired.
    td = res["comparisons"][0]["td_reward"]
    assert td["paired"] is True and td["n_pairs"] == 2
    diffs = [b - a for a, b in zip(res["models"][SMOL]["rewards"],
                                   res["models"][GEMMA]["rewards"])]
    assert td["diff"] == pytest.approx(np.mean(diffs))
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "TD reward" in printed and SMOL in printed and "(2 pairs)" in printed


def _tiny_dir(tmp_path, tokenizer, name: str, seed: int, hidden: int) -> str:
    """A tiny random LM saved as a transformers directory (a spec of its own)."""
    lm = make_tiny_lm(len(tokenizer), seed=seed, hidden_size=hidden)
    lm.config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path / name
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_reference_matrix_scores_every_response_with_every_reference(
        tokenizer, tmp_path, monkeypatch, capsys) -> None:
    """--reference_models A B: each reference scores every model's responses (the cell
    (m, ref) equals scoring m's responses with ref directly), each loads once and is freed
    before the next; the critic of --reward_model_path serves only the reference with its
    dimensions; differences and the self-preference gap are paired by prompt and seed."""
    import gc
    import weakref

    import torch

    from tdreward.evaluation import compare as compare_module
    from tdreward.reward_model import load_reward_model
    from tdreward.reward_settings import RewardSettings

    a = _tiny_dir(tmp_path, tokenizer, "tiny_a", seed=1, hidden=32)
    b = _tiny_dir(tmp_path, tokenizer, "tiny_b", seed=2, hidden=48)  # other dimensions
    critic = tmp_path / "critic_a"  # a "trained" critic on a: random weights, not an untrained one
    crm = load_reward_model(a, RewardSettings(), warn_untrained=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in crm.critic.parameters():
            param.add_(0.2 * torch.randn_like(param))
    crm.trained = True
    crm.save_pretrained(critic)
    del crm

    loaded, alive = [], []
    real_load = compare_module.load_reference

    def load_once(spec, cfg, warn_untrained=True):
        gc.collect()
        assert all(ref() is None for ref in alive), "a reference still in memory"
        loaded.append(spec)
        model = real_load(spec, cfg, warn_untrained)
        alive.append(weakref.ref(model.lm))
        return model

    monkeypatch.setattr(compare_module, "load_reference", load_once)
    out = tmp_path / "exp"
    rc = main(["experiment", "--models", a, b, "--reference_models", a, b,
               "--reward_model_path", str(critic), "--num_samples", "3", "--max_new_tokens",
               "6", "--output_dir", str(out), "--no_cache", "--trace_samples", "1"])
    assert rc == 0
    assert loaded == [b, a]  # each once; the first reference last (kept for the table)
    res = json.loads((out / "results.json").read_text())
    mat = res["reference_matrix"]
    assert mat["references"] == [a, b] and mat["models"] == [a, b]
    assert mat["critics"] == {a: "trained", b: "untrained"}
    assert {(m, r) for m in mat["cells"] for r in mat["cells"][m]} == \
        {(m, r) for m in (a, b) for r in (a, b)}
    scorers = {a: load_reward_model(a, RewardSettings(reward_model_path=str(critic))),
               b: load_reward_model(b, RewardSettings(), warn_untrained=False)}
    rewards = {}
    for m in (a, b):
        model = res["models"][m]
        chat = model["prompt_format"] == "chat"
        for r in (a, b):
            got = model["by_reference"][r]["rewards"]
            want = [scorers[r].compute_td_reward(s["prompt"] + ("\n" if chat else ""),
                                                 s["response"]) for s in model["samples"]]
            assert got == pytest.approx(want, abs=1e-4)
            cell = mat["cells"][m][r]
            assert cell["n"] == 3 and cell["mean"] == pytest.approx(np.mean(want), abs=1e-4)
            assert cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1]
            assert cell["own"] is (m == r)
            rewards[m, r] = np.array(got)
        # The summary table and its comparisons are the first reference's, as without the flag.
        assert model["rewards"] == model["by_reference"][a]["rewards"]
    # A trained critic on a and an untrained one give other rewards for the same responses.
    untrained_a = load_reward_model(a, RewardSettings(), warn_untrained=False)
    s0 = res["models"][a]["samples"][0]
    assert abs(untrained_a.compute_td_reward(s0["prompt"] + "\n", s0["response"])
               - scorers[a].compute_td_reward(s0["prompt"] + "\n", s0["response"])) > 1e-3
    assert [(s["prompt"], s["seed"]) for s in res["models"][a]["samples"]] == \
        [(s["prompt"], s["seed"]) for s in res["models"][b]["samples"]]
    diffs = {d["reference"]: d["td_reward"] for d in mat["differences"]}
    assert [(d["a"], d["b"]) for d in mat["differences"]] == [(a, b), (a, b)]
    for r in (a, b):
        assert diffs[r]["paired"] is True and diffs[r]["n_pairs"] == 3
        assert diffs[r]["diff"] == pytest.approx(np.mean(rewards[b, r] - rewards[a, r]))
    (gap,) = mat["self_preference"]
    assert (gap["reference_a"], gap["reference_b"], gap["n_pairs"]) == (a, b, 3)
    assert gap["diff"] == pytest.approx(np.mean((rewards[a, a] - rewards[b, a])
                                                + (rewards[b, b] - rewards[a, b])))
    page = (out / "report.html").read_text()
    assert "TD reward by reference model" in page and "Self-preference" in page
    printed = capsys.readouterr().out
    assert "self-preference" in printed and "under " in printed


def test_generation_cache_resumes(rm, tmp_path) -> None:
    """An interrupted run (here: the second model's server is down) keeps the finished
    samples; the next run generates only what is missing."""
    from tdreward.errors import TDRewardError

    cfg = CompareConfig(models=[SMOL, "ollama:gone"], num_samples=2, max_new_tokens=6,
                        ollama_host=_free_host(), cache_dir=str(tmp_path / "cache"))
    prompts = ["Name a fruit.", "Name a river.", "Name a tree."]
    with pytest.raises(TDRewardError, match="cannot reach the Ollama server"):
        compare_models(cfg, prompts, rm)
    cfg.models = [SMOL]
    first, _, _ = compare_models(cfg, prompts, rm)
    assert first[SMOL]["generation"]["from_cache"] == 2
    assert first[SMOL]["generation"]["generated"] == 0
    cfg.num_samples = 3
    more, _, _ = compare_models(cfg, prompts, rm)
    assert (more[SMOL]["generation"]["from_cache"], more[SMOL]["generation"]["generated"]) \
        == (2, 1)
    assert [s["response"] for s in more[SMOL]["samples"][:2]] == \
        [s["response"] for s in first[SMOL]["samples"]]
    cfg.temperature = 0.3  # other settings: other samples
    other, _, _ = compare_models(cfg, prompts, rm)
    assert other[SMOL]["generation"]["generated"] == 3
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 6 and not list((tmp_path / "cache").rglob("*.tmp"))


def test_experiment_report_and_self_score(tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Dopamine neurons signal the difference between received and predicted "
                      "reward. " * 12)
    out = tmp_path / "exp"
    rc = main(["experiment", "--models", SMOL, "--num_samples", "3", "--max_new_tokens", "8",
               "--output_dir", str(out), "--no_cache", "--self_score", "--self_score_corpus",
               str(corpus), "--trace_samples", "2"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["command"] == "experiment" and len(res["models"][SMOL]["rewards"]) == 3
    ss = res["self_scores"]["models"][SMOL]
    assert ss["perplexity"] > 1 and ss["bits_per_byte"] > 0 and ss["critic"] == "untrained"
    # Untrained critic: V = rbar + gamma m/(1-gamma), so delta is surprise relative to the LM's
    # own expectation, centred near 0, no longer r (always < 0).
    assert ss["mean_r"] < 0 and abs(ss["td_reward"]) < abs(ss["mean_r"])
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "mean TD reward" in page
    assert page.count("class='tok'") > 5  # dopamine traces of the responses
    assert "Sample 0" in page and "Sample 1" in page and "Self-scores" in page


def test_servers_in_compare_and_test_instruct(tmp_path) -> None:
    """test-instruct against the Ollama API server; a server that is down is one line."""
    with serve_ollama_api({"smollm2": gguf_path("smollm2-135m-instruct")}) as url:
        out = tmp_path / "ti"
        rc = main(["test-instruct", "--ollama_model", "smollm2", "--ollama_host", url,
                   "--num_samples", "2", "--max_new_tokens", "6", "--output_dir", str(out),
                   "--no_cache"])
        assert rc == 0
        res = json.loads((out / "results.json").read_text())
        m = res["models"]["ollama:smollm2"]
        assert m["backend"] == "ollama" and len(m["rewards"]) == 2
        assert all(t <= 6 for t in m["response_lengths"]["tokens"])


def test_server_down_cli_one_line(tmp_path, capsys) -> None:
    host = _free_host()
    rc = main(["compare", "--models", "ollama:llama3", "--ollama_host", host,
               "--output_dir", str(tmp_path), "--no_cache"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and host in err and len(err.splitlines()) == 1
    rc = main(["compare", "--models", f"openai:{host}/v1#m", "--retries", "0",
               "--output_dir", str(tmp_path), "--no_cache"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and host in err and len(err.splitlines()) == 1


def test_evaluate_base_vs_fine_tuned(smollm2, tmp_path) -> None:
    """A 'fine-tune' that is a tiny random model must score far worse than SmolLM2."""
    _, tok = smollm2
    tiny = make_tiny_lm(len(tok), seed=1)
    tiny.config.pad_token_id = tok.pad_token_id
    ft = tmp_path / "tiny"
    tiny.save_pretrained(ft)
    tok.save_pretrained(ft)
    data = tmp_path / "data.txt"
    data.write_text("The river flows through the old town and past the mill where farmers "
                    "bring their grain every autumn.\n\nBees collect nectar from flowers and "
                    "turn it into honey inside the hive during the long summer days.\n")
    out = tmp_path / "ev"
    rc = main(["evaluate", "--base_model", SMOL, "--fine_tuned_model", str(ft), "--dataset",
               str(data), "--num_samples", "2", "--max_new_tokens", "5", "--output_dir",
               str(out), "--no_cache", "--temperature", "0"])
    assert rc == 0
    res = json.loads((out / "evaluation.json").read_text())
    base, tuned = res["dataset_scores"]["base"], res["dataset_scores"]["fine_tuned"]
    assert base["perplexity"] < 200 < tuned["perplexity"]
    assert tuned["critic"] == "untrained" and not math.isnan(tuned["td_reward"])
    assert set(res["models"]) == {SMOL, str(ft)}
    assert res["models"][str(ft)]["backend"] == "transformers"
    assert res["prompts_file"] == str(data)


def test_quickstart_trains_once_then_reuses(tmp_path, capsys) -> None:
    critic = tmp_path / "critic"
    args = ["quickstart", "--critic_dir", str(critic), "--num_samples", "1",
            "--max_new_tokens", "4", "--max_tokens", "700", "--epochs", "3",
            "--output_dir", str(tmp_path / "q"), "--cache_dir", str(tmp_path / "cache")]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "trained now" in first and "Open the report" in first
    assert (critic / "critic.safetensors").is_file() and not (critic / "cache").exists()
    assert json.loads((critic / "config.json").read_text())["trained"] is True
    res = json.loads((tmp_path / "q" / "results.json").read_text())
    assert res["reward_model"]["trained"] and set(res["models"]) == {SMOL, GEMMA}
    assert (tmp_path / "q" / "report.html").is_file()
    from tdreward.recipes.quickstart import QuickstartConfig, ensure_critic

    before = (critic / "critic.safetensors").stat().st_mtime_ns
    assert ensure_critic(QuickstartConfig(critic_dir=str(critic))) == (critic, False)
    assert (critic / "critic.safetensors").stat().st_mtime_ns == before
