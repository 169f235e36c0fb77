"""What a reader sees: paired statistics, numbers without "-0.000", percentages, tables that
keep long names whole when piped, named texts in `score`, r and V on separate axes."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tdreward.backends.registry import Generation
from tdreward.commands.compare import print_results
from tdreward.commands.score import print_scores, read_texts
from tdreward.display import fmt_num, fmt_pct, print_table, text_name
from tdreward.evaluation import stats, trace
from tdreward.evaluation.compare import summarise_model
from tdreward.evaluation.model_differences import comparisons
from tdreward.evaluation.report import summary_rows
from tdreward.reward_model import TextScore

SMOL = "embedded:smollm2-135m-instruct"
# A name as long as real GGUF paths get: the table must print it whole, not "gguf:/mod…".
LONG = "gguf:/models/some-organisation/Very-Long-Model-Name-Instruct-v2.5-Q4_K_M.gguf"
# "-0", "-0.000", "-0%": a negative sign on digits that are all zero.
NEGATIVE_ZERO = re.compile(r"-0(\.0*)?(?![\d.e])")
INFO = {"backend": "llamacpp", "prompt_format": "chat", "generated": 0, "from_cache": 0,
        "seconds": 0.0, "new_tokens": 0}


def _model(rewards: list[float], prompts: list[str], seeds: list[int],
           texts: list[str] | None = None) -> dict:
    """A model's summary as compare builds it (summarise_model), from given rewards."""
    texts = texts or [f"answer number {i}" for i in range(len(rewards))]
    gens = [Generation(prompt=p, text=t, seed=s, n_tokens=len(t.split()), chat=True)
            for p, t, s in zip(prompts, texts, seeds)]
    summaries = [{"td_reward": r, "mean_r": r, "return": r, "perplexity": 2.0,
                  "n_tokens": 4, "negative_tokens": int(r < 0)} for r in rewards]
    return summarise_model(gens, summaries, INFO, n_boot=2000)


def _results(models: dict[str, dict]) -> dict:
    return {"reward_model": {"base_model": SMOL, "trained": False, "path": None},
            "models": models, "comparisons": comparisons(models, n_boot=2000)}


# --------------------------------------------------------------------------- statistics
def test_identical_responses_differ_by_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    rewards = list(rng.normal(0, 0.3, 12))
    prompts = [f"prompt {i % 4}" for i in range(12)]  # prompts cycle, as in compare
    seeds = list(range(12))
    same = _model(rewards, prompts, seeds)
    c = comparisons({"before": same, "after": _model(rewards, prompts, seeds)}, n_boot=2000)[0]
    for key in ("td_reward", "words", "tokens"):
        assert c[key]["paired"] is True and c[key]["n_pairs"] == 12
        assert c[key]["diff"] == 0.0 and c[key]["ci95"] == [0.0, 0.0]
    # Resampling each model on its own reports a spread for the same data: what pairing fixes.
    lo, hi = stats.compare_means(rewards, rewards, 2000)["ci95"]
    assert hi - lo > 0.1


def test_paired_ci_is_narrower_for_correlated_samples() -> None:
    rng = np.random.default_rng(1)
    prompt_effect = rng.normal(0, 1.0, 40)  # each prompt moves both models' rewards alike
    a = prompt_effect + rng.normal(0, 0.05, 40)
    b = prompt_effect + 0.1 + rng.normal(0, 0.05, 40)
    paired = stats.compare_paired(list(a), list(b), 2000)
    unpaired = stats.compare_means(list(a), list(b), 2000)
    assert paired["diff"] == pytest.approx(unpaired["diff"])  # all pairs complete
    assert paired["ci95"][1] - paired["ci95"][0] < 0.2 * (unpaired["ci95"][1]
                                                         - unpaired["ci95"][0])
    assert paired["ci95"][0] > 0  # the shift is resolved only by pairing
    assert unpaired["ci95"][0] < 0 < unpaired["ci95"][1]


