"""The `tdreward` command line: thin — parse flags, call the workflows, print and save.

Each subcommand lives in its own module under `tdreward.commands`.

Every long flag is accepted with underscores (the original tool's spelling) and with dashes.
Bad input ends with a one-line error and a non-zero exit; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from tdreward.commands import command_modules
from tdreward.errors import TDRewardError, first_line
from tdreward.flags import apply_config_file
from tdreward.version import __version__

log = logging.getLogger("tdreward")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `tdreward: error: ...`, exit 2 (subparsers inherit it)."""

    def error(self, message: str):
        self.exit(2, f"tdreward: error: {message} (see `{self.prog} --help`)\n")


def _common(suppress: bool = False) -> argparse.ArgumentParser:
    """--verbose and --debug. Subcommands get them with suppressed defaults, so that
    `tdreward --debug score ...` is not reset by the subcommand's own default."""
    default = argparse.SUPPRESS if suppress else False
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--verbose", "-v", action="store_true", default=default,
                   help="print timings and progress")
    p.add_argument("--debug", action="store_true", default=default,
                   help="show tracebacks on errors")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tdreward",
        description="A prospective, token-level TD reward for language models.",
        parents=[_common()],
    )
    common = _common(suppress=True)
    parser.add_argument("--version", action="version", version=f"tdreward {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in command_modules():
        module.register(sub, common)
    return parser


# --------------------------------------------------------------------------- entry point
class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "warning: " if record.levelno >= logging.WARNING else ""
        return f"tdreward: {level}{record.getMessage()}"


def _setup_logging(verbose: bool) -> None:
    # Only our logger: libraries' INFO chatter stays quiet even with --verbose.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if verbose else logging.WARNING)


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """`--config FILE`: the file's settings become the subcommand's defaults before the flags
    are parsed, so the file may also give required settings and a flag still overrides it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    name = next((a for a in argv if a in sub.choices), None)
    if name is None or sub.choices[name].get_default("_parser") is None:
        raise TDRewardError("--config is taken by the training and evaluation commands")
    apply_config_file(sub.choices[name], known.config)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _apply_config(parser, argv)
    except TDRewardError as e:
        print(f"tdreward: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The command line is an application: transformers' log chatter and advisory warnings stay
    # off for its whole run. (Loading a model in a user's own process only silences them while
    # it loads: backends.hf.quiet_loading.)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", module="transformers")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tdreward: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; the traceback only with --debug
        if args.debug:
            raise
        msg = first_line(e)
        if not isinstance(e, TDRewardError):
            msg = f"{type(e).__name__}: {msg} (run with --debug for the traceback)"
        print(f"tdreward: error: {msg}", file=sys.stderr)
        return 2 if isinstance(e, TDRewardError) else 1


if __name__ == "__main__":
    sys.exit(main())
