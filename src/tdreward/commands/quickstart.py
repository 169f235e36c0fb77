"""`tdreward quickstart`: train a small critic if none is cached, then compare the embedded
base (Gemma 3 270M) and instruction-tuned (SmolLM2 135M) models; prints the table and the
report's path. Offline; about 5-10 minutes on 2 CPU cores the first time."""

from __future__ import annotations

import argparse

from tdreward.commands import flag

ORDER = 5


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "quickstart", parents=[common],
        help="train a small critic (once) and compare the embedded base and instruct models",
        description="Train a small critic on the bundled sample data if none is cached, run "
        "the base-vs-instruct experiment on the two embedded models, print the table and the "
        "HTML report's path.")
    flag(p, "--output_dir", default="tdreward_quickstart", help="where the results go")
    flag(p, "--num_samples", type=int, default=10, help="samples per model (default 10)")
    flag(p, "--max_new_tokens", type=int, default=64, help="tokens per response (default 64)")
    flag(p, "--critic_dir", help="where the critic is cached "
         "(default $TDREWARD_CACHE/critics/quickstart-smollm2)")
    p.add_argument("--retrain", action="store_true", help="train the critic again")
    flag(p, "--max_tokens", type=int, default=6000,
         help="corpus tokens the critic learns from (default 6000)")
    p.add_argument("--epochs", type=int, default=30, help="critic epochs at most (default 30)")
    p.add_argument("--seed", type=int, default=0)
    flag(p, "--cache_dir", help="generation cache (default $TDREWARD_CACHE/generations)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tdreward.commands.compare import print_results
    from tdreward.recipes.quickstart import QuickstartConfig, run_quickstart

    results = run_quickstart(QuickstartConfig(
        output_dir=args.output_dir, num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens, critic_dir=args.critic_dir, retrain=args.retrain,
        max_tokens=args.max_tokens, epochs=args.epochs, seed=args.seed,
        cache_dir=args.cache_dir, verbose=args.verbose))
    q = results["quickstart"]
    print(f"critic: {q['critic']} ({'trained now' if q['critic_trained_now'] else 'cached'})")
    print_results(results)
    print(f"Open the report: {results['files']['report']}")
    return 0
