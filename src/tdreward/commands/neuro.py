"""`tdreward neuro`: simulate Qian et al. (2025), cue RPEs under contingency changes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from tdreward.commands import add_command
from tdreward.flags import from_args, setting
from tdreward.validation import check_choice, check_output_dir, validate

ORDER = 90


@dataclass
class NeuroConfig:
    """Everything `tdreward neuro` takes: each field is a flag (tdreward.flags)."""

    condition: list[str] = setting(
        default_factory=lambda: ["all"], default_help="all",
        help="conditioning, degradation, cued_reward, extinction or all")
    model: list[str] = setting(default_factory=lambda: ["all"], default_help="all",
                               help="belief, csc, csc_iti, cue_context or all")
    trials: int = setting(4000, help="trials per phase")
    seeds: int = setting(25, help="simulated animals (seeds 0 .. N-1)")
    output_dir: str = setting("neuro_out", help="where results.json and fig3.png go")

    def __post_init__(self) -> None:
        from tdreward.neuro import CONDITIONS, MODELS  # numpy and torch: only once built

        validate(self, {"trials": ">=8", "seeds": ">=1"})
        for name in self.condition:
            check_choice("--condition", name, (*CONDITIONS, "all"))
        for name in self.model:
            check_choice("--model", name, (*MODELS, "all"))
        check_output_dir(self.output_dir, "--output_dir")


def register(sub, common: argparse.ArgumentParser) -> None:
    add_command(
        sub, common, "neuro", NeuroConfig, run,
        help="simulate Qian et al. (2025): cue RPEs under contingency changes")


def run(args: argparse.Namespace) -> int:
    from tdreward.display import fmt_num
    from tdreward.neuro import run_neuro

    cfg = from_args(NeuroConfig, args)
    res = run_neuro(cfg.condition, cfg.model, trials=cfg.trials, seeds=cfg.seeds,
                    output_dir=cfg.output_dir, progress=True)
    print("cue RPE at odour A (normalised to the end of conditioning), mean over seeds:")
    for model in res["models"]:
        row = ", ".join(f"{c} {fmt_num(res['results'][c][model]['cue_rpe_normalized']['mean'], '.3f')}"
                        for c in res["conditions"])
        print(f"  {model:12s} {row}")
    print(f"results: {res['results_json']}\nfigure: {res['figure']}")
    return 0