def test_paired_drops_incomplete_pairs_and_falls_back_without_partners() -> None:
    c = stats.compare_paired([1.0, None, 3.0], [2.0, 5.0, None])
    assert c["n_pairs"] == 1 and c["diff"] == 1.0 and c["ci95"] == [1.0, 1.0]
    prompts = ["p"] * 4
    a = _model([0.1, 0.2, 0.3, 0.4], prompts, [0, 1, 2, 3])
    b = _model([0.1, 0.2, 0.3, 0.4], prompts, [10, 11, 12, 13])  # other seeds: no pairs
    td = comparisons({"a": a, "b": b}, n_boot=2000)[0]["td_reward"]
    assert td["paired"] is False and td["n_pairs"] == 0
    assert "no partner" in td["unpaired_reason"]
    assert td["diff"] == pytest.approx(0.0) and td["ci95"][1] - td["ci95"][0] > 0.05


GEMMA = "embedded:gemma3-270m"


def _with_references(model: dict, by_ref: dict[str, list[float]]) -> dict:
    model["by_reference"] = {r: {"critic": "untrained", "rewards": v} for r, v in by_ref.items()}
    return model


def test_reference_matrix_pairs_by_prompt_and_seed_not_by_position(capsys) -> None:
    """The second model's samples come in another order: differences and the self-preference
    gap pair each sample with the one of the same prompt and seed."""
    from tdreward.evaluation.model_differences import reference_matrix
    from tdreward.evaluation.report import report_html

    rng = np.random.default_rng(3)
    n = 8
    prompts, seeds = [f"prompt {i % 3}" for i in range(n)], list(range(n))
    # Rewards under each reference, per sample i (in a's order): a prompt effect shared by
    # both models plus noise, and each reference kinder to its own model by 0.3.
    effect = rng.normal(0, 1.0, n)
    r = {(m, ref): effect + rng.normal(0, 0.1, n) + (0.3 if m == ref else 0.0)
         for m in (SMOL, GEMMA) for ref in (SMOL, GEMMA)}
    perm = rng.permutation(n)  # b's sample j is a's sample perm[j]
    a = _with_references(_model(list(r[SMOL, SMOL]), prompts, seeds),
                         {ref: list(r[SMOL, ref]) for ref in (SMOL, GEMMA)})
    b = _with_references(_model([r[GEMMA, SMOL][i] for i in perm], [prompts[i] for i in perm],
                                [seeds[i] for i in perm]),
                         {ref: [r[GEMMA, ref][i] for i in perm] for ref in (SMOL, GEMMA)})
    mat = reference_matrix({SMOL: a, GEMMA: b}, n_boot=2000)
    assert mat["references"] == [SMOL, GEMMA]
    assert mat["cells"][SMOL][SMOL]["own"] and mat["cells"][GEMMA][GEMMA]["own"]
    assert not mat["cells"][SMOL][GEMMA]["own"] and not mat["cells"][GEMMA][SMOL]["own"]
    assert mat["cells"][GEMMA][SMOL]["mean"] == pytest.approx(np.mean(r[GEMMA, SMOL]))
    assert mat["cells"][GEMMA][SMOL]["n"] == n
    assert [d["reference"] for d in mat["differences"]] == [SMOL, GEMMA]
    for d in mat["differences"]:
        ref, td = d["reference"], d["td_reward"]
        per_pair = r[GEMMA, ref] - r[SMOL, ref]  # the prompt effect cancels in each pair
        assert td["paired"] and td["n_pairs"] == n
        assert td["diff"] == pytest.approx(np.mean(per_pair))
        assert td["ci95"] == pytest.approx(stats.bootstrap_ci(per_pair, 2000))
        # Paired by position, the prompt effects would stay in: a far wider spread.
        by_position = np.array([r[GEMMA, ref][perm[i]] - r[SMOL, ref][i] for i in range(n)])
        assert np.ptp(by_position) > 3 * np.ptp(per_pair)
    assert mat["differences"][0]["td_reward"]["ci95"][1] < 0  # SMOL's reference prefers SMOL
    assert mat["differences"][1]["td_reward"]["ci95"][0] > 0  # GEMMA's prefers GEMMA
    (gap,) = mat["self_preference"]
    assert (gap["a"], gap["b"], gap["reference_a"], gap["reference_b"]) == \
        (SMOL, GEMMA, SMOL, GEMMA)
    per_pair = (r[SMOL, SMOL] - r[GEMMA, SMOL]) + (r[GEMMA, GEMMA] - r[SMOL, GEMMA])
    assert gap["diff"] == pytest.approx(np.mean(per_pair)) and gap["n_pairs"] == n
    assert gap["ci95"] == pytest.approx(stats.bootstrap_ci(per_pair, 2000))
    assert gap["ci95"][0] > 0.2  # 0.6 built in
    # Shown in the terminal and in the report.
    res = _results({SMOL: a, GEMMA: b}) | {"reference_matrix": mat}
    print_results(res)
    out = capsys.readouterr().out
    assert "TD reward by reference model" in out and f"self-preference {SMOL} vs {GEMMA}" in out
    assert f"under {GEMMA}: {GEMMA} − {SMOL}" in out and f"({n} pairs)" in out
    res |= {"config": {"num_samples": n, "max_new_tokens": 8, "temperature": 0.7,
                       "top_p": 1.0, "seed": 0}, "prompts_file": "prompts.jsonl"}
    page = report_html(res, {})
    assert "TD reward by reference model" in page and "<h3>Self-preference</h3>" in page
    cell = mat["cells"][SMOL][SMOL]
    assert f"{fmt_num(cell['mean'], '.4g')} [" in page and f"n={n} *" in page
    assert not NEGATIVE_ZERO.search(page)
    # Without several references: no matrix, nothing shown.
    assert reference_matrix({SMOL: _model([0.1], ["p"], [0])}) is None


