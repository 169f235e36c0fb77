"""`tdreward quickstart`: train a small critic if none is cached, then compare the embedded
base (Gemma 3 270M) and instruction-tuned (SmolLM2 135M) models; prints the table and the
report's path. Offline; about 5-10 minutes on 2 CPU cores the first time."""

from __future__ import annotations

import argparse

from tdreward.commands import add_command
from tdreward.flags import from_args
from tdreward.recipes.quickstart_config import QuickstartConfig

ORDER = 5


def register(sub, common: argparse.ArgumentParser) -> None:
    add_command(
        sub, common, "quickstart", QuickstartConfig, run,
        help="train a small critic (once) and compare the embedded base and instruct models",
        description="Train a small critic on the bundled sample data if none is cached, run "
        "the base-vs-instruct experiment on the two embedded models, print the table and the "
        "HTML report's path.")


def run(args: argparse.Namespace) -> int:
    from tdreward.commands.compare import print_results
    from tdreward.recipes.quickstart import run_quickstart

    results = run_quickstart(from_args(QuickstartConfig, args, verbose=args.verbose))
    q = results["quickstart"]
    print(f"critic: {q['critic']} ({'trained now' if q['critic_trained_now'] else 'cached'})")
    print_results(results)
    print(f"Open the report: {results['files']['report']}")
    return 0
