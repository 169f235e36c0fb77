"""`tdreward models`: the embedded models, whether they are installed and cached, spec syntax."""

from __future__ import annotations

import argparse
import sys

ORDER = 0


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("models", parents=[common], help="list embedded models and spec syntax")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tdreward.backends import embedded
    from tdreward.display import print_table
    from tdreward.specs import SPEC_SYNTAX

    table = Table(title="Embedded models (offline, shipped as PyPI packages)")
    for col in ("spec", "description", "installed", "cached", "package"):
        table.add_column(col, overflow="fold" if col in ("spec", "package") else "ellipsis")
    for m in embedded.EMBEDDED.values():
        installed = embedded.is_installed(m.name)
        table.add_row(f"embedded:{m.name}", m.description, "yes" if installed else "no",
                      "yes" if installed and _is_cached(m.name) else "no", m.package)
    console = print_table(table, Console(width=None if sys.stdout.isatty() else 120))
    console.print(f"Cache: {embedded.cache_dir()}  (set TDREWARD_CACHE to move it)")
    console.print("Model specs:\n" + SPEC_SYNTAX, markup=False, highlight=False)
    return 0


def _is_cached(name: str) -> bool:
    from tdreward.backends.embedded import EMBEDDED, cache_dir
    from tdreward.cache_files import read_json_dict

    # The cache is keyed by content hash; the hash index maps files to keys.
    index = cache_dir() / "models" / "hashes.json"
    filename = EMBEDDED[name].filename
    for key, digest in read_json_dict(index).items():  # a damaged index reads as empty
        if key.split("|")[0].endswith(filename) and isinstance(digest, str):
            return (cache_dir() / "models" / digest[:24] / "config.json").is_file()
    return False
