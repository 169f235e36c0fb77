"""`tdreward neuro`: simulate Qian et al. (2025), cue RPEs under contingency changes."""

from __future__ import annotations

import argparse

from tdreward.commands import flag

ORDER = 90


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("neuro", parents=[common],
                       help="simulate Qian et al. (2025): cue RPEs under contingency changes")
    p.add_argument("--condition", nargs="+", default=["all"],
                   help="conditioning, degradation, cued_reward, extinction or all")
    p.add_argument("--model", nargs="+", default=["all"],
                   help="belief, csc, csc_iti, cue_context or all")
    p.add_argument("--trials", type=int, default=4000, help="trials per phase")
    p.add_argument("--seeds", type=int, default=25)
    flag(p, "--output_dir", default="neuro_out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tdreward.display import fmt_num
    from tdreward.neuro import run_neuro

    res = run_neuro(args.condition, args.model, trials=args.trials, seeds=args.seeds,
                    output_dir=args.output_dir, progress=True)
    print("cue RPE at odour A (normalised to the end of conditioning), mean over seeds:")
    for model in res["models"]:
        row = ", ".join(f"{c} {fmt_num(res['results'][c][model]['cue_rpe_normalized']['mean'], '.3f')}"
                        for c in res["conditions"])
        print(f"  {model:12s} {row}")
    print(f"results: {res['results_json']}\nfigure: {res['figure']}")
    return 0
