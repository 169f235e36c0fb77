"""The `tdreward` command line: thin — parse flags, call the workflows, print and save.

Every long flag is accepted with underscores (the original tool's spelling) and with dashes.
Bad input ends with a one-line error and a non-zero exit; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from tdreward import __version__
from tdreward.errors import TDRewardError

log = logging.getLogger("tdreward")
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


def _flag(p: argparse.ArgumentParser, name: str, *args, **kw) -> None:
    """Add --some_flag together with its --some-flag spelling."""
    names = [name] + ([name.replace("_", "-")] if "_" in name else [])
    p.add_argument(*names, *args, **kw)


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--verbose", "-v", action="store_true", help="print timings and progress")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def _reward_flags(p: argparse.ArgumentParser) -> None:
    _flag(p, "--reward_model_path", help="trained critic (from `tdreward train-critic`)")
    p.add_argument("--alpha", type=float, help="retrospective-association penalty (0.1)")
    p.add_argument("--beta", type=float, help="exploration (entropy) bonus (0.01)")
    p.add_argument("--gamma", type=float, help="TD discount (0.99)")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="tdreward",
        description="A prospective, token-level TD reward for language models.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"tdreward {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", parents=[common], help="list embedded models and spec syntax")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("score", parents=[common], help="per-token TD trace of a text",
                       description="Score texts with the TD reward: a per-token trace and a "
                       "summary (td_reward, mean_r, return, perplexity, n_tokens).")
    p.add_argument("text", nargs="*", help="text(s) to score")
    _flag(p, "--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})")
    p.add_argument("--file", action="append", default=[], help="score a file's text (repeatable)")
    _reward_flags(p)
    p.add_argument("--state", help="state model of an untrained critic: belief, csc, hidden")
    p.add_argument("--json", help="write the full per-token trace as JSON")
    p.add_argument("--html", help="write an HTML dopamine trace")
    p.add_argument("--plot", help="write a PNG of r, V, delta and the belief")
    p.add_argument("--trace", action="store_true", help="print tokens coloured by delta")
    _flag(p, "--batch_size", type=int, default=8)
    _flag(p, "--max_length", type=int, help="context window (default: the model's)")
    p.add_argument("--stride", type=int, help="sliding-window stride for long texts")
    p.set_defaults(func=cmd_score)
    return parser


# --------------------------------------------------------------------------- commands
def cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tdreward.backends import embedded
    from tdreward.specs import SPEC_SYNTAX

    table = Table(title="Embedded models (offline, shipped as PyPI packages)")
    for col in ("spec", "description", "installed", "cached", "package"):
        table.add_column(col)
    for m in embedded.EMBEDDED.values():
        installed = embedded.is_installed(m.name)
        table.add_row(f"embedded:{m.name}", m.description, "yes" if installed else "no",
                      "yes" if installed and _is_cached(m.name) else "no", m.package)
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(f"Cache: {embedded.cache_dir()}  (set TDREWARD_CACHE to move it)")
    console.print("Model specs:\n" + SPEC_SYNTAX, markup=False, highlight=False)
    return 0


def _is_cached(name: str) -> bool:
    from tdreward.backends.embedded import EMBEDDED, cache_dir

    # The cache is keyed by content hash; the hash index maps files to keys.
    index = cache_dir() / "models" / "hashes.json"
    if not index.is_file():
        return False
    import json

    filename = EMBEDDED[name].filename
    for key, digest in json.loads(index.read_text()).items():
        if key.split("|")[0].endswith(filename):
            return (cache_dir() / "models" / digest[:24] / "config.json").is_file()
    return False


def _read_texts(args: argparse.Namespace) -> list[str]:
    from tdreward.data.corpus import read_text_file

    texts = list(args.text)
    for f in args.file:
        texts.append(read_text_file(Path(f)))
    if not texts and not sys.stdin.isatty():
        texts.append(sys.stdin.read())
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TDRewardError("nothing to score: give TEXT, --file F, or pipe text on stdin")
    return texts


def cmd_score(args: argparse.Namespace) -> int:
    from tdreward.workflows import score as wf

    texts = _read_texts(args)
    opts = wf.ScoreOptions(
        model=args.model, reward_model_path=args.reward_model_path, batch_size=args.batch_size,
        max_length=args.max_length, stride=args.stride, alpha=args.alpha, beta=args.beta,
        gamma=args.gamma, state=args.state, verbose=args.verbose,
    )
    model = wf.load_reward_model(opts)
    start = time.perf_counter()
    scores = wf.score_texts(model, texts, opts)
    n = sum(s.summary["n_tokens"] for s in scores)
    log.info("scored %d tokens in %.2f s", n, time.perf_counter() - start)
    wf.save_outputs(model, scores, args.json, args.html, args.plot)
    _print_scores(scores, args.trace)
    for kind, path in (("JSON", args.json), ("HTML", args.html), ("plot", args.plot)):
        if path:
            print(f"{kind}: {path}")
    return 0


def _print_scores(scores, show_trace: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    table = Table(title="TD reward")
    for col in ("text", "td_reward", "mean_r", "return", "perplexity", "n_tokens"):
        table.add_column(col, justify="right" if col != "text" else "left")
    for i, s in enumerate(scores):
        m = s.summary
        table.add_row(str(i + 1), f"{m['td_reward']:.4f}", f"{m['mean_r']:.4f}",
                      f"{m['return']:.3f}", f"{m['perplexity']:.2f}", str(m["n_tokens"]))
    console.print(table)
    if show_trace:
        for i, s in enumerate(scores):
            scale = max((abs(d) for d in s.delta), default=1.0) or 1.0
            line = Text(f"{i + 1}: ")
            for tok, d in zip(s.tokens, s.delta):
                a = min(1.0, abs(d) / scale)
                level = int(40 + 160 * a)
                colour = f"rgb(0,{level},0)" if d >= 0 else f"rgb({level},0,0)"
                line.append(tok, style=f"on {colour}")
            console.print(line)


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tdreward: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; the traceback only with --debug
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, TDRewardError):
            msg = f"{type(e).__name__}: {msg} (run with --debug for the traceback)"
        print(f"tdreward: error: {msg}", file=sys.stderr)
        return 2 if isinstance(e, TDRewardError) else 1


if __name__ == "__main__":
    sys.exit(main())
