"""`tdreward quickstart`: a small critic (trained once, cached) and the base-vs-instruct
experiment on the two embedded models, end to end and offline.

The critic learns on the bundled data/sample_training_data.jsonl (not WikiText: nothing here
may depend on data outside the package); it is trained into `<critic_dir>.partial` and renamed
when complete, so an interrupted training resumes and a half-trained critic is never used.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from tdreward.backends.embedded import cache_dir as tdreward_cache
from tdreward.evaluation.compare import TRAINING_DATA, bundled_data, run_compare
from tdreward.evaluation.compare_config import ExperimentConfig
from tdreward.recipes.quickstart_config import QuickstartConfig
from tdreward.reward_settings import RewardSettings
from tdreward.specs import DEFAULT_MODEL, DEFAULT_MODELS

log = logging.getLogger("tdreward")


def default_critic_dir() -> Path:
    return tdreward_cache() / "critics" / "quickstart-smollm2"


def ensure_critic(cfg: QuickstartConfig) -> tuple[Path, bool]:
    """(critic directory, whether it was trained now)."""
    from tdreward.cache_files import file_lock

    final = Path(cfg.critic_dir) if cfg.critic_dir else default_critic_dir()
    # Quickstarts started together train one critic (into one `.partial` folder, which a
    # killed run resumes): the others wait for it, then reuse it.
    with file_lock(final.with_name(f".{final.name}.lock"), "training the quickstart critic"):
        return _ensure_critic(cfg, final)


def _ensure_critic(cfg: QuickstartConfig, final: Path) -> tuple[Path, bool]:
    from tdreward.critic_files import CONFIG_NAME, WEIGHTS_NAME
    from tdreward.training.critic_trainer import CriticTrainingConfig, train_critic

    if cfg.retrain and final.exists():
        shutil.rmtree(final)
    if (final / CONFIG_NAME).is_file() and (final / WEIGHTS_NAME).is_file():
        return final, False
    partial = final.with_name(final.name + ".partial")
    log.warning("training a small critic on %s into %s (once; later runs reuse it)",
                TRAINING_DATA, final)
    train_critic(CriticTrainingConfig(
        base_model=DEFAULT_MODEL, dataset=str(bundled_data(TRAINING_DATA)),
        max_tokens=cfg.max_tokens, output_dir=str(partial), epochs=cfg.epochs, seed=cfg.seed,
        hardware=cfg.hardware,
    ), progress=True)
    # The LM-feature cache and the resume checkpoint are only needed while training.
    for sub in ("cache", "checkpoint"):
        shutil.rmtree(partial / sub, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    return final, True


def run_quickstart(cfg: QuickstartConfig) -> dict:
    critic, trained_now = ensure_critic(cfg)
    results = run_compare(ExperimentConfig(
        models=list(DEFAULT_MODELS), num_samples=cfg.num_samples,
        max_new_tokens=cfg.max_new_tokens, output_dir=cfg.output_dir,
        base_model=DEFAULT_MODEL, reward=RewardSettings(reward_model_path=str(critic)),
        seed=cfg.seed, cache_dir=cfg.cache_dir, verbose=cfg.verbose, hardware=cfg.hardware,
    ))
    results["quickstart"] = {"critic": str(critic), "critic_trained_now": trained_now}
    return results


__all__ = ["QuickstartConfig", "default_critic_dir", "ensure_critic", "run_quickstart"]