# --------------------------------------------------------------------------- numbers
def test_no_negative_zero_and_shares_as_percentages() -> None:
    assert fmt_num(-1e-5, ".3f") == "0.000"
    assert fmt_num(-0.0, ".4g") == "0"
    assert fmt_num(-4e-6, "+.4f") == "+0.0000"
    assert fmt_num(-0.0012, ".3f") == "-0.001"  # a real negative keeps its sign
    assert fmt_num(None) == "–"
    assert fmt_pct(0.125) == "12.5%" and fmt_pct(1 / 3, 2) == "33.33%"
    m = _model([-0.0, -0.0, -0.0], ["p"] * 3, [0, 1, 2])
    row = summary_rows(_results({SMOL: m}))[0]
    assert str(m["td_reward"]["min"]) == "-0.0"  # what used to print as "-0"
    assert not any(cell.startswith("-0") for cell in row), row
    assert row[8:10] == ["0.0%", "0.0%"]  # -0.0 is not below zero


def test_html_report_shows_percentages_and_pairing() -> None:
    from tdreward.evaluation.report import report_html

    prompts, seeds = ["p1", "p2"], [0, 1]
    res = _results({SMOL: _model([0.1, -0.2], prompts, seeds),
                    LONG: _model([0.1, -0.2], prompts, seeds)})
    res |= {"config": {"num_samples": 2, "max_new_tokens": 8, "temperature": 0.7,
                       "top_p": 1.0, "seed": 0}, "prompts_file": "prompts.jsonl"}
    page = report_html(res, {})
    assert "<td>50.0%</td>" in page and "<td>2 pairs</td>" in page
    assert "<td>0</td><td>[0, 0]</td>" in page  # identical rewards: paired difference 0
    assert not NEGATIVE_ZERO.search(page)


def test_printed_comparison_has_no_negative_zero(capsys) -> None:
    prompts, seeds = ["p1", "p2", "p3"], [0, 1, 2]
    a = _model([0.5, 0.25, 0.125], prompts, seeds)
    b = _model([0.5 - 1e-6, 0.25 - 1e-6, 0.125 - 1e-6], prompts, seeds)
    print_results(_results({SMOL: a, "after": b}))
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("after - "))
    assert not NEGATIVE_ZERO.search(out) and "TD reward +0.0000 [+0.0000, +0.0000]" in line
    assert "(3 pairs)" in line


# --------------------------------------------------------------------------- tables
def test_piped_summary_table_keeps_long_model_names(capsys) -> None:
    prompts, seeds = ["p1", "p2"], [0, 1]
    models = {SMOL: _model([0.1, -0.2], prompts, seeds), LONG: _model([0.3, 0.4], prompts, seeds)}
    print_results(_results(models))  # capsys's stdout is no terminal, as in a pipe
    out = capsys.readouterr().out
    assert SMOL in out and LONG in out and "…" not in out
    assert "50.0%" in out  # the negative share, as a percentage


def test_print_table_widens_only_a_non_terminal_console() -> None:
    import io

    from rich.console import Console
    from rich.table import Table

    table = Table(title="t")
    table.add_column("model")
    table.add_column("value", justify="right")
    table.add_row(LONG * 2, "0.125")
    buf = io.StringIO()
    console = print_table(table, Console(file=buf, width=60))
    assert LONG * 2 in buf.getvalue() and console.width > 2 * len(LONG)


