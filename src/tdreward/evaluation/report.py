"""Views of a comparison: a bar + box plot PNG and a self-contained HTML report (the table,
the plot, sample responses and per-sample dopamine traces from tdreward.evaluation.trace)."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from tdreward.display import fmt_num, fmt_pct
from tdreward.evaluation import trace
from tdreward.io import atomic_path, write_text
from tdreward.reward_model import TextScore


def _short(model: str) -> str:
    return model.removeprefix("embedded:")


def write_comparison_plot(path: str | os.PathLike, results: dict) -> None:
    """Three panels: mean TD reward with its 95% CI (bars), the per-sample TD rewards (box),
    the response lengths in words (box)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = results["models"]
    names = list(models)
    labels = [_short(m) for m in names]
    x = np.arange(len(names))
    matrix = results.get("reference_matrix")
    panels = 3 + (matrix is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5 + 2.6 * len(names) * panels / 3, 4.4))
    ax = axes[0]
    means = [models[m]["td_reward"]["mean"] or 0.0 for m in names]
    lo = [m - (models[n]["td_reward"]["ci95"][0] if models[n]["td_reward"]["ci95"][0]
               is not None else m) for m, n in zip(means, names)]
    hi = [(models[n]["td_reward"]["ci95"][1] if models[n]["td_reward"]["ci95"][1]
           is not None else m) - m for m, n in zip(means, names)]
    colours = [f"C{i}" for i in range(len(names))]
    ax.bar(x, means, yerr=[lo, hi], capsize=6, color=colours, alpha=0.8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xticks=x, ylabel="mean TD reward (95% bootstrap CI)", title="TD reward")
    ax.set_xticklabels(labels, rotation=15, ha="right")
    rng = np.random.default_rng(0)
    for ax, key, title in ((axes[1], "rewards", "TD reward per sample"),
                           (axes[2], "words", "response length (words)")):
        data = [[v for v in (models[m]["rewards"] if key == "rewards"
                             else models[m]["response_lengths"]["words"]) if v is not None]
                for m in names]
        ax.boxplot([d if d else [np.nan] for d in data], positions=x, widths=0.5,
                   showmeans=True)
        for i, d in enumerate(data):  # every sample, jittered
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=10, color=colours[i],
                       alpha=0.6, zorder=3)
        if key == "rewards":
            ax.axhline(0, color="grey", lw=0.8)
        ax.set(xticks=x, title=title)
        ax.set_xticklabels(labels, rotation=15, ha="right")
    if matrix is not None:
        _matrix_panel(axes[3], matrix, np)
    n = results["config"]["num_samples"]
    fig.suptitle(f"tdreward {results.get('command', 'compare')}: {n} samples per model, reward "
                 f"model {_short(results['reward_model']['base_model'])}"
                 + ("" if results["reward_model"]["trained"] else " (untrained critic)")
                 + (f", the first of {len(matrix['references'])} references" if matrix else ""))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _matrix_panel(ax, matrix: dict, np) -> None:
    """Mean TD reward of each model (groups) under each reference (bars), 95% CIs; a hatched
    bar is a model scored by its own weights."""
    names, refs = matrix["models"], matrix["references"]
    width = 0.8 / len(refs)
    for j, ref in enumerate(refs):
        cells = [matrix["cells"][m][ref] for m in names]
        means = np.array([c["mean"] if c["mean"] is not None else np.nan for c in cells])
        lo = [c["mean"] - c["ci95"][0] if c["mean"] is not None else 0.0 for c in cells]
        hi = [c["ci95"][1] - c["mean"] if c["mean"] is not None else 0.0 for c in cells]
        pos = np.arange(len(names)) - 0.4 + width * (j + 0.5)
        bars = ax.bar(pos, means, width, yerr=[lo, hi], capsize=4, color=f"C{j + 3}",
                      alpha=0.8, label=f"ref. {_short(ref)}")
        for bar, c in zip(bars, cells):
            if c["own"]:
                bar.set_hatch("//")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xticks=np.arange(len(names)), title="TD reward by reference")
    ax.set_xticklabels([_short(m) for m in names], rotation=15, ha="right")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.12 * len(refs) * (hi - lo))  # room for the legend above the bars
    ax.legend(fontsize=7, loc="upper left", title="hatched: its own", title_fontsize=7)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return fmt_num(v, f".{digits}g")
    return html.escape(str(v))


def summary_rows(results: dict) -> list[list[str]]:
    """The table shared by the report and the terminal: one row per model."""
    rows = []
    for m, r in results["models"].items():
        td, words, toks = r["td_reward"], r["response_length"]["words"], \
            r["response_length"]["tokens"]
        ci = td["ci95"]
        rows.append([
            m, str(td["n"]), _fmt(td["mean"]),
            f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci[0] is not None else "–",
            _fmt(td["median"]), _fmt(td["std"]), _fmt(td["min"]), _fmt(td["max"]),
            fmt_pct(r["negative_share"]), fmt_pct(r["negative_token_share"]),
            _fmt(words["mean"], 3), _fmt(toks["mean"], 3), r["prompt_format"],
        ])
    return rows


