"""`tdreward compare | experiment | test-instruct | evaluate`: compare models by TD reward."""

from __future__ import annotations

import argparse
import sys

from tdreward.commands import add_command
from tdreward.evaluation.compare_config import (
    CompareConfig,
    ExperimentConfig,
    TestInstructConfig,
)
from tdreward.evaluation.evaluate_config import EvaluateConfig
from tdreward.flags import from_args

ORDER = 30


def register(sub, common: argparse.ArgumentParser) -> None:
    commands = [
        ("compare", CompareConfig, run_compare, {
            "help": "generate with several models and compare their TD rewards"}),
        ("experiment", ExperimentConfig, run_compare, {
            "help": "compare models on many samples: results.json, plot and an HTML report "
            "with dopamine traces"}),
        ("test-instruct", TestInstructConfig, run_test_instruct, {
            "aliases": ["test_instruct"], "help": "score an instruction-tuned Ollama model's "
            "responses with the TD reward of a base model"}),
        ("evaluate", EvaluateConfig, run_evaluate, {
            "help": "base vs fine-tuned model: perplexity and TD reward on a dataset, and "
            "sample generations"}),
    ]
    for name, cls, func, kw in commands:
        add_command(sub, common, name, cls, func, **kw).set_defaults(config_class=cls)


def run_compare(args: argparse.Namespace) -> int:
    from tdreward.evaluation.compare import run_compare as run

    results = run(from_args(args.config_class, args, verbose=args.verbose))
    print_results(results)
    return 0


def run_test_instruct(args: argparse.Namespace) -> int:
    from tdreward.evaluation.compare import run_compare as run

    results = run(from_args(TestInstructConfig, args, verbose=args.verbose))
    print_results(results, samples=3)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from tdreward.evaluation.evaluate import run_evaluate as run

    cfg = from_args(EvaluateConfig, args, verbose=args.verbose)
    results = run(cfg)
    from rich.console import Console
    from rich.table import Table

    from tdreward.display import fmt_num, print_table

    table = Table(title=f"{cfg.dataset}: scored by each model's own predictions")
    for col in ("model", "perplexity", "bits/byte", "mean r", "TD reward", "critic"):
        table.add_column(col, justify="left" if col == "model" else "right",
                         overflow="fold" if col == "model" else "ellipsis")
    for role, s in results["dataset_scores"].items():
        table.add_row(f"{role}: {s['model']}", fmt_num(s["perplexity"], ".2f"),
                      fmt_num(s["bits_per_byte"], ".3f"), fmt_num(s["mean_r"], ".4f"),
                      fmt_num(s["td_reward"], ".4f"), s["critic"])
    print_table(table, Console(width=None if sys.stdout.isatty() else 160))
    print_results(results, samples=2)
    return 0


def print_results(results: dict, samples: int = 0) -> None:
    from rich.console import Console
    from rich.table import Table

    from tdreward.display import fmt_num, print_table
    from tdreward.evaluation.report import (
        SELF_PREFERENCE_NOTE,
        SUMMARY_HEADER,
        matrix_difference_rows,
        matrix_table,
        pairing,
        self_preference_rows,
        summary_rows,
    )

    console = Console(width=None if sys.stdout.isatty() else 160)
    rm = results["reward_model"]
    table = Table(title=f"TD reward of the responses (reward model {rm['base_model']}"
                  + ("" if rm["trained"] else ", untrained critic") + ")")
    for col in SUMMARY_HEADER:
        table.add_column(col, justify="left" if col in ("model", "prompt") else "right",
                         overflow="fold" if col == "model" else "ellipsis")
    for row in summary_rows(results):
        table.add_row(*row)
    print_table(table, console)
    for c in results.get("comparisons", []):
        td, w = c["td_reward"], c["words"]
        console.print(f"{c['b']} - {c['a']}: TD reward {fmt_num(td['diff'], '+.4f')} "
                      f"[{fmt_num(td['ci95'][0], '+.4f')}, {fmt_num(td['ci95'][1], '+.4f')}], "
                      f"response words {fmt_num(w['diff'], '+.1f')} "
                      f"[{fmt_num(w['ci95'][0], '+.1f')}, {fmt_num(w['ci95'][1], '+.1f')}] "
                      f"({pairing(td)})", highlight=False, markup=False)
    matrix = matrix_table(results)
    if matrix:
        header, rows = matrix
        table = Table(title="TD reward by reference model: mean [95% CI] n (* scored by its "
                      "own weights)")
        for col in header:
            table.add_column(col, justify="left" if col == header[0] else "right",
                             overflow="fold")
        for row in rows:
            table.add_row(*row)
        print_table(table, console)
        for ref, pair, diff, ci, _, how in matrix_difference_rows(results):
            console.print(f"under {ref}: {pair}: TD reward {diff} {ci} ({how})",
                          highlight=False, markup=False)
        for pair, _, gap, ci, how in self_preference_rows(results):
            console.print(f"self-preference {pair}: {gap} {ci} ({how})", highlight=False,
                          markup=False)
        if self_preference_rows(results):
            console.print(SELF_PREFERENCE_NOTE, highlight=False, markup=False)
    for m, v in (results.get("self_scores") or {}).get("models", {}).items():
        if "skipped" in v:
            console.print(f"self-score {m}: skipped ({v['skipped']})", highlight=False)
        else:
            console.print(f"self-score {m}: perplexity {fmt_num(v['perplexity'], '.2f')}, "
                          f"bits/byte {fmt_num(v['bits_per_byte'], '.3f')}, mean r "
                          f"{fmt_num(v['mean_r'], '.4f')}, TD reward "
                          f"{fmt_num(v['td_reward'], '.4f')} ({v['critic']} critic)",
                          highlight=False)
    for m, r in results["models"].items():
        for s in r["samples"][:samples]:
            console.print(f"[{m}] {s['prompt']!r} -> {s['response'][:200]!r}", highlight=False,
                          markup=False)
    for kind, path in results.get("files", {}).items():
        console.print(f"{kind}: {path}", highlight=False)
