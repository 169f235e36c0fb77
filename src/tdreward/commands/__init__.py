"""CLI subcommands, one module each. A module defines ``ORDER`` (its place in `--help`) and
``register(sub, common)``, which adds its parser(s) and sets ``func``. `tdreward.cli`
discovers the modules here, so a new command is a new file and nothing else. A command's flags
come from its config dataclass (`tdreward.flags.add_flags`): a setting is declared once.

Modules import heavy libraries inside their command functions, and config modules import none:
`tdreward --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from types import ModuleType

from tdreward.flags import add_config_flag, add_flags

__all__ = ["add_command", "command_modules"]


def add_command(sub, common: argparse.ArgumentParser, name: str, config, run, *, help: str,  # noqa: A002
                description: str | None = None, aliases: tuple[str, ...] = (),
                config_file: bool = True) -> argparse.ArgumentParser:
    """One subcommand: its parser, a flag per field of `config`, `--config FILE` (training and
    evaluation commands) and `run(args)` as what it does."""
    p = sub.add_parser(name, aliases=list(aliases), parents=[common], help=help,
                       description=description or help)
    add_flags(p, config)
    if config_file:
        add_config_flag(p)
    p.set_defaults(func=run)
    return p


def command_modules() -> list[ModuleType]:
    mods = [importlib.import_module(f"{__name__}.{m.name}")
            for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))