def pairing(diff: dict) -> str:
    """How a difference was bootstrapped: "10 pairs", or "unpaired (reason)"; results.json
    files from before pairing say nothing, and their bootstrap was unpaired."""
    if diff.get("paired"):
        return f"{diff['n_pairs']} pairs"
    reason = diff.get("unpaired_reason")
    return f"unpaired ({reason})" if reason else "unpaired"


def _ci(ci: list, digits: int = 4, sign: str = "") -> str:
    if ci[0] is None:
        return "–"
    return f"[{fmt_num(ci[0], sign + f'.{digits}g')}, {fmt_num(ci[1], sign + f'.{digits}g')}]"


def matrix_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """The models x references matrix as (header, rows) of plain text, shared by the report
    and the terminal: "mean [95% CI] n=N" per cell, "*" on a model scored by its own
    weights. None without several references."""
    mat = results.get("reference_matrix")
    if not mat:
        return None
    header = ["model \\ reference"] + [
        r + ("" if mat["critics"][r] == "trained" else " (untrained critic)")
        for r in mat["references"]]
    rows = []
    for m in mat["models"]:
        row = [m]
        for r in mat["references"]:
            c = mat["cells"][m][r]
            row.append(f"{_fmt(c['mean'])} {_ci(c['ci95'])} n={c['n']}"
                       + (" *" if c["own"] else ""))
        rows.append(row)
    return header, rows


def matrix_difference_rows(results: dict) -> list[list[str]]:
    """Per reference, each pair's paired difference: [reference, "b − a", diff, CI, d,
    pairing]."""
    return [[d["reference"], f"{d['b']} − {d['a']}", fmt_num(d["td_reward"]["diff"], "+.4g"),
             _ci(d["td_reward"]["ci95"], sign="+"), _fmt(d["td_reward"]["cohens_d"], 3),
             pairing(d["td_reward"])]
            for d in (results.get("reference_matrix") or {}).get("differences", [])]


def self_preference_rows(results: dict) -> list[list[str]]:
    """[models, own references, gap, CI, pairs] for each pair of models that are references."""
    rows = []
    for g in (results.get("reference_matrix") or {}).get("self_preference", []):
        rows.append([f"{g['a']} vs {g['b']}", f"{g['reference_a']}, {g['reference_b']}",
                     fmt_num(g["diff"], "+.4g"), _ci(g["ci95"], sign="+"),
                     f"{g['n_pairs']} pairs" if g["n_pairs"] else
                     f"unpaired ({g.get('unpaired_reason', '')})"])
    return rows


SELF_PREFERENCE_NOTE = (
    "Self-preference gap: (a − b under a's reference) + (b − a under b's reference), per "
    "(prompt, seed) pair, mean with its paired bootstrap 95% CI. Positive: each reference "
    "is kinder to its own model than the other reference is.")

