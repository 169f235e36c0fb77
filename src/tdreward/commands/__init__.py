"""CLI subcommands, one module each. A module defines ``ORDER`` (its place in `--help`) and
``register(sub, common)``, which adds its parser(s) and sets ``func``. `tdreward.cli`
discovers the modules here, so a new command is a new file and nothing else. A command's flags
come from its config dataclass (`tdreward.flags.add_flags`): a setting is declared once.

Modules import heavy libraries inside their command functions, and config modules import none:
`tdreward --help` stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["command_modules"]


def command_modules() -> list[ModuleType]:
    mods = [importlib.import_module(f"{__name__}.{m.name}")
            for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))
