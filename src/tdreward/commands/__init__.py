"""CLI subcommands, one module each. A module defines ``ORDER`` (its place in `--help`) and
``register(sub, common)``, which adds its parser(s) and sets ``func``. `tdreward.cli`
discovers the modules here, so a new command is a new file and nothing else.

Modules import heavy libraries inside their command functions: `tdreward --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from types import ModuleType

from tdreward.specs import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL", "flag", "reward_flags", "command_modules"]


def flag(p: argparse.ArgumentParser, name: str, *args, **kw) -> None:
    """Add --some_flag together with its --some-flag spelling."""
    names = [name] + ([name.replace("_", "-")] if "_" in name else [])
    p.add_argument(*names, *args, **kw)


def reward_flags(p: argparse.ArgumentParser, defaults: bool = False) -> None:
    """--reward_model_path, --alpha, --beta, --gamma (None = the critic's own values)."""
    flag(p, "--reward_model_path", help="trained critic (from `tdreward train-critic`)")
    p.add_argument("--alpha", type=float, default=0.1 if defaults else None,
                   help="retrospective-association penalty (0.1)")
    p.add_argument("--beta", type=float, default=0.01 if defaults else None,
                   help="exploration (entropy) bonus (0.01)")
    p.add_argument("--gamma", type=float, default=0.99 if defaults else None,
                   help="TD discount (0.99)")


def command_modules() -> list[ModuleType]:
    mods = [importlib.import_module(f"{__name__}.{m.name}")
            for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))