SUMMARY_HEADER = ["model", "n", "mean TD reward", "95% CI", "median", "std", "min", "max",
                  "neg. share", "neg. token share", "words", "tokens", "prompt"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='summary'><tr>{head}</tr>{body}</table>"


def _trace_fragment(scores: list[TextScore], model: str, trained: bool) -> tuple[str, str]:
    """(css, body) of trace.trace_html's page, to embed in the report."""
    page = trace.trace_html(scores, model, trained)
    css = page.split("<style>", 1)[1].split("</style>", 1)[0]
    body = page.split("<body>", 1)[1].rsplit("</body>", 1)[0]
    # The trace page's own title and notes are said once in the report.
    body = body.split("<h2>", 1)[1] if "<h2>" in body else body
    return css, ("<h2>" + body).replace("<h2>", "<h4>").replace("</h2>", "</h4>")


def report_html(results: dict, traces: dict[str, list[TextScore | None]],
                trace_samples: int = 3, plot_png: bytes | None = None) -> str:
    rm = results["reward_model"]
    cfg = results["config"]
    parts = [f"<h1>tdreward {html.escape(results.get('command', 'compare'))} report</h1>",
             f"<p>{cfg['num_samples']} samples per model from <code>"
             f"{html.escape(results['prompts_file'])}</code>; max_new_tokens "
             f"{cfg['max_new_tokens']}, temperature {cfg['temperature']}, top_p {cfg['top_p']}, "
             f"seed {cfg['seed']}. Reward model: reference LM <code>{html.escape(rm['base_model'])}"
             f"</code>, critic <code>{html.escape(str(rm['path']))}</code>. Only the response's "
             "tokens count towards a sample's TD reward (mean &delta; over them).</p>"]
    if not rm["trained"]:
        parts.append("<p class='note'>No trained critic: V is its learning-free part (the reference LM's "
                     "expected reward rbar plus the reward centre), so &delta; is surprise relative "
                     "to the reference's own expectation.</p>")
    parts.append(_table(SUMMARY_HEADER, summary_rows(results)))
    if results.get("comparisons"):
        rows = []
        for c in results["comparisons"]:
            td, w = c["td_reward"], c["words"]
            rows.append([html.escape(f"{c['b']} − {c['a']}"), _fmt(td["diff"]),
                         f"[{_fmt(td['ci95'][0])}, {_fmt(td['ci95'][1])}]", _fmt(td["cohens_d"], 3),
                         _fmt(w["diff"], 3), f"[{_fmt(w['ci95'][0], 3)}, {_fmt(w['ci95'][1], 3)}]",
                         html.escape(pairing(td))])
        parts.append("<h2>Differences</h2><p>Per-sample differences, paired by prompt and seed "
                     "where both models answered the same samples; the CI resamples the pairs."
                     "</p>" + _table(["models", "TD reward diff", "95% CI", "Cohen's d",
                                      "words diff", "95% CI", "pairing"], rows))
    matrix = matrix_table(results)
    if matrix:
        header, rows = matrix
        mat = results["reference_matrix"]
        parts.append(
            "<h2>TD reward by reference model</h2><p>Every response scored by each reference "
            f"LM ({len(mat['references'])}); the table above uses the first. Mean TD reward "
            "[95% bootstrap CI] n; * marks a model scored by its own weights (self-preference)."
            "</p>" + _table(header, [[html.escape(c) for c in row] for row in rows]))
        parts.append("<h3>Differences under each reference</h3><p>Paired by prompt and seed."
                     "</p>" + _table(["reference", "models", "TD reward diff", "95% CI",
                                      "Cohen's d", "pairing"],
                                     [[html.escape(c) for c in row]
                                      for row in matrix_difference_rows(results)]))
        sp = self_preference_rows(results)
        if sp:
            parts.append(f"<h3>Self-preference</h3><p>{html.escape(SELF_PREFERENCE_NOTE)}</p>"
                         + _table(["models", "own references", "gap", "95% CI", "pairing"],
                                  [[html.escape(c) for c in row] for row in sp]))
    if results.get("self_scores"):
        ss = results["self_scores"]
        rows = [[html.escape(m)] + ([_fmt(v.get(k)) for k in ("perplexity", "bits_per_byte",
                                                              "mean_r", "td_reward", "critic")]
                                    if "skipped" not in v else [html.escape(v["skipped"])] * 5)
                for m, v in ss["models"].items()]
        parts.append(f"<h2>Self-scores on {html.escape(ss['corpus'])} ({ss['n_chars']} "
                     "characters)</h2>" + _table(
                         ["model", "perplexity", "bits/byte", "mean r", "TD reward", "critic"],
                         rows))
    if plot_png:
        parts.append("<h2>Plot</h2><img alt='TD reward and response length per model' "
                     f"src='data:image/png;base64,{base64.b64encode(plot_png).decode()}'>")
    css = _trace_fragment([], "", True)[0]  # the trace page's style, also for the tables
    for m, r in results["models"].items():
        parts.append(f"<h2>{html.escape(m)}</h2>")
        shown = [(s, t) for s, t in zip(r["samples"], traces.get(m, [])) if t is not None]
        for s, t in shown[:trace_samples]:
            frag = _trace_fragment([t], m, rm["trained"])[1]
            parts.append(f"<p><b>Prompt {s['index']}:</b> {html.escape(s['prompt'])}<br>"
                         f"<b>TD reward</b> {_fmt(s['td_reward'])}, {s['n_words']} words, "
                         f"finish: {html.escape(s['finish_reason'])}</p>"
                         + frag.replace("Text 1", f"Sample {s['index']}"))
        rest = r["samples"][trace_samples:]
        if rest:
            rows = [[str(s["index"]), _fmt(s["td_reward"]), str(s["n_words"]),
                     html.escape(s["prompt"]), html.escape(s["response"][:400])] for s in rest]
            parts.append("<details><summary>All other samples</summary>"
                         + _table(["#", "TD reward", "words", "prompt", "response"], rows)
                         + "</details>")
    head = ("<!doctype html><html><head><meta charset='utf-8'><title>tdreward report</title>"
            f"<style>{css}\nimg {{ max-width: 100%; }} td {{ vertical-align: top; }}</style>"
            "</head><body>")
    return head + "".join(parts) + "</body></html>\n"


def write_report(path: str | os.PathLike, results: dict,
                 traces: dict[str, list[TextScore | None]], trace_samples: int = 3) -> None:
    plot = results.get("files", {}).get("plot")
    png = Path(plot).read_bytes() if plot and Path(plot).is_file() else None
    write_text(path, report_html(results, traces, trace_samples, png))


__all__ = ["SELF_PREFERENCE_NOTE", "SUMMARY_HEADER", "matrix_difference_rows", "matrix_table",
           "pairing", "report_html", "self_preference_rows", "summary_rows",
           "write_comparison_plot", "write_report"]
