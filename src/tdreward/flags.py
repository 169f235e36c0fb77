"""Command-line flags made from config dataclasses: each setting is declared once, as a field.

As in TRL's configs (and transformers' HfArgumentParser, which this follows), a field's type,
default and `metadata["help"]` make its flag. HfArgumentParser itself is not used: it cannot
flatten a nested dataclass (the reward settings every command shares), keep the original
tool's flag names (`--num_epochs` beside `--epochs`, `--freeze_critic`) or repeat a flag
(`--file a --file b`). What a field may add in its metadata (see `setting`):

    help        the help text; "(default: X)" is added from the default
    flag        the flag's own name when it is not `--FIELD`, e.g. "--no_chat_template" for a
                bool that defaults to True (the flag then stores False)
    aliases     more names, e.g. ["--num_epochs"]
    choices     allowed values
    positional  a positional argument instead of a flag
    append      a list built by repeating the flag (`--file a --file b`)
    group       the help section
    default_help  what to say instead of the default (e.g. "the critic's own")

Every long flag is offered with underscores and with dashes. A nested dataclass field adds
its own fields' flags and is rebuilt by `from_args`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from tdreward.errors import TDRewardError, first_line


def setting(default: Any = dataclasses.MISSING, *, help: str,  # noqa: A002 (argparse's word)
            default_factory: Any = dataclasses.MISSING, **meta: Any):
    """A config field that is also a flag: `x: int = setting(8, help="...")`."""
    if default is not dataclasses.MISSING and isinstance(default, (list, dict)):
        raise TypeError("use default_factory for list and dict defaults")
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, **meta})


def _spellings(name: str) -> list[str]:
    return [name] + ([name.replace("_", "-")] if "_" in name else [])


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    """(inner type, whether None is allowed)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def is_nested(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def flag_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of every flag-bearing field, nested dataclasses flattened."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or "help" not in f.metadata:
            continue
        tp = hints[f.name]
        if is_nested(tp):
            out.extend(flag_fields(tp))
        else:
            out.append((f, tp))
    return out


def add_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of `cls` (and of its nested dataclasses) to `parser`. The parser
    remembers `cls` (default `_configs`), so a test can hold every flag against its field."""
    parser.set_defaults(_configs=(*(parser.get_default("_configs") or ()), cls))
    groups: dict[str, Any] = {}
    for f, tp in flag_fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        target = parser
        if meta.get("group"):
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        default = _default(f)
        inner, optional = _unwrap_optional(tp)
        kw: dict[str, Any] = {"dest": f.name}
        shown = meta.get("default_help", None if default in (None, dataclasses.MISSING, [], {})
                         or isinstance(default, bool) else default)
        help_ = meta["help"] + (f" (default: {shown})" if shown not in (None, "") else "")
        kw["help"] = help_.replace("%", "%%")
        origin = typing.get_origin(inner)
        if inner is bool:
            kw["action"] = "store_false" if default is True else "store_true"
        elif origin is list:
            (elem,) = typing.get_args(inner) or (str,)
            kw["type"] = elem
            if meta.get("append"):
                kw["action"] = "append"
            else:
                kw["nargs"] = meta.get("nargs", "+")
        elif inner is dict or origin is dict:
            kw["type"] = json.loads
            kw["metavar"] = "JSON"
        else:
            kw["type"] = inner if inner in (int, float, str) else str
        if "choices" in meta:
            kw["choices"] = list(meta["choices"])
        if meta.get("positional"):
            kw.pop("dest")
            kw["nargs"] = meta.get("nargs", "*" if origin is list else None)
            kw.pop("action", None)
            target.add_argument(f.name, **{k: v for k, v in kw.items() if v is not None},
                                default=default)
            continue
        required = default is dataclasses.MISSING
        if required:
            kw["required"] = True
        else:
            # Lists are copied: argparse appends to the default list in place.
            kw["default"] = list(default) if isinstance(default, list) else default
        if optional and kw.get("action") in ("store_true", "store_false"):
            raise TypeError(f"{cls.__name__}.{f.name}: a bool flag cannot be optional")
        names = _spellings(meta.get("flag", f"--{f.name}"))
        for alias in meta.get("aliases", ()):
            names += _spellings(alias)
        target.add_argument(*names, **kw)


def from_args(cls, args: argparse.Namespace, **extra: Any):
    """Build `cls` (and its nested dataclasses) from parsed flags; `extra` sets fields that
    have no flag (e.g. the global --verbose); the others keep their defaults."""
    hints = _hints(cls)
    values = dict(extra)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if f.name in values:
            continue
        if is_nested(tp) and "help" in f.metadata:
            values[f.name] = from_args(tp, args)
        elif "help" in f.metadata and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)


# --------------------------------------------------------------------------- config files
def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="a .json or .yaml file of settings (flag names without --); "
                        "flags on the command line override it")
    parser.set_defaults(_parser=parser)


def read_config_file(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise TDRewardError(f"--config: {p} not found")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json and yaml raise their own kinds
        first = first_line(e)
        raise TDRewardError(f"--config: {p} cannot be read ({first})") from e
    if not isinstance(data, dict):
        raise TDRewardError(f"--config: {p} must hold a mapping of setting names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    """Make a config file's values the subcommand's defaults (flags given still win)."""
    values = read_config_file(path)
    dests = {a.dest for a in parser._actions}  # noqa: SLF001 (argparse has no public view)
    unknown = sorted(set(values) - dests - {"config"})
    if unknown:
        raise TDRewardError(f"--config: unknown setting(s) {', '.join(unknown)} in {path}")
    for action in parser._actions:  # noqa: SLF001
        if action.dest in values:
            action.required = False
    parser.set_defaults(**values)