def test_models_command_piped_prints_whole_rows() -> None:
    """The real CLI in a subprocess with its stdout a pipe, not a terminal."""
    env = dict(os.environ, COLUMNS="60")  # a narrow fallback width must not cut the rows
    env.pop("FORCE_COLOR", None)
    p = subprocess.run([sys.executable, "-m", "tdreward.cli", "models"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    from tdreward.backends.embedded import EMBEDDED

    for m in EMBEDDED.values():
        row = next(x for x in p.stdout.splitlines() if f"embedded:{m.name} " in x)
        assert m.description in row and m.package in row
    assert "…" not in p.stdout


# --------------------------------------------------------------------------- score
def _score(n: int, r_scale: float, v_offset: float) -> TextScore:
    rng = np.random.default_rng(n)
    r = list(rng.normal(0, r_scale, n))
    v = list(v_offset + rng.normal(0, 1.0, n))
    delta = [x - 0.01 for x in r]
    return TextScore(token_ids=list(range(n)), tokens=[f"t{i}" for i in range(n)],
                     logp=[-1.0] * n, c=[0.0] * n, H=[1.0] * n, r=r, rbar=[0.0] * n, V=v,
                     delta=delta,
                     belief=[[0.5, 0.5]] * n, state_names=["a", "b"],
                     summary={"td_reward": -1e-5, "mean_r": float(np.mean(r)), "return": 0.0,
                              "perplexity": 3.0, "n_tokens": n})


def test_score_table_names_each_text(tmp_path, capsys) -> None:
    f = tmp_path / "lab_notes.txt"
    f.write_text("The rat pressed the lever.")
    args = argparse.Namespace(text=["Dopamine neurons fire when reward beats the prediction.",
                                    "   "], file=[str(f)])
    texts, names = read_texts(args)
    assert texts == [args.text[0], "The rat pressed the lever."]
    assert names == ["Dopamine neurons fire…", "lab_notes.txt"]
    print_scores([_score(5, 0.1, 5.0), _score(6, 0.1, 5.0)], show_trace=True, names=names)
    out = capsys.readouterr().out
    rows = [x for x in out.splitlines() if "│" in x]
    assert any("Dopamine neurons fire…" in x for x in rows)
    assert any("lab_notes.txt" in x for x in rows)
    assert not NEGATIVE_ZERO.search(out) and "0.0000" in out  # td_reward -1e-5
    assert "lab_notes.txt: t0" in out  # the trace line is named too
    alike = argparse.Namespace(text=["Same start here, then one", "Same start here, then two"],
                               file=[])
    assert read_texts(alike)[1] == ["Same start here… (1)", "Same start here… (2)"]
    assert text_name("short") == "short" and text_name("x" * 50).endswith("…")


def test_plot_puts_r_and_v_on_separate_axes(tmp_path) -> None:
    import matplotlib.pyplot as plt

    # V near 50 and r within ±0.1: on one axis r would be a flat line.
    scores = [_score(30, 0.1, 50.0), _score(20, 0.1, 50.0)]
    fig = trace.plot_figure(scores, SMOL, ["first text", "second"])
    try:
        for k in range(2):
            axes_of = {label: [ax for ax in fig.axes
                               if label in ax.get_legend_handles_labels()[1]
                               and ax.get_subplotspec().colspan.start == k]
                       for label in ("r", "V")}
            (ax_r,), (ax_v,) = axes_of["r"], axes_of["V"]
            assert ax_r is not ax_v
            assert ax_r.get_legend_handles_labels()[1] == ["r", "rbar"]
            assert ax_v.get_legend_handles_labels()[1] == ["V"]
            lo, hi = ax_r.get_ylim()
            assert hi - lo < 2  # r's own scale, not V's
            assert ax_v.get_ylim()[0] > 40  # V's own range (no zero line pulls it down)
        titles = [ax.get_title() for ax in fig.axes]
        assert "first text: TD reward 0.000" in titles  # named, and -1e-5 is not "-0.000"
    finally:
        plt.close(fig)
    trace.write_plot(tmp_path / "t.png", scores, SMOL)
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_example_counts_read_as_words() -> None:
    from tdreward.training.lora_setup import describe_examples

    assert describe_examples(67, "pairs") == "67 prompt/completion pairs"
    assert describe_examples(12, "text") == "12 text examples"
